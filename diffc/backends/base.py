"""Targets (`<backend>[-<precision>]`) and the Backend interface every backend implements."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..errors import TargetError
from ..ir import CompiledPlan, Plan
from .format_times import LayerShape

BACKEND_NAMES = ("torch", "ort", "trt")
PRECISIONS = ("fp32", "fp16", "bf16", "fp8", "int8", "int4", "mixed")
LOW_BIT = ("fp8", "int8", "int4", "mixed")


@dataclass(frozen=True)
class Target:
    backend: str
    precision: str

    def __str__(self) -> str:
        return f"{self.backend}-{self.precision}"


class Backend(ABC):
    name: ClassVar[str]
    default_precision: ClassVar[str] = "fp32"
    # compile options a user may pass to diffc.optimize by keyword (beside the passes' budget)
    options: ClassVar[tuple[str, ...]] = ()

    @classmethod
    @abstractmethod
    def unavailable_reason(cls, precision: str) -> str | None:
        """None when this backend can compile plans at `precision` on this machine, else why not
        and how to fix it."""

    def check_request(self, precision: str, compile: bool = False, engine: str | None = None) -> None:
        """Refuses a precision this machine cannot run, and torch.compile for a backend whose
        segments are `engine` (ONNX Runtime sessions, TensorRT engines), not torch modules."""
        reason = self.unavailable_reason(precision)
        if reason:
            raise TargetError(reason)
        if compile and engine is not None:
            raise TargetError(f"compile=True asks for torch.compile, which does not apply to {engine}; drop it for "
                              f"{self.name} targets")

    def relative_format_times(self, formats: tuple[str, ...], device: torch.device,
                              shape: LayerShape | None = None) -> dict[str, float] | None:
        """Each layer format's time over the unquantized layer's, measured on `device` as this backend
        runs them (diffc.backends.format_times), for a linear of `shape` (rows, in, out; None: the
        cost table's layer); None where it cannot time layers on this machine."""
        return None

    def runs_low_bit_kernels(self, device: torch.device) -> bool:
        """Whether low-bit formats run as their own kernels on `device` (they can be faster than
        the unquantized layer) rather than simulated in full precision."""
        return False

    def runs_low_bit_convolutions(self, device: torch.device) -> bool:
        """Whether quantized convolutions run as low-bit kernels on `device`; where they do not, a
        quantized convolution computes in float from weights dequantized on every call, slower than
        the unquantized one."""
        return False

    @abstractmethod
    def compile(self, plan: Plan, precision: str, device: Any = None, **options: Any) -> CompiledPlan:
        """Lowers every segment of `plan` once; variants share the compiled segments."""
