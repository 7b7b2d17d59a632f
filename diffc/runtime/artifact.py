"""Artifacts on disk: a manifest (JSON), graphs (JSON), weights (safetensors) and backend files.

Writes are atomic (a temporary sibling folder renamed into place), every file's SHA-256 is in the
manifest and checked on load, and nothing is ever unpickled."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..errors import ArtifactError
from ..ir import Block, DiffusionGraph, Plan, Schedule, Segment, Signature, StepPlan, Variant
from ..ir.graph_file import unique_weights
from ..ir.serialize import graph_from_json, graph_to_json
from ..ir.weight_storage import pack_weights, quantized_weight_schemes, unpack_weights

FORMAT = "diffc-artifact-1"
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"


def diffc_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("diffc")
    except PackageNotFoundError:
        return "0+unknown"


def save_artifact(path: str | os.PathLike[str], plan: Plan, target: dict[str, Any],
                  files: dict[str, bytes] | None = None, overwrite: bool = False) -> Path:
    """Writes `plan` (and the backend's `files`) to the folder `path`, atomically."""
    final = Path(path)
    if final.exists() and not overwrite:
        raise ArtifactError(f"{final} already exists; choose another folder or pass overwrite=True")
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        manifest = _write_contents(staging, plan, target, files or {})
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        _replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def _write_contents(root: Path, plan: Plan, target: dict[str, Any], files: dict[str, bytes]) -> dict[str, Any]:
    modules = [segment.module for segment in plan.segments.values()]
    weights, aliases = unique_weights(modules)
    weights, quantized = pack_weights(weights, quantized_weight_schemes(modules, plan.graph.annotations, aliases))
    save_file(weights, str(root / WEIGHTS))
    segments = {}
    (root / "graphs").mkdir()
    for name, segment in plan.segments.items():
        rel = f"graphs/{name}.json"
        (root / rel).write_text(json.dumps(graph_to_json(segment.module.graph)))
        segments[name] = {"graph": rel, "inputs": list(segment.inputs), "outputs": list(segment.outputs)}
    source = next((name for name, seg in plan.segments.items() if seg.module is plan.graph.module), None)
    if source is None:
        (root / "graphs" / "source.json").write_text(json.dumps(graph_to_json(plan.graph.module.graph)))
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    dg = plan.graph
    # No clocks in an artifact: the same model, seeds and config must give the same bytes.
    return {
        "format": FORMAT,
        "versions": {"diffc": diffc_version(), "torch": torch.__version__},
        "target": target,
        "signature": dg.signature.to_json(),
        "config": dg.config,
        "blocks": [b.to_json() for b in dg.blocks],
        "applied": [{key: value for key, value in entry.items() if key != "seconds"} for entry in dg.applied],
        "annotations": dg.annotations,
        "step_plan": dg.step_plan.to_json() if dg.step_plan is not None else None,
        "source_graph": {"segment": source} if source else {"graph": "graphs/source.json"},
        "plan": {"segments": segments, "variants": {k: list(v.segments) for k, v in plan.variants.items()},
                 "schedule": plan.schedule.to_json(), "outputs": list(plan.outputs), "state": list(plan.state),
                 "metadata": plan.metadata},
        "weights": {"file": WEIGHTS, "aliases": aliases, "quantized": quantized},
        "files": {str(p.relative_to(root)): _sha256(p) for p in sorted(root.rglob("*")) if p.is_file()},
    }


def _replace(staging: Path, final: Path) -> None:
    if not final.exists():
        os.rename(staging, final)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
    os.rename(final, retired / "content")
    os.rename(staging, final)
    shutil.rmtree(retired, ignore_errors=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Reads and verifies an artifact's manifest: format, and every file's hash."""
    root = Path(path)
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"{root} is not a diffc artifact (no {MANIFEST}); save one with fast.save(dir)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{manifest_path} is not valid JSON ({exc}); the artifact is corrupt") from exc
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{root} has format {manifest.get('format')!r}; this diffc "
                            f"({diffc_version()}) reads {FORMAT!r}. Re-create the artifact with this version.")
    _check_versions(root, manifest.get("versions", {}))
    for rel, digest in manifest["files"].items():
        file = root / rel
        if not file.is_file():
            raise ArtifactError(f"artifact file {rel} is missing from {root}; the artifact is incomplete")
        if _sha256(file) != digest:
            raise ArtifactError(f"artifact file {rel} does not match its SHA-256 in the manifest: it was modified "
                                "or corrupted. Re-create the artifact; diffc does not load tampered files.")
    return manifest


def _release(version: str) -> str:
    """major.minor: releases that share it keep the operator schemas a saved graph refers to."""
    return ".".join(version.split("+")[0].split(".")[:2])


def _check_versions(root: Path, saved: dict[str, str]) -> None:
    here = {"diffc": diffc_version(), "torch": torch.__version__}
    for package, version in here.items():
        if package in saved and _release(saved[package]) != _release(version):
            raise ArtifactError(
                f"{root} was saved with {package} {saved[package]}, but this environment has {package} {version}; "
                f"graphs saved by one {package} release are not guaranteed to mean the same in another. Re-create the "
                f"artifact with diffc.optimize(...).save(...) here, or load it where {package}=={saved[package]} "
                "is installed.")


def load_plan(path: str | os.PathLike[str], manifest: dict[str, Any]) -> Plan:
    root = Path(path)
    # fresh allocations: mmap-backed tensors can be misaligned, which changes CPU kernel paths
    # and so the last bits of the outputs
    stored = {name: tensor.clone() for name, tensor in load_file(str(root / manifest["weights"]["file"])).items()}
    weights = unpack_weights(stored, manifest["weights"].get("quantized", {}))
    for alias, stored in manifest["weights"]["aliases"].items():
        weights[alias] = weights[stored]
    segments = {}
    for name, entry in manifest["plan"]["segments"].items():
        graph = graph_from_json(json.loads((root / entry["graph"]).read_text()))
        needed = {n.target: weights[n.target] for n in graph.nodes if n.op == "get_attr"}
        module = torch.fx.GraphModule(needed, graph)
        segments[name] = Segment(name, module, tuple(entry["inputs"]), tuple(entry["outputs"]))
    plan_data = manifest["plan"]
    source = manifest["source_graph"]
    if "segment" in source:
        main = segments[source["segment"]].module
    else:
        graph = graph_from_json(json.loads((root / source["graph"]).read_text()))
        main = torch.fx.GraphModule({n.target: weights[n.target] for n in graph.nodes if n.op == "get_attr"}, graph)
    dg = DiffusionGraph(module=main, signature=Signature.from_json(manifest["signature"]),
                        blocks=[Block.from_json(b) for b in manifest["blocks"]], config=manifest["config"],
                        applied=manifest["applied"], annotations=manifest["annotations"],
                        step_plan=StepPlan.from_json(manifest["step_plan"]) if manifest["step_plan"] else None)
    plan = Plan(graph=dg, segments=segments,
                variants={k: Variant(k, tuple(v)) for k, v in plan_data["variants"].items()},
                schedule=Schedule.from_json(plan_data["schedule"]), outputs=tuple(plan_data["outputs"]),
                state=tuple(plan_data["state"]), metadata=plan_data["metadata"])
    plan.check()
    return plan
