"""Which layer formats a target allows, and what each costs (bytes, estimated time)."""
from __future__ import annotations

from ...errors import PassError
from ...ir.precision import FORMATS

# Formats each low-bit target precision places. A single-format target quantizes every
# unprotected layer to it; "mixed" chooses per layer under a budget.
TARGET_FORMATS: dict[str, tuple[str, ...]] = {
    "int8": ("int8",), "fp8": ("fp8",), "int4": ("int4",),
    "mixed": ("bf16", "fp8", "int8", "int4", "w4a8"),
}
# Estimated matmul time per MAC relative to bf16: 8-bit tensor-core math runs at twice the bf16
# rate on Hopper/Ada (dense fp8/int8 vs bf16 peak); int4 weight-only keeps bf16 math but moves a
# quarter of the weight bytes, which pays off where layers are weight-bound (small batches).
RELATIVE_COST: dict[str, float] = {"bf16": 1.0, "fp16": 1.0, "fp8": 0.5, "int8": 0.5, "w4a8": 0.5, "int4": 0.8}


def target_precision(target: str) -> str:
    """`torch-int8` -> `int8`."""
    return str(target).partition("-")[2]


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
    if precision != "mixed" and tuple(requested) != TARGET_FORMATS[precision]:
        raise PassError(f"target {target!r} runs {TARGET_FORMATS[precision][0]} layers only; choose formats "
                        f"{list(requested)} with a torch-mixed (or ort-mixed) target")
    if not requested:
        raise PassError("formats is empty; name at least one of " + ", ".join(FORMATS))
    return tuple(dict.fromkeys(requested))
