"""diffc.optimize, diffc.replay and diffc.load: the public entry points."""
from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from .backends import get_backend, parse_target
from .backends.base import LOW_BIT
from .backends.timing_cache import kept_times
from .calibration import as_calibration_set, call_arguments, collect
from .errors import CaptureError, DiffcError, TargetError
from .ir import DiffusionGraph, Plan, capture, find_denoiser
from .ir.examples import example_inputs as default_example_inputs, has_example
from .ir.fxutil import module_device
from .ir.graph_file import graph_fingerprint
from .ir.probe import decode_constant
from .ir.partition import build_plan
from .ir.plan import recompile_options
from .ir.precision import precision_specs
from .passes import PassContext, PassManager
from .passes.base import NOT_CONFIG, PASSES, PipelineSpec
from .runtime import OptimizedModel, load_plan, read_manifest
from .runtime.checkpoints import PassCheckpointFolder
from .runtime.diffusers_component import register_artifact_loader
from .runtime.ranges import calibration_calls
from .runtime.sampler_watch import SamplerWatch, step_settings

# default calibration conditions: passes that fit what they keep to the calibration (prune, moe)
# get more, since their choice holds only for conditions like those. On a zoo SD3-style model,
# moe calibrated on 8 prompts kept 38.5 dB on those prompts and 26.7 dB on unseen ones; on 24
# prompts, 36.9 and 34.7 dB (benchmarks/closed_loop_zoo.py)
DEFAULT_CONDITIONS, FITTING_CONDITIONS = 8, 24
SOURCE_PRECISIONS = {"float16": "fp16", "bfloat16": "bf16"}


def optimize(model_or_pipeline: Any, target: str = "torch", passes: PipelineSpec | None = "default",
             calibration: Any = None, example_inputs: Mapping[str, Any] | None = None, device: Any = None,
             compile: bool | None = None, progress: bool = False, work_dir: str | os.PathLike[str] | None = None,
             prompts: Sequence[str] | None = None, conditions: Sequence[Any] | None = None,
             cuda_graphs: bool = False, **budget: Any) -> OptimizedModel:
    """Captures the denoiser, runs the pass pipeline and compiles the result for `target`.

    Returns an OptimizedModel with the denoiser's forward signature: assign it back
    (`pipe.unet = fast`) to use it in the pipeline. The input model is not modified.

    `passes="default"` is block caching, and caching then quantization for a low-bit target
    (int8, fp8, int4, mixed): the quant pass writes what those targets lower.

    Passes that need calibration data get `calibration` (a CalibrationSet, a finished Recording
    or its folder) or, without it, trajectories of the pipeline itself at its own default steps,
    resolution and guidance: on `prompts` (or `conditions`: prompts, class labels or dicts of
    pipeline arguments), by default 8 prompts of the built-in set for a text pipeline and 8
    labels for a class-conditional one. A bare denoiser calibrates on synthetic trajectories.

    With `work_dir`, the default calibration set and the graph after each pass are kept there:
    calling again with the same arguments after an interruption resumes where it stopped.

    Everything runs on the model's device (or `device`): a model on a GPU is captured, calibrated
    and optimized there. A model loaded in fp16 or bf16 is optimized in fp32 and compiled in its
    own precision when `target` names none (`torch`); its outputs come back in that dtype.
    `compile=None` compiles the torch backend's segments on CUDA and runs them eagerly elsewhere;
    `cuda_graphs=True` also replays them through CUDA graphs (torch backend on CUDA). Other keywords
    are the passes' budget, or the target backend's compile options (e.g. TensorRT's `profiles`,
    `timing_cache`, `high_precision_dtype`; ONNX Runtime's `opset`, `fuse_qdq`)."""
    parsed = parse_target(target)  # fail before any work on a bad target
    conditions = _calibration_conditions(model_or_pipeline, calibration, prompts, conditions)
    low_bit = parsed.precision in LOW_BIT
    if low_bit and passes in (None, "default"):
        passes = "default-low-bit"
    manager = PassManager(passes, progress=progress)
    manager.validate()
    if low_bit and not any(p.writes_precision for p in manager.passes):
        raise TargetError(f"target {parsed} lowers the quantization annotations of the quant pass, and the pipeline "
                          f"{[p.name for p in manager.passes]} has no pass that writes them; add it "
                          f"(passes=[..., 'quant']) or choose a float target such as {parsed.backend}-fp16")
    backend_options = {key: budget.pop(key) for key in list(budget) if key in get_backend(parsed.backend).options}
    ctx = PassContext(budget=dict(budget), target=str(parsed), progress=progress)
    optimized = _run_pipeline(manager, model_or_pipeline, ctx, calibration, example_inputs, device, work_dir,
                              conditions)
    unused = sorted(set(budget) - ctx.used_budget)
    if unused:
        own = get_backend(parsed.backend).options
        raise TargetError(f"budget {', '.join(unused)} was given but no pass in the pipeline "
                          f"{[p.name for p in manager.passes]} uses it; remove it or add the pass that does"
                          + (f" (the {parsed.backend} backend's compile options are {', '.join(own)})" if own else ""))
    options: dict[str, Any] = {"compile": compile, **({"cuda_graphs": True} if cuda_graphs else {}), **backend_options}
    if parsed.backend == "trt" and ctx.calibration is not None:
        options["calibrated_profiles"] = calibrated_sizes(optimized.signature, ctx.calibration)
    fast = compile_graph(optimized, parsed.backend, _precision_for(target, parsed, optimized),
                         _device_of(model_or_pipeline, device), **options)
    # a LoRA loaded later checks the quantized activation ranges on these (see OptimizedModel.recalibrate)
    fast.calibration_inputs = calibration_calls(ctx.calibration)
    fast.sampler_watch = _sampler_watch(ctx.calibration, fast.plan)
    return fast


