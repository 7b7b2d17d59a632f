"""Activation scales from timestep-aware statistics, and the frozen precision specs written as
annotations."""
from __future__ import annotations

from typing import Callable

from ...calibration import NodeStats
from ...errors import PassError
from ...ir import DiffusionGraph
from ...ir.precision import (FORMATS, FP8, FP8_MAX, INT8, PER_SAMPLE, PER_TOKEN, ActivationQuant, PrecisionSpec,
                             spec_with)
from .layers import Layer

RANGE_METHODS = ("mse", "percentile", "max")


def activation_scale(stats: NodeStats, dtype: str, method: str, percentile: float) -> float:
    """The per-tensor scale of an activation from its statistics over the whole trajectory.
    int8: the MSE-optimal clipping range (or a percentile, or the maximum) over 127 levels.
    fp8: its floating grid has range to spare and coarse steps at the top, so it keeps the
    maximum (or the percentile) at e4m3's largest value."""
    if method not in RANGE_METHODS:
        raise PassError(f"unknown activation range method {method!r}; use one of {', '.join(RANGE_METHODS)}")
    if stats.count == 0 or stats.absmax <= 0:
        return 1.0  # an all-zero activation is exact at any scale
    if dtype == FP8:
        top = stats.abs_percentile(percentile) if method == "percentile" else stats.absmax
        return max(top, 1e-12) / FP8_MAX
    if dtype != INT8:
        raise PassError(f"no static activation scale for {dtype}")
    if method == "mse":
        top = stats.mse_optimal_range(bits=8)
    elif method == "percentile":
        top = stats.abs_percentile(percentile)
    else:
        top = stats.absmax
    return max(top, 1e-12) / 127.0


def layer_activation(layer: Layer, stats: Callable[[str], NodeStats], dtype: str, method: str, percentile: float,
                     split: bool) -> ActivationQuant:
    """The static quantization of a layer's input: one scale for the tensor, or with `split` and a
    concatenated input, one scale per concatenated piece from that piece's own statistics."""
    if split and layer.pieces:
        return ActivationQuant(dtype, None, method, tuple(size for _, size in layer.pieces),
                               tuple(activation_scale(stats(piece), dtype, method, percentile)
                                     for piece, _ in layer.pieces), layer.axis)
    return ActivationQuant(dtype, activation_scale(stats(layer.input), dtype, method, percentile), method)


def dynamic_activation(layer: Layer) -> ActivationQuant:
    """The run-time quantization of a layer's input: a scale per token for a linear, per sample
    for a convolution."""
    return ActivationQuant(INT8, dynamic=PER_TOKEN if len(layer.shape) == 2 else PER_SAMPLE)


def activation_types(formats: tuple[str, ...]) -> set[str]:
    return {FORMATS[f].activation for f in formats if FORMATS[f].activation in (INT8, FP8)}


def annotate(dg: DiffusionGraph, choice: dict[str, str], activations: dict[str, dict[str, ActivationQuant]],
             reasons: dict[str, str]) -> dict[str, PrecisionSpec]:
    """Writes each layer's spec into dg.annotations[node]["precision"]; returns the specs."""
    specs = {}
    for node, name in choice.items():
        spec = spec_with(name, activations.get(node, {}).get(name), reasons.get(node, ""))
        dg.annotations.setdefault(node, {})["precision"] = spec.to_json()
        specs[node] = spec
    return specs
