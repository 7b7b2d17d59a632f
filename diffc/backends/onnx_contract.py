"""The ONNX contract of the TensorRT backend: what TensorRT's ONNX parser accepts, checked on CPU before
any engine is built, so that a model TensorRT would reject (or would run unquantized) fails here with the
node, the problem and the fix instead of deep inside a GPU build.

Sources (facts, restated in diffc's own tables):
- operators, their types and restrictions: onnx/onnx-tensorrt, docs/operators.md, "Supported ONNX
  Operators" for TensorRT 10.15 (opset 9 to 24; INT8, INT4, FP8 and FP4 are "quantized types", only
  reachable through Q/DQ from a wider float type; UINT8 only as network input or output);
- Q/DQ rules: TensorRT developer guide, "Working with Quantized Types" and the Quantize/Dequantize
  operator pages: symmetric quantization (zero points must be zero), scales are build-time constants,
  scalar (per-tensor), 1-D (per-channel, weights only) or of the input's rank (block quantization),
  INT4 is weight-only quantization."""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import TargetError

# Opsets TensorRT 10.15's ONNX parser imports (operators.md header).
TENSORRT_OPSETS = (9, 24)
# Block-quantized DequantizeLinear (the `block_size` attribute) exists from ONNX opset 21 on.
BLOCK_DQ_OPSET = 21

_FLOAT = ("FP32", "FP16", "BF16")
_INT = ("INT32", "INT64")
_FI = _FLOAT + _INT
_FIB = _FI + ("BOOL",)
_HALF = ("FP32", "FP16")

# Supported ONNX operators -> the types TensorRT accepts for the op's main input (operators.md).
SUPPORTED_OPS: dict[str, tuple[str, ...]] = {
    **{op: _FLOAT for op in (
        "Acos", "Acosh", "Asin", "Asinh", "Atan", "Atanh", "AveragePool", "BatchNormalization", "Ceil", "Celu",
        "Clip", "Conv", "ConvTranspose", "Cos", "Cosh", "CumSum", "Dropout", "Einsum", "Elu", "Erf", "Exp", "Floor",
        "Gemm", "GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool", "GroupNormalization", "GRU", "HardSigmoid",
        "HardSwish", "Hardmax", "ImageScaler", "InstanceNormalization", "IsInf", "LayerNormalization", "LeakyRelu",
        "Log", "LogSoftmax", "LRN", "LSTM", "LpNormalization", "LpPool", "MatMul", "MaxPool",
        "MeanVarianceNormalization", "ParametricSoftplus", "PRelu", "QuantizeLinear", "RandomNormal",
        "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Reciprocal", "Resize", "RMSNormalization", "RNN",
        "RotaryEmbedding", "Round", "ScaledTanh", "Scan", "Selu", "Sigmoid", "Sin", "Sinh", "Softmax", "Softplus",
        "Softsign", "Sqrt", "Tan", "Tanh", "ThresholdedRelu", "Upsample")},
    **{op: _FI for op in (
        "Abs", "Add", "ArgMax", "ArgMin", "DepthToSpace", "Div", "Equal", "Greater", "GreaterOrEqual", "IsNaN",
        "Less", "LessOrEqual", "Max", "Min", "Mod", "Mul", "Neg", "Pad", "Pow", "Range", "ReduceL1", "ReduceL2",
        "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum",
        "ReduceSumSquare", "Relu", "Scatter", "ScatterElements", "ScatterND", "Shrink", "Sign", "SpaceToDepth",
        "Sub", "Sum", "TopK")},
    **{op: _FIB for op in (
        "Concat", "Expand", "EyeLike", "Flatten", "Gather", "GatherElements", "GatherND", "Identity", "If", "Loop",
        "OneHot", "Reshape", "ReverseSequence", "Shape", "Size", "Slice", "Split", "Squeeze", "Tile", "Transpose",
        "Trilu", "Unsqueeze", "Where")},
    **{op: ("BOOL",) for op in ("And", "Not", "Or", "Xor")},
    **{op: _HALF for op in ("BlackmanWindow", "DeformConv", "GridSample", "HammingWindow", "HannWindow", "Mish",
                            "NonMaxSuppression", "NonZero", "RoiAlign")},
    "Attention": _FLOAT + ("INT8", "FP8"),
    "Cast": _FI + ("UINT8", "BOOL"),
    "CastLike": _FI + ("UINT8", "BOOL"),
    "Constant": _FIB + ("FP8", "FP4", "INT4"),
    "ConstantOfShape": _FIB + ("FP8", "FP4", "INT4"),
    "DequantizeLinear": ("INT8", "FP8", "FP4", "INT4"),
    "Gelu": _FI + ("INT8",),
    "Mean": _FI + ("FP8",),
    "STFT": ("FP32",),
    "TensorScatter": _FLOAT + ("INT32",),
}

