"""The quant pass's final-image floor: how many of the most sensitive quantized layers move to the
next precision so that the sampled images stay within `min_psnr` of the original's: static int8
layers first to int8 with dynamic activation scales (where the backend runs them), then layers
back to full precision.

The placement is predicted from per-call sensitivities; what users see is the final image of
their sampler, where per-step errors add up and guidance amplifies the difference between the
conditional and unconditional rows. So the placement is re-sampled with the candidate in the loop
(the live pipeline or the sampling loop identified from recorded calls) and, when it misses the
floor, the layers with the largest predicted error move up, the fewest that meet it (bisection
over the shares, verified on held-out trajectories: _search.search_grid). Under a size budget
they move up within it (BudgetedRaise): barred from their format and anything narrower, while the
other layers are placed again in what is left, so the floor never costs the size the user set."""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ...calibration import resampling
from ...errors import PassError
from ...ir import DiffusionGraph
from ...ir.precision import BF16, FORMATS, FP8, FP16, INT4, INT8, ActivationQuant, spec_with
from .._search import search_grid
from ..base import PassContext
from .annotate import annotate
from .placement import place
from .rounding import FourBitRounding

# shares of the quantized layers (most sensitive first) kept at full precision, tried in turn;
# keeping them all is the fallback, where the pass changes nothing
KEEP_SHARES = (0.0, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75)
KEPT_REASON = "kept at full precision: quantizing it broke the final-image floor (min_psnr)"
# shares of the static int8 layers (most sensitive first) given dynamic activation scales; all of
# them is a choice too: it keeps the size of int8
DYNAMIC_SHARES = (0.0, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0)
DYNAMIC_REASON = "int8 with dynamic activation scales: static scales broke the final-image floor (min_psnr)"
RAISED_REASON = ("raised to a wider format within the size budget: its format broke the final-image floor "
                 "(min_psnr)")
FULL_PRECISION = None  # a BudgetedRaise placement's entry for a layer left unquantized


def drop_precision(annotations: dict[str, dict[str, Any]], nodes: list[str]) -> dict[str, dict[str, Any]]:
    """`annotations` without the precision specs of `nodes` (they run at full precision)."""
    dropped = set(nodes)
    kept = {node: {key: value for key, value in entry.items() if not (key == "precision" and node in dropped)}
            for node, entry in annotations.items()}
    return {node: entry for node, entry in kept.items() if entry}


def without_precision(dg: DiffusionGraph, nodes: list[str]) -> DiffusionGraph:
    candidate = dg.clone()
    candidate.annotations = drop_precision(candidate.annotations, nodes)
    return candidate


def with_dynamic_scales(dg: DiffusionGraph, nodes: list[str],
                        activations: dict[str, ActivationQuant]) -> DiffusionGraph:
    """A copy of `dg` whose `nodes` run int8 with the run-time activation quantization of
    `activations` instead of their static scales."""
    candidate = dg.clone()
    for node in nodes:
        spec = spec_with("int8_dynamic", activations[node], DYNAMIC_REASON)
        candidate.annotations.setdefault(node, {})["precision"] = spec.to_json()
    return candidate


def most_sensitive(ranked: list[str], share: float) -> list[str]:
    """The first `share` of `ranked` (most sensitive first), rounded up."""
    return ranked[:math.ceil(share * len(ranked))]


def keep_for_floor(dg: DiffusionGraph, ctx: PassContext, ranked: list[str], min_psnr: float,
                   change: Callable[[DiffusionGraph, list[str]], DiffusionGraph] = without_precision,
                   shares: tuple[float, ...] = KEEP_SHARES,
                   knob: str = "kept_share",
                   infeasible: tuple[type[Exception], ...] = ()) -> tuple[list[str] | None, dict[str, Any]]:
    """The most sensitive nodes of `ranked` (most sensitive first) that `change` (by default: to
    full precision) must move so that the re-sampled final images keep `min_psnr` on the held-out
    trajectories, the fewest of `shares`; None when even the largest share misses it. Callers
    check _search.unjudgeable first."""
    with warnings.catch_warnings():
        # search_grid's own "stays at the safest value" warning is the caller's to say, with the why
        warnings.filterwarnings("ignore", message=f"{knob}: ")
        share, searched = search_grid(
            shares, lambda value: change(dg, most_sensitive(ranked, value)), ctx, knob=knob,
            offline_error=lambda candidate: math.inf, min_psnr=min_psnr, max_relative_error=None,
            quality_rises=True, fallback=math.inf, optimistic=True, infeasible=infeasible, tail_aware=True)
    check = {"min_psnr": min_psnr, "judged_on": resampling(ctx.calibration), "search": searched}
    if not math.isfinite(share):
        return None, check
    return most_sensitive(ranked, share), {**check, knob: share}


WEIGHT_BITS = {INT4: 4, INT8: 8, FP8: 8, BF16: 16, FP16: 16}


def _weight_bits(format_name: str | None) -> int:
    weight = FORMATS[format_name].weight if format_name is not None else None
    return 32 if weight is None else WEIGHT_BITS[weight]


