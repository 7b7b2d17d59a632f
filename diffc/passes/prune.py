"""Layer pruning: remove whole residual units (resnets, attentions, transformer blocks, FFNs,
stages whose input and output agree) by rewiring each unit's output to its residual input.

Scores (LD-Pruner): a unit's score is how much removing it alone moves the denoiser's output in
latent space, measured on calibration calls (relative MSE against the unpruned graph). LAPTOP-Diff
observes that this output loss is close to additive over sets of removed units; the pass measures
how well single scores add up on random sets (their correlation with the measured set errors is
in the report) and then picks the set by an exact tree knapsack on the additive scores: the least
summed score that removes at least the asked share of parameters, FLOPs or estimated latency (a
roofline model whose throughputs are measured on the machine the pass runs on, see `Roofline`),
a unit and the units nested in it never both chosen.

A removed unit is replaced by its mean residual (`compensate`): the per-channel mean of what it
adds to the residual stream on the calibration calls becomes a constant added in its place, the
closed-form bias compensation of pruning without training (it stays in the graph, so it does not
count as removed; scores are measured with it). Per-channel, not per-position: a per-token mean
of a fixed-resolution DiT fits the few calibration images and generalises worse. What a unit adds
drifts with the noise level, so the mean is taken per range of timesteps (`compensate_ranges`) and
each sample's timestep picks its range's row at run time (a compare and a small matmul), which
holds for any number of sampling steps.

Removal also drops the output rows of a linear whose split pieces are no longer read: adaLN-Zero
(DiT, PixArt, SD3, FLUX) computes one block's attention and FFN modulations with one linear, so
removing the attention removes half of that linear, and it counts towards the share removed.

With the live pipeline, the knapsack's optimum and its runners-up (the optimum with one of its
units excluded), up to `rerank` sets, are re-sampled through the real sampling loop and the set
of least trajectory error is kept: single-step errors add up within a step, but compound along
the loop differently per unit.

Without an `amount`, the share is derived from calibration data: the largest one whose pruned
model keeps the re-sampled calibration images above `min_psnr` (with the live pipeline), or the
teacher-forced output error below `max_relative_error` (without one).

With `recover_steps`, the pruned graph's remaining weights are then distilled for that many
steps against the unpruned graph on the calibration calls (LAPTOP-Diff's normalized feature
distillation, see `recover`; a step plan is trained through each of its variants); off by
default: pruning stays training-free unless asked. Scoring reads `max_records` calls, the
distillation all recorded ones (or `recover_records`), `recover_rows` rows per step: a
calibration set collected on more seeds gives it more data at the same cost per step.

With `step_groups > 1`, each range of denoising steps gets its own set (different units matter
at high and low noise, as in Delta-DiT's stage split): units removed at every step are removed
from the graph, the others become bypass regions of a step plan, one Plan variant per range
(a bypass passes its residual on unchanged: compensation and re-ranking need step_groups=1)."""
from __future__ import annotations

import functools
import math
import operator
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.fx
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from .._progress import progress
from ..calibration import trajectory_error
from ..calibration.statistics import _Observer
from ..errors import PassError
from ..ir import DiffusionGraph
from ..ir.graph import TIMESTEP
from ..ir.blocks import ATTENTION, FFN, RESNET, STAGE, TRANSFORMER_BLOCK, discover_blocks, node_flops
from ..ir.fxutil import attr_value
from ..ir.partition import BYPASS, build_plan
from ._search import search_grid
from .base import Pass, PassConfig, PassContext, PassResult, register_pass

TARGETS = ("params", "flops", "latency")
UNIT_KINDS = (RESNET, ATTENTION, TRANSFORMER_BLOCK, FFN, STAGE)
FULL = "full"
RECOVER_ROWS = 32
RECOVERY_CHECKS = 8
aten = torch.ops.aten
AMOUNT_GRID = tuple(round(0.05 * k, 2) for k in range(1, 13))


@dataclass(frozen=True)
class PruneConfig(PassConfig):
    target: str = "params"
    amount: float | None = None
    min_psnr: float = 30.0
    max_relative_error: float = 0.05
    kinds: tuple[str, ...] = UNIT_KINDS
    step_groups: int = 1
    max_records: int = 64
    additivity_sets: int = 16
    seed: int = 0
    progress: bool = False
    compensate: bool = True
    compensate_ranges: int = 4
    rerank: int = 4
    recover_steps: int = 0
    recover_lr: float = 1e-4
    recover_rows: int = RECOVER_ROWS
    recover_records: int | None = None

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")
        if self.amount is not None and not 0 <= self.amount < 1:
            raise ValueError(f"amount is the share of {self.target} to remove, in [0, 1); got {self.amount}")
        unknown = sorted(set(self.kinds) - set(UNIT_KINDS))
        if unknown or not self.kinds:
            raise ValueError(f"kinds must be a non-empty subset of {UNIT_KINDS}, got {self.kinds}")
        if self.step_groups < 1 or self.max_records < 1 or self.compensate_ranges < 1 or self.additivity_sets < 0 or \
                self.rerank < 0 or self.recover_steps < 0 or self.recover_lr <= 0 or self.recover_rows < 1 or \
                (self.recover_records is not None and self.recover_records < 1):
            raise ValueError("step_groups, max_records, compensate_ranges, recover_rows and recover_records must be "
                             ">= 1, additivity_sets, rerank and recover_steps >= 0, recover_lr > 0")


@dataclass
class Unit:
    """A removable residual unit: every use of `out` is rewired to `skip`."""

    name: str
    kind: str
    out: str
    skip: str
    parent: str | None
    params: int = 0
    flops: int = 0
    latency: float = 0.0


# --- units and their removal --------------------------------------------------------------------

