"""Layer-format timings kept per machine, as TensorRT keeps its timing cache: a layer near the
break-even time can measure on either side of it from one run to the next, so a placement decided
by timings would change between two runs of the same code. Timed once on a machine, it decides the
same way each time there. The key names the hardware, the thread count and the library versions
that run the formats; a change to any of them times again.

The file is `$DIFFC_FORMAT_TIMES` (set it empty to keep timings in memory only), by default
`~/.cache/diffc/format-times.json` (`$XDG_CACHE_HOME` is honoured)."""
from __future__ import annotations

import functools
import json
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import torch

from ..ir.graph_file import write_atomically
from .format_times import TIMING_METHOD

CACHE_VARIABLE = "DIFFC_FORMAT_TIMES"
Timings = dict[str, float]


def user_cache_folder() -> Path:
    """diffc's folder of per-machine caches: `$XDG_CACHE_HOME/diffc`, by default `~/.cache/diffc`."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "diffc"


def cache_path() -> Path | None:
    """Where timings are kept; None when `$DIFFC_FORMAT_TIMES` is set empty."""
    chosen = os.environ.get(CACHE_VARIABLE)
    if chosen is not None:
        return Path(chosen) if chosen else None
    return user_cache_folder() / "format-times.json"


@functools.cache
def _processor_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def machine_key(backend: str, device: torch.device) -> str:
    """What a timing depends on besides the layer: the processor (or GPU) and its threads, and
    the versions of torch, ONNX Runtime and diffc's lowering."""
    if device.type == "cuda":
        hardware = torch.cuda.get_device_name(device)
    else:
        hardware = f"{_processor_name()} x{os.cpu_count()} threads={torch.get_num_threads()}"
    versions = f"torch {torch.__version__}, onnxruntime {_version('onnxruntime')}, method {TIMING_METHOD}"
    return f"{backend} on {device.type}: {hardware}; {versions}"


def layer_key(formats: tuple[str, ...], shape: tuple[int, int, int] | None) -> str:
    return f"{','.join(formats)} @ {'x'.join(map(str, shape)) if shape else 'cost-table layer'}"


def _read(path: Path) -> dict[str, dict[str, Timings]]:
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # absent, or damaged (a write cut short elsewhere): timed again
    return table if isinstance(table, dict) else {}


def _write(path: Path, table: dict[str, dict[str, Timings]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps(table, indent=1, sort_keys=True).encode())


def kept_times(backend: str, device: torch.device, formats: tuple[str, ...], shape: tuple[int, int, int] | None,
               measure: Callable[[], Timings | None]) -> Timings | None:
    """This machine's timings of `formats` at `shape`, measured (by `measure`) only where none are
    kept; a backend that cannot time here (None) keeps nothing."""
    path = cache_path()
    machine, layer = machine_key(backend, device), layer_key(formats, shape)
    kept: Any = _read(path).get(machine, {}).get(layer) if path is not None else None
    if isinstance(kept, dict) and set(kept) == set(formats):
        return {name: float(value) for name, value in kept.items()}
    measured = measure()
    if measured is None or path is None:
        return measured
    try:
        table = _read(path)  # again: another process may have added timings meanwhile
        table.setdefault(machine, {})[layer] = measured
        _write(path, table)
    except OSError:
        pass  # a read-only home: these timings stay this process's
    return measured


__all__ = ["CACHE_VARIABLE", "cache_path", "kept_times", "layer_key", "machine_key", "user_cache_folder"]
