"""Activation ranges of an optimized model's quantized layers after its weights changed (a LoRA adapter).

The quantization pass calibrated one static scale per quantized activation on the base weights. An
adapter changes the weights, and with them the ranges of the activations downstream of the layers it
touches: an activation that grows past its scale is clipped. `measure` runs the plan's graph in float
on a few calibration calls and records each quantized activation's absolute maximum (one per channel
group of a split concatenation); comparing it under the merged weights with the same measurement under
the weights the scales were calibrated for tells how far each range moved. `rescaled` multiplies each
scale by that factor, which keeps the clipping the pass chose relative to the range (MSE-optimal,
percentile or maximum) without the calibration statistics, which an optimized model does not keep.

The calibration calls are {input name (TensorInput.name): tensor} dicts, or a diffc CalibrationSet (any
object whose `records()` yields objects with such `inputs`)."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ContextManager

import torch
import torch.fx

from ..errors import InputError
from ..ir import DiffusionGraph
from ..ir.precision import FP8, FP8_MAX, INT8, ActivationQuant, PrecisionSpec

# An activation whose absolute maximum under the adapter exceeds this many times the one its scale was
# calibrated for is reported: past it, clipping error outgrows the rounding error the scale was chosen for.
RANGE_MARGIN = 1.25
# At most this many calls of a calibration set are measured (evenly spaced over its records).
MAX_CALLS = 32

Activations = dict[str, list[tuple[int, ActivationQuant]]]


def quantized_activations(annotations: Mapping[str, Mapping[str, Any]]) -> Activations:
    """{node: [(argument index, activation quantization)]} for every int8 / fp8 activation with
    calibrated scales of the annotated nodes: a layer's input (argument 0), an attention's query,
    key and value (0, 1, 2). Dynamic activations take their scales from each input: no range to move."""
    found: Activations = {}
    for node, annotation in annotations.items():
        if "precision" not in annotation:
            continue
        spec = PrecisionSpec.from_json(annotation["precision"])
        quantized = [(i, a) for i, a in enumerate((spec.activation, *spec.operands))
                     if a is not None and a.dtype in (INT8, FP8) and a.dynamic is None]
        if quantized:
            found[node] = quantized
    return found


def calibration_calls(calibration: Any) -> list[dict[str, torch.Tensor]]:
    """The denoiser calls of `calibration` (see the module docstring); [] for None."""
    if calibration is None:
        return []
    if isinstance(calibration, Mapping):
        return [dict(calibration)]
    if hasattr(calibration, "records"):
        total = len(calibration) if hasattr(calibration, "__len__") else MAX_CALLS
        keep = {round(i * (total - 1) / max(MAX_CALLS - 1, 1)) for i in range(min(total, MAX_CALLS))}
        return [dict(r.inputs) for i, r in enumerate(calibration.records()) if i in keep]
    if isinstance(calibration, Sequence) and all(isinstance(c, Mapping) for c in calibration):
        return [dict(c) for c in calibration]
    raise InputError(f"calibration inputs are {{input name: tensor}} dicts, a list of them or a diffc CalibrationSet; "
                     f"got {type(calibration).__name__}")


def measure(dg: DiffusionGraph, calls: Sequence[Mapping[str, torch.Tensor]],
            activations: Activations) -> dict[tuple[str, int], torch.Tensor]:
    """The absolute maximum of every quantized activation over `calls` of the graph in float (a vector
    of one value per channel group for a grouped activation, else of one value)."""
    recorder = _Recorder(dg.module, activations)
    weights = [v for v in dg.weights().values() if v.is_floating_point()]
    dtype = weights[0].dtype if weights else torch.float32
    device = weights[0].device if weights else torch.device("cpu")
    with torch.no_grad():
        for call in calls:
            missing = [spec.name for spec in dg.signature.inputs if spec.name not in call]
            if missing:
                raise InputError(f"a calibration call lacks the inputs {missing}; it holds {sorted(call)}")
            args = [_conform(call[spec.name], spec.role, dtype, device) for spec in dg.signature.inputs]
            recorder.run(*args)
    return recorder.maxima


def measure_change(dg: DiffusionGraph, calls: Sequence[Mapping[str, torch.Tensor]], activations: Activations,
                   calibrated: ContextManager[Any]) -> tuple[dict[tuple[str, int], torch.Tensor], ...]:
    """`measure` under the weights the scales were calibrated for (within `calibrated`), then under
    the current ones."""
    with calibrated:
        reference = measure(dg, calls, activations)
    return reference, measure(dg, calls, activations)


def unchecked_warning(target: str, layers: int) -> str:
    return (f"this {target} model keeps no calibration inputs, so the activation ranges of its {layers} quantized "
            "layers could not be checked with the adapter; their scales stay those calibrated on the base weights. "
            "Call fast.recalibrate(calibration_set) to measure them with the adapter loaded")


def moved(reference: Mapping[tuple[str, int], torch.Tensor],
          current: Mapping[tuple[str, int], torch.Tensor]) -> dict[str, float]:
    """{node: how many times its calibrated range the activation now reaches} where above RANGE_MARGIN."""
    grown: dict[str, float] = {}
    for key, now in current.items():
        ratio = float((now / reference[key].clamp_min(1e-12)).max())
        if ratio > RANGE_MARGIN:
            grown[key[0]] = max(grown.get(key[0], 0.0), ratio)
    return grown


def range_warning(grown: Mapping[str, float]) -> str:
    worst = sorted(grown.items(), key=lambda item: -item[1])
    listed = ", ".join(f"{node} ({ratio:.2f}x)" for node, ratio in worst[:5])
    more = f" and {len(worst) - 5} more" if len(worst) > 5 else ""
    return (f"the adapter moves the input range of {len(worst)} quantized layer(s) beyond {RANGE_MARGIN}x the range "
            f"their activation scales were calibrated for: {listed}{more}. Those activations are clipped; call "
            "fast.recalibrate() (or fast.recalibrate(calibration_set)) to measure new scales with the adapter loaded")


def rescaled(annotations: Mapping[str, Mapping[str, Any]], activations: Activations,
             reference: Mapping[tuple[str, int], torch.Tensor],
             current: Mapping[tuple[str, int], torch.Tensor]) -> tuple[dict[str, dict[str, Any]], dict[str, float]]:
    """The precision specs (JSON) of the nodes whose activation ranges changed, with each scale times
    its range's change; and each such node's largest factor."""
    specs: dict[str, dict[str, Any]] = {}
    factors: dict[str, float] = {}
    for node, quantized in activations.items():
        spec = PrecisionSpec.from_json(annotations[node]["precision"])
        parts = [spec.activation, *spec.operands]
        for index, activation in quantized:
            if (node, index) not in current or torch.equal(current[(node, index)], reference[(node, index)]):
                continue
            ratio = current[(node, index)].double() / reference[(node, index)].double().clamp_min(1e-12)
            top = current[(node, index)].double() / (127.0 if activation.dtype == INT8 else FP8_MAX)
            if activation.group_sizes:
                old = torch.tensor(activation.group_scales, dtype=torch.float64)
                new = torch.where(reference[(node, index)] > 0, old * ratio, top.clamp_min(1e-12))
                parts[index] = dataclasses.replace(activation, group_scales=tuple(float(s) for s in new))
            else:
                base = reference[(node, index)][0]
                scale = float(activation.scale * ratio[0]) if base > 0 else max(float(top[0]), 1e-12)
                parts[index] = dataclasses.replace(activation, scale=scale)
            if parts[index] != activation:
                factors[node] = max(factors.get(node, 0.0), float(ratio.max()))
        if node in factors:
            specs[node] = dataclasses.replace(spec, activation=parts[0], operands=tuple(parts[1:])).to_json()
    return specs, factors


class _Recorder(torch.fx.Interpreter):
    def __init__(self, module: torch.fx.GraphModule, activations: Activations) -> None:
        super().__init__(module)
        self.activations = activations
        self.maxima: dict[tuple[str, int], torch.Tensor] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        for index, activation in self.activations.get(n.name, ()):
            arg = n.args[index] if index < len(n.args) else None
            if isinstance(arg, torch.fx.Node) and isinstance(self.env.get(arg), torch.Tensor):
                peak = _absmax(self.env[arg].detach().float(), activation)
                key = (n.name, index)
                self.maxima[key] = torch.maximum(self.maxima[key], peak) if key in self.maxima else peak
        return super().run_node(n)


def _absmax(x: torch.Tensor, activation: ActivationQuant) -> torch.Tensor:
    if not activation.group_sizes:
        return x.abs().amax().reshape(1).cpu()
    pieces = torch.split(x.abs(), list(activation.group_sizes), dim=activation.axis)
    return torch.stack([p.amax() for p in pieces]).cpu()


def _conform(value: Any, role: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    tensor = value if isinstance(value, torch.Tensor) else torch.tensor(value)
    if tensor.is_floating_point() and role != "timestep":
        tensor = tensor.to(dtype)
    return tensor.to(device)


__all__ = ["MAX_CALLS", "RANGE_MARGIN", "calibration_calls", "measure", "measure_change", "moved",
           "quantized_activations", "range_warning", "rescaled", "unchecked_warning"]
