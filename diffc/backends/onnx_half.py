"""An exported fp32 ONNX model made to compute in float16 or bfloat16.

TensorRT's low-bit engines are built strongly typed: every layer runs in the type its ONNX tensors
have, so a Q/DQ model exported in fp32 runs its unquantized layers in fp32. As NVIDIA's ModelOpt
does, the quantized model is converted to half precision (Q/DQ scales included: a DequantizeLinear
yields its scale's type), keeping the inputs and outputs the caller names in float32 with Casts at
the boundary. The conversion is onnxruntime's float16 converter; for bfloat16 (the type FLUX-class
models run in, whose activations overflow float16) its float16 tensors are retyped and their values
encoded again from the fp32 originals, so nothing is clamped to float16's range."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ..errors import TargetError
from .onnx_weights import float_tensor

FP16, BF16 = "fp16", "bf16"
# the opset from which ONNX's convolutions, pooling and trigonometric ops take bfloat16 (types added,
# semantics unchanged)
BF16_OPSET = 22


def half_precision_model(model: Any, dtype: str, keep_io_types: bool | Iterable[str] = True) -> Any:
    """A copy of the fp32 `model` whose weights, constants and computation are in `dtype` ("fp16" or
    "bf16"); `keep_io_types`: True keeps every float input and output in float32, a list the named
    ones; the nodes come out in topological order."""
    from onnx import ModelProto
    from onnxruntime.transformers.float16 import convert_float_to_float16

    if dtype not in (FP16, BF16):
        raise TargetError(f"half precision means {FP16} or {BF16}, not {dtype!r}")
    keep = keep_io_types if isinstance(keep_io_types, bool) else list(keep_io_types)
    copy = ModelProto()
    copy.CopyFrom(model)
    half = convert_float_to_float16(copy, keep_io_types=keep)
    if dtype == BF16:
        _retype_to_bfloat16(half, model)
        _require_opset(half, BF16_OPSET)
    _sort_topologically(half.graph)
    return half


def _retype_to_bfloat16(half: Any, original: Any) -> None:
    """Turns the tensors the float16 converter made float16 into bfloat16, values from `original`."""
    from onnx import TensorProto, numpy_helper

    before = original.graph
    float_initializers = {i.name: i for i in before.initializer if i.data_type == TensorProto.FLOAT}
    originally_half = {v.name for v in (*before.value_info, *before.input, *before.output)
                       if v.type.tensor_type.elem_type == TensorProto.FLOAT16}
    originally_half |= {n.output[0] for n in before.node
                        if n.op_type == "Cast" and _attribute(n, "to") == TensorProto.FLOAT16}
    original_nodes = {n.output[0]: n for n in before.node if n.output}

    def encoded(source: Any, name: str) -> Any:
        return float_tensor(name, torch.from_numpy(numpy_helper.to_array(source).copy()), TensorProto.BFLOAT16)

    for index, initializer in enumerate(half.graph.initializer):
        if initializer.data_type == TensorProto.FLOAT16 and initializer.name in float_initializers:
            half.graph.initializer[index].CopyFrom(encoded(float_initializers[initializer.name], initializer.name))
    for node in half.graph.node:
        source = original_nodes.get(node.output[0]) if node.output else None
        for attribute in node.attribute:
            if node.op_type == "Cast" and attribute.name == "to" and attribute.i == TensorProto.FLOAT16:
                # a Cast the model had to float16 (an fp16 rounding of a layer) stays one
                if source is None or _attribute(source, "to") != TensorProto.FLOAT16:
                    attribute.i = TensorProto.BFLOAT16
            elif attribute.type == attribute.TENSOR and attribute.t.data_type == TensorProto.FLOAT16:
                was = _attribute(source, attribute.name) if source is not None else None
                if was is None or was.data_type != TensorProto.FLOAT:
                    raise TargetError(f"node {node.name!r} ({node.op_type}) holds a float16 constant with no fp32 "
                                      "original to make its bfloat16 value from; export the model in fp32")
                attribute.t.CopyFrom(encoded(was, attribute.t.name))
    for value in (*half.graph.value_info, *half.graph.input, *half.graph.output):
        tensor_type = value.type.tensor_type
        if tensor_type.elem_type == TensorProto.FLOAT16 and value.name not in originally_half:
            tensor_type.elem_type = TensorProto.BFLOAT16


def _require_opset(model: Any, version: int) -> None:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx") and entry.version < version:
            entry.version = version
    model.ir_version = max(model.ir_version, 10)


def _attribute(node: Any, name: str) -> Any:
    from onnx import helper

    found = [a for a in node.attribute if a.name == name]
    return helper.get_attribute_value(found[0]) if found else None


def _sort_topologically(graph: Any) -> None:
    """Reorders the nodes so that each comes after the producers of its inputs (the converter
    appends its boundary Casts at the end)."""
    available = {v.name for v in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[Any] = []
    while pending:
        waiting = []
        for node in pending:
            if all(name in available for name in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                waiting.append(node)
        if len(waiting) == len(pending):
            raise TargetError(f"the ONNX graph has a cycle or a missing input at {waiting[0].name!r}")
        pending = waiting
    copies = [type(node)() for node in ordered]
    for copy, node in zip(copies, ordered):
        copy.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(copies)


__all__ = ["BF16", "FP16", "half_precision_model"]
