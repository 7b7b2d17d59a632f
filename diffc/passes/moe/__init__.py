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
smallest share on a grid that keeps the re-sampled final outputs above `min_psnr` (pipeline or
identified loop), verified on held-out trajectories, is used; with neither, every expert stays
active and a warning says why, unless `max_relative_error` is set (the teacher-forced error decides).
With every expert active nothing is routed and the pass leaves the FFNs dense (exact).

With `compensate`, a switched-off expert is replaced by its mean output (per channel, over the
calibration tokens of the step ranges that switch it off), folded into the chain as a constant:
the closed-form bias compensation of dropped neurons. With `refit` (the default), each step
range's experts of an FFN become one smaller FFN whose down-projection is refit by ridge least
squares to the whole FFN's output on that range's calibration tokens (the kept neurons take over
what the dropped ones correlate with, the bias their mean); each range's FFN is then the bypass
region on in its own range only, at the price of storing the kept neurons once per range.
With `recover_steps`, the routed graph is then distilled against the dense one through each
range's variant (`diffc.passes.recovery.recover`, on every recorded call or `recover_records` of them;
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

from dataclasses import dataclass
from typing import Any

import torch

from ...calibration.batch import CalibrationBatch, plan_error, step_ranges
from ...errors import PassError
from ...ir import DiffusionGraph
from .._search import fitting_items, search_grid
from ..base import Pass, PassConfig, PassContext, PassResult, anchor_step_plan, register_pass
from ..recovery import RECOVER_ROWS, recover
from ..rewrites import eliminate_dead_code
from .experts import (ConvertedFFN, convert, find_ffns, hidden_activations, linear_weight, params_per_neuron,
                      split_experts)
from .step_routing import expert_scores, global_selection, per_ffn_selection, refit_plan, routed_plan
from .token_routing import expert_capacity, fit_router, refresh_shapes, route_tokens, static_tokens

ACTIVE_GRID = (0.25, 0.375, 0.5, 0.625, 0.75, 0.875)
ALLOCATIONS = ("global", "per_ffn")
ROUTINGS = ("timestep", "token")


