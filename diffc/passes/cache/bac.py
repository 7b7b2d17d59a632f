"""Block-wise Adaptive Caching ("Cache Me if You Can", schedule='bac'): every candidate block of
the cut is its own cached region with its own recompute steps.

The cut chooses the candidate blocks (`auto` / `deep`: the UNet stages below skip depth d,
`encoder`: the encoder stages; `auto` / `blocks`: every DiT block, or the given range,
`first_block`: the blocks after the first; see cuts.block_regions). UNet stages cache their
outputs; a transformer block caches its residual (mode `auto` or `delta`) where an input has its
output's shape, else its output (mode `auto` or `raw`). On calibration data each block's change
profile is measured: the relative L1 change of its cached tensors (raw output, or residual in
delta mode) between neighbouring steps. A block recomputes at a step when its change accumulated
since it was last computed reaches one threshold shared by all blocks (so a block that changes
more recomputes more often), or when it would otherwise go `max_gap` steps without; a block whose
outputs only feed blocks that are reused at that step is not recomputed (its work would be
discarded), and the blocks a recomputed block reads recompute with it (BAC's bubbling union: on
digits-dit, at 7 of 20 steps' compute, final-image PSNR 27.9 dB with it against 25.4 dB without).
The threshold is set by bisection so that the blocks' compute over the loop does not exceed what
`full_steps` (or `full_fraction` of the steps) fully computed steps would spend on them. A step's
variant is the set of blocks it recomputes; at most `max_variants` distinct sets are kept (each
is compiled once, over shared segments), a rarer set being replaced by the cheapest kept set that
contains it. Forecasting extrapolates one region, so `bac` refuses `forecast=True`."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ...errors import PassError
from ...ir import DiffusionGraph
from ...ir.blocks import node_flops
from ...ir.step_plan import CACHED, FULL, Region
from .cuts import segment_flops


def block_variants(dg: DiffusionGraph, regions: list[Region], plan: Any, calibration: Any, budget: int,
                   max_gap: int, max_variants: int) -> tuple[dict[str, list[str]], list[str], dict[str, Any]]:
    """For the block `regions` of `plan` (whose full variant computes every block): the variants
    (the blocks each reuses), the variant of each step and the report's per-block entries."""
    names = [seg[len("cache_"):] for seg in plan.variants[FULL].segments if seg.startswith("cache_")]
    costs = {name: segment_flops(dg, plan.segments[f"cache_{name}"]) for name in names}
    changes = change_profiles(plan, calibration, names)
    chosen, threshold = bac_schedule(changes, costs, block_consumers(plan, names), budget, calibration.num_steps,
                                     max_gap, max_variants, block_feeders(plan, names))
    variant_of = {combo: _variant_name(combo, names) for combo in dict.fromkeys(chosen)}
    variants = {variant: [n for n in names if n not in combo] for combo, variant in variant_of.items()}
    steps = [variant_of[combo] for combo in chosen]
    report = {
        "threshold": round(threshold, 6), "variants": len(variants),
        "block_schedule": {n: [s for s, combo in enumerate(chosen) if n in combo] for n in names},
        "block_mode": {r.name: r.mode for r in regions},
        "block_change_per_step": {n: [round(c, 6) for c in changes[n]] for n in names},
        "block_flops_share": {n: round(costs[n] / max(sum(node_flops(x) for x in dg.graph.nodes), 1), 4)
                              for n in names},
    }
    return variants, steps, report


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