def residual_units(dg: DiffusionGraph, kinds: Sequence[str] = UNIT_KINDS,
                   roofline: "Roofline | None" = None) -> list[Unit]:
    """The blocks that can be removed by rewiring a residual: attention/FFN branches added to the
    stream by their parent (output add -> its other operand), transformer blocks, resnets and
    stages whose output has the shape of an input (output -> that input), and resnets with a
    projected shortcut (residual add -> shortcut)."""
    nodes = {n.name: n for n in dg.graph.nodes}
    units: list[Unit] = []
    for block in dg.blocks:
        if block.kind not in kinds or block.residual is None:
            continue
        residual = block.residual
        if residual.in_parent:
            out, skip = residual.add, residual.skip
        elif block.identity_input is not None and len(block.outputs) == 1:
            out, skip = block.outputs[0], block.identity_input
        else:
            out, skip = residual.add, residual.skip
        if _shape(nodes.get(out)) is None or _shape(nodes.get(out)) != _shape(nodes.get(skip)):
            continue
        units.append(Unit(block.name, block.kind, out, skip, None))
    # a block whose removal rewires the same node to the same input as an enclosing one is the same removal
    units = [u for u in units if not any(_nested(u, v) and len(v.name) < len(u.name) and (v.out, v.skip) == (u.out, u.skip)
                                         for v in units)]
    names = [u.name for u in units]
    for unit in units:
        unit.parent = max((p for p in names if unit.name.startswith(p + ".")), key=len, default=None)
    total_params, total_flops = dg.num_parameters(), graph_flops(dg)
    total_latency = roofline.graph_seconds(dg) if roofline is not None else 0.0
    for unit in units:
        pruned = remove_units(dg.clone(), [unit])
        unit.params = total_params - pruned.num_parameters()
        unit.flops = total_flops - graph_flops(pruned)
        if roofline is not None:
            unit.latency = total_latency - roofline.graph_seconds(pruned)
    return units


def remove_units(dg: DiffusionGraph, units: Sequence[Unit],
                 offsets: Mapping[str, MeanResidual] | None = None) -> DiffusionGraph:
    """Rewires each unit's output to its residual input, plus the unit's entry in `offsets` (its
    mean residual, see `mean_residuals`) where it has one; removes what became dead and rebuilds
    the block table; `dg` is changed in place and returned."""
    if not units:
        return dg
    offsets = offsets or {}
    nodes = {n.name: n for n in dg.graph.nodes}
    order = {n: i for i, n in enumerate(dg.graph.nodes)}
    missing = [u.name for u in units if u.out not in nodes or u.skip not in nodes]
    if missing:
        raise PassError(f"units {missing} are not in this graph; score units on the graph you prune")
    replaced: dict[torch.fx.Node, torch.fx.Node] = {}
    for unit in sorted(units, key=lambda u: order[nodes[u.out]]):
        out, skip = nodes[unit.out], nodes[unit.skip]
        while skip in replaced:
            skip = replaced[skip]
        if unit.name in offsets:
            skip = _add_offset(dg, out, skip, f"{_region(unit)}_mean_residual", offsets[unit.name])
        out.replace_all_uses_with(skip)
        replaced[out] = skip
    _eliminate_dead_code(dg)
    return dg


def _add_offset(dg: DiffusionGraph, out: torch.fx.Node, skip: torch.fx.Node, name: str,
                offset: "MeanResidual") -> torch.fx.Node:
    """A new node skip + offset, placed before `out`: the offset a constant broadcast against `out`,
    or with timestep ranges, the row of the range each sample's timestep falls in."""
    dtype = out.meta["tensor_meta"].dtype
    with dg.graph.inserting_before(out):
        constant = _constant(dg, name, offset.table[0].to(dtype))
        timestep = _timestep_node(dg) if len(offset.table) > 1 else None
        if timestep is not None:
            constant = _per_timestep_offset(dg, name, offset, timestep, constant, dtype)
        shifted = dg.graph.create_node("call_function", aten.add.Tensor, (skip, constant), name=f"{name}_added")
    shifted.meta.update({k: v for k, v in out.meta.items() if k in ("tensor_meta", "val", "nn_module_stack")})
    return shifted


def _per_timestep_offset(dg: DiffusionGraph, name: str, offset: "MeanResidual", timestep: torch.fx.Node,
                         first: torch.fx.Node, dtype: torch.dtype) -> torch.fx.Node:
    """first + sum_k [t > boundary_k] * (table[k+1] - table[k]): the table row of each sample's
    timestep range, in ops every backend lowers (compare, cast, matmul, reshape), shaped
    [batch, *offset] so it broadcasts against the unit's output."""
    shape = list(offset.table.shape[1:])
    steps = (offset.table[1:] - offset.table[:-1]).reshape(len(offset.table) - 1, -1)
    graph = dg.graph

    def call(target: Any, *args: Any, **kwargs: Any) -> torch.fx.Node:
        return graph.call_function(target, args, kwargs)

    boundaries = _constant(dg, f"{name}_timestep_boundaries", torch.tensor(offset.boundaries, dtype=torch.float32))
    times = call(aten.reshape.default, call(aten._to_copy.default, timestep, dtype=torch.float32), [-1, 1])
    above = call(aten._to_copy.default, call(aten.gt.Tensor, times, boundaries), dtype=dtype)
    shift = call(aten.mm.default, above, _constant(dg, f"{name}_steps", steps.to(dtype)))
    return call(aten.add.Tensor, first, call(aten.reshape.default, shift, [-1, *shape]))


def _timestep_node(dg: DiffusionGraph) -> torch.fx.Node | None:
    placeholders = [n for n in dg.graph.nodes if n.op == "placeholder"]
    return next((node for spec, node in zip(dg.signature.inputs, placeholders) if spec.role == TIMESTEP), None)


@dataclass(frozen=True)
class MeanResidual:
    """What replaces a removed unit: `table[k]` is its mean residual over the calibration calls whose
    timestep lies in range k (ascending timesteps; ranges split at `boundaries`), one row when the
    mean is not split by timestep."""

    table: torch.Tensor
    boundaries: tuple[float, ...] = ()

    def numel(self) -> int:
        return self.table.numel() + len(self.boundaries)