@dataclass(frozen=True)
class MoeConfig(PassConfig):
    experts: int = 8
    shared: bool = True
    allocation: str = "global"
    active: float | None = None
    step_groups: int = 4
    min_psnr: float = 30.0
    max_relative_error: float | None = None
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
            raise PassError(f"the graph already has a step plan from {dg.step_plan.source}, and step plans do not nest. Fix: run "
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
            static = [f.block for f in ffns if not static_tokens(f.up.args[0])]
            if static:
                raise PassError(f"routing='token' needs a static token count, and the FFN inputs of {static} have "
                                "a symbolic one (the graph was captured with dynamic resolution). Fix: capture with "
                                "diffc.ir.capture(model, dynamic=False), or use routing='timestep'")
        if cfg.active == 1:
            return PassResult(dg, modified=False, report={
                "ffns": [f.block for f in ffns], "active": 1.0,
                "note": "every expert active: nothing to route, the FFNs stay dense (outputs unchanged)"})
        untouched = dg.clone()
        # a searched share is verified on held-out trajectories: nothing is fitted on them
        batch = CalibrationBatch(ctx.calibration, dg, cfg.max_records,
                                 items=fitting_items(ctx) if cfg.active is None else None)
        ranges = step_ranges(batch.num_steps, cfg.step_groups)
        hidden = hidden_activations(dg, ffns, batch)
        inputs = {f.block: hidden[f.up.args[0].name][0] for f in ffns}
        converted, contributions = [], []
        for ffn in ffns:
            activations, steps = hidden[ffn.hidden.name]
            down_w = linear_weight(dg, ffn.down).detach()
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
        eliminate_dead_code(dg)
        if cfg.routing == "token":
            return self._token_routed(dg, converted, contributions, inputs, batch, ctx, skipped)
        if cfg.allocation == "global":
            scores = expert_scores(dg, converted, contributions, batch, ranges, cfg.compensate, ctx.progress)

            def select(active: float) -> list[list[list[int]]]:
                return global_selection(converted, scores, active)
        else:
            def select(active: float) -> list[list[list[int]]]:
                return per_ffn_selection(converted, contributions, ranges, active, cfg.compensate)

        activations = [hidden[ffn.hidden.name][0] for ffn in ffns]

        def plan_for(active: float) -> tuple[DiffusionGraph, list[list[list[int]]]]:
            chosen = select(active)
            if cfg.refit:
                return refit_plan(dg, converted, chosen, ranges, contributions, activations, cfg.max_tokens, cfg.ridge,
                                  cfg.seed), chosen
            return routed_plan(dg, converted, chosen, ranges, contributions, cfg.compensate), chosen

        active = cfg.active
        report: dict[str, Any] = {"ffns": [c.block for c in converted], "skipped_ffns": skipped,
                                  "experts": cfg.experts, "shared": cfg.shared,
                                  "expert_sizes": {c.block: c.sizes for c in converted},
                                  "step_ranges": ranges, "routing": "per step range (static)"}
        if active is None:
            active, report["active_search"] = search_grid(
                ACTIVE_GRID, lambda share: plan_for(share)[0], ctx, knob="active",
                offline_error=lambda routed: plan_error(routed, batch), min_psnr=cfg.min_psnr,
                max_relative_error=cfg.max_relative_error, quality_rises=True, fallback=1.0)
            if active >= 1.0:  # no share keeps the floor (search_grid warned): the FFNs stay dense
                return PassResult(untouched, modified=False, report={
                    **report, "active": 1.0,
                    "declined": "no active share keeps the floor: every FFN stays dense (outputs unchanged)"})
        routed, chosen = plan_for(active)
        if cfg.recover_steps:
            distillation_calls = CalibrationBatch(ctx.calibration, dg, cfg.recover_records)
            routed, report["recovery_loss"] = recover(routed, dg, distillation_calls, cfg.recover_steps, cfg.recover_lr,
                                                      cfg.seed, ctx.progress, "moe", rows_per_step=cfg.recover_rows,
                                                      validation=batch)
            report["relative_error_before_recovery"] = report["recovery_loss"]["validation_error"]["start"]
        report.update(self._summary(dg, routed, converted, chosen, ranges, active, batch))
        anchor_step_plan(routed, ctx)
        return PassResult(routed, modified=True, report=report)

    def _token_routed(self, dg: DiffusionGraph, converted: list[ConvertedFFN],
                      contributions: list[tuple[list[torch.Tensor], torch.Tensor]], inputs: dict[str, torch.Tensor],
                      batch: CalibrationBatch, ctx: PassContext, skipped: dict[str, str]) -> PassResult:
        cfg = self.config
        generator = torch.Generator().manual_seed(cfg.seed)
        routers = []
        for item, (outputs, _) in zip(converted, contributions):
            x = inputs[item.block]
            rows = torch.randperm(x.shape[0], generator=generator, device="cpu")[:cfg.max_tokens]
            routers.append(fit_router(x[rows], [o[rows] for o in outputs]))

        def build(active: float) -> DiffusionGraph:
            routed = dg.clone()
            for item, (weight, bias) in zip(converted, routers):
                route_tokens(routed, item, weight, bias, expert_capacity(item, active))
            eliminate_dead_code(routed)
            refresh_shapes(routed)
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
        inactive = sum((1 - expert_capacity(item, active) / item.tokens) * sum(item.sizes[1:])
                       * params_per_neuron(dg, item) for item in converted)
        all_neurons = sum(item.width for item in converted)
        on = sum(item.sizes[0] + expert_capacity(item, active) / item.tokens * sum(item.sizes[1:])
                 for item in converted)
        report.update({
            "active": active,
            "capacity_tokens": {item.block: expert_capacity(item, active) for item in converted},
            "ffn_active_share": round(on / max(all_neurons, 1), 4),
            "activated_params_reduction": round(inactive / max(total_params, 1), 4),
            "router_params": sum(w.numel() + b.numel() for w, b in routers),
            "params": routed.num_parameters(),
            "relative_error": round(batch.error(routed.module), 6),
        })
        return PassResult(routed, modified=True, report=report)

    def _summary(self, dense: DiffusionGraph, routed: DiffusionGraph, converted: list[ConvertedFFN],
                 chosen: list[list[list[int]]], ranges: list[tuple[int, int]], active: float,
                 batch: CalibrationBatch) -> dict[str, Any]:
        ffn_params = sum(item.width * params_per_neuron(dense, item) for item in converted)
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
            "relative_error": round(plan_error(routed, batch), 6),
            "relative_error_per_range": [round(plan_error(routed, batch, g), 6) for g in groups],
        }
