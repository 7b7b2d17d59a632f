"""Where each graph weight lives in a segment's ONNX model, so a backend can take new weights in place
(a LoRA swap) without exporting again.

The exporter keeps a weight's graph name as its initializer name where it stores the weight as it is
(convolutions, Gemm); where it folds a transpose into the weight (a linear on 3-d input becomes
MatMul(x, W^T)), the transposed copy gets a generated name (``val_123``). `map_weights` finds both: by
name, else by content (the one initializer whose bytes are those of W or W^T). An ambiguous match (two
weights with equal values, a symmetric weight) is left out: `missing_weights` names such weights so a
refit refuses them instead of changing the wrong initializer. Q/DQ lowering (diffc.backends.onnx_qdq)
replaces a quantized layer's weight by its quantized values and per-channel scales and records those
initializers instead. The map travels in the model's metadata (WEIGHTS_METADATA), so a saved artifact
keeps it; TensorRT's ONNX parser names the refittable weights of an engine by the same initializer names."""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.fx

from ..errors import ArtifactError, TargetError
from ..ir.fxutil import attr_value

WEIGHTS_METADATA = "diffc.weights"
UNMAPPED = "diffc.weights.unmapped"
STRIPPED = "diffc.weights.stripped"
_VALUE_FIELDS = ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data")


@dataclass(frozen=True)
class WeightSlot:
    """One initializer that holds a graph weight: as it is, or transposed (`transposed`), or, for a
    layer the Q/DQ lowering quantized (`node`: the annotated FX node), its quantized values, with
    their per-channel scales in `scale` (None where the format is a rounding to bf16 / fp16)."""

    initializer: str
    transposed: bool = False
    node: str | None = None
    scale: str | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "WeightSlot":
        return cls(**data)


WeightMap = dict[str, list[WeightSlot]]


def segment_weights(module: torch.fx.GraphModule) -> dict[str, torch.Tensor]:
    """The tensors a segment module reads through get_attr, by graph weight name."""
    found = {}
    for node in module.graph.nodes:
        if node.op == "get_attr":
            value = attr_value(module, node.target)
            if isinstance(value, torch.Tensor):
                found[str(node.target)] = value
    return found


def map_weights(model: Any, module: torch.fx.GraphModule) -> WeightMap:
    """Finds the initializer(s) of every weight of `module` in `model` (its fp32 ONNX export) and
    records the map in the model's metadata; returns it."""
    initializers = {i.name: i for i in model.graph.initializer}
    weights = segment_weights(module)
    mapping: WeightMap = {}
    for name, value in weights.items():
        tensor = initializers.get(name)
        if tensor is not None and tuple(tensor.dims) == tuple(value.shape):
            mapping[name] = [WeightSlot(name)]
    by_content: dict[bytes, list[str]] = {}
    for tensor in initializers.values():
        if tensor.name not in weights and tensor.data_type == _FLOAT:
            by_content.setdefault(_digest(tensor.dims, _raw(tensor)), []).append(tensor.name)
    hits: dict[str, list[tuple[str, bool]]] = {}  # initializer -> the weights (and orientation) it equals
    for name in weights:
        value = weights[name].detach().float().cpu()
        orientations = [(False, value)] + ([(True, value.t())] if value.dim() == 2 else [])
        for transposed, oriented in orientations:
            for initializer in by_content.get(_digest(oriented.shape, _tensor_bytes(oriented)), []):
                hits.setdefault(initializer, []).append((name, transposed))
    claims: dict[str, list[WeightSlot]] = {}
    for initializer, claimants in hits.items():
        if len(claimants) == 1:  # held by exactly one weight, in one orientation
            weight, transposed = claimants[0]
            claims.setdefault(weight, []).append(WeightSlot(initializer, transposed))
    ambiguous = {w for claimants in hits.values() if len(claimants) > 1 for w, _ in claimants}
    for name in weights:
        if name in ambiguous:
            mapping.pop(name, None)  # a copy of it may be among the ambiguous ones: it cannot be refit safely
        elif name in claims:
            mapping[name] = mapping.get(name, []) + claims[name]
    write_weight_map(model, mapping, sorted(set(weights) - set(mapping)))
    return mapping


def write_weight_map(model: Any, mapping: Mapping[str, Iterable[WeightSlot]], unmapped: Iterable[str] = ()) -> None:
    """Records `mapping` (and the weights that have no initializer of their own) in `model`'s metadata."""
    entries = {w: [asdict(s) for s in slots] for w, slots in sorted(mapping.items())}
    props = {p.key: p for p in model.metadata_props}
    for key, value in ((WEIGHTS_METADATA, json.dumps(entries)), (UNMAPPED, json.dumps(sorted(unmapped)))):
        if key in props:
            props[key].value = value
        else:
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value


