"""A DiffusionGraph in one file, with its SHA-256 beside it.

The file is safetensors: the graph's weights (tied weights stored once) and, as its string
metadata, the FX graph (JSON, see serialize), the signature, block table, config, applied passes,
annotations and step plan, plus whatever the caller adds (a pass checkpoint's key). No pickle,
no generated code. Both files are written atomically, the hash last, so a write that was
interrupted reads back as a mismatch, never as a graph."""
from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
import torch.fx
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from ..errors import ArtifactError
from .blocks import Block
from .fxutil import attr_value
from .graph import DiffusionGraph, Signature
from .serialize import graph_from_json, graph_to_json
from .step_plan import StepPlan

GRAPH_FORMAT = "diffc-graph-1"
HASH_SUFFIX = ".sha256"


def unique_weights(modules: Iterable[torch.fx.GraphModule]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors the modules' get_attr nodes read, each storage once (on the CPU, contiguous);
    `aliases` maps every other name of a tied weight to the stored one."""
    stored: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    by_identity: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for module in modules:
        for node in module.graph.nodes:
            if node.op != "get_attr" or node.target in stored or node.target in aliases:
                continue
            tensor = attr_value(module, node.target)
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
            if key in by_identity:
                aliases[node.target] = by_identity[key]
            else:
                by_identity[key] = node.target
                stored[node.target] = tensor.detach().cpu().contiguous()
    return stored, aliases


def save_graph(dg: DiffusionGraph, path: str | os.PathLike[str], extra: Mapping[str, Any] | None = None) -> Path:
    """Writes `dg` (and the JSON-able `extra`) to the file `path` and its hash to `path.sha256`."""
    weights, aliases = unique_weights([dg.module])
    described = {
        "graph": graph_to_json(dg.module.graph), "signature": dg.signature.to_json(), "config": dg.config,
        "blocks": [b.to_json() for b in dg.blocks], "applied": dg.applied, "annotations": dg.annotations,
        "step_plan": dg.step_plan.to_json() if dg.step_plan is not None else None, "aliases": aliases,
    }
    metadata = {"format": GRAPH_FORMAT, "diffusion_graph": json.dumps(described, sort_keys=True),
                "extra": json.dumps(dict(extra or {}), sort_keys=True)}
    data = save_tensors(weights, metadata=metadata)
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(final, data)
    write_atomically(_hash_path(final), hashlib.sha256(data).hexdigest().encode())
    return final


def load_graph(path: str | os.PathLike[str]) -> tuple[DiffusionGraph, dict[str, Any]]:
    """Reads a graph file written by save_graph after checking it against its hash; returns the
    graph and the `extra` saved with it."""
    file = Path(path)
    if not file.is_file() or not _hash_path(file).is_file():
        raise ArtifactError(f"{file} is not a saved graph (it needs {file.name} and {_hash_path(file).name})")
    data = file.read_bytes()
    if hashlib.sha256(data).hexdigest() != _hash_path(file).read_text().strip():
        raise ArtifactError(f"{file} does not match its SHA-256: it was modified or its write was interrupted")
    metadata = _metadata(data)
    if metadata.get("format") != GRAPH_FORMAT:
        raise ArtifactError(f"{file} has format {metadata.get('format')!r}; this diffc reads {GRAPH_FORMAT!r}")
    described = json.loads(metadata["diffusion_graph"])
    weights = load_tensors(data)
    for alias, name in described["aliases"].items():
        weights[alias] = weights[name]
    graph = graph_from_json(described["graph"])
    module = torch.fx.GraphModule({n.target: weights[n.target] for n in graph.nodes if n.op == "get_attr"}, graph)
    step_plan = described["step_plan"]
    dg = DiffusionGraph(module=module, signature=Signature.from_json(described["signature"]),
                        blocks=[Block.from_json(b) for b in described["blocks"]], config=described["config"],
                        applied=described["applied"], annotations=described["annotations"],
                        step_plan=StepPlan.from_json(step_plan) if step_plan is not None else None)
    return dg, json.loads(metadata["extra"])


def _hash_path(path: Path) -> Path:
    return path.with_name(path.name + HASH_SUFFIX)


def _metadata(data: bytes) -> dict[str, str]:
    """The string metadata of a safetensors buffer: its header is an 8-byte little-endian length
    followed by that many bytes of JSON, whose "__metadata__" entry holds it."""
    try:
        (length,) = struct.unpack("<Q", data[:8])
        return dict(json.loads(data[8:8 + length]).get("__metadata__", {}))
    except (struct.error, ValueError) as exc:
        raise ArtifactError(f"not a safetensors graph file ({exc})") from exc


def write_atomically(path: Path, data: bytes) -> None:
    """Writes `data` to `path` whole or not at all: a reader never sees half a file, and a failed
    write leaves no staging file behind."""
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise


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
