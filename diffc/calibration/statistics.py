"""Per-node activation statistics per timestep group, and block feature traces across steps,
computed in one pass of the captured graph over a calibration set.

Histograms of |x| use fixed log-spaced bins (no range needs to be known in advance, so one
pass suffices); percentiles and MSE-optimal clipping ranges are read from them."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx
from safetensors.numpy import load_file, save_file

from .._progress import progress as progress_bar
from ..ir import DiffusionGraph
from .store import CalibrationError, CalibrationSet
from .timesteps import step_group

aten = torch.ops.aten
MATMUL_OPS = {aten.linear.default, aten.conv2d.default, aten.convolution.default, aten.matmul.default,
              aten.bmm.default, aten.mm.default, aten.addmm.default, aten.baddbmm.default,
              aten.scaled_dot_product_attention.default}
# |x| histogram: bin 0 holds exact zeros, then BINS_PER_OCTAVE bins per power of two in [2^LOW, 2^HIGH)
LOW_EXP, HIGH_EXP, BINS_PER_OCTAVE = -24, 24, 8
NUM_BINS = 1 + (HIGH_EXP - LOW_EXP) * BINS_PER_OCTAVE
BIN_EDGES = np.concatenate([[0.0], 2.0 ** (LOW_EXP + np.arange((HIGH_EXP - LOW_EXP) * BINS_PER_OCTAVE + 1)
                                             / BINS_PER_OCTAVE)])
# each bin's representative magnitude: 0 for the zeros bin, the geometric middle of the others
BIN_CENTERS = np.concatenate([[0.0], np.sqrt(BIN_EDGES[1:-1] * BIN_EDGES[2:])])


def nodes_of_interest(dg: DiffusionGraph) -> list[str]:
    """The inputs and outputs of matmul-like ops and the outputs of blocks."""
    names: dict[str, None] = {}
    for node in dg.graph.nodes:
        if node.op == "call_function" and node.target in MATMUL_OPS:
            first = node.args[0]
            if isinstance(first, torch.fx.Node) and first.op != "get_attr":
                names[first.name] = None
            names[node.name] = None
    for block in dg.blocks:
        names.update(dict.fromkeys(block.outputs))
    return list(names)


@dataclass
class NodeStats:
    """Running statistics of one node's output in one timestep group."""

    count: int = 0
    total: float = 0.0
    total_sq: float = 0.0
    minimum: float = math.inf
    maximum: float = -math.inf
    channel_absmax: np.ndarray | None = None
    histogram: np.ndarray = field(default_factory=lambda: np.zeros(NUM_BINS, np.int64))

    def update(self, tensor: torch.Tensor, channel_dim: int) -> None:
        x = tensor.detach().float()
        magnitude = x.abs()
        self.count += x.numel()
        self.total += float(x.sum(dtype=torch.float64))
        self.total_sq += float(magnitude.square().sum(dtype=torch.float64))
        low, high = torch.aminmax(x)
        self.minimum = min(self.minimum, float(low))
        self.maximum = max(self.maximum, float(high))
        per_channel = magnitude.movedim(channel_dim, 0).reshape(x.shape[channel_dim], -1) if x.dim() > 1 \
            else magnitude.reshape(1, -1)
        channel = per_channel.amax(dim=1).cpu().numpy()
        self.channel_absmax = channel if self.channel_absmax is None else np.maximum(self.channel_absmax, channel)
        self.histogram += histogram_of_abs(magnitude)

    @property
    def mean(self) -> float:
        return self.total / max(self.count, 1)

    @property
    def std(self) -> float:
        return math.sqrt(max(self.total_sq / max(self.count, 1) - self.mean ** 2, 0.0))

    @property
    def absmax(self) -> float:
        return max(abs(self.minimum), abs(self.maximum))

    def abs_percentile(self, q: float) -> float:
        """Upper edge of the histogram bin holding the q-th percentile of |x| (q in 0..100)."""
        cumulative = np.cumsum(self.histogram)
        index = int(np.searchsorted(cumulative, q / 100.0 * cumulative[-1]))
        return float(min(BIN_EDGES[min(index + 1, len(BIN_EDGES) - 1)], self.absmax))

    def mse_optimal_range(self, bits: int = 8) -> float:
        """The clipping range r minimising expected (clip + rounding) error of symmetric uniform
        quantization with `bits` bits, under the histogram of |x|."""
        top = max(self.absmax, 1e-12)
        errors = {float(r): self.quantization_error(float(r), bits) for r in np.geomspace(top / 64, top, 64)}
        return min(errors, key=errors.__getitem__)

    def quantization_error(self, clip: float, bits: int = 8) -> float:
        """The summed squared error (clipping beyond `clip` plus uniform rounding within it) of
        symmetric `bits`-bit quantization at range `clip`, under the histogram of |x|."""
        levels = 2 ** (bits - 1) - 1
        clipped = np.maximum(BIN_CENTERS - clip, 0.0) ** 2
        rounding = np.where(BIN_CENTERS <= clip, (clip / levels) ** 2 / 12.0, 0.0)
        return float((self.histogram.astype(np.float64) * (clipped + rounding)).sum())


