"""The on-disk calibration set: one safetensors shard per recorded denoiser call, and a JSON
manifest rewritten atomically after each finished trajectory (so an interrupted collection
resumes where it stopped)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import DiffcError
from ..ir import DiffusionGraph
from ..ir.dtypes import HALF_DTYPES

FORMAT = "diffc-calibration-1"
MANIFEST = "manifest.json"
INPUT_PREFIX, OUTPUT_KEY = "in.", "out.sample"


class CalibrationError(DiffcError):
    """Calibration data that is missing, malformed, non-finite or recorded from another model."""


def call_arguments(inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Recorded inputs back into the forward's arguments (`param.key` names into dicts, `param.0`,
    `param.1`, ... into lists)."""
    arguments: dict[str, Any] = {}
    for name, value in inputs.items():
        if "." in name:
            parameter, key = name.split(".", 1)
            arguments.setdefault(parameter, {})[key] = value
        else:
            arguments[name] = value
    for parameter, value in arguments.items():
        if isinstance(value, dict) and value and all(key.isdigit() for key in value):
            arguments[parameter] = [value[key] for key in sorted(value, key=int)]
    return arguments


@dataclass
class Record:
    """One recorded denoiser call: its inputs by name (as TensorInput.name), and its output. `call`
    is its index within its step (a loop that calls the denoiser once per guidance branch makes
    two calls a step)."""

    item: str
    step: int
    num_steps: int
    timestep: float | None
    inputs: dict[str, torch.Tensor]
    output: torch.Tensor
    call: int = 0


class CalibrationSet:
    """Denoiser inputs and reference outputs recorded along real sampling trajectories.

    `pipeline` is the live pipeline the set was collected with and `replay` the arguments that
    reproduce each trajectory (conditions, extra call arguments); both are None when the set is
    opened from disk or recorded from a bare loop. They let passes re-run the sampler with a
    candidate in the loop. Recorded tensors load onto `device`: the device of the graph the
    passes run (optimize sets it), so that a model on a GPU is calibrated there."""

    def __init__(self, root: str | os.PathLike[str], pipeline: Any = None,
                 replay: dict[str, Any] | None = None) -> None:
        self.root = Path(root)
        path = self.root / MANIFEST
        if not path.is_file():
            raise CalibrationError(f"{self.root} holds no calibration set (no {MANIFEST}); create one with "
                                   "diffc.calibration.collect(...) or record(...)")
        self.manifest = json.loads(path.read_text())
        if self.manifest.get("format") != FORMAT:
            raise CalibrationError(f"{self.root} has calibration format {self.manifest.get('format')!r}; "
                                   f"this diffc reads {FORMAT!r}. Collect it again.")
        self.pipeline = pipeline
        self.replay = replay
        self.device = torch.device("cpu")

    @property
    def meta(self) -> dict[str, Any]:
        return self.manifest["meta"]

    @property
    def settings(self) -> dict[str, Any]:
        return self.manifest["settings"]

    @property
    def items(self) -> list[dict[str, Any]]:
        return [i for i in self.manifest["items"].values() if i.get("complete")]

    @property
    def steps(self) -> list[int]:
        return sorted({c["step"] for item in self.items for c in item["calls"]})

    @property
    def num_steps(self) -> int:
        return max((item["num_steps"] for item in self.items), default=0)

    @property
    def step_timesteps(self) -> list[float] | None:
        """The timestep of each step of the calibrated loop (the longest one), when every step had one."""
        longest = [item for item in self.items if item["num_steps"] == self.num_steps]
        timesteps = longest[0].get("timesteps") if longest else None
        if not timesteps or len(timesteps) != self.num_steps or any(t is None for t in timesteps):
            return None
        return [float(t) for t in timesteps]

    def __len__(self) -> int:
        return sum(len(item["calls"]) for item in self.items)

    def records(self, steps: set[int] | None = None, items: set[str] | None = None) -> Iterator[Record]:
        """Recorded calls in trajectory order, loaded one shard at a time."""
        for item in self.items:
            if items is not None and item["id"] not in items:
                continue
            for call in item["calls"]:
                if steps is not None and call["step"] not in steps:
                    continue
                tensors = {}
                with safe_open(str(self.root / call["file"]), framework="pt", device=str(self.device)) as shard:
                    for key in shard.keys():
                        tensors[key] = _in_graph_dtype(shard.get_tensor(key))
                yield Record(item=item["id"], step=call["step"], num_steps=item["num_steps"],
                             timestep=call["timestep"],
                             inputs={k[len(INPUT_PREFIX):]: v for k, v in tensors.items() if k.startswith(INPUT_PREFIX)},
                             output=tensors[OUTPUT_KEY], call=call.get("call", 0))

    def input_shapes(self) -> Iterator[dict[str, tuple[int, ...]]]:
        """Each recorded call's input shapes, by input name, read from the shard headers only."""
        for item in self.items:
            for call in item["calls"]:
                with safe_open(str(self.root / call["file"]), framework="pt") as shard:
                    yield {key[len(INPUT_PREFIX):]: tuple(shard.get_slice(key).get_shape())
                           for key in shard.keys() if key.startswith(INPUT_PREFIX)}

    def final_outputs(self) -> dict[str, torch.Tensor]:
        """Each trajectory's final pipeline output (images or latents), by item id, where recorded."""
        out = {}
        for item in self.items:
            if item.get("final"):
                with safe_open(str(self.root / item["final"]), framework="pt", device=str(self.device)) as shard:
                    out[item["id"]] = _in_graph_dtype(shard.get_tensor("final"))
        return out

    def keep(self, key: str, value: Any) -> None:
        """Stores what was derived from the recorded calls (the identified loop) in the manifest, on
        disk when the folder is writable; collecting into the folder again drops it."""
        self.manifest[key] = value
        temporary = self.root / (MANIFEST + ".tmp")
        try:
            temporary.write_text(json.dumps(self.manifest, indent=1))
            os.replace(temporary, self.root / MANIFEST)
        except OSError:
            temporary.unlink(missing_ok=True)

    def check_compatible(self, dg: DiffusionGraph) -> None:
        """Raises CalibrationError when the set was recorded from a model with other inputs."""
        recorded = self.meta.get("inputs", {})
        model = self.meta.get("model_class", "?")
        if model != dg.signature.model_class.rsplit(".", 1)[-1]:
            raise CalibrationError(f"the calibration set was recorded from {model}, not "
                                   f"{dg.signature.model_class.rsplit('.', 1)[-1]}; collect one with this model")
        for spec in dg.signature.inputs:
            if spec.name not in recorded:
                raise CalibrationError(f"the calibration set has no input {spec.name!r} (it has {sorted(recorded)}); "
                                       "it was recorded with other inputs: collect it again with this model")
            shape = recorded[spec.name]
            static_mismatch = len(shape) != len(spec.shape) or any(
                isinstance(want, int) and want != got for want, got in zip(spec.shape, shape))
            if static_mismatch:
                raise CalibrationError(f"calibration input {spec.name} has shape {tuple(shape)} but the model takes "
                                       f"{spec.shape}; the set belongs to another model configuration")


