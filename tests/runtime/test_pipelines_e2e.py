"""End-to-end: the six tiny families inside real, unchanged diffusers pipelines.

Every pipeline is built from tiny components made from configs (nothing is downloaded, no text
encoders): the prompt embeddings are passed in directly. Each test runs the pipeline for a few
steps with the original denoiser and again with `diffc.optimize(denoiser, passes=[])` assigned
back into it, with the same seed, and compares the final outputs.

Pipelines read more than the forward call: PixArt always passes the prompt attention mask,
FLUX wraps calls in `transformer.cache_context(...)`, SDXL reads
`unet.add_embedding.linear_1.in_features`; these tests keep those paths working."""
from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
import types
from typing import Any, Callable

import pytest
import torch
import diffusers
import diffusers.loaders
import diffusers.pipelines
from diffusers import (AutoencoderKL, DDIMScheduler, DDPMPipeline, DDPMScheduler, DiTPipeline,
                       FlowMatchEulerDiscreteScheduler, UNet2DConditionModel)

import diffc
from tiny_families import families

ATOL = 1e-4
STEPS = 3


# --- the text-conditioned pipelines without `transformers` -------------------------------------
# StableDiffusion(XL)/PixArtAlpha/StableDiffusion3/Flux pipelines live in modules that import
# `transformers` (and `tokenizers`) at the top only for type hints and the text encoders, which these
# tests replace with precomputed embeddings; without those packages diffusers exports dummy classes
# that refuse to be built. So, only while importing the real pipeline modules, stand-in modules
# answer those imports (every name is an empty class) and diffusers.loaders exposes the loader
# mixins it gates on transformers; both are undone right after. The pipeline code runs unchanged.
_LOADER_MIXINS = {
    "single_file": ("FromSingleFileMixin",),
    "ip_adapter": ("IPAdapterMixin", "SD3IPAdapterMixin", "FluxIPAdapterMixin"),
    "lora_pipeline": ("StableDiffusionLoraLoaderMixin", "StableDiffusionXLLoraLoaderMixin", "SD3LoraLoaderMixin",
                      "FluxLoraLoaderMixin"),
    "textual_inversion": ("TextualInversionLoaderMixin",),
}
_PIPELINE_MODULES = {
    "StableDiffusionPipeline": "stable_diffusion.pipeline_stable_diffusion",
    "StableDiffusionXLPipeline": "stable_diffusion_xl.pipeline_stable_diffusion_xl",
    "PixArtAlphaPipeline": "pixart_alpha.pipeline_pixart_alpha",
    "StableDiffusion3Pipeline": "stable_diffusion_3.pipeline_stable_diffusion_3",
    "FluxPipeline": "flux.pipeline_flux",
}


def _stand_in(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    classes: dict[str, type] = {}

    def __getattr__(attr: str) -> type:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return classes.setdefault(attr, type(attr, (), {"__module__": name}))

    module.__getattr__ = __getattr__  # type: ignore[method-assign]
    return module


@functools.lru_cache(maxsize=None)
def _pipeline_class(name: str) -> type:
    real = getattr(diffusers, name)
    if "dummy" not in real.__module__:
        return real  # transformers is installed
    missing = [m for m in ("transformers", "tokenizers") if m not in sys.modules and importlib.util.find_spec(m) is None]
    added: list[str] = []
    for m in missing:
        sys.modules[m] = _stand_in(m)
    try:
        for sub, names in _LOADER_MIXINS.items():
            module = importlib.import_module(f"diffusers.loaders.{sub}")
            for attr in names:
                if attr not in vars(diffusers.loaders):
                    setattr(diffusers.loaders, attr, getattr(module, attr))
                    added.append(attr)
        return getattr(importlib.import_module(f"diffusers.pipelines.{_PIPELINE_MODULES[name]}"), name)
    finally:
        for m in missing:
            del sys.modules[m]
        for attr in added:
            delattr(diffusers.loaders, attr)


# --- tiny components ----------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _families() -> dict[str, tuple[torch.nn.Module, dict]]:
    return families()


def _denoiser(name: str) -> torch.nn.Module:
    return _families()[name][0]


@functools.lru_cache(maxsize=None)
def _optimized(name: str) -> diffc.OptimizedModel:
    """diffc.optimize of the family's tiny denoiser, exactly as a user would call it (cached)."""
    return diffc.optimize(_denoiser(name), target="torch", passes=[])


def _vae(latent_channels: int = 4, **config: Any) -> AutoencoderKL:
    """A one-level AutoencoderKL (vae_scale_factor 1), so latents are as small as the denoisers'."""
    torch.manual_seed(1)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=8, sample_size=16, **config).eval()


