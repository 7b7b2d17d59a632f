"""Dense-to-MoE conversion (Dense2MoE): split each transformer FFN (Linear -> GELU or GEGLU ->
Linear) into experts and route them per range of denoising steps.

Experts: the hidden neurons of an FFN are clustered by co-activation on calibration data (neurons
that fire on the same tokens land in the same expert; k-means on normalised activation patterns,
balanced to equal sizes). With `shared`, the neurons of highest Taylor importance (the energy of
their first-order contribution a_i * W2[:, i] to the FFN output) form an always-on shared expert.
Each FFN becomes a chain acc_e = acc_{e-1} + expert_e(x), the shared expert (or, without one, the
most important expert) at its head carrying the output bias.

Routing per timestep group: for each range of steps, a static subset of experts is kept active,
chosen on the calibration calls of that range: with `allocation="global"`, the experts of least
score per neuron over all FFNs are switched off (score: the denoiser output error with that one
expert off, taken as additive); with "per_ffn", each FFN keeps the same share, dropping the
experts whose summed output has least energy. Every routed expert is a bypass region
of the step plan; each range is a Plan variant whose skipped experts pass the chain on unchanged,
so every backend runs plain smaller FFNs with static shapes. Without an `active` share, the
smallest share on a grid that keeps the re-sampled calibration images above `min_psnr` (or,
without the live pipeline, the teacher-forced error below `max_relative_error`) is used.
With every expert active nothing is routed and the pass leaves the FFNs dense (exact).

With `compensate`, a switched-off expert is replaced by its mean output (per channel, over the
calibration tokens of the step ranges that switch it off), folded into the chain as a constant:
the closed-form bias compensation of dropped neurons. With `refit` (the default), each step
range's experts of an FFN become one smaller FFN whose down-projection is refit by ridge least
squares to the whole FFN's output on that range's calibration tokens (the kept neurons take over
what the dropped ones correlate with, the bias their mean); each range's FFN is then the bypass
region on in its own range only, at the price of storing the kept neurons once per range.
With `recover_steps`, the routed graph is then distilled against the dense one through each
range's variant (prune's `recover`, on every recorded call or `recover_records` of them;
Dense2MoE trains its experts), off by default.

Per-token routing (`routing="token"`, Dense2MoE's routing (a)) is expert-choice with a static
capacity: a linear router per FFN, fitted on calibration tokens by least squares to predict the
norm of each routed expert's output contribution; each routed expert processes the C tokens of
each sample it scores highest (topk, gather) and scatter-adds its outputs back, the shared expert
every token; C is the share of tokens that leaves `active` of the hidden neurons on per token on
average. Expert choice rather than token-choice top-k: every shape depends on C only, never on
the data (no per-expert token counts, no dropped-token fallback), so ORT and TensorRT run it as
plain topk / gather / scatter-add ops, and it keeps every expert's load balanced by
construction. It needs a static token count (a graph captured at a fixed resolution), and it
builds one graph, no step plan."""
from __future__ import annotations

import dataclasses
import math
import operator
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.fx
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from .._progress import progress
from ..calibration.statistics import _Observer
from ..errors import PassError
from ..ir import DiffusionGraph
from ..ir.blocks import FFN
from ..ir.fxutil import attr_value
from ..ir.partition import BYPASS
from ._search import search_grid
from .base import Pass, PassConfig, PassContext, PassResult, register_pass
from .prune import (RECOVER_ROWS, CalibrationBatch, _constant, _eliminate_dead_code, _plan_error, range_step_plan,
                    recover, step_ranges)

aten = torch.ops.aten
ACTIVE_GRID = (0.25, 0.375, 0.5, 0.625, 0.75, 0.875)
ALLOCATIONS = ("global", "per_ffn")
ROUTINGS = ("timestep", "token")
_PASS_THROUGH = {aten.dropout.default, aten.clone.default, aten.alias.default}


