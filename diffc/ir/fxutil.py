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


def copy_graph(graph: torch.fx.Graph) -> torch.fx.Graph:
    """A deep copy of an FX graph. Node metadata holds torch pytree specs whose copying warns
    about a deprecated LeafSpec check inside torch; that warning says nothing to diffc's users."""
    import copy
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        return copy.deepcopy(graph)
