"""Per-token routing: expert choice with a static capacity. A least-squares router per FFN scores
each routed expert per token (`fit_router`), and each expert runs on the `capacity` tokens of
each sample it scores highest (`route_tokens`), so every shape depends on the capacity only."""
from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx

from ...ir import DiffusionGraph
from ...ir.fxutil import node_shape
from .experts import ConvertedFFN

aten = torch.ops.aten


def fit_router(x: torch.Tensor, outputs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of a linear router whose score for each routed expert predicts the norm of
    that expert's output contribution on a token: least squares on calibration tokens."""
    design = torch.cat([x.double(), torch.ones(x.shape[0], 1, dtype=torch.double, device=x.device)], dim=1)
    target = torch.stack([o.double().norm(dim=1) for o in outputs], dim=1)
    solution = torch.linalg.lstsq(design, target).solution
    return solution[:-1].T.float().contiguous(), solution[-1].float().contiguous()


def static_tokens(x: torch.fx.Node) -> bool:
    shape = x.meta["val"].shape if "val" in x.meta else node_shape(x)
    return len(shape) == 3 and isinstance(shape[1], int)


def expert_capacity(item: ConvertedFFN, active: float) -> int:
    """Tokens each routed expert processes per sample: the routed share that leaves `active` of
    the FFN's hidden neurons on per token on average, the shared (head) expert always on."""
    routed = sum(item.sizes[1:])
    share = min(1.0, max(0.0, (active * item.width - item.sizes[0]) / max(routed, 1)))
    return max(1, math.ceil(share * item.tokens))


def route_tokens(dg: DiffusionGraph, item: ConvertedFFN, weight: torch.Tensor, bias: torch.Tensor,
                 capacity: int) -> None:
    """Rewrites each routed expert of a converted FFN (in place) to process only the `capacity`
    tokens of each sample its router scores highest: scores = x W^T + b, idx = topk(score_e),
    the expert runs on gather(x, idx) and its outputs are scatter-added into the chain at idx.
    Shapes depend on the capacity only, never on the data, so every backend runs it."""
    graph = dg.graph
    nodes = {n.name: n for n in graph.nodes}
    prefix = item.block.replace(".", "_") + "_router"
    for suffix, value in (("weight", weight), ("bias", bias)):
        dg.module.register_buffer(f"{prefix}_{suffix}", value.detach().clone())
    first = nodes[item.chain[0]]
    x = _expert_input(first)
    channels = node_shape(x)[-1]
    with graph.inserting_after(x):
        w = graph.get_attr(f"{prefix}_weight")
    with graph.inserting_after(w):
        b = graph.get_attr(f"{prefix}_bias")
    with graph.inserting_after(b):
        scores = graph.call_function(aten.linear.default, (x, w, b))
    for expert in range(len(item.chain) - 1):
        cut = nodes[item.chain[expert + 1]]
        acc, out = cut.args
        ups = _expert_inputs_of(out, x)
        with graph.inserting_before(min(ups, key=_position(graph))):
            score = graph.call_function(aten.select.int, (scores, -1, expert))
            top = graph.call_function(aten.topk.default, (score, capacity, 1))
            index = graph.call_function(operator.getitem, (top, 1))
            column = graph.call_function(aten.unsqueeze.default, (index, -1))
            gathered = graph.call_function(aten.gather.default,
                                           (x, 1, graph.call_function(aten.expand.default, (column, [-1, capacity,
                                                                                                       channels]))))
        for up in ups:
            up.args = (gathered, *up.args[1:])
        with graph.inserting_before(cut):
            spread = graph.call_function(aten.expand.default, (column, [-1, capacity, node_shape(cut)[-1]]))
            added = graph.call_function(aten.scatter_add.default, (acc, 1, spread, out))
        cut.replace_all_uses_with(added)


def _expert_input(head_out: torch.fx.Node) -> torch.fx.Node:
    """The FFN input x: the input of the head expert's first linear."""
    node = head_out
    while True:
        node = node.args[0]
        if node.target == aten.linear.default:
            return node.args[0]


def _expert_inputs_of(out: torch.fx.Node, x: torch.fx.Node) -> list[torch.fx.Node]:
    """The linears of one expert that read the FFN input x (up, or GEGLU's value and gate)."""
    found, stack, seen = [], [out], set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for parent in node.all_input_nodes:
            if parent is x:
                found.append(node)
            elif parent.op == "call_function":
                stack.append(parent)
    return found


def _position(graph: torch.fx.Graph) -> Any:
    order = {n: i for i, n in enumerate(graph.nodes)}
    return lambda node: order[node]


def refresh_shapes(dg: DiffusionGraph) -> None:
    """Shape propagation at the signature's example shapes, for the nodes routing created."""
    from torch.fx.passes.shape_prop import ShapeProp

    generator = torch.Generator().manual_seed(0)
    flat = [torch.randn(s.example_shape, generator=generator, device="cpu") if s.dtype.startswith("float")
            else torch.zeros(s.example_shape, dtype=getattr(torch, s.dtype), device="cpu") for s in dg.signature.inputs]
    flat = [tensor.to(dg.device) for tensor in flat]
    with torch.no_grad():
        ShapeProp(dg.module).propagate(*flat)