def histogram_of_abs(magnitude: torch.Tensor) -> np.ndarray:
    magnitude = magnitude.reshape(-1)
    zeros = int((magnitude == 0).sum())
    nonzero = magnitude[magnitude > 0]
    position = torch.floor((torch.log2(nonzero) - LOW_EXP) * BINS_PER_OCTAVE).clamp(0, NUM_BINS - 2).long() + 1
    counts = torch.bincount(position, minlength=NUM_BINS).cpu().numpy().astype(np.int64)
    counts[0] += zeros
    return counts


@dataclass
class Statistics:
    """stats[node][group] -> NodeStats; traces[block] -> mean relative L1 change of the block's
    output from the previous step, per step (NaN where the previous step was not recorded)."""

    groups: int
    num_steps: int
    stats: dict[str, dict[int, NodeStats]]
    traces: dict[str, list[float]]

    def node(self, name: str, group: int | None = None) -> NodeStats:
        """Statistics of one node, for one timestep group or merged over all groups."""
        per_group = self.stats[name]
        if group is not None:
            return per_group[group]
        merged = NodeStats()
        for s in per_group.values():
            merged.count += s.count
            merged.total += s.total
            merged.total_sq += s.total_sq
            merged.minimum = min(merged.minimum, s.minimum)
            merged.maximum = max(merged.maximum, s.maximum)
            merged.histogram = merged.histogram + s.histogram
            merged.channel_absmax = s.channel_absmax if merged.channel_absmax is None \
                else np.maximum(merged.channel_absmax, s.channel_absmax)
        return merged

    def save(self, path: Path) -> None:
        arrays: dict[str, np.ndarray] = {}
        scalars: dict[str, Any] = {"groups": self.groups, "num_steps": self.num_steps, "traces": self.traces,
                                   "stats": {}}
        for name, per_group in self.stats.items():
            for group, s in per_group.items():
                key = f"{name}/{group}"
                arrays[key + "/hist"] = s.histogram
                arrays[key + "/channel_absmax"] = s.channel_absmax if s.channel_absmax is not None else np.zeros(0)
                scalars["stats"][key] = [s.count, s.total, s.total_sq, s.minimum, s.maximum]
        save_file(arrays, str(path.with_suffix(".safetensors")))
        path.with_suffix(".json").write_text(json.dumps(scalars))

    @classmethod
    def load(cls, path: Path) -> "Statistics":
        arrays = load_file(str(path.with_suffix(".safetensors")))
        scalars = json.loads(path.with_suffix(".json").read_text())
        stats: dict[str, dict[int, NodeStats]] = {}
        for key, (count, total, total_sq, minimum, maximum) in scalars["stats"].items():
            name, group = key.rsplit("/", 1)
            channel = arrays[key + "/channel_absmax"]
            stats.setdefault(name, {})[int(group)] = NodeStats(count, total, total_sq, minimum, maximum,
                                                               channel if channel.size else None,
                                                               arrays[key + "/hist"])
        return cls(scalars["groups"], scalars["num_steps"], stats, scalars["traces"])


