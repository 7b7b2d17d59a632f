"""The TensorRT backend: one engine per Plan segment, built from the segment's ONNX model.

Each segment is exported to ONNX (state tensors as extra inputs/outputs), lowered to Q/DQ form when the
precision is low-bit (from the quantization pass's precision annotations), checked against TensorRT's
ONNX contract (diffc.backends.onnx_contract) on the CPU, and built: weakly typed with the FP16/BF16 builder
flag for float targets, as a strongly typed network for Q/DQ graphs (the Q/DQ nodes then fix every
precision). Optimization profiles cover the batch (CFG), resolution and text-length ranges the user asks
for; the timing cache persists across builds. At run time each segment binds torch CUDA tensors directly
(`set_tensor_address` + `execute_async_v3` on torch's current stream), so cached state stays on the GPU
between segments and steps, optionally replayed through a captured CUDA graph.

`tensorrt` is imported only inside functions: this module imports (and reports why the target is not
available) on machines without TensorRT."""
from __future__ import annotations

import ast
import json
import operator
import os
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .._progress import progress
from ..errors import ArtifactError, DiffcError, InputError, TargetError
from ..ir import CompiledPlan, Plan
from ..ir.onnx_export import EXTERNAL_DATA_THRESHOLD as EXTERNAL_DATA_BYTES
from ..ir.onnx_export import SEGMENT_METADATA, export_plan
from .base import LOW_BIT, PRECISIONS, Backend
from .onnx_contract import check_tensorrt_contract, onnx_io

if TYPE_CHECKING:
    import tensorrt as trt

INSTALL_HINT = ("TensorRT is not installed. On a machine with an NVIDIA GPU and CUDA, install NVIDIA's `tensorrt` "
                "package from PyPI (`pip install tensorrt`, or `pip install \"diffc[tensorrt]\"`); see "
                "https://docs.nvidia.com/deeplearning/tensorrt/latest/installing-tensorrt/installing.html")
# The GPU generation a precision needs in hardware (compute capability), below which TensorRT cannot
# build it: BF16 from Ampere, FP8 from Ada/Hopper.
MIN_CAPABILITY = {"bf16": (8, 0), "fp8": (8, 9)}
ENGINE_DIR = "engines"
DEFAULT_TIMING_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "diffc" / "tensorrt.timing"
# TensorRT's builder optimization levels (IBuilderConfig.builder_optimization_level): 0 (fastest build)
# to 5; TensorRT's default is 3.
OPTIMIZATION_LEVELS = range(0, 6)
_TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
                 "INT64": torch.int64, "BOOL": torch.bool, "UINT8": torch.uint8, "INT8": torch.int8,
                 "FP8": torch.float8_e4m3fn}


class TensorRTBackend(Backend):
    name = "trt"
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

    def compile(self, plan: Plan, precision: str, device: Any = None, compile: bool = False,
                engines: Mapping[str, Mapping[str, Any]] | None = None, built_for: Mapping[str, str] | None = None,
                progress_bar: bool = False, **options: Any) -> CompiledPlan:
        """Builds one engine per segment, or, given `engines` ({segment: {"engine": bytes, "inputs",
        "outputs", "entries" as segment_io gives them}}) and `built_for` from a saved artifact (see
        artifact_options), loads them after checking they were built for this GPU and TensorRT version.

        Options: `profiles` {dim name: (min, opt, max) or size} for the ONNX dynamic dims (batch, height,
        width, tokens, text_len; unnamed dims default to the captured example size), `optimization_level`
        (0-5), `workspace_bytes` (memory pool limit), `timing_cache` (a file, or None for none),
        `cuda_graph` (replay each segment through a captured CUDA graph), `opset`."""
        self.check_request(precision, compile, "TensorRT engines")
        settings = BuildSettings.from_options(options)
        device = _cuda_device(device)
        here = machine_description(device)
        _check_capability(precision, device)
        io: dict[str, dict[str, Any]]
        if engines is not None:
            check_built_for(built_for or {}, here)
            io = {name: {key: engines[name][key] for key in ("inputs", "outputs", "entries")}
                  for name in plan.segments}
            serialized = {name: bytes(engines[name]["engine"]) for name in plan.segments}
        else:
            serialized, io = _build_all(plan, precision, settings, progress_bar)
        runners = {name: EngineRunner(serialized[name], name, io[name], device, settings.cuda_graph)
                   for name in plan.segments}
        files = {f"{ENGINE_DIR}/{name}.plan": data for name, data in serialized.items()}
        info = {"built_for": here, "settings": settings.to_json(),
                "segments": {name: {"file": f"{ENGINE_DIR}/{name}.plan", **io[name]} for name in plan.segments}}
        return CompiledPlan(plan=plan, runners=runners, backend=self.name, precision=precision, device=device,
                            input_dtype=torch.float32, files=files, info=info)

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
                          **{key: entry[key] for key in ("inputs", "outputs", "entries")}}
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


