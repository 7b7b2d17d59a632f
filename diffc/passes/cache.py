"""Block caching across timesteps: cut the graph at block boundaries into a cached region and the
rest, build a "full" variant (computes and stores the region's outputs) and a "cached" variant
(reuses them and skips the region), and a schedule saying which variant runs at each step.

Cuts (see ../shared/papers.md): `deep` (DeepCache: the UNet branch below skip depth d), `encoder`
(Faster Diffusion: the UNet encoder), `blocks` (a DiT block range, caching its residual as in
Delta-DiT), `first_block` (everything after the first transformer block, FORA / first-block
cache), `delta_dit` (rear blocks cached early in sampling, front blocks late).
Schedules: `uniform` (every `interval` steps), `nonuniform` (full steps denser at the start and
the end), `dp` (CacheQuant-style dynamic programming over steps on calibration data, minimising
the error that reaches the final output for a budget of full steps: each step's reuse error is
weighted by how strongly an output error at that step propagates through the sampler), `adaptive` (decided at run time: recompute when the
tensor entering the cached region moved more than a threshold since the last full step, as in
TeaCache / first-block cache; the threshold is calibrated so that about `full_fraction` of the
calibration steps recompute), `bac` (Block-wise Adaptive Caching, "Cache Me if You Can": every
candidate block of the cut is its own cached region with its own recompute steps, see below).

`bac`: the cut chooses the candidate blocks (`auto` / `deep`: the UNet stages below skip depth d,
`encoder`: the encoder stages; `auto` / `blocks`: every DiT block, or the given range,
`first_block`: the blocks after the first). UNet stages cache their outputs; a transformer block
caches its residual (mode `auto` or `delta`) where an input has its output's shape, else its
output (mode `auto` or `raw`). On calibration data each block's change profile is
measured: the relative L1 change of its cached tensors (raw output, or residual in delta mode)
between neighbouring steps. A block recomputes at a step when its change accumulated since it was
last computed reaches one threshold shared by all blocks (so a block that changes more recomputes
more often), or when it would otherwise go `max_gap` steps without; a block whose outputs only
feed blocks that are reused at that step is not recomputed (its work would be discarded), and
the blocks a recomputed block reads recompute with it (BAC's bubbling union: on digits-dit, at 7
of 20 steps' compute, final-image PSNR 27.9 dB with it against 25.4 dB without). The
threshold is set by bisection so that the blocks' compute over the loop does not exceed what
`full_steps` (or `full_fraction` of the steps) fully computed steps would spend on them. A step's
variant is the set of blocks it recomputes; at most `max_variants` distinct sets are kept (each
is compiled once, over shared segments), a rarer set being replaced by the cheapest kept set that
contains it. Forecasting extrapolates one region, so `bac` refuses `forecast=True`."""
from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from ..errors import PassError
from ..ir import DiffusionGraph
from ..ir.blocks import STAGE, TRANSFORMER_BLOCK, node_flops
from ..ir.partition import build_plan, region_nodes
from ..calibration import propagation_weights, relative_error, trajectory_error
from ..ir.plan import ADAPTIVE
from .base import Pass, PassConfig, PassContext, PassResult, register_pass

CUTS = ("auto", "deep", "encoder", "blocks", "first_block", "delta_dit")
SCHEDULES = ("dp", "uniform", "nonuniform", "adaptive", "bac")
FULL, CACHED = "full", "cached"


