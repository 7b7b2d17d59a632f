"""Compensation of removed units: the per-channel mean of what a unit adds to the residual stream
on the calibration calls (`mean_residuals`), per range of timesteps, and the nodes that add it in
the unit's place (`add_offset`), picking each sample's timestep range at run time."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
import torch.fx

from ...calibration.batch import CalibrationBatch, step_ranges
from ...calibration.statistics import Observer
from ...ir import DiffusionGraph
from ...ir.fxutil import node_shape
from ..rewrites import add_constant, timestep_node, timestep_range_change

if TYPE_CHECKING:
    from .units import Unit

aten = torch.ops.aten


@dataclass(frozen=True)
class MeanResidual:
    """What replaces a removed unit: `table[k]` is its mean residual over the calibration calls whose
    timestep lies in range k (ascending timesteps; ranges split at `boundaries`), one row when the
    mean is not split by timestep."""

    table: torch.Tensor
    boundaries: tuple[float, ...] = ()

    def numel(self) -> int:
        return self.table.numel() + len(self.boundaries)


def mean_residuals(dg: DiffusionGraph, units: Sequence[Unit], batch: CalibrationBatch,
                   ranges: int = 1) -> dict[str, MeanResidual]:
    """Per unit: the mean of what it adds to its residual input (output - skip) on the calibration
    calls, the constant that best replaces the removed unit in the mean squared sense (the
    closed-form bias compensation of pruning without training), taken separately over `ranges`
    ranges of steps, whose timesteps then pick it at run time: what a unit adds drifts with the
    noise level. The mean runs over the batch and every dimension the graph keeps symbolic
    (resolution, sequence length), so it broadcasts at every shape the graph accepts. One range
    when the graph has no timestep input or the calibrated ranges' timesteps overlap."""
    spans = step_ranges(batch.num_steps, ranges)
    masks = [batch.step_mask(set(range(a, b))) for a, b in spans]
    masks = [m for m in masks if bool(m.any())]
    times = batch.row_timesteps
    if len(masks) > 1 and times is not None:
        bounds = sorted(((float(times[m].min()), float(times[m].max()), m) for m in masks), key=lambda b: b[:2])
        if all(low_next > high for (_, high, _), (low_next, _, _) in zip(bounds, bounds[1:])):
            tables = [_masked_mean_residuals(dg, units, batch, m) for _, _, m in bounds]
            boundaries = tuple((high + low_next) / 2 for (_, high, _), (low_next, _, _) in zip(bounds, bounds[1:]))
            return {u.name: MeanResidual(torch.stack([t[u.name] for t in tables]), boundaries) for u in units}
    everything = torch.ones(len(batch.row_steps), dtype=torch.bool, device="cpu")
    return {name: MeanResidual(mean[None]) for name, mean in _masked_mean_residuals(dg, units, batch, everything).items()}


def _masked_mean_residuals(dg: DiffusionGraph, units: Sequence[Unit], batch: CalibrationBatch,
                           mask: torch.Tensor) -> dict[str, torch.Tensor]:
    watch = {u.out for u in units} | {u.skip for u in units}
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    seen: dict[str, torch.Tensor] = {}
    nodes = {n.name: n for n in dg.graph.nodes}
    dims = {u.name: _reduced_dims(nodes[u.out]) for u in units}
    for flat in batch.calls(mask):
        seen.clear()
        with torch.no_grad():
            Observer(dg.module, watch, lambda n, v: seen.__setitem__(n, v.detach())).run(*flat)
        for unit in units:
            delta = (seen[unit.out] - seen[unit.skip]).double()
            rows = math.prod(delta.shape[d] for d in dims[unit.name])
            total = delta.sum(dim=dims[unit.name], keepdim=True)[0]
            sums[unit.name] = sums.get(unit.name, 0) + total
            counts[unit.name] = counts.get(unit.name, 0) + rows
    return {name: (total / counts[name]).float() for name, total in sums.items()}


def _reduced_dims(node: torch.fx.Node) -> tuple[int, ...]:
    """Every dimension but the channels (dim 1 of a 4-d feature map, the last of a token sequence)."""
    rank = len(node_shape(node))
    channel = 1 if rank == 4 else rank - 1
    return tuple(d for d in range(rank) if d != channel)


def add_offset(dg: DiffusionGraph, out: torch.fx.Node, skip: torch.fx.Node, name: str,
               offset: MeanResidual) -> torch.fx.Node:
    """A new node skip + offset, placed before `out`: the offset a constant broadcast against `out`,
    or with timestep ranges, the row of the range each sample's timestep falls in."""
    dtype = out.meta["tensor_meta"].dtype
    with dg.graph.inserting_before(out):
        constant = add_constant(dg, name, offset.table[0].to(dtype))
        timestep = timestep_node(dg) if len(offset.table) > 1 else None
        if timestep is not None:
            constant = _per_timestep_offset(dg, name, offset, timestep, constant, dtype)
        shifted = dg.graph.create_node("call_function", aten.add.Tensor, (skip, constant), name=f"{name}_added")
    shifted.meta.update({k: v for k, v in out.meta.items() if k in ("tensor_meta", "val", "nn_module_stack")})
    return shifted


def _per_timestep_offset(dg: DiffusionGraph, name: str, offset: MeanResidual, timestep: torch.fx.Node,
                         first: torch.fx.Node, dtype: torch.dtype) -> torch.fx.Node:
    """first + the table row's change from row 0 at each sample's timestep range, shaped
    [batch, *offset] so it broadcasts against the unit's output."""
    shape = list(offset.table.shape[1:])
    times = dg.graph.call_function(aten.reshape.default,
                                   (dg.graph.call_function(aten._to_copy.default, (timestep,), {"dtype": torch.float32}),
                                    [-1, 1]))
    shift = timestep_range_change(dg, name, offset.table.reshape(len(offset.table), -1), offset.boundaries, times,
                                  dtype)
    return dg.graph.call_function(aten.add.Tensor, (first, dg.graph.call_function(aten.reshape.default,
                                                                                  (shift, [-1, *shape]))))