def calibrated_sizes(signature: Any, calibration: Any) -> dict[str, tuple[int, int, int]]:
    """(smallest, most frequent, largest) size of each named dim over the calibration calls: the
    shapes the pipeline really runs at (its resolution, its text length), where the captured example
    has one short text and one resolution. Batch goes down to 1 (a call without guidance)."""
    seen: dict[str, list[int]] = {}
    for shapes in calibration.input_shapes():
        for spec in signature.inputs:
            shape = shapes.get(spec.name)
            if shape is not None and len(shape) == len(spec.shape):
                for dim, size in zip(spec.shape, shape):
                    if isinstance(dim, str):
                        seen.setdefault(dim, []).append(int(size))
    return {dim: (1 if dim == "batch" else min(sizes), Counter(sizes).most_common(1)[0][0], max(sizes))
            for dim, sizes in seen.items()}


def _precision_for(target: str, parsed: Any, dg: DiffusionGraph) -> str:
    """The target's precision; for a target that names none (`torch`), the model's own half
    precision where the backend runs it (a pipeline loaded in bf16 stays in bf16)."""
    own = SOURCE_PRECISIONS.get(dg.signature.source_dtype)
    if "-" in str(target).strip() or own is None or get_backend(parsed.backend).unavailable_reason(own) is not None:
        return parsed.precision
    return own


def _sampler_watch(calibration_set: Any, plan: Plan) -> SamplerWatch | None:
    """Watches the pipeline calibration ran in, for step settings its schedule was not chosen under
    (a plan without step-dependent work has no schedule to judge)."""
    pipe = getattr(calibration_set, "pipeline", None)
    if pipe is None or getattr(pipe, "scheduler", None) is None or not plan.schedule.steps:
        return None
    scheduler = (calibration_set.replay or {}).get("scheduler") or pipe.scheduler
    return SamplerWatch(pipe, step_settings(scheduler))


