"""diffc.optimize and diffc.load: the public entry points."""
from __future__ import annotations

import os
from typing import Any, Mapping

import torch

from .backends import get_backend, parse_target
from .calibration import as_calibration_set
from .errors import DiffcError, TargetError
from .ir import DiffusionGraph, Plan, capture, find_denoiser
from .passes import PassContext, PassManager
from .passes.base import PipelineSpec
from .runtime import OptimizedModel, load_plan, read_manifest

def optimize(model_or_pipeline: Any, target: str = "torch", passes: PipelineSpec | None = "default",
             calibration: Any = None, example_inputs: Mapping[str, Any] | None = None, device: Any = None,
             compile: bool = False, progress: bool = False, **budget: Any) -> OptimizedModel:
    """Captures the denoiser, runs the pass pipeline and compiles the result for `target`.

    Returns an OptimizedModel with the denoiser's forward signature: assign it back
    (`pipe.unet = fast`) to use it in the pipeline. The input model is not modified."""
    parsed = parse_target(target)  # fail before any work on a bad target
    manager = PassManager(passes, progress=progress)
    manager.validate()
    denoiser, _ = find_denoiser(model_or_pipeline)
    device = device if device is not None else _module_device(denoiser)
    calibration_set = as_calibration_set(calibration)
    graph = capture(denoiser, example_inputs=example_inputs)
    if calibration_set is not None:
        calibration_set.check_compatible(graph)
    ctx = PassContext(calibration=calibration_set, budget=dict(budget), target=str(parsed))
    optimized = manager.run(graph, ctx)
    unused = sorted(set(budget) - ctx.used_budget)
    if unused:
        raise TargetError(f"budget {', '.join(unused)} was given but no pass in the pipeline "
                          f"{[p.name for p in manager.passes]} uses it; remove it or add the pass that does")
    return compile_graph(optimized, parsed.backend, parsed.precision, device, compile=compile)


def compile_graph(dg: DiffusionGraph, backend: str, precision: str, device: Any = None,
                  **options: Any) -> OptimizedModel:
    plan = Plan.single(dg)
    plan.check()
    return _compile_plan(plan, backend, precision, device, **options)


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
    options = {k: v for k, v in target.get("info", {}).items() if k == "compile"}
    return _compile_plan(plan, target["backend"], target["precision"], device or target["device"], **options)


def _module_device(module: torch.nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")
