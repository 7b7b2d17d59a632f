"""The quantizable layers of a graph and the ones kept at high precision, with the reason."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...ir import LATENT, TIMESTEP, DiffusionGraph
from ...ir.blocks import node_flops
from ...ir.fxutil import attr_value, node_shape
from ...ir.precision import is_attention, quantizable_weight

aten = torch.ops.aten

TIMESTEP_PATH, FIRST, LAST = "timestep_path", "first", "last"
PROTECTIONS = (TIMESTEP_PATH, FIRST, LAST)
REASONS = {
    TIMESTEP_PATH: "timestep-embedding path (TFMQ-DM): computed from the timestep without the latent, its error "
                   "shifts every step's features",
    FIRST: "first layer: reads the latent before any other quantized layer",
    LAST: "last layer: writes the model output with no quantized layer after it",
}


@dataclass(frozen=True)
class Layer:
    """`pieces`: when the layer reads a concatenation along its channel axis (`axis`), the
    concatenated nodes and their channel counts, in order."""

    node: str
    weight: str
    shape: tuple[int, ...]
    input: str
    flops: int
    protected: str | None
    pieces: tuple[tuple[str, int], ...] = ()
    axis: int = 1


@dataclass(frozen=True)
class Attention:
    """An attention node (aten.scaled_dot_product_attention) and its query, key and value nodes."""

    node: str
    inputs: tuple[str, str, str]
    flops: int


def attention_nodes(dg: DiffusionGraph) -> list[Attention]:
    """Every attention node whose query, key and value are computed tensors, in graph order."""
    found = []
    for node in dg.graph.nodes:
        operands = node.args[:3] if is_attention(node) else ()
        if operands and all(isinstance(a, torch.fx.Node) and node_shape(a) is not None for a in operands):
            found.append(Attention(node.name, tuple(a.name for a in operands), node_flops(node)))
    return found


def concatenated_input(node: torch.fx.Node) -> tuple[int, tuple[tuple[str, int], ...]] | None:
    """(channel axis, (piece, channels) ...) when a linear / convolution reads an aten.cat along
    its input-channel axis directly (a UNet decoder's skip concatenation read by conv_shortcut);
    None otherwise. Through a normalization the pieces are rescaled together, so only direct
    readers qualify."""
    source = node.args[0]
    if not isinstance(source, torch.fx.Node) or source.op != "call_function" or source.target != aten.cat.default:
        return None
    pieces = source.args[0]
    dim = source.args[1] if len(source.args) > 1 else source.kwargs.get("dim", 0)
    shape = node_shape(source)
    if shape is None or len(pieces) < 2:
        return None
    axis = 1 if node.target != aten.linear.default else -1
    if dim % len(shape) != axis % len(shape):
        return None
    sizes = []
    for piece in pieces:
        piece_shape = node_shape(piece) if isinstance(piece, torch.fx.Node) else None
        if piece_shape is None or not isinstance(piece_shape[axis], int):
            return None
        sizes.append((piece.name, int(piece_shape[axis])))
    return axis, tuple(sizes)


def quantizable_layers(dg: DiffusionGraph, protect: tuple[str, ...]) -> list[Layer]:
    """Every linear / 2-d convolution with a constant weight, in graph order, with the reason it
    stays high precision (None when it may be quantized)."""
    nodes = list(dg.graph.nodes)
    roles = {}
    placeholders = [n for n in nodes if n.op == "placeholder"]
    for node, spec in zip(placeholders, dg.signature.inputs):
        roles[node] = {spec.role}
    after_layer: dict[torch.fx.Node, bool] = {}
    for node in nodes:
        if node.op != "placeholder":
            # only tensor values carry meaning: a size read off the latent (to expand the
            # timestep to the batch) does not put the timestep path on the latent
            roles[node] = set().union(*(roles.get(a, set()) for a in node.all_input_nodes if _is_tensor(a)))
        after_layer[node] = any(after_layer.get(a, False) or quantizable_weight(a) is not None
                                for a in node.all_input_nodes)
    reaches_output: dict[torch.fx.Node, bool] = {}
    for node in reversed(nodes):
        reaches_output[node] = any(u.op == "output" or (quantizable_weight(u) is None and reaches_output.get(u, False))
                                   for u in node.users)
    layers = []
    for node in nodes:
        weight = quantizable_weight(node)
        if weight is None:
            continue
        source = node.args[0]
        input_roles = roles.get(source, set())
        reason = None
        if TIMESTEP_PATH in protect and TIMESTEP in input_roles and LATENT not in input_roles:
            reason = REASONS[TIMESTEP_PATH]
        elif FIRST in protect and LATENT in input_roles and not after_layer.get(source, False) \
                and quantizable_weight(source) is None:
            reason = REASONS[FIRST]
        elif LAST in protect and reaches_output[node]:
            reason = REASONS[LAST]
        shape = tuple(attr_value(dg.module, weight.target).shape)
        axis, pieces = concatenated_input(node) or (1, ())
        layers.append(Layer(node.name, weight.target, shape, source.name, node_flops(node), reason, pieces, axis))
    return layers



def _is_tensor(node: torch.fx.Node) -> bool:
    return isinstance(node.meta.get("val"), torch.Tensor) or "tensor_meta" in node.meta and \
        hasattr(node.meta["tensor_meta"], "shape")
