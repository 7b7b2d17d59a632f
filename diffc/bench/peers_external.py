"""Peer builds for methods outside diffusers: DeepCache, cache-dit's DBCache and torchao int8. Each
works on a deep copy of the pipeline's denoiser and leaves the pipeline object as it was."""
from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable, Iterator

import torch

from ..errors import DiffcError, PeerNotApplicable


class _DeepCachePipelineView:
    """What DeepCacheSDHelper reads of a pipeline: the UNet it wraps (our copy, so the pipeline's own
    UNet is never wrapped) and the live scheduler, whose timesteps index its cache interval."""

    def __init__(self, pipe: Any, unet: torch.nn.Module) -> None:
        self._pipe, self.unet = pipe, unet

    @property
    def scheduler(self) -> Any:
        return self._pipe.scheduler


def one_timestep_per_call(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook giving the UNet its sample and timestep positionally, the timestep as a
    scalar: DeepCache's wrapper reads `args[1].item()`, while our pipelines pass a (batch,) tensor.
    All rows hold the same step, and the UNet broadcasts a scalar timestep over the batch."""
    sample = kwargs.pop("sample") if "sample" in kwargs else args[0]
    timestep = torch.as_tensor(kwargs.pop("timestep") if "timestep" in kwargs else args[1]).flatten()
    if not bool((timestep == timestep[0]).all()):
        raise DiffcError("DeepCache reads one timestep per UNet call; this call's batch mixes timesteps")
    return (sample, timestep[0], *args[2:]), kwargs


def build_deepcache(pipe: Any, attribute: str, steps: int, setting: str) -> tuple[torch.nn.Module, Callable]:
    from diffusers import UNet2DConditionModel

    denoiser = getattr(pipe, attribute)
    if attribute != "unet" or not isinstance(denoiser, UNet2DConditionModel):
        raise PeerNotApplicable(f"DeepCache caches UNet skip branches (DeepCacheSDHelper wraps pipe.unet's down, mid and "
                         f"up blocks of a UNet2DConditionModel); this pipeline's denoiser is a "
                         f"{type(denoiser).__name__}")
    from DeepCache import DeepCacheSDHelper

    unet = copy.deepcopy(denoiser)
    unet.register_forward_pre_hook(one_timestep_per_call, with_kwargs=True)
    helper = DeepCacheSDHelper(pipe=_DeepCachePipelineView(pipe, unet))
    helper.set_params(cache_interval=int(setting), cache_branch_id=0)

    @contextlib.contextmanager
    def per_image_set() -> Iterator[None]:
        helper.enable()  # resets its step count and cached features, as before each of its pipeline calls
        try:
            yield
        finally:
            helper.disable()

    return unet, per_image_set


def cache_dit_blocks(transformer: torch.nn.Module) -> dict[str, Any]:
    """BlockAdapter fields for the denoiser: the block lists and forward patterns cache-dit's own
    adapters declare for these diffusers families (caching/block_adapters/adapters.py)."""
    from cache_dit import ForwardPattern
    from diffusers import (DiTTransformer2DModel, FluxTransformer2DModel, PixArtTransformer2DModel,
                           SD3Transformer2DModel, WanTransformer3DModel)

    if isinstance(transformer, FluxTransformer2DModel):
        return {"blocks": [transformer.transformer_blocks, transformer.single_transformer_blocks],
                "forward_pattern": [ForwardPattern.Pattern_1, ForwardPattern.Pattern_1]}
    if isinstance(transformer, SD3Transformer2DModel):
        return {"blocks": transformer.transformer_blocks, "forward_pattern": ForwardPattern.Pattern_1}
    if isinstance(transformer, PixArtTransformer2DModel):
        return {"blocks": transformer.transformer_blocks, "forward_pattern": ForwardPattern.Pattern_3}
    if isinstance(transformer, DiTTransformer2DModel):
        from cache_dit.caching.patch_functors import DiTPatchFunctor

        return {"blocks": transformer.transformer_blocks, "forward_pattern": ForwardPattern.Pattern_3,
                "patch_functor": DiTPatchFunctor()}
    if isinstance(transformer, WanTransformer3DModel):
        return {"blocks": transformer.blocks, "forward_pattern": ForwardPattern.Pattern_2}
    raise PeerNotApplicable(f"cache-dit caches transformer blocks (DBCache on a BlockAdapter's ModuleList of blocks with "
                     f"a ForwardPattern; adapters here for FLUX, SD3, PixArt, DiT and Wan); this is a "
                     f"{type(transformer).__name__}")


def build_cache_dit(calibrated: bool) -> Callable:
    """cache-dit's DBCache F1B1 in its transformer-only mode, optionally with its TaylorSeer calibrator;
    every field but the threshold keeps cache-dit's default (max_warmup_steps=8: the first 8 steps
    are always computed; enable_separate_cfg resolves to False, right for a fused guidance batch)."""

    def build(pipe: Any, attribute: str, steps: int, setting: str) -> tuple[torch.nn.Module, Callable]:
        import cache_dit

        transformer = copy.deepcopy(getattr(pipe, attribute))
        adapter = cache_dit.BlockAdapter(transformer=transformer, check_forward_pattern=True,
                                         **cache_dit_blocks(transformer))
        cache_dit.enable_cache(
            adapter,
            cache_config=cache_dit.DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=1,
                                                 residual_diff_threshold=float(setting)),
            calibrator_config=cache_dit.TaylorSeerCalibratorConfig() if calibrated else None)

        @contextlib.contextmanager
        def per_image_set() -> Iterator[None]:
            # a fresh context (step count, cached residuals) per pipeline call, told the step count
            cache_dit.refresh_context(transformer, num_inference_steps=steps)
            yield

        return transformer, per_image_set

    return build


TORCHAO_CONFIGS = {"weight-only": "Int8WeightOnlyConfig", "dynamic": "Int8DynamicActivationInt8WeightConfig"}


def build_torchao(compile_model: bool) -> Callable:
    """torchao int8 (weight-only, or dynamic activations too) on the denoiser's Linear layers, optionally
    under torch.compile, whose failures surface at the first call."""

    def build(pipe: Any, attribute: str, steps: int, setting: str) -> tuple[torch.nn.Module, Callable]:
        from torchao import quantization

        if setting not in TORCHAO_CONFIGS:
            raise DiffcError(f"unknown torchao setting {setting!r}; use one of {sorted(TORCHAO_CONFIGS)}")
        module = copy.deepcopy(getattr(pipe, attribute))
        quantization.quantize_(module, getattr(quantization, TORCHAO_CONFIGS[setting])())
        if compile_model:
            # compile the forward, not the module, so the bench's timing hooks stay outside the graph
            module.forward = torch.compile(module.forward)
        return module, contextlib.nullcontext

    return build
