"""OptimizedModel: a drop-in nn.Module for the original denoiser that runs a compiled Plan."""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

from ..errors import InputError
from ..ir import CompiledPlan, Plan, TensorInput
from ..ir.dtypes import HALF_DTYPES
from ..ir.probe import constant_arguments, tensor_at
from ..ir.plan import recompile_options
from ..ir.served_files import saved_files
from .adapters import Adapters, denoiser_keys, lora_deltas, read_adapter
from .artifact import save_artifact
from .sampler_watch import SamplerWatch
from .shapes import check_shapes
from .diffusers_component import ModelMixin, PipelineComponent
from ..ir.stepping import StepTracker
from .ranges import (calibration_calls, measure_change, moved, quantized_activations, range_warning, rescaled,
                     unchecked_warning)

# Inputs a caller may leave out although the graph was captured with them, and the value that
# means "absent" for each (an all-ones attention mask masks nothing).
_NEUTRAL_FILLS: dict[str, Callable[[tuple[int, ...], torch.device], torch.Tensor]] = {
    "encoder_attention_mask": lambda shape, device: torch.ones(shape, device=device),
}


# diffusers finds how to load a component by looking its base classes up in the component's module
__all__ = ["OptimizedModel", "ModelMixin"]


class OptimizedModel(PipelineComponent):
    """Same forward signature and output type as the captured denoiser, so `pipe.unet = fast`
    or `pipe.transformer = fast` works in unchanged diffusers pipelines.

    It follows the denoising loop from the timesteps it is called with (see StepTracker), picks
    the plan's variant for each step and keeps the plan's cross-step state between calls. Each
    cache_context branch's state is freed right after its call at the loop's last step, when that
    step is known: announced by begin_loop(n), or the last calibrated timestep of a loop that has
    followed the calibrated timesteps; a later call that would read the freed state runs the
    plan's full variant instead."""

    def __init__(self, compiled: CompiledPlan, recompile: Callable[[Plan, Any], CompiledPlan] | None = None) -> None:
        super().__init__()
        self._recompile = recompile
        self._use(compiled)
        self.steps = StepTracker()
        self._states: dict[str, dict[str, Any]] = {}
        self._context = ""
        self._adapters = Adapters()
        from diffusers.configuration_utils import FrozenDict

        self._config = FrozenDict(compiled.plan.graph.config)

    # --- what pipelines read from a denoiser -------------------------------------------------
    @property
    def config(self) -> Any:
        return self._config

    @property
    def plan(self) -> Plan:
        return self._compiled.plan

    @property
    def target(self) -> str:
        return f"{self._compiled.backend}-{self._compiled.precision}"

    @property
    def compile_options(self) -> dict[str, Any]:
        """The options it was compiled with that a recompile of the same plan needs (`compile`, and
        `cuda_graphs` where it is on)."""
        return recompile_options(self._compiled.info)

    @property
    def device(self) -> torch.device:
        return torch.device(self._compiled.device)

    @property
    def dtype(self) -> torch.dtype:
        return self._compiled.input_dtype

    @property
    def report(self) -> list[dict[str, Any]]:
        """Each applied pass with its config and report (what changed, measured error)."""
        return list(self.plan.graph.applied)

    def to(self, *args: Any, **kwargs: Any) -> "OptimizedModel":
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if dtype is not None and dtype != self.dtype:
            raise InputError(f"this model was compiled for {self.target} ({self.dtype}); it cannot be cast to "
                             f"{dtype}. Optimize again with the target precision you need (e.g. torch-fp16).")
        if device is not None and torch.device(device) != self.device:
            if self._recompile is None:
                raise InputError(f"this {self.target} model cannot move to {device}; optimize it for that device")
            self._use(self._recompile(self.plan, device))
            self.reset()
        return self

    def save(self, path: str | os.PathLike[str], overwrite: bool = False) -> Path:
        """Writes the artifact folder (manifest, graphs, weights, backend files); see diffc.load."""
        target = {"backend": self._compiled.backend, "precision": self._compiled.precision,
                  "device": str(self._compiled.device), "info": self._compiled.info}
        files = saved_files(self._compiled.backend, self._compiled.files, self._compiled.info)
        return save_artifact(path, self.plan, target, files, overwrite=overwrite)

    # the scheduler settings of the pipeline it was calibrated in, checked at each loop (diffc.optimize sets it)
    sampler_watch: SamplerWatch | None = None
    _judged_loop = True

    # --- LoRA adapters ----------------------------------------------------------------------
    calibration_inputs: Any = None
    """A few calibration calls, as {input name: tensor} dicts (or a diffc CalibrationSet): the inputs on
    which a LoRA load checks the activation ranges of quantized layers and `recalibrate()` measures new
    scales. diffc.optimize fills it with a sample of its calibration set; a loaded artifact has none."""

    @property
    def lora_adapters(self) -> dict[str, float]:
        """The loaded adapters and their strengths."""
        return dict(self._adapters.scales)

    def load_lora(self, adapter: Mapping[str, torch.Tensor] | str | os.PathLike[str], scale: float = 1.0,
                  name: str = "default", strict: bool = True) -> list[str]:
        """Adds a LoRA adapter (a peft / diffusers state dict, or a .safetensors file of one) at
        `scale`, without optimizing again: the weights it touches become W0 + scale * B @ A, which
        the backend takes in place where it can (ONNX Runtime: the segments' initializers, TensorRT:
        an engine refit; quantized layers requantize their new weights) and otherwise lowers the plan
        again (torch). Activation scales stay those calibrated on the base weights: on a target that
        quantizes activations, a warning names the layers whose input range the adapter moves beyond
        ranges.RANGE_MARGIN times the calibrated one (see `recalibrate`). Keys of other pipeline
        components (text encoders) are skipped with a warning. Returns the adapter modules skipped
        as absent from the graph (strict=False only). `save` writes the merged weights."""
        if name in self._adapters.deltas:
            raise InputError(f"an adapter named {name!r} is loaded; unload_lora({name!r}) first or pick another name")
        self._check_relowerable()
        deltas, skipped = lora_deltas(denoiser_keys(read_adapter(adapter)), self.plan.graph.weights(), strict)
        self._adapters.deltas[name], self._adapters.scales[name] = deltas, float(scale)
        try:
            self._refit()
        except Exception:
            del self._adapters.deltas[name], self._adapters.scales[name]
            self._adapters.apply(self._weight_modules())  # the compiled plan still holds the previous weights
            raise
        self._check_ranges()
        return skipped

    def set_lora_scale(self, scale: float, name: str = "default") -> None:
        """Changes a loaded adapter's strength (0 turns it off)."""
        if name not in self._adapters.deltas:
            raise InputError(f"no adapter named {name!r} is loaded (loaded: {sorted(self._adapters.deltas)})")
        self._adapters.scales[name] = float(scale)
        self._refit()
        self._check_ranges()

    def unload_lora(self, name: str | None = None) -> None:
        """Removes one adapter (every adapter when `name` is None), restoring the base weights. An
        adapter fused with fuse_lora() stays in the weights, as diffusers keeps a fused adapter
        through unload_lora_weights()."""
        if name is not None and name not in self._adapters.deltas:
            raise InputError(f"no adapter named {name!r} is loaded (loaded: {sorted(self._adapters.deltas)})")
        names = [name] if name is not None else list(self._adapters.deltas)
        fused = [adapter for adapter in names if adapter in self.fused_adapters]
        self._adapters.fold(fused)
        self.forget_fused(fused)
        for adapter in names:
            if adapter not in fused:
                del self._adapters.deltas[adapter], self._adapters.scales[adapter]
        self._refit()

    def recalibrate(self, calibration: Any = None) -> dict[str, float]:
        """Measures the activation ranges of every quantized layer anew with the current (merged)
        weights on `calibration` ({input name: tensor} dicts or a CalibrationSet; default:
        `calibration_inputs`) and scales each activation scale by its range's change, so a loaded
        adapter's activations are no longer clipped; the backend takes the new scales in place (ONNX
        Runtime: its Q/DQ scale initializers) or lowers the plan again (torch). Returns {layer: factor}
        for the scales that changed."""
        activations = quantized_activations(self.plan.graph.annotations)
        if not activations:
            raise InputError(f"this {self.target} model quantizes no activations; there are no scales to recalibrate")
        calls = calibration_calls(calibration if calibration is not None else self.calibration_inputs)
        if not calls:
            raise InputError("recalibrate needs calibration inputs and this model keeps none: pass them, e.g. "
                             "fast.recalibrate(diffc.calibration.collect(pipe, ...)) or a list of "
                             "{input name: tensor} dicts of denoiser calls")
        if self._compiled.rescale is None and (self._compiled.backend != "torch" or self._recompile is None):
            raise InputError(f"this {self.target} model cannot take new activation scales in place; optimize again "
                             "with the adapter fused into the denoiser")
        modules = self._weight_modules()
        change = measure_change(self.plan.graph, calls, activations, self._adapters.at_calibration(modules))
        specs, factors = rescaled(self.plan.graph.annotations, activations, *change)
        annotations = self.plan.graph.annotations
        previous = {node: annotations[node]["precision"] for node in specs}
        if self._compiled.rescale is not None:
            self._compiled.rescale(specs)
        for node, spec in specs.items():
            annotations[node]["precision"] = spec
        if self._compiled.rescale is None:
            try:
                self._use(self._recompile(self.plan, self.device))
            except Exception:
                for node, spec in previous.items():
                    annotations[node]["precision"] = spec
                raise
        self._adapters.mark_calibrated(modules)
        return factors

    def _check_relowerable(self) -> None:
        if self._compiled.refit is None and (self._compiled.backend != "torch" or self._recompile is None):
            raise InputError(f"this {self.target} model cannot take new weights in place (its compiled files hold "
                             "them). Fuse the adapter into the denoiser before diffc.optimize (e.g. "
                             "pipe.load_lora_weights(...); pipe.fuse_lora()), or optimize again with this diffc")

    def _weight_modules(self) -> list[torch.nn.Module]:
        return [self.plan.graph.module, *(s.module for s in self.plan.segments.values())]

    def _refit(self) -> None:
        changed = self._adapters.apply(self._weight_modules())
        if not changed:
            return
        if self._compiled.refit is not None:
            weights = self.plan.graph.weights()
            self._compiled.refit({name: weights[name] for name in changed})
            return
        assert self._recompile is not None
        self._use(self._recompile(self.plan, self.device))

    def _check_ranges(self) -> None:
        """Warns when the loaded adapters move a quantized activation beyond its calibrated range."""
        activations = quantized_activations(self.plan.graph.annotations)
        if not activations or not self._adapters.deltas:
            return
        calls = calibration_calls(self.calibration_inputs)
        if not calls:
            warnings.warn(unchecked_warning(self.target, len(activations)), stacklevel=3)
            return
        grown = moved(*measure_change(self.plan.graph, calls, activations,
                                      self._adapters.at_calibration(self._weight_modules())))
        if grown:
            warnings.warn(range_warning(grown), stacklevel=3)

    def _use(self, compiled: CompiledPlan) -> None:
        """Runs `compiled` from now on (its torch runners registered as submodules)."""
        self._compiled = compiled
        self.segments = torch.nn.ModuleDict(
            {k: v for k, v in compiled.runners.items() if isinstance(v, torch.nn.Module)})

    # --- the denoising loop -----------------------------------------------------------------
    def reset(self) -> None:
        """Forgets the loop position and frees cross-step state (e.g. cached features)."""
        self.steps.reset()
        self._states.clear()

    def begin_loop(self, num_steps: int | None = None) -> None:
        """Declares that a new denoising loop starts with the next call (optionally its length)."""
        self.steps.begin_loop(num_steps)
        self._states.clear()

    @contextlib.contextmanager
    def cache_context(self, name: str) -> Iterator[None]:
        """diffusers pipelines that call the denoiser separately per branch (e.g. conditional and
        unconditional) name each call; each name keeps its own cross-step state."""
        previous, self._context = self._context, name
        try:
            yield
        finally:
            self._context = previous

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_"):
                raise
            view = _WeightView.of(self.plan.graph.weights(), name)
            if view is None:
                raise
            return view

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        sig = self.plan.graph.signature
        bound = self._bind(args, kwargs)
        return_dict = bound.pop("return_dict", sig.return_dict_default)
        flat = self._flat_inputs(bound)
        timestep = sig.timestep
        t_value = None
        if timestep is not None:
            t_value = float(flat[sig.inputs.index(timestep)].reshape(-1)[0])
        if self.steps.observe(t_value):
            self._states.clear()
            self._judged_loop = self.sampler_watch is None or self.sampler_watch.judged()
        if self.steps.num_steps is not None and self.steps.step >= self.steps.num_steps:
            raise InputError(
                f"this call is step {self.steps.step + 1} of a loop announced with begin_loop({self.steps.num_steps}); "
                "the step schedule would be applied to the wrong steps. Announce the real length with "
                "begin_loop(num_steps) (or begin_loop() when it is not known) before the loop starts.")
        variant = self.plan.schedule.variant_for(self.steps.step, self.steps.num_steps, t_value)
        if not self._judged_loop:
            variant = self.plan.schedule.default
        # without a cache_context, the call's index within its step keeps apart the state of
        # guidance branches that a loop calls one after the other
        branch = self._context or f"#call{self.steps.call_in_step}"
        state = self._states.get(branch, {})
        if self.plan.lacks_state(variant, state):
            # this branch's cache was freed after the loop's last step (e.g. by the first of two unnamed
            # calls of that step): computing everything gives the exact result without it
            variant = self.plan.schedule.default
        inputs = {spec.name: value for spec, value in zip(sig.inputs, flat)}
        results, kept = self.plan.run(variant, inputs, state, self._compiled.runners)
        results = self._in_source_dtype(results)
        if self.steps.at_last_step(self.plan.schedule.timesteps):
            self._states.pop(branch, None)  # nothing later in this loop reads it
        else:
            self._states[branch] = kept
        if return_dict and sig.output_class:
            cls = _output_class(sig.output_class)
            return cls(**{f.name: r for f, r in zip(dataclasses.fields(cls), results)})
        return results

    def _in_source_dtype(self, results: Any) -> Any:
        """A half-precision model's outputs go back in its dtype, whatever precision it runs in."""
        dtype = getattr(torch, self.plan.graph.signature.source_dtype)
        if dtype not in HALF_DTYPES:
            return results
        return type(results)(r.to(dtype) if r.is_floating_point() else r for r in results)

    def _bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        sig = self.plan.graph.signature
        if len(args) > len(sig.parameters):
            raise InputError(f"forward takes at most {len(sig.parameters)} positional arguments, got {len(args)}")
        bound = dict(zip(sig.parameters, args))
        for key, value in kwargs.items():
            if key not in sig.parameters:
                raise InputError(f"forward got an unexpected argument {key!r}; it takes {', '.join(sig.parameters)}")
            if key in bound:
                raise InputError(f"forward got argument {key!r} twice (positionally and by keyword)")
            bound[key] = value
        captured = {spec.path[0] for spec in sig.inputs} | {"return_dict"}
        constants = dict(sig.constants)
        for key, value in bound.items():
            if key in constants and not _is_absent(value) and constant_arguments({key: value}).get(key) != constants[key]:
                raise InputError(f"argument {key!r} is {value!r}, but the model was captured with {key}="
                                 f"{constants[key]!r}, a constant of its graph: leave it out or pass that value, or "
                                 "optimize again with it in example_inputs (diffc.optimize(..., example_inputs=...))")
            if key not in captured and key not in constants and not _is_absent(value):
                raise InputError(
                    f"argument {key!r} was given, but the model was captured without it, so it would be ignored. "
                    f"Optimize again with it in example_inputs (diffc.optimize(..., example_inputs={{...}})).")
        return bound

    def _flat_inputs(self, bound: dict[str, Any]) -> list[torch.Tensor]:
        sig = self.plan.graph.signature
        latent = bound.get(sig.latent.path[0])
        if not isinstance(latent, torch.Tensor):
            raise InputError(f"forward needs the latent {sig.latent.name!r} as a tensor, got {type(latent).__name__}")
        batch = latent.shape[0]
        values: list[torch.Tensor] = []
        for spec in sig.inputs:
            value: Any = tensor_at(bound, spec.path)
            if value is None:
                value = self._fill_missing(spec, values, batch)
            values.append(self._conform(spec, value, batch))
        check_shapes(sig.inputs, values)
        return values

    def _fill_missing(self, spec: TensorInput, earlier: list[torch.Tensor], batch: int) -> torch.Tensor:
        fill = _NEUTRAL_FILLS.get(spec.path[-1])
        if fill is None:
            raise InputError(f"forward needs {spec.name!r}: the model was captured with it (shape {spec.shape}).")
        length = spec.example_shape[-1]
        for other, value in zip(self.plan.graph.signature.inputs, earlier):
            if "text_len" in other.shape:
                length = value.shape[other.shape.index("text_len")]
                break
        return fill((batch, length), self.device)

    def _conform(self, spec: TensorInput, value: Any, batch: int) -> torch.Tensor:
        dtype = getattr(torch, spec.dtype)
        if not isinstance(value, torch.Tensor):
            if not isinstance(value, (int, float)):
                raise InputError(f"{spec.name} must be a tensor or a number, got {type(value).__name__}")
            value = torch.tensor(value, device=self.device)
        if spec.role == "timestep" and value.dim() == 0:
            value = value.reshape(1).expand(batch)
        if value.device != self.device:
            raise InputError(f"{spec.name} is on {value.device} but the model runs on {self.device}; "
                             f"move the inputs (or the model: fast.to('{value.device}'))")
        if value.is_floating_point() and dtype.is_floating_point and spec.role != "timestep":
            dtype = self.dtype  # activations in the compiled precision; timesteps keep theirs
        return value.to(dtype)