def replay(graph_or_artifact: Any, model_or_pipeline: Any, calibration: Any = None,
           example_inputs: Mapping[str, Any] | None = None, device: Any = None, progress: bool = False) -> Any:
    """Re-runs the passes recorded in an optimized result on a model: the same passes, in the same
    order, with the same configs and the budget entries they read.

    `graph_or_artifact` is an OptimizedModel, the folder of a saved artifact or a DiffusionGraph.
    For the first two, returns an OptimizedModel compiled for the same target (given the same
    model and calibration, it saves to the same bytes); for a graph, the replayed graph. Without
    `calibration`, passes that need it calibrate as `optimize` does."""
    if isinstance(graph_or_artifact, DiffusionGraph):
        recorded, target, options = graph_or_artifact.applied, None, {}
    elif isinstance(graph_or_artifact, OptimizedModel):
        recorded, target = graph_or_artifact.plan.graph.applied, graph_or_artifact.target
        options = graph_or_artifact.compile_options
    elif isinstance(graph_or_artifact, (str, os.PathLike)):
        manifest = read_manifest(graph_or_artifact)
        recorded = manifest["applied"]
        target = f"{manifest['target']['backend']}-{manifest['target']['precision']}"
        options = recompile_options(manifest["target"].get("info", {}))
    else:
        raise DiffcError(f"replay takes an OptimizedModel, an artifact folder or a DiffusionGraph, not "
                         f"{type(graph_or_artifact).__name__}")
    pipeline = [{key: value for key, value in entry.items() if key not in NOT_CONFIG} for entry in recorded]
    budget = {key: value for entry in recorded for key, value in entry.get("budget", {}).items()}
    parsed = parse_target(target or "torch")
    ctx = PassContext(budget=budget, target=str(parsed), progress=progress)
    replayed = _run_pipeline(PassManager(pipeline, progress=progress), model_or_pipeline, ctx, calibration,
                             example_inputs, device, None)
    if target is None:
        return replayed
    return compile_graph(replayed, parsed.backend, parsed.precision, _device_of(model_or_pipeline, device), **options)


def _run_pipeline(manager: PassManager, model_or_pipeline: Any, ctx: PassContext, calibration: Any,
                  example_inputs: Mapping[str, Any] | None, device: Any,
                  work_dir: str | os.PathLike[str] | None, conditions: Sequence[Any] | None = None) -> DiffusionGraph:
    """Captures the denoiser, calibrates it if a pass needs that and no calibration was given, and
    runs the manager's passes (resuming from `work_dir`'s checkpoints when given)."""
    denoiser, _ = find_denoiser(model_or_pipeline)
    device = _device_of(model_or_pipeline, device)
    calibration_set = as_calibration_set(calibration)
    needs_calibration = any("calibrated" in p.requirements() for p in manager.passes)
    if conditions is not None and not needs_calibration:
        raise DiffcError(f"prompts or conditions were given, but no pass of {[p.name for p in manager.passes]} "
                         "calibrates; leave them out")
    if calibration_set is None and needs_calibration:
        out = Path(work_dir) / "calibration" if work_dir is not None else None
        fits = any(p.removes_layers for p in manager.passes)
        calibration_set = _default_calibration(model_or_pipeline, ctx.progress, out, conditions, example_inputs,
                                               FITTING_CONDITIONS if fits else DEFAULT_CONDITIONS)
    if calibration_set is not None:
        calibration_set.device = torch.device(device)
    if example_inputs is None and calibration_set is not None:
        example_inputs = _example_like(denoiser, calibration_set)
    if example_inputs is None and calibration_set is None and not isinstance(model_or_pipeline, torch.nn.Module) \
            and not has_example(denoiser):
        example_inputs = _example_like(denoiser, _one_short_call(model_or_pipeline, ctx.progress))
    graph = capture(denoiser, example_inputs=example_inputs)
    if calibration_set is not None:
        calibration_set.check_compatible(graph)
    ctx.calibration = calibration_set
    # candidates run once or twice each: compiling them would cost more than it saves
    ctx.denoiser_for = lambda candidate: compile_graph(candidate, "torch", "fp32", device, compile=False)
    backend = parse_target(ctx.target).backend
    # one timer: called with formats it times the cost-table layer, with formats and a shape that layer
    ctx.format_times = functools.partial(_format_times, backend, str(torch.device(device)))
    if get_backend(backend).runs_low_bit_kernels(torch.device(device)):
        ctx.layer_format_times = ctx.format_times
        ctx.low_bit_convolutions = get_backend(backend).runs_low_bit_convolutions(torch.device(device))
    checkpoints = None
    if work_dir is not None:
        identity = {"model": graph_fingerprint(graph), "calibration": _calibration_fingerprint(calibration_set)}
        checkpoints = PassCheckpointFolder(work_dir, identity)
    return manager.run(graph, ctx, checkpoints)


