"""Peer methods the bench compares diffc with, each built as (denoiser module, per-image-set context)
from a deep copy of the pipeline's denoiser, so the pipeline and its original denoiser stay as they
were: diffusers' cache hooks (FirstBlockCache, TaylorSeer, MagCache, FasterCache, PAB, SeaCache)
here, DeepCache, cache-dit's DBCache and torchao int8 in `peers_external`.

diffusers' pipelines enter `denoiser.cache_context(...)` around every denoiser call and tell the
hooks the step, timestep and sigma (`current_timestep_callback`, `CacheContext`). Our pipelines
call the denoiser once per scheduler step with the classifier-free guidance batch fused
(unconditional half first) and enter no context, so `DenoisingLoop` reads the step off the calls
and `enter_cache_context_per_call` enters the context as diffusers' pipelines would."""
from __future__ import annotations

import ast
import contextlib
import copy
import functools
import inspect
import io
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from ..errors import DiffcError, PeerNotApplicable
from .peers_external import build_cache_dit, build_deepcache, build_torchao

BLOCK_LISTS = "top-level ModuleLists named transformer_blocks, single_transformer_blocks, blocks or layers"
MAG_CACHE_REQUIREMENT = f"skips the transformer blocks it finds in {BLOCK_LISTS}"
# inputs our pipelines batch as [unconditional, conditional]: diffusers' default names plus those of
# the UNet (sample), DiT (class_labels) and SD3 / FLUX (pooled_projections)
GUIDANCE_BATCHED_INPUTS = ("sample", "hidden_states", "encoder_hidden_states", "timestep", "class_labels",
                           "pooled_projections", "attention_mask", "encoder_attention_mask")
# TaylorSeer's docs hook "all attention-like modules by default", but its default patterns
# (re.fullmatch "^transformer_blocks.*attn", ...) match only modules named exactly `attn` under
# top-level block lists (FLUX, SD3): none in DiT, PixArt, Wan (attn1, attn2) or a UNet. These match
# every diffusers attention module by its name.
ATTENTION_MODULES = (r"(.+\.)?attn\d*",)


@dataclass(frozen=True)
class Peer:
    """A peer method. `build(pipe, attribute, steps, setting)` returns (denoiser module,
    per-image-set context); `setting` is one of `settings` (the values a sweep runs, as the peer's
    docs suggest), `default` is the peer docs' own default. `describe(setting)` is the row's note;
    `unchanged(setting)` says why the peer can leave the images bit-identical at that setting."""

    name: str
    description: str  # may hold "{setting}"
    build: Callable[[Any, str, int, str], tuple[torch.nn.Module, Callable[[], Any]]]
    settings: tuple[str, ...] = ("",)
    default: str = ""
    unchanged_because: str = ""  # may hold "{setting}"

    def describe(self, setting: str) -> str:
        return self.description.format(setting=setting)

    def unchanged(self, setting: str) -> str:
        return self.unchanged_because.format(setting=setting)


def is_flow_matching(scheduler: Any) -> bool:
    config = scheduler.config
    return (not hasattr(scheduler, "alphas_cumprod") or bool(config.get("use_flow_sigmas"))
            or config.get("prediction_type") == "flow_prediction")


class DenoisingLoop:
    """Where the pipeline's denoising loop is, read off the denoiser's calls: the n-th call since
    `restart` is step n of `pipe.scheduler.timesteps`, as our pipelines call the denoiser once per step."""

    def __init__(self, pipe: Any, steps: int) -> None:
        self.pipe, self.steps, self.step_index = pipe, steps, -1

    def restart(self) -> None:
        self.step_index = -1

    def advance(self) -> None:
        self.step_index += 1
        if self.step_index >= len(self.pipe.scheduler.timesteps):
            raise DiffcError(f"the denoiser was called more often than the scheduler has steps "
                             f"({len(self.pipe.scheduler.timesteps)}); the peers read the step off the "
                             f"calls, one per step")

    def timestep(self) -> float:
        """On the scheduler's 0..1000 scale, as diffusers' pipelines report `current_timestep`."""
        return float(self.pipe.scheduler.timesteps[self.step_index])

    def sigma(self) -> float:
        """The noise fraction s of x = (1 - s) x0 + s noise at this step, the sigma diffusers'
        flow-matching pipelines pass: the scheduler's own sigma under flow matching; a
        variance-preserving x = a x0 + b noise (a = sqrt(alpha_bar)) divided by a + b has that form."""
        scheduler = self.pipe.scheduler
        if is_flow_matching(scheduler):
            return float(scheduler.sigmas[self.step_index])
        alpha_bar = scheduler.alphas_cumprod[int(self.timestep())].double()
        signal, noise = alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt()
        return float(noise / (signal + noise))