@dataclass(frozen=True)
class MoeConfig(PassConfig):
    experts: int = 8
    shared: bool = True
    allocation: str = "global"
    active: float | None = None
    step_groups: int = 4
    min_psnr: float = 30.0
    max_relative_error: float = 0.05
    max_records: int = 32
    max_tokens: int = 4096
    seed: int = 0
    compensate: bool = True
    refit: bool = True
    ridge: float = 1e-3
    recover_steps: int = 0
    recover_lr: float = 1e-4
    recover_rows: int = RECOVER_ROWS
    recover_records: int | None = None
    routing: str = "timestep"

    def __post_init__(self) -> None:
        if self.experts < 2:
            raise ValueError(f"experts must be >= 2 (an FFN split in one part routes nothing), got {self.experts}")
        if self.active is not None and not 0 < self.active <= 1:
            raise ValueError(f"active is the share of each FFN's hidden neurons active per step, in (0, 1]; "
                             f"got {self.active}")
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {self.routing!r}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        if self.step_groups < 1 or self.max_records < 1 or self.max_tokens < 1 or self.recover_rows < 1 or \
                (self.recover_records is not None and self.recover_records < 1):
            raise ValueError("step_groups, max_records, max_tokens, recover_rows and recover_records must be >= 1")
        if self.recover_steps < 0 or self.recover_lr <= 0:
            raise ValueError(f"recover_steps must be >= 0 and recover_lr > 0, got {self.recover_steps} and "
                             f"{self.recover_lr}")
        if self.ridge < 0:
            raise ValueError(f"ridge is the relative L2 penalty of the refit least squares, >= 0; got {self.ridge}")


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
            and chunk.args[1] == 2 and (chunk.args[2] if len(chunk.args) > 2 else 0) in (-1, len(_shape(up)) - 1)):
        return None
    return int(index)


def _weight(dg: DiffusionGraph, linear: torch.fx.Node) -> torch.Tensor:
    return attr_value(dg.module, linear.args[1].target)


def _bias(dg: DiffusionGraph, linear: torch.fx.Node) -> torch.Tensor | None:
    if len(linear.args) < 3 or linear.args[2] is None:
        return None
    return attr_value(dg.module, linear.args[2].target)


def _shape(node: torch.fx.Node) -> tuple[int, ...]:
    return tuple(node.meta["tensor_meta"].shape)


# --- experts ------------------------------------------------------------------------------------

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
        activations = activations[torch.randperm(activations.shape[0], generator=generator)[:max_tokens]]
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
    pattern = (pattern / pattern.norm(dim=1, keepdim=True).clamp_min(1e-12)).numpy()
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


def choose_active(outputs: list[torch.Tensor], keep: int) -> list[int]:
    """Indices of the `keep` experts to leave on: drops, one at a time, the expert whose removal
    adds least to the energy of everything dropped so far (their outputs may cancel)."""
    dropped: list[int] = []
    dropped_sum = torch.zeros_like(outputs[0])
    candidates = list(range(len(outputs)))
    while len(candidates) > keep:
        energies = [float((dropped_sum + outputs[e]).pow(2).mean()) for e in candidates]
        worst = candidates[int(np.argmin(energies))]
        dropped_sum = dropped_sum + outputs[worst]
        dropped.append(worst)
        candidates.remove(worst)
    return candidates


# --- rewrite ------------------------------------------------------------------------------------

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
        return cls(ffn.block, ffn.up.args[0], _weight(dg, ffn.up), _bias(dg, ffn.up), _weight(dg, ffn.down),
                   _bias(dg, ffn.down), ffn.geglu, tuple(ffn.gelu.args[1:]), dict(ffn.gelu.kwargs), _shape(ffn.down),
                   ffn.down.meta["tensor_meta"].dtype, meta)

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
        return _constant(dg, f"{self.block.replace('.', '_')}_moe_{name}", tensor.to(self.dtype))

    def expert(self, dg: DiffusionGraph, name: str, neurons: Sequence[int], down_weight: torch.Tensor,
               down_bias: torch.Tensor | None) -> torch.fx.Node:
        """The output node of the FFN on `neurons`, at the graph's insertion point."""
        rows = torch.tensor(list(neurons))
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
            out = builder.expert(dg, f"e{index}", neurons, builder.down_weight[:, torch.tensor(neurons)], bias)
            acc = out if acc is None else builder.node(dg, aten.add.Tensor, (acc, out), builder.out_shape)
            chain.append(acc.name)
    ffn.down.replace_all_uses_with(acc)
    dg.module = torch.fx.GraphModule(dg.weights(), dg.graph)
    x = builder.x
    tokens = x.meta["val"].shape[1] if "val" in x.meta else _shape(x)[1]
    return ConvertedFFN(ffn.block, builder.width, chain, [len(p) for p in parts], 1,
                        tokens if isinstance(tokens, int) and len(_shape(x)) == 3 else 0, builder, parts)


# --- the pass -----------------------------------------------------------------------------------

