"""Passes: a frozen config, declared pre/postconditions, a registry by name, and a PassManager
that validates a pipeline before running it, lints after every pass and records what ran."""
from __future__ import annotations

import dataclasses
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Protocol, Sequence

from .._json import jsonable
from ..calibration import ResampledReference
from .._progress import progress
from ..errors import DiffcError, LintError, PassError
from ..ir import DiffusionGraph, lint


@dataclass(frozen=True)
class PassConfig:
    """Base of every pass's config; subclasses are frozen dataclasses with defaults."""


@dataclass
class PassResult:
    graph: DiffusionGraph
    modified: bool
    report: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassContext:
    """What a pass may use besides the graph: calibration data, the user's budget, the target."""

    calibration: Any = None
    budget: dict[str, Any] = field(default_factory=dict)
    target: str = "torch"
    used_budget: set[str] = field(default_factory=set)
    # Builds a runnable denoiser (same forward as the original) from a candidate graph, so passes
    # can re-run the real sampler with it; given by the API layer, which knows the backends.
    denoiser_for: Callable[[DiffusionGraph], Any] | None = None
    # Each layer format's time over the unquantized layer's as the target's backend runs it on this
    # machine (None where it cannot measure); given by the API layer, for latency budgets
    format_times: Callable[[tuple[str, ...]], dict[str, float] | None] | None = None
    # The same, for a linear of a given (rows, in, out) shape; only where the backend runs low-bit
    # formats as their own kernels on this device (not simulated), so a format can pay or not
    layer_format_times: Callable[[tuple[str, ...], tuple[int, int, int]], dict[str, float] | None] | None = None
    # whether that backend runs quantized convolutions as low-bit kernels too (not timed: where it does
    # not, a quantized convolution is slower than the unquantized one and the speed check keeps it)
    low_bit_convolutions: bool = True
    # the user asked for progress bars (optimize(progress=True)): passes show their long loops
    progress: bool = False
    # what final images are judged against: None for the recorded (original) ones, or, for a pass
    # that follows passes that changed the graph, that graph's own re-sampled ones (set by PassManager)
    reference: ResampledReference | None = None

    def take_budget(self, key: str, default: Any = None) -> Any:
        """Reads a budget entry and marks it used, so unused entries can be reported."""
        self.used_budget.add(key)
        return self.budget.get(key, default)


def anchor_step_plan(dg: DiffusionGraph, ctx: PassContext) -> None:
    """Anchors the step plan a pass wrote to the calibrated loop's timesteps (StepPlan.anchored).
    A pass does it last, once every measurement of its own is made on the plan as selected."""
    if dg.step_plan is not None and ctx.calibration is not None:
        dg.step_plan = dg.step_plan.anchored(ctx.calibration.step_timesteps)


@dataclass(frozen=True)
class Condition:
    """A named property of a graph (and context) that passes require or ensure.
    `check` returns None when it holds, else the reason it does not."""

    name: str
    check: Callable[[DiffusionGraph, PassContext], str | None]
    fix: str


CONDITIONS: dict[str, Condition] = {}


def register_condition(condition: Condition) -> Condition:
    CONDITIONS[condition.name] = condition
    return condition


register_condition(Condition(
    "calibrated",
    lambda dg, ctx: None if ctx.calibration is not None else "no calibration data was given",
    "pass calibration=diffc.calibration.collect(pipe, ...) (or a recorded set) to diffc.optimize"))
register_condition(Condition(
    "full_precision",
    lambda dg, ctx: None if not any("precision" in a for a in dg.annotations.values())
    else "the graph already carries precision annotations",
    "run this pass before quantization in the pipeline"))


