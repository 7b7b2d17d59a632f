"""Refitting built engines in place: new weights (a LoRA swap) and new activation scales (recalibrate)
without a rebuild.

Engines are built with BuilderFlag.REFIT (BuildSettings.refit). TensorRT's ONNX parser names an engine's
weights after the ONNX initializers that held them, so the weight map recorded at export
(diffc.backends.onnx_weights: graph weight -> initializers, plain, transposed or quantized) says which
named weights a graph weight's new value goes to, and in what form; the values are computed exactly as
ONNX Runtime's in-place update computes them (float slots cast, quantized slots requantized with new
per-channel scales). Where TensorRT fused a set weight with others, it asks for those too
(`get_missing_weights`): they are supplied from the plan's current weights and annotations. After a
refit, the engine is serialized again into the artifact's files.

`tensorrt` is imported only inside functions, so this module imports on machines without TensorRT."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ...errors import TargetError
from ...ir import Plan
from ..onnx_weights import WeightMap, WeightSlot, check_refittable, in_float_type, weight_tensors

if TYPE_CHECKING:
    import tensorrt as trt

    from .runner import EngineRunner

# ONNX element types (onnx.TensorProto) -> TensorRT DataType names
_TRT_TYPES = {1: "FLOAT", 10: "HALF", 16: "BF16", 3: "INT8", 17: "FP8", 22: "INT4"}


def weight_record(model: Any) -> dict[str, Any] | None:
    """What a refit needs to know of a segment's lowered ONNX model (the one the parser reads), as JSON:
    its weight map, the weights it could not map, the ONNX types of the mapped initializers and the
    activation-scale initializers it holds. None when the model records no weight map."""
    from ..onnx_weights import read_weight_map

    recorded = read_weight_map(model)
    if recorded is None:
        return None
    mapping, unmapped = recorded
    slots = {name for entries in mapping.values() for s in entries for name in (s.initializer, s.scale) if name}
    scales = sorted(i.name for i in model.graph.initializer if i.name.endswith("_input_scale"))
    types = {i.name: int(i.data_type) for i in model.graph.initializer if i.name in slots or i.name in scales}
    return {"map": {w: [asdict(s) for s in entries] for w, entries in mapping.items()}, "unmapped": unmapped,
            "types": types, "scales": scales}


def _recorded(record: Mapping[str, Any] | None) -> tuple[WeightMap, list[str]] | None:
    if record is None:
        return None
    return ({w: [WeightSlot.from_json(s) for s in entries] for w, entries in record["map"].items()},
            list(record["unmapped"]))


class EngineRefit:
    """`refit` and `rescale` of a compiled TensorRT plan (see CompiledPlan). The saved `engines` the plan
    was compiled from (a loaded artifact's) are updated too, so compiling it again with the same options
    keeps the refit weights."""

    def __init__(self, plan: Plan, runners: Mapping[str, "EngineRunner"], files: dict[str, bytes],
                 paths: Mapping[str, str], io: Mapping[str, Mapping[str, Any]],
                 engines: Mapping[str, Any] | None = None) -> None:
        self.plan, self.runners, self.files, self.paths = plan, runners, files, paths
        self.engines = engines
        self.records = {name: io[name].get("weights") for name in runners}

    def refit(self, weights: Mapping[str, torch.Tensor]) -> None:
        updates = {}
        for name in self.runners:
            used = {n.target for n in self.plan.segments[name].module.graph.nodes if n.op == "get_attr"}
            touched = {w: v for w, v in weights.items() if w in used}
            if touched:
                recorded = _recorded(self.records[name])
                check_refittable(name, touched, recorded)
                mapping = recorded[0] if recorded else {}
                updates[name] = weight_tensors(mapping, touched, self.plan.graph.annotations, self._types(name))
        for name, tensors in updates.items():
            self._apply(name, tensors)

    def rescale(self, specs: Mapping[str, Mapping[str, Any]]) -> None:
        from ..onnx_qdq_tensors import activation_scale_tensors

        tensors = activation_scale_tensors({node: {"precision": spec} for node, spec in specs.items()})
        for name in self.runners:
            held = set((self.records[name] or {}).get("scales", ()))
            chosen = {k: v for k, v in tensors.items() if k in held}
            if chosen:
                self._apply(name, chosen)

    def _types(self, segment: str) -> dict[str, int]:
        record = self.records[segment] or {}
        return {str(k): int(v) for k, v in record.get("types", {}).items()}

    def _current(self, segment: str, names: list[str]) -> dict[str, Any]:
        """The current values of named engine weights TensorRT asks for alongside those being set."""
        from ..onnx_qdq_tensors import activation_scale_tensors

        recorded = _recorded(self.records[segment])
        mapping = recorded[0] if recorded else {}
        owners = {name: weight for weight, entries in mapping.items() for s in entries
                  for name in (s.initializer, s.scale) if name}
        needed = {owners[name] for name in names if name in owners}
        weights = self.plan.graph.weights()
        found = weight_tensors({w: mapping[w] for w in needed}, {w: weights[w] for w in needed},
                               self.plan.graph.annotations, self._types(segment))
        scales = activation_scale_tensors(self.plan.graph.annotations)
        found.update({name: scales[name] for name in names if name in scales})
        unknown = sorted(set(names) - set(found))
        if unknown:
            raise TargetError(f"TensorRT fused the weights being refit in segment {segment!r} with {unknown[:3]}, "
                              "whose values diffc does not keep; rebuild the engine (diffc.optimize) with the "
                              "adapter fused into the denoiser")
        return {name: found[name] for name in names}

    def _typed(self, segment: str, tensors: Mapping[str, Any]) -> dict[str, Any]:
        """The tensors in the types the engine's ONNX held them in (a half-precision model's scales)."""
        types = self._types(segment)
        return {name: in_float_type(tensor, types.get(name)) for name, tensor in tensors.items()}

    def _apply(self, segment: str, tensors: Mapping[str, Any]) -> None:
        runner = self.runners[segment]
        refit_engine(runner.engine, self._typed(segment, tensors), segment,
                     lambda names: self._typed(segment, self._current(segment, names)))
        runner.refitted()
        self.files[self.paths[segment]] = bytes(runner.engine.serialize())
        saved = self.engines.get(segment) if self.engines is not None else None
        if isinstance(saved, dict):
            saved["engine"] = self.files[self.paths[segment]]


def refit_engine(engine: "trt.ICudaEngine", tensors: Mapping[str, Any], segment: str,
                 current: Callable[[list[str]], Mapping[str, Any]] | None = None) -> None:
    """Sets `tensors` (onnx TensorProto by initializer name) as the engine's named weights, supplies
    the weights TensorRT fused with them (`current(names)` -> their TensorProto), and refits."""
    import tensorrt as trt

    if not engine.refittable:
        raise TargetError(f"the TensorRT engine of segment {segment!r} was built without refit=True, so it cannot "
                          "take new weights in place; build it again (diffc.optimize(..., target='trt-...'))")
    refitter = trt.Refitter(engine, trt.Logger(trt.Logger.WARNING))
    keep: list[np.ndarray] = []  # the host buffers TensorRT reads until the refit is done

    def put(values: Mapping[str, Any]) -> None:
        for name, tensor in values.items():
            weights, buffer = _trt_weights(tensor)
            keep.append(buffer)
            if not refitter.set_named_weights(name, weights):
                raise TargetError(f"TensorRT refused new values for weights {name!r} of segment {segment!r} (no "
                                  "refittable weights of that name, or another size); rebuild the engine")

    put(tensors)
    missing = [name for name in refitter.get_missing_weights() if name and name not in tensors]
    if missing:
        if current is None:
            raise TargetError(f"TensorRT needs weights {missing[:3]} of segment {segment!r} refit too")
        put(current(missing))
    if not refitter.refit_cuda_engine():
        raise TargetError(f"TensorRT could not refit the engine of segment {segment!r} (weights still missing: "
                          f"{[n for n in refitter.get_missing_weights() if n][:3]}); its log above says why")


def _trt_weights(tensor: Any) -> tuple["trt.Weights", np.ndarray]:
    """A TensorRT Weights view of an onnx TensorProto's data, and the buffer that must outlive it."""
    import tensorrt as trt
    from onnx import numpy_helper

    kind = _TRT_TYPES.get(int(tensor.data_type))
    if kind is None:
        raise TargetError(f"initializer {tensor.name!r} has ONNX type {tensor.data_type}, which diffc does not refit")
    raw = bytes(tensor.raw_data) if tensor.raw_data else numpy_helper.to_array(tensor).tobytes()
    buffer = np.frombuffer(raw, dtype=np.uint8).copy()
    count = int(np.prod([int(d) for d in tensor.dims])) if len(tensor.dims) else 1
    return trt.Weights(getattr(trt.DataType, kind), int(buffer.ctypes.data), count), buffer


__all__ = ["EngineRefit", "refit_engine", "weight_record"]
