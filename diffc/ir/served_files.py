"""The files a backend saves with an artifact, and the files a server loads from them.

A backend may save its compiled segments in a compact form: ONNX Runtime keeps its ONNX models without
the weights the artifact's weights file already holds. Its compiled plan holds them whole (to run, and
to take new weights in place); such a backend registers here how to make the saved form of its files,
which the runtime applies when it saves, and how to make a saved file whole again, so that code below
the backends (the runtime's save, the deployment export) does neither without importing them. A file
saved compact by a backend that registered nothing is refused."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

from ..errors import ArtifactError
from .plan import Plan

# (saved bytes, the artifact's plan, segment name) -> the complete file
FileMaker = Callable[[bytes, Plan, str], bytes]
# (the compiled plan's files, its backend info) -> the files as the artifact saves them
SavedForm = Callable[[Mapping[str, bytes], Mapping[str, Any]], dict[str, bytes]]
_MAKERS: dict[str, FileMaker] = {}
_SAVED_FORMS: dict[str, SavedForm] = {}


def register_served_file_maker(backend: str, maker: FileMaker) -> None:
    _MAKERS[backend] = maker


def register_saved_form(backend: str, form: SavedForm) -> None:
    _SAVED_FORMS[backend] = form


def saved_files(backend: str, files: Mapping[str, bytes], info: Mapping[str, Any]) -> dict[str, bytes]:
    """The compiled plan's `files` as an artifact saves them (as they are, unless the backend
    registered a compact form)."""
    form = _SAVED_FORMS.get(backend)
    return dict(files) if form is None else form(files, info)


def served_file(backend: str, compact: bool, data: bytes, plan: Plan, segment: str) -> bytes:
    """Segment `segment`'s saved file as a server loads it; `compact` says the backend saved it
    without its weights."""
    if not compact:
        return data
    if backend not in _MAKERS:
        raise ArtifactError(f"segment {segment!r} was saved by the {backend} backend without its weights, and that "
                            f"backend is not loaded to restore them; import diffc (or diffc.backends) first")
    return _MAKERS[backend](data, plan, segment)