class Pass(ABC):
    """A graph rewrite. Subclasses set `name`, `Config` (a frozen PassConfig dataclass),
    `requires`/`ensures` (names of registered Conditions) and `runs_after` (passes that must come
    earlier when both are in a pipeline), and implement `run`."""

    name: ClassVar[str]
    Config: ClassVar[type[PassConfig]] = PassConfig
    requires: ClassVar[tuple[str, ...]] = ()
    ensures: ClassVar[tuple[str, ...]] = ()
    runs_after: ClassVar[tuple[str, ...]] = ()
    # whether the pass writes the precision annotations that low-bit targets lower
    writes_precision: ClassVar[bool] = False
    # whether the pass may take layers out of the graph (a later pass finding none left names it)
    removes_layers: ClassVar[bool] = False

    def __init__(self, config: PassConfig | None = None, **options: Any) -> None:
        if config is not None and options:
            raise PassError(f"pass {self.name}: give either a config object or options, not both")
        if config is None:
            fields = {f.name for f in dataclasses.fields(self.Config)}
            unknown = sorted(set(options) - fields)
            if unknown:
                raise PassError(f"pass {self.name} has no option {', '.join(unknown)}; "
                                f"its options are: {', '.join(sorted(fields)) or '(none)'}")
            try:
                config = self.Config(**options)
            except (TypeError, ValueError) as exc:
                raise PassError(f"pass {self.name}: invalid options {options}: {exc}") from exc
        elif not isinstance(config, self.Config):
            raise PassError(f"pass {self.name} takes a {self.Config.__name__}, got {type(config).__name__}")
        self.config = config

    def requirements(self) -> tuple[str, ...]:
        """The conditions this pass needs with its config (by default, the class's `requires`)."""
        return self.requires

    def writes_step_plan(self) -> bool:
        """Whether this pass, as configured, gives the graph step-dependent variants."""
        return False

    def step_plan_conflict(self, writer: str) -> str | None:
        """Why this pass cannot follow `writer`, a pass that writes a step plan (None: it can)."""
        return None

    @abstractmethod
    def run(self, dg: DiffusionGraph, ctx: PassContext) -> PassResult:
        """Rewrites `dg` (a private copy: it may be changed in place) and reports what changed."""

    def describe(self) -> dict[str, Any]:
        return {"pass": self.name, **jsonable(dataclasses.asdict(self.config))}


# the keys of an applied-pass record besides the pass's name and config (what build_pipeline takes)
NOT_CONFIG = ("modified", "seconds", "report", "budget", "judged_against")

