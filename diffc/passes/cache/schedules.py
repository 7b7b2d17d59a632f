"""When the cache pass's variants run: schedules of full steps, and the errors they are chosen by.

Schedules: `uniform` (every `interval` steps), `nonuniform` (full steps denser at the start and
the end), `dp` (CacheQuant-style dynamic programming over steps on calibration data, minimising
the error that reaches the final output for a budget of full steps: each step's reuse error is
weighted by how strongly an output error at that step propagates through the sampler), `adaptive` (decided at run time: recompute when the
tensor entering the cached region moved more than a threshold since the last full step, as in
TeaCache / first-block cache, predicted one step ahead so that the decision reads nothing back from
the device within a step (ir.plan.adaptive_step); the threshold is calibrated, by the same rule,
so that about `full_fraction` of the calibration steps recompute), `bac` (per-block schedules, see bac.py)."""
from __future__ import annotations

import itertools
import math
from typing import Any, Callable

import numpy as np
import torch

from ...calibration import propagation_weights, relative_error
from ...errors import PassError
from ...ir.plan import adaptive_step
from ...ir.step_plan import ADAPTIVE, CACHED, FULL, Schedule

SCHEDULES = ("dp", "uniform", "nonuniform", "adaptive", "bac")


def dp_schedule(plan: Any, calibration: Any, num_steps: int, budget: int, max_gap: int, refine: int,
                cached_variant: Any, fixed: bool | None,
                final_error: Callable[[set[int], bool], float] | None,
                reference: Any = None, warmup: int = 0) -> tuple[set[int], list[dict[str, Any]], bool]:
    """Full steps by dynamic programming on the per-step reuse errors. Each error is weighted
    by how strongly an output error at its step propagates to the final output, and the DP is
    solved for each gap limit up to max_gap; with the live pipeline (`final_error` of a schedule's
    full steps and forecasting), the candidate (evenly spaced full steps among them) whose
    re-sampled calibration trajectories end closest to the recorded ones wins (with and without
    forecasting, unless `fixed` fixes it), and is refined by moving single full steps while that
    lowers the error. `reference` (the unmodified denoiser) re-runs an identified loop to measure
    the propagation when there is no pipeline. The first `warmup` steps are never cached. Returns
    the full steps, the scored candidates and whether to forecast."""
    errors = {(i, j): e for (i, j), e in reuse_errors(plan, calibration, max_gap, cached_variant).items()
              if j >= warmup}
    weights = propagation_weights(calibration, denoiser=reference)
    weightings = [errors] if weights is None else \
        [{(i, j): e * weights[j] for (i, j), e in errors.items()}, errors]
    candidates: list[set[int]] = []
    for weighted in weightings:
        for gap in range(2, max_gap + 1):
            try:
                full = dp_full_steps(weighted, num_steps, budget, gap)
            except PassError:
                continue
            if full not in candidates:
                candidates.append(full)
    if not candidates:
        return dp_full_steps(errors, num_steps, budget, max_gap), [], False  # raises with the reason
    if final_error is None:
        return candidates[0], [], bool(fixed)
    even = {round(i * num_steps / budget) for i in range(budget)}
    if even not in candidates and _within_gap(even, num_steps, max_gap) and set(range(warmup)) <= even:
        candidates.append(even)
    modes = (False, True) if fixed is None else (fixed,)
    scored = [(final_error(full, mode), sorted(full), mode) for full in candidates for mode in modes]
    best_error, best, forecast = min(scored)
    report = [{"full_steps": f, "forecast": m, "final_mse": round(e, 8)} for e, f, m in scored]
    refined, refined_error = refine_full_steps(set(best), best_error, lambda full: final_error(full, forecast),
                                               num_steps, max_gap, refine, warmup)
    if refined != set(best):
        report.append({"full_steps": sorted(refined), "forecast": forecast, "final_mse": round(refined_error, 8),
                       "refined": True})
    return refined, report, forecast