class Observer(torch.fx.Interpreter):
    """Runs a graph module and hands each watched node's tensor value to `on_value(name, value)`."""

    def __init__(self, module: torch.fx.GraphModule, watch: set[str], on_value: Any) -> None:
        super().__init__(module)
        self.watch, self.on_value = watch, on_value

    def run_node(self, n: torch.fx.Node) -> Any:
        value = super().run_node(n)
        if n.name in self.watch and isinstance(value, torch.Tensor):
            self.on_value(n.name, value)
        return value


def compute_statistics(calibration: CalibrationSet, dg: DiffusionGraph, groups: int = 4,
                       nodes: list[str] | None = None, cache: bool = True, progress: bool = True,
                       items: set[str] | None = None) -> Statistics:
    """Runs the graph over every recorded call (of the trajectories `items`, all with None) once
    and gathers per-node statistics per timestep group and block feature traces. Cached in the
    set's folder per graph and settings."""
    calibration.check_compatible(dg)
    watch = nodes if nodes is not None else nodes_of_interest(dg)
    key = _cache_key(dg, groups, watch, items)
    path = calibration.root / "statistics" / key
    if cache and path.with_suffix(".json").is_file():
        return Statistics.load(path)
    layouts = _channel_dims(dg)
    block_outputs = {b.outputs[0]: b.name for b in dg.blocks if len(b.outputs) == 1}
    stats: dict[str, dict[int, NodeStats]] = {}
    change_sums: dict[str, dict[int, list[float]]] = {}
    previous: dict[str, torch.Tensor] = {}
    last = (None, None)
    num_steps = calibration.num_steps
    watch_set = set(watch)
    observed = watch_set | set(block_outputs)
    for record in progress_bar(calibration.records(items=items), progress, "calibration statistics", "call",
                               len(calibration)):
        group = step_group(record.step, record.num_steps, groups)
        consecutive = last[0] == record.item and last[1] == record.step - 1
        if not consecutive:
            previous = {}
        current: dict[str, torch.Tensor] = {}

        def on_value(name: str, value: torch.Tensor) -> None:
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise CalibrationError(f"non-finite activation in node {name} at step {record.step} of trajectory "
                                       f"{record.item}; the model produces NaN/Inf on this input")
            if name in watch_set:
                stats.setdefault(name, {}).setdefault(group, NodeStats()).update(value, layouts.get(name, -1))
            if name in block_outputs:
                block = block_outputs[name]
                if name in previous:
                    before = previous[name].double()
                    change = float((value.double() - before).abs().sum() / before.abs().sum().clamp_min(1e-12))
                    change_sums.setdefault(block, {}).setdefault(record.step, []).append(change)
                current[name] = value.detach()

        flat = [_input(record, spec.name) for spec in dg.signature.inputs]
        with torch.no_grad():
            Observer(dg.module, observed, on_value).run(*flat)
        previous = current
        last = (record.item, record.step)
    traces = {block: [float(np.mean(per_step[s])) if s in per_step else float("nan") for s in range(num_steps)]
              for block, per_step in change_sums.items()}
    result = Statistics(groups, num_steps, stats, traces)
    if cache:
        path.parent.mkdir(exist_ok=True)
        result.save(path)
    return result


def _input(record: Any, name: str) -> torch.Tensor:
    if name not in record.inputs:
        raise CalibrationError(f"recorded call at step {record.step} of {record.item} has no input {name!r}")
    return record.inputs[name]


def _channel_dims(dg: DiffusionGraph) -> dict[str, int]:
    """Channel axis of each node's output: 1 for conv feature maps (NCHW), last for token tensors."""
    dims = {}
    for node in dg.graph.nodes:
        meta = node.meta.get("tensor_meta")
        shape = getattr(meta, "shape", None)
        if shape is not None:
            dims[node.name] = 1 if len(shape) == 4 else -1
    return dims


def _cache_key(dg: DiffusionGraph, groups: int, watch: list[str], items: set[str] | None) -> str:
    import hashlib

    from ..ir.graph_file import graph_fingerprint

    # the weights are part of the key: graphs of one structure with other weights (SmoothQuant at
    # another alpha, a LoRA merged in) have other activations
    chosen = None if items is None else sorted(items)
    text = json.dumps([graph_fingerprint(dg), groups, watch] + ([] if chosen is None else [chosen]),
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]

