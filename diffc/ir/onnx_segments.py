"""The layout of a segment's ONNX model: how the segment's values map onto ONNX values and back.

A segment model's inputs and outputs are the segment's `inputs` and `outputs` (model inputs, values
passed between segments, cached state) under `onnx_safe_name`, which escapes every character that is
not a letter, a digit or an underscore as ``_xHH_`` (its code point in hex: "output.sample" ->
"output_x2E_sample"), and an underscore followed by "x" as ``_x5F_``, so `original_name` recovers the
name exactly. Three kinds of value cross segments; the model's ``diffc.segment`` metadata
(SEGMENT_METADATA) lists them per segment as entries {"name", "kind", "count"}:

- a tensor: one ONNX value;
- a list of tensors (the pieces of a chunk or split used in a later segment): one ONNX value
  per item, named after ``name[i]``;
- a size (an int one segment computes from a shape and a later one uses): an int64 scalar as
  an output; as an input, a float32 vector of that length whose shape carries it, so the size
  stays symbolic in the consumer's graph (an ONNX graph cannot turn a value into a shape).

Dynamic dims are named after the signature (batch, height, ...) or are expressions of those names
("((height//2))*((width//2))"); DIM_SYMBOL matches a name inside one."""
from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from ..errors import CaptureError

SEGMENT_METADATA = "diffc.segment"
TENSOR, TENSORS, SIZE = "tensor", "tensors", "size"
DIM_SYMBOL = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ESCAPED = re.compile(r"_x([0-9A-F]+)_")


def onnx_safe_name(name: str) -> str:
    """`name` as an ONNX (C identifier) name, reversibly: see the module docstring."""
    out = []
    for index, char in enumerate(name):
        plain = char.isascii() and (char.isalpha() or (char.isdigit() and index > 0))
        if plain or (char == "_" and name[index + 1:index + 2] != "x"):
            out.append(char)
        else:
            out.append(f"_x{ord(char):02X}_")
    return "".join(out)


def original_name(onnx_name: str) -> str:
    """The name `onnx_safe_name` was given: original_name(onnx_safe_name(n)) == n."""
    return _ESCAPED.sub(lambda m: chr(int(m.group(1), 16)), onnx_name)


def value_entry(segment: str, name: str, value: Any) -> dict[str, Any]:
    """The metadata entry of value `name` that segment `segment` reads or writes, from its example value."""
    if isinstance(value, torch.Tensor):
        return {"name": name, "kind": TENSOR, "count": 1}
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return {"name": name, "kind": TENSORS, "count": len(value)}
    if isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool):
        return {"name": name, "kind": SIZE, "count": 1}
    raise CaptureError(f"segment {segment} passes {name} of type {type(value).__name__} to another segment; "
                       "ONNX export carries tensors, lists of tensors and sizes only. Cut the plan elsewhere.")


def flat_count(entry: Mapping[str, Any]) -> int:
    """How many ONNX values the entry's value takes."""
    return int(entry["count"]) if entry["kind"] == TENSORS else 1


def segment_values(entries: Sequence[Mapping[str, Any]]) -> list[str]:
    """The ONNX value names of a segment's inputs or outputs, in order, from their entries."""
    names: list[str] = []
    for entry in entries:
        if entry["kind"] == TENSORS:
            names += [onnx_safe_name(f"{entry['name']}[{i}]") for i in range(entry["count"])]
        else:
            names.append(onnx_safe_name(entry["name"]))
    return names


def segment_metadata(segment: str, inputs: Sequence[Mapping[str, Any]],
                     outputs: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """The metadata_props that record segment `segment`'s input and output entries in its model."""
    return {SEGMENT_METADATA: json.dumps({"segment": segment, "inputs": inputs, "outputs": outputs})}


def read_segment_metadata(model: Any) -> dict[str, Any] | None:
    """The segment record ({"segment", "inputs", "outputs"}) of an onnx.ModelProto, None when it has none."""
    metadata = {p.key: p.value for p in model.metadata_props}
    return json.loads(metadata[SEGMENT_METADATA]) if SEGMENT_METADATA in metadata else None


def flatten_values(entries: Sequence[Mapping[str, Any]], values: Sequence[Any],
                   device: torch.device | None = None) -> list[torch.Tensor]:
    """A segment's input values as the model's flat input tensors, laid out as the entries say: a tensor is
    one, a list of tensors one per item, a size a float vector of that length on `device`."""
    flat: list[torch.Tensor] = []
    for entry, value in zip(entries, values):
        if entry["kind"] == TENSORS:
            flat += list(value)
        elif entry["kind"] == SIZE:
            flat.append(torch.empty(int(value), device=device))
        else:
            flat.append(value)
    return flat


def regroup_values(entries: Sequence[Mapping[str, Any]], outputs: Sequence[torch.Tensor]) -> tuple[Any, ...]:
    """The model's flat output tensors back as the segment's values: lists regrouped, sizes (int64
    scalars) as ints."""
    values: list[Any] = []
    position = 0
    for entry in entries:
        if entry["kind"] == TENSORS:
            values.append(list(outputs[position:position + int(entry["count"])]))
            position += int(entry["count"])
        else:
            values.append(int(outputs[position].item()) if entry["kind"] == SIZE else outputs[position])
            position += 1
    return tuple(values)


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
