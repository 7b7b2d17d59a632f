"""int8 weight-only storage for the layers the placement leaves at full precision for a reason other
than their error: the timestep-embedding path (TFMQ-DM: their input is the timestep embedding, and an
activation error there shifts every step's features) and layers no low-bit kernel makes faster on
the target's backend (speed.py).

Their activations stay as they were, but nothing is gained by keeping their weights in full
precision too. Stored as int8 per output channel and computed from weights dequantized once (torch:
the simulation's constants; ONNX Runtime: a float initializer), they cost no time and a per-channel
weight error of about 0.2%; in DiT-family models the adaLN modulation linears on the timestep path
hold a quarter or more of the weights (FLUX, SD3). The final images are still checked."""
from __future__ import annotations

from typing import Any

from ...calibration import split_items, trajectory_error
from ...ir import DiffusionGraph
from .._search import unjudgeable
from ..base import PassContext
from .annotate import annotate
from .formats import runs_int8_weight_only
from .layers import REASONS, TIMESTEP_PATH, Layer

WEIGHT_ONLY = "int8_weight"


def weight_only_int8(dg: DiffusionGraph, ctx: PassContext, layers: list[Layer], kept_for_speed: set[str],
                     floor: float | None, enabled: bool) -> tuple[dict[str, str], dict[str, Any]]:
    """Annotates the timestep-path layers and those in `kept_for_speed` int8 weight-only in `dg`
    where the target runs that and the held-out final images keep `floor` with them (unchecked
    where they cannot be re-sampled or there is no floor, as the placement is); returns those
    layers' format and the check's record."""
    chosen = [layer for layer in layers
              if layer.protected is not None and (layer.protected == REASONS[TIMESTEP_PATH] or layer.node in kept_for_speed)]
    if not enabled or not chosen:
        return {}, {"layers": [], "why": "weight_only_int8=False" if chosen else
                    "no layer on the timestep path or kept at full precision for speed"}
    if not runs_int8_weight_only(ctx.target):
        return {}, {"layers": [], "why": f"target {ctx.target} does not run int8 weight-only layers"}
    candidate = dg.clone()
    annotate(candidate, {layer.node: WEIGHT_ONLY for layer in chosen}, {},
             {layer.node: f"activations at full precision ({layer.protected}); weights int8 per channel "
                          "(weight_only_int8)" for layer in chosen})
    check: dict[str, Any] = {"min_psnr": floor}
    if floor is not None and not unjudgeable(ctx):
        _, held_out = split_items(ctx.calibration)
        psnr = trajectory_error(ctx.calibration, ctx.denoiser_for(candidate), held_out or None, ctx.reference)["psnr"]
        check["held_out_psnr"] = round(psnr, 3)
        if psnr < floor:
            return {}, {**check, "layers": [], "why": "the final images miss min_psnr with them"}
    dg.annotations = candidate.annotations
    return {layer.node: WEIGHT_ONLY for layer in chosen}, {**check, "layers": [layer.node for layer in chosen]}