@functools.cache
def _format_times(backend: str, device: str, formats: tuple[str, ...],
                  shape: tuple[int, int, int] | None = None) -> dict[str, float] | None:
    """Measured once per machine (kept in diffc.backends.timing_cache), backend, device, format set and
    layer shape (a second or a few), so a placement by timings decides the same way on each run."""
    return kept_times(backend, torch.device(device), formats, shape,
                      lambda: get_backend(backend).relative_format_times(formats, torch.device(device), shape))


def _device_of(model_or_pipeline: Any, device: Any) -> Any:
    return device if device is not None else module_device(find_denoiser(model_or_pipeline)[0])


def compile_graph(dg: DiffusionGraph, backend: str, precision: str, device: Any = None,
                  **options: Any) -> OptimizedModel:
    """Lowers `dg` for `backend`-`precision`; a low-bit target whose quantization pass declined
    (it would have broken its final-image floor) compiles at fp32 instead, with a warning."""
    declined = [entry["report"]["declined"] for entry in dg.applied
                if entry.get("report", {}).get("declined") and getattr(PASSES.get(entry["pass"]), "writes_precision",
                                                                       False)]
    if precision in LOW_BIT and declined and not precision_specs(dg.annotations):
        warnings.warn(f"target {backend}-{precision}: the quantization pass declined ({declined[-1]}); compiling "
                      f"{backend}-fp32 instead", stacklevel=2)
        precision = "fp32"
    return _compile_plan(build_plan(dg), backend, precision, device, **options)


def _calibration_fingerprint(calibration_set: Any) -> str | None:
    if calibration_set is None:
        return None
    recorded = {key: calibration_set.manifest[key] for key in ("settings", "meta", "items")}
    return hashlib.sha256(json.dumps(recorded, sort_keys=True, default=str).encode()).hexdigest()


def _calibration_conditions(model_or_pipeline: Any, calibration: Any, prompts: Sequence[str] | None,
                            conditions: Sequence[Any] | None) -> list[Any] | None:
    """The conditions the default calibration runs the pipeline on, after checking that the
    arguments that choose them agree."""
    given = [name for name, value in (("prompts", prompts), ("conditions", conditions), ("calibration", calibration))
             if value is not None]
    if len(given) > 1:
        raise DiffcError(f"{' and '.join(given)} were given together; each chooses what calibration runs on: pass "
                         "one")
    if prompts is not None and (isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts)):
        raise DiffcError("prompts must be a list of strings (e.g. prompts=['a red fox in snow', ...]); class labels "
                         "and dicts of pipeline arguments go in conditions=")
    chosen = prompts if prompts is not None else conditions
    if chosen is None:
        return None
    if isinstance(model_or_pipeline, torch.nn.Module):
        raise DiffcError(f"{'prompts' if prompts is not None else 'conditions'} need the pipeline that encodes them; "
                         "pass the pipeline (diffc.optimize(pipe, ...)) rather than its denoiser, or "
                         "calibration=diffc.calibration.record(...) from your own loop")
    if not list(chosen):
        raise DiffcError("no prompt or condition given: pass at least one, or leave it out for the built-in set")
    return list(chosen)


