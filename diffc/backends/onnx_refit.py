"""New weights (a LoRA swap) or activation scales (recalibrate) written into a compiled ONNX Runtime
plan's models in place, without an export."""
from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..ir import Plan
from .onnx_weights import check_refittable, replace_initializers, weight_tensors


class InPlaceUpdate:
    """New weights (a LoRA swap) or activation scales (recalibrate) for a compiled plan, without an
    export: the initializers that hold them are overwritten in each touched segment's ONNX model
    (the artifact's file too) and only that segment's session is created again. The `models` the plan
    was compiled from are updated as well, so compiling it again with the same options (fast.to(device)
    on a loaded artifact) keeps the new values."""

    def __init__(self, plan: Plan, runners: Mapping[str, Any], files: dict[str, bytes],
                 open_session: Callable[[str, str], Any], models: dict[str, bytes], folder: str) -> None:
        self.plan, self.runners, self.files, self.open_session = plan, runners, files, open_session
        self.models, self.folder = models, folder

    def refit(self, weights: Mapping[str, torch.Tensor]) -> None:
        updates = {}
        for name, runner in self.runners.items():
            used = {n.target for n in self.plan.segments[name].module.graph.nodes if n.op == "get_attr"}
            touched = {w: v for w, v in weights.items() if w in used}
            if touched:
                session = runner.primary
                check_refittable(name, touched, session.weight_map)
                mapping = session.weight_map[0] if session.weight_map else {}
                tensors = weight_tensors(mapping, touched, self.plan.graph.annotations, session.initializer_types)
                specialized = {key: weight_tensors(s.weight_map[0], touched, self.plan.graph.annotations,
                                                   s.initializer_types)
                               for key, s in runner.specialized.items() if _refittable(s, touched)}
                updates[name] = (tensors, specialized)
        for name, (tensors, specialized) in updates.items():  # every value computed (and checked) first
            self._replace(name, tensors, specialized)

    def rescale(self, specs: Mapping[str, Mapping[str, Any]]) -> None:
        from .onnx_qdq_tensors import activation_scale_tensors

        tensors = activation_scale_tensors({node: {"precision": spec} for node, spec in specs.items()})
        for name, runner in self.runners.items():
            held = {k: v for k, v in tensors.items() if k in runner.primary.initializer_types}
            if held:
                specialized = {key: {k: v for k, v in tensors.items() if k in s.initializer_types}
                               for key, s in runner.specialized.items() if s.model_bytes is not None}
                self._replace(name, held, specialized)

    def _replace(self, name: str, tensors: Mapping[str, Any],
                 specialized: Mapping[tuple[Any, ...], Mapping[str, Any]]) -> None:
        """The segment's model and session with `tensors`, and those of its sessions specialized to
        other shapes with theirs (a specialized session left out is exported again on its next use)."""
        import onnx

        kept = {}
        for key, special_tensors in specialized.items():
            special = self.runners[name].specialized[key]
            model = onnx.load_from_string(special.model_bytes)
            replace_initializers(model, special_tensors)
            with tempfile.TemporaryDirectory(prefix="diffc-ort-") as scratch:
                path = Path(scratch) / f"{name}.onnx"
                path.write_bytes(model.SerializeToString())
                kept[key] = self.open_session(name, str(path))
                kept[key].model_bytes = path.read_bytes()

        rel = f"{self.folder}/{name}.onnx"
        model = onnx.load_from_string(self.models[name])
        data = replace_initializers(model, tensors, self.files.get(rel + ".data"))
        self.models[name] = model.SerializeToString()
        self.files[rel] = self.models[name]
        with tempfile.TemporaryDirectory(prefix="diffc-ort-") as scratch:
            path = Path(scratch) / f"{name}.onnx"
            path.write_bytes(self.models[name])
            if data is not None:
                self.files[rel + ".data"] = self.models[name + ".data"] = data
                path.with_name(path.name + ".data").write_bytes(data)
            self.runners[name].use(self.open_session(name, str(path)), kept)


def _refittable(session: Any, touched: Mapping[str, Any]) -> bool:
    """Whether a specialized session can take `touched` in place (else it is exported again)."""
    if session.model_bytes is None or session.weight_map is None:
        return False
    mapping, unmapped = session.weight_map
    return all(name in mapping and name not in unmapped for name in touched)
