"""SmoothQuant migration: activation outliers moved into the weights before W8A8 quantization.

A linear y = x W^T equals (x / s) (W * s)^T for any positive per-input-channel s. With
s_j = max|x_j|^alpha / max|W_:,j|^(1 - alpha) (Xiao et al., SmoothQuant), an input channel with
outliers is divided down and its weight column scaled up, so one per-tensor activation scale
wastes fewer levels on a few channels, while per-channel weight scales absorb the larger columns.

The division is an explicit constant multiply in front of the layer (exact in full precision up
to float rounding). Folding it into a preceding LayerNorm affine would save that multiply but
needs every reader of the norm to share one s; the explicit form keeps each layer's own s. The
smoothed weight is a new tensor under a `diffc_smoothquant_` name (the original stays shared with
the user's model, and a LoRA adapter naming the layer is refused rather than merged wrongly)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.fx

from ...calibration import NodeStats
from ...ir import DiffusionGraph
from ...ir.fxutil import attr_value
from .layers import Layer

aten = torch.ops.aten
SMOOTH_PREFIX = "diffc_smoothquant_"


def smoothing_factors(channel_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """s per input channel; 1 where the activation or the weight column is all zero."""
    columns = weight.detach().float().abs().amax(dim=0)
    activations = channel_absmax.float()
    live = (activations > 0) & (columns > 0)
    factors = activations.clamp_min(1e-12) ** alpha / columns.clamp_min(1e-12) ** (1 - alpha)
    return torch.where(live, factors, torch.ones_like(factors))


def smooth(dg: DiffusionGraph, layers: list[Layer], stats: Callable[[str], NodeStats], alpha: float) -> list[str]:
    """Rewrites each linear in `layers` to read x * (1/s) with weight W * s; returns their nodes.
    Layers whose input statistics carry no per-channel maxima of the right length are skipped."""
    nodes = {n.name: n for n in dg.graph.nodes}
    smoothed = []
    for layer in layers:
        node = nodes[layer.node]
        weight = attr_value(dg.module, layer.weight)
        channel_absmax = stats(layer.input).channel_absmax
        if node.target != aten.linear.default or channel_absmax is None or len(channel_absmax) != weight.shape[1]:
            continue
        factors = smoothing_factors(torch.from_numpy(channel_absmax).to(weight.device), weight, alpha)
        weight_name, inverse_name = f"{SMOOTH_PREFIX}{node.name}_weight", f"{SMOOTH_PREFIX}{node.name}_inverse"
        dg.module.register_buffer(weight_name, (weight.detach().float() * factors).to(weight.dtype))
        dg.module.register_buffer(inverse_name, (1.0 / factors).to(weight.dtype))
        source, old_weight = node.args[0], node.args[1]
        with dg.graph.inserting_before(node):
            inverse = dg.graph.get_attr(inverse_name)
            divided = dg.graph.call_function(aten.mul.Tensor, (source, inverse))
            new_weight = dg.graph.get_attr(weight_name)
        divided.meta.update({k: v for k, v in source.meta.items() if k in ("val", "tensor_meta")})
        new_weight.meta.update({k: v for k, v in old_weight.meta.items() if k in ("val", "tensor_meta")})
        node.args = (divided, new_weight, *node.args[2:])
        if not old_weight.users:
            dg.graph.erase_node(old_weight)
        smoothed.append(node.name)
    dg.graph.lint()
    dg.module.recompile()
    return smoothed