# Inputs TensorRT needs as build-time constants: op -> {input index: what it is}.
CONSTANT_INPUTS: dict[str, dict[int, str]] = {
    **{op: {1: "axes"} for op in ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax",
                                  "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare",
                                  "Squeeze", "Unsqueeze")},
    "CumSum": {1: "axis"},
    "OneHot": {1: "depth"},
    "QuantizeLinear": {1: "y_scale", 2: "y_zero_point"},
    "DequantizeLinear": {1: "x_scale", 2: "x_zero_point"},
}

# The quantized element types each diffc precision may put into a TensorRT network.
QUANTIZED_TYPES = ("INT8", "FP8", "INT4", "FP4")
PRECISION_TYPES: dict[str, tuple[str, ...]] = {
    "fp32": (), "fp16": (), "bf16": (), "int8": ("INT8",), "fp8": ("FP8",), "int4": ("INT4",),
    "mixed": ("INT8", "FP8", "INT4"),
}
# Ops whose weight input (index 1) TensorRT fuses a dequantized constant into.
WEIGHT_CONSUMERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
INT4_CONSUMERS = ("Gemm", "MatMul")
_RESIZE_MODES = ("nearest", "linear")
_RESIZE_TRANSFORMS = ("half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners")
_RESIZE_NEAREST = ("floor", "ceil", "round_prefer_floor", "round_prefer_ceil")

_ONNX_TYPES = {1: "FP32", 2: "UINT8", 3: "INT8", 6: "INT32", 7: "INT64", 9: "BOOL", 10: "FP16", 11: "DOUBLE",
               16: "BF16", 17: "FP8", 22: "INT4", 23: "FP4"}


@dataclass(frozen=True)
class Violation:
    node: str
    op: str
    problem: str
    fix: str

    def __str__(self) -> str:
        return f"node {self.node!r} ({self.op}): {self.problem}. Fix: {self.fix}"


def check_tensorrt_contract(model: Any, precision: str, segment: str | None = None) -> None:
    """Raises TargetError listing every node of `model` (an onnx.ModelProto) that TensorRT's ONNX parser
    would reject, or could not fuse, for `precision`; returns None when the model is within the contract."""
    violations = tensorrt_contract_violations(model, precision)
    if violations:
        where = f"segment {segment!r}" if segment else "the ONNX model"
        shown = "\n  - ".join(str(v) for v in violations[:20])
        more = f"\n  ... and {len(violations) - 20} more" if len(violations) > 20 else ""
        raise TargetError(f"{where} is outside what TensorRT accepts for trt-{precision} "
                          f"({len(violations)} problem{'s' if len(violations) > 1 else ''}):\n  - {shown}{more}")


def tensorrt_contract_violations(model: Any, precision: str) -> list[Violation]:
    """Every contract violation of `model` for `precision`, in graph order."""
    import onnx

    if precision not in PRECISION_TYPES:
        raise TargetError(f"the TensorRT contract has no precision {precision!r}; use one of "
                          f"{', '.join(PRECISION_TYPES)}")
    try:
        model = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # noqa: BLE001 - shape inference is a help for type checks, not a requirement
        pass
    graph = _Graph(model)
    found: list[Violation] = []
    found += _check_opset(graph)
    for node in graph.nodes:
        found += _check_node(graph, node, precision)
    return found


