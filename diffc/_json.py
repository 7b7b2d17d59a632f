"""Conversion of configs and reports to JSON-safe values."""
from __future__ import annotations

from typing import Any, Mapping


def jsonable(value: Any) -> Any:
    """Mappings, sequences and scalars as JSON values; one-element tensors/arrays as numbers;
    anything else as its string form."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "item"):
        try:
            return value.item()
        except (ValueError, RuntimeError):
            pass
    return str(value)
