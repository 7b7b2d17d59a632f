"""Small FX helpers shared across the IR."""
from __future__ import annotations

from typing import Any

import torch


def attr_value(module: torch.nn.Module, target: str) -> Any:
    """The object a get_attr node with this dotted target reads."""
    value: Any = module
    for part in target.split("."):
        value = getattr(value, part)
    return value