class _Graph:
    """The lookups the checks need: producers, consumers, constants and element types."""

    def __init__(self, model: Any) -> None:
        import onnx

        self.model = model
        self.nodes = list(model.graph.node)
        self.opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
        self.domains = sorted({o.domain for o in model.opset_import if o.domain not in ("", "ai.onnx")})
        self.initializers = {t.name: t for t in model.graph.initializer}
        self.producer = {out: n for n in self.nodes for out in n.output if out}
        self.consumers: dict[str, list[tuple[Any, int]]] = {}
        for n in self.nodes:
            for index, name in enumerate(n.input):
                if name:
                    self.consumers.setdefault(name, []).append((n, index))
        self.types: dict[str, int] = {}
        for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
            if value.type.HasField("tensor_type"):
                self.types[value.name] = value.type.tensor_type.elem_type
        for tensor in model.graph.initializer:
            self.types[tensor.name] = tensor.data_type
        for n in self.nodes:
            if n.op_type == "Constant":
                value = self.constant_value_attribute(n)
                if value is not None:
                    self.types[n.output[0]] = value.data_type
        self.graph_outputs = {o.name for o in model.graph.output}
        self._onnx = onnx
        self._constant: dict[str, bool] = {}

    @staticmethod
    def constant_value_attribute(node: Any) -> Any:
        return next((a.t for a in node.attribute if a.name == "value"), None)

    def type_name(self, value: str) -> str | None:
        code = self.types.get(value)
        return None if not code else _ONNX_TYPES.get(code, self._onnx.TensorProto.DataType.Name(code))

    def is_constant(self, value: str) -> bool:
        """An initializer, a Constant, or computed from constants only (TensorRT folds those at build time)."""
        if value in self._constant:
            return self._constant[value]
        self._constant[value] = False  # guards cycles through malformed graphs
        producer = self.producer.get(value)
        if value in self.initializers:
            result = True
        elif producer is None:
            result = False
        elif producer.op_type == "Constant":
            result = True
        else:
            result = producer.op_type not in ("QuantizeLinear", "DequantizeLinear") and all(
                self.is_constant(i) for i in producer.input if i)
        self._constant[value] = result
        return result

    def array(self, value: str) -> np.ndarray | None:
        """The value of an initializer or Constant output, else None."""
        from onnx import numpy_helper

        if value in self.initializers:
            return numpy_helper.to_array(self.initializers[value])
        producer = self.producer.get(value)
        if producer is not None and producer.op_type == "Constant":
            tensor = self.constant_value_attribute(producer)
            return None if tensor is None else numpy_helper.to_array(tensor)
        return None

    def shape(self, value: str) -> tuple[int | str, ...] | None:
        if value in self.initializers:
            return tuple(self.initializers[value].dims)
        for info in [*self.model.graph.input, *self.model.graph.value_info, *self.model.graph.output]:
            if info.name == value and info.type.tensor_type.HasField("shape"):
                return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                             for d in info.type.tensor_type.shape.dim)
        array = self.array(value)
        return None if array is None else tuple(array.shape)


def _attribute(node: Any, name: str, default: Any = None) -> Any:
    from onnx import helper

    for attribute in node.attribute:
        if attribute.name == name:
            value = helper.get_attribute_value(attribute)
            return value.decode() if isinstance(value, bytes) else value
    return default


def _name(node: Any) -> str:
    return node.name or (node.output[0] if node.output else node.op_type)


def _check_opset(graph: _Graph) -> list[Violation]:
    found = []
    low, high = TENSORRT_OPSETS
    if not low <= graph.opset <= high:
        found.append(Violation("<model>", "opset", f"the model imports ONNX opset {graph.opset}, TensorRT's parser "
                               f"reads opsets {low} to {high}", f"export with an opset between {low} and {high} "
                               "(diffc exports opset 21 by default)"))
    for domain in graph.domains:
        ops = sorted({n.op_type for n in graph.nodes if n.domain == domain})
        found.append(Violation("<model>", "opset", f"the model uses the custom operator domain {domain!r} "
                               f"({', '.join(ops) or 'no nodes'}), which TensorRT's parser only reads as plugins",
                               "decompose those ops into standard ONNX ops before export"))
    return found


