"""The user's sampling loop, identified from the calls a calibration set recorded (replay.py
re-runs it with a candidate denoiser in it).

Deterministic samplers (DDIM, DPM-Solver++, UniPC, Euler, flow-matching Euler, with or without
classifier-free guidance) turn the denoiser's outputs into the next latent by a per-step affine
map: x[k+1] = a_k * x[k] + sum over lags l and members r of b_klr * out[k-l][r], where x[k] is
the latent the denoiser received at step k, and out[k][r] the output of member r of that latent's
rows (two members for the conditional and unconditional rows of guidance, batched or called
separately). The map is fitted per step by least squares, the next call's latent being the
target; a loop whose residual is too large is named stochastic (white noise each step, as in
ancestral and SDE samplers) or non-affine (clipping, thresholding)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from .store import CalibrationError, CalibrationSet, Record

# relative squared residual under which a step is the affine map (float32 rounding is ~1e-14 and
# bfloat16 latents ~1e-6; the noise of an ancestral step is orders of magnitude above)
AFFINE_RESIDUAL = 1e-4
MAX_HISTORY = 3
# a lag is kept when it removes at least half of the remaining residual
LAG_GAIN = 0.5
# a clipping loop leaves at least this share of a step's elements on its affine map; fitted
# "exactly" means to float32 rounding
TRIMMED_SHARES = (0.5, 0.25, 0.1)
TRIMMED_ROUNDS = 4
EXACT_RESIDUAL = 1e-9
RANK_TOLERANCE = 1e-10
# an element the unclipped map misses by more than this share of the latent's RMS was clipped
CLIPPED_ELEMENT = 1e-5
LATENT_NAMES = ("sample", "hidden_states", "x", "latents", "latent", "z")


@dataclass(frozen=True)
class StepMap:
    """x[k+1] = sum over lags l of (latents[l] * x[k-l] + sum over members r of outputs[l][r] * out[k-l][r]);
    `residual` is the fit's squared error over the target's mean square."""

    latents: tuple[float, ...]
    outputs: tuple[tuple[float, ...], ...]
    residual: float
    # where the loop clips: the map of clipped elements, same layout, and its offset (+ for
    # elements clipped one way, - the other)
    clipped: "StepMap | None" = None
    clip_offset: float = 0.0

    def apply(self, k: int, latents: list[torch.Tensor], outputs: list[torch.Tensor]) -> torch.Tensor:
        """The next latent from the loop's latents and outputs (by state and member) up to step k."""
        result = self._affine(k, latents, outputs)
        if self.clipped is None:
            return result
        return _clip(result, self.clipped._affine(k, latents, outputs), self.clip_offset)

    def _affine(self, k: int, latents: list[torch.Tensor], outputs: list[torch.Tensor]) -> torch.Tensor:
        result = torch.zeros_like(latents[k])
        for lag, (a, members) in enumerate(zip(self.latents, self.outputs)):
            result = result + a * latents[k - lag]
            for member, b in enumerate(members):
                result = result + b * outputs[k - lag][:, member]
        return result

    def to_json(self) -> dict[str, Any]:
        return {"latents": list(self.latents), "outputs": [list(o) for o in self.outputs], "residual": self.residual,
                "clipped": None if self.clipped is None else self.clipped.to_json(), "clip_offset": self.clip_offset}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "StepMap":
        clipped = data.get("clipped")
        return cls(tuple(data["latents"]), tuple(tuple(o) for o in data["outputs"]), data["residual"],
                   None if clipped is None else cls.from_json(clipped), data.get("clip_offset", 0.0))