def _is_absent(value: Any) -> bool:
    return value is None or (isinstance(value, Mapping) and all(v is None for v in value.values()))


def _output_class(path: str) -> type:
    module_name, _, qualname = path.rpartition(".")
    if not module_name.startswith("diffusers."):
        raise InputError(f"output class {path} is not a diffusers output; refusing to import it")
    return getattr(importlib.import_module(module_name), qualname)


class _WeightView:
    """Read-only stand-in for a submodule of the original denoiser, for pipelines that inspect
    one (e.g. SDXL reads `unet.add_embedding.linear_1.in_features`): its weights and the
    Linear/Conv sizes they imply."""

    def __init__(self, weights: dict[str, torch.Tensor], prefix: str) -> None:
        self._weights, self._prefix = weights, prefix

    @classmethod
    def of(cls, weights: dict[str, torch.Tensor], prefix: str) -> "_WeightView | None":
        return cls(weights, prefix) if any(k.startswith(prefix + ".") for k in weights) else None

    def __getattr__(self, name: str) -> Any:
        weight = self._weights.get(f"{self._prefix}.weight")
        if name in ("in_features", "in_channels") and weight is not None:
            return weight.shape[1]
        if name in ("out_features", "out_channels") and weight is not None:
            return weight.shape[0]
        key = f"{self._prefix}.{name}"
        if key in self._weights:
            return self._weights[key]
        view = _WeightView.of(self._weights, key)
        if view is None:
            raise AttributeError(f"the optimized model has no submodule or weight {key!r}")
        return view