def _check_node(graph: _Graph, node: Any, precision: str) -> Iterator[Violation]:
    name, op = _name(node), node.op_type
    if node.domain not in ("", "ai.onnx"):
        return  # reported once per domain by _check_opset
    allowed = SUPPORTED_OPS.get(op)
    if allowed is None:
        yield Violation(name, op, f"TensorRT's ONNX parser does not support the operator {op}",
                        "rewrite the op that exported to it with supported ONNX ops (see onnx-tensorrt's "
                        "docs/operators.md), or keep this segment on the ort or torch backend")
        return
    yield from _check_types(graph, node, allowed, precision)
    for index, what in CONSTANT_INPUTS.get(op, {}).items():
        if index < len(node.input) and node.input[index] and not graph.is_constant(node.input[index]):
            yield Violation(name, op, f"input {index} ({what}) is computed at run time; TensorRT needs it as a "
                            "build-time constant", f"make {what} an initializer (constant-fold it before export)")
    if op == "Resize":
        yield from _check_resize(node)
    if op == "QuantizeLinear":
        yield from _check_quantize(graph, node, precision)
    elif op == "DequantizeLinear":
        yield from _check_dequantize(graph, node, precision)


def _check_types(graph: _Graph, node: Any, allowed: tuple[str, ...], precision: str) -> Iterator[Violation]:
    name, op = _name(node), node.op_type
    if op in ("Constant", "ConstantOfShape", "RandomNormal", "RandomUniform", "EyeLike") or not node.input:
        checked = [(node.output[0], "output")] if node.output else []
    elif op == "Where":
        checked = [(node.input[1], "input X")]
    else:
        checked = [(node.input[0], "input 0")]
    if op in ("Cast", "CastLike"):
        checked.append((node.output[0], "output"))
    for value, role in checked:
        kind = graph.type_name(value)
        if kind is None or kind == "DOUBLE" and "FP32" in allowed:
            continue  # unknown after shape inference; DOUBLE is cast down to FP32 by the parser
        if kind not in allowed:
            yield Violation(name, op, f"{role} has type {kind}; TensorRT's {op} takes {', '.join(allowed)}",
                            f"cast {value!r} to one of those types before this node")
    for value in [*node.input, *node.output]:
        kind = graph.type_name(value) if value else None
        if kind in QUANTIZED_TYPES and kind not in PRECISION_TYPES[precision]:
            fix = (f"use a target whose precision quantizes to {kind} (e.g. trt-{_precision_for(kind)}), "
                   "or run without the quantization pass") if kind != "FP4" else "FP4 is not a diffc precision"
            yield Violation(_name(node), node.op_type, f"tensor {value!r} is {kind}, which trt-{precision} does "
                            "not quantize to", fix)
            return


def _precision_for(kind: str) -> str:
    return {"INT8": "int8", "FP8": "fp8", "INT4": "int4"}.get(kind, "mixed")


def _check_resize(node: Any) -> Iterator[Violation]:
    name = _name(node)
    checks = (("mode", "nearest", _RESIZE_MODES), ("coordinate_transformation_mode", "half_pixel", _RESIZE_TRANSFORMS),
              ("nearest_mode", "round_prefer_floor", _RESIZE_NEAREST))
    for attribute, default, allowed in checks:
        value = _attribute(node, attribute, default)
        if value not in allowed:
            yield Violation(name, "Resize", f"{attribute}={value!r} is not supported by TensorRT",
                            f"use {attribute} in {', '.join(allowed)}")
    if _attribute(node, "antialias", 0):
        yield Violation(name, "Resize", "antialiasing is not supported by TensorRT", "export with antialias=0")


