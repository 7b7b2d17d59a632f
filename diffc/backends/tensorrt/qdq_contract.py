"""The Q/DQ part of the TensorRT ONNX contract: where TensorRT accepts QuantizeLinear and DequantizeLinear
nodes and how their scales must look.

Sources (facts, restated in diffc's own rules): TensorRT developer guide, "Working with Quantized Types"
and the Quantize/Dequantize operator pages: symmetric quantization (zero points must be zero), scales are
build-time constants, scalar (per-tensor), 1-D (per-channel, weights only) or of the input's rank (block
quantization), INT4 is weight-only quantization."""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from .contract_graph import ContractGraph, Violation, node_attribute, node_name

# Block-quantized DequantizeLinear (the `block_size` attribute) exists from ONNX opset 21 on.
BLOCK_DQ_OPSET = 21
# Ops whose weight input (index 1) TensorRT fuses a dequantized constant into.
WEIGHT_CONSUMERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
INT4_CONSUMERS = ("Gemm", "MatMul")


def _check_scale(graph: ContractGraph, node: Any) -> Iterator[Violation]:
    """Scale and zero point of a Q or DQ node: constant, positive, finite; zero point all zeros."""
    name, op = node_name(node), node.op_type
    scale = graph.array(node.input[1]) if len(node.input) > 1 else None
    if scale is not None and not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
        yield Violation(name, op, f"scale {node.input[1]!r} has zero, negative or non-finite entries",
                        "recalibrate: every quantization scale must be a positive finite number")
    if len(node.input) > 2 and node.input[2]:
        zero = graph.array(node.input[2])
        if zero is not None and np.any(zero.astype(np.float64) != 0):
            yield Violation(name, op, "the zero point is not zero; TensorRT quantizes symmetrically",
                            "quantize symmetrically (zero point 0) or drop the zero-point input")


def check_quantize(graph: ContractGraph, node: Any, precision: str) -> Iterator[Violation]:
    """The problems of a QuantizeLinear: its scale, an activation quantized as TensorRT cannot, no DQ after it."""
    name = node_name(node)
    yield from _check_scale(graph, node)
    output = node.output[0]
    kind = graph.type_name(output) or _zero_point_type(graph, node) or "INT8"
    if kind == "INT4":
        yield Violation(name, "QuantizeLinear", "INT4 quantization of an activation; TensorRT supports INT4 only "
                        "as weight-only quantization", "quantize activations to INT8 or FP8, or keep them in "
                        "float (W4A16)")
    if node_attribute(node, "block_size", 0):
        yield Violation(name, "QuantizeLinear", "block quantization of an activation",
                        "quantize activations per tensor; block quantization is for INT4 weights")
    scale_shape = graph.shape(node.input[1]) if len(node.input) > 1 else None
    if scale_shape and _numel(scale_shape) != 1:
        yield Violation(name, "QuantizeLinear", f"activation quantized per channel (scale shape {list(scale_shape)})",
                        "TensorRT quantizes activations per tensor: use a scalar scale")
    consumers = graph.consumers.get(output, [])
    stray = [c for c, _ in consumers if c.op_type != "DequantizeLinear"]
    if stray or output in graph.graph_outputs:
        users = ", ".join(f"{node_name(c)} ({c.op_type})" for c in stray) or "the graph output"
        yield Violation(name, "QuantizeLinear", f"its quantized output feeds {users} instead of a "
                        "DequantizeLinear", "place a DequantizeLinear right after every QuantizeLinear (Q->DQ pair)")
    for dq, _ in consumers:
        if dq.op_type == "DequantizeLinear" and len(dq.input) > 1 and len(node.input) > 1:
            q_scale, dq_scale = graph.array(node.input[1]), graph.array(dq.input[1])
            if q_scale is not None and dq_scale is not None and not np.array_equal(q_scale, dq_scale):
                yield Violation(name, "QuantizeLinear", f"its scale differs from the scale of DequantizeLinear "
                                f"{node_name(dq)!r}", "give a Q->DQ pair one shared scale")


def _zero_point_type(graph: ContractGraph, node: Any) -> str | None:
    return graph.type_name(node.input[2]) if len(node.input) > 2 and node.input[2] else None


def check_dequantize(graph: ContractGraph, node: Any, precision: str) -> Iterator[Violation]:
    """The problems of a DequantizeLinear: its scale, and what it dequantizes (a constant weight, or a Q's output)."""
    name = node_name(node)
    yield from _check_scale(graph, node)
    source = node.input[0]
    kind = graph.type_name(source)
    block = int(node_attribute(node, "block_size", 0) or 0)
    if graph.is_constant(source):
        yield from _check_weight_dequantize(graph, node, kind, block)
        return
    producer = graph.producer.get(source)
    if producer is None or producer.op_type != "QuantizeLinear":
        what = "a graph input" if producer is None else f"{node_name(producer)} ({producer.op_type})"
        yield Violation(name, "DequantizeLinear", f"dequantizes {what}, which is neither a constant weight nor "
                        "the output of a QuantizeLinear", "dequantize only constant weights, or activations right "
                        "after their QuantizeLinear (Q->DQ pair)")
    if kind == "INT4":
        yield Violation(name, "DequantizeLinear", "INT4 dequantization of an activation; TensorRT supports INT4 "
                        "only as weight-only quantization", "keep INT4 on constant weights")
    if block:
        yield Violation(name, "DequantizeLinear", "block dequantization of an activation",
                        "quantize activations per tensor; block quantization is for INT4 weights")


