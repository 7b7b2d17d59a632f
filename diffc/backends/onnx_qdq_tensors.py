"""The initializers a Q/DQ lowering (onnx_qdq) writes for a quantized layer: where its weight lives
(`weight_slot`), the weight's quantized values and scales in the ONNX layout, and the static
activation scales; also what a weight update (LoRA, refit) recomputes them with."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from ..errors import TargetError
from ..ir.precision import (BF16, BLOCKED, FP8, FP16, INT4, INT8, PrecisionSpec, QuantizedWeight, blocked_scales,
                            dequantize_weight, precision_specs, quantize_weight)
from ..ir.weight_storage import pack_int4
from .onnx_weights import WeightSlot


def weight_slot(name: str, spec: PrecisionSpec, flip: bool) -> WeightSlot:
    """The initializers that hold the weight of annotated layer `name`: `<name>_weight_q` and
    `<name>_weight_scale`, or `<name>_weight_rounded` for a bf16 / fp16 rounding and for int8
    weight-only (the layer computes in float: its weight is dequantized once, here, not per call)."""
    weight_only_int8 = spec.activation is None and spec.weight is not None and spec.weight.dtype == INT8
    if spec.weight is not None and (spec.weight.dtype in (BF16, FP16) or weight_only_int8):
        return WeightSlot(f"{name}_weight_rounded", flip, name)
    return WeightSlot(f"{name}_weight_q", flip, name, f"{name}_weight_scale")


def weight_initializers(slot: WeightSlot, weight: torch.Tensor, spec: PrecisionSpec) -> list[Any]:
    from onnx import TensorProto

    q = quantize_weight(weight, spec.weight)
    if slot.scale is None:  # a constant: rounded once, here
        values = dequantize_weight(q)
        return [raw_tensor(slot.initializer, (values.t() if slot.transposed else values).float(), TensorProto.FLOAT)]
    values, scale, _ = _onnx_layout(q, slot.transposed)
    kind = {INT8: TensorProto.INT8, FP8: TensorProto.FLOAT8E4M3FN, INT4: TensorProto.INT4}[spec.weight.dtype]
    return [raw_tensor(slot.initializer, values, kind), raw_tensor(slot.scale, scale, TensorProto.FLOAT)]


def quantized_weight_tensors(slot: WeightSlot, weight: torch.Tensor,
                             annotations: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The initializers of a quantized layer's weight slot recomputed for a new `weight`: its
    quantized values and new per-channel (or blocked) scales, with the layer's weight scheme."""
    specs = precision_specs({slot.node: annotations[slot.node]}) if slot.node in annotations else {}
    spec = specs.get(slot.node or "")
    if spec is None or spec.weight is None:
        raise TargetError(f"the weight held by {slot.initializer!r} was quantized for node {slot.node!r}, which has no "
                          "weight precision annotation any more; compile the plan again")
    return {t.name: t for t in weight_initializers(slot, weight.detach().float().cpu(), spec)}


def activation_scale_tensors(annotations: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The Q/DQ scale initializers of the quantized activations of `annotations` ({node: {"precision":
    spec}}) as quantize_segment_onnx names them; a model holds those of its own layers."""
    from onnx import TensorProto, helper

    tensors = {}
    for node, spec in precision_specs(annotations).items():
        roles = [(node, spec.activation)] if not spec.operands else \
            [(f"{node}_{role}", a) for role, a in zip(("query", "key", "value"), (spec.activation, *spec.operands))]
        for name, activation in roles:
            if activation is None or activation.dtype not in (INT8, FP8) or activation.dynamic is not None:
                continue
            tensor = raw_tensor(f"{name}_input_scale", activation.scale_vector(), TensorProto.FLOAT) \
                if activation.group_sizes else helper.make_tensor(f"{name}_input_scale", TensorProto.FLOAT, [],
                                                                  [activation.scale])
            tensors[tensor.name] = tensor
    return tensors


def _onnx_layout(q: QuantizedWeight, flip: bool) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    """Quantized values, scales and DequantizeLinear attributes in the layout the ONNX weight
    has (transposed for a MatMul that multiplies by W^T)."""
    if q.scheme.granularity == BLOCKED:
        axis, block = q.scheme.axis, q.scheme.block_size
        values = q.values.flatten(axis, axis + 1).narrow(axis, 0, q.shape[axis])
        scale = blocked_scales(q)
        if flip:
            values, scale, axis = values.t(), scale.t(), 1 - axis
        return values.contiguous(), scale.contiguous(), {"axis": axis, "block_size": block}
    scale = q.scale.reshape(-1)
    values = q.values.t() if flip else q.values
    return values.contiguous(), scale.contiguous(), {"axis": 1 if flip else 0}


def raw_tensor(name: str, values: torch.Tensor, kind: int) -> Any:
    from onnx import TensorProto, helper

    dims = list(values.shape)
    if kind == TensorProto.INT8:
        data = values.to(torch.int8).numpy().tobytes()
    elif kind == TensorProto.FLOAT8E4M3FN:
        data = values.to(torch.float8_e4m3fn).view(torch.uint8).numpy().tobytes()
    elif kind == TensorProto.INT4:
        data = pack_int4(values).numpy().tobytes()
    else:
        data = values.to(torch.float32).numpy().tobytes()
    return helper.make_tensor(name, kind, dims, data, raw=True)


__all__ = ["activation_scale_tensors", "quantized_weight_tensors", "raw_tensor", "weight_initializers", "weight_slot"]
