"""The quant pass's final-image floor: how many of the most sensitive quantized layers move to the
next precision so that the sampled images stay within `min_psnr` of the original's: static int8
layers first to int8 with dynamic activation scales (where the backend runs them), then layers
back to full precision.

The placement is predicted from per-call sensitivities; what users see is the final image of
their sampler, where per-step errors add up and guidance amplifies the difference between the
conditional and unconditional rows. So the placement is re-sampled with the candidate in the loop
(the live pipeline or the sampling loop identified from recorded calls) and, when it misses the
floor, the layers with the largest predicted error move up, the fewest that meet it (bisection
over the shares, verified on held-out trajectories: _search.search_grid)."""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable

from ...calibration import resampling
from ...ir import DiffusionGraph
from ...ir.precision import ActivationQuant, spec_with
from .._search import search_grid
from ..base import PassContext

# shares of the quantized layers (most sensitive first) kept at full precision, tried in turn;
# keeping them all is the fallback, where the pass changes nothing
KEEP_SHARES = (0.0, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75)
KEPT_REASON = "kept at full precision: quantizing it broke the final-image floor (min_psnr)"
# shares of the static int8 layers (most sensitive first) given dynamic activation scales; all of
# them is a choice too: it keeps the size of int8
DYNAMIC_SHARES = (0.0, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0)
DYNAMIC_REASON = "int8 with dynamic activation scales: static scales broke the final-image floor (min_psnr)"


def drop_precision(annotations: dict[str, dict[str, Any]], nodes: list[str]) -> dict[str, dict[str, Any]]:
    """`annotations` without the precision specs of `nodes` (they run at full precision)."""
    dropped = set(nodes)
    kept = {node: {key: value for key, value in entry.items() if not (key == "precision" and node in dropped)}
            for node, entry in annotations.items()}
    return {node: entry for node, entry in kept.items() if entry}


def without_precision(dg: DiffusionGraph, nodes: list[str]) -> DiffusionGraph:
    candidate = dg.clone()
    candidate.annotations = drop_precision(candidate.annotations, nodes)
    return candidate


def with_dynamic_scales(dg: DiffusionGraph, nodes: list[str],
                        activations: dict[str, ActivationQuant]) -> DiffusionGraph:
    """A copy of `dg` whose `nodes` run int8 with the run-time activation quantization of
    `activations` instead of their static scales."""
    candidate = dg.clone()
    for node in nodes:
        spec = spec_with("int8_dynamic", activations[node], DYNAMIC_REASON)
        candidate.annotations.setdefault(node, {})["precision"] = spec.to_json()
    return candidate


def keep_for_floor(dg: DiffusionGraph, ctx: PassContext, ranked: list[str], min_psnr: float,
                   change: Callable[[DiffusionGraph, list[str]], DiffusionGraph] = without_precision,
                   shares: tuple[float, ...] = KEEP_SHARES,
                   knob: str = "kept_share") -> tuple[list[str] | None, dict[str, Any]]:
    """The most sensitive nodes of `ranked` (most sensitive first) that `change` (by default: to
    full precision) must move so that the re-sampled final images keep `min_psnr` on the held-out
    trajectories, the fewest of `shares`; None when even the largest share misses it. Callers
    check _search.unjudgeable first."""
    def moved(share: float) -> list[str]:
        return ranked[:math.ceil(share * len(ranked))]

    with warnings.catch_warnings():
        # search_grid's own "stays at the safest value" warning is the caller's to say, with the why
        warnings.filterwarnings("ignore", message=f"{knob}: ")
        share, searched = search_grid(
            shares, lambda value: change(dg, moved(value)), ctx, knob=knob,
            offline_error=lambda candidate: math.inf, min_psnr=min_psnr, max_relative_error=None,
            quality_rises=True, fallback=math.inf, optimistic=True)
    check = {"min_psnr": min_psnr, "judged_on": resampling(ctx.calibration), "search": searched}
    if not math.isfinite(share):
        return None, check
    return moved(share), {**check, knob: share}
