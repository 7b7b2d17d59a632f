"""Peer methods the bench compares diffc with, each built as (denoiser module, per-image-set
context): diffusers' cache hooks (FirstBlockCache, TaylorSeer, MagCache, FasterCache, PAB,
SeaCache), DeepCache and torchao weight-only int8."""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from ..errors import DiffcError


@dataclass(frozen=True)
class Peer:
    name: str
    description: str
    build: Callable[[Any, str, int], tuple[torch.nn.Module, Callable[[], Any]]]


def _timestep_tracker(module: torch.nn.Module) -> Callable[[], int]:
    """A callback giving the timestep of the denoiser's current call (diffusers' timestep-range
    caches ask the pipeline for it; our pipelines do not tell, so read it off the call)."""
    seen: dict[str, Any] = {"t": 1000}

    def record(_module: Any, args: tuple, kwargs: dict) -> None:
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if t is not None:
            seen["t"] = int(torch.as_tensor(t).flatten()[0].item())

    module.register_forward_pre_hook(record, with_kwargs=True)
    return lambda: seen["t"]


def _diffusers_hook(config_name: str, apply_name: str, options: Callable[[int, Callable[[], int]], dict]) -> Callable:
    def build(pipe: Any, attribute: str, steps: int) -> tuple[torch.nn.Module, Callable[[], Any]]:
        import diffusers.hooks as hooks
        from diffusers.hooks.hooks import CacheContext, HookRegistry, _set_cache_context

        module = copy.deepcopy(getattr(pipe, attribute))
        timestep = _timestep_tracker(module)
        getattr(hooks, apply_name)(module, getattr(hooks, config_name)(**options(steps, timestep)))
        registry = HookRegistry.check_if_exists_or_initialize(module)
        registry.invalidate_child_registries_cache()

        @contextlib.contextmanager
        def per_image_set() -> Iterator[None]:
            registry.reset_stateful_hooks()
            _set_cache_context(module, CacheContext("cond", num_inference_steps=steps))
            try:
                yield
            finally:
                _set_cache_context(module, None)

        return module, per_image_set

    return build


def _deepcache(pipe: Any, attribute: str, steps: int) -> tuple[torch.nn.Module, Callable[[], Any]]:
    if attribute != "unet":
        raise DiffcError(f"DeepCache caches UNet up/down blocks; this pipeline's denoiser is a {attribute}")
    from DeepCache import DeepCacheSDHelper

    original = pipe.unet
    pipe.unet = copy.deepcopy(original)
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=3, cache_branch_id=0)
    helper.enable()
    module, pipe.unet = pipe.unet, original

    @contextlib.contextmanager
    def per_image_set() -> Iterator[None]:
        helper.reset_states()
        yield

    return module, per_image_set


def _torchao(compile_model: bool) -> Callable:
    def build(pipe: Any, attribute: str, steps: int) -> tuple[torch.nn.Module, Callable[[], Any]]:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        module = copy.deepcopy(getattr(pipe, attribute))
        quantize_(module, Int8WeightOnlyConfig())
        if compile_model:
            module.forward = torch.compile(module.forward)
        return module, contextlib.nullcontext

    return build


PEERS: dict[str, Peer] = {p.name: p for p in [
    Peer("fbc", "diffusers FirstBlockCache(threshold=0.05)",
         _diffusers_hook("FirstBlockCacheConfig", "apply_first_block_cache", lambda s, t: {"threshold": 0.05})),
    Peer("taylorseer", "diffusers TaylorSeerCache(cache_interval=3)",
         _diffusers_hook("TaylorSeerCacheConfig", "apply_taylorseer_cache",
                         lambda s, t: {"cache_interval": 3, "taylor_factors_dtype": torch.float32})),
    Peer("magcache", "diffusers MagCache (default ratios)",
         _diffusers_hook("MagCacheConfig", "apply_mag_cache", lambda s, t: {"num_inference_steps": s})),
    Peer("fastercache", "diffusers FasterCache(spatial skip 2)",
         _diffusers_hook("FasterCacheConfig", "apply_faster_cache",
                         lambda s, t: {"current_timestep_callback": t, "is_guidance_distilled": True})),
    Peer("pab", "diffusers PyramidAttentionBroadcast(spatial skip 2, timesteps 100-800)",
         _diffusers_hook("PyramidAttentionBroadcastConfig", "apply_pyramid_attention_broadcast",
                         lambda s, t: {"spatial_attention_block_skip_range": 2, "current_timestep_callback": t})),
    Peer("seacache", "diffusers SeaCache(threshold=0.25)",
         _diffusers_hook("SeaCacheConfig", "apply_sea_cache", lambda s, t: {})),
    Peer("deepcache", "DeepCache (cache_interval=3, branch 0)", _deepcache),
    Peer("torchao-int8", "torchao Int8WeightOnly", _torchao(compile_model=False)),
    Peer("torchao-int8-compile", "torchao Int8WeightOnly + torch.compile", _torchao(compile_model=True)),
]}