PASSES: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: makes a pass available by its name in pipelines."""
    if not getattr(cls, "name", None):
        raise PassError(f"{cls.__name__} needs a class attribute `name` to be registered")
    if not dataclasses.is_dataclass(cls.Config) or not cls.Config.__dataclass_params__.frozen:  # type: ignore[attr-defined]
        raise PassError(f"pass {cls.name}: Config must be a frozen dataclass")
    for condition in (*cls.requires, *cls.ensures):
        if condition not in CONDITIONS:
            raise PassError(f"pass {cls.name} names unknown condition {condition!r}; known: {', '.join(CONDITIONS)}")
    PASSES[cls.name] = cls
    return cls


def available_passes() -> list[str]:
    return sorted(PASSES)


# Named pipelines. A preset lists only registered passes; "default" is what diffc.optimize runs
# when the user names no passes, "default-low-bit" what it runs for a low-bit target (int8, fp8,
# int4, mixed), which needs the quant pass's annotations: caching first, so quantization is
# calibrated on the graph that runs.
PRESETS: dict[str, list[str]] = {"none": [], "default": ["cache"], "default-low-bit": ["cache", "quant"],
                                 "cache": ["cache"]}

PipelineSpec = str | Sequence[str | Mapping[str, Any] | Pass]


def build_pipeline(spec: PipelineSpec | None) -> list[Pass]:
    """Instantiates a pipeline given as a preset name, or a list of pass names, `{"pass": name,
    **options}` dicts or Pass instances."""
    if spec is None:
        spec = "default"
    if isinstance(spec, str):
        if spec in PRESETS:
            return build_pipeline(PRESETS[spec])
        if spec in PASSES:
            return [PASSES[spec]()]
        raise PassError(f"unknown pipeline {spec!r}: presets are {', '.join(PRESETS)}; "
                        f"passes are {', '.join(available_passes()) or '(none registered)'}")
    passes = []
    for item in spec:
        if isinstance(item, Pass):
            passes.append(item)
            continue
        if isinstance(item, str):
            name, options = item, {}
        elif isinstance(item, Mapping):
            if "pass" not in item:
                raise PassError(f"pipeline entry {dict(item)} has no 'pass' key; write {{'pass': name, **options}}")
            options = dict(item)
            name = options.pop("pass")
        else:
            raise PassError(f"pipeline entry {item!r} is not a pass name, a {{'pass': ...}} dict or a Pass")
        if name not in PASSES:
            raise PassError(f"unknown pass {name!r}; registered passes: {', '.join(available_passes()) or '(none)'}")
        passes.append(PASSES[name](**options))
    return passes


class PassCheckpoints(Protocol):
    """Where a pipeline keeps the graph after each pass, so an interrupted run resumes after the
    last finished pass. `key` says what produced the graph; a checkpoint with another key is stale."""

    def load(self, index: int, key: dict[str, Any]) -> tuple[DiffusionGraph, list[str]] | None: ...

    def save(self, index: int, key: dict[str, Any], graph: DiffusionGraph, used_budget: list[str]) -> None: ...


class PassManager:
    def __init__(self, passes: PipelineSpec | None = None, progress: bool = False) -> None:
        self.passes = build_pipeline(passes)
        self.progress = progress

    def validate(self) -> None:
        """Checks the pipeline's order before anything runs."""
        names = [p.name for p in self.passes]
        for index, current in enumerate(self.passes):
            for earlier in current.runs_after:
                if earlier in names[index + 1:]:
                    fixed = [n for n in names if n != earlier]
                    fixed.insert(fixed.index(current.name), earlier)
                    raise PassError(f"pipeline {names}: {current.name} must run after {earlier}; "
                                    f"reorder it, e.g. {fixed}")
            for writer in self.passes[:index]:
                problem = current.step_plan_conflict(writer.name) if writer.writes_step_plan() else None
                if problem:
                    raise PassError(f"pipeline {names}: {current.name} cannot run after {writer.name}: {problem}")

    def run(self, dg: DiffusionGraph, ctx: PassContext | None = None,
            checkpoints: PassCheckpoints | None = None) -> DiffusionGraph:
        """Runs every pass on a copy of `dg` (which is left untouched) and returns the result.
        With `checkpoints`, the graph after each pass is kept there and a rerun starts after the
        last pass whose checkpoint matches."""
        ctx = ctx or PassContext()
        self.validate()
        lint(dg)
        current = dg.clone()
        done: list[str] = []
        start = 0
        if checkpoints is not None:
            for index in reversed(range(len(self.passes))):
                restored = checkpoints.load(index, self._checkpoint_key(index, ctx))
                if restored is not None:
                    current, used_budget = restored
                    lint(current)
                    ctx.used_budget.update(used_budget)
                    done = [p.name for p in self.passes[:index + 1]]
                    start = index + 1
                    break
        for index, p in enumerate(progress(self.passes[start:], self.progress, "passes", "pass"), start):
            where = f"pass {p.name}" + (f" (after {', '.join(done)})" if done else " (first in the pipeline)")
            for name in p.requirements():
                problem = CONDITIONS[name].check(current, ctx)
                if problem:
                    raise PassError(f"{where} requires {name}: {problem}. Fix: {CONDITIONS[name].fix}.")
            started = time.perf_counter()
            budget_before = set(ctx.used_budget)
            ctx.reference = _reference_for(current, ctx)
            try:
                result = p.run(current.clone(), ctx)
            except PassError as exc:
                raise PassError(f"{where} failed: {exc}") from exc
            except DiffcError:
                raise
            except Exception as exc:  # noqa: BLE001 - torch's or the model's error, named with the pass
                raise PassError(f"{where} failed unexpectedly: {type(exc).__name__}: {exc}. Nothing was changed; "
                                "leave the pass out for this model and report it with the model's class") from exc
            if not isinstance(result, PassResult):
                raise PassError(f"{where} returned {type(result).__name__}, not a PassResult")
            try:
                lint(result.graph)
            except LintError as exc:
                raise PassError(f"{where} left an invalid graph: {exc}") from exc
            for name in p.ensures:
                problem = CONDITIONS[name].check(result.graph, ctx)
                if problem:
                    raise PassError(f"{where} should ensure {name} but {problem}")
            current = result.graph
            entry = {**p.describe(), "modified": result.modified, "seconds": round(time.perf_counter() - started, 3),
                     "report": jsonable(result.report)}
            read = {key: ctx.budget[key] for key in sorted(ctx.used_budget - budget_before) if key in ctx.budget}
            if read:
                entry["budget"] = jsonable(read)
            if ctx.reference is not None and ctx.reference.used:
                entry["judged_against"] = f"final images of the graph after {', '.join(ctx.reference.after)}"
            current.applied.append(entry)
            done.append(p.name)
            if checkpoints is not None:
                checkpoints.save(index, self._checkpoint_key(index, ctx), current, sorted(ctx.used_budget))
        return current

    def _checkpoint_key(self, index: int, ctx: PassContext) -> dict[str, Any]:
        return {"passes": [p.describe() for p in self.passes[:index + 1]], "target": ctx.target,
                "budget": jsonable(ctx.budget)}


def _reference_for(graph: DiffusionGraph, ctx: PassContext) -> ResampledReference | None:
    """After passes that changed the graph, a pass's final-image floor is held against that graph's
    images: it bounds the error the pass adds, so that the passes of a pipeline compose (a cache at
    38 dB would otherwise leave a 40 dB quant floor nothing to keep)."""
    changed = [entry["pass"] for entry in graph.applied if entry.get("modified")]
    if not changed or ctx.denoiser_for is None or ctx.calibration is None:
        return None
    # the pass runs on a clone: `graph` stays what it received
    return ResampledReference(lambda: ctx.denoiser_for(graph), changed)
