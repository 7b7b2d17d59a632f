"""Activation scales from timestep-aware statistics, and the frozen precision specs written as
annotations."""
from __future__ import annotations

from ...calibration import NodeStats
from ...errors import PassError
from ...ir import DiffusionGraph
from ...ir.precision import FORMATS, FP8, FP8_MAX, INT8, PrecisionSpec, spec_for

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


def activation_types(formats: tuple[str, ...]) -> set[str]:
    return {FORMATS[f].activation for f in formats if FORMATS[f].activation in (INT8, FP8)}


def annotate(dg: DiffusionGraph, choice: dict[str, str], scales: dict[str, dict[str, float]], method: str,
             reasons: dict[str, str]) -> dict[str, PrecisionSpec]:
    """Writes each layer's spec into dg.annotations[node]["precision"]; returns the specs."""
    specs = {}
    for node, name in choice.items():
        spec = spec_for(name, scales.get(node, {}).get(name), method if FORMATS[name].activation in (INT8, FP8)
                        else None, reasons.get(node, ""))
        dg.annotations.setdefault(node, {})["precision"] = spec.to_json()
        specs[node] = spec
    return specs
