"""Deployment folders: an artifact that `diffc.load` reads back, plus what a server needs.

    out/
      manifest.json, graphs/, weights.safetensors   the artifact (every file hashed in the manifest)
      engines/<segment>.plan                        TensorRT targets: one engine per segment
      schedule.json                                 which segments each denoising step runs, and the state
      triton/<segment>/config.pbtxt, 1/model.*      a Triton Inference Server model repository
      README.md                                     how to serve it

Every file is in the manifest, so a tampered engine, ONNX model or config is refused at load. The
manifest's target records, for engines, the GPU (name, compute capability) and TensorRT version they
were built for. The step schedule is stateful (cached features cross steps), so Triton serves the
segments and the client (or a BLS model) drives the steps: there is no ensemble."""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import ArtifactError
from ..ir import Plan
from ..ir.onnx_segments import onnx_io, read_segment_metadata
from ..ir.served_files import served_file
from .artifact import MANIFEST, WEIGHTS, diffc_version, load_plan, read_manifest, save_artifact

DEPLOYMENT_FORMAT = "diffc-deployment-1"
SCHEDULE = "schedule.json"
README = "README.md"
TRITON = "triton"
# ONNX element types (TensorProto names) -> Triton data types (model_config.proto)
TRITON_TYPES = {"FLOAT": "TYPE_FP32", "FLOAT16": "TYPE_FP16", "BFLOAT16": "TYPE_BF16", "DOUBLE": "TYPE_FP64",
                "INT64": "TYPE_INT64", "INT32": "TYPE_INT32", "INT16": "TYPE_INT16", "INT8": "TYPE_INT8",
                "UINT8": "TYPE_UINT8", "BOOL": "TYPE_BOOL"}
# precisions whose segment graphs carry quantization annotations that a plain ONNX export would drop
LOW_BIT = ("fp8", "int8", "int4", "mixed")
PLATFORMS = {".onnx": ("onnxruntime_onnx", "model.onnx"), ".plan": ("tensorrt_plan", "model.plan")}


def export_deployment(fast_or_artifact: Any, out: str | os.PathLike[str], overwrite: bool = False,
                      opset: int = 21, progress_bar: bool = False) -> Path:
    """Writes the deployment folder of an OptimizedModel or of a saved artifact folder to `out`
    (atomically) and returns its path. Segments compiled by the backend into files (TensorRT engines,
    ONNX models) are served as they are; for other backends each segment is exported to ONNX."""
    final = Path(out)
    if final.exists() and not overwrite:
        raise ArtifactError(f"{final} already exists; choose another folder or pass overwrite=True")
    with tempfile.TemporaryDirectory(prefix="diffc-export-") as tmp:
        if isinstance(fast_or_artifact, (str, os.PathLike)):
            root = Path(fast_or_artifact)
        else:
            root = fast_or_artifact.save(Path(tmp) / "artifact")
        manifest = read_manifest(root)
        plan = load_plan(root, manifest)
        target = {k: v for k, v in manifest["target"].items() if k != "deployment"}
        files = _backend_files(root, manifest)
        models = _exported_models(root, manifest, plan) or _segment_models(plan, target, files, Path(tmp) / "onnx",
                                                                           opset, progress_bar)
        deployment = {**_triton_repository(plan, models), SCHEDULE: _schedule_json(plan, models).encode()}
        deployment[README] = deployment_readme(plan, target, models).encode()
        files.update(deployment)
        target["deployment"] = {"format": DEPLOYMENT_FORMAT, "files": sorted(deployment),
                                "versions": _versions(), "triton_repository": TRITON}
        return save_artifact(final, plan, target, files, overwrite=overwrite)


def _backend_files(root: Path, manifest: Mapping[str, Any]) -> dict[str, bytes]:
    """The files the backend saved with the artifact (not the artifact's own, nor an earlier export's)."""
    own = {MANIFEST, WEIGHTS, *manifest["target"].get("deployment", {}).get("files", [])}
    return {rel: (root / rel).read_bytes() for rel in manifest["files"]
            if rel not in own and not rel.startswith("graphs/")}