@dataclass(frozen=True)
class BuildSettings:
    profiles: Mapping[str, tuple[int, int, int]] = field(default_factory=dict)
    optimization_level: int = 3
    workspace_bytes: int | None = None
    timing_cache: Path | None = DEFAULT_TIMING_CACHE
    cuda_graph: bool = False
    opset: int = 21

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> "BuildSettings":
        known = {"profiles", "optimization_level", "workspace_bytes", "timing_cache", "cuda_graph", "opset"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TargetError(f"the TensorRT backend has no option {', '.join(unknown)}; it takes "
                              f"{', '.join(sorted(known))}")
        profiles = {str(k): _profile_range(str(k), v) for k, v in dict(options.get("profiles") or {}).items()}
        level = options.get("optimization_level", 3)
        if not isinstance(level, int) or level not in OPTIMIZATION_LEVELS:
            raise TargetError(f"optimization_level must be an integer from 0 to 5 (TensorRT's default is 3), "
                              f"got {level!r}")
        workspace = options.get("workspace_bytes")
        if workspace is not None and (not isinstance(workspace, int) or workspace <= 0):
            raise TargetError(f"workspace_bytes must be a positive number of bytes (e.g. 4 << 30), got {workspace!r}")
        cache = options.get("timing_cache", DEFAULT_TIMING_CACHE)
        return cls(profiles=profiles, optimization_level=level, workspace_bytes=workspace,
                   timing_cache=None if cache is None else Path(cache), cuda_graph=bool(options.get("cuda_graph")),
                   opset=int(options.get("opset", 21)))

    def to_json(self) -> dict[str, Any]:
        return {"profiles": {k: list(v) for k, v in self.profiles.items()},
                "optimization_level": self.optimization_level, "workspace_bytes": self.workspace_bytes,
                "timing_cache": None if self.timing_cache is None else str(self.timing_cache),
                "cuda_graph": self.cuda_graph, "opset": self.opset}


def _profile_range(name: str, value: Any) -> tuple[int, int, int]:
    """(min, opt, max) from a size or a (min, opt, max) triple."""
    triple = (value, value, value) if isinstance(value, int) else tuple(value) if isinstance(value, Sequence) else ()
    if len(triple) != 3 or not all(isinstance(v, int) and v > 0 for v in triple) or not (
            triple[0] <= triple[1] <= triple[2]):
        raise TargetError(f"profile {name!r} must be a positive size or (min, opt, max) with min <= opt <= max, "
                          f"got {value!r}; e.g. profiles={{'batch': (1, 2, 4)}}")
    return (int(triple[0]), int(triple[1]), int(triple[2]))


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


def _check_capability(precision: str, device: torch.device) -> None:
    need = MIN_CAPABILITY.get(precision)
    have = torch.cuda.get_device_capability(device)
    if need and have < need:
        raise TargetError(f"trt-{precision} needs a GPU of compute capability {need[0]}.{need[1]} or newer; "
                          f"{torch.cuda.get_device_name(device)} has {have[0]}.{have[1]}. Use trt-fp16 or trt-int8")


def _lower_precision(model: Any, plan: Plan, segment: str, precision: str) -> Any:
    """The segment's ONNX model with Q/DQ nodes for the quantization pass's precision annotations."""
    if precision not in LOW_BIT:
        return model
    from .onnx_qdq import quantize_segment_onnx

    return quantize_segment_onnx(model, plan.segments[segment].module, plan.graph.annotations, precision)


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
            model = _lower_precision(onnx.load(str(paths[name])), plan, name, precision)
            check_tensorrt_contract(model, precision, segment=name)
            io[name] = segment_io(model, plan, name)
            lowered[name] = Path(tmp) / "lowered" / f"{name}.onnx"
            lowered[name].parent.mkdir(parents=True, exist_ok=True)
            weights = sum(len(t.raw_data) for t in model.graph.initializer)
            onnx.save(model, str(lowered[name]), save_as_external_data=weights >= EXTERNAL_DATA_BYTES)
        _check_profile_names(settings.profiles, io)
        engines = {}
        for name in progress(list(plan.segments), progress_bar, "TensorRT engines", "segment"):
            ranges = _dim_ranges(io[name]["inputs"], settings.profiles, example_sizes, name)
            engines[name] = build_engine(lowered[name], precision, ranges, settings, name)
    return engines, io


def _check_profile_names(profiles: Mapping[str, Any], io: Mapping[str, Mapping[str, Any]]) -> None:
    """A profile for a dim no segment has dynamic would be silently ignored: refuse it instead."""
    dynamic = {symbol for segment in io.values() for spec in segment["inputs"] for dim in spec["dims"]
               if isinstance(dim, str) for symbol in _SYMBOL.findall(dim)}
    unused = sorted(set(profiles) - dynamic)
    if unused:
        raise TargetError(f"profiles were given for {unused}, but no segment has a dynamic dim of that name (the "
                          f"dynamic dims are {sorted(dynamic) or 'none: the export pinned every dim'}); name one of "
                          "those, or capture the model with that dim dynamic")


def segment_io(model: Any, plan: Plan, name: str) -> dict[str, Any]:
    """The ONNX values of a segment model (onnx_io) with the segment's entries from the exporter's
    metadata: how the segment's values map onto ONNX values (a tensor, a list of tensors, a size)."""
    io = onnx_io(model)
    metadata = {p.key: p.value for p in model.metadata_props}
    if SEGMENT_METADATA not in metadata:
        raise TargetError(f"the ONNX model of segment {name!r} has no {SEGMENT_METADATA!r} metadata; export it "
                          "with diffc.ir.onnx_export.export_plan")
    entries = json.loads(metadata[SEGMENT_METADATA])
    segment = plan.segments[name]
    flat = (sum(_width(e) for e in entries["inputs"]), sum(_width(e) for e in entries["outputs"]))
    if ([e["name"] for e in entries["inputs"]] != list(segment.inputs)
            or [e["name"] for e in entries["outputs"]] != list(segment.outputs)
            or flat != (len(io["inputs"]), len(io["outputs"]))):
        raise TargetError(f"the ONNX model of segment {name!r} does not match the segment's inputs and outputs "
                          f"{list(segment.inputs)} -> {list(segment.outputs)}; export the plan again with "
                          "export_plan (report it as a bug if it persists)")
    return {**io, "entries": {"inputs": entries["inputs"], "outputs": entries["outputs"]}}


def _width(entry: Mapping[str, Any]) -> int:
    return int(entry["count"]) if entry["kind"] == "tensors" else 1


def _example_sizes(plan: Plan) -> dict[str, int]:
    return {dim: size for spec in plan.graph.signature.inputs
            for dim, size in zip(spec.shape, spec.example_shape) if isinstance(dim, str)}


_SYMBOL = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_BINARY: dict[type, Callable[[int, int], int]] = {ast.Add: operator.add, ast.Sub: operator.sub,
                                                  ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
                                                  ast.Mod: operator.mod}


def dim_value(expression: str, sizes: Mapping[str, int]) -> int:
    """The size of a dynamic ONNX dim ("height", or an exporter expression such as
    "2*((height - 1)//2) + 2") for the given named sizes; ValueError when it names an unknown size or
    uses anything but integer arithmetic."""
    def walk(node: ast.AST) -> int:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in sizes:
                raise ValueError(f"unknown size {node.id!r}")
            return sizes[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            return _BINARY[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        raise ValueError(f"unsupported expression {ast.dump(node)}")

    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"not an expression: {expression!r}") from exc
    return walk(tree)


def _dim_ranges(inputs: Sequence[Mapping[str, Any]], profiles: Mapping[str, tuple[int, int, int]],
                example_sizes: Mapping[str, int], segment: str) -> dict[str, list[tuple[int, int, int]]]:
    """For each ONNX input, (min, opt, max) per dim: static dims as they are, named dims from `profiles`
    (default: the captured example size), derived dims evaluated at the min, opt and max sizes."""
    corners = [{**example_sizes, **{k: v[i] for k, v in profiles.items()}} for i in range(3)]
    ranges: dict[str, list[tuple[int, int, int]]] = {}
    for spec in inputs:
        dims = []
        for index, dim in enumerate(spec["dims"]):
            if isinstance(dim, int):
                dims.append((dim, dim, dim))
                continue
            try:
                low, opt, high = (dim_value(str(dim), corner) for corner in corners)
            except ValueError as exc:
                raise TargetError(f"segment {segment!r}: dim {index} of input {spec['name']!r} is {dim!r}, whose "
                                  f"size cannot be derived ({exc}); pass profiles={{{str(dim)!r}: (min, opt, max)}} "
                                  "for it") from exc
            dims.append((low, opt, high))
        ranges[spec["name"]] = dims
    return ranges


def build_engine(onnx_path: Path, precision: str, ranges: Mapping[str, Sequence[tuple[int, int, int]]],
                 settings: BuildSettings, segment: str) -> bytes:
    """Parses one ONNX model and builds a serialized engine with one optimization profile."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly_typed = precision in LOW_BIT
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TargetError(f"TensorRT's ONNX parser rejected segment {segment!r}: {errors}. The ONNX contract check "
                          "passed, so this is a gap in diffc's contract table: report it with this message")
    config = builder.create_builder_config()
    if not strongly_typed:
        # float targets are weakly typed: the flag lets TensorRT pick FP16/BF16 kernels per layer;
        # fp32 means fp32, so TensorRT's default TF32 matrix multiplies are switched off
        if precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        elif precision == "bf16":
            config.set_flag(trt.BuilderFlag.BF16)
        elif precision == "fp32":
            config.clear_flag(trt.BuilderFlag.TF32)
    config.builder_optimization_level = settings.optimization_level
    if settings.workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
    profile = builder.create_optimization_profile()
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        dims = ranges[tensor.name]
        low, opt, high = ([d[i] for d in dims] for i in range(3))
        profile.set_shape(tensor.name, trt.Dims(low), trt.Dims(opt), trt.Dims(high))
    config.add_optimization_profile(profile)
    cache = _load_timing_cache(config, settings.timing_cache)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TargetError(f"TensorRT could not build an engine for segment {segment!r} at {precision}; its log above "
                          "names the layer. Try another precision or a larger workspace_bytes")
    if settings.timing_cache is not None:
        _save_timing_cache(cache, settings.timing_cache)
    return bytes(serialized)


def _load_timing_cache(config: "trt.IBuilderConfig", path: Path | None) -> "trt.ITimingCache":
    """Starts from the persisted timing cache (kernel timings from earlier builds on this GPU)."""
    data = path.read_bytes() if path is not None and path.is_file() else b""
    cache = config.create_timing_cache(data)
    config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


def _save_timing_cache(cache: "trt.ITimingCache", path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.name + f".{os.getpid()}.tmp")
    staging.write_bytes(bytes(cache.serialize()))
    os.replace(staging, path)  # atomic: concurrent builds never read half a cache


def flatten_values(entries: Sequence[Mapping[str, Any]], values: Sequence[Any],
                   device: torch.device) -> list[torch.Tensor]:
    """A segment's input values as engine tensors, laid out as the exporter's entries say: a tensor is one,
    a list of tensors one per item, a size a float vector of that length (its shape carries it)."""
    flat: list[torch.Tensor] = []
    for entry, value in zip(entries, values):
        if entry["kind"] == "tensors":
            flat += list(value)
        elif entry["kind"] == "size":
            flat.append(torch.empty(int(value), device=device))
        else:
            flat.append(value)
    return flat


def regroup_values(entries: Sequence[Mapping[str, Any]], outputs: Sequence[torch.Tensor]) -> tuple[Any, ...]:
    """Engine output tensors back as the segment's values: lists regrouped, sizes (int64 scalars) as ints."""
    values: list[Any] = []
    position = 0
    for entry in entries:
        if entry["kind"] == "tensors":
            values.append(list(outputs[position:position + int(entry["count"])]))
            position += int(entry["count"])
        else:
            values.append(int(outputs[position].item()) if entry["kind"] == "size" else outputs[position])
            position += 1
    return tuple(values)


def _shape(dims: "trt.Dims") -> tuple[int, ...]:
    return tuple(dims[i] for i in range(len(dims)))


class EngineRunner:
    """Runs one segment's engine on torch CUDA tensors, called like the segment (its values in, a tuple of
    its values out, all on the GPU; see flatten_values and regroup_values for lists and sizes). Inputs
    outside the engine's optimization profile raise InputError naming the option that widens it."""

    def __init__(self, engine: bytes, segment: str, io: Mapping[str, Any], device: torch.device,
                 cuda_graph: bool = False) -> None:
        import tensorrt as trt

        self.segment = segment
        self.device = device
        self.cuda_graph = cuda_graph
        self.entries = io["entries"]
        self.inputs = [spec["name"] for spec in io["inputs"]]
        self.outputs = [spec["name"] for spec in io["outputs"]]
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        with torch.cuda.device(device):
            engine_object = self._runtime.deserialize_cuda_engine(engine)
            if engine_object is None:
                raise ArtifactError(f"TensorRT could not deserialize the engine of segment {segment!r}; it is "
                                    "corrupt or from another TensorRT version. Rebuild it on this machine")
            self._engine = engine_object
            self._context = engine_object.create_execution_context()
        self._dtypes = {name: _TORCH_DTYPES[self._engine.get_tensor_dtype(name).name]
                        for name in [*self.inputs, *self.outputs]}
        self._profile = {name: [_shape(dims) for dims in self._engine.get_tensor_profile_shape(name, 0)]
                         for name in self.inputs}
        self._graphs: dict[tuple[tuple[int, ...], ...],
                           tuple[torch.cuda.CUDAGraph, list[torch.Tensor], list[torch.Tensor]]] = {}

    def __call__(self, *values: Any) -> tuple[Any, ...]:
        if len(values) != len(self.entries["inputs"]):
            raise InputError(f"segment {self.segment!r} takes {len(self.entries['inputs'])} values, got {len(values)}")
        with torch.cuda.device(self.device):
            flat = flatten_values(self.entries["inputs"], values, self.device)
            tensors = [self._conform(name, t) for name, t in zip(self.inputs, flat)]
            if self.cuda_graph:
                outputs = self._replay(tensors)
            else:
                outputs = self._bind(tensors)
                self._enqueue()
        return regroup_values(self.entries["outputs"], outputs)

    def _conform(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        value = tensor.to(device=self.device, dtype=self._dtypes[name]).contiguous()
        low, _, high = self._profile[name]
        shape = tuple(value.shape)
        if len(shape) != len(low) or any(not lo <= s <= hi for s, lo, hi in zip(shape, low, high)):
            raise InputError(f"segment {self.segment!r}: input {name!r} has shape {shape}, outside the engine's "
                             f"optimization profile {tuple(low)} .. {tuple(high)}. Rebuild with a wider profile, e.g. "
                             "the compile option profiles={'batch': (1, 2, 8), 'height': (32, 64, 128)}")
        return value

    def _bind(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Sets input shapes and addresses, allocates the outputs and binds them; returns the outputs."""
        for name, value in zip(self.inputs, inputs):
            if not self._context.set_input_shape(name, tuple(value.shape)):
                raise InputError(f"segment {self.segment!r}: TensorRT refused shape {tuple(value.shape)} for "
                                 f"input {name!r}")
            self._context.set_tensor_address(name, value.data_ptr())
        outputs = []
        for name in self.outputs:
            shape = _shape(self._context.get_tensor_shape(name))
            value = torch.empty(shape, dtype=self._dtypes[name], device=self.device)
            self._context.set_tensor_address(name, value.data_ptr())
            outputs.append(value)
        return outputs

    def _enqueue(self) -> None:
        stream = torch.cuda.current_stream(self.device)
        if not self._context.execute_async_v3(stream.cuda_stream):
            raise DiffcError(f"TensorRT failed to run segment {self.segment!r} (execute_async_v3 returned False); "
                             "its log above says why")

    def _replay(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """One captured CUDA graph per input-shape combination; inputs are copied into its static buffers
        and the outputs cloned out, because the next replay overwrites them."""
        key = tuple(tuple(t.shape) for t in tensors)
        if key not in self._graphs:
            static_inputs = [t.clone() for t in tensors]
            static_outputs = self._bind(static_inputs)
            self._enqueue()  # TensorRT finishes shape-dependent setup on the first enqueue, outside capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._enqueue()
            self._graphs[key] = (graph, static_inputs, static_outputs)
        graph, static_inputs, static_outputs = self._graphs[key]
        for static, value in zip(static_inputs, tensors):
            static.copy_(value)
        graph.replay()
        return [out.clone() for out in static_outputs]
