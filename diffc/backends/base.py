"""Targets (`<backend>[-<precision>]`) and the Backend interface every backend implements."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from ..ir import CompiledPlan, Plan

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

    @classmethod
    @abstractmethod
    def unavailable_reason(cls, precision: str) -> str | None:
        """None when this backend can compile plans at `precision` on this machine, else why not
        and how to fix it."""

    @abstractmethod
    def compile(self, plan: Plan, precision: str, device: Any = None, **options: Any) -> CompiledPlan:
        """Lowers every segment of `plan` once; variants share the compiled segments."""
