"""Choosing a pass's knob (a share of the model to remove or keep) from calibration data: bisection
over a grid of values against the pass's quality bar."""
from __future__ import annotations

from typing import Any, Callable, Sequence

from ..calibration import trajectory_error
from ..ir import DiffusionGraph
from .base import PassContext


def search_grid(grid: Sequence[float], build: Callable[[float], DiffusionGraph], ctx: PassContext, *,
                knob: str, offline_error: Callable[[DiffusionGraph], float], min_psnr: float,
                max_relative_error: float, quality_rises: bool, fallback: float,
                infeasible: tuple[type[Exception], ...] = ()) -> tuple[float, list[dict[str, Any]]]:
    """The grid value at the edge of the quality bar: the smallest one that passes when quality
    rises with the knob, the largest one when it falls; `fallback` when no value passes.

    A candidate passes when the re-sampled calibration images keep `min_psnr` (with the live
    pipeline and `ctx.denoiser_for`), otherwise when `offline_error(candidate)` (teacher-forced
    relative error) stays within `max_relative_error`. A value whose `build` raises one of
    `infeasible` fails without being measured. Quality must be monotone in the knob: bisection
    measures about log2(len(grid)) candidates, each listed in the returned search record as
    {knob: value, "psnr" or "relative_error": ..., "passes": bool}."""
    live = ctx.calibration.pipeline is not None and ctx.denoiser_for is not None
    searched: list[dict[str, Any]] = []

    def passes(value: float) -> bool:
        try:
            candidate = build(value)
        except infeasible:
            return False
        entry: dict[str, Any] = {knob: value}
        if live:
            entry["psnr"] = round(trajectory_error(ctx.calibration, ctx.denoiser_for(candidate))["psnr"], 3)
            ok = entry["psnr"] >= min_psnr
        else:
            entry["relative_error"] = round(offline_error(candidate), 6)
            ok = entry["relative_error"] <= max_relative_error
        searched.append({**entry, "passes": ok})
        return ok

    # invariant: every index <= low is on the bar's near side (passing when quality falls with the
    # knob, failing when it rises), every index >= high on its far side
    low, high = -1, len(grid)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if passes(grid[middle]) != quality_rises else (low, middle)
    edge = high if quality_rises else low
    return (grid[edge] if 0 <= edge < len(grid) else fallback), searched
