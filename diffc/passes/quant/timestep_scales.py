"""Static int8 activation scales per timestep group, picked by the call's timestep at run time.

A layer's input range drifts with the noise level (PTQ4DM, TFMQ-DM), so one scale for the whole
trajectory either clips the steps with the largest range or rounds the others coarsely. A layer
y = x W^T + b equals r * ((x / r) W^T) + b for any r > 0; with r_g = s_g / s_ref (the scale of
timestep group g over the largest group's) it quantizes x / r_g at the static scale s_ref, which
is x at its group's own scale s_g. The rewrite makes r explicit in the graph: one table of every
rewritten input's factors read at the call's timestep (its first element: the rows of one call
share a step in the loops diffc calibrates), a multiply on the input (shared by the layers
reading it) and one on the output, the bias added after. Every backend then lowers an ordinary
static-scale layer, and the timestep reaches whichever segment needs it like prune's per-range
offsets.

The two multiplies are not free, so a layer gets per-group scales only where they bring the
expected rounding and clipping error of its input (from the per-group |x| histograms) to at most
GAIN of what the single scale leaves. Fewer samples per group can also fit the calibration prompts
too closely, so the rewrite is kept only when the re-sampled final images (every placeable layer
at int8) come closer to the original's with it than without; when they cannot be re-sampled, the
single scales stay (the choice that changes least) and the report says why."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx

from ...calibration import CalibrationSet, NodeStats, resampling, split_items, trajectory_error
from ...calibration.timesteps import step_group
from ...ir import DiffusionGraph
from ...ir.precision import INT8
from ...ir.precision import ActivationQuant
from .._search import unjudgeable
from ..base import PassContext
from ..rewrites import add_constant, timestep_node, timestep_range_change
from .annotate import activation_scale, annotate
from .layers import Layer

aten = torch.ops.aten
GAIN = 0.8
TABLE_NAME = "diffc_timestep_activation_factors"


@dataclass(frozen=True)
class TimestepGroups:
    """The statistics' timestep groups in ascending timestep, and the timesteps between them."""

    order: tuple[int, ...]
    boundaries: tuple[float, ...]


@dataclass
class TimestepScales:
    """Per rewritten layer (by its new matmul node), its groups' scales (ascending timestep) and
    the static scale it now quantizes at; `renamed` maps each rewritten layer's old node to the new
    one; `skipped` says why no layer got them, when none did."""

    boundaries: tuple[float, ...] = ()
    scales: dict[str, tuple[float, ...]] = field(default_factory=dict)
    reference: dict[str, float] = field(default_factory=dict)
    renamed: dict[str, str] = field(default_factory=dict)
    skipped: str | None = None
    judged: dict[str, Any] = field(default_factory=dict)

    def report(self) -> dict[str, Any]:
        judged = {"final_images": self.judged} if self.judged else {}
        if self.skipped:
            return {"layers": [], "why_none": self.skipped, **judged}
        return {"boundaries": [float(f"{b:.6g}") for b in self.boundaries],
                "layers": {node: [float(f"{s:.6g}") for s in scales] for node, scales in self.scales.items()}, **judged}


def timestep_groups(calibration: CalibrationSet, groups: int, items: set[str] | None) -> TimestepGroups | str:
    """The groups of the recorded calls (of trajectories `items`, all with None) ordered by their
    timesteps, or why per-group scales cannot be selected by the timestep."""
    spans: dict[int, list[float]] = {}
    for item in calibration.items:
        if items is not None and item["id"] not in items:
            continue
        for call in item["calls"]:
            if call["timestep"] is None:
                return "the recorded calls carry no timestep to select a group by"
            spans.setdefault(step_group(call["step"], item["num_steps"], groups), []).append(float(call["timestep"]))
    if len(spans) < 2:
        return "the calibration covers a single timestep group"
    order = sorted(spans, key=lambda group: min(spans[group]))
    bounds = [(min(spans[group]), max(spans[group])) for group in order]
    if any(low_next <= high for (_, high), (low_next, _) in zip(bounds, bounds[1:])):
        return "the timestep groups' ranges overlap (calibrated loops of different lengths or schedules)"
    return TimestepGroups(tuple(order), tuple((high + low_next) / 2 for (_, high), (low_next, _) in
                                              zip(bounds, bounds[1:])))


