"""Example inputs derived from a denoiser's diffusers config, for capture.

Batch is 2 (classifier-free guidance doubles it; 0 and 1 would be specialized by torch.export),
and the dimensions that may change at run time (batch, resolution, text length) are marked
dynamic where the model allows."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from ..errors import CaptureError
from .fxutil import module_device, to_device

EXAMPLE_BATCH = 2
EXAMPLE_TEXT_LEN = 8

SUPPORTED_FAMILIES = (
    "UNet2DConditionModel", "UNet2DModel", "DiTTransformer2DModel", "PixArtTransformer2DModel",
    "SD3Transformer2DModel", "FluxTransformer2DModel",
)


def has_example(model: torch.nn.Module) -> bool:
    """Whether example_inputs can shape an example for `model`'s class from its config."""
    return type(model).__name__ in _BUILDERS


def example_inputs(model: torch.nn.Module, batch: int = EXAMPLE_BATCH) -> dict[str, Any]:
    """Keyword inputs for one forward call of `model`, shaped from its config, on the model's device
    (drawn on the CPU first, so that a seed gives the same example on every device)."""
    family = type(model).__name__
    builder = _BUILDERS.get(family)
    if builder is None:
        raise CaptureError(
            f"diffc cannot derive example inputs for {family}: it knows {', '.join(SUPPORTED_FAMILIES)}. "
            "Pass example_inputs={...} (the keyword arguments of one forward call) to capture/optimize.")
    cfg = model.config
    generator = torch.Generator(device="cpu").manual_seed(0)
    dtype = _model_dtype(model)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(dtype)

    with torch.device("cpu"):
        inputs = builder(cfg, batch, randn)
    return to_device(inputs, module_device(model))


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _size(value: Any, default: int) -> tuple[int, int]:
    if value is None:
        return default, default
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[1])
    return int(value), int(value)


def _timesteps(batch: int) -> torch.Tensor:
    return torch.full((batch,), 500.0)


def _unet2d_condition(cfg: Any, batch: int, randn: Any) -> dict[str, Any]:
    h, w = _size(cfg.sample_size, 64)
    cross = cfg.cross_attention_dim
    cross = cross[0] if isinstance(cross, (list, tuple)) else cross
    if cfg.encoder_hid_dim is not None:
        cross = cfg.encoder_hid_dim
    inputs: dict[str, Any] = {
        "sample": randn(batch, cfg.in_channels, h, w),
        "timestep": _timesteps(batch),
        "encoder_hidden_states": randn(batch, EXAMPLE_TEXT_LEN, cross),
    }
    inputs.update(_class_labels(cfg, batch, randn))
    if cfg.addition_embed_type == "text_time":
        time_ids = 6
        text_dim = cfg.projection_class_embeddings_input_dim - time_ids * cfg.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {"text_embeds": randn(batch, text_dim),
                                       "time_ids": randn(batch, time_ids).abs() * 64}
    elif cfg.addition_embed_type is not None:
        raise CaptureError(f"UNet2DConditionModel with addition_embed_type={cfg.addition_embed_type!r} needs "
                           "explicit example_inputs (diffc derives them only for 'text_time', the SDXL kind).")
    return inputs


def _class_labels(cfg: Any, batch: int, randn: Any) -> dict[str, torch.Tensor]:
    if cfg.class_embed_type is None and cfg.num_class_embeds is not None:
        return {"class_labels": torch.arange(batch) % cfg.num_class_embeds}
    if cfg.class_embed_type == "timestep":
        return {"class_labels": _timesteps(batch)}
    if cfg.class_embed_type is not None:
        raise CaptureError(f"class_embed_type={cfg.class_embed_type!r} needs explicit example_inputs "
                           "(pass class_labels of the right shape in example_inputs).")
    return {}


def _unet2d(cfg: Any, batch: int, randn: Any) -> dict[str, Any]:
    h, w = _size(cfg.sample_size, 64)
    inputs = {"sample": randn(batch, cfg.in_channels, h, w), "timestep": _timesteps(batch)}
    inputs.update(_class_labels(cfg, batch, randn))
    return inputs


def _dit(cfg: Any, batch: int, randn: Any) -> dict[str, Any]:
    h, w = _size(cfg.sample_size, 32)
    return {"hidden_states": randn(batch, cfg.in_channels, h, w), "timestep": _timesteps(batch),
            "class_labels": torch.arange(batch) % max(int(cfg.num_embeds_ada_norm or 1), 1)}


def _pixart(cfg: Any, batch: int, randn: Any) -> dict[str, Any]:
    h, w = _size(cfg.sample_size, 32)
    additional = cfg.use_additional_conditions
    if additional is None:
        additional = cfg.sample_size == 128
    added = {"resolution": randn(batch, 2).abs() * 512, "aspect_ratio": randn(batch, 1).abs()} if additional \
        else {"resolution": None, "aspect_ratio": None}
    # PixArt pipelines always pass the prompt's attention mask; a caller that does not gets an
    # all-ones mask at run time (see runtime.model), which masks nothing
    return {"hidden_states": randn(batch, cfg.in_channels, h, w), "timestep": _timesteps(batch),
            "encoder_hidden_states": randn(batch, EXAMPLE_TEXT_LEN, cfg.caption_channels),
            "encoder_attention_mask": torch.ones(batch, EXAMPLE_TEXT_LEN), "added_cond_kwargs": added}


