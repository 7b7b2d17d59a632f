"""Re-running an identified sampling loop (loop.py) with a candidate denoiser in it: from the
recorded starting latents, with the recorded conditioning and timesteps, several trajectories per
call. What passes measure with it: final-latent error, the guidance signal a candidate keeps, and
how strongly an error at each step reaches the end."""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch

from ..errors import InputError
from .collect import output_tensor
from .loop import LoopStep, SamplingLoop, output_rows, recorded_trajectories, step_residuals
from .store import CalibrationError, CalibrationSet, call_arguments

REPLAY_BATCH = 8
# Final latents are scored as images of data normalized to [-1, 1], the range diffusion models are
# trained on (a pixel-space sample's image in [0, 1] is (x + 1) / 2), so the PSNR matches the one a
# live pipeline measures on its images. A trajectory's own range overstated it by 2-4 dB on models
# whose samples overshoot [-1, 1] before the image is clipped.
LATENT_PEAK = 2.0


def replay_loop(calibration: CalibrationSet, loop: SamplingLoop, candidate: Callable[..., Any],
                items: set[str] | None = None,
                perturb: Callable[[int, torch.Tensor], torch.Tensor] | None = None
                ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Re-runs each recorded trajectory from its recorded starting latents with `candidate` in the
    loop: by item id, (the candidate's final latents, the recorded ones). Each call gets the
    recorded conditioning and timestep and the candidate's own latent. Trajectories that call the
    denoiser alike (timesteps, calls per step, input shapes) run together, REPLAY_BATCH at a time,
    their rows concatenated in one call. `perturb(k, outputs)` may change the outputs of step k
    (by state and member) before the loop uses them."""
    if not loop.usable:
        raise CalibrationError(f"the recorded sampling loop cannot be re-run: {loop.reason}")
    finals = calibration.final_outputs()
    groups: dict[Any, list[tuple[dict[str, Any], list[LoopStep]]]] = {}
    for item, steps in recorded_trajectories(calibration, loop.latent, items):
        groups.setdefault(_call_pattern(steps), []).append((item, steps))
    results = {}
    for members in groups.values():
        for start in range(0, len(members), REPLAY_BATCH):
            batch = members[start: start + REPLAY_BATCH]
            noises = [step_residuals(loop, steps, finals.get(item["id"])) if _holds_residual(loop) else None
                      for item, steps in batch]
            latents = [[steps[0].states] for _, steps in batch]
            produced: list[list[torch.Tensor]] = [[] for _ in batch]
            for k, step_map in enumerate(loop.maps):
                outputs = _run_step(candidate, [steps[k] for _, steps in batch], [x[k] for x in latents], loop.latent)
                for j, noise in enumerate(noises):
                    produced[j].append(outputs[j] if perturb is None else perturb(k, outputs[j]))
                    latents[j].append(step_map.apply(k, latents[j], produced[j]) + (noise[k] if noise else 0))
            for j, (item, steps) in enumerate(batch):
                final = finals.get(item["id"])
                reference = final.double() if loop.final and final is not None else steps[len(loop.maps)].states
                results[item["id"]] = (latents[j][-1], reference)
    return results


def _holds_residual(loop: SamplingLoop) -> bool:
    """Stochastic loops re-run with their recorded noise and non-affine ones with their recorded
    correction, unless the clipping is modelled."""
    return loop.kind != "affine" and not loop.clipping


def _call_pattern(steps: list[LoopStep]) -> tuple[Any, ...]:
    """What must match for trajectories to share calls: each call's timestep and input shapes."""
    return tuple((call.timestep, tuple((name, tuple(t.shape), t.dtype) for name, t in sorted(call.inputs.items())))
                 for step in steps for call in step.calls)


def _batched_inputs(calls: list[dict[str, torch.Tensor]], count: int) -> dict[str, torch.Tensor] | None:
    """The calls' inputs as one call: inputs with a batch dim (`count` rows) concatenated, those
    without one (FLUX's position ids, a scalar timestep) passed once when every call has the same;
    None when one of those differs."""
    joined = {}
    for name, first in calls[0].items():
        values = [inputs[name] for inputs in calls]
        if first.dim() and first.shape[0] == count:
            joined[name] = torch.cat(values)
        elif all(torch.equal(value, first) for value in values[1:]):
            joined[name] = first
        else:
            return None
    return joined


def _run_step(candidate: Callable[..., Any], steps: list[LoopStep], states: list[torch.Tensor],
              latent: str) -> list[torch.Tensor]:
    """The candidate's outputs at one step of several trajectories (by state and member), given
    each one's current states: each call of the step once, the trajectories' rows concatenated."""
    outputs = [torch.empty_like(step.outputs) for step in steps]
    row = 0
    for c, call in enumerate(steps[0].calls):
        count = call.inputs[latent].shape[0]
        placements = [step.rows[row: row + count] for step in steps]
        inputs = _batched_inputs([step.calls[c].inputs for step in steps], count)
        if inputs is None:  # an input without a batch dim differs between trajectories: one at a time
            return [_run_step(candidate, [step], [state], latent)[0] for step, state in zip(steps, states)]
        inputs[latent] = torch.cat([torch.stack([state[s] for s, _ in placed])
                                    for state, placed in zip(states, placements)]).to(call.inputs[latent].dtype)
        try:
            with torch.no_grad():
                out = output_rows(output_tensor(candidate(**call_arguments(inputs))), inputs[latent]).double()
        except InputError:
            if len(steps) == 1:
                raise
            # a candidate captured with its batch pinned takes one trajectory's rows at a time
            return [_run_step(candidate, [step], [state], latent)[0] for step, state in zip(steps, states)]
        for j, placed in enumerate(placements):
            for i, (s, member) in enumerate(placed):
                outputs[j][s, member] = out[j * count + i]
        row += count
    return outputs


def loop_error(calibration: CalibrationSet, loop: SamplingLoop, candidate: Callable[..., Any],
               items: set[str] | None = None) -> dict[str, Any]:
    """Final-latent error of the re-run loop against the recorded trajectories: mean MSE over
    trajectories, and its PSNR with LATENT_PEAK as the peak."""
    return final_error(replay_loop(calibration, loop, candidate, items), LATENT_PEAK)


def final_error(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], peak: float) -> dict[str, Any]:
    """Mean MSE over trajectories of (produced, reference) final outputs, its PSNR for `peak`, and
    each trajectory's PSNR."""
    mses = [float((produced.double() - reference.double()).pow(2).mean()) for produced, reference in pairs.values()]
    mse = float(np.mean(mses)) if mses else 0.0
    return {"mse": mse, "psnr": _psnr(mse, peak), "trajectories": len(mses),
            "trajectory_psnrs": [_psnr(m, peak) for m in mses]}


def merged_error(first: dict[str, Any], second: dict[str, Any], peak: float) -> dict[str, Any]:
    """final_error's figures over the trajectories of two final_error results together."""
    count = first["trajectories"] + second["trajectories"]
    mse = (first["mse"] * first["trajectories"] + second["mse"] * second["trajectories"]) / count if count else 0.0
    return {"mse": mse, "psnr": _psnr(mse, peak), "trajectories": count,
            "trajectory_psnrs": first.get("trajectory_psnrs", []) + second.get("trajectory_psnrs", [])}


def population_psnr(psnrs: list[float]) -> float | None:
    """The PSNR of the mean squared error over every sample like these, from per-trajectory PSNRs
    taken as normally distributed in dB (squared errors log-normal, as a few samples that change
    content make them): mean - (ln 10 / 20) x variance. A handful of trajectories rarely holds the
    sample that sets a batch's figure; their spread says how heavy that tail is. None with fewer
    than three finite figures (trajectories reproduced exactly add no error and are left out)."""
    finite = [p for p in psnrs if math.isfinite(p)]
    if len(finite) < 3:
        return None
    return float(np.mean(finite) - math.log(10) / 20 * np.var(finite, ddof=1))


def _psnr(mse: float, peak: float) -> float:
    return math.inf if mse == 0 else float(10 * np.log10(peak ** 2 / mse))


def guidance_loss(calibration: CalibrationSet, loop: SamplingLoop, candidate: Callable[..., Any],
                  items: set[str] | None = None) -> float | None:
    """The share of the guidance signal (conditional minus unconditional output, the members the
    loop weighs most and least) that `candidate` loses on the recorded calls: 1 - <d', d> / <d, d>
    over every step, d the recorded signal and d' the candidate's on the same inputs. Per-row
    errors hide it: the signal is small next to each row, and guidance amplifies it. None for a
    loop without guidance pairs."""
    if loop.members != 2 or not loop.usable:
        return None
    kept = energy = 0.0
    for _, steps in recorded_trajectories(calibration, loop.latent, items):
        for k, step in enumerate(steps[: len(loop.maps)]):
            weights = loop.guidance_weights(k)
            conditional, unconditional = int(np.argmax(weights)), int(np.argmin(weights))
            if conditional == unconditional:
                continue
            recorded = step.outputs[:, conditional] - step.outputs[:, unconditional]
            produced = _run_step(candidate, [step], [step.states], loop.latent)[0]
            signal = produced[:, conditional] - produced[:, unconditional]
            kept += float((signal * recorded).sum())
            energy += float(recorded.pow(2).sum())
    return None if energy == 0 else 1.0 - kept / energy


def step_perturbation(output: torch.Tensor, step: int, relative_size: float) -> torch.Tensor:
    """The random perturbation propagation weights add to the output of `step`: seeded by the
    step, `relative_size` of the output's standard deviation."""
    generator = torch.Generator().manual_seed(step)
    return torch.randn(output.shape, generator=generator, device="cpu").to(output) * output.std() * relative_size


def loop_propagation_weights(calibration: CalibrationSet, loop: SamplingLoop, denoiser: Callable[..., Any],
                             relative_size: float = 0.01) -> list[float]:
    """propagation_weights through the identified loop: w[j] = MSE(final change) / MSE(perturbation)
    when a small random perturbation is added to the outputs of step j only, re-running the first
    trajectory with `denoiser` (the unmodified model). Without recorded final latents the loop
    ends at its last call, so the last step's weight is taken from the step before."""
    first = {calibration.items[0]["id"]}
    clean = next(iter(replay_loop(calibration, loop, denoiser, first).values()))[0]
    weights = []
    for step in range(len(loop.maps)):
        injected: list[float] = []

        def add_noise(k: int, outputs: torch.Tensor, step: int = step) -> torch.Tensor:
            if k != step:
                return outputs
            noise = step_perturbation(outputs, step, relative_size)
            injected.append(float(noise.pow(2).mean()))
            return outputs + noise

        final = next(iter(replay_loop(calibration, loop, denoiser, first, add_noise).values()))[0]
        weights.append(float((final - clean).pow(2).mean()) / injected[0] if injected and injected[0] else 0.0)
    if not loop.final and weights:
        weights.append(weights[-1])
    return weights
