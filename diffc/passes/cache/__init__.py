"""Block caching across timesteps: cut the graph at block boundaries into a cached region and the
rest, build a "full" variant (computes and stores the region's outputs) and a "cached" variant
(reuses them and skips the region), and a schedule saying which variant runs at each step.

This module holds the pass's config and the pass, which writes the step plan; the cuts are in
cuts.py, the schedules (uniform, nonuniform, dp, adaptive) in schedules.py, and Block-wise
Adaptive Caching (schedule='bac': a schedule per block) in bac.py."""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...calibration import split_items, trajectory_error
from ...errors import PassError
from ...ir import DiffusionGraph
from ...ir.blocks import node_flops
from ...ir.partition import build_plan
from ...ir.step_plan import ADAPTIVE, CACHED, FULL, Region, Schedule, StepPlan
from .._search import unjudgeable
from ..base import Pass, PassConfig, PassContext, PassResult, anchor_step_plan, register_pass
from .bac import block_variants
from .cuts import CUTS, block_regions, cached_variant_for, cut_regions, segment_flops
from .schedules import (SCHEDULES, adaptive_schedule, dp_schedule, measured_error, nonuniform_full_steps,
                        warmup_steps)


# how much the budget of full steps grows, as a share of the steps, each time the floor is missed
BACKOFF_SHARE = 0.1


