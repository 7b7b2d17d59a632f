"""The files a server loads, from the files a backend saved with an artifact.

A backend may save its compiled segments in a compact form: ONNX Runtime keeps its ONNX models without
the weights the artifact's weights file already holds. Such a backend registers here how to make a
saved file whole again, so that code below the backends (the deployment export) serves complete
models without importing them; a file saved compact by a backend that registered nothing is refused."""
from __future__ import annotations

from typing import Callable

from ..errors import ArtifactError
from .plan import Plan

# (saved bytes, the artifact's plan, segment name) -> the complete file
FileMaker = Callable[[bytes, Plan, str], bytes]
_MAKERS: dict[str, FileMaker] = {}


def register_served_file_maker(backend: str, maker: FileMaker) -> None:
    _MAKERS[backend] = maker


def served_file(backend: str, compact: bool, data: bytes, plan: Plan, segment: str) -> bytes:
    """Segment `segment`'s saved file as a server loads it; `compact` says the backend saved it
    without its weights."""
    if not compact:
        return data
    if backend not in _MAKERS:
        raise ArtifactError(f"segment {segment!r} was saved by the {backend} backend without its weights, and that "
                            f"backend is not loaded to restore them; import diffc (or diffc.backends) first")
    return _MAKERS[backend](data, plan, segment)
