"""A tiny, valid configuration of each of diffusers' denoiser classes, with the keyword inputs of
one forward call: what the coverage run (benchmarks/denoiser_coverage.py) captures, caches and
exports, and what the tests draw one class per family group from.

The configs follow what diffusers' own model tests build (small widths, one or two blocks), so a
class that fails here fails on diffc's side, not on an invalid config.

    from diffc.models import catalog
    entry = catalog.get("FluxTransformer2DModel")
    model = entry.build()              # seeded, eval mode, fp32
    inputs = entry.inputs(batch=2)     # seeded keyword arguments of one call
    out = model(**inputs)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

# What a denoiser's `timestep` input means, so a loop can give it a schedule of the right range:
# "flow" is sigma in [0, 1] (flow matching, rectified flow), "ddpm" a step index in [0, 1000).
FLOW, DDPM = "flow", "ddpm"


@dataclass(frozen=True)
class TinyDenoiser:
    """One class at a tiny config.

    `build()` returns the model (seeded, eval, fp32). `inputs(batch)` returns the keyword arguments of
    one forward call at the example size (seeded; every batched tensor has `batch` rows, the latent
    named `latent`, the timestep named `timestep`: one value per row, or the shape the class needs,
    per frame or one shared value; a loop fills that shape with its own timestep).
    `output_channels` is how many leading channels (dim `channel_dim` of the output) of the model's
    first output form the update of the latent, when the model predicts more (a learned variance);
    `output_last_tokens` says the output holds the whole joint sequence (text tokens, then the
    latent's) and the latent's update is its last tokens."""

    class_name: str
    family: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[int], dict[str, Any]]
    latent: str
    timestep: str = "timestep"
    timestep_kind: str = DDPM
    channel_dim: int = 1
    output_channels: int | None = None
    output_last_tokens: bool = False
    note: str = ""


_ENTRIES: dict[str, TinyDenoiser] = {}
# Classes the catalog has no working config for, with the reason (diffusers refuses every small
# config, or the class needs inputs no tiny config can give).
UNBUILDABLE: dict[str, str] = {}


def register(entry: TinyDenoiser) -> TinyDenoiser:
    if entry.class_name in _ENTRIES:
        raise ValueError(f"{entry.class_name} is in the catalog twice")
    _ENTRIES[entry.class_name] = entry
    return entry


def seeded_randn(seed: int) -> Callable[..., torch.Tensor]:
    """A randn drawing from its own generator, so inputs do not depend on the global RNG."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    return randn


def timesteps(batch: int, value: float = 500.0) -> torch.Tensor:
    """One timestep per row (500: the middle of a 0..1000 schedule)."""
    return torch.full((batch,), value)


def seeded(build: Callable[[], torch.nn.Module]) -> Callable[[], torch.nn.Module]:
    """`build` under a fixed global seed (diffusers initializes weights from the global RNG), in eval mode."""
    def wrapped() -> torch.nn.Module:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return build().eval()

    return wrapped


def _load() -> None:
    from . import image_a_to_l, image_m_to_z, unets, video_a_to_k, video_l_to_z  # noqa: F401  (they register)


def names() -> list[str]:
    _load()
    return sorted(_ENTRIES)


def get(class_name: str) -> TinyDenoiser:
    _load()
    if class_name not in _ENTRIES:
        reason = UNBUILDABLE.get(class_name)
        if reason:
            raise KeyError(f"{class_name} has no tiny config in the catalog: {reason}")
        raise KeyError(f"{class_name} is not in the catalog; it has {', '.join(sorted(_ENTRIES))}")
    return _ENTRIES[class_name]


# Image and video denoisers whose names do not follow the *Transformer2DModel / *Transformer3DModel / UNet* pattern
OTHER_DENOISERS = ("HunyuanDiT2DModel", "LuminaNextDiT2DModel", "I2VGenXLUNet", "Kandinsky3UNet", "StableCascadeUNet",
                   "DreamLiteUNetModel")


def denoiser_classes() -> list[str]:
    """Every image or video denoiser class the installed diffusers exports."""
    import diffusers

    exported = set(dir(diffusers))
    return sorted(name for name in exported
                  if name.endswith(("Transformer2DModel", "Transformer3DModel")) or name.startswith("UNet")
                  or name in OTHER_DENOISERS)