def _sd3(cfg: Any, batch: int, randn: Any) -> dict[str, Any]:
    h, w = _size(cfg.sample_size, 32)
    return {"hidden_states": randn(batch, cfg.in_channels, h, w),
            "encoder_hidden_states": randn(batch, EXAMPLE_TEXT_LEN, cfg.joint_attention_dim),
            "pooled_projections": randn(batch, cfg.pooled_projection_dim), "timestep": _timesteps(batch)}


def _flux(cfg: Any, batch: int, randn: Any) -> dict[str, Any]:
    side = 4
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    img_ids = torch.stack([torch.zeros(side * side), rows.flatten().float(), cols.flatten().float()], dim=1)
    inputs = {"hidden_states": randn(batch, side * side, cfg.in_channels),
              "encoder_hidden_states": randn(batch, EXAMPLE_TEXT_LEN, cfg.joint_attention_dim),
              "pooled_projections": randn(batch, cfg.pooled_projection_dim),
              "timestep": torch.full((batch,), 0.5), "img_ids": img_ids,
              "txt_ids": torch.zeros(EXAMPLE_TEXT_LEN, 3)}
    if cfg.guidance_embeds:
        inputs["guidance"] = torch.full((batch,), 3.5)
    return inputs


_BUILDERS = {
    "UNet2DConditionModel": _unet2d_condition,
    "UNet2DModel": _unet2d,
    "DiTTransformer2DModel": _dit,
    "PixArtTransformer2DModel": _pixart,
    "SD3Transformer2DModel": _sd3,
    "FluxTransformer2DModel": _flux,
}

# Per input name: which dimensions may change at run time. Batch is dim 0 of every batched input.
LATENT_NAMES = ("sample", "hidden_states")
TIMESTEP_NAMES = ("timestep", "timesteps")
UNBATCHED_NAMES = ("img_ids", "txt_ids")
TEXT_NAMES = ("encoder_hidden_states", "encoder_attention_mask", "txt_ids")
TOKEN_NAMES = ("img_ids",)
# The dims that may change in a latent besides batch, in order, once its channel dim is set aside:
# (batch, tokens, channels), (batch, [channels,] height, width) and (batch, [channels,] frames,
# height, width) with the channels where the model takes them. Channels are never marked:
# torch.export can leave them symbolic (a conv's weight does not pin them) and no model runs at
# other channel counts.
LATENT_DIMS = {3: ("tokens",), 4: ("height", "width"), 5: ("frames", "height", "width")}
SPATIAL_KINDS = ("frames", "height", "width")
# where configs give the channel count a denoiser takes (in_visual_dim: Kandinsky 5; in_dim: Wan-Animate 2)
CHANNEL_CONFIG_KEYS = ("in_channels", "in_dim", "in_visual_dim", "in_chans", "num_channels")


def latent_channel_dim(config: Any, latent: torch.Tensor) -> int:
    """Which dim of `latent` holds its channels: the last for (batch, tokens, channels); for a 4- or
    5-dim latent dim 1 ((B, C, H, W), (B, C, F, H, W)) unless the config's input channel count is the
    size of exactly one other dim: 2 for (B, F, C, H, W) (CogVideoX, SVD), the last for channels-last
    (B, F, H, W, C) (Kandinsky 5). An ambiguous example (frames equal to channels) keeps dim 1."""
    if latent.dim() < 4:
        return latent.dim() - 1
    config = config if isinstance(config, Mapping) else {}
    counts = {value for key in CHANNEL_CONFIG_KEYS if isinstance(value := config.get(key), int)}
    matches = [d for d in range(1, latent.dim()) if latent.shape[d] in counts]
    return matches[0] if len(matches) == 1 else 1


def dim_kinds(leaf: str, rank: int, latent: bool, channel_dim: int = 1) -> tuple[str | None, ...]:
    """What each dim of a `rank`-dim input named `leaf` (the latent when `latent`, its channels at
    `channel_dim`) is, among the dims that may change at run time: batch, tokens, height, width,
    frames or text_len; None for the others (channels, features), which the model's weights fix."""
    kinds: list[str | None] = [None] * rank
    if leaf in UNBATCHED_NAMES:
        if rank and leaf in TOKEN_NAMES:
            kinds[0] = "tokens"
        elif rank and leaf in TEXT_NAMES:
            kinds[0] = "text_len"
        return tuple(kinds)
    if rank:
        kinds[0] = "batch"
    if latent and rank in LATENT_DIMS:
        free = [d for d in range(1, rank) if rank == 3 or d != channel_dim % rank]
        for dim, kind in zip(free, LATENT_DIMS[rank]):
            kinds[dim] = kind
    elif rank >= 2 and leaf in TEXT_NAMES:
        kinds[1] = "text_len"
    return tuple(kinds)
