"""How far a candidate denoiser is from the reference on calibration data: per step with the
recorded inputs (teacher-forced), on chosen intermediate tensors, and along whole trajectories
re-sampled with the candidate in the loop."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch

from ..ir import DiffusionGraph, StepTracker, find_denoiser
from .collect import call_pipeline
from .loop import sampling_loop
from .replay import LATENT_PEAK, final_error, loop_propagation_weights, replay_loop, step_perturbation
from .statistics import Observer
from .store import CalibrationError, CalibrationSet

HOLD_OUT_EVERY = 4


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    """One call's relative error: its MSE against the reference over the reference's mean square.
    Every pass reports the mean over steps of this error averaged over each step's calls, so one
    report's number can be compared with another's and with what the compiled model does."""
    reference = reference.double()
    return float((output.double() - reference).pow(2).mean() / reference.pow(2).mean().clamp_min(1e-20))


@dataclass
class StepErrors:
    """Mean squared error and relative error (`relative_error`, averaged over the step's calls) per step."""

    mse: dict[int, float]
    relative: dict[int, float]

    @property
    def mean_relative(self) -> float:
        return float(np.mean(list(self.relative.values()))) if self.relative else 0.0


def output_error(calibration: CalibrationSet, candidate: Callable[..., Any], dg: DiffusionGraph,
                 steps: set[int] | None = None) -> StepErrors:
    """Feeds each recorded call's inputs (flat, in `dg.signature` order) to `candidate` and compares
    its first output with the recorded reference output."""
    sums: dict[int, list[float]] = {}
    relative: dict[int, list[float]] = {}
    for record in calibration.records(steps=steps):
        flat = [record.inputs[spec.name] for spec in dg.signature.inputs]
        with torch.no_grad():
            out = candidate(*flat)
        out = out[0] if isinstance(out, (tuple, list)) else out
        diff = (out.double() - record.output.double()).pow(2).mean().item()
        sums.setdefault(record.step, []).append(diff)
        relative.setdefault(record.step, []).append(relative_error(out, record.output))
    return StepErrors(mse={s: float(np.mean(v)) for s, v in sorted(sums.items())},
                      relative={s: float(np.mean(v)) for s, v in sorted(relative.items())})


def node_error(calibration: CalibrationSet, reference: DiffusionGraph, candidate: DiffusionGraph,
               nodes: list[str], steps: set[int] | None = None) -> dict[str, float]:
    """Relative MSE of chosen intermediate tensors (by node name, present in both graphs)."""
    missing = [n for n in nodes if n not in {x.name for x in candidate.graph.nodes}]
    if missing:
        raise CalibrationError(f"candidate graph has no nodes {missing}")
    errors: dict[str, list[float]] = {n: [] for n in nodes}
    for record in calibration.records(steps=steps):
        flat = [record.inputs[spec.name] for spec in reference.signature.inputs]
        values: dict[str, dict[str, torch.Tensor]] = {"ref": {}, "cand": {}}
        for label, graph in (("ref", reference), ("cand", candidate)):
            sink = values[label]
            with torch.no_grad():
                Observer(graph.module, set(nodes), lambda n, v, sink=sink: sink.__setitem__(n, v)).run(*flat)
        for n in nodes:
            errors[n].append(relative_error(values["cand"][n], values["ref"][n]))
    return {n: float(np.mean(v)) for n, v in errors.items()}


@contextlib.contextmanager
def _swapped_denoiser(pipe: Any, module: torch.nn.Module) -> Iterator[None]:
    _, attribute = find_denoiser(pipe)
    original = getattr(pipe, attribute)
    setattr(pipe, attribute, module)
    try:
        yield
    finally:
        setattr(pipe, attribute, original)


def resampling(calibration: CalibrationSet) -> str | None:
    """How candidates can be judged on final outputs: "pipeline" (the live pipeline re-samples),
    "loop" (the sampling loop identified from the recorded calls re-runs), or None."""
    if calibration.pipeline is not None and calibration.replay is not None:
        return "pipeline"
    return "loop" if sampling_loop(calibration).usable else None


def split_items(calibration: CalibrationSet) -> tuple[set[str], set[str]]:
    """The trajectories a pass selects on and those it keeps back to verify its choice: every
    fourth one (at least one of two or more) is held out."""
    ids = [item["id"] for item in calibration.items]
    held_out = {item for i, item in enumerate(ids) if i % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1}
    if not held_out and len(ids) >= 2:
        held_out = {ids[-1]}
    return set(ids) - held_out, held_out


def trajectory_error(calibration: CalibrationSet, candidate: Callable[..., Any], items: set[str] | None = None,
                     reference: "ResampledReference | None" = None) -> dict[str, Any]:
    """Re-samples the calibration trajectories with `candidate` as the denoiser and compares the
    final outputs with the recorded ones (or, with `reference`, with those re-sampled by its
    denoiser): mean MSE and PSNR over trajectories. With the live pipeline the set was collected
    with, the pipeline re-samples from the recorded seeds and conditions (PSNR of outputs in
    [0, 1]); otherwise the loop identified from the recorded calls re-runs from the recorded
    starting latents (PSNR of latents as data in [-1, 1], LATENT_PEAK). `items` limits it to those
    trajectories (split_items)."""
    pairs, peak = _resampled(calibration, candidate, items)
    if reference is not None:
        baseline = reference.finals(calibration, set(pairs))
        pairs = {item: (produced, baseline[item]) for item, (produced, _) in pairs.items()}
    return final_error(pairs, peak)


class ResampledReference:
    """What a pass that follows lossy passes is judged against: the final outputs of the graph it
    received, re-sampled once per trajectory (same seeds, conditions and starting latents as the
    recorded ones), so that its floor bounds the error it adds rather than the error of the passes
    before it. `denoiser` builds that graph's denoiser on first use; `after` names those passes."""

    def __init__(self, denoiser: Callable[[], Any], after: list[str]) -> None:
        self.after, self.used = after, False
        self._denoiser, self._built, self._finals = denoiser, None, {}
        # fresh held-out draws' outputs (calibration.draws), by draw
        self.drawn: dict[Any, list[torch.Tensor]] = {}

    def denoiser(self) -> Any:
        """The received graph's denoiser, built on first use."""
        self.used = True
        self._built = self._built if self._built is not None else self._denoiser()
        return self._built

    def finals(self, calibration: CalibrationSet, items: set[str]) -> dict[str, torch.Tensor]:
        missing = items - set(self._finals)
        if missing:
            pairs, _ = _resampled(calibration, self.denoiser(), missing)
            self._finals.update({item: produced for item, (produced, _) in pairs.items()})
        return {item: self._finals[item] for item in items}


def _resampled(calibration: CalibrationSet, candidate: Callable[..., Any],
               items: set[str] | None) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """By item: (the candidate's re-sampled final output, the recorded one), and the PSNR peak."""
    pipe, replay = calibration.pipeline, calibration.replay
    if pipe is None or replay is None:
        loop = sampling_loop(calibration)
        if not loop.usable:
            raise CalibrationError(f"cannot re-sample the calibration trajectories: there is no live pipeline (a set "
                                   f"returned by collect(pipe, ...) in this process has one) and {loop.reason}")
        return replay_loop(calibration, loop, candidate, items), LATENT_PEAK
    finals = {k: v for k, v in calibration.final_outputs().items() if items is None or k in items}
    by_id = {item["id"]: item for item in calibration.items}
    pairs = {}
    with sampling_with(calibration, candidate):
        for item_id, recorded in finals.items():
            item = by_id[item_id]
            condition = replay["conditions"][item["condition_index"]]
            with torch.no_grad():
                result = call_pipeline(pipe, condition, calibration.settings["num_steps"], item["seed"],
                                       replay["call_kwargs"])
            pairs[item_id] = (as_tensor(result), recorded)
    return pairs, 1.0


@contextlib.contextmanager
def sampling_with(calibration: CalibrationSet, candidate: Any) -> Iterator[Any]:
    """The calibration set's live pipeline as it was collected (its scheduler), with `candidate`
    as the denoiser, restored afterwards."""
    pipe, replay = calibration.pipeline, calibration.replay
    assert pipe is not None and replay is not None
    original_scheduler = pipe.scheduler
    if replay["scheduler"] is not None:
        pipe.scheduler = replay["scheduler"]
    try:
        with _swapped_denoiser(pipe, candidate):
            yield pipe
    finally:
        pipe.scheduler = original_scheduler


def as_tensor(result: Any) -> torch.Tensor:
    images = getattr(result, "images", None)
    if images is None:
        images = result[0] if isinstance(result, (tuple, list)) else result
    return images if isinstance(images, torch.Tensor) else torch.as_tensor(np.asarray(images, dtype=np.float32))


def propagation_weights(calibration: CalibrationSet, relative_size: float = 0.01,
                        denoiser: Callable[..., Any] | None = None) -> list[float] | None:
    """How strongly an error in the denoiser's output at each step reaches the final output:
    w[j] = MSE(final change) / MSE(perturbation) when a small random perturbation is added to
    the output at step j only, measured by re-running the sampler of the first trajectory.
    Covers the scheduler's coefficients and guidance. Without a live pipeline, the identified loop
    re-runs with `denoiser` (the unmodified model) instead; None when neither can."""
    pipe, replay = calibration.pipeline, calibration.replay
    if not calibration.items:
        return None
    if pipe is None or replay is None:
        loop = sampling_loop(calibration)
        if denoiser is None or not loop.usable:
            return None
        return loop_propagation_weights(calibration, loop, denoiser, relative_size)
    item = calibration.items[0]
    condition = replay["conditions"][item["condition_index"]]
    num_steps = calibration.settings["num_steps"]
    denoiser, _ = find_denoiser(pipe)

    def run(step: int | None) -> tuple[torch.Tensor, float]:
        tracker = StepTracker()
        injected: list[float] = []

        def perturb(module: Any, args: Any, kwargs: Any, output: Any) -> Any:
            tracker.observe(_timestep_of(args, kwargs))
            if tracker.step != step:
                return output
            tensor = output[0] if isinstance(output, tuple) else output.sample
            noise = step_perturbation(tensor, step, relative_size)
            injected.append(float(noise.double().pow(2).mean()))
            if isinstance(output, tuple):
                return (tensor + noise, *output[1:])
            output.sample = tensor + noise
            return output

        handle = denoiser.register_forward_hook(perturb, with_kwargs=True)
        try:
            with torch.no_grad():
                result = call_pipeline(pipe, condition, num_steps, item["seed"], replay["call_kwargs"])
        finally:
            handle.remove()
        return as_tensor(result).double(), (injected[0] if injected else 0.0)

    clean, _ = run(None)
    weights = []
    for step in range(num_steps):
        final, injected = run(step)
        weights.append(float((final - clean).pow(2).mean()) / injected if injected else 0.0)
    return weights


def _timestep_of(args: Any, kwargs: dict[str, Any]) -> float | None:
    value = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    if isinstance(value, torch.Tensor):
        return float(value.reshape(-1)[0])
    return float(value) if isinstance(value, (int, float)) else None
