"""Removable residual units (resnets, attentions, transformer blocks, FFNs, stages) and their
removal: each unit's output rewired to its residual input, plus its mean residual where it has one."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.fx

from ...errors import PassError
from ...ir import DiffusionGraph
from ...ir.blocks import ATTENTION, FFN, RESNET, STAGE, TRANSFORMER_BLOCK
from ...ir.fxutil import node_shape
from ..rewrites import eliminate_dead_code
from .compensation import MeanResidual, add_offset
from .costs import Roofline, graph_flops

UNIT_KINDS = (RESNET, ATTENTION, TRANSFORMER_BLOCK, FFN, STAGE)


@dataclass
class Unit:
    """A removable residual unit: every use of `out` is rewired to `skip`."""

    name: str
    kind: str
    out: str
    skip: str
    parent: str | None
    params: int = 0
    flops: int = 0
    latency: float = 0.0


def residual_units(dg: DiffusionGraph, kinds: Sequence[str] = UNIT_KINDS,
                   roofline: Roofline | None = None) -> list[Unit]:
    """The blocks that can be removed by rewiring a residual: attention/FFN branches added to the
    stream by their parent (output add -> its other operand), transformer blocks, resnets and
    stages whose output has the shape of an input (output -> that input), and resnets with a
    projected shortcut (residual add -> shortcut)."""
    nodes = {n.name: n for n in dg.graph.nodes}
    units: list[Unit] = []
    for block in dg.blocks:
        if block.kind not in kinds or block.residual is None:
            continue
        residual = block.residual
        if residual.in_parent:
            out, skip = residual.add, residual.skip
        elif block.identity_input is not None and len(block.outputs) == 1:
            out, skip = block.outputs[0], block.identity_input
        else:
            out, skip = residual.add, residual.skip
        if node_shape(nodes.get(out)) is None or node_shape(nodes.get(out)) != node_shape(nodes.get(skip)):
            continue
        units.append(Unit(block.name, block.kind, out, skip, None))
    # a block whose removal rewires the same node to the same input as an enclosing one is the same removal
    units = [u for u in units if not any(nested(u, v) and len(v.name) < len(u.name)
                                         and (v.out, v.skip) == (u.out, u.skip) for v in units)]
    names = [u.name for u in units]
    for unit in units:
        unit.parent = max((p for p in names if unit.name.startswith(p + ".")), key=len, default=None)
    total_params, total_flops = dg.num_parameters(), graph_flops(dg)
    total_latency = roofline.graph_seconds(dg) if roofline is not None else 0.0
    for unit in units:
        pruned = remove_units(dg.clone(), [unit])
        unit.params = total_params - pruned.num_parameters()
        unit.flops = total_flops - graph_flops(pruned)
        if roofline is not None:
            unit.latency = total_latency - roofline.graph_seconds(pruned)
    return units


def remove_units(dg: DiffusionGraph, units: Sequence[Unit],
                 offsets: Mapping[str, MeanResidual] | None = None) -> DiffusionGraph:
    """Rewires each unit's output to its residual input, plus the unit's entry in `offsets` (its
    mean residual, see `mean_residuals`) where it has one; removes what became dead and rebuilds
    the block table; `dg` is changed in place and returned."""
    if not units:
        return dg
    offsets = offsets or {}
    nodes = {n.name: n for n in dg.graph.nodes}
    order = {n: i for i, n in enumerate(dg.graph.nodes)}
    missing = [u.name for u in units if u.out not in nodes or u.skip not in nodes]
    if missing:
        raise PassError(f"units {missing} are not in this graph; score units on the graph you prune")
    replaced: dict[torch.fx.Node, torch.fx.Node] = {}
    for unit in sorted(units, key=lambda u: order[nodes[u.out]]):
        out, skip = nodes[unit.out], nodes[unit.skip]
        while skip in replaced:
            skip = replaced[skip]
        if unit.name in offsets:
            skip = add_offset(dg, out, skip, f"{region(unit)}_mean_residual", offsets[unit.name])
        out.replace_all_uses_with(skip)
        replaced[out] = skip
    eliminate_dead_code(dg)
    return dg


def region(unit: Unit) -> str:
    """Segment names (cache_<region>) become module attribute names in backends: no dots."""
    return unit.name.replace(".", "_")


def nested(a: Unit, b: Unit) -> bool:
    return a.name.startswith(b.name + ".") or b.name.startswith(a.name + ".")
