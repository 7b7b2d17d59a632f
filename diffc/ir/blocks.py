"""The block table: which nodes of the graph belong to which module of interest (UNet stages,
resnets, attentions, transformer blocks, FFNs), with their parameters, FLOPs and residual structure."""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.fx

from .fxutil import attr_value, node_shape

aten = torch.ops.aten

STAGE, RESNET, ATTENTION, TRANSFORMER_BLOCK, FFN = "stage", "resnet", "attention", "transformer_block", "ffn"
BLOCK_KINDS = (STAGE, RESNET, ATTENTION, TRANSFORMER_BLOCK, FFN)

_STAGE_PATH = re.compile(r"^(down_blocks\.\d+|up_blocks\.\d+|mid_block)$")

# Ops through which a tensor passes unchanged in meaning (layout, dtype, scaling by a constant),
# so a residual add can be found behind them.
_TRANSPARENT = {
    aten.view.default, aten.reshape.default, aten.permute.default, aten.transpose.int,
    aten.contiguous.default, aten.clone.default, aten.to.dtype, aten._to_copy.default,
    aten.dropout.default, aten.squeeze.dim, aten.unsqueeze.default, aten.flatten.using_ints,
    aten.unflatten.int, aten.alias.default,
}
_SCALING = {aten.div.Tensor, aten.mul.Tensor, aten.div.Scalar, aten.mul.Scalar}
_ADDS = {aten.add.Tensor}


@dataclass
class Residual:
    """`add` computes branch + skip; replacing `add` by `skip` removes the block's contribution.
    `in_parent` is true when the add sits in the enclosing block (FFN and attention outputs are
    added to the residual stream by the transformer block that calls them)."""

    add: str
    skip: str
    branch: str
    in_parent: bool


@dataclass
class Block:
    name: str
    kind: str
    module_class: str
    parent: str | None
    nodes: list[str]
    parameters: list[str]
    num_params: int
    flops: int
    inputs: list[str]
    outputs: list[str]
    residual: Residual | None
    # The input whose shape equals the output's: the block can be bypassed as identity through it.
    identity_input: str | None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Block":
        residual = Residual(**data["residual"]) if data["residual"] else None
        return cls(**{**data, "residual": residual})


def classify_module(path: str, class_name: str) -> str | None:
    short = class_name.rsplit(".", 1)[-1]
    if _STAGE_PATH.match(path):
        return STAGE
    if short.startswith("ResnetBlock"):
        return RESNET
    if short.endswith("TransformerBlock") or short == "DiTBlock":
        return TRANSFORMER_BLOCK
    if short == "FeedForward":
        return FFN
    if short in ("Attention", "Transformer2DModel", "JointAttention", "FluxAttention"):
        return ATTENTION
    return None


