"""Half-precision source models: diffusers pipelines are loaded in fp16 or bf16, and capture turns
their graph into an fp32 one (weights, casts and tensors the graph creates), so that passes
measure errors in one dtype whatever the model was loaded in. The source dtype is kept in the
signature: backends compile in it when the target names no precision, and outputs go back in it."""
from __future__ import annotations

from typing import Any

import torch
import torch.fx

from .fxutil import attr_value

HALF_DTYPES = (torch.float16, torch.bfloat16)


def source_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype most of the model's floating weights are in (by element count)."""
    counts: dict[torch.dtype, int] = {}
    for tensor in model.parameters():
        if tensor.is_floating_point():
            counts[tensor.dtype] = counts.get(tensor.dtype, 0) + tensor.numel()
    return max(counts, key=counts.__getitem__) if counts else torch.float32


def normalize_to_fp32(module: torch.fx.GraphModule) -> None:
    """Every half-precision weight the graph reads becomes an fp32 copy (the model's own tensors are
    left alone) and every half dtype the graph's nodes name (casts, factories) becomes fp32."""
    for node in module.graph.nodes:
        if node.op == "get_attr":
            value = attr_value(module, node.target)
            if isinstance(value, torch.Tensor) and value.dtype in HALF_DTYPES:
                _replace_attr(module, node.target, value.detach().float())
        node.args = _fp32_dtypes(node.args)
        node.kwargs = _fp32_dtypes(node.kwargs)
    module.recompile()


def _replace_attr(module: torch.nn.Module, target: str, tensor: torch.Tensor) -> None:
    owner_name, _, leaf = target.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if leaf in owner._parameters:
        owner._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)
    elif leaf in owner._buffers:
        owner._buffers[leaf] = tensor
    else:
        setattr(owner, leaf, tensor)


def _fp32_dtypes(value: Any) -> Any:
    if isinstance(value, torch.dtype):
        return torch.float32 if value in HALF_DTYPES else value
    if isinstance(value, (list, tuple)):
        return type(value)(_fp32_dtypes(v) for v in value)
    if isinstance(value, dict):
        return {k: _fp32_dtypes(v) for k, v in value.items()}
    return value