def choose(layers: list[Layer], stats: Callable[..., NodeStats], groups: TimestepGroups, range_method: str,
           percentile: float) -> dict[str, tuple[float, ...]]:
    """Per layer where they pay (GAIN), the int8 scale of its input in each group of `groups`."""
    chosen: dict[str, tuple[float, ...]] = {}
    for layer in layers:
        try:
            per_group = [stats(layer.input, group) for group in groups.order]
        except KeyError:  # a group without calls for this node: nothing to scale it by
            continue
        one = activation_scale(stats(layer.input), INT8, range_method, percentile)
        own = [activation_scale(s, INT8, range_method, percentile) for s in per_group]
        single_error = sum(s.quantization_error(one * 127.0) for s in per_group)
        group_error = sum(s.quantization_error(scale * 127.0) for s, scale in zip(per_group, own))
        if group_error <= GAIN * single_error:
            chosen[layer.node] = tuple(own)
    return chosen


def rewrite(dg: DiffusionGraph, layers: list[Layer], scales: dict[str, tuple[float, ...]],
            boundaries: tuple[float, ...]) -> dict[str, tuple[str, float]]:
    """Rewrites each layer of `layers` named in `scales` as r * layer(x / r, W) + b, r read at the
    call's timestep. The layer's node keeps its name and now yields that result (what reads the
    layer's output by name still finds it); the quantized matmul is a new node. Returns, per
    rewritten layer, the new node and its static reference scale (its largest group's)."""
    timestep = timestep_node(dg)
    nodes = {n.name: n for n in dg.graph.nodes}
    chosen = [layer for layer in layers if layer.node in scales]
    if timestep is None or not chosen:
        return {}
    reference = {layer.node: max(scales[layer.node]) for layer in chosen}
    inputs = list(dict.fromkeys(layer.input for layer in chosen))
    column = {name: index for index, name in enumerate(inputs)}
    reader = {layer.input: layer.node for layer in chosen}
    factors = torch.tensor([[scales[reader[name]][g] / reference[reader[name]] for name in inputs]
                            for g in range(len(boundaries) + 1)], dtype=torch.float64, device="cpu")
    table = torch.cat([factors, 1.0 / factors], dim=1).float().to(dg.device)
    graph = dg.graph
    with graph.inserting_before([n for n in graph.nodes if n.op == "placeholder"][-1].next):
        rows = _rows_at_timestep(dg, table, boundaries, timestep)
    divided: dict[str, torch.fx.Node] = {}
    rewritten: dict[str, tuple[str, float]] = {}
    for layer in chosen:
        node = nodes[layer.node]
        source = nodes[layer.input]
        with graph.inserting_before(node):
            if layer.input not in divided:
                inverse = graph.call_function(aten.select.int, (rows, 1, len(inputs) + column[layer.input]))
                divided[layer.input] = graph.call_function(aten.mul.Tensor, (source, inverse))
                _copy_meta(source, divided[layer.input])
            bias = _take_bias(node)
            matmul = graph.create_node("call_function", node.target, (divided[layer.input], *node.args[1:]),
                                       dict(node.kwargs), name=f"{layer.node}_timestep_scaled")
            factor = graph.call_function(aten.select.int, (rows, 1, column[layer.input]))
            if bias is None:
                node.target, node.args = aten.mul.Tensor, (matmul, factor)
            else:
                scaled = graph.call_function(aten.mul.Tensor, (matmul, factor))
                shaped = bias if node.target == aten.linear.default \
                    else graph.call_function(aten.reshape.default, (bias, [-1, 1, 1]))
                node.target, node.args = aten.add.Tensor, (scaled, shaped)
                _copy_meta(node, scaled)
            node.kwargs = {}
        _copy_meta(node, matmul)
        matmul.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")})
        rewritten[layer.node] = (matmul.name, reference[layer.node])
    graph.lint()
    dg.module.recompile()
    return rewritten


def _rows_at_timestep(dg: DiffusionGraph, table: torch.Tensor, boundaries: tuple[float, ...],
                      timestep: torch.fx.Node) -> torch.fx.Node:
    """[1, columns]: the row of `table` for the group the call's first timestep falls in."""
    graph = dg.graph
    first = graph.call_function(aten.slice.Tensor, (graph.call_function(aten.reshape.default, (timestep, [-1])),
                                                    0, 0, 1))
    times = graph.call_function(aten.reshape.default, (
        graph.call_function(aten._to_copy.default, (first,), {"dtype": torch.float32}), [1, 1]))
    change = timestep_range_change(dg, TABLE_NAME, table, boundaries, times, torch.float32)
    return graph.call_function(aten.add.Tensor, (add_constant(dg, TABLE_NAME, table[:1]), change))


