"""Choosing a format per layer: minimum total sensitivity under a budget (model size or
estimated time), solved exactly as an integer program (a multiple-choice knapsack) with
scipy.optimize.milp, and the Pareto front of size against predicted error."""
from __future__ import annotations

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from ...errors import PassError


def _problem(costs: np.ndarray, allowed: np.ndarray) -> tuple[LinearConstraint, Bounds, np.ndarray]:
    layers, formats = costs.shape
    one_each = np.zeros((layers, layers * formats))
    for layer in range(layers):
        one_each[layer, layer * formats:(layer + 1) * formats] = 1.0
    bounds = Bounds(np.zeros(layers * formats), allowed.reshape(-1).astype(float))
    return LinearConstraint(one_each, 1.0, 1.0), bounds, np.ones(layers * formats)


def _solve(objective: np.ndarray, constraints: list[LinearConstraint], bounds: Bounds, integrality: np.ndarray,
           shape: tuple[int, int]) -> list[int] | None:
    result = milp(objective, constraints=constraints, bounds=bounds, integrality=integrality)
    if result.status != 0 or result.x is None:
        return None
    return [int(i) for i in np.argmax(result.x.reshape(shape), axis=1)]


def place(costs: np.ndarray, weights: np.ndarray, budget: float, allowed: np.ndarray | None = None) -> list[int]:
    """The format index per layer minimising sum(costs) subject to sum(weights) <= budget
    (weights: the budgeted quantity, e.g. bytes). Raises PassError when no choice fits."""
    costs, weights = np.asarray(costs, float), np.asarray(weights, float)
    allowed = np.isfinite(costs) if allowed is None else allowed & np.isfinite(costs)
    if not allowed.any(axis=1).all():
        raise PassError("a layer has no allowed format; allow at least one format per layer")
    minimum = float(np.where(allowed, weights, np.inf).min(axis=1).sum())
    if budget < minimum * (1 - 1e-9):
        raise PassError(f"the budget {budget:,.0f} is below the smallest possible {minimum:,.0f} (every layer in its "
                        "cheapest allowed format); raise the budget or allow smaller formats")
    one_each, bounds, integrality = _problem(costs, allowed)
    within = LinearConstraint(np.where(allowed, weights, 0.0).reshape(1, -1), -np.inf, budget * (1 + 1e-12))
    choice = _solve(np.where(allowed, costs, 0.0).reshape(-1), [one_each, within], bounds, integrality, costs.shape)
    if choice is None:
        raise PassError(f"no placement fits the budget {budget:,.0f}; raise it")
    return choice


def total(matrix: np.ndarray, choice: list[int]) -> float:
    return float(sum(matrix[layer, index] for layer, index in enumerate(choice)))


def pareto_front(costs: np.ndarray, weights: np.ndarray, points: int = 12,
                 allowed: np.ndarray | None = None) -> list[tuple[float, float, list[int]]]:
    """(budget used, total cost, choice) at `points` budgets from the smallest to the largest
    placement, dominated points removed."""
    costs, weights = np.asarray(costs, float), np.asarray(weights, float)
    allowed = np.isfinite(costs) if allowed is None else allowed & np.isfinite(costs)
    low = float(np.where(allowed, weights, np.inf).min(axis=1).sum())
    high = float(np.where(allowed, weights, -np.inf).max(axis=1).sum())
    front: list[tuple[float, float, list[int]]] = []
    for budget in np.linspace(low, high, points):
        choice = place(costs, weights, float(budget), allowed)
        point = (total(weights, choice), total(costs, choice), choice)
        if not any(p[0] <= point[0] and p[1] <= point[1] for p in front):
            front = [p for p in front if not (point[0] <= p[0] and point[1] <= p[1])] + [point]
    return sorted(front, key=lambda p: p[0])


def place_by_size(objective: np.ndarray, sizes: np.ndarray, budget: float, layers: int) -> list[int]:
    """The knapsack over the layers; attention rows (no bytes in any format) take their least
    sensitive format directly, which leaves them unquantized (sensitivity 0), so the solver's
    tolerance cannot trade a tiny predicted error for nothing."""
    return place(objective[:layers], sizes[:layers], budget) + [int(np.argmin(row)) for row in objective[layers:]]