def read_weight_map(model: Any) -> tuple[WeightMap, list[str]] | None:
    """The weight map and the unmapped weights recorded in `model`, None when it records none (a
    model exported before diffc kept one)."""
    props = {p.key: p.value for p in model.metadata_props}
    if WEIGHTS_METADATA not in props:
        return None
    mapping = {w: [WeightSlot.from_json(s) for s in slots] for w, slots in json.loads(props[WEIGHTS_METADATA]).items()}
    return mapping, json.loads(props.get(UNMAPPED, "[]"))


def check_refittable(segment: str, touched: Iterable[str], recorded: tuple[WeightMap, list[str]] | None) -> None:
    """Refuses weights a segment's model cannot take in place, naming them and the fix."""
    touched = sorted(touched)
    lacking = touched if recorded is None else [w for w in touched if w not in recorded[0]]
    if not lacking:
        return
    why = ("its ONNX model records no weight map (an artifact from an older diffc: re-create it)" if recorded is None
           else "the exporter folded or shared them, so no initializer holds them alone")
    raise TargetError(f"segment {segment!r} cannot take new values of {lacking[:3]} in place: {why}. Fuse the adapter "
                      "into the denoiser before diffc.optimize (pipe.load_lora_weights(...); pipe.fuse_lora()) instead")


def weight_tensors(mapping: Mapping[str, Iterable[WeightSlot]], weights: Mapping[str, torch.Tensor],
                   annotations: Mapping[str, Mapping[str, Any]], types: Mapping[str, int]) -> dict[str, Any]:
    """The new initializers (onnx TensorProto, by name) that hold `weights` in a model whose weight map
    is `mapping` and whose initializers have the ONNX element types `types`: float slots in their own
    type, quantized slots requantized with the layer's weight scheme (new per-channel scales, in
    their own float type)."""
    tensors: dict[str, Any] = {}
    for name, value in weights.items():
        for slot in mapping.get(name, ()):
            if slot.node is not None:
                from .onnx_qdq_tensors import quantized_weight_tensors  # which imports this module

                tensors.update({name: in_float_type(tensor, types.get(name))
                                for name, tensor in quantized_weight_tensors(slot, value, annotations).items()})
                continue
            oriented = value.detach().float().cpu()
            tensors[slot.initializer] = float_tensor(slot.initializer, oriented.t() if slot.transposed else oriented,
                                                     types.get(slot.initializer, _FLOAT))
    return tensors


def in_float_type(tensor: Any, kind: int | None) -> Any:
    """`tensor` (an onnx TensorProto) in the float type `kind` a model holds it in (a half-precision
    model's scales and weights), when it is a float tensor of another type."""
    from onnx import TensorProto, numpy_helper

    floats = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16)
    if kind is None or tensor.data_type == kind or tensor.data_type not in floats or kind not in floats:
        return tensor
    values = torch.from_numpy(numpy_helper.to_array(tensor).astype("float32"))
    return float_tensor(tensor.name, values, kind)


def float_tensor(name: str, value: torch.Tensor, kind: int) -> Any:
    """`value` as an initializer of ONNX float type `kind` (FLOAT, FLOAT16 or BFLOAT16)."""
    from onnx import TensorProto, helper

    dtypes = {TensorProto.FLOAT: torch.float32, TensorProto.FLOAT16: torch.float16,
              TensorProto.BFLOAT16: torch.bfloat16}
    if kind not in dtypes:
        raise TargetError(f"initializer {name!r} has ONNX type {kind}, not a float type; it cannot take a float weight")
    converted = value.to(dtypes[kind]).contiguous()
    data = (converted.view(torch.int16) if kind == TensorProto.BFLOAT16 else converted).numpy().tobytes()
    return helper.make_tensor(name, kind, list(value.shape), data, raw=True)