def _check_scale(graph: _Graph, node: Any) -> Iterator[Violation]:
    """Scale and zero point of a Q or DQ node: constant, positive, finite; zero point all zeros."""
    name, op = _name(node), node.op_type
    scale = graph.array(node.input[1]) if len(node.input) > 1 else None
    if scale is not None and not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
        yield Violation(name, op, f"scale {node.input[1]!r} has zero, negative or non-finite entries",
                        "recalibrate: every quantization scale must be a positive finite number")
    if len(node.input) > 2 and node.input[2]:
        zero = graph.array(node.input[2])
        if zero is not None and np.any(zero.astype(np.float64) != 0):
            yield Violation(name, op, "the zero point is not zero; TensorRT quantizes symmetrically",
                            "quantize symmetrically (zero point 0) or drop the zero-point input")


def _check_quantize(graph: _Graph, node: Any, precision: str) -> Iterator[Violation]:
    name = _name(node)
    yield from _check_scale(graph, node)
    output = node.output[0]
    kind = graph.type_name(output) or _zero_point_type(graph, node) or "INT8"
    if kind == "INT4":
        yield Violation(name, "QuantizeLinear", "INT4 quantization of an activation; TensorRT supports INT4 only "
                        "as weight-only quantization", "quantize activations to INT8 or FP8, or keep them in "
                        "float (W4A16)")
    if _attribute(node, "block_size", 0):
        yield Violation(name, "QuantizeLinear", "block quantization of an activation",
                        "quantize activations per tensor; block quantization is for INT4 weights")
    scale_shape = graph.shape(node.input[1]) if len(node.input) > 1 else None
    if scale_shape and _numel(scale_shape) != 1:
        yield Violation(name, "QuantizeLinear", f"activation quantized per channel (scale shape {list(scale_shape)})",
                        "TensorRT quantizes activations per tensor: use a scalar scale")
    consumers = graph.consumers.get(output, [])
    stray = [c for c, _ in consumers if c.op_type != "DequantizeLinear"]
    if stray or output in graph.graph_outputs:
        users = ", ".join(f"{_name(c)} ({c.op_type})" for c in stray) or "the graph output"
        yield Violation(name, "QuantizeLinear", f"its quantized output feeds {users} instead of a "
                        "DequantizeLinear", "place a DequantizeLinear right after every QuantizeLinear (Q->DQ pair)")
    for dq, _ in consumers:
        if dq.op_type == "DequantizeLinear" and len(dq.input) > 1 and len(node.input) > 1:
            q_scale, dq_scale = graph.array(node.input[1]), graph.array(dq.input[1])
            if q_scale is not None and dq_scale is not None and not np.array_equal(q_scale, dq_scale):
                yield Violation(name, "QuantizeLinear", f"its scale differs from the scale of DequantizeLinear "
                                f"{_name(dq)!r}", "give a Q->DQ pair one shared scale")


def _zero_point_type(graph: _Graph, node: Any) -> str | None:
    return graph.type_name(node.input[2]) if len(node.input) > 2 and node.input[2] else None


def _check_dequantize(graph: _Graph, node: Any, precision: str) -> Iterator[Violation]:
    name = _name(node)
    yield from _check_scale(graph, node)
    source = node.input[0]
    kind = graph.type_name(source)
    block = int(_attribute(node, "block_size", 0) or 0)
    if graph.is_constant(source):
        yield from _check_weight_dequantize(graph, node, kind, block)
        return
    producer = graph.producer.get(source)
    if producer is None or producer.op_type != "QuantizeLinear":
        what = "a graph input" if producer is None else f"{_name(producer)} ({producer.op_type})"
        yield Violation(name, "DequantizeLinear", f"dequantizes {what}, which is neither a constant weight nor "
                        "the output of a QuantizeLinear", "dequantize only constant weights, or activations right "
                        "after their QuantizeLinear (Q->DQ pair)")
    if kind == "INT4":
        yield Violation(name, "DequantizeLinear", "INT4 dequantization of an activation; TensorRT supports INT4 "
                        "only as weight-only quantization", "keep INT4 on constant weights")
    if block:
        yield Violation(name, "DequantizeLinear", "block dequantization of an activation",
                        "quantize activations per tensor; block quantization is for INT4 weights")


