"""The quant pass's final-image floor: how many of the most sensitive quantized layers go back to
full precision so that the sampled images stay within `min_psnr` of the original's.

The placement is predicted from per-call sensitivities; what users see is the final image of
their sampler, where per-step errors add up and guidance amplifies the difference between the
conditional and unconditional rows. So the placement is re-sampled with the candidate in the loop
(the live pipeline or the sampling loop identified from recorded calls) and, when it misses the
floor, the layers with the largest predicted error are kept at full precision, the fewest that
meet it (bisection over KEEP_SHARES, verified on held-out trajectories: _search.search_grid)."""
from __future__ import annotations

import math
import warnings
from typing import Any

from ...calibration import resampling
from ...ir import DiffusionGraph
from .._search import search_grid
from ..base import PassContext

# shares of the quantized layers (most sensitive first) kept at full precision, tried in turn;
# keeping them all is the fallback, where the pass changes nothing
KEEP_SHARES = (0.0, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75)
KEPT_REASON = "kept at full precision: quantizing it broke the final-image floor (min_psnr)"


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


def keep_for_floor(dg: DiffusionGraph, ctx: PassContext, ranked: list[str],
                   min_psnr: float) -> tuple[list[str] | None, dict[str, Any]]:
    """The most sensitive nodes of `ranked` (most sensitive first) to keep at full precision so
    that the re-sampled final images keep `min_psnr` on the held-out trajectories; None when even
    keeping 75% of them misses it. Callers check _search.unjudgeable first."""
    def kept(share: float) -> list[str]:
        return ranked[:math.ceil(share * len(ranked))]

    with warnings.catch_warnings():
        # search_grid's own "stays at the safest value" warning is the caller's to say, with the why
        warnings.filterwarnings("ignore", message="kept_share: ")
        share, searched = search_grid(
            KEEP_SHARES, lambda value: without_precision(dg, kept(value)), ctx, knob="kept_share",
            offline_error=lambda candidate: math.inf, min_psnr=min_psnr, max_relative_error=None,
            quality_rises=True, fallback=1.0, optimistic=True)
    check = {"min_psnr": min_psnr, "judged_on": resampling(ctx.calibration), "search": searched}
    if share >= 1.0:
        return None, check
    return kept(share), {**check, "kept_share": share}