def mean_residuals(dg: DiffusionGraph, units: Sequence[Unit], batch: "CalibrationBatch",
                   ranges: int = 1) -> dict[str, MeanResidual]:
    """Per unit: the mean of what it adds to its residual input (output - skip) on the calibration
    calls, the constant that best replaces the removed unit in the mean squared sense (the
    closed-form bias compensation of pruning without training), taken separately over `ranges`
    ranges of steps, whose timesteps then pick it at run time: what a unit adds drifts with the
    noise level. The mean runs over the batch and every dimension the graph keeps symbolic
    (resolution, sequence length), so it broadcasts at every shape the graph accepts. One range
    when the graph has no timestep input or the calibrated ranges' timesteps overlap."""
    spans = step_ranges(batch.num_steps, ranges)
    masks = [batch.step_mask(set(range(a, b))) for a, b in spans]
    masks = [m for m in masks if bool(m.any())]
    times = batch.row_timesteps
    if len(masks) > 1 and times is not None:
        bounds = sorted(((float(times[m].min()), float(times[m].max()), m) for m in masks), key=lambda b: b[:2])
        if all(low_next > high for (_, high, _), (low_next, _, _) in zip(bounds, bounds[1:])):
            tables = [_masked_mean_residuals(dg, units, batch, m) for _, _, m in bounds]
            boundaries = tuple((high + low_next) / 2 for (_, high, _), (low_next, _, _) in zip(bounds, bounds[1:]))
            return {u.name: MeanResidual(torch.stack([t[u.name] for t in tables]), boundaries) for u in units}
    everything = torch.ones(len(batch.row_steps), dtype=torch.bool)
    return {name: MeanResidual(mean[None]) for name, mean in _masked_mean_residuals(dg, units, batch, everything).items()}


def _masked_mean_residuals(dg: DiffusionGraph, units: Sequence[Unit], batch: "CalibrationBatch",
                           mask: torch.Tensor) -> dict[str, torch.Tensor]:
    watch = {u.out for u in units} | {u.skip for u in units}
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    seen: dict[str, torch.Tensor] = {}
    nodes = {n.name: n for n in dg.graph.nodes}
    dims = {u.name: _reduced_dims(nodes[u.out]) for u in units}
    for flat in batch.calls(mask):
        seen.clear()
        with torch.no_grad():
            _Observer(dg.module, watch, lambda n, v: seen.__setitem__(n, v.detach())).run(*flat)
        for unit in units:
            delta = (seen[unit.out] - seen[unit.skip]).double()
            rows = math.prod(delta.shape[d] for d in dims[unit.name])
            total = delta.sum(dim=dims[unit.name], keepdim=True)[0]
            sums[unit.name] = sums.get(unit.name, 0) + total
            counts[unit.name] = counts.get(unit.name, 0) + rows
    return {name: (total / counts[name]).float() for name, total in sums.items()}


def _reduced_dims(node: torch.fx.Node) -> tuple[int, ...]:
    """Every dimension but the channels (dim 1 of a 4-d feature map, the last of a token sequence)."""
    rank = len(_shape(node))
    channel = 1 if rank == 4 else rank - 1
    return tuple(d for d in range(rank) if d != channel)


def _eliminate_dead_code(dg: DiffusionGraph) -> None:
    """Erases unused nodes, dropout included (fx keeps it as a random op, but the captured graph
    runs in eval mode, where it is the identity), and the output rows of a linear whose chunks are
    no longer read (see `_narrow_dead_chunks`); runtime assertions stay."""
    _erase_unused(dg.graph)
    if _narrow_dead_chunks(dg):
        _erase_unused(dg.graph)
    dg.module = torch.fx.GraphModule(dg.weights(), dg.graph)
    dg.blocks = discover_blocks(dg.module)
    alive = {n.name for n in dg.graph.nodes}
    dg.annotations = {k: v for k, v in dg.annotations.items() if k in alive}


def _erase_unused(graph: torch.fx.Graph) -> None:
    for node in reversed(list(graph.nodes)):
        if node.op in ("call_function", "get_attr") and not node.users and \
                not str(getattr(node.target, "__name__", node.target)).startswith("_assert"):
            graph.erase_node(node)


_CHUNKS = (aten.chunk.default, aten.split.Tensor, aten.split_with_sizes.default)


def _narrow_dead_chunks(dg: DiffusionGraph) -> bool:
    """A linear whose output is only split along its features, with some pieces no longer read,
    computes just the rows of the pieces still read: adaLN-Zero's modulation linear (DiT, PixArt,
    SD3, FLUX) emits shift, scale and gate for both the attention and the FFN of its block, so
    removing one of them leaves half of that linear's rows dead. Returns whether any changed."""
    changed = False
    for split in [n for n in dg.graph.nodes if n.op == "call_function" and n.target in _CHUNKS]:
        linear = split.args[0]
        pieces = _piece_sizes(split)
        if not (isinstance(linear, torch.fx.Node) and linear.target == aten.linear.default and len(linear.users) == 1
                and pieces is not None and all(u.target is operator.getitem for u in split.users)):
            continue
        read = sorted({int(u.args[1]) for u in split.users})
        weight_node, bias_node = linear.args[1], linear.args[2] if len(linear.args) > 2 else None
        if len(read) == len(pieces) or not all(isinstance(a, torch.fx.Node) and a.op == "get_attr"
                                               for a in (weight_node, bias_node) if a is not None):
            continue
        starts = np.cumsum([0, *pieces]).tolist()
        rows = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in read])
        with dg.graph.inserting_before(linear):
            narrowed = [_constant(dg, f"{linear.name}_live_{kind}", attr_value(dg.module, node.target)[rows])
                        if node is not None else None for kind, node in (("weight", weight_node), ("bias", bias_node))]
        linear.args = (linear.args[0], *[n for n in narrowed if n is not None])
        meta = linear.meta["tensor_meta"]
        linear.meta["tensor_meta"] = meta._replace(shape=torch.Size([*meta.shape[:-1], len(rows)]))
        linear.meta.pop("val", None)
        with dg.graph.inserting_after(split):
            live = dg.graph.call_function(aten.split_with_sizes.default, (linear, [pieces[i] for i in read], -1))
        live.meta.update({k: v for k, v in split.meta.items() if k != "val"})
        for user in list(split.users):
            user.args = (live, read.index(int(user.args[1])))
        changed = True
    return changed