def _in_graph_dtype(tensor: torch.Tensor) -> torch.Tensor:
    """Calls recorded from a half-precision model load in fp32, the dtype capture gives its graph."""
    return tensor.float() if tensor.dtype in HALF_DTYPES else tensor


class SetWriter:
    """Writes a calibration set; reopening a folder collected with the same `settings` resumes it.
    `meta` holds what the recording found out (model class, input shapes)."""

    def __init__(self, root: str | os.PathLike[str], settings: dict[str, Any]) -> None:
        self.root = Path(root)
        (self.root / "shards").mkdir(parents=True, exist_ok=True)
        path = self.root / MANIFEST
        if path.is_file():
            manifest = json.loads(path.read_text())
            if manifest.get("settings") != settings:
                raise CalibrationError(
                    f"{self.root} already holds a calibration set collected with other settings; use another "
                    "out= folder or delete it. Differences: " + _differences(manifest.get("settings", {}), settings))
            manifest.pop("loop", None)  # fitted from the calls recorded so far
            self.manifest = manifest
        else:
            self.manifest = {"format": FORMAT, "settings": settings, "meta": {}, "items": {}}
            self._flush()

    def is_complete(self, item_id: str) -> bool:
        item = self.manifest["items"].get(item_id)
        return bool(item and item.get("complete") and all((self.root / c["file"]).is_file() for c in item["calls"]))

    def begin(self, item_id: str, info: dict[str, Any]) -> None:
        self.manifest["items"][item_id] = {"id": item_id, **info, "num_steps": 0, "calls": [], "complete": False}

    def write_call(self, item_id: str, step: int, call: int, timestep: float | None,
                   inputs: dict[str, torch.Tensor], output: torch.Tensor) -> None:
        rel = f"shards/{item_id}-step{step:04d}-call{call}.safetensors"
        tensors, storages = {}, set()
        for name, value in inputs.items():
            tensor = value.detach().cpu().contiguous()
            # safetensors refuses tensors that share memory (one argument passed as two, or views of one)
            storage = tensor.untyped_storage().data_ptr()
            tensors[INPUT_PREFIX + name] = tensor.clone() if storage in storages else tensor
            storages.add(storage)
        tensors[OUTPUT_KEY] = output.detach().cpu().contiguous()
        save_file(tensors, str(self.root / rel))
        self.manifest["items"][item_id]["calls"].append({"step": step, "call": call, "timestep": timestep, "file": rel})

    def drop_calls(self, item_id: str, keep_steps: set[int]) -> None:
        item = self.manifest["items"][item_id]
        for call in item["calls"]:
            if call["step"] not in keep_steps:
                (self.root / call["file"]).unlink(missing_ok=True)
        item["calls"] = [c for c in item["calls"] if c["step"] in keep_steps]

    def end(self, item_id: str, num_steps: int, final: torch.Tensor | None = None,
            timesteps: list[float | None] | None = None) -> None:
        item = self.manifest["items"][item_id]
        item["num_steps"] = num_steps
        if timesteps is not None:
            item["timesteps"] = timesteps
        if final is not None:
            rel = f"shards/{item_id}-final.safetensors"
            save_file({"final": final.detach().cpu().contiguous()}, str(self.root / rel))
            item["final"] = rel
        item["complete"] = True
        self._flush()

    def update_meta(self, **entries: Any) -> None:
        self.manifest["meta"].update(entries)
        self._flush()

    def _flush(self) -> None:
        temporary = self.root / (MANIFEST + ".tmp")
        temporary.write_text(json.dumps(self.manifest, indent=1))
        os.replace(temporary, self.root / MANIFEST)


def _differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys) or "none"