def _take_bias(node: torch.fx.Node) -> torch.fx.Node | None:
    """The layer's bias, taken out of its arguments (None left in its place)."""
    if len(node.args) > 2:
        bias = node.args[2]
        node.args = (*node.args[:2], None, *node.args[3:])
        return bias
    bias = node.kwargs.get("bias")
    node.kwargs = {key: value for key, value in node.kwargs.items() if key != "bias"}
    return bias


def _copy_meta(source: torch.fx.Node, target: torch.fx.Node) -> None:
    target.meta.update({k: v for k, v in source.meta.items() if k in ("val", "tensor_meta")})


def plan_nodes(dg: DiffusionGraph) -> set[str]:
    """Nodes a step plan names (cuts, bases, kept nodes): their values must not move."""
    return set().union(*(region.node_names() for region in dg.step_plan.regions)) if dg.step_plan else set()


def add_timestep_scales(dg: DiffusionGraph, calibration: CalibrationSet, layers: list[Layer],
                        stats: Callable[..., NodeStats], groups: int, items: set[str] | None, range_method: str,
                        percentile: float) -> TimestepScales:
    """Gives each layer of `layers` whose input pays for it (GAIN) one scale per timestep group
    (the rewrite above); says why none got them otherwise."""
    if timestep_node(dg) is None:
        return TimestepScales(skipped="the graph has no timestep input to select a group by")
    found = timestep_groups(calibration, groups, items)
    if isinstance(found, str):
        return TimestepScales(skipped=found)
    fixed = plan_nodes(dg)
    candidates = [layer for layer in layers if layer.node not in fixed]
    chosen = choose(candidates, stats, found, range_method, percentile)
    if not chosen:
        return TimestepScales(found.boundaries, skipped=f"no layer's expected input error falls to {GAIN:.0%} of a "
                                                        "single scale's with one per timestep group")
    rewritten = rewrite(dg, candidates, chosen, found.boundaries)
    return TimestepScales(found.boundaries, {new: chosen[old] for old, (new, _) in rewritten.items()},
                          {new: scale for new, scale in rewritten.values()}, renamed={old: new for old, (new, _) in rewritten.items()})


def judged_timestep_scales(dg: DiffusionGraph, ctx: PassContext, layers: list[Layer], static_format: str,
                           activations: dict[str, dict[str, ActivationQuant]], stats: Callable[..., NodeStats],
                           groups: int, items: set[str] | None, range_method: str, percentile: float, judge: bool
                           ) -> tuple[DiffusionGraph, dict[str, dict[str, ActivationQuant]], TimestepScales]:
    """`dg` with per-group scales where they pay, and its layers' activations (the rewritten ones at
    their reference scale), when that brings the re-sampled final images of every layer of `layers`
    at `static_format` closer to the original's (or without `judge`, always); else `dg` and
    `activations` unchanged. Either way the TimestepScales says what was measured."""
    stepped = dg.clone()
    stepwise = add_timestep_scales(stepped, ctx.calibration, layers, stats, groups, items, range_method, percentile)
    if not stepwise.scales:
        return dg, activations, stepwise
    stepped_activations = dict(activations)
    for old, node in stepwise.renamed.items():
        reference = ActivationQuant(INT8, stepwise.reference[node], range_method)
        stepped_activations[node] = {**stepped_activations.pop(old), static_format: reference}
    if not judge:
        return stepped, stepped_activations, stepwise
    why = unjudgeable(ctx)
    if why:
        return dg, activations, TimestepScales(skipped=f"not judged on final images ({why}): one scale per layer "
                                                       "kept, the choice that changes least")
    selection, _ = split_items(ctx.calibration)
    psnr = {}
    for key, graph, acts, renamed in (("single_scale_psnr", dg, activations, {}),
                                      ("per_group_psnr", stepped, stepped_activations, stepwise.renamed)):
        candidate = graph.clone()
        annotate(candidate, {renamed.get(layer.node, layer.node): static_format for layer in layers}, acts, {})
        denoiser = ctx.denoiser_for(candidate)
        psnr[key] = round(trajectory_error(ctx.calibration, denoiser, selection, ctx.reference)["psnr"], 3)
    stepwise.judged = {"judged_on": resampling(ctx.calibration), "format": static_format, **psnr}
    if psnr["per_group_psnr"] <= psnr["single_scale_psnr"]:
        return dg, activations, TimestepScales(stepwise.boundaries, skipped="the re-sampled final images were no "
                                               "closer with them", judged=stepwise.judged)
    return stepped, stepped_activations, stepwise