def _one_short_call(pipe: Any, progress: bool) -> Any:
    """A recording of the pipeline's first denoiser calls at its defaults (one condition, one seed,
    two steps): where diffc has no example for the denoiser's class and no pass calibrates, the
    capture takes its inputs from the call the pipeline really makes."""
    return collect(pipe, num_steps=2, condition_count=1, seeds=(0,), progress=progress)


def _example_like(denoiser: torch.nn.Module, calibration_set: Any) -> dict[str, Any] | None:
    """diffc's example inputs for the denoiser's class without the optional tensors the calibrated
    loop never passed (a PixArt loop without an attention mask), so that the captured graph takes
    what the loop gives; for a class diffc has no example for, the first recorded call; None (the
    plain example) when nothing is missing."""
    try:
        example = default_example_inputs(denoiser)
    except CaptureError:
        first = next(calibration_set.records(), None)
        if first is None:
            return None
        constants = calibration_set.meta.get("constants", {})
        return {**call_arguments(first.inputs), **{k: decode_constant(v) for k, v in constants.items()}}
    meta = calibration_set.manifest.get("meta", {})
    if meta.get("model_class") != type(denoiser).__name__:
        return None  # another model's recording: check_compatible says so
    recorded = {name.split(".", 1)[0] for name in meta.get("inputs", {})}
    optional = {name for name, p in inspect.signature(denoiser.forward).parameters.items()
                if p.default is not inspect.Parameter.empty}
    missing = {name for name, value in example.items()
               if isinstance(value, torch.Tensor) and name not in recorded and name in optional}
    return {name: value for name, value in example.items() if name not in missing} if missing and recorded else None


def _default_calibration(model_or_pipeline: Any, progress: bool, out: Path | None,
                         conditions: Sequence[Any] | None = None,
                         example_inputs: Mapping[str, Any] | None = None,
                         condition_count: int = DEFAULT_CONDITIONS) -> Any:
    """Calibration for passes that need it when the user gave none: the pipeline's own sampler
    at its default step count on `condition_count` default conditions, or synthetic trajectories
    for a bare denoiser (called with the example inputs it is captured with, when given)."""
    if isinstance(model_or_pipeline, torch.nn.Module):
        return collect(model_or_pipeline, progress=progress, out=out, example_inputs=example_inputs)
    parameters = inspect.signature(model_or_pipeline.__call__).parameters
    steps = parameters["num_inference_steps"].default if "num_inference_steps" in parameters else None
    if not isinstance(steps, int):
        raise DiffcError(f"{type(model_or_pipeline).__name__} has no default num_inference_steps to calibrate at; "
                         "pass calibration=diffc.calibration.collect(pipe, num_steps=..., conditions=...)")
    return collect(model_or_pipeline, conditions=conditions, num_steps=steps, progress=progress, out=out,
                   condition_count=condition_count)


def _compile_plan(plan: Plan, backend: str, precision: str, device: Any, **options: Any) -> OptimizedModel:
    lowering = get_backend(backend)

    def recompile(p: Plan, new_device: Any) -> Any:
        return lowering.compile(p, precision, new_device, **options)

    return OptimizedModel(lowering.compile(plan, precision, device, **options), recompile)


def load(path: str | os.PathLike[str], device: Any = None) -> OptimizedModel:
    """Loads an artifact written by `fast.save(path)`, after checking every file's hash."""
    manifest = read_manifest(path)
    plan = load_plan(path, manifest)
    target = manifest["target"]
    parse_target(f"{target['backend']}-{target['precision']}")
    options = recompile_options(target.get("info", {}))
    # backends that saved compiled files (ONNX models, engines) load those instead of compiling again
    artifact_options = getattr(get_backend(target["backend"]), "artifact_options", None)
    if artifact_options is not None:
        options = artifact_options(path, manifest)
    return _compile_plan(plan, target["backend"], target["precision"], device or target["device"], **options)


register_artifact_loader(load)