def _piece_sizes(split: torch.fx.Node) -> list[int] | None:
    """The sizes of the pieces a chunk/split node cuts its input's last dimension into, or None when
    it cuts another dimension or the size is not static."""
    shape = _shape(split.args[0]) if isinstance(split.args[0], torch.fx.Node) else None
    dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
    if not shape or dim not in (-1, len(shape) - 1) or not isinstance(shape[-1], int):
        return None
    length, how = shape[-1], split.args[1]
    if split.target == aten.split_with_sizes.default:
        return [int(s) for s in how]
    size = math.ceil(length / how) if split.target == aten.chunk.default else int(how)
    return [min(size, length - start) for start in range(0, length, size)]


def _constant(dg: DiffusionGraph, name: str, tensor: torch.Tensor) -> torch.fx.Node:
    """A get_attr node (at the graph's insertion point) reading a copy of `tensor`, registered as a
    buffer under `name`, or `name_1`, `name_2`... when that is taken."""
    taken, base, index = set(dict(dg.module.named_buffers())) | set(dict(dg.module.named_parameters())), name, 1
    while name in taken:
        name, index = f"{base}_{index}", index + 1
    dg.module.register_buffer(name, tensor.detach().clone().contiguous())
    node = dg.graph.get_attr(name)
    node.meta["tensor_meta"] = _extract_tensor_metadata(getattr(dg.module, name))
    return node


def graph_flops(dg: DiffusionGraph) -> int:
    return sum(node_flops(n) for n in dg.graph.nodes)


@dataclass(frozen=True)
class Roofline:
    """An estimated-latency model: each op costs the larger of its compute time (FLOPs at the
    machine's matmul throughput) and its memory time (bytes of its tensor inputs and output at the
    machine's copy bandwidth), plus a fixed cost per op (dispatch or kernel launch). The three
    figures are measured on the device the graph's weights live on, so the estimate follows the
    machine the pass runs on, at the calibration shapes recorded in the graph."""

    flops_per_s: float
    bytes_per_s: float
    op_seconds: float

    @classmethod
    def measure(cls, device: torch.device | str = "cpu", repeats: int = 5) -> "Roofline":
        size, elements = 512, 1 << 22

        def best(fn: Callable[[], Any]) -> float:
            fn()
            times = []
            for _ in range(repeats):
                if torch.device(device).type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                fn()
                if torch.device(device).type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            return max(min(times), 1e-9)

        a = torch.randn(size, size, device=device)
        source, target = torch.randn(elements, device=device), torch.empty(elements, device=device)
        tiny = torch.zeros(1, device=device)
        with torch.no_grad():
            flops = 2 * size ** 3 / best(lambda: a @ a)
            bandwidth = 2 * 4 * elements / best(lambda: target.copy_(source))
            op = best(lambda: [tiny.add(1) for _ in range(100)]) / 100
        return cls(flops, bandwidth, op)

    def node_seconds(self, node: torch.fx.Node) -> float:
        if node.op != "call_function":
            return 0.0
        tensors = [a for a in node.all_input_nodes if _nbytes(a)] + [node]
        memory = sum(_nbytes(t) for t in tensors) / self.bytes_per_s
        return max(node_flops(node) / self.flops_per_s, memory) + self.op_seconds

    def graph_seconds(self, dg: DiffusionGraph) -> float:
        return sum(self.node_seconds(n) for n in dg.graph.nodes)


def _nbytes(node: torch.fx.Node) -> int:
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        return 0
    return math.prod(meta.shape) * torch.empty((), dtype=meta.dtype).element_size()


def _shape(node: torch.fx.Node | None) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if node is not None else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


# --- calibration batches ------------------------------------------------------------------------

