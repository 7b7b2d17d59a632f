"""Tiny, random, complete text-to-image pipelines, built offline: the real diffusers pipeline
classes with tokenizers, text encoders, a VAE and a denoiser all built from small configs.

Each pipeline runs at its own defaults (steps, guidance, resolution from the denoiser's
sample_size), so `pipe("a prompt")` works with nothing else given. Tokenizers are character
level (a vocabulary of letters, digits and punctuation), which real prompts tokenize into."""
from __future__ import annotations

import string
from typing import Any, Callable

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, FlowMatchEulerDiscreteScheduler, FluxPipeline,
                       FluxTransformer2DModel, PixArtAlphaPipeline, PixArtTransformer2DModel, SD3Transformer2DModel,
                       StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline,
                       UNet2DConditionModel)
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5Config,
                          T5EncoderModel, T5Tokenizer)

ALPHABET = string.ascii_lowercase + string.digits + ",.'-!?:;()&\"/"
CLIP_LENGTH = 20
# An untrained denoiser predicts noise that is not the noise in its input, and under eps prediction
# DDIM turns that into latents of std ~16 (60 at most) by the last step: a chaotic trajectory that no
# trained model follows. v prediction (SD 2.x's) keeps them at std ~1, as trained models' are.
PREDICTION = "v_prediction"
# FluxPipeline fixes its default resolution at 128 latent pixels whatever the transformer; the tiny one
# runs at 8 (what the sample_size of the other tiny denoisers gives)
FLUX_SAMPLE_SIZE = 8


def clip_tokenizer() -> CLIPTokenizer:
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for char in ALPHABET:
            vocab[char + suffix] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_LENGTH)


def t5_tokenizer() -> T5Tokenizer:
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(char, -2.0) for char in ALPHABET] + [("\u2581" + char, -1.0) for char in ALPHABET]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def clip_text_model(hidden: int, projection: int | None = None) -> torch.nn.Module:
    config = CLIPTextConfig(vocab_size=2 + 2 * len(ALPHABET), hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=CLIP_LENGTH,
                            projection_dim=projection or hidden, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    model = CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)
    return model.eval()


def t5_model(d_model: int) -> T5EncoderModel:
    config = T5Config(vocab_size=3 + 2 * len(ALPHABET), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1,
                      num_heads=2, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1)
    return T5EncoderModel(config).eval()


def vae(levels: int = 1, **config: Any) -> AutoencoderKL:
    """vae_scale_factor 2**(levels-1): one level keeps images as small as the latents."""
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
                         up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=(8,) * levels,
                         layers_per_block=1, latent_channels=4 if "latent_channels" not in config else
                         config.pop("latent_channels"), norm_num_groups=8, sample_size=16, **config).eval()


def ddim(**config: Any) -> DDIMScheduler:
    return DDIMScheduler(clip_sample=False, prediction_type=PREDICTION, **config)


def stable_diffusion() -> StableDiffusionPipeline:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8).eval()
    return StableDiffusionPipeline(vae=vae(), text_encoder=clip_text_model(32), tokenizer=clip_tokenizer(), unet=unet,
                                   scheduler=ddim(beta_schedule="scaled_linear"), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def stable_diffusion_xl() -> StableDiffusionXLPipeline:
    torch.manual_seed(0)
    # text_time conditioning: 6 time ids * addition_time_embed_dim + the pooled embedding of text encoder 2
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 16).eval()
    return StableDiffusionXLPipeline(vae=vae(), text_encoder=clip_text_model(16),
                                     text_encoder_2=clip_text_model(16, 16),
                                     tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(), unet=unet,
                                     scheduler=ddim(beta_schedule="scaled_linear"),
                                     add_watermarker=False)


