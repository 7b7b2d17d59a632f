"""Which layer formats a target allows, and what each costs in time: measured by the target's
backend on this machine where it can, estimated where it cannot."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ...errors import PassError
from ...ir.precision import FORMATS, weight_bytes
from .layers import Attention, Layer
from .placement import place

# Formats each low-bit target precision places by default. A single-format target quantizes every
# unprotected layer to it; "mixed" chooses per layer under a budget.
TARGET_FORMATS: dict[str, tuple[str, ...]] = {
    "int8": ("int8",), "fp8": ("fp8",), "int4": ("int4",),
    "mixed": ("bf16", "fp8", "int8", "int4", "w4a8"),
}
# What `formats=` may name besides the default: int8 with dynamic activation scales is int8 too
OTHER_FORMATS: dict[str, tuple[str, ...]] = {"int8": ("int8_dynamic",), "mixed": ("int8_dynamic",)}
# TensorRT's int8 Q/DQ takes static scales only; torch and ONNX Runtime run dynamic ones
DYNAMIC_BACKENDS = ("torch", "ort")
# backends that compute int8 weight-only layers from weights dequantized once (torch: the simulation's
# constants; ONNX Runtime: a float initializer), so storing them as int8 costs no time. TensorRT's
# weight-only quantization is documented for INT4 GEMMs; it is not relied on for int8
WEIGHT_ONLY_INT8_BACKENDS = ("torch", "ort")
# Estimated matmul time per MAC relative to bf16, where the target's backend cannot time layers
# on this machine (TensorRT): 8-bit tensor-core math runs at twice the bf16 rate on Hopper/Ada
# (dense fp8/int8 vs bf16 peak); int4 weight-only keeps bf16 math but moves a quarter of the weight
# bytes, which pays off where layers are weight-bound (small batches). Dynamic int8 adds a pass
# over the input per call (its largest magnitude per token). int8 weight-only computes in full
# precision from weights dequantized once: it saves bytes, not time.
RELATIVE_COST: dict[str, float] = {"bf16": 1.0, "fp16": 1.0, "fp8": 0.5, "int8": 0.5, "int8_dynamic": 0.55,
                                   "w4a8": 0.5, "int4": 0.8, "int8_weight": 1.0}
ESTIMATED = "estimated for a Hopper/Ada GPU (the target's backend cannot time layers on this machine)"
MEASURED = "measured on this machine: one linear layer in each format, as the target's backend runs it"
# (formats) -> each format's time over the unquantized layer's, or None where it cannot be measured
FormatTimer = Callable[[tuple[str, ...]], "dict[str, float] | None"]


def latency_costs(timer: FormatTimer | None, formats: tuple[str, ...], ratio: float) -> tuple[dict[str, float], str]:
    """Each format's matmul time over the unquantized layer's, and where the figures come from.
    Refuses a latency ratio below every format's, before any sensitivity is measured."""
    measured = timer(formats) if timer is not None else None
    costs, source = (RELATIVE_COST, ESTIMATED) if measured is None else (measured, MEASURED)
    if min(costs[f] for f in formats) > ratio:
        raise PassError(_unmeetable(f"latency_ratio={ratio} is below every format's time", costs, source))
    return costs, source


def cost_table(costs: dict[str, float]) -> str:
    return ", ".join(f"{name} {cost:.2f}x" for name, cost in costs.items())


def _unmeetable(problem: str, costs: dict[str, float], source: str) -> str:
    return (f"{problem}: relative to the unquantized layer the formats take {cost_table(costs)} ({source}). Choose a target "
            "whose low-bit kernels are faster here (on a CPU, ort-mixed), raise latency_ratio, or budget by size "
            "(size_ratio)")


def layer_times(layers: list[Layer], attentions: list[Attention], attention_formats: dict[str, Any],
                formats: tuple[str, ...], costs: dict[str, float]) -> np.ndarray:
    """Per layer (then attention) row and format, its FLOPs times the format's relative cost; an
    attention keeps the unquantized cost in a format that leaves it alone."""
    rows = [[layer.flops * costs[f] for f in formats] for layer in layers]
    rows += [[a.flops * (costs[f] if f in attention_formats[a.node] else 1.0) for f in formats] for a in attentions]
    return np.array(rows, float).reshape(len(rows), len(formats))


def place_by_latency(objective: np.ndarray, times: np.ndarray, budget: float, costs: dict[str, float],
                     source: str) -> list[int]:
    try:
        return place(objective, times, budget)
    except PassError as exc:
        raise PassError(_unmeetable(str(exc), costs, source)) from exc


def target_precision(target: str) -> str:
    """`torch-int8` -> `int8`."""
    return str(target).partition("-")[2]


def runs_dynamic_scales(target: str) -> bool:
    """Whether the target's backend runs activation scales computed at run time."""
    return str(target).partition("-")[0] in DYNAMIC_BACKENDS


def uniform_bytes(layers: list[Layer], size_relative_to: str) -> float:
    """The weight bytes of `layers` all in format `size_relative_to` ("fp32": as they are)."""
    fmt = None if size_relative_to == "fp32" else size_relative_to
    return float(sum(weight_bytes(layer.shape, fmt) for layer in layers))


def runs_int8_weight_only(target: str) -> bool:
    return str(target).partition("-")[0] in WEIGHT_ONLY_INT8_BACKENDS


def formats_for(target: str, requested: tuple[str, ...] | None) -> tuple[str, ...]:
    precision = target_precision(target)
    if precision not in TARGET_FORMATS:
        raise PassError(f"the quant pass places low-bit formats, but the target {target!r} is not low-bit; use a "
                        f"target with precision in {{{', '.join(TARGET_FORMATS)}}}, e.g. torch-int8 or torch-mixed")
    if requested is None:
        return TARGET_FORMATS[precision]
    unknown = [f for f in requested if f not in FORMATS]
    if unknown:
        raise PassError(f"unknown format(s) {unknown}; formats are {', '.join(FORMATS)}")
    allowed = TARGET_FORMATS[precision] + OTHER_FORMATS.get(precision, ())
    if not set(requested) <= set(allowed):
        raise PassError(f"target {target!r} runs {' or '.join(allowed)} layers only; choose formats "
                        f"{list(requested)} with a torch-mixed (or ort-mixed) target")
    dynamic = [f for f in requested if FORMATS[f].dynamic]
    if dynamic and not runs_dynamic_scales(target):
        raise PassError(f"target {target!r} cannot run {dynamic[0]} (activation scales computed at run time): "
                        "TensorRT's int8 takes static scales. Use the int8 format, or a torch or ort target")
    if not requested:
        raise PassError("formats is empty; name at least one of " + ", ".join(FORMATS))
    return tuple(dict.fromkeys(requested))