@dataclass(frozen=True)
class CacheConfig(PassConfig):
    cut: str = "auto"
    depth: int = 1
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
        regions, variants = self._regions(dg)
        cached_variant = _cached_variant_for(variants)
        staged = len(variants) > 2
        if cfg.forecast and staged:
            raise PassError(f"forecast extrapolates one cached region; cut {cfg.cut!r} caches several "
                            "(use cut='first_block', 'blocks', 'deep' or 'encoder')")
        candidates: list[dict[str, Any]] = []
        forecast = bool(cfg.forecast)
        num_steps = ctx.calibration.num_steps if ctx.calibration is not None else None
        if cfg.schedule == "adaptive":
            if staged:
                raise PassError("the adaptive schedule gates one cached region; use cut='first_block', 'blocks' or 'deep'")
            dg.step_plan = _step_plan(regions, variants, {"default": FULL, "steps": [], "repeat": False})
            schedule = adaptive_schedule(build_plan(dg), ctx.calibration, cfg.full_fraction, cfg.max_gap)
            steps = [ADAPTIVE]
        elif cfg.schedule == "uniform" and not staged:
            steps = [FULL] + [CACHED] * (cfg.interval - 1)
            schedule = {"default": FULL, "steps": steps, "repeat": True}
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
                if cfg.schedule == "nonuniform":
                    full = _nonuniform_full_steps(num_steps, budget)
                else:
                    dg.step_plan = _step_plan(regions, variants, {"default": FULL, "steps": [], "repeat": False})
                    full, candidates, forecast = self._dp_schedule(dg, regions, variants, ctx, num_steps,
                                                                   budget, cached_variant, staged)
            steps = [FULL if s in full else cached_variant(s, num_steps) for s in range(num_steps)]
            schedule = {"default": FULL, "steps": steps, "repeat": False}
        if forecast:
            schedule = {**schedule, "forecast": True}
        dg.step_plan = _step_plan(regions, variants, schedule)
        plan = build_plan(dg)
        if num_steps is not None:
            steps = [plan.schedule.variant_for(s, num_steps) for s in range(num_steps)]
        report = self._report(dg, plan, steps, ctx)
        report["forecast"] = forecast
        if candidates:
            report["dp_candidates"] = candidates
        return PassResult(dg, modified=True, report=report)

    def _dp_schedule(self, dg: DiffusionGraph, regions: list[dict[str, Any]], variants: dict[str, list[str]],
                     ctx: PassContext, num_steps: int, budget: int, cached_variant: Any,
                     staged: bool) -> tuple[set[int], list[dict[str, Any]], bool]:
        """Full steps by dynamic programming on the per-step reuse errors. Each error is weighted
        by how strongly an output error at its step propagates to the final output, and the DP is
        solved for each gap limit up to max_gap; with the live pipeline, the candidate (evenly
        spaced full steps among them) whose re-sampled calibration trajectories end closest to the
        recorded ones wins (with and without forecasting, unless the config fixes it), and is refined
        by moving single full steps while that lowers the error. Returns the full steps, the scored
        candidates and whether to forecast."""
        cfg = self.config
        fixed = bool(cfg.forecast) if cfg.forecast is not None or staged else None
        errors = reuse_errors(build_plan(dg), ctx.calibration, cfg.max_gap, cached_variant)
        weights = propagation_weights(ctx.calibration)
        weightings = [errors] if weights is None else \
            [{(i, j): e * weights[j] for (i, j), e in errors.items()}, errors]
        candidates: list[set[int]] = []
        for weighted in weightings:
            for gap in range(2, cfg.max_gap + 1):
                try:
                    full = dp_full_steps(weighted, num_steps, budget, gap)
                except PassError:
                    continue
                if full not in candidates:
                    candidates.append(full)
        if not candidates:
            return dp_full_steps(errors, num_steps, budget, cfg.max_gap), [], False  # raises with the reason
        if ctx.calibration.pipeline is None or ctx.denoiser_for is None:
            return candidates[0], [], bool(fixed)
        even = {round(i * num_steps / budget) for i in range(budget)}
        if even not in candidates and _within_gap(even, num_steps, cfg.max_gap):
            candidates.append(even)

        def final_error(full: set[int], forecast: bool) -> float:
            steps = [FULL if s in full else cached_variant(s, num_steps) for s in range(num_steps)]
            schedule = {"default": FULL, "steps": steps, "repeat": False, "forecast": forecast}
            dg.step_plan = _step_plan(regions, variants, schedule)
            return trajectory_error(ctx.calibration, ctx.denoiser_for(dg))["mse"]

        modes = (False, True) if fixed is None else (fixed,)
        scored = [(final_error(full, mode), sorted(full), mode) for full in candidates for mode in modes]
        best_error, best, forecast = min(scored)
        report = [{"full_steps": f, "forecast": m, "final_mse": round(e, 8)} for e, f, m in scored]
        refined, refined_error = _refine_full_steps(set(best), best_error, lambda full: final_error(full, forecast),
                                                    num_steps, cfg.max_gap, cfg.refine)
        if refined != set(best):
            report.append({"full_steps": sorted(refined), "forecast": forecast, "final_mse": round(refined_error, 8),
                           "refined": True})
        return refined, report, forecast

    # --- per-block schedules (BAC) ------------------------------------------------------------
    def _block_schedule(self, dg: DiffusionGraph, ctx: PassContext) -> PassResult:
        cfg = self.config
        if cfg.forecast:
            raise PassError("forecast extrapolates one cached region; schedule='bac' caches every block separately. "
                            "Fix: forecast=False (or leave it unset), or schedule='dp' with one cut to forecast")
        regions = self._block_regions(dg)
        calibration = ctx.calibration
        num_steps = calibration.num_steps
        budget = cfg.full_steps or max(1, math.ceil(cfg.full_fraction * num_steps))
        if budget > num_steps:
            raise PassError(f"full_steps={budget} exceeds the calibration's {num_steps} steps")
        dg.step_plan = _step_plan(regions, {FULL: []}, {"default": FULL, "steps": [], "repeat": False})
        plan = build_plan(dg)
        names = [seg[len("cache_"):] for seg in plan.variants[FULL].segments if seg.startswith("cache_")]
        costs = {name: _segment_flops(dg, plan.segments[f"cache_{name}"]) for name in names}
        changes = change_profiles(plan, calibration, names)
        chosen, threshold = bac_schedule(changes, costs, block_consumers(plan, names), budget, num_steps,
                                         cfg.max_gap, cfg.max_variants, block_feeders(plan, names))
        variant_of = {combo: _variant_name(combo, names) for combo in dict.fromkeys(chosen)}
        variants = {variant: [n for n in names if n not in combo] for combo, variant in variant_of.items()}
        steps = [variant_of[combo] for combo in chosen]
        dg.step_plan = _step_plan(regions, variants, {"default": FULL, "steps": steps, "repeat": False})
        report = self._report(dg, build_plan(dg), steps, ctx)
        report.update({
            "forecast": False, "threshold": round(threshold, 6), "variants": len(variants),
            "block_schedule": {n: [s for s, combo in enumerate(chosen) if n in combo] for n in names},
            "block_mode": {r["name"]: r["mode"] for r in regions},
            "block_change_per_step": {n: [round(c, 6) for c in changes[n]] for n in names},
            "block_flops_share": {n: round(costs[n] / max(sum(node_flops(x) for x in dg.graph.nodes), 1), 4)
                                  for n in names},
        })
        return PassResult(dg, modified=True, report=report)

    def _transformer_block_region(self, dg: DiffusionGraph, layers: list[Any], index: int) -> dict[str, Any]:
        """A transformer block caches its residual where one of its inputs has its output's shape
        (with mode='auto'; otherwise its output itself). Its inputs stay computed either way."""
        block, name = layers[index], f"block{index}"
        if self.config.mode == "raw":
            return _block_region(dg, [block], name, "raw")
        try:
            region = _range_region(dg, layers, index, index + 1, name, "delta")
        except PassError:
            if self.config.mode == "delta":
                raise
            return _block_region(dg, [block], name, "raw")
        region["keep"] = [i for i in block.inputs if i not in set(block.nodes)]
        return region

    def _block_regions(self, dg: DiffusionGraph) -> list[dict[str, Any]]:
        """One cached region per candidate block of the cut (see the module docstring)."""
        cfg = self.config
        stages = _unet_stages(dg)
        layers = _transformer_layers(dg)
        if stages and cfg.cut in ("auto", "deep", "encoder"):
            if cfg.mode == "delta":
                raise PassError("schedule='bac' caches UNet stages' outputs themselves; use mode='raw'")
            downs, ups = sorted(stages["down"], key=_index), sorted(stages["up"], key=_index)
            if cfg.cut == "encoder":
                chosen = downs + stages["mid"]
            else:
                if not 1 <= cfg.depth <= len(ups) - 1:
                    raise PassError(f"schedule='bac' with cut {cfg.cut!r} takes the stages below skip depth d, which "
                                    f"needs 1 <= depth <= {len(ups) - 1} for a UNet with {len(ups)} up blocks, got "
                                    f"depth={cfg.depth}. Fix: cut='encoder', or schedule='dp' for a one-level UNet")
                chosen = downs[cfg.depth:] + stages["mid"] + ups[:len(ups) - cfg.depth]
            regions = [_block_region(dg, [dg.block(name)], _short_name(name), "raw") for name in chosen]
        elif layers and cfg.cut in ("auto", "blocks", "first_block"):
            n = len(layers)
            start, end = (1, n) if cfg.cut == "first_block" else (cfg.blocks or (0, n))
            if not 0 <= start < end <= n:
                raise PassError(f"blocks must be a range within 0..{n} with start < end, got {(start, end)}")
            regions = [self._transformer_block_region(dg, layers, i) for i in range(start, end)]
        else:
            structure = "UNet stages" if stages else "transformer blocks" if layers else "no UNet stages or transformer blocks"
            raise PassError(f"schedule='bac' cannot take its candidate blocks from cut {cfg.cut!r} on "
                            f"{dg.signature.model_class} ({structure}). Fix: cut='auto', 'deep' or 'encoder' on a UNet, "
                            "'auto', 'blocks' or 'first_block' on a transformer")
        if len(regions) < 2:
            raise PassError(f"schedule='bac' gives each block its own steps, but cut {cfg.cut!r} leaves one candidate "
                            f"block ({regions[0]['name']}) in {dg.signature.model_class}. Fix: widen the candidates "
                            "(cut='blocks' with blocks=(0, n), or a smaller depth), or use schedule='dp' for one region")
        return regions

    # --- cut discovery ------------------------------------------------------------------------
    def _regions(self, dg: DiffusionGraph) -> tuple[list[dict[str, Any]], dict[str, list[str]]]:
        cfg = self.config
        stages = _unet_stages(dg)
        layers = _transformer_layers(dg)
        cut = cfg.cut
        if cut == "auto":
            # a one-level UNet has no branch below its outermost blocks to cache: cache its encoder
            cut = ("deep" if len(stages["up"]) > 1 else "encoder") if stages else "first_block" if layers else ""
            if not cut:
                raise PassError(f"{dg.signature.model_class}: found neither UNet stages nor transformer blocks to "
                                "cache; this model has no block structure diffc can cut")
        mode = cfg.mode if cfg.mode != "auto" else ("raw" if cut in ("deep", "encoder") else "delta")
        if cut in ("deep", "encoder"):
            if not stages:
                raise PassError(f"cut {cut!r} needs a UNet (down_blocks/mid_block/up_blocks); "
                                f"{dg.signature.model_class} has none. Use cut='blocks' or 'first_block'")
            cuts = _deep_cuts(dg, stages, cfg.depth) if cut == "deep" else _encoder_cuts(dg, stages)
            region = {"name": cut, "cuts": cuts, "mode": mode}
            if mode == "delta":
                raise PassError(f"cut {cut!r} caches the UNet features themselves; use mode='raw'")
            return [region], {FULL: [], CACHED: [cut]}
        if not layers:
            raise PassError(f"cut {cut!r} needs transformer blocks; {dg.signature.model_class} has none")
        n = len(layers)
        if cut == "delta_dit":
            if n < 2:
                raise PassError(f"delta_dit needs at least 2 transformer blocks, the model has {n}")
            middle = n // 2
            front = _range_region(dg, layers, 0, middle, "front", mode)
            rear = _range_region(dg, layers, middle, n, "rear", mode)
            return [front, rear], {FULL: [], "cached_rear": ["rear"], "cached_front": ["front"]}
        # a single block has nothing after it: cache the block itself
        after_first = (1, n) if n > 1 else (0, n)
        start, end = after_first if cut == "first_block" else (cfg.blocks or after_first)
        if not 0 <= start < end <= n:
            raise PassError(f"blocks must be a range within 0..{n} with start < end, got {(start, end)}")
        return [_range_region(dg, layers, start, end, "blocks", mode)], {FULL: [], CACHED: ["blocks"]}

    # --- report -------------------------------------------------------------------------------
    def _report(self, dg: DiffusionGraph, plan: Any, steps: list[str], ctx: PassContext) -> dict[str, Any]:
        total = sum(node_flops(n) for n in dg.graph.nodes)
        variant_flops = {name: sum(_segment_flops(dg, plan.segments[s]) for s in variant.segments)
                         for name, variant in plan.variants.items()}
        adaptive = plan.schedule.adaptive
        if adaptive:
            share = adaptive["calibrated_full_share"]
            variant_flops[ADAPTIVE] = share * variant_flops[adaptive["full"]] + (1 - share) * variant_flops[adaptive["cached"]]
        skipped = {name: 1 - f / max(total, 1) for name, f in variant_flops.items()}
        per_step = [round(skipped[v], 4) for v in steps]
        mean_cost = float(np.mean([variant_flops[v] for v in steps])) if steps else total
        report: dict[str, Any] = {
            "cut": self.config.cut, "regions": {r["name"]: len(r["cuts"]) for r in dg.step_plan["regions"]},
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


def _by_stage(_: str, step: int, num_steps: int) -> str:
    """Delta-DiT: rear blocks shape details, cached early; front blocks shape outlines, cached late."""
    return "cached_rear" if step < num_steps / 2 else "cached_front"


def _cached_variant_for(variants: dict[str, list[str]]) -> Any:
    names = [v for v in variants if v != FULL]

    def pick(step: int, num_steps: int) -> str:
        return _by_stage("", step, num_steps) if len(names) > 1 else names[0]

    return pick


def _step_plan(regions: list[dict[str, Any]], variants: dict[str, list[str]], schedule: dict[str, Any]) -> dict[str, Any]:
    return {"regions": regions, "variants": variants, "schedule": schedule, "summary": {"pass": "cache"}}


def _step_plan_conflict(step_plan: dict[str, Any]) -> str:
    """Why the cache pass cannot run on a graph that already has a step plan, and the fix. A
    step-dependent prune or moe plan skips units inside the region caching would skip as a whole,
    and a Plan's regions do not nest, so the cache schedule cannot be laid over those variants."""
    source = step_plan.get("summary", {}).get("pass", "an earlier pass")
    if source == "cache":
        return "the graph already has a step plan from an earlier cache pass; run cache once"
    return f"the graph already has a step plan from {source}: {_nesting_conflict(source)}"


def _nesting_conflict(source: str) -> str:
    return (f"with step_groups > 1 {source} gives each range of denoising steps its own variant, and cached "
            f"regions cannot be nested around those variants. Fix: give {source} step_groups=1 (one selection for "
            f"every step, e.g. {{'pass': '{source}', 'step_groups': 1}}), or leave cache out of this pipeline")


def _unet_stages(dg: DiffusionGraph) -> dict[str, list[str]]:
    stages: dict[str, list[str]] = {"down": [], "up": [], "mid": []}
    for block in dg.blocks:
        if block.kind != STAGE:
            continue
        kind = block.name.split("_")[0] if block.name != "mid_block" else "mid"
        stages[kind].append(block.name)
    return stages if stages["down"] and stages["up"] else {}


def _deep_cuts(dg: DiffusionGraph, stages: dict[str, list[str]], depth: int) -> list[str]:
    ups = sorted(stages["up"], key=_index)
    n = len(ups)
    if not 1 <= depth <= n - 1:
        raise PassError(f"deep caching needs 1 <= depth <= {n - 1} for a UNet with {n} up blocks, got {depth}: "
                        "depth d keeps the d outermost down/up blocks and caches everything below them")
    deepest_kept = dg.block(ups[n - depth])
    feeding = dg.block(ups[n - depth - 1])
    cuts = [o for o in feeding.outputs if o in deepest_kept.inputs]
    if len(cuts) != 1:
        raise PassError(f"cannot cut between {feeding.name} and {deepest_kept.name}: expected one hidden state passing "
                        f"between them, found {cuts or 'none'}")
    return cuts


def _encoder_cuts(dg: DiffusionGraph, stages: dict[str, list[str]]) -> list[str]:
    encoder = set(stages["down"]) | set(stages["mid"])
    members = {n for b in dg.blocks if b.name in encoder for n in b.nodes}
    cuts = []
    for block in dg.blocks:
        if block.name in encoder:
            for out in block.outputs:
                users = {u.name for u in _node(dg, out).users}
                if users - members and out not in cuts:
                    cuts.append(out)
    return cuts


def _transformer_layers(dg: DiffusionGraph) -> list[Any]:
    """Top-level transformer blocks in execution order (e.g. transformer_blocks.* then
    single_transformer_blocks.* for FLUX)."""
    return [b for b in dg.blocks if b.kind == TRANSFORMER_BLOCK and (b.parent is None)]


def _range_region(dg: DiffusionGraph, layers: list[Any], start: int, end: int, name: str, mode: str) -> dict[str, Any]:
    first, last = layers[start], layers[end - 1]
    members = {n for b in layers[start:end] for n in b.nodes}
    cuts = [o for o in last.outputs if any(u.name not in members for u in _node(dg, o).users)]
    if not cuts:
        raise PassError(f"block range {start}..{end} has no output used after it")
    region: dict[str, Any] = {"name": name, "cuts": cuts, "mode": mode}
    if mode == "delta":
        bases = {}
        for cut in cuts:
            shape = _node(dg, cut).meta.get("tensor_meta")
            match = [i for i in first.inputs if _node(dg, i).meta.get("tensor_meta") is not None
                     and tuple(_node(dg, i).meta["tensor_meta"].shape) == tuple(shape.shape)] if shape else []
            if not match:
                raise PassError(f"cannot cache the residual of blocks {start}..{end}: no input of {first.name} has the "
                                f"shape of its output {cut}; use mode='raw'")
            bases[cut] = match[0] if len(cuts) == 1 else match[min(cuts.index(cut), len(match) - 1)]
        region["bases"] = bases
    dead = region_nodes(dg.graph, cuts, list(region.get("bases", {}).values()))
    if not any(n.name in members for n in dead):
        raise PassError(f"caching blocks {start}..{end} would skip nothing: their outputs are needed elsewhere")
    return region


def _node(dg: DiffusionGraph, name: str) -> torch.fx.Node:
    for node in dg.graph.nodes:
        if node.name == name:
            return node
    raise PassError(f"node {name} not in graph")


def _index(name: str) -> int:
    match = re.search(r"(\d+)$", name)
    return int(match.group(1)) if match else 0


def _segment_flops(dg: DiffusionGraph, segment: Any) -> int:
    names = {n.name for n in segment.module.graph.nodes if n.op == "call_function"}
    return sum(node_flops(n) for n in dg.graph.nodes if n.name in names)


def _nonuniform_full_steps(num_steps: int, budget: int) -> set[int]:
    """Full steps at cosine-spaced positions: denser at the start and the end of sampling."""
    if budget == 1:
        return {0}
    positions = 0.5 - 0.5 * np.cos(np.pi * np.arange(budget) / (budget - 1))
    chosen: set[int] = set()
    for p in positions:
        step = int(round(p * (num_steps - 1)))
        while step in chosen and step < num_steps - 1:
            step += 1
        chosen.add(step)
    return chosen


def reuse_errors(plan: Any, calibration: Any, max_gap: int, cached_variant: Any) -> dict[tuple[int, int], float]:
    """e[(i, j)]: mean squared error of the output at step j when the cache was filled at step i
    (teacher-forced: recorded inputs of step j, cache from the full run at step i)."""
    sums: dict[tuple[int, int], list[float]] = {}
    by_item: dict[str, list[Any]] = {}
    for record in calibration.records():
        by_item.setdefault(record.item, []).append(record)
    for records in by_item.values():
        records.sort(key=lambda r: r.step)
        states: dict[int, dict[str, Any]] = {}
        for record in records:
            with torch.no_grad():
                _, states[record.step] = plan.run(FULL, record.inputs, {})
        for record in records:
            reference = record.output.double()
            for i in range(max(0, record.step - max_gap), record.step):
                if i not in states:
                    continue
                variant = cached_variant(record.step, record.num_steps)
                with torch.no_grad():
                    out, _ = plan.run(variant, record.inputs, states[i])
                error = float((out[0].double() - reference).pow(2).mean())
                sums.setdefault((i, record.step), []).append(error)
    return {k: float(np.mean(v)) for k, v in sums.items()}


def _within_gap(full: set[int], num_steps: int, max_gap: int) -> bool:
    marks = sorted(full) + [num_steps]
    return 0 in full and all(b - a <= max_gap for a, b in zip(marks, marks[1:]))


def _refine_full_steps(full: set[int], error: float, final_error: Callable[[set[int]], float], num_steps: int,
                       max_gap: int, evaluations: int) -> tuple[set[int], float]:
    """First-improvement local search: move one full step (never step 0) to a neighbouring cached
    step while the final error falls, within `evaluations` re-runs of the trajectories."""
    improved = True
    while improved and evaluations > 0:
        improved = False
        for step in sorted(full - {0}):
            for moved in (step - 1, step + 1):
                candidate = (full - {step}) | {moved}
                if not 0 < moved < num_steps or moved in full or not _within_gap(candidate, num_steps, max_gap):
                    continue
                if evaluations == 0:
                    return full, error
                evaluations -= 1
                candidate_error = final_error(candidate)
                if candidate_error < error:
                    full, error, improved = candidate, candidate_error, True
                    break
            if improved:
                break
    return full, error


def dp_full_steps(errors: dict[tuple[int, int], float], num_steps: int, budget: int, max_gap: int) -> set[int]:
    """The `budget` steps to compute fully (step 0 always) that minimise the summed reuse error of
    the others, by dynamic programming over steps. A step farther than max_gap from its last full
    step is not allowed."""
    inf = math.inf

    def segment_cost(i: int, j: int) -> float:
        """Cost of steps i+1..j-1 reusing the cache filled at step i."""
        return sum(errors.get((i, m), inf) for m in range(i + 1, j))

    best = np.full((budget + 1, num_steps), inf)
    parent = np.full((budget + 1, num_steps), -1, dtype=int)
    best[1][0] = 0.0
    for k in range(2, budget + 1):
        for j in range(1, num_steps):
            for i in range(max(0, j - max_gap), j):
                cost = best[k - 1][i] + segment_cost(i, j)
                if cost < best[k][j]:
                    best[k][j], parent[k][j] = cost, i
    finals = [(best[budget][i] + segment_cost(i, num_steps), i) for i in range(num_steps)
              if best[budget][i] < inf and num_steps - i <= max_gap]
    if not finals:
        raise PassError(f"no schedule with {budget} full steps keeps every gap within max_gap={max_gap} over "
                        f"{num_steps} steps; raise full_steps or max_gap")
    _, last = min(finals)
    chosen, k = set(), budget
    while last >= 0 and k >= 1:
        chosen.add(int(last))
        last, k = parent[k][last], k - 1
    return chosen


def measured_error(plan: Any, calibration: Any) -> list[float]:
    """Relative output error per step of the scheduled plan along each recorded trajectory, the
    cache carried from step to step as at run time (teacher-forced inputs)."""
    per_step: dict[int, list[float]] = {}
    state: dict[str, Any] = {}
    last_item = None
    for record in calibration.records():
        if record.item != last_item:
            state, last_item = {}, record.item
        variant = plan.schedule.variant_for(record.step, record.num_steps)
        with torch.no_grad():
            out, state = plan.run(variant, record.inputs, state)
        per_step.setdefault(record.step, []).append(relative_error(out[0], record.output))
    return [float(np.mean(per_step[s])) for s in sorted(per_step)]


def adaptive_schedule(plan: Any, calibration: Any, full_fraction: float, max_gap: int) -> dict[str, Any]:
    """An adaptive schedule whose threshold makes about `full_fraction` of the calibration steps
    recompute. The probe is the largest tensor the shared first segment hands on, the latest
    computed among equals (the first blocks' output)."""
    full, cached = plan.variants[FULL].segments, plan.variants[CACHED].segments
    # only the common prefix runs before the decision; a later common segment needs the region
    shared = [a for a, _ in itertools.takewhile(lambda pair: pair[0] == pair[1], zip(full, cached))]
    handed = {i for name in full if name not in shared for i in plan.segments[name].inputs}
    candidates = [o for name in shared for o in plan.segments[name].outputs if o in handed]
    if not candidates:
        raise PassError("the adaptive schedule needs a tensor computed before the cached region to probe; "
                        "this cut has none")
    order = {n.name: i for i, n in enumerate(plan.graph.graph.nodes)}
    probes: dict[str, list[torch.Tensor]] = {}
    probe_name = None
    for record in calibration.records():
        env = dict(record.inputs)
        with torch.no_grad():
            for name in shared:
                plan._run_segment(name, env, None)
        probe_name = probe_name or max(candidates, key=lambda c: (
            env[c].numel() if isinstance(env[c], torch.Tensor) else -1, order.get(c, -1)))
        probes.setdefault(record.item, []).append(env[probe_name].detach())

    def full_share(threshold: float) -> float:
        shares = []
        for sequence in probes.values():
            reference, skipped, full_count = None, 0, 0
            for probe in sequence:
                change = math.inf if reference is None else \
                    float((probe - reference).abs().mean() / reference.abs().mean().clamp_min(1e-12))
                if change <= threshold and skipped < max_gap - 1:
                    skipped += 1
                else:
                    reference, skipped, full_count = probe, 0, full_count + 1
            shares.append(full_count / len(sequence))
        return float(np.mean(shares))

    low, high = 0.0, 1.0
    while full_share(high) > full_fraction and high < 1e6:
        high *= 2
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (middle, high) if full_share(middle) > full_fraction else (low, middle)
    return {"default": FULL, "steps": [ADAPTIVE], "repeat": True,
            "adaptive": {"probe": probe_name, "threshold": high, "full": FULL, "cached": CACHED,
                         "max_skip": max_gap - 1, "calibrated_full_share": round(full_share(high), 4)}}




# --- per-block schedules (BAC) ----------------------------------------------------------------
def _short_name(stage: str) -> str:
    """down_blocks.1 -> down1, mid_block -> mid, up_blocks.0 -> up0."""
    return "mid" if stage == "mid_block" else stage.replace("_blocks.", "")


def _block_region(dg: DiffusionGraph, blocks: list[Any], name: str, mode: str) -> dict[str, Any]:
    """The blocks' outputs cached raw. Their inputs stay computed (`keep`): skipping this block must
    not skip whatever computes its inputs, which other blocks' schedules decide."""
    members = {n for b in blocks for n in b.nodes}
    outputs = [o for b in blocks for o in b.outputs]
    cuts = [o for o in dict.fromkeys(outputs) if any(u.name not in members for u in _node(dg, o).users)]
    keep = [i for i in dict.fromkeys(i for b in blocks for i in b.inputs) if i not in members]
    if not cuts:
        raise PassError(f"block {blocks[0].name} has no output used after it")
    dead = region_nodes(dg.graph, cuts, keep)
    if not any(n.name in members for n in dead):
        raise PassError(f"caching block {blocks[0].name} would skip nothing: its outputs are needed elsewhere")
    return {"name": name, "cuts": cuts, "mode": mode, "keep": keep}


def _variant_name(combo: frozenset[str], order: list[str]) -> str:
    if len(combo) == len(order):
        return FULL
    if not combo:
        return CACHED
    return "recompute_" + "_".join(n for n in order if n in combo)


def _region_state(plan: Any, name: str) -> list[str]:
    return [o for o in plan.segments[f"cache_{name}"].outputs if o in plan.state]


def _tensors(state: dict[str, Any], names: list[str]) -> list[torch.Tensor]:
    """The cached tensors among `names` (a cut may also be a size, which does not change)."""
    return [state[n].double() for n in names if isinstance(state[n], torch.Tensor)]


def change_profiles(plan: Any, calibration: Any, names: list[str]) -> dict[str, list[float]]:
    """Per block, the relative L1 change of its cached tensors from the previous step to each step,
    averaged over the calibration trajectories (entry 0, which has no previous step, is 0). A step
    whose previous one was not recorded gets the block's mean change."""
    tensors = {name: _region_state(plan, name) for name in names}
    sums: dict[str, dict[int, list[float]]] = {name: {} for name in names}
    previous: dict[tuple[str, int], tuple[int, dict[str, Any]]] = {}
    calls: dict[tuple[str, int], int] = {}
    for record in calibration.records():
        call = calls.get((record.item, record.step), 0)
        calls[(record.item, record.step)] = call + 1
        with torch.no_grad():
            _, state = plan.run(FULL, record.inputs, {})
        last = previous.get((record.item, call))
        if last is not None and last[0] == record.step - 1:
            for name in names:
                now, before = _tensors(state, tensors[name]), _tensors(last[1], tensors[name])
                change = sum(float((a - b).abs().sum()) for a, b in zip(now, before))
                size = sum(float(b.abs().sum()) for b in before)
                sums[name].setdefault(record.step, []).append(change / max(size, 1e-12))
        previous[(record.item, call)] = (record.step, state)
    if not any(sums[name] for name in names):
        raise PassError("schedule='bac' measures each block's change between neighbouring steps, but the calibration "
                        "set records no two neighbouring steps; collect it with timesteps='all'")
    profiles = {}
    for name in names:
        means = {step: float(np.mean(values)) for step, values in sums[name].items()}
        fallback = float(np.mean(list(means.values())))
        profiles[name] = [0.0] + [means.get(step, fallback) for step in range(1, calibration.num_steps)]
    return profiles


def block_consumers(plan: Any, names: list[str]) -> dict[str, set[str] | None]:
    """For each cached block, the blocks whose recomputation reads its outputs, or None when its
    outputs are read whatever the others do (by a segment that always runs, or as the base a
    reused residual is added to)."""
    consumers: dict[str, set[str] | None] = {}
    for name in names:
        outputs = set(plan.segments[f"cache_{name}"].outputs)
        readers: set[str] | None = set()
        for segment in plan.segments.values():
            if segment.name == f"cache_{name}" or not outputs & set(segment.inputs):
                continue
            if segment.name.startswith("cache_") and segment.name[len("cache_"):] in names:
                readers.add(segment.name[len("cache_"):])
            else:
                readers = None
                break
        consumers[name] = readers
    return consumers


def block_feeders(plan: Any, names: list[str]) -> dict[str, set[str]]:
    """For each cached block, the cached blocks whose outputs its computation reads."""
    outputs = {name: set(plan.segments[f"cache_{name}"].outputs) for name in names}
    return {name: {other for other in names if other != name
                   and outputs[other] & set(plan.segments[f"cache_{name}"].inputs)} for name in names}


def bac_steps(changes: dict[str, list[float]], consumers: dict[str, set[str] | None], threshold: float,
              num_steps: int, max_gap: int, allowed: list[frozenset[str]] | None = None,
              costs: dict[str, float] | None = None, feeders: dict[str, set[str]] | None = None) -> list[frozenset[str]]:
    """The blocks recomputed at each step: step 0 computes all; later, a block whose change
    accumulated since it was last computed reaches `threshold` (or that has gone max_gap steps
    without) recomputes, unless only reused blocks read it. With `feeders`, the blocks whose
    outputs a recomputed block reads recompute too (BAC's "bubbling union": a stale input would
    carry its error into the fresh block). With `allowed`, each step's set is replaced by the
    cheapest allowed set containing it."""
    order = list(changes)
    accumulated = {name: 0.0 for name in order}
    since = {name: 0 for name in order}
    schedule: list[frozenset[str]] = []
    for step in range(num_steps):
        chosen: set[str] = set(order)
        if step > 0:
            for name in order:
                accumulated[name] += changes[name][step]
                since[name] += 1
            due = {name for name in order if accumulated[name] >= threshold or since[name] >= max_gap}
            chosen = set()
            for name in reversed(order):
                readers = consumers.get(name)
                if name in due and (readers is None or readers & chosen):
                    chosen.add(name)
            pending = list(chosen)
            while feeders and pending:  # bubbling union: a recomputed block reads fresh inputs
                for feeder in feeders.get(pending.pop(), ()):
                    if feeder not in chosen:
                        chosen.add(feeder)
                        pending.append(feeder)
            if allowed is not None:
                chosen = set(min((combo for combo in allowed if chosen <= combo),
                                 key=lambda combo: (sum((costs or {}).get(n, 1) for n in combo), len(combo))))
        for name in chosen:
            accumulated[name], since[name] = 0.0, 0
        schedule.append(frozenset(chosen))
    return schedule


def bac_schedule(changes: dict[str, list[float]], costs: dict[str, float], consumers: dict[str, set[str] | None],
                 budget: int, num_steps: int, max_gap: int, max_variants: int,
                 feeders: dict[str, set[str]] | None = None) -> tuple[list[frozenset[str]], float]:
    """The per-step block sets for the smallest threshold whose blocks' compute over the loop stays
    within `budget` fully computed steps, with at most `max_variants` distinct sets (the full set
    always among them: the most frequent ones are kept)."""
    everything = frozenset(changes)
    target = budget * sum(costs.values())

    def schedule_for(threshold: float) -> list[frozenset[str]]:
        free = bac_steps(changes, consumers, threshold, num_steps, max_gap, feeders=feeders)
        counts: dict[frozenset[str], int] = {}
        for combo in free:
            counts[combo] = counts.get(combo, 0) + 1
        kept = [everything] + sorted((c for c in counts if c != everything), key=lambda c: -counts[c])[:max_variants - 1]
        if len(counts) <= len(kept):
            return free
        return bac_steps(changes, consumers, threshold, num_steps, max_gap, kept, costs, feeders)

    def cost(schedule: list[frozenset[str]]) -> float:
        return sum(costs[name] for combo in schedule for name in combo)

    if cost(schedule_for(0.0)) <= target:
        return schedule_for(0.0), 0.0
    low, high = 0.0, max(sum(values) for values in changes.values()) + 1.0
    if cost(schedule_for(high)) > target:
        raise PassError(f"recomputing every block at least every max_gap={max_gap} steps costs more than the budget of "
                        f"{budget} full steps over {num_steps}; raise full_steps (or full_fraction) or max_gap")
    for _ in range(50):
        middle = (low + high) / 2
        low, high = (low, middle) if cost(schedule_for(middle)) <= target else (middle, high)
    return schedule_for(high), high
