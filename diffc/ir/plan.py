"""The Plan: segments (subgraphs), variants (sequences of segments) and a step schedule.

Execution model: a variant runs its segments in order over an environment of named tensors,
seeded with the model's inputs (by TensorInput.name) and the persistent `state` (tensors kept
across denoising steps, e.g. cached features). Each segment reads `inputs` from the environment
and writes `outputs` into it; after the variant, the model's outputs are read from `outputs`
and every name in `state` is kept for the next step. Segments are shared between variants, so a
backend compiles each once and no weights are duplicated."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.fx

from ..errors import LintError
from .graph import DiffusionGraph

OUTPUT_PREFIX = "output."


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


@dataclass(frozen=True)
class Schedule:
    """Which variant runs at each step of a denoising loop.

    With `repeat`, `steps` is a pattern repeated over the loop (a uniform interval does not depend
    on the step count). Otherwise `steps[i]` is the variant of step i of a loop of len(steps)
    steps; a loop of another length is mapped onto it by position in the trajectory. With no
    `steps`, every step runs `default`."""

    default: str
    steps: tuple[str, ...] = ()
    repeat: bool = False

    def variant_for(self, step: int, num_steps: int | None = None) -> str:
        if not self.steps or step < 0:
            return self.default
        if self.repeat:
            return self.steps[step % len(self.steps)]
        if num_steps and num_steps != len(self.steps):
            step = round(step * (len(self.steps) - 1) / max(num_steps - 1, 1))
        return self.steps[step] if step < len(self.steps) else self.default

    def to_json(self) -> dict[str, Any]:
        return {"default": self.default, "steps": list(self.steps), "repeat": self.repeat}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Schedule":
        return cls(default=data["default"], steps=tuple(data["steps"]), repeat=data.get("repeat", False))


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
        return cls(graph=dg, segments={"main": segment}, variants={"full": Variant("full", ("main",))},
                   schedule=Schedule(default="full"), outputs=outputs)

    def run(self, variant: str, inputs: dict[str, Any], state: dict[str, Any],
            runners: dict[str, Any] | None = None) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Runs one variant: returns the model outputs and the state to keep for the next step.
        `runners` maps segment names to compiled callables (default: the segments' own graphs)."""
        env = dict(state)
        env.update(inputs)
        for name in self.variants[variant].segments:
            segment = self.segments[name]
            run = runners[name] if runners is not None else segment.module
            env.update(zip(segment.outputs, run(*[env[i] for i in segment.inputs])))
        return tuple(env[name] for name in self.outputs), {name: env[name] for name in self.state if name in env}

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
        for step_variant in {self.schedule.default, *self.schedule.steps}:
            if step_variant not in self.variants:
                problems.append(f"schedule names unknown variant {step_variant}")
        if problems:
            raise LintError("plan is inconsistent:\n  - " + "\n  - ".join(problems))


@dataclass
class CompiledPlan:
    """What a backend makes of a Plan: one callable per segment (flat tensors in, tuple out),
    the device and dtype it runs in, and the files the backend wants saved with the artifact."""

    plan: Plan
    runners: dict[str, Any]
    backend: str
    precision: str
    device: Any
    input_dtype: Any
    files: dict[str, bytes] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
