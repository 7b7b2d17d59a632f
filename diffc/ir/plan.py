"""The Plan: segments (subgraphs), variants (sequences of segments) and a step schedule.

Execution model: a variant runs its segments in order over an environment of named tensors,
seeded with the model's inputs (by TensorInput.name) and the persistent `state` (tensors kept
across denoising steps, e.g. cached features). Each segment reads `inputs` from the environment
and writes `outputs` into it; after the variant, the model's outputs are read from `outputs`
and every name in `state` is kept for the next step. Segments are shared between variants, so a
backend compiles each once and no weights are duplicated."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from ..errors import LintError
from .graph import DiffusionGraph
from .step_plan import ADAPTIVE, FULL, Schedule

OUTPUT_PREFIX = "output."
PROBE_STATE, SKIPPED_STATE, CHANGE_STATE = "adaptive.probe", "adaptive.skipped", "adaptive.change"
ADAPTIVE_STATE = (PROBE_STATE, SKIPPED_STATE, CHANGE_STATE)
PREVIOUS_SUFFIX = ".previous"
FORECAST_TIME, FORECAST_PREVIOUS_TIME = "forecast.time", "forecast.previous_time"


@dataclass
class Segment:
    name: str
    module: torch.fx.GraphModule
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class Variant:
    name: str
    segments: tuple[str, ...]


@dataclass
class Plan:
    graph: DiffusionGraph
    segments: dict[str, Segment]
    variants: dict[str, Variant]
    schedule: Schedule
    outputs: tuple[str, ...]
    state: tuple[str, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def single(cls, dg: DiffusionGraph) -> "Plan":
        """The plan of a graph with no step-dependent work: one segment, one variant."""
        outputs = tuple(OUTPUT_PREFIX + o.name for o in dg.signature.outputs)
        segment = Segment("main", dg.module, tuple(i.name for i in dg.signature.inputs), outputs)
        return cls(graph=dg, segments={"main": segment}, variants={FULL: Variant(FULL, ("main",))},
                   schedule=Schedule(default=FULL), outputs=outputs)

    def run(self, variant: str, inputs: dict[str, Any], state: dict[str, Any],
            runners: dict[str, Any] | None = None) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Runs one variant (or the adaptive choice between two): returns the model outputs and the
        state to keep for the next step. `runners` maps segment names to compiled callables
        (default: the segments' own graphs)."""
        env = dict(state)
        env.update(inputs)
        timestep = self._timestep(inputs) if self.schedule.forecast else None
        forecasts = self._forecast(state, timestep) if timestep is not None else {}
        env.update(forecasts)
        done: tuple[str, ...] = ()
        if variant == ADAPTIVE:
            variant, done = self._adapt(env, runners)
        for name in self.variants[variant].segments:
            if name not in done:
                self.run_segment(name, env, runners)
        kept = {name: env[name] for name in self.state if name in env}
        if timestep is not None:
            kept = self._history(kept, env, state, forecasts, timestep)
        return tuple(env[name] for name in self.outputs), kept

    def lacks_state(self, variant: str, state: dict[str, Any]) -> bool:
        """Whether `variant` reads cross-step tensors that `state` does not hold (e.g. freed when
        its loop ended). An adaptive step checks its cache itself."""
        if variant == ADAPTIVE or variant not in self.variants:
            return False
        available = {i.name for i in self.graph.signature.inputs} | set(state)
        for name in self.variants[variant].segments:
            segment = self.segments[name]
            if any(i not in available for i in segment.inputs):
                return True
            available |= set(segment.outputs)
        return False

    # --- Taylor forecasting of cached tensors -----------------------------------------------------
    def _cached_names(self) -> list[str]:
        return [name for name in self.state if name not in ADAPTIVE_STATE]

    def _timestep(self, inputs: dict[str, Any]) -> torch.Tensor | None:
        """The call's timestep as a 0-d float64 tensor where it is (reading it on the host would
        wait for the device)."""
        spec = self.graph.signature.timestep
        value = inputs.get(spec.name) if spec is not None else None
        return value.reshape(-1)[0].to(torch.float64) if isinstance(value, torch.Tensor) else None

    def _forecast(self, state: dict[str, Any], timestep: torch.Tensor) -> dict[str, Any]:
        """Each cached tensor extrapolated to `timestep`, where two computed values are known (a
        segment that recomputes the tensor overwrites its forecast as usual). The coefficient is
        computed on the device; two computed values at one timestep extrapolate nothing."""
        last, before = state.get(FORECAST_TIME), state.get(FORECAST_PREVIOUS_TIME)
        if last is None or before is None:
            return {}
        span = last - before
        coefficient = torch.where(span != 0, (timestep - last) / torch.where(span != 0, span, 1.0), 0.0)
        forecasts = {}
        for name in self._cached_names():
            current, previous = state.get(name), state.get(name + PREVIOUS_SUFFIX)
            if isinstance(current, torch.Tensor) and isinstance(previous, torch.Tensor):
                forecasts[name] = current + (current - previous) * coefficient
        return forecasts

    def _history(self, kept: dict[str, Any], env: dict[str, Any], state: dict[str, Any],
                 forecasts: dict[str, Any], timestep: torch.Tensor) -> dict[str, Any]:
        """The state for the next step: computed tensors with their previous values and timesteps;
        where this step only used a forecast, the computed values stay as they were."""
        names = self._cached_names()
        recomputed = any(name in env and env[name] is not forecasts.get(name, state.get(name)) for name in names)
        history = {key: state[key] for key in state
                   if key.endswith(PREVIOUS_SUFFIX) or key in (FORECAST_TIME, FORECAST_PREVIOUS_TIME)}
        if not recomputed:
            kept.update({name: state[name] for name in names if name in state})
            return {**kept, **history}
        history = {name + PREVIOUS_SUFFIX: state[name] for name in names if name in state}
        history[FORECAST_TIME] = timestep
        if FORECAST_TIME in state:
            history[FORECAST_PREVIOUS_TIME] = state[FORECAST_TIME]
        return {**kept, **history}

    def run_segment(self, name: str, env: dict[str, Any], runners: dict[str, Any] | None) -> None:
        """Runs one segment on the named tensors of `env`, writing its outputs into it."""
        segment = self.segments[name]
        run = runners[name] if runners is not None else segment.module
        env.update(zip(segment.outputs, run(*[env[i] for i in segment.inputs])))

    def _adapt(self, env: dict[str, Any], runners: dict[str, Any] | None) -> tuple[str, tuple[str, ...]]:
        """Runs the segments both variants start with, then picks the cached variant or the full one
        by `adaptive_step`. The decision falls between segment calls, so static-graph backends keep
        static graphs, and it reads only a value the previous step computed, so the device's queue
        never drains. Returns the variant and the segments already run."""
        rule = self.schedule.adaptive
        if rule is None:
            raise LintError("an adaptive step needs schedule.adaptive (probe, threshold, variants)")
        full, cached = self.variants[rule["full"]].segments, self.variants[rule["cached"]].segments
        shared: list[str] = []
        for a, b in zip(full, cached):
            if a != b:
                break
            shared.append(a)
            self.run_segment(a, env, runners)
        has_cache = all(name in env for name in self._cached_names())
        reuse, update = adaptive_step(env, env[rule["probe"]], rule["threshold"], rule["max_skip"], has_cache)
        env.update(update)
        return rule["cached"] if reuse else rule["full"], tuple(shared)

    def check(self) -> None:
        """Every variant can run: each segment's inputs are produced before it is called."""
        problems = []
        for variant in self.variants.values():
            available = {i.name for i in self.graph.signature.inputs} | set(self.state)
            for name in variant.segments:
                segment = self.segments.get(name)
                if segment is None:
                    problems.append(f"variant {variant.name} calls unknown segment {name}")
                    continue
                missing = [i for i in segment.inputs if i not in available]
                if missing:
                    problems.append(f"variant {variant.name}: segment {name} needs {missing} before it runs")
                available |= set(segment.outputs)
            absent = [o for o in self.outputs if o not in available]
            if absent:
                problems.append(f"variant {variant.name} never produces {absent}")
        named = self.schedule.named_variants()
        if ADAPTIVE in self.schedule.steps and not (self.schedule.adaptive or {}).get("probe"):
            problems.append("the schedule has adaptive steps but no adaptive rule (probe, threshold, variants)")
        for step_variant in named:
            if step_variant not in self.variants:
                problems.append(f"schedule names unknown variant {step_variant}")
        if problems:
            raise LintError("plan is inconsistent:\n  - " + "\n  - ".join(problems))


