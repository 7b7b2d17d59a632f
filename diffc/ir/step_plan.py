"""The step plan: the step-dependent work of a graph, written by passes (cache, step-routed prune
and moe) and turned into a Plan of shared segments by `diffc.ir.partition.build_plan`.

A *region* is a part of the graph some steps skip, given by its cut nodes (see partition). A
*variant* is named by the regions it skips; the *schedule* says which variant runs at each step
of the calibrated loop and, once anchored, the timesteps of those steps. Everything here is
immutable: a pass builds a new StepPlan (`StepPlan.build`, `with_schedule`, `anchored`) and sets
it on its own copy of the graph; `lint` checks it against the graph it is set on."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from .._json import jsonable
from ..errors import LintError

FULL, CACHED = "full", "cached"
# a step scheduled as ADAPTIVE picks FULL or CACHED at run time (Schedule.adaptive holds the rule)
ADAPTIVE = "adaptive"
# What a region's skip does with its cuts: RAW reuses them from an earlier step; DELTA reuses the
# residual `cut - base`, added to the recomputed base; BYPASS passes the base on as the cut and
# keeps no state (a residual unit removed at some steps).
RAW, DELTA, BYPASS = "raw", "delta", "bypass"
MODES = (RAW, DELTA, BYPASS)


@dataclass(frozen=True)
class Schedule:
    """Which variant runs at each step of a denoising loop.

    With `repeat`, `steps` is a pattern repeated over the loop (a uniform interval does not depend
    on the step count). Otherwise `steps[i]` is the variant of step i of the calibrated loop, whose
    timestep was `timesteps[i]` (when known): a call runs the variant of the calibrated step nearest
    its timestep (the first call of a loop runs the first step), so a loop of another length or
    spacing still gets each part of the trajectory's schedule. Without timesteps, a loop of another
    announced length is mapped by position. A repeated pattern may keep the calibrated loop's
    timesteps too: they tell the runtime when a loop that follows them ends. With no `steps`, every
    step runs `default`. A step scheduled as ADAPTIVE decides at run time (see Plan.run): `adaptive`
    holds the probe tensor, the threshold and the two variants. With `forecast`, a step that reuses
    cached tensors uses their first-order Taylor extrapolation in the timestep from the last two
    steps that computed them (TaylorSeer / CG-Taylor) instead."""

    default: str
    steps: tuple[str, ...] = ()
    repeat: bool = False
    adaptive: dict[str, Any] | None = None
    timesteps: tuple[float, ...] = ()
    forecast: bool = False

    def variant_for(self, step: int, num_steps: int | None = None, timestep: float | None = None) -> str:
        if not self.steps or step < 0:
            return self.default
        if self.repeat:
            return self.steps[step % len(self.steps)]
        # step 0 fills whatever later steps reuse, so it runs the calibrated first step whatever its timestep
        if step > 0 and timestep is not None and len(self.timesteps) == len(self.steps):
            nearest = min(range(len(self.timesteps)), key=lambda i: abs(self.timesteps[i] - timestep))
            return self.steps[nearest]
        if num_steps and num_steps != len(self.steps):
            step = round(step * (len(self.steps) - 1) / max(num_steps - 1, 1))
        return self.steps[step] if step < len(self.steps) else self.default

    def named_variants(self) -> set[str]:
        """Every variant a step of this schedule may run."""
        named = {self.default, *self.steps} - {ADAPTIVE}
        if ADAPTIVE in self.steps and self.adaptive:
            named |= {self.adaptive.get("full"), self.adaptive.get("cached")}
        return named

    def to_json(self) -> dict[str, Any]:
        return {"default": self.default, "steps": list(self.steps), "repeat": self.repeat, "adaptive": self.adaptive,
                "timesteps": list(self.timesteps), "forecast": self.forecast}

    def to_compact_json(self) -> dict[str, Any]:
        """The JSON form a step plan is saved in: fields at their default value are left out."""
        out: dict[str, Any] = {"default": self.default, "steps": list(self.steps), "repeat": self.repeat}
        if self.adaptive is not None:
            out["adaptive"] = self.adaptive
        if self.timesteps:
            out["timesteps"] = list(self.timesteps)
        if self.forecast:
            out["forecast"] = True
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Schedule":
        return cls(default=data["default"], steps=tuple(data["steps"]), repeat=data.get("repeat", False),
                   adaptive=data.get("adaptive"), timesteps=tuple(data.get("timesteps", ())),
                   forecast=data.get("forecast", False))


@dataclass(frozen=True)
class Region:
    """A part of the graph a variant may skip: the nodes only `cuts` need (partition.region_nodes).
    `bases` maps each cut to the residual input it is added to (DELTA, BYPASS); `keep` names nodes
    that stay computed although only the region reads them (a block's inputs, when each block is
    its own region)."""

    name: str
    cuts: tuple[str, ...]
    mode: str = RAW
    bases: dict[str, str] = field(default_factory=dict)
    keep: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "cuts", tuple(self.cuts))
        object.__setattr__(self, "keep", tuple(self.keep))
        object.__setattr__(self, "bases", dict(self.bases))
        if self.mode not in MODES:
            raise LintError(f"region {self.name}: mode {self.mode!r} is not one of {', '.join(MODES)}")
        if not self.cuts:
            raise LintError(f"region {self.name} has no cut nodes")

    def node_names(self) -> set[str]:
        """The graph nodes this region names."""
        return {*self.cuts, *self.bases.values(), *self.keep}

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "cuts": list(self.cuts), "mode": self.mode}
        if self.bases:
            out["bases"] = dict(self.bases)
        if self.keep:
            out["keep"] = list(self.keep)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Region":
        return cls(data["name"], tuple(data["cuts"]), data.get("mode", RAW), dict(data.get("bases", {})),
                   tuple(data.get("keep", ())))


@dataclass(frozen=True)
class StepPlan:
    """Regions, variants (name -> the regions it skips), the schedule over them (with the
    timesteps it is anchored to, once anchored) and `summary`, what the writing pass says of it
    (at least {"pass": name})."""

    regions: tuple[Region, ...]
    variants: dict[str, tuple[str, ...]]
    schedule: Schedule
    summary: dict[str, Any]

    @classmethod
    def build(cls, regions: Iterable[Region], variants: Mapping[str, Iterable[str]], schedule: Schedule,
              summary: Mapping[str, Any]) -> "StepPlan":
        plan = cls(tuple(regions), {name: tuple(skipped) for name, skipped in variants.items()}, schedule,
                   jsonable(summary))
        plan.check()
        return plan

    @property
    def source(self) -> str:
        """The pass that wrote this plan."""
        return str(self.summary.get("pass", "an earlier pass"))

    def region(self, name: str) -> Region:
        for region in self.regions:
            if region.name == name:
                return region
        raise KeyError(f"no region named {name!r}; regions: {', '.join(r.name for r in self.regions)}")

    def with_schedule(self, schedule: Schedule) -> "StepPlan":
        return dataclasses.replace(self, schedule=schedule)

    def anchored(self, timesteps: Sequence[float] | None) -> "StepPlan":
        """This plan with its schedule anchored to the calibrated loop's timesteps, which let a loop
        of another length or spacing find the matching part of the schedule and let the runtime free
        the cache after the last of them. A schedule per step is anchored only to a loop of its
        length; a repeated pattern keeps the timesteps to tell when the loop ends. Unchanged when
        there is nothing to anchor."""
        schedule = self.schedule
        if not schedule.steps or timesteps is None or not (schedule.repeat or len(timesteps) == len(schedule.steps)):
            return self
        return self.with_schedule(dataclasses.replace(schedule, timesteps=tuple(timesteps)))

    def check(self, node_names: set[str] | None = None) -> None:
        """Raises LintError naming every inconsistency; with `node_names` (the graph's), also every
        region node missing from the graph."""
        problems = []
        names = [r.name for r in self.regions]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            problems.append(f"regions named more than once: {duplicated}")
        for region in self.regions:
            if region.mode in (DELTA, BYPASS):
                unbased = [c for c in region.cuts if c not in region.bases]
                if unbased:
                    problems.append(f"{region.mode} region {region.name} has cuts without a base: {unbased}")
            stray = sorted(set(region.bases) - set(region.cuts))
            if stray:
                problems.append(f"region {region.name} has bases for nodes that are not its cuts: {stray}")
            if node_names is not None:
                missing = sorted(region.node_names() - node_names)
                if missing:
                    problems.append(f"region {region.name} names nodes that are not in the graph: {missing}")
        for variant, skipped in self.variants.items():
            unknown = sorted(set(skipped) - set(names))
            if unknown:
                problems.append(f"variant {variant} skips unknown regions {unknown}")
        schedule = self.schedule
        if ADAPTIVE in schedule.steps and not (schedule.adaptive and schedule.adaptive.get("probe")):
            problems.append("the schedule has adaptive steps but no adaptive rule (probe, threshold, variants)")
        for variant in sorted(schedule.named_variants() - set(self.variants), key=str):
            problems.append(f"the schedule names unknown variant {variant}")
        if schedule.timesteps and not schedule.repeat and len(schedule.timesteps) != len(schedule.steps):
            problems.append(f"the schedule has {len(schedule.steps)} steps but is anchored to "
                            f"{len(schedule.timesteps)} timesteps")
        if problems:
            raise LintError(f"step plan of {self.source} is inconsistent:\n  - " + "\n  - ".join(problems))

    def to_json(self) -> dict[str, Any]:
        return {"regions": [r.to_json() for r in self.regions],
                "variants": {name: list(skipped) for name, skipped in self.variants.items()},
                "schedule": self.schedule.to_compact_json(), "summary": self.summary}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "StepPlan":
        return cls.build([Region.from_json(r) for r in data["regions"]], data["variants"],
                         Schedule.from_json(data["schedule"]), data.get("summary", {}))
