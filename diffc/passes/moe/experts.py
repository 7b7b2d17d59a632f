"""The experts of a dense FFN: finding Linear -> GELU/GEGLU -> Linear FFNs in the graph, their
hidden activations on the calibration calls, splitting the hidden neurons into experts, and
rewriting an FFN into a chain of experts (`convert`, built by `ExpertBuilder`)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.fx
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from ...calibration.batch import CalibrationBatch
from ...calibration.statistics import Observer
from ...errors import PassError
from ...ir import DiffusionGraph
from ...ir.blocks import FFN
from ...ir.fxutil import attr_value, node_shape
from ..rewrites import add_constant

aten = torch.ops.aten
_PASS_THROUGH = {aten.dropout.default, aten.clone.default, aten.alias.default}


@dataclass
class DenseFFN:
    """An FFN found in the graph: `up` the first linear (input x), `down` the second (reads
    `hidden`, the activation of the hidden neurons), `gate` the GELU node; GEGLU when the up
    projection's output is chunked into value and gate halves."""

    block: str
    up: torch.fx.Node
    gelu: torch.fx.Node
    hidden: torch.fx.Node
    down: torch.fx.Node
    geglu: bool


def find_ffns(dg: DiffusionGraph) -> tuple[list[DenseFFN], dict[str, str]]:
    """The FFN blocks whose aten graph is Linear -> GELU (or GEGLU) -> Linear, and for the others
    the reason they do not match."""
    nodes = {n.name: n for n in dg.graph.nodes}
    found, skipped = [], {}
    for block in dg.blocks:
        if block.kind != FFN:
            continue
        members = set(block.nodes)
        linears = [nodes[n] for n in block.nodes if nodes[n].target == aten.linear.default]
        if len(linears) != 2 or len(block.outputs) != 1 or block.outputs[0] != linears[1].name:
            skipped[block.name] = f"expected two linears ending the block, found {len(linears)}"
            continue
        up, down = linears
        hidden = down.args[0]
        inner = hidden
        while inner.target in _PASS_THROUGH:
            inner = inner.args[0]
        geglu = inner.target == aten.mul.Tensor
        if geglu:
            value, gelu = inner.args
            if not (isinstance(gelu, torch.fx.Node) and gelu.target == aten.gelu.default):
                value, gelu = gelu, value
            ok = (isinstance(gelu, torch.fx.Node) and gelu.target == aten.gelu.default
                  and _chunk_half(value, up) == 0 and _chunk_half(gelu.args[0], up) == 1)
        else:
            gelu = inner
            ok = gelu.target == aten.gelu.default and gelu.args[0] is up
        if not ok or any(n.name not in members for n in (hidden, gelu)) or len(up.users) != 1 or \
                not isinstance(up.args[1], torch.fx.Node) or up.args[1].op != "get_attr" or \
                not isinstance(down.args[1], torch.fx.Node) or down.args[1].op != "get_attr":
            skipped[block.name] = "not Linear -> GELU/GEGLU -> Linear with weights of its own"
            continue
        found.append(DenseFFN(block.name, up, gelu, hidden, down, geglu))
    return found, skipped


def _chunk_half(node: Any, up: torch.fx.Node) -> int | None:
    """Which half of `up`'s output `node` is, when it is getitem(chunk(up, 2, -1), i)."""
    if not (isinstance(node, torch.fx.Node) and node.op == "call_function" and len(node.args) == 2):
        return None
    chunk, index = node.args
    if not (isinstance(chunk, torch.fx.Node) and chunk.target == aten.chunk.default and chunk.args[0] is up
            and chunk.args[1] == 2 and (chunk.args[2] if len(chunk.args) > 2 else 0) in (-1, len(node_shape(up)) - 1)):
        return None
    return int(index)


def linear_weight(dg: DiffusionGraph, linear: torch.fx.Node) -> torch.Tensor:
    return attr_value(dg.module, linear.args[1].target)


def _bias(dg: DiffusionGraph, linear: torch.fx.Node) -> torch.Tensor | None:
    if len(linear.args) < 3 or linear.args[2] is None:
        return None
    return attr_value(dg.module, linear.args[2].target)


