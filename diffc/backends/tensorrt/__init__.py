"""The TensorRT backend: one engine per Plan segment, built from the segment's ONNX model.

Each segment is exported to ONNX (state tensors as extra inputs/outputs), lowered to Q/DQ form when the
precision is low-bit (from the quantization pass's precision annotations) and then to half precision
(diffc.backends.onnx_half: the layers left unquantized compute in fp16, or bf16 for a bf16 model, as
ModelOpt builds them; inputs and outputs stay fp32), checked against TensorRT's
ONNX contract (diffc.backends.tensorrt.contract) on the CPU, and built (diffc.backends.tensorrt.build):
weakly typed with the FP16/BF16 builder flag for float targets, as a strongly typed network for Q/DQ
graphs (the Q/DQ nodes then fix every precision). Optimization profiles cover the batch (CFG), resolution
and text-length ranges the user asks for; the timing cache persists across builds. At run time each
segment's EngineRunner (diffc.backends.tensorrt.runner) binds torch CUDA tensors directly.

This module holds the backend class, the machine checks (TensorRT installed, GPU capability, engines built
for this GPU and TensorRT version) and the per-segment pipeline up to the engine builder. `tensorrt` is
imported only inside functions: the package imports (and reports why the target is not available) on
machines without TensorRT."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..._progress import progress
from ...errors import ArtifactError, TargetError
from ...ir import CompiledPlan, Plan
from ...ir.onnx_export import EXTERNAL_DATA_THRESHOLD as EXTERNAL_DATA_BYTES
from ...ir.onnx_export import export_plan
from ...ir.onnx_segments import SEGMENT_METADATA, flat_count, onnx_io, read_segment_metadata
from ...ir.precision import FP8, precision_specs
from ..base import LOW_BIT, PRECISIONS, Backend
from ..onnx_weights import map_weights
from .build import BuildSettings, build_engine, check_profile_names, dim_ranges, dim_value
from .contract import check_tensorrt_contract
from .refit import EngineRefit, weight_record
from .runner import EngineRunner

INSTALL_HINT = ("TensorRT is not installed. On a machine with an NVIDIA GPU and CUDA, install NVIDIA's `tensorrt` "
                "package from PyPI (`pip install tensorrt`, or `pip install \"diffc[tensorrt]\"`); see "
                "https://docs.nvidia.com/deeplearning/tensorrt/latest/installing-tensorrt/installing.html")
# The GPU generation a precision needs in hardware (compute capability), below which TensorRT cannot
# build it: BF16 from Ampere, FP8 from Ada/Hopper.
MIN_CAPABILITY = {"bf16": (8, 0), "fp8": (8, 9)}
ENGINE_DIR = "engines"
SEGMENT_KEYS = ("inputs", "outputs", "entries")

__all__ = ["ENGINE_DIR", "INSTALL_HINT", "MIN_CAPABILITY", "BuildSettings", "EngineRunner", "TensorRTBackend",
           "build_engine", "check_built_for", "check_profile_names", "dim_ranges", "dim_value", "machine_description",
           "segment_io", "tensorrt_version"]


class TensorRTBackend(Backend):
    name = "trt"
    options = ("profiles", "optimization_level", "workspace_bytes", "timing_cache", "cuda_graph", "opset", "refit",
               "high_precision_dtype")
    default_precision = "fp16"

    @classmethod
    def unavailable_reason(cls, precision: str) -> str | None:
        if precision not in PRECISIONS:
            return f"the TensorRT backend has no precision {precision!r}"
        if tensorrt_version() is None:
            return INSTALL_HINT
        if not torch.cuda.is_available():
            return ("TensorRT runs on NVIDIA GPUs and torch sees no CUDA device; install a CUDA build of torch "
                    "on a machine with an NVIDIA GPU")
        return None

    def runs_low_bit_convolutions(self, device: torch.device) -> bool:
        # TensorRT fuses a convolution's Q/DQ pairs into its int8 and fp8 convolution kernels
        return device.type == "cuda"

    def compile(self, plan: Plan, precision: str, device: Any = None, compile: bool = False,
                engines: Mapping[str, Mapping[str, Any]] | None = None, built_for: Mapping[str, str] | None = None,
                progress_bar: bool = False, **options: Any) -> CompiledPlan:
        """Builds one engine per segment, or, given `engines` ({segment: {"engine": bytes, "inputs",
        "outputs", "entries" as segment_io gives them}}) and `built_for` from a saved artifact (see
        artifact_options), loads them after checking they were built for this GPU and TensorRT version.

        Options: `profiles` {dim name: (min, opt, max) or size} for the ONNX dynamic dims (batch, height,
        width, tokens, text_len; unnamed dims default to `calibrated_profiles`, the sizes calibration ran
        at, which optimize passes, and else to the captured example size), `optimization_level`
        (0-5), `workspace_bytes` (memory pool limit), `timing_cache` (a file, or None for none),
        `cuda_graph` (replay each segment through a captured CUDA graph), `opset`, `refit` (default True:
        engines built refittable, so a LoRA swap or recalibrate refits them in place instead of a rebuild),
        `high_precision_dtype` (low-bit targets: what the unquantized layers compute in, "fp16", "bf16" or
        "fp32"; default bf16 for a bf16 model, else fp16, as ModelOpt builds them)."""
        _check_static_activations(plan)
        self.check_request(precision, compile, "TensorRT engines")
        settings = BuildSettings.from_options(options)
        device = _cuda_device(device)
        here = machine_description(device)
        _check_capability(required_formats(plan, precision, settings.high_precision_dtype), precision, device)
        io: dict[str, dict[str, Any]]
        if engines is not None:
            check_built_for(built_for or {}, here)
            io = {name: {key: engines[name][key] for key in (*SEGMENT_KEYS, "weights") if key in engines[name]}
                  for name in plan.segments}
            serialized = {name: bytes(engines[name]["engine"]) for name in plan.segments}
        else:
            serialized, io = _build_all(plan, precision, settings, progress_bar)
        runners = {name: EngineRunner(serialized[name], name, io[name], device, settings.cuda_graph)
                   for name in plan.segments}
        files = {f"{ENGINE_DIR}/{name}.plan": data for name, data in serialized.items()}
        info = {"built_for": here, "settings": settings.to_json(),
                "segments": {name: {"file": f"{ENGINE_DIR}/{name}.plan", **io[name]} for name in plan.segments}}
        swap = EngineRefit(plan, runners, files, {n: f"{ENGINE_DIR}/{n}.plan" for n in plan.segments}, io,
                           engines) if settings.refit else None
        return CompiledPlan(plan=plan, runners=runners, backend=self.name, precision=precision, device=device,
                            input_dtype=torch.float32, files=files, info=info,
                            refit=swap.refit if swap else None, rescale=swap.rescale if swap else None)

    @classmethod
    def artifact_options(cls, root: str | os.PathLike[str], manifest: Mapping[str, Any]) -> dict[str, Any]:
        """The compile options that load a saved artifact's engines instead of rebuilding them: the engine
        bytes, the machine they were built for and the build settings."""
        info = manifest["target"].get("info", {})
        segments = info.get("segments", {})
        missing = [name for name in manifest["plan"]["segments"] if name not in segments]
        if missing:
            raise ArtifactError(f"the artifact at {root} has no TensorRT engine for segments {missing}; re-create it "
                                "with diffc.optimize(..., target='trt-...') and fast.save()")
        engines = {name: {"engine": (Path(root) / entry["file"]).read_bytes(),
                          **{key: entry[key] for key in (*SEGMENT_KEYS, "weights") if key in entry}}
                   for name, entry in segments.items()}
        return {"engines": engines, "built_for": info.get("built_for", {}), **info.get("settings", {})}


def tensorrt_version() -> str | None:
    """The installed TensorRT's version, None when there is none (type stubs alone leave an empty
    namespace package named tensorrt, so a found module is not enough)."""
    try:
        import tensorrt as trt
    except ImportError:
        return None
    version = getattr(trt, "__version__", None)
    return version if isinstance(version, str) else None


def _cuda_device(device: Any) -> torch.device:
    chosen: torch.device = torch.device(device or "cuda")
    if chosen.type != "cuda":
        raise TargetError(f"TensorRT engines run on CUDA devices, not {chosen}; move the model to the GPU "
                          "(pipe.to('cuda')) or pass device='cuda'")
    return chosen


def machine_description(device: torch.device) -> dict[str, str]:
    """The GPU and TensorRT version engines built here are bound to."""
    import tensorrt as trt

    props = torch.cuda.get_device_properties(device)
    return {"gpu": props.name, "compute_capability": f"{props.major}.{props.minor}", "tensorrt": trt.__version__}


def check_built_for(built_for: Mapping[str, str], here: Mapping[str, str]) -> None:
    """Refuses engines built for another GPU model or TensorRT version: TensorRT engines are tied to both."""
    wanted = ("gpu", "compute_capability", "tensorrt")
    if not all(built_for.get(key) for key in wanted):
        raise ArtifactError("the TensorRT engines carry no record of the GPU and TensorRT version they were built "
                            "for; re-create the artifact with this diffc (diffc.optimize(..., target='trt-...'))")
    differ = [key for key in wanted if str(built_for[key]) != str(here[key])]
    if differ:
        raise ArtifactError(
            f"the TensorRT engines were built for {built_for['gpu']} (compute capability "
            f"{built_for['compute_capability']}) with TensorRT {built_for['tensorrt']}, but this machine has "
            f"{here['gpu']} (compute capability {here['compute_capability']}) with TensorRT {here['tensorrt']}. "
            "Engines run only on the GPU model and TensorRT version they were built for: rebuild them here with "
            "diffc.optimize(..., target='trt-...') (or export the ONNX deployment and build on the serving GPU).")


def _check_static_activations(plan: Plan) -> None:
    dynamic = sorted(node for node, spec in precision_specs(plan.graph.annotations).items()
                     if spec.activation is not None and spec.activation.dynamic is not None)
    if dynamic:
        raise TargetError(f"TensorRT's int8 Q/DQ takes static activation scales, and {len(dynamic)} layers "
                          f"({', '.join(dynamic[:3])}) compute theirs at run time (int8_dynamic); optimize for "
                          "trt-int8 (static scales), or run this model with a torch or ort target")


def required_formats(plan: Plan, precision: str, high_precision: str | None) -> set[str]:
    """What the engines of `plan` at `precision` compute in that a GPU must support: the target's own
    precision, every format the annotations of a low-bit target use (a mixed target's fp8 layers)
    and the half precision its unquantized layers run in."""
    needed = {precision}
    if precision in LOW_BIT:
        needed.add(_high_precision(plan, high_precision))
        for spec in precision_specs(plan.graph.annotations).values():
            for part in (spec.weight, spec.activation, *spec.operands):
                if part is not None:
                    needed.add("fp8" if part.dtype == FP8 else part.dtype)
    return needed


def _check_capability(needed: set[str], precision: str, device: torch.device) -> None:
    have = torch.cuda.get_device_capability(device)
    missing = sorted((MIN_CAPABILITY[f], f) for f in needed if f in MIN_CAPABILITY and have < MIN_CAPABILITY[f])
    if missing:
        (major, minor), what = missing[-1]
        raise TargetError(f"trt-{precision} computes in {what}, which needs a GPU of compute capability {major}.{minor} "
                          f"or newer; {torch.cuda.get_device_name(device)} has {have[0]}.{have[1]}. Use trt-fp16 or "
                          "trt-int8 (with high_precision_dtype='fp16' for a bf16 model), without fp8 layers")


def _high_precision(plan: Plan, option: str | None) -> str:
    return option or ("bf16" if plan.graph.signature.source_dtype == "bfloat16" else "fp16")


def _lower_precision(model: Any, plan: Plan, segment: str, precision: str, high_precision: str | None) -> Any:
    """The segment's ONNX model with Q/DQ nodes for the quantization pass's precision annotations,
    computing in `high_precision` (None: bf16 for a bf16 model, else fp16) where it is not quantized:
    the engine is strongly typed, so an fp32 model would run those layers in fp32."""
    if precision not in LOW_BIT:
        return model
    from ..onnx_half import half_precision_model
    from ..onnx_qdq import quantize_segment_onnx

    lowered = quantize_segment_onnx(model, plan.segments[segment].module, plan.graph.annotations, precision)
    dtype = _high_precision(plan, high_precision)
    return lowered if dtype == "fp32" else half_precision_model(lowered, dtype)


def _build_all(plan: Plan, precision: str, settings: BuildSettings,
               progress_bar: bool) -> tuple[dict[str, bytes], dict[str, dict[str, Any]]]:
    """Exports, lowers and checks every segment first (cheap, CPU), then builds the engines."""
    import onnx

    io: dict[str, dict[str, Any]] = {}
    lowered: dict[str, Path] = {}
    example_sizes = _example_sizes(plan)
    with tempfile.TemporaryDirectory(prefix="diffc-trt-") as tmp:
        paths = export_plan(plan, Path(tmp) / "onnx", opset=settings.opset)
        for name in plan.segments:
            exported = onnx.load(str(paths[name]))
            map_weights(exported, plan.segments[name].module)
            model = _lower_precision(exported, plan, name, precision, settings.high_precision_dtype)
            check_tensorrt_contract(model, precision, segment=name)
            io[name] = {**segment_io(model, plan, name), "weights": weight_record(model)}
            lowered[name] = Path(tmp) / "lowered" / f"{name}.onnx"
            lowered[name].parent.mkdir(parents=True, exist_ok=True)
            weights = sum(len(t.raw_data) for t in model.graph.initializer)
            onnx.save(model, str(lowered[name]), save_as_external_data=weights >= EXTERNAL_DATA_BYTES)
        check_profile_names(settings.profiles, io)
        engines = {}
        for name in progress(list(plan.segments), progress_bar, "TensorRT engines", "segment"):
            ranges = dim_ranges(io[name]["inputs"], {**settings.calibrated_profiles, **settings.profiles},
                                example_sizes, name)
            engines[name] = build_engine(lowered[name], precision, ranges, settings, name)
    return engines, io


def segment_io(model: Any, plan: Plan, name: str) -> dict[str, Any]:
    """The ONNX values of a segment model (onnx_io) with the segment's entries from the exporter's
    metadata: how the segment's values map onto ONNX values (a tensor, a list of tensors, a size)."""
    io = onnx_io(model)
    entries = read_segment_metadata(model)
    if entries is None:
        raise TargetError(f"the ONNX model of segment {name!r} has no {SEGMENT_METADATA!r} metadata; export it "
                          "with diffc.ir.onnx_export.export_plan")
    segment = plan.segments[name]
    flat = (sum(flat_count(e) for e in entries["inputs"]), sum(flat_count(e) for e in entries["outputs"]))
    if ([e["name"] for e in entries["inputs"]] != list(segment.inputs)
            or [e["name"] for e in entries["outputs"]] != list(segment.outputs)
            or flat != (len(io["inputs"]), len(io["outputs"]))):
        raise TargetError(f"the ONNX model of segment {name!r} does not match the segment's inputs and outputs "
                          f"{list(segment.inputs)} -> {list(segment.outputs)}; export the plan again with "
                          "export_plan (report it as a bug if it persists)")
    return {**io, "entries": {"inputs": entries["inputs"], "outputs": entries["outputs"]}}


def _example_sizes(plan: Plan) -> dict[str, int]:
    return {dim: size for spec in plan.graph.signature.inputs
            for dim, size in zip(spec.shape, spec.example_shape) if isinstance(dim, str)}
