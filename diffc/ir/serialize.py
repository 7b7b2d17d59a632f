"""FX graph <-> JSON, so artifacts hold graphs as data (no pickle, no generated code to exec)."""
from __future__ import annotations

import builtins
import math
import operator
from typing import Any

import torch
import torch.fx
from torch.fx.passes.shape_prop import TensorMetadata, _extract_tensor_metadata

from ..errors import ArtifactError

_PY_MODULES = {"operator": operator, "math": math, "builtins": builtins}


def graph_to_json(graph: torch.fx.Graph) -> dict[str, Any]:
    nodes = []
    for node in graph.nodes:
        entry: dict[str, Any] = {"name": node.name, "op": node.op, "target": _target_name(node),
                                 "args": _encode(node.args), "kwargs": _encode(node.kwargs)}
        stack = node.meta.get("nn_module_stack")
        if stack:
            entry["module_stack"] = [[path, cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"]
                                     for path, cls in stack.values()]
        if "diffc" in node.meta:
            entry["diffc"] = node.meta["diffc"]
        shapes = _encode_tensor_meta(node.meta.get("tensor_meta"))
        if shapes is not None:
            entry["tensor_meta"] = shapes
        nodes.append(entry)
    return {"format": "diffc-fx-1", "nodes": nodes}


def graph_from_json(data: dict[str, Any]) -> torch.fx.Graph:
    if data.get("format") != "diffc-fx-1":
        raise ArtifactError(f"unknown graph format {data.get('format')!r}; this diffc reads 'diffc-fx-1'. "
                            "Re-export the artifact with this diffc version.")
    graph = torch.fx.Graph()
    env: dict[str, torch.fx.Node] = {}
    for entry in data["nodes"]:
        op = entry["op"]
        target = _resolve_target(op, entry["target"])
        node = graph.create_node(op, target, _decode(entry["args"], env), _decode(entry["kwargs"], env),
                                 name=entry["name"])
        if node.name != entry["name"]:
            raise ArtifactError(f"graph node name {entry['name']!r} is duplicated; the artifact is corrupt.")
        if "module_stack" in entry:
            node.meta["nn_module_stack"] = {f"m{i}": (p, c) for i, (p, c) in enumerate(entry["module_stack"])}
        if "diffc" in entry:
            node.meta["diffc"] = entry["diffc"]
        if "tensor_meta" in entry:
            node.meta["tensor_meta"] = _decode_tensor_meta(entry["tensor_meta"])
        env[node.name] = node
    graph.lint()
    return graph


def _encode_tensor_meta(meta: Any) -> Any:
    """Shapes and dtypes, which passes read after a reload (e.g. to match a block's input to its output)."""
    if isinstance(meta, TensorMetadata):
        return {"shape": list(meta.shape), "dtype": str(meta.dtype).replace("torch.", "")}
    if isinstance(meta, (tuple, list)):
        encoded = [_encode_tensor_meta(m) for m in meta]
        return {"tuple": encoded} if any(e is not None for e in encoded) else None
    return None


def _decode_tensor_meta(data: Any) -> Any:
    if data is None:
        return None
    if "tuple" in data:
        return tuple(_decode_tensor_meta(m) for m in data["tuple"])
    return _extract_tensor_metadata(torch.empty(data["shape"], dtype=getattr(torch, data["dtype"]), device="meta"))


def _target_name(node: torch.fx.Node) -> str:
    target = node.target
    if isinstance(target, str):
        return target
    if isinstance(target, torch._ops.OpOverload):
        return f"torch.ops.{target.namespace}.{target._schema.name.split('::')[-1]}.{target._overloadname}"
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", None)
    if module in ("_operator", "operator") and name:
        return f"operator.{name}"
    if module in _PY_MODULES and name:
        return f"{module}.{name}"
    if module == "torch" and name:
        return f"torch.{name}"
    raise ArtifactError(f"node {node.name} calls {target!r}, which diffc cannot serialize; only aten/torch ops "
                        "and Python operators are allowed in a saved graph.")


def _resolve_target(op: str, name: str) -> Any:
    if op in ("placeholder", "get_attr", "output", "call_module", "call_method"):
        return name
    parts = name.split(".")
    if parts[0] == "torch" and len(parts) >= 2 and parts[1] == "ops":
        namespace, opname, overload = parts[2], ".".join(parts[3:-1]), parts[-1]
        packet = getattr(getattr(torch.ops, namespace), opname)
        return getattr(packet, overload)
    if parts[0] in _PY_MODULES and len(parts) == 2:
        return getattr(_PY_MODULES[parts[0]], parts[1])
    if parts[0] == "torch" and len(parts) == 2:
        return getattr(torch, parts[1])
    raise ArtifactError(f"graph calls unknown target {name!r}; the artifact is corrupt or from another diffc.")


def _encode(value: Any) -> Any:
    if isinstance(value, torch.fx.Node):
        return {"node": value.name}
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, tuple):
        return {"tuple": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {"dict": {k: _encode(v) for k, v in value.items()}}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).replace("torch.", "")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, torch.layout):
        return {"layout": str(value).replace("torch.", "")}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).replace("torch.", "")}
    if isinstance(value, slice):
        return {"slice": [_encode(value.start), _encode(value.stop), _encode(value.step)]}
    raise ArtifactError(f"cannot serialize graph argument {value!r} of type {type(value).__name__}.")


def _decode(value: Any, env: dict[str, torch.fx.Node]) -> Any:
    if isinstance(value, list):
        return [_decode(v, env) for v in value]
    if not isinstance(value, dict):
        return value
    ((kind, payload),) = value.items()
    if kind == "node":
        return env[payload]
    if kind == "tuple":
        return tuple(_decode(v, env) for v in payload)
    if kind == "dict":
        return {k: _decode(v, env) for k, v in payload.items()}
    if kind == "float":
        return float(payload)
    if kind in ("dtype", "layout", "memory_format"):
        return getattr(torch, payload)
    if kind == "device":
        return torch.device(payload)
    if kind == "slice":
        return slice(*(_decode(v, env) for v in payload))
    raise ArtifactError(f"unknown graph argument kind {kind!r}; the artifact is corrupt or from another diffc.")
