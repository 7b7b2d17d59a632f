"""Progress bars for long work (calibration, statistics, pass pipelines)."""
from __future__ import annotations

from typing import Iterable, TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], enabled: bool, desc: str, unit: str, total: int | None = None) -> Iterable[T]:
    """`items`, wrapped in a tqdm bar when `enabled`."""
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit=unit, total=total)
