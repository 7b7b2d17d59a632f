"""Recording denoiser calls along real sampling trajectories: `collect` drives a pipeline,
`record` watches a user's own sampling loop."""
from __future__ import annotations

import contextlib
import inspect
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from ..ir.examples import example_inputs
from ..ir.probe import constant_arguments
from .._progress import progress as progress_bar
from ..ir import StepTracker, find_denoiser
from .prompts import default_prompts
from .store import CalibrationError, CalibrationSet, SetWriter
from .timesteps import select_steps

DEFAULT_CONDITIONS = 8
TIMESTEP_NAMES = ("timestep", "timesteps")
# call arguments of img2img, inpainting and ControlNet pipelines that have no sane default
IMAGE_INPUTS = ("image", "control_image", "mask_image")


class DenoiserRecorder:
    """Hooks on a denoiser module that hand each call's named tensor inputs and output to
    `on_call(inputs, output, timestep)`. Inputs are named as in diffc's signatures: the forward's
    parameter name, `param.key` for tensors inside a dict argument, `param.0`, `param.1`, ... inside
    a list or tuple."""

    def __init__(self, module: torch.nn.Module, on_call: Callable[[dict[str, torch.Tensor], torch.Tensor, float | None], None],
                 writer: SetWriter | None = None) -> None:
        self.signature = inspect.signature(module.forward)
        self.on_call = on_call
        # the non-tensor arguments of the calls (shapes, counts, flags) go in the set's meta, so that
        # a call rebuilt from the recorded tensors (capture's example) can pass them too
        self.writer = writer
        self._pending: dict[str, torch.Tensor] | None = None
        self._handles = [module.register_forward_pre_hook(self._pre, with_kwargs=True),
                         module.register_forward_hook(self._post, with_kwargs=True)]

    def _pre(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        bound = self.signature.bind_partial(*args, **kwargs).arguments
        inputs: dict[str, torch.Tensor] = {}
        batch = next((v.shape[0] for v in bound.values() if isinstance(v, torch.Tensor) and v.dim() > 0), 1)
        for name, value in bound.items():
            if isinstance(value, torch.Tensor):
                inputs[name] = value
            elif isinstance(value, Mapping):
                inputs.update({f"{name}.{k}": v for k, v in value.items() if isinstance(v, torch.Tensor)})
            elif isinstance(value, (list, tuple)):
                inputs.update({f"{name}.{i}": v for i, v in enumerate(value) if isinstance(v, torch.Tensor)})
            elif name in TIMESTEP_NAMES and isinstance(value, (int, float)):
                inputs[name] = torch.full((batch,), float(value), device="cpu")  # recorded calls are stored from the CPU
        for name in TIMESTEP_NAMES:
            if name in inputs and inputs[name].dim() == 0:
                inputs[name] = inputs[name].reshape(1).expand(batch)
        self._pending = inputs
        constants = constant_arguments({k: v for k, v in bound.items() if k not in TIMESTEP_NAMES})
        if self.writer is not None and constants:
            self.writer.manifest["meta"].setdefault("constants", constants)

    def _post(self, module: torch.nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        inputs, self._pending = self._pending, None
        if inputs is None:
            return
        tensor = output_tensor(output)
        timestep = next((float(inputs[n].reshape(-1)[0]) for n in TIMESTEP_NAMES if n in inputs), None)
        self.on_call(inputs, tensor, timestep)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def output_tensor(output: Any) -> torch.Tensor:
    """A denoiser call's output tensor: the tensor itself, its `.sample`, or the first of a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    sample = getattr(output, "sample", None)
    return sample if isinstance(sample, torch.Tensor) else output[0]


def _check_finite(inputs: dict[str, torch.Tensor], output: torch.Tensor, item: str, step: int) -> None:
    for name, tensor in [*inputs.items(), ("output", output)]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = (~torch.isfinite(tensor)).reshape(tensor.shape[0], -1).any(dim=1).nonzero().flatten().tolist() \
                if tensor.dim() else [0]
            raise CalibrationError(f"non-finite values (NaN/Inf) in {name} at step {step} of trajectory {item}, "
                                   f"batch rows {bad}; fix the model or sampler before calibrating")


class _TrajectoryWriter:
    """Writes the selected steps of one trajectory as the recorder reports its calls."""

    def __init__(self, writer: SetWriter, item: str, selected: set[int] | None) -> None:
        self.writer, self.item, self.selected = writer, item, selected
        self.tracker = StepTracker()
        self.calls_in_step: dict[int, int] = {}
        self.timesteps: list[float | None] = []
        self.final: torch.Tensor | None = None

    def __call__(self, inputs: dict[str, torch.Tensor], output: torch.Tensor, timestep: float | None) -> None:
        self.tracker.observe(timestep)
        step = self.tracker.step
        if step == len(self.timesteps):
            self.timesteps.append(timestep)
        _check_finite(inputs, output, self.item, step)
        if not self.writer.manifest["meta"].get("inputs"):
            self.writer.manifest["meta"]["inputs"] = {k: list(v.shape) for k, v in inputs.items()}
        if self.selected is None or step in self.selected:
            call = self.calls_in_step.get(step, 0)
            self.calls_in_step[step] = call + 1
            self.writer.write_call(self.item, step, call, timestep, inputs, output)

    @property
    def num_steps(self) -> int:
        return self.tracker.step + 1


def collect(pipeline_or_model: Any, conditions: Sequence[Any] | None = None, num_steps: int = 20,
            scheduler: Any = None, timesteps: str = "all", seeds: Sequence[int] | None = None,
            out: str | Path | None = None, progress: bool = True, example_inputs: Mapping[str, Any] | None = None,
            condition_count: int = DEFAULT_CONDITIONS, **call_kwargs: Any) -> CalibrationSet:
    """Runs the real sampler (the pipeline's scheduler, guidance and conditioning) and records,
    at each selected step, the denoiser's inputs and output. Conditions are class labels or
    prompts (or dicts of pipeline call arguments). By default (`condition_count`, 8): that many
    labels spread over the classes of a class-conditional pipeline (all of them when it has fewer),
    that many prompts of the built-in set (`calibration.prompts`) for a text one, seeds 0-7 for an
    unconditional one; other calls take the pipeline's own defaults
    (resolution, guidance). By default the i-th condition runs with seed i, so trajectories differ
    in noise as well as in condition and the ones passes hold out (`split_items`) are unseen seeds;
    with `seeds`, every seed runs every condition. Shards stream to `out` (a temporary folder by
    default); calling again with the same `out` and settings skips finished trajectories. A bare
    denoiser is called on synthetic trajectories with `example_inputs` (the arguments it was
    captured with), or with diffc's example for its class."""
    root = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="diffc-calibration-"))
    if isinstance(pipeline_or_model, torch.nn.Module):
        if conditions is not None:
            raise CalibrationError("conditions (prompts, labels) need the pipeline that encodes them: pass the "
                                   "pipeline to collect, not its denoiser")
        return _collect_synthetic(pipeline_or_model, num_steps, timesteps, seeds or (0,), root, progress,
                                  example_inputs)
    pipe = pipeline_or_model
    denoiser, _ = find_denoiser(pipe)
    conditions = list(conditions) if conditions is not None else _default_conditions(pipe, condition_count)
    if not conditions:
        raise CalibrationError("conditions is empty: give at least one prompt, label or dict of pipeline arguments")
    # an unconditional pipeline varies only by seed: as many seeds as a conditional set has conditions
    paired = seeds is None and conditions != [{}]
    seeds = tuple(range(len(conditions))) if paired else tuple(range(DEFAULT_CONDITIONS)) if seeds is None \
        else tuple(seeds)
    selected = set(select_steps(num_steps, timesteps))
    settings = {"pipeline": type(pipe).__name__, "num_steps": num_steps, "timesteps": timesteps,
                "selected_steps": sorted(selected), "seeds": list(seeds), "conditions": [repr(c) for c in conditions],
                "scheduler": type(scheduler or pipe.scheduler).__name__,
                "call_kwargs": {k: repr(v) for k, v in call_kwargs.items()}}
    writer = SetWriter(root, settings)
    writer.manifest["meta"]["model_class"] = type(denoiser).__name__
    jobs = [(index, index, condition) for index, condition in enumerate(conditions)] if paired else \
        [(seed, index, condition) for seed in seeds for index, condition in enumerate(conditions)]
    original_scheduler = pipe.scheduler
    if scheduler is not None:
        pipe.scheduler = scheduler
    try:
        for seed, index, condition in progress_bar(jobs, progress, "calibration trajectories", "traj"):
            item = f"seed{seed}-cond{index}"
            if writer.is_complete(item):
                continue
            writer.begin(item, {"seed": seed, "condition": repr(condition), "condition_index": index})
            trajectory = _TrajectoryWriter(writer, item, selected)
            recorder = DenoiserRecorder(denoiser, trajectory, writer)
            try:
                with torch.no_grad():
                    result = call_pipeline(pipe, condition, num_steps, seed, call_kwargs)
            finally:
                recorder.close()
            writer.end(item, trajectory.num_steps, final=_final_tensor(result), timesteps=trajectory.timesteps)
    finally:
        pipe.scheduler = original_scheduler
    return CalibrationSet(root, pipeline=pipe, replay={"conditions": conditions, "call_kwargs": call_kwargs,
                                                       "scheduler": scheduler})


def _default_conditions(pipe: Any, wanted: int) -> list[Any]:
    """`wanted` class labels spread over the classes of a class-conditional pipeline, as many
    prompts of the built-in set for a text-conditioned one (refused when it also needs an image),
    one empty condition for an unconditional one."""
    parameters = inspect.signature(pipe.__call__).parameters
    if "class_labels" in parameters:
        count = getattr(pipe, "num_classes", None)
        if count is None:
            count = getattr(find_denoiser(pipe)[0].config, "num_embeds_ada_norm", None) or wanted
        spread = min(count, wanted)
        return sorted({int(i * count / spread) for i in range(spread)})
    images = image_inputs(pipe)
    if images:
        raise CalibrationError(
            f"{type(pipe).__name__} needs {' and '.join(repr(n) for n in images)} for every image, and diffc has no "
            f"sane default for {'it' if len(images) == 1 else 'them'}: pass conditions=[{{'prompt': ..., "
            + ", ".join(f"{n!r}: ..." for n in images) + "}, ...] (a few representative ones) or calibration=")
    if "prompt" in parameters:
        return list(default_prompts(wanted))
    return [{}]


def image_inputs(pipe: Any) -> list[str]:
    """The image inputs a pipeline call needs besides its prompt: img2img / inpainting / ControlNet
    images, and an IP-Adapter image once an IP-Adapter is loaded."""
    parameters = inspect.signature(pipe.__call__).parameters
    needed = [name for name in IMAGE_INPUTS if name in parameters]
    denoiser = find_denoiser(pipe)[0]
    if "ip_adapter_image" in parameters and type(getattr(denoiser, "encoder_hid_proj", None)).__name__ \
            == "MultiIPAdapterImageProjection":
        needed.append("ip_adapter_image")
    return needed


def call_pipeline(pipe: Any, condition: Any, num_steps: int, seed: int, call_kwargs: dict[str, Any]) -> Any:
    """Runs the pipeline on one condition (a class label, a prompt, or a dict of call arguments),
    or on a batch of prompts or of class labels (a list), with its generator seeded by `seed`, as
    `collect` does for each trajectory."""
    generator = torch.Generator().manual_seed(seed)
    kwargs = dict(call_kwargs)
    batch = condition if isinstance(condition, list) else [condition]
    if isinstance(condition, Mapping):
        kwargs.update(condition)
    elif all(isinstance(member, str) for member in batch):
        kwargs["prompt"] = condition
    else:
        kwargs["class_labels"] = [int(member) for member in batch]
    return pipe(num_inference_steps=num_steps, generator=generator, **kwargs)


def _final_tensor(result: Any) -> torch.Tensor | None:
    images = getattr(result, "images", None)
    if images is None and isinstance(result, (tuple, list)) and result:
        images = result[0]
    if images is None:
        return None
    if isinstance(images, torch.Tensor):
        return images
    try:
        import numpy as np

        return torch.from_numpy(np.asarray(images, dtype=np.float32))
    except (TypeError, ValueError):
        return None


def _collect_synthetic(model: torch.nn.Module, num_steps: int, timesteps: str, seeds: Sequence[int], root: Path,
                       progress: bool, example: Mapping[str, Any] | None = None) -> CalibrationSet:
    """Without a pipeline: DDIM (or flow-matching Euler) trajectories of the model itself from
    random conditioning. Weaker than real prompts: activations of real conditioning may differ."""
    warnings.warn("calibrating a bare denoiser on synthetic trajectories (random conditioning); calibration from "
                  "the real pipeline (collect(pipe, ...)) or your own loop (record(...)) is more faithful",
                  stacklevel=3)
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    family = type(model).__name__
    flow = family.startswith(("SD3", "Flux"))
    selected = set(select_steps(num_steps, timesteps))
    writer = SetWriter(root, {"pipeline": None, "synthetic": True, "num_steps": num_steps, "timesteps": timesteps,
                              "selected_steps": sorted(selected), "seeds": list(seeds)})
    writer.manifest["meta"]["model_class"] = family
    for seed in progress_bar(seeds, progress, "synthetic trajectories", "traj"):
        item = f"seed{seed}"
        if writer.is_complete(item):
            continue
        torch.manual_seed(seed)
        # the arguments the model was captured with: one it lacks would be refused at replay
        inputs = dict(example) if example is not None else example_inputs(model)
        latent_name = "hidden_states" if "hidden_states" in inputs else "sample"
        with torch.device("cpu"):  # a scheduler's tables live on the CPU; each step moves what it reads
            scheduler = FlowMatchEulerDiscreteScheduler() if flow else DDIMScheduler()
            scheduler.set_timesteps(num_steps)
        latents = torch.randn_like(inputs[latent_name])
        writer.begin(item, {"seed": seed, "condition": "random"})
        trajectory = _TrajectoryWriter(writer, item, selected)
        recorder = DenoiserRecorder(model, trajectory, writer)
        try:
            with torch.no_grad():
                for t in scheduler.timesteps:
                    model_t = t / 1000 if family.startswith("Flux") else t
                    call = {**inputs, latent_name: latents,
                            "timestep": torch.full((latents.shape[0],), float(model_t), device=latents.device)}
                    output = model(**call, return_dict=False)[0]
                    output = output[:, : latents.shape[1]] if output.shape != latents.shape else output
                    latents = scheduler.step(output, t, latents).prev_sample
        finally:
            recorder.close()
        writer.end(item, trajectory.num_steps, final=latents, timesteps=trajectory.timesteps)
    return CalibrationSet(root)


class Recording:
    """What `record` yields: after the `with` block, `calibration_set` holds the recorded calls.
    `final(latents)` after a loop hands over what it ended with, so that the identified loop
    (calibration.identify_loop) includes its last update."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.calibration_set: CalibrationSet | None = None
        self.loops: list[_TrajectoryWriter] = []

    def final(self, latents: torch.Tensor) -> None:
        """The latents the loop just recorded ended with (before decoding), one row per latent it sampled."""
        if not self.loops:
            raise CalibrationError("final(latents) came before any call of the model: call it after each loop")
        if not isinstance(latents, torch.Tensor):
            raise CalibrationError(f"final takes the loop's final latents as a tensor, got {type(latents).__name__}")
        self.loops[-1].final = latents.detach().clone()


@contextlib.contextmanager
def record(model: torch.nn.Module, out: str | Path | None = None, timesteps: str = "all") -> Iterator[Recording]:
    """Records every call of `model` made inside the block, for samplers that are the user's own
    code. Each denoising loop (detected from the timestep sequence: a timestep larger than the last
    one starts a new loop) becomes one trajectory; `timesteps` then selects steps of each loop."""
    root = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="diffc-calibration-"))
    writer = SetWriter(root, {"pipeline": None, "recorded": True, "timesteps": timesteps})
    writer.manifest["meta"]["model_class"] = type(model).__name__
    recording = Recording(root)
    loops = recording.loops

    def finish(trajectory: _TrajectoryWriter) -> None:
        keep = set(select_steps(trajectory.num_steps, timesteps))
        writer.drop_calls(trajectory.item, keep)
        writer.end(trajectory.item, trajectory.num_steps, final=trajectory.final, timesteps=trajectory.timesteps)

    def on_call(inputs: dict[str, torch.Tensor], output: torch.Tensor, timestep: float | None) -> None:
        current = loops[-1] if loops else None
        starts_loop = current is None or timestep is None or current.tracker.last_timestep is None \
            or timestep > current.tracker.last_timestep
        if starts_loop:
            if current is not None:
                finish(current)
            item = f"loop{len(writer.manifest['items'])}"
            writer.begin(item, {"seed": None, "condition": "recorded"})
            current = _TrajectoryWriter(writer, item, None)
            loops.append(current)
        current(inputs, output, timestep)

    recorder = DenoiserRecorder(model, on_call, writer)
    try:
        yield recording
    finally:
        recorder.close()
    if loops:
        finish(loops[-1])
    if not loops:
        raise CalibrationError("record(...) saw no call of the model inside the with-block")
    recording.calibration_set = CalibrationSet(root)


def as_calibration_set(value: Any) -> CalibrationSet | None:
    """Accepts a CalibrationSet, a finished Recording, a folder path, or None."""
    if value is None or isinstance(value, CalibrationSet):
        return value
    if isinstance(value, Recording):
        if value.calibration_set is None:
            raise CalibrationError("the recording is not finished: use it after its with-block")
        return value.calibration_set
    if isinstance(value, (str, Path)):
        return CalibrationSet(value)
    raise CalibrationError(f"calibration must be a CalibrationSet, a Recording or a folder, got {type(value).__name__}")

