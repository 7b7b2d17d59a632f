"""Choosing a pass's knob (a share of the model to remove or keep) from calibration data: bisection
over a grid of values against the pass's quality bar, on final outputs of the calibration
trajectories, verified on trajectories the search did not see."""
from __future__ import annotations

import warnings
from typing import Any, Callable, Sequence

from ..calibration import (draw_error, guidance_loss, merged_error, population_psnr, resampling, sampling_loop,
                           split_items, trajectory_error)
from ..ir import DiffusionGraph
from .base import PassContext

# a candidate that keeps less of the guidance signal (conditional minus unconditional output) than
# this is refused whatever its final PSNR: the conditioning is what steers the samples
MAX_GUIDANCE_LOSS = 0.1


def unjudgeable(ctx: PassContext) -> str | None:
    """Why candidates cannot be re-sampled to final outputs with them in the loop, or None."""
    if ctx.denoiser_for is None:
        return "no denoiser to compile candidates with"
    if ctx.calibration is None:
        return "no calibration set"
    if resampling(ctx.calibration) is None:
        return f"no live pipeline, and {sampling_loop(ctx.calibration).reason}"
    return None


def fitting_items(ctx: PassContext) -> set[str] | None:
    """The trajectories a pass may fit its candidates on (scores, compensation, refits) when
    search_grid will verify its choice on held-out ones: the selection split, so that the held-out
    figure is out of sample. None (every trajectory) when there is no way to re-sample."""
    if unjudgeable(ctx):
        return None
    selection, held_out = split_items(ctx.calibration)
    return selection if held_out else None


