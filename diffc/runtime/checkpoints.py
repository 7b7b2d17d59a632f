"""The graph after each pass of an optimize run, kept in a work folder so an interrupted run
resumes after its last finished pass. Each checkpoint is an artifact (atomic, hashed, no pickle)
whose target records what produced it."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import ArtifactError
from ..ir import DiffusionGraph
from ..ir.fxutil import attr_value
from ..ir.partition import build_plan
from ..ir.serialize import graph_to_json
from .artifact import load_plan, read_manifest, save_artifact

log = logging.getLogger(__name__)


def graph_fingerprint(dg: DiffusionGraph) -> str:
    """SHA-256 of a graph's code and weights: another model (or other weights) gives another one."""
    digest = hashlib.sha256(json.dumps(graph_to_json(dg.module.graph), sort_keys=True).encode())
    for node in dg.module.graph.nodes:
        if node.op == "get_attr":
            tensor = attr_value(dg.module, node.target).detach().cpu().contiguous()
            digest.update(node.target.encode())
            digest.update(str((tensor.dtype, tuple(tensor.shape))).encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class PassCheckpointFolder:
    """PassCheckpoints in `root/passes/<index>-<pass>/`. `identity` (the input model's and the
    calibration set's fingerprints) is part of every key."""

    def __init__(self, root: str | os.PathLike[str], identity: dict[str, Any]) -> None:
        self.root = Path(root) / "passes"
        self.identity = identity

    def _folder(self, index: int, key: dict[str, Any]) -> Path:
        return self.root / f"{index}-{key['passes'][-1]['pass']}"

    def _full_key(self, key: dict[str, Any]) -> Any:
        return json.loads(json.dumps({**self.identity, **key}, sort_keys=True))

    def load(self, index: int, key: dict[str, Any]) -> tuple[DiffusionGraph, list[str]] | None:
        folder = self._folder(index, key)
        if not folder.is_dir():
            return None
        try:
            manifest = read_manifest(folder)
        except ArtifactError as exc:
            log.warning("ignoring the checkpoint in %s (%s); the pass runs again", folder, exc)
            return None
        saved = manifest["target"]
        if saved.get("key") != self._full_key(key):
            return None
        log.warning("resuming after pass %d (%s) from %s", index + 1, key["passes"][-1]["pass"], folder)
        return load_plan(folder, manifest).graph, list(saved["used_budget"])

    def save(self, index: int, key: dict[str, Any], graph: DiffusionGraph, used_budget: list[str]) -> None:
        target = {"backend": "checkpoint", "key": self._full_key(key), "used_budget": used_budget}
        save_artifact(self._folder(index, key), build_plan(graph), target, overwrite=True)