def _segment_models(plan: Plan, target: Mapping[str, Any], files: Mapping[str, bytes], directory: Path, opset: int,
                    progress_bar: bool) -> dict[str, dict[str, Any]]:
    """{segment: {"platform", "model" (file name in Triton), "bytes", "inputs", "outputs", "extra"}}: the
    backend's compiled file where the backend recorded one per segment (info["segments"][name] with
    "file", "inputs", "outputs"), otherwise the segment exported to ONNX."""
    recorded = target.get("info", {}).get("segments", {})
    models: dict[str, dict[str, Any]] = {}
    if all(name in recorded and recorded[name].get("file") in files for name in plan.segments):
        for name in plan.segments:
            entry = recorded[name]
            suffix = Path(entry["file"]).suffix
            if suffix not in PLATFORMS:
                raise ArtifactError(f"segment {name!r} is compiled to {entry['file']}, which Triton cannot serve "
                                    f"(it serves {', '.join(PLATFORMS)} files)")
            platform, filename = PLATFORMS[suffix]
            # ONNX models over 2 GB keep their weights in "<file>.data", which they name; it goes beside them
            data = entry["file"] + ".data"
            extra = {Path(data).name: files[data]} if data in files else {}
            stored = served_file(target["backend"], entry.get("weights_elsewhere", False), files[entry["file"]], plan,
                                 name)
            models[name] = {"platform": platform, "model": filename, "bytes": stored,
                            "inputs": entry["inputs"], "outputs": entry["outputs"], "extra": extra,
                            "entries": entry.get("entries")}
        return models
    if target["precision"] in LOW_BIT:
        raise ArtifactError(f"the {target['backend']}-{target['precision']} model recorded no per-segment model "
                            "files, and a plain ONNX export of its segments would serve them unquantized; export an "
                            f"ort-{target['precision']} or trt-{target['precision']} model, whose segments are "
                            "compiled to quantized ONNX models or engines")

    from ..ir.onnx_export import export_plan

    paths = export_plan(plan, directory, opset=opset, show_progress=progress_bar)
    return {name: _onnx_model(path, list(path.parent.glob(path.name + ".data"))) for name, path in paths.items()}


def _exported_models(root: Path, manifest: Mapping[str, Any], plan: Plan) -> dict[str, dict[str, Any]] | None:
    """The ONNX models an earlier export of this artifact wrote (re-exporting it serves the same files)."""
    if "deployment" not in manifest["target"]:
        return None
    folders = {name: f"{TRITON}/{name}/1/" for name in plan.segments}
    if not all(folder + "model.onnx" in manifest["files"] for folder in folders.values()):
        return None
    return {name: _onnx_model(root / folder / "model.onnx",
                              [root / rel for rel in manifest["files"]
                               if rel.startswith(folder) and rel != folder + "model.onnx"])
            for name, folder in folders.items()}


