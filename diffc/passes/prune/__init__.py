"""Layer pruning: remove whole residual units (resnets, attentions, transformer blocks, FFNs,
stages whose input and output agree) by rewiring each unit's output to its residual input.

Scores (LD-Pruner): a unit's score is how much removing it alone moves the denoiser's output in
latent space, measured on calibration calls (relative MSE against the unpruned graph). LAPTOP-Diff
observes that this output loss is close to additive over sets of removed units; the pass measures
how well single scores add up on random sets (their correlation with the measured set errors is
in the report) and then picks the set by an exact tree knapsack on the additive scores: the least
summed score that removes at least the asked share of parameters, FLOPs or estimated latency (a
roofline model whose throughputs are measured on the machine the pass runs on, see `Roofline`),
a unit and the units nested in it never both chosen.

A removed unit is replaced by its mean residual (`compensate`): the per-channel mean of what it
adds to the residual stream on the calibration calls becomes a constant added in its place, the
closed-form bias compensation of pruning without training (it stays in the graph, so it does not
count as removed; scores are measured with it). Per-channel, not per-position: a per-token mean
of a fixed-resolution DiT fits the few calibration images and generalises worse. What a unit adds
drifts with the noise level, so the mean is taken per range of timesteps (`compensate_ranges`) and
each sample's timestep picks its range's row at run time (a compare and a small matmul), which
holds for any number of sampling steps.

Removal also drops the output rows of a linear whose split pieces are no longer read: adaLN-Zero
(DiT, PixArt, SD3, FLUX) computes one block's attention and FFN modulations with one linear, so
removing the attention removes half of that linear, and it counts towards the share removed.

When final outputs can be re-sampled, the knapsack's optimum and its runners-up (the optimum with one of its
units excluded), up to `rerank` sets, are re-sampled through the real sampling loop and the set
of least trajectory error is kept: single-step errors add up within a step, but compound along
the loop differently per unit.

Without an `amount`, the share is derived from calibration data: the largest one whose pruned
model keeps the re-sampled final outputs above `min_psnr` (the live pipeline, or the sampling loop
identified from a recording of every step), verified on held-out trajectories (_search.search_grid).
With neither, nothing is pruned and a warning says why, unless `max_relative_error` is set: then
the teacher-forced output error decides.

With `recover_steps`, the pruned graph's remaining weights are then distilled for that many
steps against the unpruned graph on the calibration calls (LAPTOP-Diff's normalized feature
distillation, see `diffc.passes.recovery.recover`; a step plan is trained through each of its variants); off by
default: pruning stays training-free unless asked. Scoring reads `max_records` calls, the
distillation all recorded ones (or `recover_records`), `recover_rows` rows per step: a
calibration set collected on more seeds gives it more data at the same cost per step.

With `step_groups > 1`, each range of denoising steps gets its own set (different units matter
at high and low noise, as in Delta-DiT's stage split): units removed at every step are removed
from the graph, the others become bypass regions of a step plan, one Plan variant per range
(a bypass passes its residual on unchanged: compensation and re-ranking need step_groups=1)."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from ..._progress import progress
from ...calibration import split_items, trajectory_error
from ...calibration.batch import CalibrationBatch, plan_error, step_ranges
from ...errors import PassError
from ...ir import DiffusionGraph
from .._search import fitting_items, search_grid, unjudgeable
from ..base import Pass, PassConfig, PassContext, PassResult, anchor_step_plan, register_pass
from ..recovery import RECOVER_ROWS, recover
from ..step_ranges import bypass_region, range_step_plan
from .compensation import MeanResidual, mean_residuals
from .costs import Roofline, graph_flops, nbytes
from .selection import additivity, knapsack
from .units import UNIT_KINDS, Unit, region, remove_units, residual_units

TARGETS = ("params", "flops", "latency")
AMOUNT_GRID = tuple(round(0.05 * k, 2) for k in range(1, 13))


@dataclass(frozen=True)
class PruneConfig(PassConfig):
    target: str = "params"
    amount: float | None = None
    min_psnr: float = 30.0
    max_relative_error: float | None = None
    kinds: tuple[str, ...] = UNIT_KINDS
    step_groups: int = 1
    max_records: int = 64
    additivity_sets: int = 16
    seed: int = 0
    progress: bool = False
    compensate: bool = True
    compensate_ranges: int = 4
    rerank: int = 4
    recover_steps: int = 0
    recover_lr: float = 1e-4
    recover_rows: int = RECOVER_ROWS
    recover_records: int | None = None

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")
        if self.amount is not None and not 0 <= self.amount < 1:
            raise ValueError(f"amount is the share of {self.target} to remove, in [0, 1); got {self.amount}")
        unknown = sorted(set(self.kinds) - set(UNIT_KINDS))
        if unknown or not self.kinds:
            raise ValueError(f"kinds must be a non-empty subset of {UNIT_KINDS}, got {self.kinds}")
        if self.step_groups < 1 or self.max_records < 1 or self.compensate_ranges < 1 or self.additivity_sets < 0 or \
                self.rerank < 0 or self.recover_steps < 0 or self.recover_lr <= 0 or self.recover_rows < 1 or \
                (self.recover_records is not None and self.recover_records < 1):
            raise ValueError("step_groups, max_records, compensate_ranges, recover_rows and recover_records must be "
                             ">= 1, additivity_sets, rerank and recover_steps >= 0, recover_lr > 0")


@register_pass
class PrunePass(Pass):
    name = "prune"
    Config = PruneConfig
    requires = ("calibrated", "full_precision")
    removes_layers = True

    def writes_step_plan(self) -> bool:
        return self.config.step_groups > 1

    def run(self, dg: DiffusionGraph, ctx: PassContext) -> PassResult:
        cfg = self.config
        if dg.step_plan:
            raise PassError("the graph already has a step plan (cache or moe ran before); run prune first in "
                            "the pipeline, e.g. ['prune', 'cache']")
        ctx.calibration.check_compatible(dg)
        roofline = None
        if cfg.target == "latency":
            roofline = Roofline.measure(next(iter(dg.weights().values())).device)
        units = residual_units(dg, cfg.kinds, roofline)
        if cfg.step_groups > 1:
            # bypass regions must be disjoint: per step range, only innermost units are candidates
            units = [u for u in units if not any(v.parent == u.name for v in units)]
        if not units:
            raise PassError(f"{dg.signature.model_class}: no block of kinds {cfg.kinds} has a residual that can be "
                            "rewired; this model has nothing layer pruning can remove")
        # a searched amount is verified on held-out trajectories: nothing is fitted on them
        batch = CalibrationBatch(ctx.calibration, dg, cfg.max_records,
                                 items=fitting_items(ctx) if cfg.amount is None else None)
        total = {"params": dg.num_parameters, "flops": lambda: graph_flops(dg),
                 "latency": lambda: roofline.graph_seconds(dg)}[cfg.target]()
        ranges = step_ranges(batch.num_steps, cfg.step_groups) if cfg.step_groups > 1 else [(0, batch.num_steps)]
        groups = [set(range(a, b)) for a, b in ranges]
        # a bypass region of a step plan passes its residual on unchanged: compensation needs step_groups=1
        offsets = mean_residuals(dg, units, batch, cfg.compensate_ranges) if cfg.compensate and len(groups) == 1 \
            else {}
        # a unit's mean residual stays in the graph as a constant: it does not count as removed
        weights = [self._weight(u, offsets.get(u.name), roofline, dg) for u in units]
        scores = self._scores(dg, units, batch, groups, offsets, cfg.progress or ctx.progress)
        report: dict[str, Any] = {"target": cfg.target, "candidates": len(units),
                                  **({"roofline": {"flops_per_s": f"{roofline.flops_per_s:.3g}",
                                                   "bytes_per_s": f"{roofline.bytes_per_s:.3g}",
                                                   "op_seconds": f"{roofline.op_seconds:.3g}"}} if roofline else {}),
                                  "scores": {u.name: [round(s[i], 6) for s in scores] for i, u in enumerate(units)}}
        report["additivity"] = additivity(dg, units, scores[0] if len(groups) == 1 else
                                          [float(np.mean([s[i] for s in scores])) for i in range(len(units))],
                                          batch, cfg.additivity_sets, cfg.seed, offsets=offsets)

        live = unjudgeable(ctx) is None
        reranked: dict[float, list[dict[str, Any]]] = {}

        @functools.lru_cache(maxsize=None)
        def build(amount: float) -> tuple[DiffusionGraph, list[list[Unit]]]:
            chosen = [knapsack(units, score, weights, amount * total) for score in scores]
            if live and cfg.rerank > 1 and len(groups) == 1 and chosen[0]:
                chosen[0], reranked[amount] = self._rerank(dg, units, scores[0], weights, amount * total, chosen[0],
                                                           offsets, ctx)
            return self._pruned(dg, chosen, ranges, batch.num_steps, offsets), chosen

        amount = cfg.amount
        if amount is None:
            amount, report["amount_search"] = search_grid(
                AMOUNT_GRID, lambda share: build(share)[0], ctx, knob="amount",
                offline_error=lambda pruned: plan_error(pruned, batch), min_psnr=cfg.min_psnr,
                max_relative_error=cfg.max_relative_error, quality_rises=False, fallback=0.0, infeasible=(PassError,))
        pruned, chosen = build(amount)
        if cfg.recover_steps and any(chosen):
            distillation_calls = CalibrationBatch(ctx.calibration, dg, cfg.recover_records)
            pruned, report["recovery_loss"] = recover(pruned, dg, distillation_calls, cfg.recover_steps, cfg.recover_lr,
                                                      cfg.seed, cfg.progress or ctx.progress,
                                                      rows_per_step=cfg.recover_rows, validation=batch)
            report["relative_error_before_recovery"] = report["recovery_loss"]["validation_error"]["start"]
        if amount in reranked:
            report["reranked"] = reranked[amount]
        report.update(self._summary(dg, pruned, chosen, ranges, amount, batch, groups))
        if roofline is not None and len(chosen) == 1:
            report["latency_removed_share"] = round(1 - roofline.graph_seconds(pruned) / max(total, 1e-12), 4)
        index = {u.name: i for i, u in enumerate(units)}
        # the sum of single scores the selection minimised, beside the measured relative_error
        report["predicted_error"] = round(float(np.mean([sum(score[index[u.name]] for u in units_g)
                                                          for score, units_g in zip(scores, chosen)])), 6)
        anchor_step_plan(pruned, ctx)
        return PassResult(pruned, modified=any(chosen), report=report)

    def _weight(self, unit: Unit, offset: MeanResidual | None, roofline: Roofline | None,
                dg: DiffusionGraph) -> float:
        """What removing the unit saves of the target, less what its mean residual (an add of a
        constant) costs."""
        if self.config.target == "params":
            return float(unit.params - (offset.numel() if offset is not None else 0))
        if self.config.target == "flops":
            return float(unit.flops)
        assert roofline is not None
        if offset is None:
            return unit.latency
        out = next(n for n in dg.graph.nodes if n.name == unit.out)
        added = 2 * nbytes(out) + offset.numel() * offset.table.element_size()
        return unit.latency - roofline.op_seconds - added / roofline.bytes_per_s

    def _rerank(self, dg: DiffusionGraph, units: list[Unit], scores: list[float], weights: list[float],
                need: float, best: list[Unit], offsets: Mapping[str, MeanResidual],
                ctx: PassContext) -> tuple[list[Unit], list[dict[str, Any]]]:
        """Among the knapsack's optimum and its runners-up (the optimum with one of its units
        excluded), up to `rerank` sets, the one whose pruned model re-samples the calibration
        trajectories closest to the original: single-step output errors are summed by the knapsack,
        but errors compound along the sampling loop differently per unit."""
        candidates = [best]
        for excluded in best:
            if len(candidates) >= self.config.rerank:
                break
            masked = [math.inf if u is excluded else s for u, s in zip(units, scores)]
            try:
                alternative = knapsack(units, masked, weights, need)
            except PassError:
                continue
            if {u.name for u in alternative} not in [{u.name for u in c} for c in candidates]:
                candidates.append(alternative)
        measured = []
        selection, _ = split_items(ctx.calibration)
        for candidate in candidates:
            pruned = remove_units(dg.clone(), candidate, offsets)
            measured.append(trajectory_error(ctx.calibration, ctx.denoiser_for(pruned), selection, ctx.reference)["mse"])
        record = [{"removed": [u.name for u in c], "trajectory_mse": round(m, 8)} for c, m in zip(candidates, measured)]
        return candidates[int(np.argmin(measured))], record

    def _scores(self, dg: DiffusionGraph, units: list[Unit], batch: CalibrationBatch,
                groups: list[set[int]], offsets: Mapping[str, MeanResidual], show_progress: bool) -> list[list[float]]:
        """scores[g][i]: mean relative output error over the calls in step range g with unit i removed."""
        masks = [batch.step_mask(g) for g in groups]
        scores: list[list[float]] = [[] for _ in groups]
        for unit in progress(units, show_progress, "prune: scoring units", "unit"):
            errors = batch.row_errors(batch.outputs(remove_units(dg.clone(), [unit], offsets).module))
            for g, mask in enumerate(masks):
                scores[g].append(batch.mean_error(errors, mask))
        return scores

    def _pruned(self, dg: DiffusionGraph, chosen: list[list[Unit]], ranges: list[tuple[int, int]],
                num_steps: int, offsets: Mapping[str, MeanResidual] | None = None) -> DiffusionGraph:
        """Units chosen for every step range are removed from the graph; the others become bypass
        regions skipped by the variants of the ranges that chose them."""
        everywhere = [u for u in chosen[0] if all(any(v.name == u.name for v in c) for c in chosen)]
        pruned = remove_units(dg.clone(), everywhere, offsets)
        gone = {u.name for u in everywhere}
        partial = {u.name: u for c in chosen for u in c if u.name not in gone}
        if not partial:
            return pruned
        alive = {n.name for n in pruned.graph.nodes}
        rewired = {u.out: f"{region(u)}_mean_residual_added" if u.name in (offsets or {}) else u.skip
                   for u in everywhere}
        regions = []
        for unit in partial.values():
            skip = unit.skip
            while skip in rewired:
                skip = rewired[skip]
            if unit.out not in alive or skip not in alive:
                raise PassError(f"unit {unit.name} lost its nodes to another removal; use step_groups=1")
            regions.append(bypass_region(region(unit), unit.out, skip))
        pruned.step_plan = range_step_plan(regions, ranges,
                                           [sorted(region(u) for u in units if u.name in partial) for units in chosen],
                                           {"pass": "prune", "step_ranges": ranges})
        return pruned

    def _summary(self, dg: DiffusionGraph, pruned: DiffusionGraph, chosen: list[list[Unit]],
                 ranges: list[tuple[int, int]], amount: float, batch: CalibrationBatch,
                 groups: list[set[int]]) -> dict[str, Any]:
        params, flops = dg.num_parameters(), graph_flops(dg)
        summary: dict[str, Any] = {
            "amount": amount,
            "params_removed": params - pruned.num_parameters(),
            "params_removed_share": round(1 - pruned.num_parameters() / max(params, 1), 4),
        }
        if len(chosen) == 1:
            summary["removed"] = [u.name for u in chosen[0]]
            summary["flops_removed_share"] = round(1 - graph_flops(pruned) / max(flops, 1), 4)
        else:
            summary["removed_per_steps"] = {f"{a}-{b}": [u.name for u in c] for (a, b), c in zip(ranges, chosen)}
            per_variant = []
            for (start, end), units in zip(ranges, chosen):
                removed = remove_units(dg.clone(), units)
                per_variant.append((1 - graph_flops(removed) / max(flops, 1)) * (end - start))
            summary["flops_removed_share"] = round(sum(per_variant) / max(batch.num_steps, 1), 4)
        summary["relative_error"] = round(plan_error(pruned, batch), 6)
        summary["relative_error_per_range"] = [round(plan_error(pruned, batch, g), 6) for g in groups]
        return summary
