"""Choosing the units to remove: an exact tree knapsack on additive single-unit scores, and the
measurement of how well those scores add up on random sets (LAPTOP-Diff's additivity)."""
from __future__ import annotations

import math
import random
from typing import Any, Mapping, Sequence

import numpy as np

from ...calibration.batch import CalibrationBatch
from ...errors import PassError
from ...ir import DiffusionGraph
from .compensation import MeanResidual
from .units import Unit, nested, remove_units


def knapsack(units: Sequence[Unit], scores: Sequence[float], weights: Sequence[float], need: float,
             resolution: int = 400) -> list[Unit]:
    """The set of units with the least summed score whose summed weight reaches `need`, never a
    unit together with one nested in it: a min-plus tree knapsack over the nesting forest, weights
    discretised into `resolution` steps of the need (rounded down, so the need is met)."""
    if need <= 0:
        return []
    if sum(weights) < need:
        raise PassError(f"the prunable units hold {sum(weights):.4g} in all, less than the {need:.4g} asked; "
                        "lower amount or allow more kinds of units")
    quantum = need / resolution
    cap = resolution
    index = {u.name: i for i, u in enumerate(units)}
    children: dict[str | None, list[int]] = {}
    for i, unit in enumerate(units):
        children.setdefault(unit.parent if unit.parent in index else None, []).append(i)
    inf = math.inf

    def combine(a: tuple[np.ndarray, list[list[int]]], b: tuple[np.ndarray, list[list[int]]]):
        cost_a, sets_a = a
        cost_b, sets_b = b
        cost = np.full(cap + 1, inf)
        sets: list[list[int]] = [[] for _ in range(cap + 1)]
        for wa in np.nonzero(np.isfinite(cost_a))[0]:
            for wb in np.nonzero(np.isfinite(cost_b))[0]:
                w = min(cap, wa + wb)
                c = cost_a[wa] + cost_b[wb]
                if c < cost[w]:
                    cost[w], sets[w] = c, sets_a[wa] + sets_b[wb]
        return cost, sets

    def empty() -> tuple[np.ndarray, list[list[int]]]:
        cost = np.full(cap + 1, inf)
        cost[0] = 0.0
        return cost, [[] for _ in range(cap + 1)]

    def solve(i: int | None) -> tuple[np.ndarray, list[list[int]]]:
        table = empty()
        for child in children.get(i if i is None else units[i].name, []):
            table = combine(table, solve(child))
        if i is not None:
            w = min(cap, int(weights[i] / quantum))
            if scores[i] < table[0][w]:
                table[0][w], table[1][w] = scores[i], [i]
        return table

    cost, sets = solve(None)
    if not np.isfinite(cost[cap]):
        raise PassError(f"no set of non-nested units removes the {need:.4g} asked; lower amount")
    return [units[i] for i in sorted(sets[cap])]


def additivity(dg: DiffusionGraph, units: Sequence[Unit], scores: Sequence[float], batch: CalibrationBatch,
               count: int, seed: int, steps: set[int] | None = None,
               offsets: Mapping[str, MeanResidual] | None = None) -> dict[str, Any]:
    """Measured error of random sets of non-nested units against the sum of their single scores
    (LAPTOP-Diff's additivity): Pearson correlation and the mean measured / predicted ratio."""
    rng = random.Random(seed)
    predicted, measured = [], []
    flat = list(range(len(units)))
    for _ in range(count):
        size = rng.randint(2, max(2, min(len(flat), 6)))
        chosen: list[int] = []
        for i in rng.sample(flat, len(flat)):
            if len(chosen) == size:
                break
            if not any(nested(units[i], units[j]) for j in chosen):
                chosen.append(i)
        if len(chosen) < 2:
            continue
        pruned = remove_units(dg.clone(), [units[i] for i in chosen], offsets)
        predicted.append(sum(scores[i] for i in chosen))
        measured.append(batch.error(pruned.module, steps))
    if len(predicted) < 3:
        return {"sets": len(predicted)}
    correlation = float(np.corrcoef(predicted, measured)[0, 1]) if np.std(predicted) > 0 and np.std(measured) > 0 \
        else float("nan")
    ratio = float(np.mean([m / p for m, p in zip(measured, predicted) if p > 0]))
    return {"sets": len(predicted), "pearson": round(correlation, 4), "measured_over_predicted": round(ratio, 4)}