def nonuniform_full_steps(num_steps: int, budget: int) -> set[int]:
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
    (teacher-forced: recorded inputs of step j, cache from the full run at step i by the same call
    of the step, so that a loop calling each guidance branch separately reuses each branch's own)."""
    sums: dict[tuple[int, int], list[float]] = {}
    by_item: dict[str, list[Any]] = {}
    for record in calibration.records():
        by_item.setdefault(record.item, []).append(record)
    for records in by_item.values():
        records.sort(key=lambda r: (r.step, r.call))
        states: dict[tuple[int, int], dict[str, Any]] = {}
        for record in records:
            with torch.no_grad():
                _, states[record.step, record.call] = plan.run(FULL, record.inputs, {})
        for record in records:
            reference = record.output.double()
            for i in range(max(0, record.step - max_gap), record.step):
                if (i, record.call) not in states:
                    continue
                variant = cached_variant(record.step, record.num_steps)
                with torch.no_grad():
                    out, _ = plan.run(variant, record.inputs, states[i, record.call])
                error = float((out[0].double() - reference).pow(2).mean())
                sums.setdefault((i, record.step), []).append(error)
    return {k: float(np.mean(v)) for k, v in sums.items()}


def warmup_steps(share: float, num_steps: int) -> int:
    """How many first steps a warm-up `share` keeps in full."""
    return math.ceil(share * num_steps)


def _within_gap(full: set[int], num_steps: int, max_gap: int) -> bool:
    marks = sorted(full) + [num_steps]
    return 0 in full and all(b - a <= max_gap for a, b in zip(marks, marks[1:]))


def refine_full_steps(full: set[int], error: float, final_error: Callable[[set[int]], float], num_steps: int,
                      max_gap: int, evaluations: int, warmup: int = 0) -> tuple[set[int], float]:
    """First-improvement local search: move one full step (never step 0 nor one of the first
    `warmup`) to a neighbouring cached step while the final error falls, within `evaluations`
    re-runs of the trajectories."""
    improved = True
    while improved and evaluations > 0:
        improved = False
        for step in sorted(full - set(range(max(1, warmup)))):
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
    cache carried from step to step as at run time (teacher-forced inputs), each call of a step
    carrying its own."""
    per_step: dict[int, list[float]] = {}
    states: dict[int, dict[str, Any]] = {}
    last_item = None
    for record in calibration.records():
        if record.item != last_item:
            states, last_item = {}, record.item
        variant = plan.schedule.variant_for(record.step, record.num_steps)
        with torch.no_grad():
            out, states[record.call] = plan.run(variant, record.inputs, states.get(record.call, {}))
        per_step.setdefault(record.step, []).append(relative_error(out[0], record.output))
    return [float(np.mean(per_step[s])) for s in sorted(per_step)]


def adaptive_schedule(plan: Any, calibration: Any, full_fraction: float, max_gap: int) -> Schedule:
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
                plan.run_segment(name, env, None)
        probe_name = probe_name or max(candidates, key=lambda c: (
            env[c].numel() if isinstance(env[c], torch.Tensor) else -1, order.get(c, -1)))
        probes.setdefault(record.item, []).append(env[probe_name].detach())

    def full_share(threshold: float) -> float:
        shares = []
        for sequence in probes.values():
            state: dict[str, Any] = {}
            full_count = 0
            for probe in sequence:
                reuse, update = adaptive_step(state, probe, threshold, max_gap - 1)
                state.update(update)
                full_count += not reuse
            shares.append(full_count / len(sequence))
        return float(np.mean(shares))

    low, high = 0.0, 1.0
    while full_share(high) > full_fraction and high < 1e6:
        high *= 2
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (middle, high) if full_share(middle) > full_fraction else (low, middle)
    return Schedule(FULL, (ADAPTIVE,), repeat=True,
                    adaptive={"probe": probe_name, "threshold": high, "full": FULL, "cached": CACHED,
                              "max_skip": max_gap - 1, "calibrated_full_share": round(full_share(high), 4)})