@register_pass
class MoePass(Pass):
    name = "moe"
    Config = MoeConfig
    requires = ("calibrated", "full_precision")
    removes_layers = True

    def writes_step_plan(self) -> bool:
        return self.config.routing == "timestep" and self.config.step_groups > 1

    def run(self, dg: DiffusionGraph, ctx: PassContext) -> PassResult:
        cfg = self.config
        if dg.step_plan:
            source = dg.step_plan.get("summary", {}).get("pass", "an earlier pass")
            raise PassError(f"the graph already has a step plan from {source}, and step plans do not nest. Fix: run "
                            "moe before cache, and give prune step_groups=1 when it runs before moe; with cache "
                            "after moe, give moe step_groups=1 (e.g. ['prune', {'pass': 'moe', 'step_groups': 1}, "
                            "'cache'])")
        ctx.calibration.check_compatible(dg)
        ffns, skipped = find_ffns(dg)
        if not ffns:
            reasons = "; ".join(f"{k}: {v}" for k, v in skipped.items()) or "the block table lists no FFN"
            raise PassError(f"{dg.signature.model_class}: no FFN of the form Linear -> GELU/GEGLU -> Linear to "
                            f"convert ({reasons}). Fix: leave moe out of this model's pipeline (it has no "
                            "transformer FFN to split; prune, cache and quant still apply)")
        if cfg.routing == "token":
            static = [f.block for f in ffns if not _static_tokens(f.up.args[0])]
            if static:
                raise PassError(f"routing='token' needs a static token count, and the FFN inputs of {static} have "
                                "a symbolic one (the graph was captured with dynamic resolution). Fix: capture with "
                                "diffc.ir.capture(model, dynamic=False), or use routing='timestep'")
        if cfg.active == 1:
            return PassResult(dg, modified=False, report={
                "ffns": [f.block for f in ffns], "active": 1.0,
                "note": "every expert active: nothing to route, the FFNs stay dense (outputs unchanged)"})
        batch = CalibrationBatch(ctx.calibration, dg, cfg.max_records)
        ranges = step_ranges(batch.num_steps, cfg.step_groups)
        hidden = self._hidden(dg, ffns, batch)
        inputs = {f.block: hidden[f.up.args[0].name][0] for f in ffns}
        converted, contributions = [], []
        for ffn in ffns:
            activations, steps = hidden[ffn.hidden.name]
            down_w = _weight(dg, ffn.down).detach()
            shared, experts = split_experts(activations, down_w, cfg.experts, cfg.shared, cfg.max_tokens, cfg.seed)
            outputs = [activations[:, e].double() @ down_w[:, e].T.double() for e in experts]
            energy = [float(o.pow(2).mean()) for o in outputs]
            order = sorted(range(len(experts)), key=lambda e: -energy[e])
            if shared is None:
                # without a shared expert, the most important one heads the chain and stays on
                head, order = order[0], order[1:]
                shared, outputs = experts[head], [o for k, o in enumerate(outputs) if k != head]
                experts = [e for k, e in enumerate(experts) if k != head]
                order = [k - (k > head) for k in order]
            item = convert(dg, ffn, shared, experts, order)
            converted.append(item)
            contributions.append(([outputs[k] for k in order], steps))
        _eliminate_dead_code(dg)
        if cfg.routing == "token":
            return self._token_routed(dg, converted, contributions, inputs, batch, ctx, skipped)
        if cfg.allocation == "global":
            scores = self._expert_scores(dg, converted, contributions, batch, ranges, ctx.progress)

            def select(active: float) -> list[list[list[int]]]:
                return _global_selection(converted, scores, active)
        else:
            def select(active: float) -> list[list[list[int]]]:
                return _per_ffn_selection(converted, contributions, ranges, active, cfg.compensate)

        activations = [hidden[ffn.hidden.name][0] for ffn in ffns]

        def plan_for(active: float) -> tuple[DiffusionGraph, list[list[list[int]]]]:
            chosen = select(active)
            if cfg.refit:
                return self._refit(dg, converted, chosen, ranges, contributions, activations), chosen
            return self._routed(dg, converted, chosen, ranges, contributions), chosen

        active = cfg.active
        report: dict[str, Any] = {"ffns": [c.block for c in converted], "skipped_ffns": skipped,
                                  "experts": cfg.experts, "shared": cfg.shared,
                                  "expert_sizes": {c.block: c.sizes for c in converted},
                                  "step_ranges": ranges, "routing": "per step range (static)"}
        if active is None:
            active, report["active_search"] = search_grid(
                ACTIVE_GRID, lambda share: plan_for(share)[0], ctx, knob="active",
                offline_error=lambda routed: _plan_error(routed, batch), min_psnr=cfg.min_psnr,
                max_relative_error=cfg.max_relative_error, quality_rises=True, fallback=1.0)
        routed, chosen = plan_for(active)
        if cfg.recover_steps:
            distillation_calls = CalibrationBatch(ctx.calibration, dg, cfg.recover_records)
            routed, report["recovery_loss"] = recover(routed, dg, distillation_calls, cfg.recover_steps, cfg.recover_lr,
                                                      cfg.seed, ctx.progress, "moe", rows_per_step=cfg.recover_rows,
                                                      validation=batch)
            report["relative_error_before_recovery"] = report["recovery_loss"]["validation_error"]["start"]
        report.update(self._summary(dg, routed, converted, chosen, ranges, active, batch))
        return PassResult(routed, modified=True, report=report)

    def _token_routed(self, dg: DiffusionGraph, converted: list[ConvertedFFN],
                      contributions: list[tuple[list[torch.Tensor], torch.Tensor]], inputs: dict[str, torch.Tensor],
                      batch: CalibrationBatch, ctx: PassContext, skipped: dict[str, str]) -> PassResult:
        cfg = self.config
        generator = torch.Generator().manual_seed(cfg.seed)
        routers = []
        for item, (outputs, _) in zip(converted, contributions):
            x = inputs[item.block]
            rows = torch.randperm(x.shape[0], generator=generator)[:cfg.max_tokens]
            routers.append(fit_router(x[rows], [o[rows] for o in outputs]))

        def build(active: float) -> DiffusionGraph:
            routed = dg.clone()
            for item, (weight, bias) in zip(converted, routers):
                route_tokens(routed, item, weight, bias, _capacity(item, active))
            _eliminate_dead_code(routed)
            _refresh_shapes(routed)
            return routed

        report: dict[str, Any] = {"ffns": [c.block for c in converted], "skipped_ffns": skipped,
                                  "experts": cfg.experts, "shared": cfg.shared,
                                  "expert_sizes": {c.block: c.sizes for c in converted},
                                  "routing": "per token (expert choice, static capacity)"}
        active = cfg.active
        if active is None:
            active, report["active_search"] = search_grid(
                ACTIVE_GRID, build, ctx, knob="active", offline_error=lambda routed: batch.error(routed.module),
                min_psnr=cfg.min_psnr, max_relative_error=cfg.max_relative_error, quality_rises=True, fallback=1.0)
        routed = build(active)
        total_params = dg.num_parameters()
        inactive = sum((1 - _capacity(item, active) / item.tokens) * sum(item.sizes[1:]) * _per_neuron(dg, item)
                       for item in converted)
        all_neurons = sum(item.width for item in converted)
        on = sum(item.sizes[0] + _capacity(item, active) / item.tokens * sum(item.sizes[1:])
                 for item in converted)
        report.update({
            "active": active,
            "capacity_tokens": {item.block: _capacity(item, active) for item in converted},
            "ffn_active_share": round(on / max(all_neurons, 1), 4),
            "activated_params_reduction": round(inactive / max(total_params, 1), 4),
            "router_params": sum(w.numel() + b.numel() for w, b in routers),
            "params": routed.num_parameters(),
            "relative_error": round(batch.error(routed.module), 6),
        })
        return PassResult(routed, modified=True, report=report)

    def _hidden(self, dg: DiffusionGraph, ffns: list[DenseFFN],
                batch: CalibrationBatch) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per FFN: hidden activations on the calibration rows as (tokens, neurons), and each token's step."""
        watch = {f.hidden.name for f in ffns} | {f.up.args[0].name for f in ffns}
        seen: dict[str, list[torch.Tensor]] = {n: [] for n in watch}
        for flat in batch.batches:
            with torch.no_grad():
                _Observer(dg.module, watch, lambda n, v: seen[n].append(v.detach())).run(*flat)
        result = {}
        for name, values in seen.items():
            tensor = torch.cat(values)
            per_row = math.prod(tensor.shape[1:-1])
            result[name] = (tensor.reshape(-1, tensor.shape[-1]), batch.row_steps.repeat_interleave(per_row))
        return result

    def _expert_scores(self, dg: DiffusionGraph, converted: list[ConvertedFFN],
                       contributions: list[tuple[list[torch.Tensor], torch.Tensor]], batch: CalibrationBatch,
                       ranges: list[tuple[int, int]], show_progress: bool) -> list[dict[tuple[int, int], float]]:
        """scores[g][(ffn, expert)]: relative denoiser output error on the calibration calls of step
        range g with that one routed expert switched off (replaced by its mean output over all
        calibration tokens with `compensate`)."""
        masks = [batch.step_mask(set(range(a, b))) for a, b in ranges]
        scores: list[dict[tuple[int, int], float]] = [{} for _ in ranges]
        for index, item in progress(list(enumerate(converted)), show_progress, "moe: scoring experts", "FFN"):
            for expert in range(len(item.chain) - 1):
                trial = dg.clone()
                nodes = {n.name: n for n in trial.graph.nodes}
                cut = nodes[item.chain[expert + 1]]
                if self.config.compensate:
                    mean = contributions[index][0][expert].mean(0)
                    cut.replace_all_uses_with(_compensate(trial, cut, _region(item, expert), mean))
                else:
                    cut.replace_all_uses_with(nodes[item.chain[expert]])
                _eliminate_dead_code(trial)
                errors = batch.row_errors(batch.outputs(trial.module))
                for g, mask in enumerate(masks):
                    scores[g][(index, expert)] = batch.mean_error(errors, mask)
        return scores

    def _routed(self, dg: DiffusionGraph, converted: list[ConvertedFFN], chosen: list[list[list[int]]],
                ranges: list[tuple[int, int]],
                contributions: list[tuple[list[torch.Tensor], torch.Tensor]]) -> DiffusionGraph:
        """A copy of the converted graph with a step plan: per step range, per FFN, the routed
        experts left on (`chosen`). Experts off at every step are removed from the graph. With
        `compensate`, a switched-off expert is replaced by its mean output over the calibration
        tokens of the step ranges that switch it off (see `_compensate`)."""
        routed = dg.clone()
        nodes = {n.name: n for n in routed.graph.nodes}
        regions, off_everywhere = [], []
        for item, per_range, (outputs, steps) in zip(converted, chosen, contributions):
            base = item.chain[0]
            for expert in range(len(item.chain) - 1):
                on = [expert in active_set for active_set in per_range]
                cut = item.chain[expert + 1]
                if all(on):
                    base = cut
                    continue
                if self.config.compensate:
                    off = torch.zeros_like(steps, dtype=torch.bool)
                    for (start, end), active in zip(ranges, on):
                        off |= ~torch.tensor(active) & (steps >= start) & (steps < end)
                    mean = outputs[expert][off].mean(0) if bool(off.any()) else outputs[expert].mean(0)
                    base = _compensate(routed, nodes[cut], _region(item, expert), mean).name
                if not any(on):
                    off_everywhere.append((cut, base))
                    continue
                regions.append({"name": _region(item, expert), "cuts": [cut], "bases": {cut: base}, "mode": BYPASS})
                base = cut
        removed = set()
        nodes = {n.name: n for n in routed.graph.nodes}
        for cut, base in off_everywhere:
            nodes[cut].replace_all_uses_with(nodes[base])
            removed.add(cut)
        _eliminate_dead_code(routed)
        if regions:
            skipped = [[_region(item, e) for item, per_range in zip(converted, chosen)
                        for e in range(len(item.chain) - 1)
                        if e not in per_range[index] and item.chain[e + 1] not in removed]
                       for index in range(len(ranges))]
            routed.step_plan = range_step_plan(regions, ranges, skipped, {"pass": "moe", "step_ranges": ranges})
        return routed

    def _refit(self, dg: DiffusionGraph, converted: list[ConvertedFFN], chosen: list[list[list[int]]],
               ranges: list[tuple[int, int]], contributions: list[tuple[list[torch.Tensor], torch.Tensor]],
               activations: list[torch.Tensor]) -> DiffusionGraph:
        """A copy of the converted graph in which each step range's routed experts of each FFN (per
        `chosen`) form one smaller FFN whose down-projection and bias are refit by ridge least
        squares to the output of all routed experts on that range's calibration tokens: the kept
        neurons take over what the dropped ones correlate with, and the bias their mean (which
        subsumes `compensate`). The head expert stays as it is. Each range's FFN is a bypass
        region on in that range's Plan variant only."""
        cfg = self.config
        routed = dg.clone()
        nodes = {n.name: n for n in routed.graph.nodes}
        regions, owners = [], []
        generator = torch.Generator().manual_seed(cfg.seed)
        for item, per_range, (outputs, steps), hidden in zip(converted, chosen, contributions, activations):
            assert item.builder is not None and item.neurons is not None
            builder = dataclasses.replace(item.builder, x=nodes[item.builder.x.name])
            target = torch.stack(outputs).sum(0)
            acc, last = nodes[item.chain[0]], nodes[item.chain[-1]]
            with routed.graph.inserting_before(last):
                for index, ((start, end), experts) in enumerate(zip(ranges, per_range)):
                    rows = torch.nonzero((steps >= start) & (steps < end)).reshape(-1)
                    if len(rows) > 4 * cfg.max_tokens:
                        rows = rows[torch.randperm(len(rows), generator=generator)[:4 * cfg.max_tokens]]
                    if not len(rows):
                        rows = torch.arange(len(steps))
                    neurons = sorted(n for e in experts for n in item.neurons[item.routed_from + e])
                    weight, bias = ridge_fit(hidden[rows][:, neurons], target[rows], cfg.ridge)
                    name = f"r{index}"
                    out = builder.expert(routed, name, neurons, weight, bias) if neurons else \
                        builder.attr(routed, f"{name}_mean_output", bias)
                    link = builder.node(routed, aten.add.Tensor, (acc, out), builder.out_shape)
                    if len(ranges) > 1:
                        regions.append({"name": f"{item.block.replace('.', '_')}_steps{index}", "cuts": [link.name],
                                        "bases": {link.name: acc.name}, "mode": BYPASS})
                        owners.append(index)
                    acc = link
            last.replace_all_uses_with(acc)
        _eliminate_dead_code(routed)
        if regions:
            skipped = [[r["name"] for r, owner in zip(regions, owners) if owner != index]
                       for index in range(len(ranges))]
            # running every range's FFN would add them up: a call at an unknown step runs the range
            # with the most neurons on
            widest = max(range(len(ranges)), key=lambda i: sum(item.sizes[item.routed_from + e]
                                                               for item, per_range in zip(converted, chosen)
                                                               for e in per_range[i]))
            routed.step_plan = range_step_plan(regions, ranges, skipped,
                                               {"pass": "moe", "step_ranges": ranges, "refit": True}, default=widest)
        return routed

    def _summary(self, dense: DiffusionGraph, routed: DiffusionGraph, converted: list[ConvertedFFN],
                 chosen: list[list[list[int]]], ranges: list[tuple[int, int]], active: float,
                 batch: CalibrationBatch) -> dict[str, Any]:
        ffn_params = sum(item.width * _per_neuron(dense, item) for item in converted)
        total_params = dense.num_parameters()
        num_steps = max(ranges[-1][1], 1)
        active_neurons = []
        for index, (start, end) in enumerate(ranges):
            on = sum(item.sizes[0] + sum(item.sizes[1 + e] for e in per_range[index])
                     for item, per_range in zip(converted, chosen))
            active_neurons.append((on, end - start))
        mean_on = sum(on * length for on, length in active_neurons) / num_steps
        all_neurons = sum(item.width for item in converted)
        inactive_params = (all_neurons - mean_on) * ffn_params / max(all_neurons, 1)
        groups = [set(range(a, b)) for a, b in ranges]
        return {
            "active": active,
            "active_experts": {item.block: {f"{a}-{b}": per_range[i] for i, (a, b) in enumerate(ranges)}
                               for item, per_range in zip(converted, chosen)},
            "ffn_active_share_per_range": [round(on / max(all_neurons, 1), 4) for on, _ in active_neurons],
            "ffn_active_share": round(mean_on / max(all_neurons, 1), 4),
            "activated_params_reduction": round(inactive_params / max(total_params, 1), 4),
            "params": routed.num_parameters(),
            "relative_error": round(_plan_error(routed, batch), 6),
            "relative_error_per_range": [round(_plan_error(routed, batch, g), 6) for g in groups],
        }


