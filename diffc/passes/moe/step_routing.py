"""Routing per range of denoising steps: the experts each range keeps on (`global_selection` by
scores of single experts switched off, `per_ffn_selection` by the energy of what is dropped),
the compensation of switched-off experts by their mean output, and the step-planned graph, with
each range's experts as bypass regions (`routed_plan`) or refit into one smaller FFN per range
(`refit_plan`)."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import torch.fx

from ..._progress import progress
from ...calibration.batch import CalibrationBatch
from ...ir import DiffusionGraph
from ..rewrites import add_constant, eliminate_dead_code
from ..step_ranges import bypass_region, range_step_plan
from .experts import ConvertedFFN

aten = torch.ops.aten


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


def global_selection(converted: list[ConvertedFFN], scores: list[dict[tuple[int, int], float]],
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


def per_ffn_selection(converted: list[ConvertedFFN], contributions: list[tuple[list[torch.Tensor], torch.Tensor]],
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
    design = torch.cat([features.double(), torch.ones(features.shape[0], 1, dtype=torch.double, device=features.device)], dim=1)
    gram = design.T @ design / design.shape[0]
    penalty = torch.eye(gram.shape[0], dtype=torch.double, device=gram.device) * ridge * float(gram.diagonal()[:-1].mean()
                                                                           if gram.shape[0] > 1 else 0.0)
    penalty[-1, -1] = 0.0
    solution = torch.linalg.solve(gram + penalty, design.T @ target.double() / design.shape[0])
    return solution[:-1].T.float().contiguous(), solution[-1].float().contiguous()


def compensate_expert(dg: DiffusionGraph, cut: torch.fx.Node, name: str, mean: torch.Tensor) -> torch.fx.Node:
    """Rewrites the chain link cut = acc + expert(x) into cut = (acc + mean) + (expert(x) - mean),
    the mean folded into the expert's down-projection bias, and returns the node acc + mean: what
    the chain carries on with when the expert is switched off (the closed-form bias compensation
    of dropped neurons); with the expert on, the link computes what it did, up to rounding."""
    acc, out = cut.args
    dtype = cut.meta["tensor_meta"].dtype
    with dg.graph.inserting_before(cut):
        constant = add_constant(dg, f"{name}_mean_output", mean.to(dtype))
        shifted = dg.graph.create_node("call_function", aten.add.Tensor, (acc, constant), name=f"{name}_compensated")
        shifted.meta.update({k: v for k, v in cut.meta.items() if k in ("tensor_meta", "nn_module_stack")})
    with dg.graph.inserting_before(out):
        negated = add_constant(dg, f"{name}_mean_output_negated", -mean.to(dtype))
    out.args = (*out.args[:2], negated)
    cut.args = (shifted, out)
    return shifted


def expert_region(item: ConvertedFFN, expert: int) -> str:
    return f"{item.block.replace('.', '_')}_expert{expert}"


def expert_scores(dg: DiffusionGraph, converted: list[ConvertedFFN],
                  contributions: list[tuple[list[torch.Tensor], torch.Tensor]], batch: CalibrationBatch,
                  ranges: list[tuple[int, int]], compensate: bool,
                  show_progress: bool) -> list[dict[tuple[int, int], float]]:
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
            if compensate:
                mean = contributions[index][0][expert].mean(0)
                cut.replace_all_uses_with(compensate_expert(trial, cut, expert_region(item, expert), mean))
            else:
                cut.replace_all_uses_with(nodes[item.chain[expert]])
            eliminate_dead_code(trial)
            errors = batch.row_errors(batch.outputs(trial.module))
            for g, mask in enumerate(masks):
                scores[g][(index, expert)] = batch.mean_error(errors, mask)
    return scores


def routed_plan(dg: DiffusionGraph, converted: list[ConvertedFFN], chosen: list[list[list[int]]],
                ranges: list[tuple[int, int]], contributions: list[tuple[list[torch.Tensor], torch.Tensor]],
                compensate: bool) -> DiffusionGraph:
    """A copy of the converted graph with a step plan: per step range, per FFN, the routed
    experts left on (`chosen`). Experts off at every step are removed from the graph. With
    `compensate`, a switched-off expert is replaced by its mean output over the calibration
    tokens of the step ranges that switch it off (see `compensate_expert`)."""
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
            if compensate:
                off = torch.zeros_like(steps, dtype=torch.bool)
                for (start, end), active in zip(ranges, on):
                    off |= ~torch.tensor(active, device=steps.device) & (steps >= start) & (steps < end)
                mean = outputs[expert][off].mean(0) if bool(off.any()) else outputs[expert].mean(0)
                base = compensate_expert(routed, nodes[cut], expert_region(item, expert), mean).name
            if not any(on):
                off_everywhere.append((cut, base))
                continue
            regions.append(bypass_region(expert_region(item, expert), cut, base))
            base = cut
    removed = set()
    nodes = {n.name: n for n in routed.graph.nodes}
    for cut, base in off_everywhere:
        nodes[cut].replace_all_uses_with(nodes[base])
        removed.add(cut)
    eliminate_dead_code(routed)
    if regions:
        skipped = [[expert_region(item, e) for item, per_range in zip(converted, chosen)
                    for e in range(len(item.chain) - 1)
                    if e not in per_range[index] and item.chain[e + 1] not in removed]
                   for index in range(len(ranges))]
        routed.step_plan = range_step_plan(regions, ranges, skipped, {"pass": "moe", "step_ranges": ranges})
    return routed


def refit_plan(dg: DiffusionGraph, converted: list[ConvertedFFN], chosen: list[list[list[int]]],
               ranges: list[tuple[int, int]], contributions: list[tuple[list[torch.Tensor], torch.Tensor]],
               activations: list[torch.Tensor], max_tokens: int, ridge: float, seed: int) -> DiffusionGraph:
    """A copy of the converted graph in which each step range's routed experts of each FFN (per
    `chosen`) form one smaller FFN whose down-projection and bias are refit by ridge least
    squares to the output of all routed experts on that range's calibration tokens: the kept
    neurons take over what the dropped ones correlate with, and the bias their mean (which
    subsumes `compensate`). The head expert stays as it is. Each range's FFN is a bypass
    region on in that range's Plan variant only."""
    routed = dg.clone()
    nodes = {n.name: n for n in routed.graph.nodes}
    regions, owners = [], []
    generator = torch.Generator().manual_seed(seed)
    for item, per_range, (outputs, steps), hidden in zip(converted, chosen, contributions, activations):
        assert item.builder is not None and item.neurons is not None
        builder = dataclasses.replace(item.builder, x=nodes[item.builder.x.name])
        target = torch.stack(outputs).sum(0)
        acc, last = nodes[item.chain[0]], nodes[item.chain[-1]]
        with routed.graph.inserting_before(last):
            for index, ((start, end), experts) in enumerate(zip(ranges, per_range)):
                rows = torch.nonzero((steps >= start) & (steps < end)).reshape(-1)
                if len(rows) > 4 * max_tokens:
                    rows = rows[torch.randperm(len(rows), generator=generator, device="cpu")[:4 * max_tokens]]
                if not len(rows):
                    rows = torch.arange(len(steps), device=steps.device)
                neurons = sorted(n for e in experts for n in item.neurons[item.routed_from + e])
                weight, bias = ridge_fit(hidden[rows][:, neurons], target[rows], ridge)
                name = f"r{index}"
                out = builder.expert(routed, name, neurons, weight, bias) if neurons else \
                    builder.attr(routed, f"{name}_mean_output", bias)
                link = builder.node(routed, aten.add.Tensor, (acc, out), builder.out_shape)
                if len(ranges) > 1:
                    regions.append(bypass_region(f"{item.block.replace('.', '_')}_steps{index}", link.name, acc.name))
                    owners.append(index)
                acc = link
        last.replace_all_uses_with(acc)
    eliminate_dead_code(routed)
    if regions:
        skipped = [[r.name for r, owner in zip(regions, owners) if owner != index]
                   for index in range(len(ranges))]
        # running every range's FFN would add them up: a call at an unknown step runs the range
        # with the most neurons on
        widest = max(range(len(ranges)), key=lambda i: sum(item.sizes[item.routed_from + e]
                                                           for item, per_range in zip(converted, chosen)
                                                           for e in per_range[i]))
        routed.step_plan = range_step_plan(regions, ranges, skipped,
                                           {"pass": "moe", "step_ranges": ranges, "refit": True}, default=widest)
    return routed