def _check_weight_dequantize(graph: _Graph, node: Any, kind: str | None, block: int) -> Iterator[Violation]:
    """A constant weight's DQ must feed the weight input of a GEMM or convolution (possibly through a
    Transpose), with a per-channel axis on the output channels and INT4 only block-wise for GEMMs."""
    name = _name(node)
    weight_shape = graph.shape(node.input[0])
    scale_shape = graph.shape(node.input[1]) if len(node.input) > 1 else None
    rank = len(weight_shape) if weight_shape is not None else None
    axis = int(_attribute(node, "axis", 1))
    if rank:
        axis %= rank
    targets = list(_weight_targets(graph, node.output[0], list(range(rank or 0))))
    for consumer, index, perm in targets:
        if consumer.op_type not in WEIGHT_CONSUMERS or index != 1:
            yield Violation(name, "DequantizeLinear", f"the dequantized weight feeds input {index} of "
                            f"{_name(consumer)} ({consumer.op_type}); TensorRT fuses a weight DQ only into the "
                            f"weight input of {', '.join(WEIGHT_CONSUMERS)}", "quantize only the weights of "
                            "convolutions and matrix multiplications, or drop this DQ")
            continue
        if kind == "INT4" and consumer.op_type not in INT4_CONSUMERS:
            yield Violation(name, "DequantizeLinear", f"INT4 weights feed {_name(consumer)} ({consumer.op_type}); "
                            "TensorRT's INT4 weight-only quantization is for Gemm and MatMul",
                            "quantize convolution weights to INT8 or FP8")
        if scale_shape is not None and rank and len(scale_shape) == 1 and _numel(scale_shape) > 1 and not block:
            expected = _output_channel_axis(consumer, rank)
            if expected is not None and perm[axis] != expected:
                yield Violation(name, "DequantizeLinear", f"per-channel axis {axis} of the weight is not the "
                                f"output-channel axis of {_name(consumer)} ({consumer.op_type})",
                                f"quantize per output channel: axis={perm.index(expected)}")
    if not targets:
        yield Violation(name, "DequantizeLinear", "the dequantized weight is not used by any node",
                        "remove the unused DequantizeLinear")
    if kind == "INT4" or block:
        yield from _check_block(graph, node, kind, block, weight_shape, scale_shape, axis)


def _weight_targets(graph: _Graph, value: str, perm: list[int]) -> Iterator[tuple[Any, int, list[int]]]:
    """(consumer, input index, axis permutation) for the uses of a dequantized weight, looking through
    Transposes (TensorRT moves a DQ past a Transpose of a constant)."""
    for consumer, index in graph.consumers.get(value, []):
        if consumer.op_type == "Transpose":
            order = list(_attribute(consumer, "perm", list(reversed(range(len(perm))))))
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
        return 0 if _attribute(consumer, "transB", 0) else 1
    if consumer.op_type == "MatMul":
        return rank - 1
    return None


def _check_block(graph: _Graph, node: Any, kind: str | None, block: int, weight_shape: Any, scale_shape: Any,
                 axis: int) -> Iterator[Violation]:
    """TensorRT's IDequantizeLayer: block scales have the weight's shape with the blocked dimension divided
    by the block size, and a rank of at most 2."""
    name = _name(node)
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


def onnx_io(model: Any) -> dict[str, list[dict[str, Any]]]:
    """The graph inputs and outputs of an ONNX model: name, element type (ONNX name, e.g. FLOAT) and dims
    (a name for each dynamic dim, an int for each static one)."""
    import onnx

    def describe(values: Iterable[Any]) -> list[dict[str, Any]]:
        rows = []
        for value in values:
            tensor = value.type.tensor_type
            dims = [d.dim_param or "?" if not d.HasField("dim_value") else d.dim_value for d in tensor.shape.dim]
            rows.append({"name": value.name, "dtype": onnx.TensorProto.DataType.Name(tensor.elem_type), "dims": dims})
        return rows

    initializers = {t.name for t in model.graph.initializer}
    return {"inputs": describe(v for v in model.graph.input if v.name not in initializers),
            "outputs": describe(model.graph.output)}
