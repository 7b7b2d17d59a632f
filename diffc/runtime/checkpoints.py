"""The graph after each pass of an optimize run, kept in a work folder so an interrupted run
resumes after its last finished pass. Each checkpoint is a graph file with its hash
(diffc.ir.graph_file), whose extra metadata records what produced it."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any


from ..errors import ArtifactError
from ..ir import DiffusionGraph
from ..ir.graph_file import load_graph, save_graph

log = logging.getLogger(__name__)
GRAPH_FILE = "graph.safetensors"


class PassCheckpointFolder:
    """PassCheckpoints in `root/passes/<index>-<pass>/graph.safetensors`. `identity` (the input
    model's and the calibration set's fingerprints) is part of every key."""

    def __init__(self, root: str | os.PathLike[str], identity: dict[str, Any]) -> None:
        self.root = Path(root) / "passes"
        self.identity = identity

    def _file(self, index: int, key: dict[str, Any]) -> Path:
        return self.root / f"{index}-{key['passes'][-1]['pass']}" / GRAPH_FILE

    def _full_key(self, key: dict[str, Any]) -> Any:
        return json.loads(json.dumps({**self.identity, **key}, sort_keys=True))

    def load(self, index: int, key: dict[str, Any]) -> tuple[DiffusionGraph, list[str]] | None:
        file = self._file(index, key)
        if not file.exists():
            return None
        try:
            graph, saved = load_graph(file)
        except ArtifactError as exc:
            log.warning("ignoring the checkpoint %s (%s); the pass runs again", file, exc)
            return None
        if saved.get("key") != self._full_key(key):
            return None
        log.warning("resuming after pass %d (%s) from %s", index + 1, key["passes"][-1]["pass"], file.parent)
        return graph, list(saved["used_budget"])

    def save(self, index: int, key: dict[str, Any], graph: DiffusionGraph, used_budget: list[str]) -> None:
        save_graph(graph, self._file(index, key), {"key": self._full_key(key), "used_budget": used_budget})
