"""FX rewrites export_onnx applies before torch.onnx.export so that ONNX Runtime runs the exported graph
faster, with the same values (up to float rounding). Each targets a shape of the exporter's output that ONNX
Runtime's CPU kernels run slowly at the widths of diffusion transformers' heads (16-128 channels), measured on
the zoo's models (2 threads, 20 rows a call):

- attention: the exporter decomposes scaled_dot_product_attention with the keys reshaped to 3-D and
  transposed there ([batch * heads, tokens, head_dim] -> [.., head_dim, tokens]), a Transpose that takes ONNX
  Runtime 200-270 us on 15-90 thousand values (3 ms of a Wan video transformer's 31 ms call); a 4-D transpose of
  the last two dims next to the MatMul is fused into it or runs in 40-80 us.
- broadcasts: an elementwise op whose smaller operand broadcasts inside the shape (rotary cos/sin
  [1, tokens, 1, head_dim] against [batch, tokens, heads, head_dim], a head norm's weight [head_dim]) runs
  one short span at a time (58 us against 16 us for the same Mul with the operand spread over everything
  but the batch); the operand is expanded first, once per call, at a fraction of the op's size.
- RMS norms are written out (mean of squares, reciprocal square root, weight) so that their weight's
  multiply is such a broadcast.
- group norms (the UNets' resnets): the exporter writes GroupNormalization, which ONNX Runtime runs as
  its expanded function (180-900 us at the zoo UNets' shapes); the input reshaped to [batch, groups, -1]
  through InstanceNormalization, then the per-channel weight and bias, runs in about half that.
- rotations: the pair rotation of rotary embeddings (x reshaped into pairs, unbound, one half negated,
  stacked back: FLUX's and CogVideoX's form; or halves swapped: the rotate-half form) is a matmul with a
  constant signed permutation (29 us against 117 us for the Reshape/Split/Neg/Concat chain)."""
from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx

from .fxutil import attr_value, copy_graph

ATEN = torch.ops.aten
_ELEMENTWISE = (ATEN.mul.Tensor, ATEN.add.Tensor, ATEN.sub.Tensor, ATEN.div.Tensor)
_RESHAPES = (ATEN.reshape.default, ATEN.view.default, ATEN._unsafe_view.default)
# a contiguous run of this many values or more is long enough for ONNX Runtime's broadcast loop
_LONG_SPAN = 256
_ROTATION_PREFIX = "_diffc_rotation_"


