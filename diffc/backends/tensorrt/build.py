"""Building TensorRT engines: the build settings (compile options), the optimization-profile ranges of
each ONNX input, the engine build itself and the timing cache that persists across builds.

`tensorrt` is imported only inside functions, so this module imports on machines without TensorRT."""
from __future__ import annotations

import ast
import operator
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import TargetError
from ...ir.onnx_segments import DIM_SYMBOL
from ..base import LOW_BIT
from ..timing_cache import user_cache_folder

if TYPE_CHECKING:
    import tensorrt as trt

DEFAULT_TIMING_CACHE = user_cache_folder() / "tensorrt.timing"
# TensorRT's builder optimization levels (IBuilderConfig.builder_optimization_level): 0 (fastest build)
# to 5; TensorRT's default is 3.
OPTIMIZATION_LEVELS = range(0, 6)
HIGH_PRECISION_DTYPES = ("fp16", "bf16", "fp32")
_BINARY: dict[type, Callable[[int, int], int]] = {ast.Add: operator.add, ast.Sub: operator.sub,
                                                  ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
                                                  ast.Mod: operator.mod}


@dataclass(frozen=True)
class BuildSettings:
    profiles: Mapping[str, tuple[int, int, int]] = field(default_factory=dict)
    optimization_level: int = 3
    workspace_bytes: int | None = None
    timing_cache: Path | None = DEFAULT_TIMING_CACHE
    cuda_graph: bool = False
    opset: int = 21
    refit: bool = True
    # the sizes calibration ran at (optimize passes them): defaults under `profiles` for the dims
    # segments have, where the captured example's sizes (a short text, one resolution) would be too narrow
    calibrated_profiles: Mapping[str, tuple[int, int, int]] = field(default_factory=dict)
    # the type the layers of a low-bit engine that are not quantized compute in ("fp16", "bf16" or
    # "fp32"; ModelOpt's high_precision_dtype). None: bf16 for a bf16 model, else fp16
    high_precision_dtype: str | None = None

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> "BuildSettings":
        known = {"profiles", "optimization_level", "workspace_bytes", "timing_cache", "cuda_graph", "opset", "refit",
                 "calibrated_profiles", "high_precision_dtype"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TargetError(f"the TensorRT backend has no option {', '.join(unknown)}; it takes "
                              f"{', '.join(sorted(known))}")
        profiles = {str(k): _profile_range(str(k), v) for k, v in dict(options.get("profiles") or {}).items()}
        calibrated = {str(k): _profile_range(str(k), v)
                      for k, v in dict(options.get("calibrated_profiles") or {}).items()}
        level = options.get("optimization_level", 3)
        if not isinstance(level, int) or level not in OPTIMIZATION_LEVELS:
            raise TargetError(f"optimization_level must be an integer from 0 to 5 (TensorRT's default is 3), "
                              f"got {level!r}")
        workspace = options.get("workspace_bytes")
        if workspace is not None and (not isinstance(workspace, int) or workspace <= 0):
            raise TargetError(f"workspace_bytes must be a positive number of bytes (e.g. 4 << 30), got {workspace!r}")
        cache = options.get("timing_cache", DEFAULT_TIMING_CACHE)
        high_precision = options.get("high_precision_dtype")
        if high_precision not in (None, *HIGH_PRECISION_DTYPES):
            raise TargetError(f"high_precision_dtype must be one of {', '.join(HIGH_PRECISION_DTYPES)} (or None: bf16 "
                              f"for a bf16 model, else fp16), got {high_precision!r}")
        return cls(profiles=profiles, optimization_level=level, workspace_bytes=workspace,
                   timing_cache=None if cache is None else Path(cache), cuda_graph=bool(options.get("cuda_graph")),
                   opset=int(options.get("opset", 21)), refit=bool(options.get("refit", True)),
                   calibrated_profiles=calibrated, high_precision_dtype=high_precision)

    def to_json(self) -> dict[str, Any]:
        return {"profiles": {k: list(v) for k, v in self.profiles.items()},
                "optimization_level": self.optimization_level, "workspace_bytes": self.workspace_bytes,
                "timing_cache": None if self.timing_cache is None else str(self.timing_cache),
                "cuda_graph": self.cuda_graph, "opset": self.opset, "refit": self.refit,
                "calibrated_profiles": {k: list(v) for k, v in self.calibrated_profiles.items()},
                "high_precision_dtype": self.high_precision_dtype}


def _profile_range(name: str, value: Any) -> tuple[int, int, int]:
    """(min, opt, max) from a size or a (min, opt, max) triple."""
    triple = (value, value, value) if isinstance(value, int) else tuple(value) if isinstance(value, Sequence) else ()
    if len(triple) != 3 or not all(isinstance(v, int) and v > 0 for v in triple) or not (
            triple[0] <= triple[1] <= triple[2]):
        raise TargetError(f"profile {name!r} must be a positive size or (min, opt, max) with min <= opt <= max, "
                          f"got {value!r}; e.g. profiles={{'batch': (1, 2, 4)}}")
    return (int(triple[0]), int(triple[1]), int(triple[2]))


def check_profile_names(profiles: Mapping[str, Any], io: Mapping[str, Mapping[str, Any]]) -> None:
    """A profile for a dim no segment has dynamic would be silently ignored: refuse it instead."""
    dynamic = {symbol for segment in io.values() for spec in segment["inputs"] for dim in spec["dims"]
               if isinstance(dim, str) for symbol in DIM_SYMBOL.findall(dim)}
    unused = sorted(set(profiles) - dynamic)
    if unused:
        raise TargetError(f"profiles were given for {unused}, but no segment has a dynamic dim of that name (the "
                          f"dynamic dims are {sorted(dynamic) or 'none: the export pinned every dim'}); name one of "
                          "those, or capture the model with that dim dynamic")


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


def dim_ranges(inputs: Sequence[Mapping[str, Any]], profiles: Mapping[str, tuple[int, int, int]],
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
    if settings.refit:
        # weights (and Q/DQ scales) stay refittable by their ONNX initializer names: a LoRA swap refits
        # the engine instead of building it again (diffc.backends.tensorrt.refit)
        config.set_flag(trt.BuilderFlag.REFIT)
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