def search_grid(grid: Sequence[float], build: Callable[[float], DiffusionGraph], ctx: PassContext, *,
                knob: str, offline_error: Callable[[DiffusionGraph], float], min_psnr: float,
                max_relative_error: float | None, quality_rises: bool, fallback: float,
                infeasible: tuple[type[Exception], ...] = (),
                optimistic: bool = False, tail_aware: bool = False) -> tuple[float, list[dict[str, Any]]]:
    """The grid value at the edge of the quality bar: the smallest one that passes when quality
    rises with the knob, the largest one when it falls; `fallback` (the value that changes least)
    when no value passes.

    Candidates are judged on final outputs, re-sampled with the candidate in the loop (the live
    pipeline, or the sampling loop identified from the recorded calls) on the calibration
    trajectories split_items selects on: a candidate passes at `min_psnr`. The chosen value is then
    re-sampled on the held-out trajectories; when it misses `min_psnr` there, the next safer grid
    value is tried, and when none passes, `fallback` is returned with a warning. Where the loop
    pairs guidance rows, a candidate that loses more than MAX_GUIDANCE_LOSS of the guidance signal
    (calibration.guidance_loss) fails too. Without a way to
    re-sample, the teacher-forced `offline_error` decides only when the user set
    `max_relative_error`; otherwise the result is `fallback`, with a warning saying why. A value
    whose `build` raises one of `infeasible` fails without being measured. Quality must be monotone
    in the knob: bisection measures about log2(len(grid)) candidates; with `optimistic`, the value
    that changes most is measured first, and when it passes that is the whole search. Each
    measurement is listed in the returned record as
    {knob: value, "psnr" | "held_out_psnr" | "relative_error": ..., "passes": bool}. With `tail_aware`,
    a value passes only where the PSNR of the whole population of samples, estimated from the spread
    of the trajectories' own PSNRs (calibration.population_psnr: selection trajectories in the
    search, selection and held-out ones in the verification), keeps `min_psnr` too
    ("population_psnr" in its entry): a few trajectories rarely hold the sample that sets the figure
    of a batch, their spread says how heavy that tail is; and where a live pipeline samples, the
    verification adds fresh held-out draws (calibration.draw_error: new seeds for the calibration
    conditions, counted in the entry's "fresh_draws") to the held-out trajectories."""
    why = unjudgeable(ctx)
    how = None if why else resampling(ctx.calibration)
    if how is None and max_relative_error is None:
        warnings.warn(f"{knob}: cannot judge candidates on final outputs ({why}), so it stays at {fallback} (the "
                      "safest value). Calibrate with the pipeline or record every step of your loop, or set "
                      "max_relative_error to decide on the teacher-forced output error", stacklevel=3)
        return fallback, [{knob: fallback, "judged_on": None, "passes": False}]
    selection, held_out = split_items(ctx.calibration) if how else (None, set())
    loop = sampling_loop(ctx.calibration) if how else None
    searched: list[dict[str, Any]] = []
    selection_psnrs: dict[float, list[float]] = {}

    def passes(value: float) -> bool:
        try:
            candidate = build(value)
        except infeasible:
            return False
        entry: dict[str, Any] = {knob: value}
        if how:
            denoiser = ctx.denoiser_for(candidate)
            error = trajectory_error(ctx.calibration, denoiser, selection, ctx.reference)
            entry["psnr"], selection_psnrs[value] = round(error["psnr"], 3), error.get("trajectory_psnrs", [])
            ok = entry["psnr"] >= min_psnr and _keeps_population(entry, selection_psnrs[value], min_psnr, tail_aware)
            if loop is not None and loop.usable:
                lost = guidance_loss(ctx.calibration, loop, denoiser, selection)
                if lost is not None:
                    entry["guidance_lost"] = round(lost, 4)
                    ok = ok and lost <= MAX_GUIDANCE_LOSS
        else:
            assert max_relative_error is not None
            entry["relative_error"] = round(offline_error(candidate), 6)
            ok = entry["relative_error"] <= max_relative_error
        searched.append({**entry, "passes": ok})
        return ok

    # invariant: every index <= low is on the bar's near side (passing when quality falls with the
    # knob, failing when it rises), every index >= high on its far side
    low, high = -1, len(grid)
    if optimistic:
        boldest = 0 if quality_rises else len(grid) - 1
        if passes(grid[boldest]):
            low, high = (-1, 0) if quality_rises else (boldest, len(grid))
        else:
            low, high = (0, len(grid)) if quality_rises else (-1, boldest)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if passes(grid[middle]) != quality_rises else (low, middle)
    edge = high if quality_rises else low
    if not 0 <= edge < len(grid):
        if how:
            # every value may have been infeasible, so measured PSNRs can be missing
            best = max((entry["psnr"] for entry in searched if "psnr" in entry), default=None)
            bar = f"keeps {min_psnr} dB on the calibration trajectories" + \
                (f" (best: {best:.1f} dB)" if best is not None else "")
        else:
            bar = f"meets max_relative_error={max_relative_error}"
        warnings.warn(f"{knob}: no value {bar}, so it stays at {fallback} (the safest value); accept more loss "
                      "(a lower min_psnr or a higher max_relative_error) to change the model", stacklevel=3)
        return fallback, searched
    if not held_out:
        return grid[edge], searched
    safer = 1 if quality_rises else -1
    while 0 <= edge < len(grid):
        try:
            candidate = build(grid[edge])
        except infeasible:
            edge += safer
            continue
        if tail_aware and grid[edge] not in selection_psnrs and not passes(grid[edge]):
            edge += safer
            continue
        denoiser = ctx.denoiser_for(candidate)
        error = trajectory_error(ctx.calibration, denoiser, held_out, ctx.reference)
        if tail_aware:
            error = _with_fresh_draws(error, draw_error(ctx.calibration, denoiser, ctx.reference))
        entry = {knob: grid[edge], "held_out_psnr": round(error["psnr"], 3)}
        if error.get("fresh_draws"):
            entry["fresh_draws"] = error["fresh_draws"]
        ok = entry["held_out_psnr"] >= min_psnr and _keeps_population(
            entry, selection_psnrs.get(grid[edge], []) + error.get("trajectory_psnrs", []), min_psnr, tail_aware)
        searched.append({**entry, "passes": ok})
        if ok:
            return grid[edge], searched
        edge += safer
    warnings.warn(f"{knob}: no value keeps {min_psnr} dB on the held-out calibration trajectories, so it stays at "
                  f"{fallback} (the safest value)", stacklevel=3)
    return fallback, searched


def _with_fresh_draws(held_out: dict[str, Any], drawn: dict[str, Any] | None) -> dict[str, Any]:
    """The held-out error over the recorded held-out trajectories and the fresh draws together,
    with "fresh_draws" counting the draws. Draws are sampled by the live pipeline only, whose
    images PSNR reads with peak 1."""
    if not drawn:
        return held_out
    return {**merged_error(held_out, drawn, 1.0), "fresh_draws": drawn["trajectories"]}


def _keeps_population(entry: dict[str, Any], psnrs: list[float], min_psnr: float, tail_aware: bool) -> bool:
    """With `tail_aware`, whether the population PSNR estimated from `psnrs` (written into `entry`)
    keeps `min_psnr`; True where it is off or there is no spread to estimate from."""
    estimate = population_psnr(psnrs) if tail_aware else None
    if estimate is None:
        return True
    entry["population_psnr"] = round(estimate, 3)
    return estimate >= min_psnr