def _onnx_model(path: Path, extra: Sequence[Path]) -> dict[str, Any]:
    """A segment's ONNX model as the Triton repository serves it, with the exporter's value layout."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    io = onnx_io(proto)
    entries = read_segment_metadata(proto) or {}
    return {"platform": "onnxruntime_onnx", "model": "model.onnx", "bytes": path.read_bytes(),
            "inputs": io["inputs"], "outputs": io["outputs"], "extra": {p.name: p.read_bytes() for p in extra},
            "entries": {k: entries[k] for k in ("inputs", "outputs") if k in entries} or None}


def _triton_repository(plan: Plan, models: Mapping[str, Mapping[str, Any]]) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for name, model in models.items():
        files[f"{TRITON}/{name}/config.pbtxt"] = triton_config(name, model["platform"], model["inputs"],
                                                               model["outputs"]).encode()
        files[f"{TRITON}/{name}/1/{model['model']}"] = model["bytes"]
        for extra, data in model["extra"].items():
            files[f"{TRITON}/{name}/1/{extra}"] = data
    return files


def triton_config(name: str, platform: str, inputs: Sequence[Mapping[str, Any]],
                  outputs: Sequence[Mapping[str, Any]]) -> str:
    """A Triton model configuration (config.pbtxt, protobuf text format) for one segment model: the
    batch dim is an ordinary dynamic dim (max_batch_size 0), every dynamic dim is -1, and a scalar is
    carried as [1] reshaped to []."""
    def tensors(kind: str, specs: Sequence[Mapping[str, Any]]) -> list[str]:
        lines = [f"{kind} ["]
        for index, spec in enumerate(specs):
            if spec["dtype"] not in TRITON_TYPES:
                raise ArtifactError(f"segment {name!r}: {kind} {spec['name']!r} has type {spec['dtype']}, which "
                                    f"Triton does not serve; it serves {', '.join(TRITON_TYPES)}")
            dims = [d if isinstance(d, int) else -1 for d in spec["dims"]]
            lines += ["  {", f"    name: {json.dumps(spec['name'])}", f"    data_type: {TRITON_TYPES[spec['dtype']]}",
                      f"    dims: [ {', '.join(str(d) for d in dims or [1])} ]"]
            if not dims:
                lines.append("    reshape: { shape: [ ] }")
            lines.append("  }," if index < len(specs) - 1 else "  }")
        return lines + ["]"]

    return "\n".join([f"name: {json.dumps(name)}", f"platform: {json.dumps(platform)}", "max_batch_size: 0",
                      *tensors("input", inputs), *tensors("output", outputs)]) + "\n"


def _schedule_json(plan: Plan, models: Mapping[str, Mapping[str, Any]]) -> str:
    """What a client needs to drive the steps: the schedule, each variant's segments in order, and
    per segment the plan values it reads and writes with the Triton model's tensor names."""
    signature = plan.graph.signature
    segments = {name: {"inputs": list(segment.inputs), "outputs": list(segment.outputs),
                       "triton_model": name,
                       "triton_inputs": [s["name"] for s in models[name]["inputs"]],
                       "triton_outputs": [s["name"] for s in models[name]["outputs"]],
                       "values": models[name]["entries"]}
                for name, segment in plan.segments.items()}
    return json.dumps({"format": DEPLOYMENT_FORMAT,
                       "model_inputs": [{"name": s.name, "role": s.role, "dtype": s.dtype, "shape": list(s.shape)}
                                        for s in signature.inputs],
                       "model_outputs": list(plan.outputs), "state": list(plan.state),
                       "schedule": plan.schedule.to_json(),
                       "variants": {k: list(v.segments) for k, v in plan.variants.items()},
                       "segments": segments}, indent=1)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"diffc": diffc_version()}
    for package in ("torch", "onnx", "onnxruntime", "tensorrt"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            continue
    return found


def deployment_readme(plan: Plan, target: Mapping[str, Any], models: Mapping[str, Mapping[str, Any]]) -> str:
    """The README.md inside a deployment folder."""
    backend, precision = target["backend"], target["precision"]
    built_for = target.get("info", {}).get("built_for")
    engines = any(m["platform"] == "tensorrt_plan" for m in models.values())
    lines = [f"# {plan.graph.signature.model_class}, diffc target {backend}-{precision}", "",
             "Exported by diffc. Every file's SHA-256 is in `manifest.json`; diffc refuses a modified file.", "",
             "## Run it with diffc", "", "```python", "import diffc", "fast = diffc.load(\"<this folder>\")",
             "pipe.unet = fast   # or pipe.transformer = fast: the original denoiser's forward signature", "```",
             ""]
    if engines and built_for:
        lines += [f"The TensorRT engines were built for **{built_for['gpu']}** (compute capability "
                  f"{built_for['compute_capability']}) with **TensorRT {built_for['tensorrt']}**. TensorRT engines run "
                  "only on that GPU model with that TensorRT version; diffc refuses them elsewhere. For another GPU, "
                  "rebuild: `diffc export <model> --target "
                  f"{backend}-{precision} --out <folder>` on that machine.", ""]
    lines += ["## Serve it with Triton Inference Server", "",
              f"`{TRITON}/` is a model repository with one model per segment "
              f"({', '.join(sorted({m['platform'] for m in models.values()}))}):", "",
              "```sh", f"tritonserver --model-repository=$PWD/{TRITON}",
              f"# or: docker run --gpus all -v $PWD/{TRITON}:/models nvcr.io/nvidia/tritonserver:<yy.mm>-py3 "
              "tritonserver --model-repository=/models", "```", "",
              "Use a Triton release whose TensorRT version matches the engines' (the NVIDIA container release "
              "notes list it)." if engines else "The ONNX models run on ONNX Runtime's CPU or CUDA execution "
              "provider.", "",
              "## The denoising loop is driven by the client", "",
              "Segments are stateless; the step schedule is not: a cached step reuses features a full step "
              "computed earlier. So Triton serves the segments and the client (or a Triton BLS model) runs each "
              f"step from `{SCHEDULE}`:", "",
              "1. pick the variant of step *i* (`schedule`: `steps[i]`, a repeating pattern when `repeat`, mapped "
              "by position when the loop has another length, `default` otherwise);",
              "2. call the variant's segments in order; each reads plan values (model inputs, earlier segments' "
              "outputs, kept state) and writes its outputs (`triton_inputs`/`triton_outputs` give the Triton "
              "tensor names, in the same order as `inputs`/`outputs`; `values` says how a value maps onto "
              "them: a tensor is one, a list of tensors one per item, a size is an int64 scalar output and, as an "
              "input, a float vector of that length);",
              "3. return `model_outputs`; keep the values named in `state` for the next step "
              "(on the server side with a BLS model, or in the client).", "",
              "Batch (e.g. classifier-free guidance), resolution and text length are dynamic dims (-1 in the "
              "configs); `max_batch_size` is 0 because the batch is part of the tensors' dims.", "",
              "| segment | inputs | outputs |", "|---|---|---|"]
    for name, model in models.items():
        lines.append(f"| `{name}` | {_describe(model['inputs'])} | {_describe(model['outputs'])} |")
    return "\n".join(lines) + "\n"


def _describe(specs: Iterable[Mapping[str, Any]]) -> str:
    return ", ".join(f"`{s['name']}` {s['dtype'].lower()}[{', '.join(str(d) for d in s['dims'])}]" for s in specs)
