"""Graph rewrites shared by the passes: constants as buffers, tables read at the call's timestep
(prune's per-range offsets, quant's per-group scales), and for the passes that remove parts of a
graph (prune, moe), dead-code elimination and narrowing a linear to the split pieces still read."""
from __future__ import annotations

import math
import operator

import numpy as np
import torch
import torch.fx
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from ..ir import TIMESTEP, DiffusionGraph
from ..ir.blocks import discover_blocks
from ..ir.fxutil import attr_value, node_shape

aten = torch.ops.aten
_CHUNKS = (aten.chunk.default, aten.split.Tensor, aten.split_with_sizes.default)


def add_constant(dg: DiffusionGraph, name: str, tensor: torch.Tensor) -> torch.fx.Node:
    """A get_attr node (at the graph's insertion point) reading a copy of `tensor`, registered as a
    buffer under `name`, or `name_1`, `name_2`... when that is taken."""
    taken, base, index = set(dict(dg.module.named_buffers())) | set(dict(dg.module.named_parameters())), name, 1
    while name in taken:
        name, index = f"{base}_{index}", index + 1
    dg.module.register_buffer(name, tensor.detach().clone().contiguous())
    node = dg.graph.get_attr(name)
    node.meta["tensor_meta"] = _extract_tensor_metadata(getattr(dg.module, name))
    return node


def timestep_node(dg: DiffusionGraph) -> torch.fx.Node | None:
    """The placeholder of the graph's timestep input, if it has one."""
    placeholders = [n for n in dg.graph.nodes if n.op == "placeholder"]
    return next((node for spec, node in zip(dg.signature.inputs, placeholders) if spec.role == TIMESTEP), None)


def timestep_range_change(dg: DiffusionGraph, name: str, table: torch.Tensor, boundaries: tuple[float, ...],
                          times: torch.fx.Node, dtype: torch.dtype) -> torch.fx.Node:
    """Nodes (at the insertion point) computing sum_k [t > boundaries[k]] * (table[k+1] - table[k])
    for each t of `times` ([N, 1], float32): what row k of `table` ([ranges, D], ranges ascending in
    timestep and split at `boundaries`) adds to row 0 when t lies in range k, shaped [N, D], in ops
    every backend lowers (compare, cast, matmul)."""
    graph = dg.graph
    steps = (table[1:] - table[:-1]).to(dtype)
    bounds = add_constant(dg, f"{name}_timestep_boundaries",
                          torch.tensor(boundaries, dtype=torch.float32, device=dg.device))
    above = graph.call_function(aten._to_copy.default, (graph.call_function(aten.gt.Tensor, (times, bounds)),),
                                {"dtype": dtype})
    return graph.call_function(aten.mm.default, (above, add_constant(dg, f"{name}_steps", steps)))


def eliminate_dead_code(dg: DiffusionGraph) -> None:
    """Erases unused nodes, dropout included (fx keeps it as a random op, but the captured graph
    runs in eval mode, where it is the identity), and the output rows of a linear whose chunks are
    no longer read (see `narrow_dead_chunks`); runtime assertions stay."""
    erase_unused(dg.graph)
    if narrow_dead_chunks(dg):
        erase_unused(dg.graph)
    dg.module = torch.fx.GraphModule(dg.weights(), dg.graph)
    dg.blocks = discover_blocks(dg.module)
    alive = {n.name for n in dg.graph.nodes}
    dg.annotations = {k: v for k, v in dg.annotations.items() if k in alive}


def erase_unused(graph: torch.fx.Graph) -> None:
    for node in reversed(list(graph.nodes)):
        if node.op in ("call_function", "get_attr") and not node.users and \
                not str(getattr(node.target, "__name__", node.target)).startswith("_assert"):
            graph.erase_node(node)


def narrow_dead_chunks(dg: DiffusionGraph) -> bool:
    """A linear whose output is only split along its features, with some pieces no longer read,
    computes just the rows of the pieces still read: adaLN-Zero's modulation linear (DiT, PixArt,
    SD3, FLUX) emits shift, scale and gate for both the attention and the FFN of its block, so
    removing one of them leaves half of that linear's rows dead. Returns whether any changed."""
    changed = False
    for split in [n for n in dg.graph.nodes if n.op == "call_function" and n.target in _CHUNKS]:
        linear = split.args[0]
        pieces = piece_sizes(split)
        if not (isinstance(linear, torch.fx.Node) and linear.target == aten.linear.default and len(linear.users) == 1
                and pieces is not None and all(u.target is operator.getitem for u in split.users)):
            continue
        read = sorted({int(u.args[1]) for u in split.users})
        weight_node, bias_node = linear.args[1], linear.args[2] if len(linear.args) > 2 else None
        if len(read) == len(pieces) or not all(isinstance(a, torch.fx.Node) and a.op == "get_attr"
                                               for a in (weight_node, bias_node) if a is not None):
            continue
        starts = np.cumsum([0, *pieces]).tolist()
        rows = torch.cat([torch.arange(starts[i], starts[i + 1], device=dg.device) for i in read])
        with dg.graph.inserting_before(linear):
            narrowed = [add_constant(dg, f"{linear.name}_live_{kind}", attr_value(dg.module, node.target)[rows])
                        if node is not None else None for kind, node in (("weight", weight_node), ("bias", bias_node))]
        linear.args = (linear.args[0], *[n for n in narrowed if n is not None])
        meta = linear.meta["tensor_meta"]
        linear.meta["tensor_meta"] = meta._replace(shape=torch.Size([*meta.shape[:-1], len(rows)]))
        linear.meta.pop("val", None)
        with dg.graph.inserting_after(split):
            live = dg.graph.call_function(aten.split_with_sizes.default, (linear, [pieces[i] for i in read], -1))
        live.meta.update({k: v for k, v in split.meta.items() if k != "val"})
        for user in list(split.users):
            user.args = (live, read.index(int(user.args[1])))
        changed = True
    return changed


def piece_sizes(split: torch.fx.Node) -> list[int] | None:
    """The sizes of the pieces a chunk/split node cuts its input's last dimension into, or None when
    it cuts another dimension or the size is not static."""
    shape = node_shape(split.args[0])
    dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
    if not shape or dim not in (-1, len(shape) - 1) or not isinstance(shape[-1], int):
        return None
    length, how = shape[-1], split.args[1]
    if split.target == aten.split_with_sizes.default:
        return [int(s) for s in how]
    size = math.ceil(length / how) if split.target == aten.chunk.default else int(how)
    return [min(size, length - start) for start in range(0, length, size)]