def _global_selection(converted: list[ConvertedFFN], scores: list[dict[tuple[int, int], float]],
                      active: float) -> list[list[list[int]]]:
    """Per step range, switches off the routed experts of least score per neuron across all FFNs
    (scores taken as additive) until `active` of all hidden neurons are left on."""
    total = sum(item.width for item in converted)
    chosen = [[list(range(len(item.chain) - 1)) for _ in scores] for item in converted]
    for g, range_scores in enumerate(scores):
        on = total
        for (index, expert), score in sorted(range_scores.items(),
                                             key=lambda kv: kv[1] / converted[kv[0][0]].sizes[kv[0][1] + 1]):
            size = converted[index].sizes[expert + 1]
            if on - size >= active * total - 1e-9:
                chosen[index][g].remove(expert)
                on -= size
    return chosen


def _per_ffn_selection(converted: list[ConvertedFFN], contributions: list[tuple[list[torch.Tensor], torch.Tensor]],
                       ranges: list[tuple[int, int]], active: float, centered: bool) -> list[list[list[int]]]:
    """Per FFN and step range, `active` of the FFN's neurons left on: the experts whose dropped
    outputs add least energy on that range's calibration tokens (about their mean when `centered`:
    a compensated expert leaves only its variation out)."""
    chosen = []
    for item, (outputs, steps) in zip(converted, contributions):
        keep = max(0, min(len(outputs), int(math.floor((active * item.width - item.sizes[0]) / item.sizes[1] + 1e-9))))
        per_range = []
        for start, end in ranges:
            mask = (steps >= start) & (steps < end)
            kept = [o[mask] - o[mask].mean(0) if centered else o[mask] for o in outputs]
            per_range.append(sorted(choose_active(kept, keep)) if bool(mask.any())
                             else list(range(len(outputs))))
        chosen.append(per_range)
    return chosen