def module_path(node: torch.fx.Node) -> list[tuple[str, str]]:
    """The (path, class) stack of modules a node was traced in, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for path, cls in stack.values():
        if path:
            out.append((_normalize_path(path), cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"))
    return out


def _normalize_path(path: str) -> str:
    # strict export spells paths as L['self'].down_blocks[0]; non-strict as down_blocks.0
    path = re.sub(r"^L\['self'\]\.?", "", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    return path.split("@")[0]


def node_flops(node: torch.fx.Node) -> int:
    """Multiply-add FLOPs (2 per MAC) of matmul-like ops at the shapes recorded by shape propagation."""
    if node.op != "call_function":
        return 0
    out = node_shape(node)
    if out is None:
        return 0
    target = node.target
    if target in (aten.conv2d.default, aten.convolution.default, aten.conv1d.default):
        weight = node_shape(node.args[1])
        if weight is None:
            return 0
        return 2 * math.prod(out) * math.prod(weight[1:])
    if target in (aten.linear.default, aten.addmm.default, aten.mm.default, aten.bmm.default,
                  aten.matmul.default, aten.baddbmm.default):
        a = node_shape(node.args[1] if target in (aten.addmm.default, aten.baddbmm.default) else node.args[0])
        if a is None:
            return 0
        return 2 * math.prod(out) * a[-1]
    if target == aten.scaled_dot_product_attention.default:
        q, k = node_shape(node.args[0]), node_shape(node.args[1])
        if q is None or k is None:
            return 0
        return 4 * math.prod(q[:-1]) * k[-2] * q[-1]
    if target == aten.einsum.default:
        return 0
    return 0



def discover_blocks(gm: torch.fx.GraphModule) -> list[Block]:
    """Builds the block table from the module stacks recorded on each node. FLOPs need
    `tensor_meta` from a shape propagation at the example inputs.

    Modules are known by class name (UNet stages, resnets, *TransformerBlock, FeedForward,
    attention) or, for classes no name rule knows, by structure: an element of a module list that
    no known block encloses and that updates a stream (its output a residual sum, or of an input's
    shape) is a transformer block (the layers every denoiser repeats, whatever its authors called
    them); inside one, a child module that runs attention (scaled_dot_product_attention) is its
    attention, and one made of two or more linear layers around an activation, with no attention,
    its FFN."""
    members: dict[str, list[torch.fx.Node]] = {}
    classes: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        for path, cls in module_path(node):
            members.setdefault(path, []).append(node)
            classes[path] = cls
    kinds = {path: kind for path in members if (kind := classify_module(path, classes[path])) is not None}
    kinds.update(_structural_kinds(gm, members, classes, kinds))
    blocks = []
    ordered = sorted(kinds, key=lambda p: _first_index(gm, members[p]))
    for path in ordered:
        blocks.append(_make_block(gm, path, kinds[path], classes[path], members[path], ordered))
    return blocks


def _structural_kinds(gm: torch.fx.GraphModule, members: dict[str, list[torch.fx.Node]], classes: dict[str, str],
                      kinds: dict[str, str]) -> dict[str, str]:
    """Transformer blocks, their attention and their FFN found by structure (see discover_blocks)."""
    found: dict[str, str] = {}
    for path in sorted(members, key=lambda p: p.count(".")):
        if not _LIST_ELEMENT.search(path) or classes[path].startswith("torch.nn.") or path in kinds:
            continue
        if any(_encloses(other, path) for other in [*kinds, *found]):
            continue
        nodes = members[path]
        compute = [n for n in nodes if n.op != "get_attr"]
        inside = set(nodes)
        outputs = _unique(n for n in compute if any(u not in inside for u in n.users))
        if _linear_count(compute) >= 2 and _keeps_stream(compute, inside, outputs):
            found[path] = TRANSFORMER_BLOCK
    for block in [p for p, kind in [*kinds.items(), *found.items()] if kind == TRANSFORMER_BLOCK]:
        known = {kinds[p] for p in kinds if _encloses(block, p)}
        for path in members:
            if path.rsplit(".", 1)[0] != block or path in kinds or classes[path].startswith("torch.nn."):
                continue
            kind = _child_kind([n for n in members[path] if n.op != "get_attr"])
            if kind is not None and kind not in known:
                found[path] = kind
    return found


_LIST_ELEMENT = re.compile(r"\.\d+$")
_LINEAR_OPS = {aten.linear.default, aten.addmm.default, aten.mm.default}
_ACTIVATIONS = {aten.gelu.default, aten.silu.default, aten.relu.default, aten.sigmoid.default, aten.tanh.default}


def _keeps_stream(compute: list[torch.fx.Node], inside: set[torch.fx.Node], outputs: list[torch.fx.Node]) -> bool:
    """Whether a module updates a stream: its output is a residual sum, or (a block that also hands
    out a side value, as HunyuanDiT's do) one of its outputs has the shape of one of its inputs."""
    if find_residual(compute, inside, outputs) is not None:
        return True
    inputs = {node_shape(a) for n in compute for a in n.all_input_nodes if a not in inside and a.op != "get_attr"}
    return any(node_shape(out) is not None and node_shape(out) in inputs for out in outputs)


def _encloses(outer: str, inner: str) -> bool:
    return inner != outer and inner.startswith(outer + ".")


def _linear_count(nodes: list[torch.fx.Node]) -> int:
    return sum(n.op == "call_function" and n.target in _LINEAR_OPS for n in nodes)


def _child_kind(nodes: list[torch.fx.Node]) -> str | None:
    targets = {n.target for n in nodes if n.op == "call_function"}
    if aten.scaled_dot_product_attention.default in targets:
        return ATTENTION
    if _linear_count(nodes) >= 2 and targets & _ACTIVATIONS:
        return FFN
    return None


def _first_index(gm: torch.fx.GraphModule, nodes: list[torch.fx.Node]) -> int:
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return min(order[n] for n in nodes)


def _make_block(gm: torch.fx.GraphModule, path: str, kind: str, cls: str, nodes: list[torch.fx.Node],
                all_paths: list[str]) -> Block:
    inside = set(nodes)
    compute = [n for n in nodes if n.op != "get_attr"]
    params = sorted({a.target for n in compute for a in n.all_input_nodes if a.op == "get_attr"})
    num_params = 0
    for name in params:
        value = attr_value(gm, name)
        if isinstance(value, torch.Tensor):
            num_params += value.numel()
    inputs = _unique(a for n in compute for a in n.all_input_nodes if a not in inside and a.op != "get_attr")
    outputs = _unique(n for n in compute if any(u not in inside for u in n.users))
    parent = max((p for p in all_paths if p != path and path.startswith(p + ".")), key=len, default=None)
    residual = find_residual(compute, inside, outputs)
    identity_input = None
    if len(outputs) == 1 and node_shape(outputs[0]) is not None:
        same = [i for i in inputs if node_shape(i) == node_shape(outputs[0])]
        identity_input = same[0].name if len(same) == 1 else None
    return Block(
        name=path, kind=kind, module_class=cls, parent=parent,
        nodes=[n.name for n in compute], parameters=params, num_params=num_params,
        flops=sum(node_flops(n) for n in compute),
        inputs=[n.name for n in inputs], outputs=[n.name for n in outputs],
        residual=residual, identity_input=identity_input,
    )


def find_residual(compute: list[torch.fx.Node], inside: set[torch.fx.Node],
                  outputs: list[torch.fx.Node]) -> Residual | None:
    if len(outputs) != 1:
        return None
    out = outputs[0]
    # Backward: the block's own output is a residual sum (resnets, transformer blocks).
    node = out
    while node in inside and node.op == "call_function" and node.target not in _ADDS:
        if node.target in _TRANSPARENT or node.target in _SCALING:
            node = node.args[0] if isinstance(node.args[0], torch.fx.Node) else None
            if node is None:
                return None
        else:
            break
    if node in inside and node.op == "call_function" and node.target in _ADDS:
        a, b = node.args[0], node.args[1]
        if isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node):
            cost_a, cost_b = _slice_flops(a, inside), _slice_flops(b, inside)
            skip, branch = (a, b) if cost_a < cost_b else (b, a)
            if cost_a != cost_b:
                return Residual(add=node.name, skip=skip.name, branch=branch.name, in_parent=False)
    # Forward: the output (possibly gated or rescaled) is added to the residual stream outside.
    node, previous = out, out
    for _ in range(4):
        users = [u for u in node.users if u not in inside]
        if len(users) != 1:
            return None
        user = users[0]
        if user.op != "call_function":
            return None
        if user.target in _ADDS:
            other = user.args[1] if user.args[0] is node else user.args[0]
            if isinstance(other, torch.fx.Node) and not _depends_on(other, previous):
                return Residual(add=user.name, skip=other.name, branch=node.name, in_parent=True)
            return None
        if user.target in _TRANSPARENT or user.target in _SCALING:
            node = user
            continue
        return None
    return None


def _slice_flops(node: torch.fx.Node, inside: set[torch.fx.Node]) -> int:
    seen, stack, total = set(), [node], 0
    while stack:
        n = stack.pop()
        if n in seen or n not in inside:
            continue
        seen.add(n)
        total += node_flops(n)
        stack.extend(n.all_input_nodes)
    return total


def _depends_on(node: torch.fx.Node, ancestor: torch.fx.Node, limit: int = 2000) -> bool:
    seen, stack = set(), [node]
    while stack and len(seen) < limit:
        n = stack.pop()
        if n is ancestor:
            return True
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return False


def _unique(items: Iterable[torch.fx.Node]) -> list[torch.fx.Node]:
    return list(dict.fromkeys(items))

