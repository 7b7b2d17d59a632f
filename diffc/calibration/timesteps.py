"""Which steps of a denoising trajectory to record, and how steps are grouped for statistics."""
from __future__ import annotations

import numpy as np
from scipy.stats import norm

from ..errors import DiffcError

STRATEGIES = ("all", "uniform:K", "normal:K[:CENTER]", "groups:G", "steps:I,J,...")


def select_steps(num_steps: int, spec: str = "all") -> list[int]:
    """Step indices (0 = the noisiest step) to record out of `num_steps`.

    all: every step. uniform:K: K steps spread evenly over the trajectory (Q-Diffusion).
    normal:K[:CENTER]: K steps at the quantiles of a normal distribution over the trajectory centred at
    CENTER (a fraction, default 0.75, i.e. skewed towards the low-noise end; PTQ4DM). groups:G: the
    middle step of each of G equal step groups. steps:I,J: exactly those steps."""
    if num_steps < 1:
        raise DiffcError(f"num_steps must be >= 1, got {num_steps}")
    kind, _, arg = spec.partition(":")
    try:
        if kind == "all" and not arg:
            return list(range(num_steps))
        if kind == "uniform":
            k = _count(arg, num_steps)
            return sorted({int(round(x)) for x in np.linspace(0, num_steps - 1, k)})
        if kind == "normal":
            count, _, center = arg.partition(":")
            k = _count(count, num_steps)
            mid = float(center) if center else 0.75
            quantiles = norm.ppf((np.arange(k) + 0.5) / k, loc=mid, scale=0.25)
            wanted = np.clip(np.round(quantiles * (num_steps - 1)), 0, num_steps - 1).astype(int)
            return _spread_unique(wanted.tolist(), num_steps)
        if kind == "groups":
            g = _count(arg, num_steps)
            return sorted({(2 * i + 1) * num_steps // (2 * g) for i in range(g)})
        if kind == "steps":
            steps = sorted({int(s) for s in arg.split(",") if s.strip()})
            if not steps or steps[0] < 0 or steps[-1] >= num_steps:
                raise ValueError(f"steps must lie in 0..{num_steps - 1}")
            return steps
    except ValueError as exc:
        raise DiffcError(f"bad timestep selection {spec!r}: {exc}. Strategies: {', '.join(STRATEGIES)}") from exc
    raise DiffcError(f"unknown timestep selection {spec!r}; strategies: {', '.join(STRATEGIES)}")


def _count(text: str, num_steps: int) -> int:
    k = int(text)
    if not 1 <= k <= num_steps:
        raise ValueError(f"the count must be in 1..{num_steps}, got {k}")
    return k


def _spread_unique(wanted: list[int], num_steps: int) -> list[int]:
    """Distinct steps, each as close as possible to the wanted one."""
    chosen: set[int] = set()
    for step in wanted:
        for offset in range(num_steps):
            for candidate in (step - offset, step + offset):
                if 0 <= candidate < num_steps and candidate not in chosen:
                    chosen.add(candidate)
                    break
            else:
                continue
            break
    return sorted(chosen)


def step_group(step: int, num_steps: int, groups: int) -> int:
    """The timestep group (0 = noisiest) of a step when the trajectory is cut into `groups` equal parts."""
    return min(step * groups // max(num_steps, 1), groups - 1)