def ridge_fit(features: torch.Tensor, target: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [out, in], bias [out]) minimising ||features W^T + b - target||^2 plus `ridge` times
    the features' mean energy times ||W||^2 (scale-free), by the normal equations in float64."""
    design = torch.cat([features.double(), torch.ones(features.shape[0], 1, dtype=torch.double)], dim=1)
    gram = design.T @ design / design.shape[0]
    penalty = torch.eye(gram.shape[0], dtype=torch.double) * ridge * float(gram.diagonal()[:-1].mean()
                                                                           if gram.shape[0] > 1 else 0.0)
    penalty[-1, -1] = 0.0
    solution = torch.linalg.solve(gram + penalty, design.T @ target.double() / design.shape[0])
    return solution[:-1].T.float().contiguous(), solution[-1].float().contiguous()


def _compensate(dg: DiffusionGraph, cut: torch.fx.Node, name: str, mean: torch.Tensor) -> torch.fx.Node:
    """Rewrites the chain link cut = acc + expert(x) into cut = (acc + mean) + (expert(x) - mean),
    the mean folded into the expert's down-projection bias, and returns the node acc + mean: what
    the chain carries on with when the expert is switched off (the closed-form bias compensation
    of dropped neurons); with the expert on, the link computes what it did, up to rounding."""
    acc, out = cut.args
    dtype = cut.meta["tensor_meta"].dtype
    with dg.graph.inserting_before(cut):
        constant = _constant(dg, f"{name}_mean_output", mean.to(dtype))
        shifted = dg.graph.create_node("call_function", aten.add.Tensor, (acc, constant), name=f"{name}_compensated")
        shifted.meta.update({k: v for k, v in cut.meta.items() if k in ("tensor_meta", "nn_module_stack")})
    with dg.graph.inserting_before(out):
        negated = _constant(dg, f"{name}_mean_output_negated", -mean.to(dtype))
    out.args = (*out.args[:2], negated)
    cut.args = (shifted, out)
    return shifted


