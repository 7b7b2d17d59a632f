"""Backends lower a Plan to runnable segments. Targets are `<backend>[-<precision>]`."""
from __future__ import annotations

from ..errors import TargetError
from .base import BACKEND_NAMES, PRECISIONS, Backend, Target
from .onnxruntime import OnnxRuntimeBackend
from .tensorrt import TensorRTBackend
from .torch import TorchBackend

BACKENDS: dict[str, type[Backend]] = {"torch": TorchBackend, "ort": OnnxRuntimeBackend, "trt": TensorRTBackend}

# Backends this diffc names in its target grammar but does not ship yet, with the reason.
_NOT_YET: dict[str, str] = {}


def parse_target(text: str) -> Target:
    """`torch`, `torch-fp16`, `ort-int8`, ... -> Target; raises TargetError listing the valid
    targets when the text is unknown or the target cannot run here."""
    backend, _, precision = str(text).strip().lower().partition("-")
    if backend not in BACKEND_NAMES or (precision and precision not in PRECISIONS):
        raise TargetError(f"unknown target {text!r}. {_valid_targets_sentence()}")
    if backend in _NOT_YET:
        raise TargetError(f"target {text!r} is not available: {_NOT_YET[backend]}. {_valid_targets_sentence()}")
    cls = BACKENDS[backend]
    target = Target(backend, precision or cls.default_precision)
    reason = cls.unavailable_reason(target.precision)
    if reason:
        raise TargetError(f"target {text!r} is not available: {reason}. {_valid_targets_sentence()}")
    return target


def valid_targets() -> list[str]:
    return [f"{name}-{p}" for name, cls in BACKENDS.items() for p in PRECISIONS if cls.unavailable_reason(p) is None]


def _valid_targets_sentence() -> str:
    return ("Targets are <backend>[-<precision>] with backend in {" + ", ".join(BACKEND_NAMES) + "} and precision in {"
            + ", ".join(PRECISIONS) + "}; available here: " + ", ".join(valid_targets()) + ".")


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise TargetError(f"no backend {name!r}. {_valid_targets_sentence()}")
    return BACKENDS[name]()


__all__ = ["BACKENDS", "Backend", "Target", "get_backend", "parse_target", "valid_targets"]