def keyword_inputs(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict[str, Any]:
    """A call's inputs, all by name."""
    inputs: dict[str, Any] = {}
    for name, value in signature.bind(*args, **kwargs).arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            inputs.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            raise DiffcError(f"cannot pass {name!r} of the denoiser's forward by keyword")
        else:
            inputs[name] = value
    return inputs


def enter_cache_context_per_call(module: torch.nn.Module, loop: DenoisingLoop) -> None:
    """Wraps `module.forward` (after the hooks are attached) so each call advances `loop` and runs in
    the cache context diffusers' pipelines enter, inputs passed by keyword as those pipelines pass
    them (FasterCache splits only keyword inputs into the guidance halves). `cache_context` is
    diffusers' CacheMixin method; some denoisers (UNet2DConditionModel, DiT, PixArt, SD3) lack the
    mixin, and the method only needs the module."""
    from diffusers.models.cache_utils import CacheMixin

    forward = module.forward
    signature = inspect.signature(forward)

    @functools.wraps(forward)
    def forward_in_cache_context(*args: Any, **kwargs: Any) -> Any:
        loop.advance()
        inputs = keyword_inputs(signature, args, kwargs)
        # one context for the fused guidance batch: the hooks' state is per batch, not per half
        with CacheMixin.cache_context(module, "cond", step_index=loop.step_index, num_inference_steps=loop.steps,
                                      timestep=loop.timestep(), sigma=loop.sigma()):
            return forward(**inputs)

    module.forward = forward_in_cache_context


def hooked_modules(module: torch.nn.Module) -> int:
    """Modules in `module` (itself included) carrying a diffusers hook."""
    return sum(1 for sub in module.modules() if getattr(getattr(sub, "_diffusers_hook", None), "hooks", None))


def attach_hook(hook_name: str, requirement: str, module: torch.nn.Module, apply: Callable[[], None]) -> None:
    """Runs `apply` and checks it hooked some module, so an architecture the hook does not cover is an
    error naming `requirement` (the hook's own rule), not a raw IndexError or a silent no-op."""
    architecture = type(module).__name__
    try:
        apply()
    except (IndexError, ValueError) as error:  # what the hooks raise when they find no blocks
        raise PeerNotApplicable(f"{hook_name} {requirement}; this is a {architecture} "
                                f"({error or type(error).__name__})") from error
    if not hooked_modules(module):
        raise PeerNotApplicable(f"{hook_name} {requirement}; this is a {architecture}, where it hooks no module")


def diffusers_cache(hook_name: str, requirement: str,
                    apply: Callable[[torch.nn.Module, DenoisingLoop, str], None]) -> Callable:
    """A peer build for a diffusers cache hook; `apply(module, loop, setting)` attaches it."""

    def build(pipe: Any, attribute: str, steps: int, setting: str) -> tuple[torch.nn.Module, Callable[[], Any]]:
        from diffusers.hooks import HookRegistry

        module = copy.deepcopy(getattr(pipe, attribute))
        loop = DenoisingLoop(pipe, steps)
        attach_hook(hook_name, requirement, module, lambda: apply(module, loop, setting))
        registry = HookRegistry.check_if_exists_or_initialize(module)
        registry.invalidate_child_registries_cache()
        enter_cache_context_per_call(module, loop)

        @contextlib.contextmanager
        def per_image_set() -> Iterator[None]:
            registry.reset_stateful_hooks()
            loop.restart()
            yield

        return module, per_image_set

    return build


def sample_call(pipe: Any, steps: int) -> None:
    """One pipeline call on a small made-up batch (two class labels, or two prompts of the text
    encoder's own words), for peers whose docs calibrate on a sample run."""
    if "class_labels" in inspect.signature(pipe.__call__).parameters:
        inputs: dict[str, Any] = {"class_labels": [0, 1]}
    else:
        encoder_config = getattr(getattr(pipe, "text_encoder", None), "config", None)
        words = list(getattr(encoder_config, "vocabulary", None) or ())
        inputs = {"prompt": [" ".join(words[0::2]), " ".join(words[1::2])] if words else ["a photo", "a drawing"]}
    pipe(**inputs, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="np")


def calibrated_mag_ratios(pipe: Any, attribute: str, steps: int) -> list[float]:
    """MagCache's ratios for this model and scheduler as its docs obtain them: a run with
    `MagCacheConfig(calibrate=True)`, whose printed list is the `mag_ratios` to pass."""
    from diffusers.hooks import MagCacheConfig, apply_mag_cache

    original = getattr(pipe, attribute)
    module = copy.deepcopy(original)
    attach_hook("MagCache", MAG_CACHE_REQUIREMENT, module,
                lambda: apply_mag_cache(module, MagCacheConfig(calibrate=True, num_inference_steps=steps)))
    printed = io.StringIO()
    setattr(pipe, attribute, module)
    try:
        with contextlib.redirect_stdout(printed):
            sample_call(pipe, steps)
    finally:
        setattr(pipe, attribute, original)
    lists = [line for line in printed.getvalue().splitlines() if line.startswith("[") and line.endswith("]")]
    if not lists:
        raise DiffcError(f"MagCache's calibration run printed no ratios: {printed.getvalue()[:200]!r}")
    return [float(ratio) for ratio in ast.literal_eval(lists[-1])]


def image_latents(module: torch.nn.Module, args: tuple, kwargs: dict) -> list[torch.Tensor] | None:
    """SeaCache's `raw_vision_callback` for image denoisers, which its built-in adapters (Wan, Cosmos)
    do not cover: each sample's latent as a one-frame video (C, 1, H, W); FLUX's packed tokens
    (tokens, 4C) laid back on their square grid. None (SeaCache then computes every step) otherwise."""
    hidden = kwargs.get("hidden_states")
    if hidden is None or hidden.ndim not in (3, 4):
        return None
    if hidden.ndim == 4:
        return [sample.unsqueeze(1) for sample in hidden]
    side = math.isqrt(hidden.shape[1])
    if side * side != hidden.shape[1]:
        return None
    return [tokens.transpose(0, 1).reshape(-1, 1, side, side) for tokens in hidden]


def require_tail_encoder_states(hook_name: str, module: torch.nn.Module) -> None:
    """FirstBlockCache and SeaCache keep the encoder stream's residual from the last block's output;
    SD3's last JointTransformerBlock (context_pre_only) returns None for that stream, so FirstBlockCache
    fails (None - tensor) and SeaCache records no residual and never skips."""
    blocks = getattr(module, "transformer_blocks", None)
    if isinstance(blocks, torch.nn.ModuleList) and len(blocks) and getattr(blocks[-1], "context_pre_only", False):
        raise PeerNotApplicable(f"{hook_name} keeps the encoder stream's residual from the last transformer block's "
                         f"output; the last block of this {type(module).__name__} (context_pre_only) returns no "
                         f"encoder_hidden_states")


def _first_block_cache(module: torch.nn.Module, loop: DenoisingLoop, setting: str) -> None:
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    require_tail_encoder_states("FirstBlockCache", module)
    apply_first_block_cache(module, FirstBlockCacheConfig(threshold=float(setting)))


def _taylorseer(module: torch.nn.Module, loop: DenoisingLoop, setting: str) -> None:
    from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache

    # float32 factors as in diffusers' own example: our models run in float32
    apply_taylorseer_cache(module, TaylorSeerCacheConfig(
        cache_interval=int(setting), taylor_factors_dtype=torch.float32, cache_identifiers=list(ATTENTION_MODULES)))


def _build_mag_cache(pipe: Any, attribute: str, steps: int, setting: str) -> tuple[torch.nn.Module, Callable]:
    from diffusers.hooks import MagCacheConfig, apply_mag_cache

    ratios = calibrated_mag_ratios(pipe, attribute, steps)

    def apply(module: torch.nn.Module, loop: DenoisingLoop, threshold: str) -> None:
        apply_mag_cache(module, MagCacheConfig(threshold=float(threshold), num_inference_steps=steps,
                                               mag_ratios=ratios))

    return diffusers_cache("MagCache", MAG_CACHE_REQUIREMENT, apply)(pipe, attribute, steps, setting)


def _faster_cache(module: torch.nn.Module, loop: DenoisingLoop, setting: str) -> None:
    from diffusers import FluxTransformer2DModel, WanTransformer3DModel
    from diffusers.hooks import FasterCacheConfig, apply_faster_cache

    if isinstance(module, FluxTransformer2DModel):
        raise PeerNotApplicable("FasterCache approximates the unconditional output from frequency bands over the (H, W) of "
                         "a latent in its tensor_format (BCFHW, BFCHW or BCHW); FluxTransformer2DModel returns "
                         "packed tokens (batch, tokens, channels)")
    apply_faster_cache(module, FasterCacheConfig(
        unconditional_batch_skip_range=int(setting), current_timestep_callback=loop.timestep,
        tensor_format="BCFHW" if isinstance(module, WanTransformer3DModel) else "BCHW",
        _unconditional_conditional_input_kwargs_identifiers=list(GUIDANCE_BATCHED_INPUTS)))


def _pyramid_attention_broadcast(module: torch.nn.Module, loop: DenoisingLoop, setting: str) -> None:
    from diffusers.hooks import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast

    apply_pyramid_attention_broadcast(module, PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=int(setting), current_timestep_callback=loop.timestep))