class CalibrationBatch:
    """Up to `max_records` recorded calls (all of them with None) spread evenly over the steps,
    stacked into batches, with the outputs of a reference graph on them: errors of candidates are
    relative MSE against it."""

    def __init__(self, calibration: Any, reference: DiffusionGraph, max_records: int | None) -> None:
        records = list(calibration.records())
        if not records:
            raise PassError("the calibration set holds no recorded calls; collect it again")
        if max_records is not None and len(records) > max_records:
            keep = np.linspace(0, len(records) - 1, max_records).round().astype(int)
            records = [records[i] for i in sorted(set(keep.tolist()))]
        self.num_steps = max(r.num_steps for r in records)
        names = [spec.name for spec in reference.signature.inputs]
        flat = [[r.inputs[n] for n in names] for r in records]
        rows = [r.inputs[names[0]].shape[0] for r in records]
        self.row_steps = torch.tensor([r.step for r, n in zip(records, rows) for _ in range(n)])
        timestep = reference.signature.timestep
        per_row = [r.inputs[timestep.name].double().reshape(-1) for r in records] if timestep is not None else []
        self.row_timesteps = torch.cat([t.expand(n) if t.numel() == 1 else t for t, n in zip(per_row, rows)]) \
            if per_row and all(t.numel() in (1, n) for t, n in zip(per_row, rows)) else None
        stacked = [torch.cat(parts) for parts in zip(*flat)]
        try:
            with torch.no_grad():
                self.reference = _first(reference.module(*stacked))
            self.batches = [stacked]
        except Exception:  # noqa: BLE001 - a graph captured with a pinned batch takes one call at a time
            self.batches = flat
            self.reference = self.outputs(reference.module)
        # each row is measured against its own call's mean square (calibration.relative_error)
        self.energy = torch.cat([part.double().pow(2).mean().clamp_min(1e-20).expand(part.shape[0])
                                 for part in self.reference.split(rows)])

    def outputs(self, run: Callable[..., Any]) -> torch.Tensor:
        results = []
        with torch.no_grad():
            for batch in self.batches:
                out = run(*batch)
                results.append(out[0] if isinstance(out, (tuple, list)) else out)
        return torch.cat(results)

    def row_errors(self, output: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Per calibration row (of `mask`, all by default): MSE against the reference, relative to
        the mean square of the reference call the row belongs to."""
        reference, energy = (self.reference, self.energy) if mask is None else (self.reference[mask], self.energy[mask])
        diff = (output.double() - reference.double()).pow(2)
        return diff.reshape(diff.shape[0], -1).mean(dim=1) / energy

    def mean_error(self, row_errors: torch.Tensor, mask: torch.Tensor | None = None) -> float:
        """The relative error every pass reports (calibration.relative_error): per step the mean over
        its rows (of `mask`), then the mean over steps."""
        steps = self.row_steps if mask is None else self.row_steps[mask]
        errors = row_errors if mask is None else row_errors[mask]
        per_step = [errors[steps == step].mean() for step in steps.unique()]
        return float(torch.stack(per_step).mean()) if per_step else 0.0

    def error(self, run: Callable[..., Any], steps: set[int] | None = None) -> float:
        return self.mean_error(self.row_errors(self.outputs(run)), None if steps is None else self.step_mask(steps))

    def step_mask(self, steps: set[int]) -> torch.Tensor:
        return torch.tensor([int(s) in steps for s in self.row_steps])

    def calls(self, mask: torch.Tensor) -> list[list[torch.Tensor]]:
        """The flat inputs of the rows in `mask`, as calls the graph accepts (in row order)."""
        if len(self.batches) == 1:
            return [[t[mask] for t in self.batches[0]]]
        calls, start = [], 0
        for flat in self.batches:
            rows = flat[0].shape[0]
            if bool(mask[start:start + rows].all()):
                calls.append(flat)
            start += rows
        return calls


def step_ranges(num_steps: int, groups: int) -> list[tuple[int, int]]:
    """`groups` contiguous ranges of steps [start, end) covering 0..num_steps."""
    groups = min(groups, num_steps)
    bounds = np.linspace(0, num_steps, groups + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def range_step_plan(regions: list[dict[str, Any]], ranges: Sequence[tuple[int, int]], skipped: Sequence[list[str]],
                    summary: dict[str, Any], default: int | None = None) -> dict[str, Any]:
    """A step plan with one variant per range of steps, named by its range, skipping that range's
    regions. A call at a step outside the schedule runs the `default` range's variant, or, without
    one, a variant that skips nothing."""
    names = [f"steps_{start}_{end}" for start, end in ranges]
    variants = {FULL: []} if default is None else {}
    variants.update(zip(names, skipped))
    return {"regions": regions, "variants": variants,
            "schedule": {"default": FULL if default is None else names[default],
                         "steps": [name for name, (start, end) in zip(names, ranges) for _ in range(start, end)],
                         "repeat": False},
            "summary": summary}


# --- selection ----------------------------------------------------------------------------------

def knapsack(units: Sequence[Unit], scores: Sequence[float], weights: Sequence[float], need: float,
             resolution: int = 400) -> list[Unit]:
    """The set of units with the least summed score whose summed weight reaches `need`, never a
    unit together with one nested in it: a min-plus tree knapsack over the nesting forest, weights
    discretised into `resolution` steps of the need (rounded down, so the need is met)."""
    if need <= 0:
        return []
    if sum(weights) < need:
        raise PassError(f"the prunable units hold {sum(weights):.4g} in all, less than the {need:.4g} asked; "
                        "lower amount or allow more kinds of units")
    quantum = need / resolution
    cap = resolution
    index = {u.name: i for i, u in enumerate(units)}
    children: dict[str | None, list[int]] = {}
    for i, unit in enumerate(units):
        children.setdefault(unit.parent if unit.parent in index else None, []).append(i)
    inf = math.inf

    def combine(a: tuple[np.ndarray, list[list[int]]], b: tuple[np.ndarray, list[list[int]]]):
        cost_a, sets_a = a
        cost_b, sets_b = b
        cost = np.full(cap + 1, inf)
        sets: list[list[int]] = [[] for _ in range(cap + 1)]
        for wa in np.nonzero(np.isfinite(cost_a))[0]:
            for wb in np.nonzero(np.isfinite(cost_b))[0]:
                w = min(cap, wa + wb)
                c = cost_a[wa] + cost_b[wb]
                if c < cost[w]:
                    cost[w], sets[w] = c, sets_a[wa] + sets_b[wb]
        return cost, sets

    def empty() -> tuple[np.ndarray, list[list[int]]]:
        cost = np.full(cap + 1, inf)
        cost[0] = 0.0
        return cost, [[] for _ in range(cap + 1)]

    def solve(i: int | None) -> tuple[np.ndarray, list[list[int]]]:
        table = empty()
        for child in children.get(i if i is None else units[i].name, []):
            table = combine(table, solve(child))
        if i is not None:
            w = min(cap, int(weights[i] / quantum))
            if scores[i] < table[0][w]:
                table[0][w], table[1][w] = scores[i], [i]
        return table

    cost, sets = solve(None)
    if not np.isfinite(cost[cap]):
        raise PassError(f"no set of non-nested units removes the {need:.4g} asked; lower amount")
    return [units[i] for i in sorted(sets[cap])]


def additivity(dg: DiffusionGraph, units: Sequence[Unit], scores: Sequence[float], batch: CalibrationBatch,
               count: int, seed: int, steps: set[int] | None = None,
               offsets: Mapping[str, MeanResidual] | None = None) -> dict[str, Any]:
    """Measured error of random sets of non-nested units against the sum of their single scores
    (LAPTOP-Diff's additivity): Pearson correlation and the mean measured / predicted ratio."""
    rng = random.Random(seed)
    predicted, measured = [], []
    flat = list(range(len(units)))
    for _ in range(count):
        size = rng.randint(2, max(2, min(len(flat), 6)))
        chosen: list[int] = []
        for i in rng.sample(flat, len(flat)):
            if len(chosen) == size:
                break
            if not any(_nested(units[i], units[j]) for j in chosen):
                chosen.append(i)
        if len(chosen) < 2:
            continue
        pruned = remove_units(dg.clone(), [units[i] for i in chosen], offsets)
        predicted.append(sum(scores[i] for i in chosen))
        measured.append(batch.error(pruned.module, steps))
    if len(predicted) < 3:
        return {"sets": len(predicted)}
    correlation = float(np.corrcoef(predicted, measured)[0, 1]) if np.std(predicted) > 0 and np.std(measured) > 0 \
        else float("nan")
    ratio = float(np.mean([m / p for m, p in zip(measured, predicted) if p > 0]))
    return {"sets": len(predicted), "pearson": round(correlation, 4), "measured_over_predicted": round(ratio, 4)}


def _nested(a: Unit, b: Unit) -> bool:
    return a.name.startswith(b.name + ".") or b.name.startswith(a.name + ".")


# --- the pass -----------------------------------------------------------------------------------

@register_pass
class PrunePass(Pass):
    name = "prune"
    Config = PruneConfig
    requires = ("calibrated", "full_precision")
    removes_layers = True

    def writes_step_plan(self) -> bool:
        return self.config.step_groups > 1

    def run(self, dg: DiffusionGraph, ctx: PassContext) -> PassResult:
        cfg = self.config
        if dg.step_plan:
            raise PassError("the graph already has a step plan (cache or moe ran before); run prune first in "
                            "the pipeline, e.g. ['prune', 'cache']")
        ctx.calibration.check_compatible(dg)
        roofline = None
        if cfg.target == "latency":
            roofline = Roofline.measure(next(iter(dg.weights().values())).device)
        units = residual_units(dg, cfg.kinds, roofline)
        if cfg.step_groups > 1:
            # bypass regions must be disjoint: per step range, only innermost units are candidates
            units = [u for u in units if not any(v.parent == u.name for v in units)]
        if not units:
            raise PassError(f"{dg.signature.model_class}: no block of kinds {cfg.kinds} has a residual that can be "
                            "rewired; this model has nothing layer pruning can remove")
        batch = CalibrationBatch(ctx.calibration, dg, cfg.max_records)
        total = {"params": dg.num_parameters, "flops": lambda: graph_flops(dg),
                 "latency": lambda: roofline.graph_seconds(dg)}[cfg.target]()
        ranges = step_ranges(batch.num_steps, cfg.step_groups) if cfg.step_groups > 1 else [(0, batch.num_steps)]
        groups = [set(range(a, b)) for a, b in ranges]
        # a bypass region of a step plan passes its residual on unchanged: compensation needs step_groups=1
        offsets = mean_residuals(dg, units, batch, cfg.compensate_ranges) if cfg.compensate and len(groups) == 1 \
            else {}
        # a unit's mean residual stays in the graph as a constant: it does not count as removed
        weights = [self._weight(u, offsets.get(u.name), roofline, dg) for u in units]
        scores = self._scores(dg, units, batch, groups, offsets, cfg.progress or ctx.progress)
        report: dict[str, Any] = {"target": cfg.target, "candidates": len(units),
                                  **({"roofline": {"flops_per_s": f"{roofline.flops_per_s:.3g}",
                                                   "bytes_per_s": f"{roofline.bytes_per_s:.3g}",
                                                   "op_seconds": f"{roofline.op_seconds:.3g}"}} if roofline else {}),
                                  "scores": {u.name: [round(s[i], 6) for s in scores] for i, u in enumerate(units)}}
        report["additivity"] = additivity(dg, units, scores[0] if len(groups) == 1 else
                                          [float(np.mean([s[i] for s in scores])) for i in range(len(units))],
                                          batch, cfg.additivity_sets, cfg.seed, offsets=offsets)

        live = ctx.calibration.pipeline is not None and ctx.denoiser_for is not None
        reranked: dict[float, list[dict[str, Any]]] = {}

        @functools.lru_cache(maxsize=None)
        def build(amount: float) -> tuple[DiffusionGraph, list[list[Unit]]]:
            chosen = [knapsack(units, score, weights, amount * total) for score in scores]
            if live and cfg.rerank > 1 and len(groups) == 1 and chosen[0]:
                chosen[0], reranked[amount] = self._rerank(dg, units, scores[0], weights, amount * total, chosen[0],
                                                           offsets, ctx)
            return self._pruned(dg, chosen, ranges, batch.num_steps, offsets), chosen

        amount = cfg.amount
        if amount is None:
            amount, report["amount_search"] = search_grid(
                AMOUNT_GRID, lambda share: build(share)[0], ctx, knob="amount",
                offline_error=lambda pruned: _plan_error(pruned, batch), min_psnr=cfg.min_psnr,
                max_relative_error=cfg.max_relative_error, quality_rises=False, fallback=0.0, infeasible=(PassError,))
        pruned, chosen = build(amount)
        if cfg.recover_steps and any(chosen):
            distillation_calls = CalibrationBatch(ctx.calibration, dg, cfg.recover_records)
            pruned, report["recovery_loss"] = recover(pruned, dg, distillation_calls, cfg.recover_steps, cfg.recover_lr,
                                                      cfg.seed, cfg.progress or ctx.progress,
                                                      rows_per_step=cfg.recover_rows, validation=batch)
            report["relative_error_before_recovery"] = report["recovery_loss"]["validation_error"]["start"]
        if amount in reranked:
            report["reranked"] = reranked[amount]
        report.update(self._summary(dg, pruned, chosen, ranges, amount, batch, groups))
        if roofline is not None and len(chosen) == 1:
            report["latency_removed_share"] = round(1 - roofline.graph_seconds(pruned) / max(total, 1e-12), 4)
        index = {u.name: i for i, u in enumerate(units)}
        # the sum of single scores the selection minimised, beside the measured relative_error
        report["predicted_error"] = round(float(np.mean([sum(score[index[u.name]] for u in units_g)
                                                          for score, units_g in zip(scores, chosen)])), 6)
        return PassResult(pruned, modified=any(chosen), report=report)

    def _weight(self, unit: Unit, offset: MeanResidual | None, roofline: Roofline | None,
                dg: DiffusionGraph) -> float:
        """What removing the unit saves of the target, less what its mean residual (an add of a
        constant) costs."""
        if self.config.target == "params":
            return float(unit.params - (offset.numel() if offset is not None else 0))
        if self.config.target == "flops":
            return float(unit.flops)
        assert roofline is not None
        if offset is None:
            return unit.latency
        out = next(n for n in dg.graph.nodes if n.name == unit.out)
        added = 2 * _nbytes(out) + offset.numel() * offset.table.element_size()
        return unit.latency - roofline.op_seconds - added / roofline.bytes_per_s

    def _rerank(self, dg: DiffusionGraph, units: list[Unit], scores: list[float], weights: list[float],
                need: float, best: list[Unit], offsets: Mapping[str, MeanResidual],
                ctx: PassContext) -> tuple[list[Unit], list[dict[str, Any]]]:
        """Among the knapsack's optimum and its runners-up (the optimum with one of its units
        excluded), up to `rerank` sets, the one whose pruned model re-samples the calibration
        trajectories closest to the original: single-step output errors are summed by the knapsack,
        but errors compound along the sampling loop differently per unit."""
        candidates = [best]
        for excluded in best:
            if len(candidates) >= self.config.rerank:
                break
            masked = [math.inf if u is excluded else s for u, s in zip(units, scores)]
            try:
                alternative = knapsack(units, masked, weights, need)
            except PassError:
                continue
            if {u.name for u in alternative} not in [{u.name for u in c} for c in candidates]:
                candidates.append(alternative)
        measured = []
        for candidate in candidates:
            pruned = remove_units(dg.clone(), candidate, offsets)
            measured.append(trajectory_error(ctx.calibration, ctx.denoiser_for(pruned))["mse"])
        record = [{"removed": [u.name for u in c], "trajectory_mse": round(m, 8)} for c, m in zip(candidates, measured)]
        return candidates[int(np.argmin(measured))], record

    def _scores(self, dg: DiffusionGraph, units: list[Unit], batch: CalibrationBatch,
                groups: list[set[int]], offsets: Mapping[str, MeanResidual], show_progress: bool) -> list[list[float]]:
        """scores[g][i]: mean relative output error over the calls in step range g with unit i removed."""
        masks = [batch.step_mask(g) for g in groups]
        scores: list[list[float]] = [[] for _ in groups]
        for unit in progress(units, show_progress, "prune: scoring units", "unit"):
            errors = batch.row_errors(batch.outputs(remove_units(dg.clone(), [unit], offsets).module))
            for g, mask in enumerate(masks):
                scores[g].append(batch.mean_error(errors, mask))
        return scores

    def _pruned(self, dg: DiffusionGraph, chosen: list[list[Unit]], ranges: list[tuple[int, int]],
                num_steps: int, offsets: Mapping[str, MeanResidual] | None = None) -> DiffusionGraph:
        """Units chosen for every step range are removed from the graph; the others become bypass
        regions skipped by the variants of the ranges that chose them."""
        everywhere = [u for u in chosen[0] if all(any(v.name == u.name for v in c) for c in chosen)]
        pruned = remove_units(dg.clone(), everywhere, offsets)
        gone = {u.name for u in everywhere}
        partial = {u.name: u for c in chosen for u in c if u.name not in gone}
        if not partial:
            return pruned
        alive = {n.name for n in pruned.graph.nodes}
        rewired = {u.out: f"{_region(u)}_mean_residual_added" if u.name in (offsets or {}) else u.skip
                   for u in everywhere}
        regions = []
        for unit in partial.values():
            skip = unit.skip
            while skip in rewired:
                skip = rewired[skip]
            if unit.out not in alive or skip not in alive:
                raise PassError(f"unit {unit.name} lost its nodes to another removal; use step_groups=1")
            regions.append({"name": _region(unit), "cuts": [unit.out], "bases": {unit.out: skip}, "mode": BYPASS})
        pruned.step_plan = range_step_plan(regions, ranges,
                                           [sorted(_region(u) for u in units if u.name in partial) for units in chosen],
                                           {"pass": "prune", "step_ranges": ranges})
        return pruned

    def _summary(self, dg: DiffusionGraph, pruned: DiffusionGraph, chosen: list[list[Unit]],
                 ranges: list[tuple[int, int]], amount: float, batch: CalibrationBatch,
                 groups: list[set[int]]) -> dict[str, Any]:
        params, flops = dg.num_parameters(), graph_flops(dg)
        summary: dict[str, Any] = {
            "amount": amount,
            "params_removed": params - pruned.num_parameters(),
            "params_removed_share": round(1 - pruned.num_parameters() / max(params, 1), 4),
        }
        if len(chosen) == 1:
            summary["removed"] = [u.name for u in chosen[0]]
            summary["flops_removed_share"] = round(1 - graph_flops(pruned) / max(flops, 1), 4)
        else:
            summary["removed_per_steps"] = {f"{a}-{b}": [u.name for u in c] for (a, b), c in zip(ranges, chosen)}
            per_variant = []
            for (start, end), units in zip(ranges, chosen):
                removed = remove_units(dg.clone(), units)
                per_variant.append((1 - graph_flops(removed) / max(flops, 1)) * (end - start))
            summary["flops_removed_share"] = round(sum(per_variant) / max(batch.num_steps, 1), 4)
        summary["relative_error"] = round(_plan_error(pruned, batch), 6)
        summary["relative_error_per_range"] = [round(_plan_error(pruned, batch, g), 6) for g in groups]
        return summary


# --- recovery -----------------------------------------------------------------------------------

def recover(pruned: DiffusionGraph, teacher: DiffusionGraph, batch: CalibrationBatch, steps: int, lr: float,
            seed: int, show_progress: bool = False, label: str = "prune", rows_per_step: int = RECOVER_ROWS,
            validation: CalibrationBatch | None = None) -> tuple[DiffusionGraph, dict[str, Any]]:
    """LAPTOP-Diff's recovery: a short normalized feature distillation of the pruned graph's
    remaining weights against the unpruned graph on the calibration calls. Loss: the output's
    squared error relative to the teacher output's energy, plus the same normalized error at every
    kept block boundary (block outputs present in both graphs), averaged. Adam, one calibration
    call (or `rows_per_step` random rows of the stacked calls) per step: a step costs the same
    however many calls were recorded, more of them (more seeds) only add data. A graph with a
    step plan is trained through each of its variants in turn, on the calls of the steps that
    variant runs (see `variant_views`), so weights shared by variants learn from all of their
    steps. With `validation`, the relative output error on those calls is checked at the start
    and `RECOVERY_CHECKS` times along the way, and the weights of least error are kept: a
    learning rate too high for a model that starts close to its teacher cannot leave it worse.
    Returns a copy with its own weights (the teacher's stay untouched) and the first and last
    losses, the steps, the calibration rows drawn from and the validation errors."""
    student = pruned.clone()
    weights = {name: tensor.detach().clone().requires_grad_(tensor.is_floating_point())
               for name, tensor in student.weights().items()}
    for name, tensor in weights.items():
        _set_attr(student.module, name, tensor)
    trainable = [t for t in weights.values() if t.requires_grad]
    views = [(view, rows, sorted({b.outputs[0] for b in teacher.blocks if len(b.outputs) == 1} &
                                 {n.name for n in view.graph.nodes}))
             for view, rows in variant_views(student, batch)]
    optimizer = torch.optim.Adam(trainable, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    checks = set(np.linspace(0, steps, RECOVERY_CHECKS + 1).round().astype(int)[1:].tolist())
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    if validation is not None:
        start_error = _plan_error(student, validation)
        best = (start_error, 0, {name: t.detach().clone() for name, t in weights.items()})
    for step in progress(range(steps), show_progress, f"{label}: recovery", "step"):
        view, rows, boundaries = views[step % len(views)]
        flat = _recovery_call(batch, rows, rows_per_step, generator)
        with torch.no_grad():
            target_features: dict[str, torch.Tensor] = {}
            target = _Observer(teacher.module, set(boundaries), target_features.__setitem__).run(*flat)
        features: dict[str, torch.Tensor] = {}
        output = _Observer(view.module, set(boundaries), features.__setitem__).run(*flat)
        terms = [_normalized_error(_first(output), _first(target))]
        terms += [_normalized_error(features[n], target_features[n]) for n in boundaries if n in features]
        loss = torch.stack(terms).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if best is not None and step + 1 in checks:
            error = _plan_error(student, validation)
            if error < best[0]:
                best = (error, step + 1, {name: t.detach().clone() for name, t in weights.items()})
    kept = {name: t.detach() for name, t in weights.items()} if best is None else best[2]
    for name, tensor in kept.items():
        _set_attr(student.module, name, tensor)
    summary: dict[str, Any] = {"first": round(losses[0], 6), "last": round(losses[-1], 6), "steps": steps,
                               "rows": len(batch.row_steps)}
    if best is not None:
        summary["validation_error"] = {"start": round(start_error, 6), "kept": round(best[0], 6),
                                       "kept_after_step": best[1]}
    return student, summary


def variant_views(dg: DiffusionGraph, batch: CalibrationBatch) -> list[tuple[DiffusionGraph, torch.Tensor]]:
    """(graph, calibration rows) per variant of a step plan of bypass regions that the calibrated
    steps run: a copy of the graph (reading the same weight tensors) with that variant's skipped
    regions bypassed, and the rows of the steps scheduled to it. Without a step plan, the graph
    itself on every row."""
    if not dg.step_plan:
        return [(dg, torch.ones(len(batch.row_steps), dtype=torch.bool))]
    regions = {r["name"]: r for r in dg.step_plan["regions"]}
    views = []
    for variant, rows in _rows_by_variant(build_plan(dg).schedule, batch).items():
        view = dg.clone()
        view.step_plan = None
        nodes = {n.name: n for n in view.graph.nodes}
        order = {n: i for i, n in enumerate(view.graph.nodes)}
        bypassed: dict[torch.fx.Node, torch.fx.Node] = {}
        cuts = sorted(((cut, region["bases"][cut]) for name in dg.step_plan["variants"][variant]
                       for region in [regions[name]] for cut in region["cuts"]), key=lambda c: order[nodes[c[0]]])
        for cut, base in cuts:
            source = nodes[base]
            while source in bypassed:
                source = bypassed[source]
            nodes[cut].replace_all_uses_with(source)
            bypassed[nodes[cut]] = source
        view.module.recompile()
        views.append((view, rows))
    return views


def _recovery_call(batch: CalibrationBatch, rows: torch.Tensor, rows_per_step: int,
                   generator: torch.Generator) -> list[torch.Tensor]:
    calls = batch.calls(rows)
    if len(calls) > 1:
        return calls[int(torch.randint(len(calls), (1,), generator=generator))]
    count = calls[0][0].shape[0]
    pick = torch.randperm(count, generator=generator)[:rows_per_step]
    return [t[pick] for t in calls[0]]


def _normalized_error(value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (value - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-12)


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _set_attr(module: torch.nn.Module, target: str, value: torch.Tensor) -> None:
    *path, name = target.split(".")
    owner = module
    for part in path:
        owner = getattr(owner, part)
    if name in owner._parameters:
        del owner._parameters[name]
    owner._buffers.pop(name, None)
    owner.register_buffer(name, value)


def _region(unit: Unit) -> str:
    """Segment names (cache_<region>) become module attribute names in backends: no dots."""
    return unit.name.replace(".", "_")


def _plan_error(dg: DiffusionGraph, batch: CalibrationBatch, steps: set[int] | None = None) -> float:
    """Relative output error of a (possibly step-planned) graph on the calibration rows, each row
    run through the variant its step is scheduled to."""
    if not dg.step_plan:
        return batch.error(dg.module, steps)
    plan = build_plan(dg)
    names = [spec.name for spec in dg.signature.inputs]
    errors = torch.zeros(len(batch.row_steps), dtype=torch.float64)
    measured = torch.zeros(len(batch.row_steps), dtype=torch.bool)
    for variant, mask in _rows_by_variant(plan.schedule, batch, steps).items():
        outputs = []
        for flat in batch.calls(mask):
            with torch.no_grad():
                out, _ = plan.run(variant, dict(zip(names, flat)), {})
            outputs.append(out[0])
        errors[mask] = batch.row_errors(torch.cat(outputs), mask)
        measured |= mask
    return batch.mean_error(errors, measured)


def _rows_by_variant(schedule: Any, batch: CalibrationBatch, steps: set[int] | None = None) -> dict[str, torch.Tensor]:
    """The calibration rows each variant of `schedule` runs (of the steps in `steps`, all by default)."""
    rows: dict[str, torch.Tensor] = {}
    for step in sorted(set(batch.row_steps.tolist())):
        if steps is not None and step not in steps:
            continue
        variant = schedule.variant_for(step, batch.num_steps)
        mask = batch.row_steps == step
        rows[variant] = rows[variant] | mask if variant in rows else mask
    return rows