def pixart_alpha() -> PixArtAlphaPipeline:
    torch.manual_seed(0)
    # PixArt bins its resolution by the transformer's sample_size (32: the 256 px bins), so the VAE
    # downsamples 8x as the real one does: 256 px images, 32x32 latents, 256 tokens of patch 2
    transformer = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                           num_layers=2, cross_attention_dim=16, sample_size=32, patch_size=2,
                                           caption_channels=16, norm_type="ada_norm_single",
                                           use_additional_conditions=False).eval()
    return PixArtAlphaPipeline(tokenizer=t5_tokenizer(), text_encoder=t5_model(16), vae=vae(levels=4),
                               transformer=transformer, scheduler=ddim())


def stable_diffusion_3() -> StableDiffusion3Pipeline:
    torch.manual_seed(0)
    # prompt embeddings: both CLIP hidden states (8 + 8) padded to the T5 width 16; pooled: 8 + 8
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                        pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16).eval()
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
                                    vae=vae(shift_factor=0.0), text_encoder=clip_text_model(8, 8),
                                    tokenizer=clip_tokenizer(), text_encoder_2=clip_text_model(8, 8),
                                    tokenizer_2=clip_tokenizer(), text_encoder_3=t5_model(16),
                                    tokenizer_3=t5_tokenizer())


def flux() -> FluxPipeline:
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=(4, 4, 8)).eval()
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae(shift_factor=0.0),
                        text_encoder=clip_text_model(32), tokenizer=clip_tokenizer(),
                        text_encoder_2=t5_model(32), tokenizer_2=t5_tokenizer(), transformer=transformer)
    pipe.default_sample_size = FLUX_SAMPLE_SIZE
    return pipe


PIPELINES: dict[str, Callable[[], Any]] = {
    "sd": stable_diffusion, "sdxl": stable_diffusion_xl, "pixart": pixart_alpha, "sd3": stable_diffusion_3,
    "flux": flux,
}


def build(name: str) -> Any:
    pipe = PIPELINES[name]()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call_arguments(pipe: Any) -> dict[str, Any]:
    """What a call needs beyond the pipeline's own defaults: FluxPipeline's default resolution is
    fixed at 128 latent pixels, not read from the pipeline (see FLUX_SAMPLE_SIZE)."""
    if isinstance(pipe, FluxPipeline):
        size = pipe.default_sample_size * pipe.vae_scale_factor
        return {"height": size, "width": size}
    return {}


def latents(pipe: Any, prompt: str, seed: int, steps: int | None = None) -> torch.Tensor:
    """The final latents of one image, at the pipeline's defaults."""
    kwargs = {"num_inference_steps": steps} if steps is not None else {}
    with torch.no_grad():
        return pipe(prompt, generator=torch.Generator().manual_seed(seed), output_type="latent",
                    **call_arguments(pipe), **kwargs).images


LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "q_proj", "v_proj")


def lora_file(pipe: Any, path: Any, rank: int = 4, strength: float = 0.3, seed: int = 0,
              text_encoder: bool = True) -> Any:
    """A random LoRA for the pipeline's denoiser (and its first text encoder) in diffusers' PEFT
    format ('<component>.<module>.lora_A.weight'), written to a .safetensors file. `strength` is
    the adapter's change of each weight relative to the weight's own size."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    components = [("unet" if hasattr(pipe, "unet") else "transformer", getattr(pipe, "unet", None) or pipe.transformer)]
    if text_encoder:
        components.append(("text_encoder", pipe.text_encoder))
    state: dict[str, torch.Tensor] = {}
    for prefix, model in components:
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.endswith(LORA_TARGETS):
                down = torch.randn(rank, module.in_features, generator=generator) / module.in_features ** 0.5
                up = torch.randn(module.out_features, rank, generator=generator) / rank ** 0.5
                up *= strength * module.weight.norm() / (up @ down).norm()
                state[f"{prefix}.{name}.lora_A.weight"] = down.contiguous()
                state[f"{prefix}.{name}.lora_B.weight"] = up.contiguous()
    save_file(state, str(path))
    return path