@dataclass(frozen=True)
class CacheConfig(PassConfig):
    cut: str = "auto"
    depth: int = 1
    # cut='deep': of the deepest kept up block, only its last `recomputed_layers` layers (a resnet and
    # its attention) run on cached steps; the layers before them are cached with the branch below
    # (depth=1, recomputed_layers=1 is DeepCache's branch 0). None: the whole block runs
    recomputed_layers: int | None = None
    blocks: tuple[int, int] | None = None
    mode: str = "auto"
    schedule: str = "dp"
    interval: int = 3
    full_steps: int | None = None
    full_fraction: float = 0.4
    max_gap: int = 4
    # trajectory re-runs spent moving single full steps of the best DP schedule (0: none)
    refine: int = 12
    # reused steps extrapolate the cached tensors from the last two computed ones (TaylorSeer; with
    # schedule="adaptive", CG-Taylor's confidence gate on the first blocks decides when to recompute).
    # None: the dp schedule scores its candidates both ways on the live pipeline and keeps the better
    forecast: bool | None = None
    # schedule="bac": distinct sets of recomputed blocks (variants) kept, the full one included
    max_variants: int = 4
    # schedule="dp" with a pipeline or an identified loop: the final-image PSNR the chosen schedule must
    # keep on the held-out trajectories; below it the budget of full steps grows until it does, and
    # when even one cached step misses it the pass changes nothing and warns (None: no floor)
    min_psnr: float | None = 30.0
    # schedule="dp": this share of the first steps always runs in full (MagCache's retention ratio,
    # cache-dit's warm-up steps): while a sample's layout is undecided a small change can flip it
    # to other content, which no per-step error on the calibration prompts foresees
    warmup: float = 0.0

    def __post_init__(self) -> None:
        if self.cut not in CUTS:
            raise ValueError(f"cut must be one of {CUTS}, got {self.cut!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.mode not in ("auto", "raw", "delta"):
            raise ValueError(f"mode must be auto, raw or delta, got {self.mode!r}")
        if self.interval < 1 or self.max_gap < 1 or self.depth < 0 or self.refine < 0:
            raise ValueError("interval, max_gap must be >= 1 and depth, refine >= 0")
        if self.max_variants < 2:
            raise ValueError(f"max_variants must be >= 2 (the full variant and one more), got {self.max_variants}")
        if not 0 < self.full_fraction <= 1:
            raise ValueError(f"full_fraction must be in (0, 1], got {self.full_fraction}")
        if self.recomputed_layers is not None and (self.recomputed_layers < 1 or self.schedule == "bac"):
            raise ValueError(f"recomputed_layers must be >= 1 with a one-cut schedule (not 'bac', which picks whole "
                             f"blocks), got {self.recomputed_layers} with schedule={self.schedule!r}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup must be a share of the steps in [0, 1), got {self.warmup}")
        if self.warmup and self.schedule != "dp":
            raise ValueError(f"warmup bounds the dp schedule's choice; schedule={self.schedule!r} places its full "
                             "steps itself. Fix: schedule='dp', or leave warmup at 0")
        if self.min_psnr is not None and not self.min_psnr > 0:
            raise ValueError(f"min_psnr must be a PSNR in dB above 0 (or None for no floor), got {self.min_psnr}")


@register_pass
class CachePass(Pass):
    name = "cache"
    Config = CacheConfig

    def requirements(self) -> tuple[str, ...]:
        return ("calibrated",) if self.config.schedule in ("dp", "adaptive", "bac") else ()

    def writes_step_plan(self) -> bool:
        return True

    def step_plan_conflict(self, writer: str) -> str | None:
        return "run cache once" if writer == "cache" else _nesting_conflict(writer)

    def run(self, dg: DiffusionGraph, ctx: PassContext) -> PassResult:
        cfg = self.config
        if dg.step_plan:
            raise PassError(_step_plan_conflict(dg.step_plan))
        if cfg.schedule == "bac":
            return self._block_schedule(dg, ctx)
        unscheduled = Schedule(FULL)
        regions, variants = cut_regions(dg, cfg.cut, cfg.depth, cfg.blocks, cfg.mode, cfg.recomputed_layers)
        cached_variant = cached_variant_for(variants)
        staged = len(variants) > 2
        if cfg.forecast and staged:
            raise PassError(f"forecast extrapolates one cached region; cut {cfg.cut!r} caches several "
                            "(use cut='first_block', 'blocks', 'deep' or 'encoder')")
        candidates: list[dict[str, Any]] = []
        backoff: list[dict[str, Any]] = []
        forecast = bool(cfg.forecast)
        num_steps = ctx.calibration.num_steps if ctx.calibration is not None else None
        if cfg.schedule == "adaptive":
            if staged:
                raise PassError("the adaptive schedule gates one cached region; use cut='first_block', 'blocks' or 'deep'")
            dg.step_plan = _step_plan(regions, variants, unscheduled)
            schedule = adaptive_schedule(build_plan(dg), ctx.calibration, cfg.full_fraction, cfg.max_gap)
            steps = [ADAPTIVE]
        elif cfg.schedule == "uniform" and not staged:
            steps = [FULL] + [CACHED] * (cfg.interval - 1)
            schedule = Schedule(FULL, tuple(steps), repeat=True)
        else:
            if num_steps is None:
                raise PassError(f"schedule {cfg.schedule!r}" + (" with a stage-dependent cut" if staged else "") +
                                " is made for a number of steps, which comes from the calibration set; pass "
                                "calibration=... (or use schedule='uniform' with a single cached region)")
            if cfg.schedule == "uniform":
                full = {s for s in range(num_steps) if s % cfg.interval == 0}
            else:
                budget = cfg.full_steps or max(1, math.ceil(cfg.full_fraction * num_steps))
                if budget > num_steps:
                    raise PassError(f"full_steps={budget} exceeds the calibration's {num_steps} steps")
                warm = warmup_steps(cfg.warmup, num_steps)
                if budget <= warm:
                    raise PassError(f"warmup={cfg.warmup} keeps the first {warm} of {num_steps} steps in full, which "
                                    f"takes the whole budget of {budget} full steps; raise full_fraction (or "
                                    "full_steps) or lower warmup")
                if cfg.schedule == "nonuniform":
                    full = nonuniform_full_steps(num_steps, budget)
                else:
                    dg.step_plan = _step_plan(regions, variants, unscheduled)
                    full, candidates, forecast, backoff = self._dp_within_floor(
                        dg, regions, variants, ctx, num_steps, budget, cached_variant, staged)
                    if full is None:
                        return self._declined(dg, backoff, candidates, num_steps)
            steps = [FULL if s in full else cached_variant(s, num_steps) for s in range(num_steps)]
            schedule = Schedule(FULL, tuple(steps))
        if forecast:
            schedule = dataclasses.replace(schedule, forecast=True)
        dg.step_plan = _step_plan(regions, variants, schedule)
        plan = build_plan(dg)
        if num_steps is not None:
            steps = [plan.schedule.variant_for(s, num_steps) for s in range(num_steps)]
        report = self._report(dg, plan, steps, ctx)
        report["forecast"] = forecast
        if candidates:
            report["dp_candidates"] = candidates
        if cfg.schedule == "dp" and backoff:
            report["floor_backoff"] = backoff
        anchor_step_plan(dg, ctx)
        return PassResult(dg, modified=True, report=report)

    def _dp_within_floor(self, dg: DiffusionGraph, regions: list[Region], variants: dict[str, list[str]],
                         ctx: PassContext, num_steps: int, budget: int, cached_variant: Any, staged: bool) \
            -> tuple[set[int] | None, list[dict[str, Any]], bool, list[dict[str, Any]]]:
        """The dp schedule at `budget` full steps or, when its final-image PSNR on the held-out
        trajectories (on the selection ones when none are held out) misses min_psnr, at the next
        larger budgets. Returns (full steps or None when no budget short of all steps keeps the
        floor, candidates, forecast, the budgets that missed it)."""
        backoff: list[dict[str, Any]] = []
        while True:
            full, candidates, forecast = self._dp_schedule(dg, regions, variants, ctx, num_steps, budget,
                                                           cached_variant, staged)
            chosen = next((c for c in candidates if c.get("chosen")), None)
            if chosen is None and self.config.min_psnr is not None:
                warnings.warn(f"cache: the calibration set has neither a pipeline nor an identified sampling loop to "
                              f"re-run, so the schedule ({len(full)} of {num_steps} steps in full) is chosen on "
                              f"per-call errors and its final images are not checked against min_psnr="
                              f"{self.config.min_psnr}. Calibrate with collect(pipe) or record(...) and rec.final(...) "
                              "to have it checked.", stacklevel=3)
            if self.config.min_psnr is None or chosen is None:
                return full, candidates, forecast, backoff
            measured = chosen["held_out_psnr"] if chosen["held_out_psnr"] is not None else chosen["predicted_psnr"]
            if measured >= self.config.min_psnr:
                return full, candidates, forecast, backoff
            backoff.append({"full_steps": budget, "forecast": forecast, "held_out_psnr": measured})
            if budget >= num_steps - 1:
                return None, candidates, forecast, backoff
            budget = min(num_steps - 1, budget + max(1, math.ceil(BACKOFF_SHARE * num_steps)))

    def _declined(self, dg: DiffusionGraph, backoff: list[dict[str, Any]], candidates: list[dict[str, Any]],
                  num_steps: int) -> PassResult:
        dg.step_plan = None
        floor = self.config.min_psnr
        message = (f"cache: no schedule keeps {floor} dB final-image PSNR on the held-out calibration "
                   f"trajectories (with {backoff[-1]['full_steps']} of {num_steps} steps in full: "
                   f"{backoff[-1]['held_out_psnr']:.1f} dB), so nothing is cached. Lower "
                   "min_psnr to accept the loss, or calibrate on more steps.")
        warnings.warn(message, stacklevel=2)
        return PassResult(dg, modified=False, report={"declined": message, "floor_backoff": backoff,
                                                      "dp_candidates": candidates})

    def _dp_schedule(self, dg: DiffusionGraph, regions: list[Region], variants: dict[str, list[str]],
                     ctx: PassContext, num_steps: int, budget: int, cached_variant: Any,
                     staged: bool) -> tuple[set[int], list[dict[str, Any]], bool]:
        """The dp schedule (schedules.dp_schedule), its candidates scored on the live pipeline,
        when there is one, with the step plan each gives. Returns the full steps, the scored
        candidates and whether to forecast."""
        cfg = self.config
        fixed = bool(cfg.forecast) if cfg.forecast is not None or staged else None

        selection, held_out = split_items(ctx.calibration)

        measured: dict[tuple[frozenset[int], bool, frozenset[str]], dict[str, float]] = {}

        def final_error(full: set[int], forecast: bool, items: set[str] = selection) -> dict[str, float]:
            """Re-sampled once per schedule and trajectories: the DP's chosen one is reported again."""
            key = (frozenset(full), forecast, frozenset(items))
            if key not in measured:
                steps = [FULL if s in full else cached_variant(s, num_steps) for s in range(num_steps)]
                dg.step_plan = _step_plan(regions, variants, Schedule(FULL, tuple(steps), forecast=forecast))
                measured[key] = trajectory_error(ctx.calibration, ctx.denoiser_for(dg), items, ctx.reference)
            return measured[key]

        live = unjudgeable(ctx) is None
        unmodified = ctx.denoiser_for(dg.clone()) if live else None  # its step plan runs every step in full
        full, candidates, forecast = dp_schedule(build_plan(dg), ctx.calibration, num_steps, budget, cfg.max_gap,
                                                 cfg.refine, cached_variant, fixed,
                                                 (lambda f, m: final_error(f, m)["mse"]) if live else None, unmodified,
                                                 warmup_steps(cfg.warmup, num_steps))
        if live:
            predicted = final_error(full, forecast)["psnr"]
            held_out_psnr = final_error(full, forecast, held_out)["psnr"] if held_out else None
            candidates.append({"full_steps": sorted(full), "forecast": forecast, "chosen": True,
                               "predicted_psnr": round(predicted, 3),
                               "held_out_psnr": None if held_out_psnr is None else round(held_out_psnr, 3)})
        return full, candidates, forecast

    def _block_schedule(self, dg: DiffusionGraph, ctx: PassContext) -> PassResult:
        """schedule='bac': one cached region per candidate block, each with its own steps (bac.py)."""
        cfg = self.config
        if cfg.forecast:
            raise PassError("forecast extrapolates one cached region; schedule='bac' caches every block separately. "
                            "Fix: forecast=False (or leave it unset), or schedule='dp' with one cut to forecast")
        regions = block_regions(dg, cfg.cut, cfg.depth, cfg.blocks, cfg.mode)
        calibration = ctx.calibration
        num_steps = calibration.num_steps
        budget = cfg.full_steps or max(1, math.ceil(cfg.full_fraction * num_steps))
        if budget > num_steps:
            raise PassError(f"full_steps={budget} exceeds the calibration's {num_steps} steps")
        dg.step_plan = _step_plan(regions, {FULL: []}, Schedule(FULL))
        variants, steps, blocks = block_variants(dg, regions, build_plan(dg), calibration, budget, cfg.max_gap,
                                                 cfg.max_variants)
        dg.step_plan = _step_plan(regions, variants, Schedule(FULL, tuple(steps)))
        report = self._report(dg, build_plan(dg), steps, ctx)
        report.update({"forecast": False, **blocks})
        anchor_step_plan(dg, ctx)
        return PassResult(dg, modified=True, report=report)

    # --- report -------------------------------------------------------------------------------
    def _report(self, dg: DiffusionGraph, plan: Any, steps: list[str], ctx: PassContext) -> dict[str, Any]:
        total = sum(node_flops(n) for n in dg.graph.nodes)
        variant_flops = {name: sum(segment_flops(dg, plan.segments[s]) for s in variant.segments)
                         for name, variant in plan.variants.items()}
        adaptive = plan.schedule.adaptive
        if adaptive:
            share = adaptive["calibrated_full_share"]
            variant_flops[ADAPTIVE] = share * variant_flops[adaptive["full"]] + (1 - share) * variant_flops[adaptive["cached"]]
        skipped = {name: 1 - f / max(total, 1) for name, f in variant_flops.items()}
        per_step = [round(skipped[v], 4) for v in steps]
        mean_cost = float(np.mean([variant_flops[v] for v in steps])) if steps else total
        report: dict[str, Any] = {
            "cut": self.config.cut, "regions": {r.name: len(r.cuts) for r in dg.step_plan.regions},
            "schedule": self.config.schedule, "steps": steps,
            "full_steps": sum(v == FULL for v in steps), "num_steps": len(steps),
            "flops_skipped_per_step": per_step, "flops_skipped": round(1 - mean_cost / max(total, 1), 4),
            "predicted_speedup": round(total / max(mean_cost, 1), 3),
        }
        if ctx.calibration is not None:
            errors = measured_error(plan, ctx.calibration)
            report["relative_error_per_step"] = [round(e, 6) for e in errors]
            report["relative_error"] = round(float(np.mean(errors)), 6)
        return report


def _step_plan(regions: list[Region], variants: dict[str, list[str]], schedule: Schedule) -> StepPlan:
    return StepPlan.build(regions, variants, schedule, {"pass": "cache"})


def _step_plan_conflict(step_plan: StepPlan) -> str:
    """Why the cache pass cannot run on a graph that already has a step plan, and the fix. A
    step-dependent prune or moe plan skips units inside the region caching would skip as a whole,
    and a Plan's regions do not nest, so the cache schedule cannot be laid over those variants."""
    source = step_plan.source
    if source == "cache":
        return "the graph already has a step plan from an earlier cache pass; run cache once"
    return f"the graph already has a step plan from {source}: {_nesting_conflict(source)}"


def _nesting_conflict(source: str) -> str:
    return (f"with step_groups > 1 {source} gives each range of denoising steps its own variant, and cached "
            f"regions cannot be nested around those variants. Fix: give {source} step_groups=1 (one selection for "
            f"every step, e.g. {{'pass': '{source}', 'step_groups': 1}}), or leave cache out of this pipeline")