def replace_initializers(model: Any, tensors: Mapping[str, Any], data: bytes | None = None) -> bytes | None:
    """Writes `tensors` over the same-named initializers of `model` (same type and shape); an
    initializer stored outside the model (in `data`, its `.onnx.data` bytes) is overwritten there.
    Returns the new external data (None when there is none)."""
    from onnx import TensorProto

    present = {i.name: i for i in model.graph.initializer}
    absent = sorted(set(tensors) - set(present))
    if absent:
        raise TargetError(f"the ONNX model has no initializers {absent[:3]}; it does not match its weight map")
    buffer = bytearray(data) if data is not None else None
    for name, tensor in tensors.items():
        target = present[name]
        if tuple(target.dims) != tuple(tensor.dims) or target.data_type != tensor.data_type:
            raise TargetError(f"initializer {name!r} is {target.data_type}{list(target.dims)}; the new value is "
                              f"{tensor.data_type}{list(tensor.dims)}")
        if target.data_location == TensorProto.EXTERNAL:
            where = {e.key: e.value for e in target.external_data}
            offset, length = int(where.get("offset", 0)), int(where["length"])
            if buffer is None or len(tensor.raw_data) != length:
                raise TargetError(f"initializer {name!r} is stored outside the model, whose data is missing or differs")
            buffer[offset:offset + length] = tensor.raw_data
        else:
            target.CopyFrom(tensor)
    return bytes(buffer) if buffer is not None else None


def strip_weights(model_bytes: bytes) -> bytes:
    """The model without the values of the initializers its weight map names (recorded in its
    metadata): a saved artifact's weights file holds those weights already, and `restore_weights`
    puts them back from it. A model with no weight map comes back as it is."""
    import onnx

    model = onnx.load_from_string(model_bytes)
    recorded = read_weight_map(model)
    if recorded is None:
        return model_bytes
    held = {name for slots in recorded[0].values() for slot in slots for name in (slot.initializer, slot.scale) if name}
    stripped = []
    for initializer in model.graph.initializer:
        if initializer.name in held and initializer.data_location != onnx.TensorProto.EXTERNAL:
            for field in _VALUE_FIELDS:
                initializer.ClearField(field)
            stripped.append(initializer.name)
    entry = model.metadata_props.add()
    entry.key, entry.value = STRIPPED, json.dumps(sorted(stripped))
    return model.SerializeToString()


def restore_weights(model_bytes: bytes, module: torch.fx.GraphModule,
                    annotations: Mapping[str, Mapping[str, Any]]) -> bytes:
    """A model `strip_weights` stripped, with its initializers made again from the segment module's
    weights as the export made them (quantized ones quantized again with their layer's scheme: a
    saved quantized weight loads as values that quantize back to the same bytes); others unchanged."""
    import onnx

    model = onnx.load_from_string(model_bytes)
    props = {p.key: p.value for p in model.metadata_props}
    if STRIPPED not in props:
        return model_bytes
    stripped = set(json.loads(props[STRIPPED]))
    mapping = (read_weight_map(model) or ({}, []))[0]
    types = {i.name: i.data_type for i in model.graph.initializer}
    weights = {name: value for name, value in segment_weights(module).items() if name in mapping}
    tensors = {name: t for name, t in weight_tensors(mapping, weights, annotations, types).items() if name in stripped}
    if stripped - set(tensors):
        raise ArtifactError(f"the saved ONNX model's initializers {sorted(stripped - set(tensors))[:3]} cannot be "
                            "made again from the artifact's weights; re-create the artifact with this diffc")
    replace_initializers(model, tensors)
    kept = [p for p in model.metadata_props if p.key != STRIPPED]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    return model.SerializeToString()


_FLOAT = 1  # onnx.TensorProto.FLOAT


def _raw(tensor: Any) -> bytes:
    if tensor.raw_data:
        return bytes(tensor.raw_data)
    from onnx import numpy_helper

    return numpy_helper.to_array(tensor).astype("<f4").tobytes()


def _tensor_bytes(value: torch.Tensor) -> bytes:
    return value.contiguous().numpy().astype("<f4").tobytes()


def _digest(dims: Iterable[int], data: bytes) -> bytes:
    return hashlib.sha256(repr(tuple(int(d) for d in dims)).encode() + data).digest()


def update_weight_map(model: Any, quantized: Mapping[str, list[WeightSlot]]) -> None:
    """The model's weight map after lowering: slots whose initializer was replaced are dropped, the
    quantized slots added (a weight the export could not map stays unmapped)."""
    recorded = read_weight_map(model)
    if recorded is None:
        return
    mapping, unmapped = recorded
    kept = {i.name for i in model.graph.initializer}
    updated = {w: [s for s in slots if s.initializer in kept] for w, slots in mapping.items()}
    for weight, slots in quantized.items():
        if weight in updated:
            updated[weight] += slots
    write_weight_map(model, {w: slots for w, slots in updated.items() if slots}, unmapped)


__all__ = ["UNMAPPED", "WEIGHTS_METADATA", "WeightMap", "WeightSlot", "check_refittable", "float_tensor",
           "in_float_type", "map_weights", "read_weight_map", "replace_initializers", "restore_weights",
           "segment_weights", "strip_weights", "update_weight_map", "weight_tensors", "write_weight_map"]