class HostScalar:
    """A 0-d tensor the host reads a step after it is computed. On CUDA it is copied into pinned
    memory as soon as it is computed and `value()` waits for that copy alone (long finished by the
    next step), not for the work queued since; elsewhere it is read directly."""

    def __init__(self, value: torch.Tensor | float) -> None:
        self._event: Any = None
        if isinstance(value, torch.Tensor) and value.device.type == "cuda":
            self._value: torch.Tensor | float = torch.empty((), dtype=value.dtype, pin_memory=True)
            self._value.copy_(value.detach(), non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._value = value.detach() if isinstance(value, torch.Tensor) else value

    def value(self) -> float:
        if self._event is not None:
            self._event.synchronize()
        return float(self._value)


def relative_change(probe: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Relative L1 change of the probe since the reference (0-d, on the probe's device)."""
    return (probe - reference).float().abs().mean() / reference.float().abs().mean().clamp_min(1e-12)


def adaptive_step(state: Mapping[str, Any], probe: torch.Tensor, threshold: float, max_skip: int,
                  can_reuse: bool = True) -> tuple[bool, dict[str, Any]]:
    """One adaptive step: whether it reuses the cache, and the state entries it updates.

    A step reuses when the probe's change since the last full step, predicted one step ahead,
    stays within `threshold` (at most `max_skip` steps in a row). The prediction is made at the
    previous step from what it measured (its change since the last full step plus one step of
    that drift; after a full step, the drift per step measured when it was recomputed), so the
    decision never waits for this step's probe: on a GPU nothing is read back within a step. The
    first two steps of a loop compute in full (no drift is known before)."""
    reference = state.get(PROBE_STATE)
    skipped = int(state.get(SKIPPED_STATE, 0))
    predicted = state.get(CHANGE_STATE)
    reuse = (can_reuse and reference is not None and predicted is not None and skipped < max_skip
             and predicted.value() <= threshold)
    if reference is None:
        return False, {PROBE_STATE: probe, SKIPPED_STATE: 0, CHANGE_STATE: None}
    change = relative_change(probe, reference)
    drift = change / (skipped + 1)  # per step since the last full step
    if reuse:
        return True, {SKIPPED_STATE: skipped + 1, CHANGE_STATE: HostScalar(change + drift)}
    return False, {PROBE_STATE: probe, SKIPPED_STATE: 0, CHANGE_STATE: HostScalar(drift)}


# the compile options a recompile of the same plan needs (a load, a replay, a move to another device)
RECOMPILE_OPTIONS = ("compile", "cuda_graphs")


def recompile_options(info: Mapping[str, Any]) -> dict[str, Any]:
    """The options among a compiled plan's `info` (the torch backend's) that compiling it again needs."""
    return {key: value for key, value in info.items() if key in RECOMPILE_OPTIONS}


@dataclass
class CompiledPlan:
    """What a backend makes of a Plan: one callable per segment (flat tensors in, tuple out),
    the device and dtype it runs in, and the files the backend wants saved with the artifact (whole;
    a backend may save them in a compact form, see ir.served_files).

    A backend whose compiled segments can take new values in place sets `refit` and `rescale`
    (None: the owner compiles the plan again instead). `refit(weights)` takes new values of some
    graph weights, by their graph weight names (only the changed ones; the plan's own modules
    already hold them); `rescale(specs)` takes new precision annotations (`{node: precision spec
    JSON}`) whose activation scales changed and nothing else. Both update `files` too, so a saved
    artifact holds the new values, and raise (TargetError) before changing anything when they
    cannot take a value in place."""

    plan: Plan
    runners: dict[str, Any]
    backend: str
    precision: str
    device: Any
    input_dtype: Any
    files: dict[str, bytes] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    refit: Callable[[Mapping[str, torch.Tensor]], None] | None = None
    rescale: Callable[[Mapping[str, Mapping[str, Any]]], None] | None = None