@dataclass(frozen=True)
class SamplingLoop:
    """The identified loop. `kind`: "affine" (re-runs exactly), "stochastic" (re-runs with the
    recorded noise), "non-affine" (re-runs with the recorded correction to its affine part held
    fixed, which overstates a candidate's error where the loop clips) or "unidentified" (cannot be
    re-run; `reason` says why). `history`: how many earlier steps a map reads (multistep solvers).
    `final`: the last map leads to the final latents the recording was given; without them the
    loop ends at the latent entering its last step."""

    kind: str
    reason: str = ""
    latent: str = ""
    members: int = 1
    history: int = 0
    maps: tuple[StepMap, ...] = ()
    final: bool = False
    clipping: bool = False

    @property
    def usable(self) -> bool:
        return self.kind != "unidentified"

    @property
    def residual(self) -> float:
        return max((m.residual for m in self.maps), default=0.0)

    def guidance_weights(self, step: int) -> tuple[float, ...]:
        """How the loop combines the members' current outputs at `step`: each member's share of
        the lag-0 coefficients (e.g. (1 - g, g) for guidance scale g on (unconditional, conditional))."""
        lag0 = self.maps[min(step, len(self.maps) - 1)].outputs[0]
        total = sum(lag0)
        return tuple(b / total for b in lag0) if total else tuple(1.0 / len(lag0) for _ in lag0)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "reason": self.reason, "latent": self.latent, "members": self.members,
                "history": self.history, "final": self.final, "clipping": self.clipping,
                "maps": [m.to_json() for m in self.maps]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "SamplingLoop":
        maps = tuple(StepMap.from_json(m) for m in data["maps"])
        return cls(data["kind"], data["reason"], data["latent"], data["members"], data["history"], maps, data["final"],
                   data.get("clipping", False))


@dataclass
class LoopStep:
    """One step of one trajectory: its calls, which (state, member) each concatenated batch row
    is, the distinct latents (states) and the outputs per state and member."""

    calls: list[Record]
    rows: list[tuple[int, int]]
    states: torch.Tensor
    outputs: torch.Tensor


def latent_name(record: Record) -> str:
    """The input that carries the latent: the one shaped like the output (learned-variance models
    output twice the channels), by its usual name when several are."""
    def fits(tensor: torch.Tensor) -> bool:
        out = record.output
        if tensor.shape == out.shape:
            return True
        return tensor.dim() == out.dim() >= 2 and tensor.shape[0] == out.shape[0] \
            and tensor.shape[2:] == out.shape[2:] and out.shape[1] % tensor.shape[1] == 0
    candidates = [name for name, tensor in record.inputs.items() if tensor.is_floating_point() and fits(tensor)]
    if not candidates:
        raise CalibrationError("no recorded input is shaped like the denoiser's output, so the sampling loop's latent "
                               "cannot be told apart from the conditioning")
    return next((name for name in LATENT_NAMES if name in candidates), candidates[0])