def faster_for_onnx_runtime(module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of `module` (weights shared) with every rewrite of this module applied; `module` itself
    when none applies."""
    constants: dict[str, torch.Tensor] = {}
    graph = copy_graph(module.graph)
    changed = False
    for rewrite in _REWRITES:
        for node in list(graph.nodes):
            changed |= rewrite(graph, node, constants)
    if not changed:
        return module
    root = {node.target: attr_value(module, node.target) for node in graph.nodes
            if node.op in ("get_attr", "call_module") and node.target not in constants}
    rewritten = torch.fx.GraphModule({**root, **constants}, graph)
    rewritten.graph.eliminate_dead_code()
    rewritten.graph.lint()
    rewritten.recompile()
    return rewritten


def _attention_as_matmuls(graph: torch.fx.Graph, node: torch.fx.Node, _: dict[str, torch.Tensor]) -> bool:
    if node.op != "call_function" or node.target != ATEN.scaled_dot_product_attention.default:
        return False
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
    given = {**dict(zip(names, node.args)), **node.kwargs}
    query, key, value, mask = (given.get(name) for name in names[:4])
    if given.get("dropout_p", 0.0) or given.get("is_causal", False) or given.get("enable_gqa", False):
        return False
    query_value = _value(query)
    if query_value is None or _value(key) is None or _value(value) is None or query_value.dim() < 3:
        return False
    head_dim = query_value.shape[-1]
    scale = given.get("scale")
    if scale is None:
        if not isinstance(head_dim, int):
            return False
        scale = 1.0 / math.sqrt(head_dim)
    mask_value = _value(mask) if mask is not None else None
    if mask is not None and (mask_value is None or mask_value.dtype != query_value.dtype):
        return False  # a bool mask, or one that would promote the scores to another type
    with graph.inserting_before(node):
        # the scale on the query, as the exporter writes it: the Q/DQ lowering finds attention by that form
        # (onnx_qdq.attention_patterns) and ONNX Runtime folds it into the MatMul
        scaled = graph.call_function(ATEN.mul.Tensor, (query, float(scale)))
        keys_transposed = graph.call_function(ATEN.transpose.int, (key, -2, -1))
        scores = graph.call_function(ATEN.matmul.default, (scaled, keys_transposed))
        if mask is not None:
            scores = graph.call_function(ATEN.add.Tensor, (scores, mask))
        weights = graph.call_function(ATEN._softmax.default, (scores, -1, False))
        attended = _laid_out_as(graph, graph.call_function(ATEN.matmul.default, (weights, value)), _value(node))
    node.replace_all_uses_with(attended)
    graph.erase_node(node)
    return True


def _laid_out_as(graph: torch.fx.Graph, node: torch.fx.Node, value: torch.Tensor | None) -> torch.fx.Node:
    """`node` copied into the memory order of `value` where that is not contiguous: the attention
    kernels return [batch, heads, tokens, head_dim] laid out as [batch, tokens, heads, head_dim], and a
    model may view their output transposed (Wan's `transpose(1, 2).flatten(2)` traces as a view), which
    torch.export refuses on a contiguous matmul result. The exporter turns the copy into two Transposes
    that cancel."""
    if value is None or value.is_contiguous():
        return node
    order = sorted(range(value.dim()), key=lambda d: (-value.stride(d), d))
    inverse = [order.index(d) for d in range(value.dim())]
    physical = graph.call_function(ATEN.clone.default, (graph.call_function(ATEN.permute.default, (node, order)),),
                                   {"memory_format": torch.contiguous_format})
    return graph.call_function(ATEN.permute.default, (physical, inverse))


def _rms_norms_written_out(graph: torch.fx.Graph, node: torch.fx.Node, _: dict[str, torch.Tensor]) -> bool:
    if node.op != "call_function" or node.target != ATEN.rms_norm.default:
        return False
    source, normalized_shape, *rest = node.args
    weight = rest[0] if rest else node.kwargs.get("weight")
    eps = rest[1] if len(rest) > 1 else node.kwargs.get("eps")
    value = _value(source)
    # float32 only: written out in half precision, the mean of squares can overflow where torch upcasts
    if value is None or value.dtype != torch.float32 or eps is None:
        return False
    dims = list(range(-len(normalized_shape), 0))
    with graph.inserting_before(node):
        squares = graph.call_function(ATEN.mul.Tensor, (source, source))
        mean = graph.call_function(ATEN.mean.dim, (squares, dims, True))
        shifted = graph.call_function(ATEN.add.Tensor, (mean, float(eps)))
        normalized = graph.call_function(ATEN.mul.Tensor, (source, graph.call_function(ATEN.rsqrt.default,
                                                                                        (shifted,))))
        normalized.meta["val"] = value
        result = graph.call_function(ATEN.mul.Tensor, (normalized, weight)) if weight is not None else normalized
        result.meta["val"] = value
    node.replace_all_uses_with(result)
    graph.erase_node(node)
    return True


def _group_norms_as_instance_norms(graph: torch.fx.Graph, node: torch.fx.Node, _: dict[str, torch.Tensor]) -> bool:
    if node.op != "call_function" or node.target != ATEN.group_norm.default or node.kwargs:
        return False
    source, groups, *rest = node.args
    weight, bias, eps = (rest + [None, None, 1e-5])[:3]
    value = _value(source)
    if value is None or value.dtype != torch.float32 or value.dim() < 3 or not isinstance(groups, int) or \
            not isinstance(value.shape[1], int):
        return False
    with graph.inserting_before(node):
        sizes = _sizes(graph, source)
        grouped = graph.call_function(ATEN.reshape.default, (source, [sizes[0], groups, -1]))
        normalized = graph.call_function(ATEN.instance_norm.default,
                                         (grouped, None, None, None, None, True, 0.0, float(eps), False))
        result = graph.call_function(ATEN.reshape.default, (normalized, sizes))
        per_channel = [value.shape[1]] + [1] * (value.dim() - 2)
        if weight is not None:
            result = graph.call_function(ATEN.mul.Tensor,
                                         (result, graph.call_function(ATEN.reshape.default, (weight, per_channel))))
        if bias is not None:
            result = graph.call_function(ATEN.add.Tensor,
                                         (result, graph.call_function(ATEN.reshape.default, (bias, per_channel))))
    node.replace_all_uses_with(result)
    graph.erase_node(node)
    return True


def _rotations_as_matmuls(graph: torch.fx.Graph, node: torch.fx.Node, constants: dict[str, torch.Tensor]) -> bool:
    found = _rotation(node)
    if found is None:
        return False
    source, rotation, form = found
    value = _value(source)
    name = f"{_ROTATION_PREFIX}{form}_{rotation.shape[0]}_{str(value.dtype).removeprefix('torch.')}"
    constants[name] = rotation.to(value.dtype)
    with graph.inserting_before(node):
        matrix = graph.get_attr(name)
        rotated = graph.call_function(ATEN.matmul.default, (source, matrix))
    node.replace_all_uses_with(rotated)
    graph.erase_node(node)
    return True


def _rotation(node: torch.fx.Node) -> tuple[torch.fx.Node, torch.Tensor, str] | None:
    """(x, R, form) where `node` is [-b, a] of (a, b) = x reshaped and unbound, put back along x's last dim:
    "pairs" (reshaped [..., width/2, 2], unbound on the last dim, stacked there and flattened: FLUX) or
    "halves" (reshaped [..., 2, width/2], unbound on dim -2, concatenated: rotate-half). x @ R with
    R[b_i, a_i] = -1, R[a_i, b_i] = 1 for the positions a_i, b_i of x's i-th pair."""
    if _calls(node, ATEN.cat.default):
        form, joined = "halves", node
    elif any(_calls(node, op) for op in _RESHAPES + (ATEN.flatten.using_ints,)) and \
            _calls(node.args[0], ATEN.stack.default):
        form, joined = "pairs", node.args[0]
    else:
        return None
    pieces = joined.args[0]
    if len(pieces) != 2 or not _last_dim(joined, joined.args[1] if len(joined.args) > 1 else 0):
        return None
    unbound = _unbound_halves(pieces, stack_dim_last=form == "pairs")
    if unbound is None:
        return None
    source, reshaped = unbound
    width = _value(source).shape[-1]
    if not isinstance(width, int) or _hints(_value(node)) != _hints(_value(source)):
        return None
    half = width // 2
    if _hints(_value(reshaped))[-2:] != ([half, 2] if form == "pairs" else [2, half]):
        return None
    firsts = range(0, width, 2) if form == "pairs" else range(half)
    seconds = range(1, width, 2) if form == "pairs" else range(half, width)
    rotation = torch.zeros(width, width)
    for first, second in zip(firsts, seconds):
        rotation[second, first] = -1.0
        rotation[first, second] = 1.0
    return source, rotation, form


def _unbound_halves(pieces: Any, stack_dim_last: bool) -> tuple[torch.fx.Node, torch.fx.Node] | None:
    """(x, x reshaped) where `pieces` are [-b, a] and (a, b) = unbind(reshape(x), dim -1 when
    `stack_dim_last`, else -2)."""
    negated, kept = pieces
    if not _calls(negated, ATEN.neg.default):
        return None
    second, first = negated.args[0], kept
    if not all(isinstance(p, torch.fx.Node) and p.op == "call_function" and p.target is operator.getitem
               for p in (first, second)):
        return None
    unbind = first.args[0]
    if second.args[0] is not unbind or (first.args[1], second.args[1]) != (0, 1) or \
            not _calls(unbind, ATEN.unbind.int):
        return None
    reshaped = unbind.args[0]
    rank = _value(reshaped).dim() if _value(reshaped) is not None else 0
    dim = unbind.args[1] if len(unbind.args) > 1 else 0
    if rank < 2 or dim % rank != (rank - 1 if stack_dim_last else rank - 2):
        return None
    if not any(_calls(reshaped, op) for op in _RESHAPES):
        return None
    source = reshaped.args[0]
    value = _value(source)
    if value is None or value.dim() != rank - 1:
        return None
    return source, reshaped


def _broadcasts_widened(graph: torch.fx.Graph, node: torch.fx.Node, _: dict[str, torch.Tensor]) -> bool:
    if node.op != "call_function" or node.target not in _ELEMENTWISE or len(node.args) != 2:
        return False
    result = _value(node)
    if result is None or result.dim() < 3:
        return False
    for index, (full, small) in enumerate(((node.args[0], node.args[1]), (node.args[1], node.args[0]))):
        with graph.inserting_before(node):
            target = _widened_shape(graph, node, full, small)
            if target is None:
                continue
            widened = graph.call_function(ATEN.expand.default, (small, target))
        args = list(node.args)
        args[1 - index] = widened
        node.args = tuple(args)
        return True
    return False


def _widened_shape(graph: torch.fx.Graph, node: torch.fx.Node, full: Any, small: Any) -> list[Any] | None:
    """The shape to expand `small` to before `node` ([1] + the result's other dims), or None where its
    broadcast already runs in long spans, spans the whole batch dim, or is no smaller than the op."""
    full_value, small_value, result = _value(full), _value(small), _value(node)
    if full_value is None or small_value is None:
        return None
    shape = _hints(result)
    if _hints(full_value) != shape:
        return None
    padded = [1] * (len(shape) - small_value.dim()) + [_hint(d) for d in small_value.shape]
    # a scalar-like operand (every dim 1) is ONNX Runtime's fast broadcast already
    if None in shape or None in padded or padded == shape or padded[0] != 1 or shape[0] < 2 or \
            all(size == 1 for size in padded):
        return None
    span = 1
    for dim in reversed(range(len(shape))):
        if padded[dim] != shape[dim]:
            break
        span *= shape[dim]
    leading = next((d for d in range(len(shape)) if padded[d] != 1), len(shape))
    interior = any(padded[d] == 1 and shape[d] != 1 for d in range(leading, len(shape)))
    if span >= _LONG_SPAN and not interior:
        return None
    return [1, *_sizes(graph, full)[1:]]


def _sizes(graph: torch.fx.Graph, node: torch.fx.Node) -> list[Any]:
    """`node`'s shape as arguments of a reshape or expand: ints, and sym_size nodes for symbolic dims."""
    return [size if isinstance(size, int) else graph.call_function(ATEN.sym_size.int, (node, dim))
            for dim, size in enumerate(_value(node).shape)]


def _calls(node: Any, target: Callable[..., Any]) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target == target


def _last_dim(node: torch.fx.Node, dim: int) -> bool:
    value = _value(node)
    return value is not None and dim % value.dim() == value.dim() - 1


def _value(node: Any) -> torch.Tensor | None:
    value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def _hints(value: torch.Tensor) -> list[int | None]:
    return [_hint(size) for size in value.shape]


def _hint(size: Any) -> int | None:
    if isinstance(size, int):
        return size
    hint = getattr(getattr(size, "node", None), "hint", None)
    return int(hint) if hint is not None else None


_REWRITES = (_attention_as_matmuls, _rms_norms_written_out, _group_norms_as_instance_norms, _rotations_as_matmuls,
             _broadcasts_widened)
