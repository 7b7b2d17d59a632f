"""Recovery after removing parts of a graph (prune, moe): a short distillation of the remaining
weights against the unreduced graph on the calibration calls, trained through each variant of a
step plan on the steps that variant runs."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.fx

from .._progress import progress
from ..calibration.batch import CalibrationBatch, first_output, plan_error, rows_by_variant
from ..calibration.statistics import Observer
from ..ir import DiffusionGraph
from ..ir.partition import build_plan

RECOVER_ROWS = 32
RECOVERY_CHECKS = 8


def recover(pruned: DiffusionGraph, teacher: DiffusionGraph, batch: CalibrationBatch, steps: int, lr: float,
            seed: int, show_progress: bool = False, label: str = "prune", rows_per_step: int = RECOVER_ROWS,
            validation: CalibrationBatch | None = None) -> tuple[DiffusionGraph, dict[str, Any]]:
    """LAPTOP-Diff's recovery: a short normalized feature distillation of the pruned graph's
    remaining weights against the unpruned graph on the calibration calls. Loss: the output's
    squared error relative to the teacher output's energy, plus the same normalized error at every
    kept block boundary (block outputs present in both graphs), averaged. Adam, one calibration
    call (or `rows_per_step` random rows of the stacked calls) per step: a step costs the same
    however many calls were recorded, more of them (more seeds) only add data. A graph with a
    step plan is trained through each of its variants in turn, on the calls of the steps that
    variant runs (see `variant_views`), so weights shared by variants learn from all of their
    steps. With `validation`, the relative output error on those calls is checked at the start
    and `RECOVERY_CHECKS` times along the way, and the weights of least error are kept: a
    learning rate too high for a model that starts close to its teacher cannot leave it worse.
    Returns a copy with its own weights (the teacher's stay untouched) and the first and last
    losses, the steps, the calibration rows drawn from and the validation errors."""
    student = pruned.clone()
    weights = {name: tensor.detach().clone().requires_grad_(tensor.is_floating_point())
               for name, tensor in student.weights().items()}
    for name, tensor in weights.items():
        _set_attr(student.module, name, tensor)
    trainable = [t for t in weights.values() if t.requires_grad]
    views = [(view, rows, sorted({b.outputs[0] for b in teacher.blocks if len(b.outputs) == 1} &
                                 {n.name for n in view.graph.nodes}))
             for view, rows in variant_views(student, batch)]
    optimizer = torch.optim.Adam(trainable, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    checks = set(np.linspace(0, steps, RECOVERY_CHECKS + 1).round().astype(int)[1:].tolist())
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    if validation is not None:
        start_error = plan_error(student, validation)
        best = (start_error, 0, {name: t.detach().clone() for name, t in weights.items()})
    for step in progress(range(steps), show_progress, f"{label}: recovery", "step"):
        view, rows, boundaries = views[step % len(views)]
        flat = _recovery_call(batch, rows, rows_per_step, generator)
        with torch.no_grad():
            target_features: dict[str, torch.Tensor] = {}
            target = Observer(teacher.module, set(boundaries), target_features.__setitem__).run(*flat)
        features: dict[str, torch.Tensor] = {}
        output = Observer(view.module, set(boundaries), features.__setitem__).run(*flat)
        terms = [_normalized_error(first_output(output), first_output(target))]
        terms += [_normalized_error(features[n], target_features[n]) for n in boundaries if n in features]
        loss = torch.stack(terms).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if best is not None and step + 1 in checks:
            error = plan_error(student, validation)
            if error < best[0]:
                best = (error, step + 1, {name: t.detach().clone() for name, t in weights.items()})
    kept = {name: t.detach() for name, t in weights.items()} if best is None else best[2]
    for name, tensor in kept.items():
        _set_attr(student.module, name, tensor)
    summary: dict[str, Any] = {"first": round(losses[0], 6), "last": round(losses[-1], 6), "steps": steps,
                               "rows": len(batch.row_steps)}
    if best is not None:
        summary["validation_error"] = {"start": round(start_error, 6), "kept": round(best[0], 6),
                                       "kept_after_step": best[1]}
    return student, summary


def variant_views(dg: DiffusionGraph, batch: CalibrationBatch) -> list[tuple[DiffusionGraph, torch.Tensor]]:
    """(graph, calibration rows) per variant of a step plan of bypass regions that the calibrated
    steps run: a copy of the graph (reading the same weight tensors) with that variant's skipped
    regions bypassed, and the rows of the steps scheduled to it. Without a step plan, the graph
    itself on every row."""
    if not dg.step_plan:
        return [(dg, torch.ones(len(batch.row_steps), dtype=torch.bool, device="cpu"))]
    views = []
    for variant, rows in rows_by_variant(build_plan(dg).schedule, batch).items():
        view = dg.clone()
        view.step_plan = None
        nodes = {n.name: n for n in view.graph.nodes}
        order = {n: i for i, n in enumerate(view.graph.nodes)}
        bypassed: dict[torch.fx.Node, torch.fx.Node] = {}
        cuts = sorted(((cut, region.bases[cut]) for name in dg.step_plan.variants[variant]
                       for region in [dg.step_plan.region(name)] for cut in region.cuts), key=lambda c: order[nodes[c[0]]])
        for cut, base in cuts:
            source = nodes[base]
            while source in bypassed:
                source = bypassed[source]
            nodes[cut].replace_all_uses_with(source)
            bypassed[nodes[cut]] = source
        view.module.recompile()
        views.append((view, rows))
    return views


def _recovery_call(batch: CalibrationBatch, rows: torch.Tensor, rows_per_step: int,
                   generator: torch.Generator) -> list[torch.Tensor]:
    calls = batch.calls(rows)
    if len(calls) > 1:
        return calls[int(torch.randint(len(calls), (1,), generator=generator, device="cpu"))]
    count = calls[0][0].shape[0]
    pick = torch.randperm(count, generator=generator, device="cpu")[:rows_per_step]
    return [t[pick] for t in calls[0]]


def _normalized_error(value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (value - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-12)


def _set_attr(module: torch.nn.Module, target: str, value: torch.Tensor) -> None:
    *path, name = target.split(".")
    owner = module
    for part in path:
        owner = getattr(owner, part)
    if name in owner._parameters:
        del owner._parameters[name]
    owner._buffers.pop(name, None)
    owner.register_buffer(name, value)