def output_rows(output: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
    return output if output.shape == latent.shape else output[:, : latent.shape[1]]


def _step(calls: list[Record], latent: str) -> LoopStep:
    inputs = torch.cat([c.inputs[latent] for c in calls]).double()
    outputs = torch.cat([output_rows(c.output, c.inputs[latent]) for c in calls]).double()
    first_rows: list[int] = []
    rows: list[tuple[int, int]] = []
    members: list[int] = []
    for i in range(inputs.shape[0]):
        state = next((s for s, j in enumerate(first_rows) if torch.equal(inputs[i], inputs[j])), None)
        if state is None:
            state = len(first_rows)
            first_rows.append(i)
            members.append(0)
        rows.append((state, members[state]))
        members[state] += 1
    if len(set(members)) != 1:
        raise CalibrationError(f"the latents of one step come in groups of different sizes ({sorted(set(members))}); "
                               "the loop's rows cannot be paired")
    by_state = torch.stack([torch.stack([outputs[i] for i, (s, _) in enumerate(rows) if s == state])
                            for state in range(len(first_rows))])
    return LoopStep(calls, rows, inputs[first_rows], by_state)


def guidance_rows(record: Record, loop: SamplingLoop) -> list[tuple[int, float]] | None:
    """For a call that holds both guidance branches of every latent it carries (batched
    classifier-free guidance), each output row's latent (its index among the call's latents) and
    the weight the loop gives the row in the guided combination at the call's step; None for a loop
    without guidance pairs, a call holding one branch, or outputs shaped unlike the latent."""
    latent = record.inputs.get(loop.latent)
    if loop.members != 2 or not loop.usable or latent is None or record.output.shape != latent.shape:
        return None
    try:
        step = _step([record], loop.latent)
    except CalibrationError:
        return None
    if step.outputs.shape[1] != loop.members:
        return None
    weights = loop.guidance_weights(record.step)
    return [(state, weights[member]) for state, member in step.rows]


def recorded_trajectories(calibration: CalibrationSet, latent: str,
                  items: set[str] | None = None) -> Iterator[tuple[dict[str, Any], list[LoopStep]]]:
    """Each complete trajectory's steps, in order; refuses a set that skipped steps."""
    by_item: dict[str, list[Record]] = {}
    current: str | None = None
    item_info = {item["id"]: item for item in calibration.items}

    def steps_of(item: str) -> list[LoopStep]:
        records = by_item.pop(item)
        grouped: dict[int, list[Record]] = {}
        for record in records:
            grouped.setdefault(record.step, []).append(record)
        count = item_info[item]["num_steps"]
        if sorted(grouped) != list(range(count)):
            raise CalibrationError(f"trajectory {item} recorded steps {sorted(grouped)} of {count}; identifying the "
                                   "loop needs every step: record with timesteps='all'")
        return [_step(grouped[k], latent) for k in range(count)]

    for record in calibration.records(items=items):
        if current is not None and record.item != current:
            yield item_info[current], steps_of(current)
        current = record.item
        by_item.setdefault(record.item, []).append(record)
    if current is not None:
        yield item_info[current], steps_of(current)


def _regressors(steps: list[LoopStep], k: int, lags: int) -> torch.Tensor:
    """Columns x[k], out[k][r], x[k-1], out[k-1][r], ... (the lags available at step k), one row per element."""
    columns = []
    for lag in range(min(lags, k) + 1):
        step = steps[k - lag]
        columns.append(step.states.reshape(-1))
        columns.extend(step.outputs[:, member].reshape(-1) for member in range(step.outputs.shape[1]))
    return torch.stack(columns, dim=1)


def _targets(steps: list[LoopStep], final: torch.Tensor | None) -> list[torch.Tensor]:
    return [s.states for s in steps[1:]] + ([final.double()] if final is not None else [])


class _LeastSquares:
    """Least squares over rows that arrive in batches, kept as the R factor of their QR
    decomposition and Q^T y (the normal equations would square the condition number, and the
    guidance members' outputs are nearly collinear late in the loop). Fits on the leading columns
    read the leading block."""

    def __init__(self) -> None:
        self.r: torch.Tensor | None = None
        self.qty: torch.Tensor | None = None
        self.energy = 0.0

    def add(self, design: torch.Tensor, y: torch.Tensor) -> None:
        stacked = design if self.r is None else torch.cat([self.r, design])
        target = y if self.qty is None else torch.cat([self.qty, y])
        q, self.r = torch.linalg.qr(stacked)
        self.qty = q.T @ target
        self.energy += float(y @ y)

    def fit(self, width: int, members: int) -> StepMap:
        assert self.r is not None and self.qty is not None
        r, qty = self.r[:width, :width].cpu().numpy(), self.qty[:width].cpu().numpy()
        # rank-deficient with history: the latent at k is a combination of earlier latents and outputs
        beta = np.linalg.lstsq(r, qty, rcond=RANK_TOLERANCE)[0]
        residual = self.energy - float(qty @ qty) + float(np.sum((r @ beta - qty) ** 2))
        return _step_map(torch.from_numpy(beta), members, max(residual, 0.0) / max(self.energy, 1e-300))


def identify_loop(calibration: CalibrationSet, latent: str | None = None) -> SamplingLoop:
    """Fits the loop's per-step maps from every recorded trajectory (all must share the step
    count and the guidance layout). Never raises for a loop it cannot fit: the result names why."""
    finals = calibration.final_outputs()
    try:
        first = next(calibration.records(), None)
        if first is None:
            return SamplingLoop("unidentified", "the calibration set holds no calls")
        latent = latent or latent_name(first)
        # one least-squares problem per step, over every element of every trajectory
        problems: dict[int, _LeastSquares] = {}
        layout: tuple[int, int] | None = None
        use_final = bool(finals)
        for item, steps in recorded_trajectories(calibration, latent):
            members = steps[0].outputs.shape[1]
            if layout is None:
                layout = (len(steps), members)
            elif layout != (len(steps), members):
                return SamplingLoop("unidentified", f"trajectories differ in steps or guidance layout ({layout} and "
                                    f"{(len(steps), members)}); record one kind of loop per set", latent)
            final = finals.get(item["id"])
            use_final = use_final and final is not None and final.shape == steps[-1].states.shape
            for k, target in enumerate(_targets(steps, final if use_final else None)):
                problems.setdefault(k, _LeastSquares()).add(_regressors(steps, k, MAX_HISTORY), target.reshape(-1))
    except CalibrationError as error:
        return SamplingLoop("unidentified", str(error), latent or "")
    if layout is None or layout[0] < 2:
        return SamplingLoop("unidentified", "the recorded loops have a single step: there is no update to fit")
    count = layout[0] if use_final else layout[0] - 1
    members = layout[1]

    def fit(lags: int) -> list[StepMap]:
        widths = [(1 + members) * (min(lags, k) + 1) for k in range(count)]
        return [problems[k].fit(w, members) for k, w in enumerate(widths)]

    def mean_residual(maps: list[StepMap]) -> float:
        return float(np.mean([m.residual for m in maps]))

    history, maps = 0, fit(0)
    while history < MAX_HISTORY and mean_residual(maps) > 1e-12:
        longer = fit(history + 1)
        if mean_residual(longer) >= LAG_GAIN * mean_residual(maps):
            break
        history, maps = history + 1, longer
    loop = SamplingLoop("affine", "", latent, members, history, tuple(maps), use_final)
    if loop.residual <= AFFINE_RESIDUAL:
        return loop
    return _explain_residual(calibration, loop)


def step_residuals(loop: SamplingLoop, steps: list[LoopStep], final: torch.Tensor | None) -> list[torch.Tensor]:
    """What the fitted maps leave unexplained at each step of one recorded trajectory."""
    latents, outputs = [s.states for s in steps], [s.outputs for s in steps]
    targets = _targets(steps, final if loop.final else None)
    return [target - loop.maps[k].apply(k, latents, outputs) for k, target in enumerate(targets[: len(loop.maps)])]


def _explain_residual(calibration: CalibrationSet, loop: SamplingLoop) -> SamplingLoop:
    """A loop that clips or thresholds follows its affine map exactly wherever the non-linearity
    is inactive: a trimmed refit on the elements it fits best finds a share fitted exactly (in
    steps where not nearly everything is clipped), and those maps (not the least-squares ones,
    which the clipped elements bias) are kept. Fresh noise (ancestral, SDE samplers) touches every
    element: no share fits exactly."""
    finals = calibration.final_outputs()
    failing = [k for k, m in enumerate(loop.maps) if m.residual > AFFINE_RESIDUAL]
    designs: dict[int, list[torch.Tensor]] = {k: [] for k in failing}
    targets: dict[int, list[torch.Tensor]] = {k: [] for k in failing}
    for item, steps in recorded_trajectories(calibration, loop.latent):
        final = finals.get(item["id"]) if loop.final else None
        for k, target in enumerate(_targets(steps, final)):
            if k in designs:
                designs[k].append(_regressors(steps, k, loop.history))
                targets[k].append(target.reshape(-1))
    maps = list(loop.maps)
    exact_shares = []
    for k in failing:
        design, y = torch.cat(designs[k]), torch.cat(targets[k])
        refit, share = _trimmed_fit(design, y, loop.members)
        exact_shares.append(share)
        if refit is not None:
            maps[k] = _clip_fit(design, y, refit, loop.members)
    worst = int(np.argmax([m.residual for m in loop.maps]))
    summary = (f"the best affine fit leaves {loop.residual:.2e} of step {worst}'s update unexplained; in the steps "
               f"it misses, up to {max(exact_shares):.0%} of the elements follow one affine map exactly")
    if max(exact_shares) >= TRIMMED_SHARES[-1]:
        if all(maps[k].residual <= AFFINE_RESIDUAL for k in failing):
            return SamplingLoop("non-affine", summary + " and the rest one clipped map: the loop clips an affine "
                                "combination of them (clip_sample), which the re-run reproduces", loop.latent,
                                loop.members, loop.history, tuple(maps), loop.final, clipping=True)
        return SamplingLoop("non-affine", summary + ": the loop transforms latents non-linearly where they leave a "
                            "range (clipping or thresholding). Steps where enough elements stay in range are re-run "
                            "with the clipping modelled; the others with the correction held at its recorded value, "
                            "which overstates a candidate's error", loop.latent, loop.members, loop.history,
                            tuple(maps), loop.final)
    return SamplingLoop("stochastic", summary + ": fresh noise each step, as in ancestral and SDE samplers; it is "
                        "re-run with the noise the recorded trajectory drew", loop.latent, loop.members, loop.history,
                        loop.maps, loop.final)


def _clip_fit(design: torch.Tensor, y: torch.Tensor, unclipped: StepMap, members: int) -> StepMap:
    """`unclipped` with the map of the elements it misses, when one affine map plus an offset signed
    by the miss fits them exactly (clipping an affine combination to a symmetric range)."""
    beta = _coefficients(unclipped, design.device)
    miss = y - design @ beta
    clipped = miss.abs() > CLIPPED_ELEMENT * y.pow(2).mean().sqrt()
    if int(clipped.sum()) <= design.shape[1] + 1:
        return unclipped
    features = torch.cat([design[clipped], miss[clipped].sign().unsqueeze(1)], dim=1)
    solution = torch.linalg.lstsq(features, y[clipped].unsqueeze(1)).solution.squeeze(1)
    offset = float(solution[-1])
    predicted = _clip(design @ beta, design @ solution[:-1], offset)
    residual = float((y - predicted).pow(2).sum() / y.pow(2).sum().clamp_min(1e-300))
    if residual >= unclipped.residual:
        return unclipped
    return StepMap(unclipped.latents, unclipped.outputs, residual, _step_map(solution[:-1], members, 0.0), offset)


def _clip(affine: torch.Tensor, saturated: torch.Tensor, offset: float) -> torch.Tensor:
    """Clipping an affine combination x0 to [-s, s]: the clipped map departs from the affine one,
    with the sign of its offset, exactly where x0 leaves the range (and at most one way)."""
    return affine + (saturated + offset - affine).clamp_min(0) + (saturated - offset - affine).clamp_max(0)


def _coefficients(step_map: StepMap, device: torch.device) -> torch.Tensor:
    return torch.tensor([c for a, members in zip(step_map.latents, step_map.outputs) for c in (a, *members)],
                        dtype=torch.float64, device=device)


def _trimmed_fit(design: torch.Tensor, y: torch.Tensor, members: int) -> tuple[StepMap | None, float]:
    """The largest share of elements (of TRIMMED_SHARES) one affine map fits exactly, refitting on
    the best-fitted elements a few times; the map fitted on them, or None when no share fits."""
    beta = torch.linalg.lstsq(design, y.unsqueeze(1)).solution.squeeze(1)
    for share in TRIMMED_SHARES:
        keep_count = max(int(share * y.numel()), design.shape[1] + 1)
        current = beta
        for _ in range(TRIMMED_ROUNDS):
            kept = (y - design @ current).abs().argsort()[:keep_count]
            current = torch.linalg.lstsq(design[kept], y[kept].unsqueeze(1)).solution.squeeze(1)
        kept_design, kept_y = design[kept], y[kept]
        residual = float((kept_y - kept_design @ current).pow(2).sum() / kept_y.pow(2).sum().clamp_min(1e-300))
        if residual <= EXACT_RESIDUAL:
            full = float((y - design @ current).pow(2).sum() / y.pow(2).sum().clamp_min(1e-300))
            return _step_map(current, members, full), share
    return None, 0.0


def _step_map(beta: torch.Tensor, members: int, residual: float) -> StepMap:
    block = 1 + members
    lags = beta.numel() // block
    return StepMap(tuple(float(beta[lag * block]) for lag in range(lags)),
                   tuple(tuple(float(b) for b in beta[lag * block + 1: (lag + 1) * block]) for lag in range(lags)),
                   residual)


def sampling_loop(calibration: CalibrationSet, latent: str | None = None) -> SamplingLoop:
    """The calibration set's identified loop, fitted once and kept in its manifest."""
    kept = calibration.manifest.get("loop")
    if kept is not None and (latent is None or kept["latent"] == latent):
        return SamplingLoop.from_json(kept)
    loop = identify_loop(calibration, latent)
    calibration.keep("loop", loop.to_json())
    return loop
