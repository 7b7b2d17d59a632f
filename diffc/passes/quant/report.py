"""What the quant pass reports about a placement."""
from __future__ import annotations

from typing import Any

import numpy as np

from ...calibration import output_error
from ...ir import DiffusionGraph
from ...ir.precision import FORMATS, FP8, INT8, ActivationQuant, weight_bytes
from ...ir.simulation import simulate
from ..base import PassContext
from .floor import KEPT_REASON
from .formats import uniform_bytes
from .layers import Attention, Layer
from .placement import pareto_front
from .sensitivity import Sensitivity, sample_calls


def placement_report(cfg: Any, dg: DiffusionGraph, ctx: PassContext, layers: list[Layer], placeable: list[Layer],
                     formats: tuple[str, ...], chosen: dict[str, str], sensitivity: Sensitivity, sizes: np.ndarray,
                     objective: np.ndarray, rule: str, weight_only: dict[str, str]) -> dict[str, Any]:
    """The pass's report of a placement: every layer's format (or why it stays at full
    precision), sizes, sensitivities, the Pareto front and the error on calibration data.
    `weight_only`: the protected layers whose weights alone are quantized, with their format."""
    steps = {step for _, step in sample_calls(ctx.calibration, cfg.samples)}
    errors = output_error(ctx.calibration, simulate(dg.module, dg.annotations), dg, steps=steps)
    stored = {**chosen, **weight_only}
    before = sum(weight_bytes(layer.shape, None) for layer in layers)
    after = sum(weight_bytes(layer.shape, stored.get(layer.node)) for layer in layers)
    per_layer = []
    for layer in layers:
        entry: dict[str, Any] = {"node": layer.node, "weight": layer.weight, "shape": list(layer.shape),
                                 "bytes_before": weight_bytes(layer.shape, None)}
        if layer.node in weight_only:  # protected from the placement; only its weight is stored low-bit
            entry.update(format=None, weight_format=weight_only[layer.node], protected=layer.protected,
                         bytes_after=weight_bytes(layer.shape, weight_only[layer.node]))
        elif layer.protected or layer.node not in chosen:
            entry.update(format=None, bytes_after=entry["bytes_before"], protected=layer.protected or KEPT_REASON)
            if not layer.protected:  # kept for the floor: its sensitivity says why it went first
                entry["sensitivity"] = rounded(sensitivity.hessian[layer.node])
        else:
            fmt = chosen[layer.node]
            entry.update(format=fmt, bytes_after=weight_bytes(layer.shape, fmt),
                         sensitivity=rounded(sensitivity.hessian[layer.node]),
                         mse_proxy=rounded(sensitivity.mse[layer.node]),
                         weight_trace=float(f"{sensitivity.weight_trace[layer.node]:.4g}"),
                         activation_trace=float(f"{sensitivity.activation_trace[layer.node]:.4g}"))
            spec = dg.annotations[layer.node]["precision"]
            if spec.get("activation") and spec["activation"].get("scale"):
                entry["activation_scale"] = float(f"{spec['activation']['scale']:.6g}")
            if spec.get("activation") and spec["activation"].get("group_scales"):
                entry["activation_group_scales"] = [float(f"{v:.6g}") for v in spec["activation"]["group_scales"]]
                entry["activation_group_sizes"] = list(spec["activation"]["group_sizes"])
        per_layer.append(entry)
    front = pareto_front(objective, sizes, cfg.pareto_points) if len(formats) > 1 else []
    original = uniform_bytes(placeable, "fp32")
    placed_after = sum(weight_bytes(layer.shape, chosen.get(layer.node)) for layer in placeable)
    return {
        "target": ctx.target, "formats": list(formats), "placement": rule, "sensitivity": cfg.sensitivity,
        "accumulate": cfg.accumulate,
        "activation_range": cfg.activation_range, "calibration_calls": sensitivity.calls,
        "hutchinson_probes": sensitivity.probes, "guided_sensitivity": sensitivity.guided,
        "layers_quantized": {f: sum(v == f for v in chosen.values())
                             for f in dict.fromkeys([*formats, *chosen.values()])},
        "layers_protected": sum(1 for layer in layers if layer.protected),
        "weight_only_layers": {f: sum(v == f for v in weight_only.values()) for f in dict.fromkeys(weight_only.values())},
        "weight_bytes_before": before, "weight_bytes_after": after,
        "size_ratio": round(after / max(before, 1), 4),
        # what a size budget bounds: the placeable layers, against their size in size_relative_to
        "placeable_size_ratio": {"relative_to": cfg.size_relative_to, "ratio": round(
            placed_after / max(uniform_bytes(placeable, cfg.size_relative_to), 1), 4)},
        "predicted_error": predicted_error(sensitivity, chosen),
        "pareto_front": [{"size_ratio": round(size / original, 4), "predicted_error": float(f"{cost:.6g}"),
                          "formats": {f: sum(formats[i] == f for i in c[:len(placeable)]) for f in formats}}
                         for size, cost, c in front],
        "relative_error_per_step": {int(s): float(f"{e:.6g}") for s, e in errors.relative.items()},
        "relative_error": float(f"{errors.mean_relative:.6g}"),
        "norms": "normalization layers are not quantized: they run at the backend's precision",
        "split_shortcut": [layer.node for layer in placeable if layer.pieces and cfg.split_shortcut
                           and layer.node in chosen and FORMATS[chosen[layer.node]].activation in (INT8, FP8)],
        "layers": per_layer,
    }


def predicted_error(sensitivity: Sensitivity, placed: dict[str, str]) -> float:
    """The placement's summed sensitivity; a layer the floor moved to int8_dynamic (not measured)
    counts at its static int8 sensitivity, an upper bound."""
    total = sum(sensitivity.hessian[n].get(f, sensitivity.hessian[n].get("int8", 0.0)) for n, f in placed.items())
    return float(f"{total:.6g}")


def rounded(values: dict[str, float]) -> dict[str, float]:
    return {k: float(f"{v:.4g}") for k, v in values.items()}


def attention_report(attentions: list[Attention], chosen: dict[str, str],
                     quantization: dict[str, dict[str, tuple[ActivationQuant, ...]]],
                     sensitivity: Sensitivity, kept: set[str]) -> list[dict[str, Any]]:
    """Per attention node: its format (None where it stays unquantized), sensitivity and scales."""
    entries = []
    for a in attentions:
        name = chosen[a.node]
        quantized = name in quantization[a.node] and a.node not in kept
        entry: dict[str, Any] = {"node": a.node, "format": ("int8" if FORMATS[name].activation == INT8 else "fp8")
                                 if quantized else None,
                                 "flops": a.flops, "sensitivity": rounded(sensitivity.hessian[a.node]),
                                 "mse_proxy": rounded(sensitivity.mse[a.node])}
        if quantized:
            entry["scales"] = {role: float(f"{q.scale:.6g}")
                               for role, q in zip(("query", "key", "value"), quantization[a.node][name])}
        entries.append(entry)
    return entries