def _embeds(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


# --- one pipeline per family: (build(denoiser) -> pipe, attribute, call(pipe, steps) -> tensor) ----
def _sd(unet: torch.nn.Module) -> Any:
    return _pipeline_class("StableDiffusionPipeline")(vae=_vae(), text_encoder=None, tokenizer=None, unet=unet,
                                   scheduler=DDIMScheduler(beta_schedule="scaled_linear"), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def _sd_call(pipe: Any, steps: int) -> torch.Tensor:
    # guidance_scale > 1: classifier-free guidance doubles the batch to 2
    return pipe(prompt_embeds=_embeds(1, 7, 32, seed=1), negative_prompt_embeds=_embeds(1, 7, 32, seed=2),
                guidance_scale=5.0, num_inference_steps=steps, generator=_gen(), output_type="pt").images


def _ddpm(unet: torch.nn.Module) -> DDPMPipeline:
    return DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000))


def _ddpm_call(pipe: Any, steps: int) -> torch.Tensor:
    # DDPMPipeline calls unet(image, t) with a 0-dim timestep; batch 2 as captured, no guidance
    return torch.from_numpy(pipe(batch_size=2, num_inference_steps=steps, generator=_gen(),
                                 output_type="np").images)


def _dit(transformer: torch.nn.Module) -> DiTPipeline:
    return DiTPipeline(transformer=transformer, vae=_vae(), scheduler=DDIMScheduler())


def _dit_call(pipe: Any, steps: int) -> torch.Tensor:
    # DiTPipeline reads config.sample_size/in_channels/out_channels (learned sigma: out = 2 * in)
    # and, with guidance, runs batch 4 with the null class 1000 for the unconditional half
    return pipe(class_labels=[1, 2], guidance_scale=4.0, num_inference_steps=steps, generator=_gen(),
                output_type="pt").images


def _pixart(transformer: torch.nn.Module) -> Any:
    return _pipeline_class("PixArtAlphaPipeline")(tokenizer=None, text_encoder=None, vae=_vae(), transformer=transformer,
                               scheduler=DDIMScheduler())


PIXART_MASK = torch.tensor([[1, 1, 1, 1, 0]])  # a padded prompt, as T5 embeddings come


def _pixart_call(pipe: Any, steps: int) -> torch.Tensor:
    return pipe(prompt_embeds=_embeds(1, 5, 24, seed=1), prompt_attention_mask=PIXART_MASK,
                negative_prompt_embeds=_embeds(1, 5, 24, seed=2), negative_prompt_attention_mask=PIXART_MASK,
                negative_prompt=None,  # its default "" would clash with negative_prompt_embeds
                guidance_scale=4.5, num_inference_steps=steps, height=8, width=8, use_resolution_binning=False,
                generator=_gen(), output_type="latent").images


def _sd3(transformer: torch.nn.Module) -> Any:
    return _pipeline_class("StableDiffusion3Pipeline")(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
                                    vae=_vae(shift_factor=0.0), text_encoder=None, tokenizer=None,
                                    text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)


def _sd3_call(pipe: Any, steps: int) -> torch.Tensor:
    return pipe(prompt_embeds=_embeds(1, 5, 16, seed=1), pooled_prompt_embeds=_embeds(1, 16, seed=2),
                negative_prompt_embeds=_embeds(1, 5, 16, seed=3),
                negative_pooled_prompt_embeds=_embeds(1, 16, seed=4), guidance_scale=5.0,
                num_inference_steps=steps, height=8, width=8, generator=_gen(), output_type="latent").images


def _flux(transformer: torch.nn.Module) -> Any:
    return _pipeline_class("FluxPipeline")(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(shift_factor=0.0),
                        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                        transformer=transformer)


def _flux_call(pipe: Any, steps: int) -> torch.Tensor:
    # height = width = 8 with vae_scale_factor 1: 4x4 packed tokens of 16 channels; batch 1 (no true CFG)
    return pipe(prompt_embeds=_embeds(1, 8, 32, seed=1), pooled_prompt_embeds=_embeds(1, 32, seed=2),
                num_inference_steps=steps, height=8, width=8, generator=_gen(), output_type="latent").images


PIPELINES: dict[str, tuple[Callable[[torch.nn.Module], Any], str, Callable[[Any, int], torch.Tensor]]] = {
    "unet2dcond": (_sd, "unet", _sd_call),
    "unet2d": (_ddpm, "unet", _ddpm_call),
    "dit": (_dit, "transformer", _dit_call),
    "pixart": (_pixart, "transformer", _pixart_call),
    "sd3": (_sd3, "transformer", _sd3_call),
    "flux": (_flux, "transformer", _flux_call),
}


def _run(name: str, denoiser: torch.nn.Module, steps: int = STEPS) -> torch.Tensor:
    build, _, call = PIPELINES[name]
    pipe = build(denoiser)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return torch.as_tensor(call(pipe, steps))