def split_experts(activations: torch.Tensor, down_weight: torch.Tensor, parts: int, shared: bool,
                  max_tokens: int, seed: int) -> tuple[list[int] | None, list[list[int]]]:
    """(shared neurons or None, routed experts as neuron lists): the shared expert takes the
    neurons of highest Taylor importance, the rest are clustered by co-activation into equal parts."""
    from sklearn.cluster import KMeans

    width = activations.shape[1]
    if width < parts:
        raise PassError(f"an FFN with {width} hidden neurons cannot be split into {parts} experts; lower experts")
    generator = torch.Generator().manual_seed(seed)
    if activations.shape[0] > max_tokens:
        activations = activations[torch.randperm(activations.shape[0], generator=generator, device="cpu")[:max_tokens]]
    importance = activations.double().pow(2).mean(0) * down_weight.double().pow(2).sum(0)
    sizes = [width // parts + (1 if k < width % parts else 0) for k in range(parts)]
    remaining = list(range(width))
    shared_neurons = None
    if shared:
        order = torch.argsort(importance, descending=True).tolist()
        shared_neurons = sorted(order[:sizes[0]])
        remaining = sorted(order[sizes[0]:])
        sizes = sizes[1:]
    pattern = activations[:, remaining].abs().double().T
    pattern = (pattern / pattern.norm(dim=1, keepdim=True).clamp_min(1e-12)).cpu().numpy()
    centers = KMeans(n_clusters=len(sizes), n_init=4, random_state=seed).fit(pattern).cluster_centers_
    distance = ((pattern[:, None, :] - centers[None, :, :]) ** 2).sum(-1)
    experts: list[list[int]] = [[] for _ in sizes]
    assigned: set[int] = set()
    for flat in np.argsort(distance, axis=None):
        row, cluster = divmod(int(flat), len(sizes))
        if row in assigned or len(experts[cluster]) >= sizes[cluster]:
            continue
        experts[cluster].append(remaining[row])
        assigned.add(row)
    return shared_neurons, [sorted(e) for e in experts]


@dataclass
class ConvertedFFN:
    block: str
    width: int
    chain: list[str]            # acc node of each expert, head first
    sizes: list[int]
    routed_from: int            # chain[routed_from:] are routable (bypass regions)
    tokens: int = 0             # tokens per sample at the FFN input, where static
    builder: ExpertBuilder | None = None     # the dense FFN's weights, to build refit experts from
    neurons: list[list[int]] | None = None   # hidden neurons of each chain link, head first


@dataclass
class ExpertBuilder:
    """Builds the nodes of an FFN restricted to some hidden neurons, from the dense FFN's weights:
    x -> up rows (GEGLU: value and gate rows) -> GELU -> down columns (given, so that a refit
    down-projection can replace the dense one's) -> out."""

    block: str
    x: torch.fx.Node
    up_weight: torch.Tensor
    up_bias: torch.Tensor | None
    down_weight: torch.Tensor
    down_bias: torch.Tensor | None
    geglu: bool
    gelu_args: tuple[Any, ...]
    gelu_kwargs: dict[str, Any]
    out_shape: tuple[int, ...]
    dtype: torch.dtype
    meta: dict[str, Any]

    @classmethod
    def of(cls, dg: DiffusionGraph, ffn: DenseFFN) -> "ExpertBuilder":
        meta = {k: v for k, v in ffn.down.meta.items() if k in ("nn_module_stack", "stack_trace", "source_fn_stack")}
        return cls(ffn.block, ffn.up.args[0], linear_weight(dg, ffn.up), _bias(dg, ffn.up),
                   linear_weight(dg, ffn.down), _bias(dg, ffn.down), ffn.geglu, tuple(ffn.gelu.args[1:]),
                   dict(ffn.gelu.kwargs), node_shape(ffn.down), ffn.down.meta["tensor_meta"].dtype, meta)

    @property
    def width(self) -> int:
        return self.down_weight.shape[1]

    def node(self, dg: DiffusionGraph, target: Any, args: tuple[Any, ...], shape: tuple[int, ...] | None,
             kwargs: Any = None) -> torch.fx.Node:
        created = dg.graph.call_function(target, args, kwargs or {})
        created.meta.update(self.meta)
        if shape is not None:
            created.meta["tensor_meta"] = _extract_tensor_metadata(torch.empty(shape, dtype=self.dtype, device="meta"))
        return created

    def attr(self, dg: DiffusionGraph, name: str, tensor: torch.Tensor) -> torch.fx.Node:
        return add_constant(dg, f"{self.block.replace('.', '_')}_moe_{name}", tensor.to(self.dtype))

    def expert(self, dg: DiffusionGraph, name: str, neurons: Sequence[int], down_weight: torch.Tensor,
               down_bias: torch.Tensor | None) -> torch.fx.Node:
        """The output node of the FFN on `neurons`, at the graph's insertion point."""
        rows = torch.tensor(list(neurons), device=down_weight.device)
        hidden_shape = (*self.out_shape[:-1], len(rows))

        def linear(part: str, weight: torch.Tensor, bias: torch.Tensor | None, shape: tuple[int, ...],
                   source: torch.fx.Node) -> torch.fx.Node:
            args = (source, self.attr(dg, f"{name}_{part}_weight", weight),
                    *([self.attr(dg, f"{name}_{part}_bias", bias)] if bias is not None else []))
            return self.node(dg, aten.linear.default, args, shape)

        def up_rows(offset: int) -> tuple[torch.Tensor, torch.Tensor | None]:
            return self.up_weight[rows + offset], self.up_bias[rows + offset] if self.up_bias is not None else None

        if self.geglu:
            value = linear("value", *up_rows(0), hidden_shape, self.x)
            gate = linear("gate", *up_rows(self.width), hidden_shape, self.x)
            activated = self.node(dg, aten.mul.Tensor, (value, self.node(
                dg, aten.gelu.default, (gate, *self.gelu_args), hidden_shape, self.gelu_kwargs)), hidden_shape)
        else:
            activated = self.node(dg, aten.gelu.default, (linear("up", *up_rows(0), hidden_shape, self.x),
                                                          *self.gelu_args), hidden_shape, self.gelu_kwargs)
        return linear("down", down_weight, down_bias, self.out_shape, activated)


def convert(dg: DiffusionGraph, ffn: DenseFFN, shared_neurons: list[int] | None,
            experts: list[list[int]], order: list[int]) -> ConvertedFFN:
    """Rewrites one FFN into a chain of experts (in place): head = the shared expert, or the
    first expert of `order`; the rest follow in `order`."""
    builder = ExpertBuilder.of(dg, ffn)
    parts = ([shared_neurons] if shared_neurons is not None else []) + [experts[i] for i in order]
    chain: list[str] = []
    acc = None
    with dg.graph.inserting_before(ffn.down):
        for index, neurons in enumerate(parts):
            bias = builder.down_bias if index == 0 else None
            out = builder.expert(dg, f"e{index}", neurons, builder.down_weight[:, torch.tensor(neurons, device=builder.down_weight.device)], bias)
            acc = out if acc is None else builder.node(dg, aten.add.Tensor, (acc, out), builder.out_shape)
            chain.append(acc.name)
    ffn.down.replace_all_uses_with(acc)
    dg.module = torch.fx.GraphModule(dg.weights(), dg.graph)
    x = builder.x
    tokens = x.meta["val"].shape[1] if "val" in x.meta else node_shape(x)[1]
    return ConvertedFFN(ffn.block, builder.width, chain, [len(p) for p in parts], 1,
                        tokens if isinstance(tokens, int) and len(node_shape(x)) == 3 else 0, builder, parts)


def hidden_activations(dg: DiffusionGraph, ffns: list[DenseFFN],
                       batch: CalibrationBatch) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per FFN: hidden activations on the calibration rows as (tokens, neurons), and each token's step."""
    watch = {f.hidden.name for f in ffns} | {f.up.args[0].name for f in ffns}
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in watch}
    for flat in batch.batches:
        with torch.no_grad():
            Observer(dg.module, watch, lambda n, v: seen[n].append(v.detach())).run(*flat)
    result = {}
    for name, values in seen.items():
        tensor = torch.cat(values)
        per_row = math.prod(tensor.shape[1:-1])
        result[name] = (tensor.reshape(-1, tensor.shape[-1]), batch.row_steps.repeat_interleave(per_row))
    return result


def params_per_neuron(dg: DiffusionGraph, item: ConvertedFFN) -> float:
    """Parameters per hidden neuron of a converted FFN (up rows, GEGLU's gate rows, down column)."""
    prefix = item.block.replace(".", "_") + "_moe_"
    weights = {k: v for k, v in dg.weights().items() if k.startswith(prefix) and "down_bias" not in k}
    return sum(v.numel() for v in weights.values()) / max(item.width, 1)
