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


def node_shape(value: Any) -> tuple[int, ...] | None:
    """The concrete shape a node was traced at (its tensor_meta, else its fake value); None for a
    non-node or a value that is not a tensor."""
    if not isinstance(value, torch.fx.Node):
        return None
    meta = value.meta.get("tensor_meta")
    if meta is not None and hasattr(meta, "shape"):
        return tuple(int(d) for d in meta.shape)
    fake = value.meta.get("val")
    return tuple(fake.shape) if isinstance(fake, torch.Tensor) else None


def copy_graph(graph: torch.fx.Graph) -> torch.fx.Graph:
    """A deep copy of an FX graph. Node metadata holds torch pytree specs whose copying warns
    about a deprecated LeafSpec check inside torch; that warning says nothing to diffc's users."""
    import copy
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        return copy.deepcopy(graph)


def module_device(module: torch.nn.Module) -> torch.device:
    """Where a module's weights are (the CPU for a module without any)."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def to_device(value: Any, device: torch.device) -> Any:
    """`value` with every tensor inside dicts, lists and tuples moved to `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {key: to_device(item, device) for key, item in value.items()}
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(to_device(item, device) for item in value)
    return value
