"""diffc.optimize and diffc.load: the public entry points."""
from __future__ import annotations

import os
from typing import Any, Mapping

import torch

from .backends import get_backend, parse_target
from .errors import DiffcError, TargetError
from .ir import DiffusionGraph, Plan, capture
from .passes import PassContext, PassManager
from .passes.base import PipelineSpec
from .runtime import OptimizedModel, load_plan, read_manifest

DENOISER_ATTRIBUTES = ("unet", "transformer")


def denoiser_of(model_or_pipeline: Any) -> tuple[torch.nn.Module, str | None]:
    """The denoiser to optimize and, for a pipeline, the attribute it lives under."""
    for attribute in DENOISER_ATTRIBUTES:
        candidate = getattr(model_or_pipeline, attribute, None)
        if isinstance(candidate, torch.nn.Module) and not isinstance(model_or_pipeline, torch.nn.Module):
            return candidate, attribute
    if isinstance(model_or_pipeline, torch.nn.Module):
        return model_or_pipeline, None
    raise DiffcError(f"diffc.optimize needs a denoiser (nn.Module) or a diffusers pipeline with a "
                     f"{' or '.join(DENOISER_ATTRIBUTES)}; got {type(model_or_pipeline).__name__}")


def optimize(model_or_pipeline: Any, target: str = "torch", passes: PipelineSpec | None = "default",
             calibration: Any = None, example_inputs: Mapping[str, Any] | None = None, device: Any = None,
             compile: bool = False, progress: bool = False, **budget: Any) -> OptimizedModel:
    """Captures the denoiser, runs the pass pipeline and compiles the result for `target`.

    Returns an OptimizedModel with the denoiser's forward signature: assign it back
    (`pipe.unet = fast`) to use it in the pipeline. The input model is not modified."""
    parsed = parse_target(target)  # fail before any work on a bad target
    manager = PassManager(passes, progress=progress)
    manager.validate()
    denoiser, _ = denoiser_of(model_or_pipeline)
    device = device if device is not None else _module_device(denoiser)
    graph = capture(denoiser, example_inputs=example_inputs)
    ctx = PassContext(calibration=calibration, budget=dict(budget), target=str(parsed))
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
