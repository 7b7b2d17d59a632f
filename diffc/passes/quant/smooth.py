"""SmoothQuant migration: activation outliers moved into the weights before W8A8 quantization.

A linear y = x W^T equals (x / s) (W * s)^T for any positive per-input-channel s. With
s_j = max|x_j|^alpha / max|W_:,j|^(1 - alpha) (Xiao et al., SmoothQuant), an input channel with
outliers is divided down and its weight column scaled up, so one per-tensor activation scale
wastes fewer levels on a few channels, while per-channel weight scales absorb the larger columns.

The division is an explicit constant multiply in front of the layer (exact in full precision up
to float rounding). Folding it into a preceding LayerNorm affine would save that multiply but
needs every reader of the norm to share one s; the explicit form keeps each layer's own s. The
smoothed weight is a new tensor under a `diffc_smoothquant_` name (the original stays shared with
the user's model, and a LoRA adapter naming the layer is refused rather than merged wrongly).

One alpha does not suit every layer (SmoothQuant itself tunes it per model; layers without outliers
only lose weight precision to it). `alpha="auto"` searches it per layer: each linear's input is
sampled on calibration calls, and the alpha of ALPHA_GRID (or no smoothing) whose W8A8 output
(per-tensor activation scale, per-channel weight scales) is closest to the layer's own output wins."""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
import torch.fx

from ...calibration import NodeStats
from ...calibration.statistics import Observer
from ...ir import DiffusionGraph
from ...ir.fxutil import attr_value
from ...ir.precision import INT8, PER_CHANNEL, WeightQuant, fake_quantize_activation, fake_quantize_weight
from .annotate import activation_scale
from .layers import Layer

aten = torch.ops.aten
SMOOTH_PREFIX = "diffc_smoothquant_"
ALPHA_GRID = (0.25, 0.4, 0.5, 0.6, 0.75, 0.9)
# calibration calls and input rows per layer the per-layer search measures on
SEARCH_CALLS, SEARCH_ROWS = 8, 4096


def smoothing_factors(channel_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """s per input channel; 1 where the activation or the weight column is all zero."""
    columns = weight.detach().float().abs().amax(dim=0)
    activations = channel_absmax.float()
    live = (activations > 0) & (columns > 0)
    factors = activations.clamp_min(1e-12) ** alpha / columns.clamp_min(1e-12) ** (1 - alpha)
    return torch.where(live, factors, torch.ones_like(factors))


def search_alphas(dg: DiffusionGraph, layers: list[Layer], stats: Callable[[str], NodeStats],
                  records: list[Any], range_method: str, percentile: float) -> dict[str, float | None]:
    """Per linear of `layers` (by node): the alpha of ALPHA_GRID, or None for no smoothing, whose
    W8A8 output on its sampled inputs (from `records`, recorded calls) is closest to its own, each
    candidate's activation scale chosen from its samples as the pass chooses real scales
    (`range_method`, `percentile`)."""
    names = [spec.name for spec in dg.signature.inputs]
    samples: dict[str, list[torch.Tensor]] = {}
    generator = torch.Generator().manual_seed(0)
    inputs = {layer.input for layer in layers}

    def keep(name: str, value: torch.Tensor) -> None:
        rows = value.detach().reshape(-1, value.shape[-1]).float()
        take = torch.randperm(rows.shape[0], generator=generator, device="cpu")[:SEARCH_ROWS // len(records)]
        samples.setdefault(name, []).append(rows[take.to(rows.device)])

    with torch.no_grad():
        for record in records:
            Observer(dg.module, inputs, keep).run(*[record.inputs[name] for name in names])
    chosen: dict[str, float | None] = {}
    for layer in layers:
        weight = attr_value(dg.module, layer.weight).detach().float()
        channel_absmax = stats(layer.input).channel_absmax
        if layer.input not in samples or channel_absmax is None or len(channel_absmax) != weight.shape[1]:
            continue
        x = torch.cat(samples[layer.input])
        reference = x @ weight.T
        absmax = torch.from_numpy(channel_absmax).to(weight.device)
        errors = {alpha: _w8a8_error(x, weight, reference, None if alpha is None
                                     else smoothing_factors(absmax, weight, alpha), range_method, percentile)
                  for alpha in (None, *ALPHA_GRID)}
        chosen[layer.node] = min(errors, key=errors.__getitem__)
    return chosen


def _w8a8_error(x: torch.Tensor, weight: torch.Tensor, reference: torch.Tensor, factors: torch.Tensor | None,
                range_method: str, percentile: float) -> float:
    if factors is not None:
        x, weight = x / factors, weight * factors
    samples = NodeStats()
    samples.update(x, channel_dim=-1)
    scale = activation_scale(samples, INT8, range_method, percentile)
    quantized = fake_quantize_activation(x, INT8, scale) @ fake_quantize_weight(weight, WeightQuant(INT8, PER_CHANNEL)).T
    return float((quantized - reference).pow(2).mean())


def smooth(dg: DiffusionGraph, layers: list[Layer], stats: Callable[[str], NodeStats],
           alpha: float | Mapping[str, float | None]) -> list[str]:
    """Rewrites each linear in `layers` to read x * (1/s) with weight W * s, at `alpha` (one for
    every layer, or per layer node, None leaving a layer as it is); returns their nodes. Layers
    whose input statistics carry no per-channel maxima of the right length are skipped."""
    nodes = {n.name: n for n in dg.graph.nodes}
    smoothed = []
    for layer in layers:
        node = nodes[layer.node]
        weight = attr_value(dg.module, layer.weight)
        channel_absmax = stats(layer.input).channel_absmax
        strength = alpha.get(layer.node) if isinstance(alpha, Mapping) else alpha
        if node.target != aten.linear.default or channel_absmax is None or len(channel_absmax) != weight.shape[1] \
                or strength is None:
            continue
        factors = smoothing_factors(torch.from_numpy(channel_absmax).to(weight.device), weight, strength)
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
