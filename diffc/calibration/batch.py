"""The evaluation harness of the graph-rewriting passes: recorded calls stacked into batches with a
reference graph's outputs on them (`CalibrationBatch`), the relative error of a candidate graph,
step-planned or not, on those calls (`plan_error`), and the split of a loop's steps into ranges."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from ..errors import PassError
from ..ir import DiffusionGraph
from ..ir.partition import build_plan


class CalibrationBatch:
    """Up to `max_records` recorded calls (all of them with None) spread evenly over the steps, of
    the trajectories `items` (all with None), stacked into batches, with the outputs of a reference
    graph on them: errors of candidates are relative MSE against it."""

    def __init__(self, calibration: Any, reference: DiffusionGraph, max_records: int | None,
                 items: set[str] | None = None) -> None:
        records = list(calibration.records(items=items))
        if not records:
            raise PassError("the calibration set holds no recorded calls; collect it again")
        if max_records is not None and len(records) > max_records:
            keep = np.linspace(0, len(records) - 1, max_records).round().astype(int)
            records = [records[i] for i in sorted(set(keep.tolist()))]
        self.num_steps = max(r.num_steps for r in records)
        names = [spec.name for spec in reference.signature.inputs]
        flat = [[r.inputs[n] for n in names] for r in records]
        rows = [r.inputs[names[0]].shape[0] for r in records]
        self.row_steps = torch.tensor([r.step for r, n in zip(records, rows) for _ in range(n)], device="cpu")
        timestep = reference.signature.timestep
        per_row = [r.inputs[timestep.name].double().reshape(-1) for r in records] if timestep is not None else []
        self.row_timesteps = torch.cat([t.expand(n) if t.numel() == 1 else t for t, n in zip(per_row, rows)]) \
            if per_row and all(t.numel() in (1, n) for t, n in zip(per_row, rows)) else None
        stacked = [torch.cat(parts) for parts in zip(*flat)]
        try:
            with torch.no_grad():
                self.reference = first_output(reference.module(*stacked))
            self.batches = [stacked]
        except Exception:  # noqa: BLE001 - a graph captured with a pinned batch takes one call at a time
            self.batches = flat
            self.reference = self.outputs(reference.module)
        # each row is measured against its own call's mean square (calibration.relative_error)
        self.energy = torch.cat([part.double().pow(2).mean().clamp_min(1e-20).expand(part.shape[0])
                                 for part in self.reference.split(rows)])

    def outputs(self, run: Callable[..., Any]) -> torch.Tensor:
        results = []
        with torch.no_grad():
            for batch in self.batches:
                out = run(*batch)
                results.append(out[0] if isinstance(out, (tuple, list)) else out)
        return torch.cat(results)

    def row_errors(self, output: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Per calibration row (of `mask`, all by default): MSE against the reference, relative to
        the mean square of the reference call the row belongs to."""
        reference, energy = (self.reference, self.energy) if mask is None else (self.reference[mask], self.energy[mask])
        diff = (output.double() - reference.double()).pow(2)
        return diff.reshape(diff.shape[0], -1).mean(dim=1) / energy

    def mean_error(self, row_errors: torch.Tensor, mask: torch.Tensor | None = None) -> float:
        """The relative error every pass reports (calibration.relative_error): per step the mean over
        its rows (of `mask`), then the mean over steps."""
        steps = self.row_steps if mask is None else self.row_steps[mask]
        errors = row_errors if mask is None else row_errors[mask]
        per_step = [errors[steps == step].mean() for step in steps.unique()]
        return float(torch.stack(per_step).mean()) if per_step else 0.0

    def error(self, run: Callable[..., Any], steps: set[int] | None = None) -> float:
        return self.mean_error(self.row_errors(self.outputs(run)), None if steps is None else self.step_mask(steps))

    def step_mask(self, steps: set[int]) -> torch.Tensor:
        return torch.tensor([int(s) in steps for s in self.row_steps], device="cpu")

    def calls(self, mask: torch.Tensor) -> list[list[torch.Tensor]]:
        """The flat inputs of the rows in `mask`, as calls the graph accepts (in row order)."""
        if len(self.batches) == 1:
            return [[t[mask] for t in self.batches[0]]]
        calls, start = [], 0
        for flat in self.batches:
            rows = flat[0].shape[0]
            if bool(mask[start:start + rows].all()):
                calls.append(flat)
            start += rows
        return calls


def first_output(output: Any) -> torch.Tensor:
    """The first output of a graph that returns a tuple or list, or its only output."""
    return output[0] if isinstance(output, (tuple, list)) else output


def step_ranges(num_steps: int, groups: int) -> list[tuple[int, int]]:
    """`groups` contiguous ranges of steps [start, end) covering 0..num_steps."""
    groups = min(groups, num_steps)
    bounds = np.linspace(0, num_steps, groups + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def plan_error(dg: DiffusionGraph, batch: CalibrationBatch, steps: set[int] | None = None) -> float:
    """Relative output error of a (possibly step-planned) graph on the calibration rows, each row
    run through the variant its step is scheduled to."""
    if not dg.step_plan:
        return batch.error(dg.module, steps)
    plan = build_plan(dg)
    names = [spec.name for spec in dg.signature.inputs]
    errors = torch.zeros(len(batch.row_steps), dtype=torch.float64, device=batch.energy.device)
    measured = torch.zeros(len(batch.row_steps), dtype=torch.bool, device="cpu")
    for variant, mask in rows_by_variant(plan.schedule, batch, steps).items():
        outputs = []
        for flat in batch.calls(mask):
            with torch.no_grad():
                out, _ = plan.run(variant, dict(zip(names, flat)), {})
            outputs.append(out[0])
        errors[mask] = batch.row_errors(torch.cat(outputs), mask)
        measured |= mask
    return batch.mean_error(errors, measured)


def rows_by_variant(schedule: Any, batch: CalibrationBatch, steps: set[int] | None = None) -> dict[str, torch.Tensor]:
    """The calibration rows each variant of `schedule` runs (of the steps in `steps`, all by default)."""
    rows: dict[str, torch.Tensor] = {}
    for step in sorted(set(batch.row_steps.tolist())):
        if steps is not None and step not in steps:
            continue
        variant = schedule.variant_for(step, batch.num_steps)
        mask = batch.row_steps == step
        rows[variant] = rows[variant] | mask if variant in rows else mask
    return rows
