"""The ONNX contract of the TensorRT backend: what TensorRT's ONNX parser accepts, checked on CPU before
any engine is built, so that a model TensorRT would reject (or would run unquantized) fails here with the
node, the problem and the fix instead of deep inside a GPU build.

Sources (facts, restated in diffc's own tables):
- operators, their types and restrictions: onnx/onnx-tensorrt, docs/operators.md, "Supported ONNX
  Operators" for TensorRT 10.15 (opset 9 to 24; INT8, INT4, FP8 and FP4 are "quantized types", only
  reachable through Q/DQ from a wider float type; UINT8 only as network input or output);
- Q/DQ rules: see diffc.backends.tensorrt.qdq_contract, which checks them."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ...errors import TargetError
from .contract_graph import ContractGraph, Violation, node_attribute, node_name
from .qdq_contract import check_dequantize, check_quantize

# Opsets TensorRT 10.15's ONNX parser imports (operators.md header).
TENSORRT_OPSETS = (9, 24)

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
_RESIZE_MODES = ("nearest", "linear")
_RESIZE_TRANSFORMS = ("half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners")
_RESIZE_NEAREST = ("floor", "ceil", "round_prefer_floor", "round_prefer_ceil")


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
    graph = ContractGraph(model)
    found: list[Violation] = []
    found += _check_opset(graph)
    for node in graph.nodes:
        found += _check_node(graph, node, precision)
    return found


def _check_opset(graph: ContractGraph) -> list[Violation]:
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


def _check_node(graph: ContractGraph, node: Any, precision: str) -> Iterator[Violation]:
    name, op = node_name(node), node.op_type
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
        yield from check_quantize(graph, node, precision)
    elif op == "DequantizeLinear":
        yield from check_dequantize(graph, node, precision)


def _check_types(graph: ContractGraph, node: Any, allowed: tuple[str, ...], precision: str) -> Iterator[Violation]:
    name, op = node_name(node), node.op_type
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
            yield Violation(node_name(node), node.op_type, f"tensor {value!r} is {kind}, which trt-{precision} does "
                            "not quantize to", fix)
            return


def _precision_for(kind: str) -> str:
    return {"INT8": "int8", "FP8": "fp8", "INT4": "int4"}.get(kind, "mixed")


def _check_resize(node: Any) -> Iterator[Violation]:
    name = node_name(node)
    checks = (("mode", "nearest", _RESIZE_MODES), ("coordinate_transformation_mode", "half_pixel", _RESIZE_TRANSFORMS),
              ("nearest_mode", "round_prefer_floor", _RESIZE_NEAREST))
    for attribute, default, allowed in checks:
        value = node_attribute(node, attribute, default)
        if value not in allowed:
            yield Violation(name, "Resize", f"{attribute}={value!r} is not supported by TensorRT",
                            f"use {attribute} in {', '.join(allowed)}")
    if node_attribute(node, "antialias", 0):
        yield Violation(name, "Resize", "antialiasing is not supported by TensorRT", "export with antialias=0")