# --- per-token routing ---------------------------------------------------------------------------

def fit_router(x: torch.Tensor, outputs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of a linear router whose score for each routed expert predicts the norm of
    that expert's output contribution on a token: least squares on calibration tokens."""
    design = torch.cat([x.double(), torch.ones(x.shape[0], 1, dtype=torch.double)], dim=1)
    target = torch.stack([o.double().norm(dim=1) for o in outputs], dim=1)
    solution = torch.linalg.lstsq(design, target).solution
    return solution[:-1].T.float().contiguous(), solution[-1].float().contiguous()


def _static_tokens(x: torch.fx.Node) -> bool:
    shape = x.meta["val"].shape if "val" in x.meta else _shape(x)
    return len(shape) == 3 and isinstance(shape[1], int)


def _capacity(item: ConvertedFFN, active: float) -> int:
    """Tokens each routed expert processes per sample: the routed share that leaves `active` of
    the FFN's hidden neurons on per token on average, the shared (head) expert always on."""
    routed = sum(item.sizes[1:])
    share = min(1.0, max(0.0, (active * item.width - item.sizes[0]) / max(routed, 1)))
    return max(1, math.ceil(share * item.tokens))


def route_tokens(dg: DiffusionGraph, item: ConvertedFFN, weight: torch.Tensor, bias: torch.Tensor,
                 capacity: int) -> None:
    """Rewrites each routed expert of a converted FFN (in place) to process only the `capacity`
    tokens of each sample its router scores highest: scores = x W^T + b, idx = topk(score_e),
    the expert runs on gather(x, idx) and its outputs are scatter-added into the chain at idx.
    Shapes depend on the capacity only, never on the data, so every backend runs it."""
    graph = dg.graph
    nodes = {n.name: n for n in graph.nodes}
    prefix = item.block.replace(".", "_") + "_router"
    for suffix, value in (("weight", weight), ("bias", bias)):
        dg.module.register_buffer(f"{prefix}_{suffix}", value.detach().clone())
    first = nodes[item.chain[0]]
    x = _expert_input(first)
    channels = _shape(x)[-1]
    with graph.inserting_after(x):
        w = graph.get_attr(f"{prefix}_weight")
    with graph.inserting_after(w):
        b = graph.get_attr(f"{prefix}_bias")
    with graph.inserting_after(b):
        scores = graph.call_function(aten.linear.default, (x, w, b))
    for expert in range(len(item.chain) - 1):
        cut = nodes[item.chain[expert + 1]]
        acc, out = cut.args
        ups = _expert_inputs_of(out, x)
        with graph.inserting_before(min(ups, key=_position(graph))):
            score = graph.call_function(aten.select.int, (scores, -1, expert))
            top = graph.call_function(aten.topk.default, (score, capacity, 1))
            index = graph.call_function(operator.getitem, (top, 1))
            column = graph.call_function(aten.unsqueeze.default, (index, -1))
            gathered = graph.call_function(aten.gather.default,
                                           (x, 1, graph.call_function(aten.expand.default, (column, [-1, capacity,
                                                                                                       channels]))))
        for up in ups:
            up.args = (gathered, *up.args[1:])
        with graph.inserting_before(cut):
            spread = graph.call_function(aten.expand.default, (column, [-1, capacity, _shape(cut)[-1]]))
            added = graph.call_function(aten.scatter_add.default, (acc, 1, spread, out))
        cut.replace_all_uses_with(added)


def _expert_input(head_out: torch.fx.Node) -> torch.fx.Node:
    """The FFN input x: the input of the head expert's first linear."""
    node = head_out
    while True:
        node = node.args[0]
        if node.target == aten.linear.default:
            return node.args[0]


def _expert_inputs_of(out: torch.fx.Node, x: torch.fx.Node) -> list[torch.fx.Node]:
    """The linears of one expert that read the FFN input x (up, or GEGLU's value and gate)."""
    found, stack, seen = [], [out], set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for parent in node.all_input_nodes:
            if parent is x:
                found.append(node)
            elif parent.op == "call_function":
                stack.append(parent)
    return found


def _position(graph: torch.fx.Graph) -> Any:
    order = {n: i for i, n in enumerate(graph.nodes)}
    return lambda node: order[node]


def _refresh_shapes(dg: DiffusionGraph) -> None:
    """Shape propagation at the signature's example shapes, for the nodes routing created."""
    from torch.fx.passes.shape_prop import ShapeProp

    generator = torch.Generator().manual_seed(0)
    flat = [torch.randn(s.example_shape, generator=generator) if s.dtype.startswith("float")
            else torch.zeros(s.example_shape, dtype=getattr(torch, s.dtype)) for s in dg.signature.inputs]
    with torch.no_grad():
        ShapeProp(dg.module).propagate(*flat)


def _region(item: ConvertedFFN, expert: int) -> str:
    return f"{item.block.replace('.', '_')}_expert{expert}"


def _per_neuron(dg: DiffusionGraph, item: ConvertedFFN) -> float:
    """Parameters per hidden neuron of a converted FFN (up rows, GEGLU's gate rows, down column)."""
    prefix = item.block.replace(".", "_") + "_moe_"
    weights = {k: v for k, v in dg.weights().items() if k.startswith(prefix) and "down_bias" not in k}
    return sum(v.numel() for v in weights.values()) / max(item.width, 1)