@functools.lru_cache(maxsize=None)
def _reference(name: str, steps: int = STEPS) -> torch.Tensor:
    return _run(name, _denoiser(name), steps)


def _assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    assert torch.isfinite(want).all()
    err = (got.float() - want.float()).abs().max().item()
    assert err <= ATOL, f"max abs error {err:.3g} > {ATOL}"


def _reset(fast: diffc.OptimizedModel) -> diffc.OptimizedModel:
    fast.reset()
    return fast


# Families whose unchanged pipeline runs with the default diffc.optimize(...) result.
slow = pytest.mark.slow
WORKING = [pytest.param("unet2dcond", marks=slow), pytest.param("unet2d", marks=slow),
           pytest.param("dit", marks=slow), pytest.param("pixart", marks=slow), "sd3", "flux"]


# --- the pipelines, original denoiser vs diffc ---------------------------------------------------
@pytest.mark.parametrize("name", WORKING)
def test_pipeline_output_matches(name: str) -> None:
    fast = _reset(_optimized(name))
    got = _run(name, fast)
    _assert_close(got, _reference(name))
    assert fast.steps.step == STEPS - 1  # the tracker followed the pipeline's loop


@slow
def test_pixart_pipeline_honours_a_padded_mask() -> None:
    """Captured with a padded mask (zeros in it), the mask is honoured, not just accepted."""
    model, inputs = _families()["pixart"]
    example = {**inputs, "encoder_attention_mask": torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])}
    fast = diffc.optimize(model, target="torch", passes=[], example_inputs=example)
    got = _run("pixart", fast)
    _assert_close(got, _reference("pixart"))
    assert fast.steps.step == STEPS - 1


# --- the step tracker across pipeline calls, save/load --------------------------------------------
@pytest.mark.parametrize("name", WORKING)
def test_second_call_with_other_step_count_starts_new_loop(name: str) -> None:
    fast = _reset(_optimized(name))
    build, _, call = PIPELINES[name]
    pipe = build(fast)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        _assert_close(torch.as_tensor(call(pipe, STEPS)), _reference(name, STEPS))
        assert fast.steps.step == STEPS - 1
        _assert_close(torch.as_tensor(call(pipe, 2)), _reference(name, 2))
    assert fast.steps.step == 1


@pytest.mark.parametrize("name", WORKING)
def test_saved_and_loaded_model_gives_same_pipeline_output(name: str, tmp_path) -> None:
    fast = _optimized(name)
    fast.save(tmp_path / "a")
    loaded = diffc.load(tmp_path / "a")
    assert type(loaded).__name__ == "OptimizedModel"
    assert dict(loaded.config) == dict(fast.config)
    got = _run(name, loaded)
    _assert_close(got, _reference(name))
    assert loaded.steps.step == STEPS - 1


def test_pipeline_reads_config_dtype_device_from_optimized_model() -> None:
    fast = _optimized("sd3")
    model = _denoiser("sd3")
    assert fast.dtype == model.dtype and fast.device == model.device
    for key in ("sample_size", "in_channels", "out_channels", "patch_size", "joint_attention_dim"):
        assert fast.config[key] == model.config[key]
    pipe = _sd3(fast)
    assert pipe.transformer is fast
    assert pipe._execution_device == torch.device("cpu")


# --- SDXL ----------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _sdxl_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    # text_time: add_embedding takes 6 time ids * addition_time_embed_dim + the pooled text embedding
    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 16).eval()


@functools.lru_cache(maxsize=None)
def _sdxl_fast() -> diffc.OptimizedModel:
    return diffc.optimize(_sdxl_unet(), target="torch", passes=[])


SDXL_PROMPT = dict(prompt_embeds=_embeds(1, 7, 32, seed=1), pooled_prompt_embeds=_embeds(1, 16, seed=2),
                   negative_prompt_embeds=_embeds(1, 7, 32, seed=3),
                   negative_pooled_prompt_embeds=_embeds(1, 16, seed=4))


def _sdxl_pipeline_run(unet: torch.nn.Module, steps: int = STEPS) -> torch.Tensor:
    pipe = _pipeline_class("StableDiffusionXLPipeline")(vae=_vae(), text_encoder=None, text_encoder_2=None, tokenizer=None,
                                     tokenizer_2=None, unet=unet, scheduler=DDIMScheduler(beta_schedule="scaled_linear"),
                                     add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(**SDXL_PROMPT, guidance_scale=5.0, num_inference_steps=steps, generator=_gen(),
                    output_type="latent").images


@slow
def test_sdxl_pipeline_output_matches() -> None:
    want = _sdxl_pipeline_run(_sdxl_unet())
    fast = _reset(_sdxl_fast())
    _assert_close(_sdxl_pipeline_run(fast), want)
