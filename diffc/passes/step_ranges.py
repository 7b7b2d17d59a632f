"""Step plans that give each range of denoising steps its own variant (step-routed prune and moe)."""
from __future__ import annotations

from typing import Any, Sequence

from ..ir.step_plan import BYPASS, FULL, Region, Schedule, StepPlan


def bypass_region(name: str, cut: str, base: str) -> Region:
    """A region whose skip passes `base` on as `cut` (a residual unit left out at some steps)."""
    return Region(name, (cut,), BYPASS, {cut: base})


def range_step_plan(regions: list[Region], ranges: Sequence[tuple[int, int]], skipped: Sequence[list[str]],
                    summary: dict[str, Any], default: int | None = None) -> StepPlan:
    """A step plan with one variant per range of steps, named by its range, skipping that range's
    regions. A call at a step outside the schedule runs the `default` range's variant, or, without
    one, a variant that skips nothing."""
    names = [f"steps_{start}_{end}" for start, end in ranges]
    variants = {FULL: []} if default is None else {}
    variants.update(zip(names, skipped))
    steps = tuple(name for name, (start, end) in zip(names, ranges) for _ in range(start, end))
    return StepPlan.build(regions, variants, Schedule(FULL if default is None else names[default], steps), summary)