def _sea_cache(module: torch.nn.Module, loop: DenoisingLoop, setting: str) -> None:
    from diffusers import WanTransformer3DModel
    from diffusers.hooks import SeaCacheConfig, apply_sea_cache

    require_tail_encoder_states("SeaCache", module)
    built_in_adapter = isinstance(module, WanTransformer3DModel)
    apply_sea_cache(module, SeaCacheConfig(threshold=float(setting),
                                           raw_vision_callback=None if built_in_adapter else image_latents))


# a threshold cache reuses a result only where its own measure of the step's change falls below the
# threshold; images bit-identical to the baseline's mean it never did
_BELOW_EVERY_CHANGE = ("at threshold {setting} the peer reused nothing: by its own measure every step changed the model's "
                       "features by more than the threshold (a larger threshold skips steps)")
PEERS: dict[str, Peer] = {p.name: p for p in [
    Peer("fbc", "diffusers FirstBlockCache(threshold={setting})",
         diffusers_cache("FirstBlockCache", f"caches the blocks after the first of {BLOCK_LISTS} (2 or more blocks)",
                         _first_block_cache),
         settings=("0.05", "0.1", "0.2", "0.4"), default="0.05", unchanged_because=_BELOW_EVERY_CHANGE),
    Peer("taylorseer", "diffusers TaylorSeerCache(cache_interval={setting}, first 3 steps computed, order 1)",
         diffusers_cache("TaylorSeer", "caches attention modules (named attn, attn1, attn2, ...)", _taylorseer),
         settings=("2", "3", "5"), default="5"),
    Peer("magcache", "diffusers MagCache(threshold={setting}, mag_ratios from its calibration run)",
         _build_mag_cache, settings=("0.06", "0.12", "0.24"), default="0.06", unchanged_because=_BELOW_EVERY_CHANGE),
    Peer("fastercache", "diffusers FasterCache(unconditional_batch_skip_range={setting}, spatial skip 2)",
         diffusers_cache("FasterCache", "caches attention and the unconditional half of a guidance batch of "
                         "image or video latents", _faster_cache),
         settings=("2", "5", "10"), default="5"),
    Peer("pab", "diffusers PyramidAttentionBroadcast(spatial skip {setting}, timesteps 100-800)",
         diffusers_cache("PyramidAttentionBroadcast", "hooks self-attention modules inside blocks",
                         _pyramid_attention_broadcast),
         settings=("2", "3", "4"), default="2"),
    Peer("seacache", "diffusers SeaCache(threshold={setting})",
         diffusers_cache("SeaCache", f"replaces the repeated transformer blocks of {BLOCK_LISTS}", _sea_cache),
         settings=("0.1", "0.25", "0.5"), default="0.25", unchanged_because=_BELOW_EVERY_CHANGE),
    Peer("deepcache", "DeepCache(cache_interval={setting}, cache_branch_id=0)", build_deepcache,
         settings=("2", "3", "5"), default="3"),
    Peer("cache-dit", "cache-dit DBCache F1B1(residual_diff_threshold={setting}, first 8 steps computed)",
         build_cache_dit(calibrated=False), settings=("0.08", "0.12", "0.2", "0.3"), default="0.08",
         unchanged_because=_BELOW_EVERY_CHANGE),
    Peer("cache-dit-taylorseer",
         "cache-dit DBCache F1B1(residual_diff_threshold={setting}, first 8 steps computed) + TaylorSeer order 1",
         build_cache_dit(calibrated=True), settings=("0.08", "0.12", "0.2", "0.3"), default="0.08",
         unchanged_because=_BELOW_EVERY_CHANGE),
    Peer("torchao-int8", "torchao int8 {setting}", build_torchao(compile_model=False),
         settings=("weight-only", "dynamic"), default="weight-only"),
    Peer("torchao-int8-compile", "torchao int8 {setting} + torch.compile", build_torchao(compile_model=True),
         settings=("weight-only", "dynamic"), default="weight-only"),
]}