def _check_weight_dequantize(graph: ContractGraph, node: Any, kind: str | None, block: int) -> Iterator[Violation]:
    """A constant weight's DQ must feed the weight input of a GEMM or convolution (possibly through a
    Transpose), with a per-channel axis on the output channels and INT4 only block-wise for GEMMs."""
    name = node_name(node)
    weight_shape = graph.shape(node.input[0])
    scale_shape = graph.shape(node.input[1]) if len(node.input) > 1 else None
    rank = len(weight_shape) if weight_shape is not None else None
    axis = int(node_attribute(node, "axis", 1))
    if rank:
        axis %= rank
    targets = list(_weight_targets(graph, node.output[0], list(range(rank or 0))))
    for consumer, index, perm in targets:
        if consumer.op_type not in WEIGHT_CONSUMERS or index != 1:
            yield Violation(name, "DequantizeLinear", f"the dequantized weight feeds input {index} of "
                            f"{node_name(consumer)} ({consumer.op_type}); TensorRT fuses a weight DQ only into the "
                            f"weight input of {', '.join(WEIGHT_CONSUMERS)}", "quantize only the weights of "
                            "convolutions and matrix multiplications, or drop this DQ")
            continue
        if kind == "INT4" and consumer.op_type not in INT4_CONSUMERS:
            yield Violation(name, "DequantizeLinear", f"INT4 weights feed {node_name(consumer)} ({consumer.op_type}); "
                            "TensorRT's INT4 weight-only quantization is for Gemm and MatMul",
                            "quantize convolution weights to INT8 or FP8")
        if scale_shape is not None and rank and len(scale_shape) == 1 and _numel(scale_shape) > 1 and not block:
            expected = _output_channel_axis(consumer, rank)
            if expected is not None and perm[axis] != expected:
                yield Violation(name, "DequantizeLinear", f"per-channel axis {axis} of the weight is not the "
                                f"output-channel axis of {node_name(consumer)} ({consumer.op_type})",
                                f"quantize per output channel: axis={perm.index(expected)}")
    if not targets:
        yield Violation(name, "DequantizeLinear", "the dequantized weight is not used by any node",
                        "remove the unused DequantizeLinear")
    if kind == "INT4" or block:
        yield from _check_block(graph, node, kind, block, weight_shape, scale_shape, axis)


def _weight_targets(graph: ContractGraph, value: str, perm: list[int]) -> Iterator[tuple[Any, int, list[int]]]:
    """(consumer, input index, axis permutation) for the uses of a dequantized weight, looking through
    Transposes (TensorRT moves a DQ past a Transpose of a constant)."""
    for consumer, index in graph.consumers.get(value, []):
        if consumer.op_type == "Transpose":
            order = list(node_attribute(consumer, "perm", list(reversed(range(len(perm))))))
            yield from _weight_targets(graph, consumer.output[0], [perm[i] for i in order])
        else:
            yield consumer, index, perm


def _output_channel_axis(consumer: Any, rank: int) -> int | None:
    """The axis of the consumer's weight input that indexes output channels."""
    if consumer.op_type == "Conv":
        return 0
    if consumer.op_type == "ConvTranspose":
        return 1
    if consumer.op_type == "Gemm":
        return 0 if node_attribute(consumer, "transB", 0) else 1
    if consumer.op_type == "MatMul":
        return rank - 1
    return None


def _check_block(graph: ContractGraph, node: Any, kind: str | None, block: int, weight_shape: Any, scale_shape: Any,
                 axis: int) -> Iterator[Violation]:
    """TensorRT's IDequantizeLayer: block scales have the weight's shape with the blocked dimension divided
    by the block size, and a rank of at most 2."""
    name = node_name(node)
    if kind != "INT4":
        yield Violation(name, "DequantizeLinear", f"block quantization of {kind} weights",
                        "diffc lowers block quantization only for INT4 weights; use per-channel scales for "
                        f"{kind}")
        return
    if graph.opset < BLOCK_DQ_OPSET or not block:
        yield Violation(name, "DequantizeLinear", "INT4 weights without block_size (or below opset "
                        f"{BLOCK_DQ_OPSET}); TensorRT reads INT4 only as blocked weight dequantization",
                        f"export with opset >= {BLOCK_DQ_OPSET} and set block_size on the INT4 DequantizeLinear")
        return
    if weight_shape is None or scale_shape is None:
        return
    if len(weight_shape) != 2:
        yield Violation(name, "DequantizeLinear", f"INT4 weight of rank {len(weight_shape)}; TensorRT's blocked "
                        "INT4 weights are 2-D matrices", "quantize only 2-D GEMM weights to INT4")
        return
    expected = [d // block if i == axis else d for i, d in enumerate(weight_shape)]
    if weight_shape[axis] % block:
        fitting = max(b for b in range(1, block + 1) if weight_shape[axis] % b == 0 and b & (b - 1) == 0)
        yield Violation(name, "DequantizeLinear", f"weight dim {axis} ({weight_shape[axis]}) is not a multiple of "
                        f"block_size {block}; TensorRT blocks a dimension into whole blocks",
                        f"choose a block size that divides the blocked dimension (e.g. {fitting})")
    elif list(scale_shape) != expected:
        yield Violation(name, "DequantizeLinear", f"block scale shape {list(scale_shape)} does not match weight "
                        f"{list(weight_shape)} blocked by {block} along axis {axis} (expected {expected})",
                        "give one scale per block: the weight's shape with the blocked dim divided by block_size")


def _numel(shape: Iterable[Any]) -> int:
    total = 1
    for dim in shape:
        total *= dim if isinstance(dim, int) else 2  # a symbolic dim means more than one element
    return total