@dataclass
class BudgetedRaise:
    """The floor's back-off under a size budget. The nodes moved up (most sensitive first) may take
    only formats with wider weights than their own, or full precision; every other layer is placed
    again by the same integer program in the bytes left, so the total stays within `budget`.
    `placement` raises PassError where the moved layers alone do not fit.

    `layers`: the placeable layer nodes in the rows of `objective` / `sizes` (layers x `formats`);
    `full_bytes`: each one's weight bytes unquantized; `placed`: every quantized node's format
    (attention nodes too: moved, they run unquantized at no size); `dynamic`: the run-time
    activation quantization int8 layers take instead of their static scales (those the floor's
    dynamic step already gave it); `rounding`: the error-compensated 4-bit weights, carried by the
    layers the placement leaves in a 4-bit format."""

    layers: list[str]
    formats: tuple[str, ...]
    objective: np.ndarray
    sizes: np.ndarray
    full_bytes: np.ndarray
    budget: float
    placed: dict[str, str]
    activations: dict[str, dict[str, ActivationQuant]]
    dynamic: dict[str, ActivationQuant]
    rule: str  # the reason the other layers' specs give
    rounding: FourBitRounding = field(default_factory=FourBitRounding)

    def placement(self, moved: list[str]) -> dict[str, str | None]:
        raised = set(moved)
        columns = [*self.formats, FULL_PRECISION]
        objective = np.hstack([self.objective, np.zeros((len(self.layers), 1))])
        sizes = np.hstack([self.sizes, self.full_bytes.reshape(-1, 1)])
        allowed = np.array([[(name is not FULL_PRECISION or node in raised)
                             and (node not in raised or _weight_bits(name) > _weight_bits(self.placed.get(node)))
                             for name in columns] for node in self.layers], bool)
        choice = place(objective, sizes, self.budget, allowed)
        layers = {node: columns[index] for node, index in zip(self.layers, choice)}
        return {**layers, **{node: FULL_PRECISION for node in raised if node not in layers}}

    def feasible(self, ranked: list[str], shares: tuple[float, ...]) -> tuple[float, ...]:
        """The shares whose moved layers fit in the budget (the bisection assumes that every
        larger share passes where a smaller one does; one that cannot be placed would break that)."""
        def fits(share: float) -> bool:
            try:
                self.placement(most_sensitive(ranked, share))
            except PassError:
                return False
            return True

        return tuple(share for share in shares if fits(share))

    def apply(self, dg: DiffusionGraph, moved: list[str]) -> DiffusionGraph:
        """A copy of `dg` annotated with the placement that raises `moved`."""
        return self.annotated(dg, moved, self.placement(moved))

    def annotated(self, dg: DiffusionGraph, moved: list[str], placement: dict[str, str | None]) -> DiffusionGraph:
        """A copy of `dg` annotated with `placement` (the one that raises `moved`)."""
        candidate = without_precision(dg, [node for node, name in placement.items() if name is FULL_PRECISION])
        converted = self._converted(placement)
        static = {node: name for node, name in placement.items()
                  if name is not FULL_PRECISION and node not in converted}
        annotate(candidate, static, self.activations, {node: RAISED_REASON if node in moved else self.rule
                                                       for node in static})
        return self.rounding.apply(with_dynamic_scales(candidate, converted, self.dynamic) if converted else candidate)

    def written(self, placement: dict[str, str | None]) -> dict[str, str | None]:
        """Each node's format as `annotated` writes `placement` (int8 given run-time scales reads
        int8_dynamic)."""
        converted = set(self._converted(placement))
        return {node: "int8_dynamic" if node in converted else name for node, name in placement.items()}

    def _converted(self, placement: dict[str, str | None]) -> list[str]:
        """The int8 nodes of `placement` that take run-time scales instead of their static ones."""
        return [node for node, name in placement.items() if name == "int8" and node in self.dynamic]


def raise_within_budget(dg: DiffusionGraph, ctx: PassContext, ranked: list[str], min_psnr: float,
                        within: BudgetedRaise) -> tuple[list[str] | None, dict[str, Any]]:
    """keep_for_floor's search with `within` moving the nodes: on success `dg` takes the placement
    found and the nodes it leaves unquantized are returned; None when no share fits and passes.
    Where some weights are narrower than 8 bits, only those move (most sensitive first): an 8-bit
    layer moves to 16 bits, twice its bytes again, which a budget near the 4-bit size rarely holds."""
    narrow = [node for node in ranked if _weight_bits(within.placed.get(node)) < 8]
    ranked = narrow or ranked
    moved, check = keep_for_floor(dg, ctx, ranked, min_psnr, change=within.apply,
                                  shares=within.feasible(ranked, KEEP_SHARES), knob="raised_share",
                                  infeasible=(PassError,))
    if moved is None:
        return None, {**check, "within_size_budget": within.budget}
    placement = within.placement(moved)
    dg.annotations = within.annotated(dg, moved, placement).annotations
    written = within.written(placement)
    changed = {node: {"from": within.placed.get(node), "to": name} for node, name in written.items()
               if name != within.placed.get(node)}
    return [node for node, name in written.items() if name is FULL_PRECISION], {
        **check, "raised": moved, "raised_within_budget": changed}
