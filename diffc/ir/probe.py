"""Verifies the dims capture keeps symbolic: the captured graph is run against the model with one
symbolic dim changed at a time (batch +1, the others doubled).

One dim at a time, because a probe that changes them all together passes a model that only works
while two of them agree (square latents) and cannot say which dim broke; its cost is about that of
one probe of every dim at once, whose sizes multiply. A probe that fails in any way (the model
raising, the graph raising, different outputs) pins its dim instead of failing the capture."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.fx
from torch.utils import _pytree as pytree

from .examples import SPATIAL_KINDS, TOKEN_NAMES

TOLERANCE = 1e-4

FlatInputs = list[tuple[tuple[str, ...], torch.Tensor]]
# the kind of each dim of each tensor input (examples.dim_kinds), by its path
DimKinds = Mapping[tuple[str, ...], tuple[str | None, ...]]


def flat_tensor_inputs(kwargs: Mapping[str, Any]) -> FlatInputs:
    """(path, tensor) for every tensor leaf, in the order torch.export makes placeholders: an
    argument, a value of a dict argument (path (name, key)) or an item of a list or tuple argument
    (path (name, "0"), as HiDream's per-layer text states or a rotary (cos, sin) pair come)."""
    out: FlatInputs = []
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            out.append(((key,), value))
        elif isinstance(value, Mapping):
            for sub, leaf in value.items():
                if isinstance(leaf, torch.Tensor):
                    out.append(((key, sub), leaf))
        elif isinstance(value, (list, tuple)):
            out.extend(((key, str(i)), leaf) for i, leaf in enumerate(value) if isinstance(leaf, torch.Tensor))
    return out


def tensor_at(kwargs: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    """The value at `path` (as flat_tensor_inputs names it) in the arguments; None where there is none."""
    value = kwargs.get(path[0])
    if len(path) == 1:
        return value
    if isinstance(value, Mapping):
        return value.get(path[1])
    if isinstance(value, (list, tuple)) and path[1].isdigit() and int(path[1]) < len(value):
        return value[int(path[1])]
    return None


def with_tensor(kwargs: Mapping[str, Any], path: tuple[str, ...], tensor: torch.Tensor) -> dict[str, Any]:
    """A copy of the arguments with the leaf at `path` replaced (the containers on the way copied)."""
    rebuilt = dict(kwargs)
    if len(path) == 1:
        rebuilt[path[0]] = tensor
    elif isinstance(rebuilt[path[0]], Mapping):
        rebuilt[path[0]] = {**rebuilt[path[0]], path[1]: tensor}
    else:
        items = list(rebuilt[path[0]])
        items[int(path[1])] = tensor
        rebuilt[path[0]] = type(rebuilt[path[0]])(items)
    return rebuilt


def constant_arguments(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The arguments that hold no tensor and are not absent (ints, shapes, flags, lists of them), as
    JSON values (encode_constant): torch.export bakes them into the graph."""
    constants = {}
    for key, value in kwargs.items():
        leaves = pytree.tree_leaves(value)
        # an empty dict is a constant too (LuminaNext fails without its cross_attention_kwargs={})
        if value is None or any(isinstance(leaf, torch.Tensor) for leaf in leaves) or \
                (leaves and all(v is None for v in leaves)):
            continue
        constants[key] = encode_constant(value)
    return constants


_TUPLE = "__tuple__"


def encode_constant(value: Any) -> Any:
    """A JSON value for a constant argument that keeps tuples apart from lists (models tell a
    shape tuple from a list of them: QwenImage's img_shapes)."""
    if isinstance(value, tuple):
        return {_TUPLE: [encode_constant(v) for v in value]}
    if isinstance(value, list):
        return [encode_constant(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): encode_constant(v) for k, v in value.items()}
    return value if isinstance(value, (int, float, str, bool)) or value is None else str(value)


def decode_constant(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {_TUPLE}:
        return tuple(decode_constant(v) for v in value[_TUPLE])
    if isinstance(value, list):
        return [decode_constant(v) for v in value]
    if isinstance(value, dict):
        return {k: decode_constant(v) for k, v in value.items()}
    return value


def mismatch(outputs: Any, references: list[torch.Tensor]) -> str | None:
    """How the graph's outputs differ from the model's; None when they agree."""
    for out, ref in zip(outputs, references):
        if out.shape != ref.shape:
            return f"output shape is {tuple(out.shape)}, the model's {tuple(ref.shape)}"
        diff = (out.double() - ref.double()).abs().max().item() if out.numel() else 0.0
        scale = max(ref.double().abs().max().item(), 1.0)
        if not diff <= TOLERANCE * scale:
            return f"output differs from the model's by {diff:.3g} (max abs)"
    return None


def run_graph(module: torch.fx.GraphModule, kwargs: Mapping[str, Any]) -> tuple[Any, str | None]:
    """The graph's outputs on `kwargs`, or what it raised."""
    try:
        with torch.no_grad():
            return module(*[t for _, t in flat_tensor_inputs(kwargs)]), None
    except Exception as exc:  # noqa: BLE001 - a graph that raises is reported, not propagated
        return None, describe(exc)


def describe(exc: BaseException) -> str:
    """An exception's type and first line, to quote in diffc's own messages."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0].rstrip('.')}" if text else type(exc).__name__


@dataclass(frozen=True)
class Failure:
    """A symbolic dim the graph does not reproduce the model at."""

    kind: str
    example_size: int
    probe_size: int
    probe_shapes: str
    reason: str

    def warning(self, model_name: str) -> str:
        return (f"diffc pins {self.kind} of {model_name} to the example's {self.kind}={self.example_size}: at "
                f"{self.kind}={self.probe_size} (probe inputs {self.probe_shapes}) {self.reason}. The optimized model "
                f"takes only {self.kind}={self.example_size}; to run another {self.kind}, optimize with example "
                f"inputs of that {self.kind}.")


class ShapeProber:
    """Probes one model's captured graphs; the model's outputs at each probe shape are kept, since
    a graph exported again after a pin is probed again at the same shapes."""

    def __init__(self, model: torch.nn.Module, kwargs: dict[str, Any], kinds: DimKinds) -> None:
        self.model, self.kwargs, self.kinds = model, kwargs, kinds
        self._references: dict[tuple[tuple[int, ...], ...], tuple[list[torch.Tensor] | None, str | None]] = {}

    def failures(self, module: torch.fx.GraphModule) -> list[Failure]:
        """A Failure for each symbolic dim of `module` to pin: none when every dim at its probe size at
        once and each spatial dim (frames, height, width) alone reproduce the model, else each dim
        that fails alone (all of them if none does)."""
        flat = flat_tensor_inputs(self.kwargs)
        placeholders = [n for n in module.graph.nodes if n.op == "placeholder"]
        positions: dict[str, list[tuple[int, int]]] = {}
        symbols: dict[str, set[str]] = {}
        for index, ((path, _), node) in enumerate(zip(flat, placeholders)):
            for dim, size in enumerate(node.meta["val"].shape):
                kind = self.kinds[path][dim]
                if kind is not None and isinstance(size, torch.SymInt):
                    positions.setdefault(kind, []).append((index, dim))
                    symbols.setdefault(kind, set()).add(str(size))
        if not positions:
            return []
        together = self._probe_shapes(flat, positions)
        if self._why_not(module, self._probe_inputs(flat, together)) is None:
            # sizes doubled together keep a latent square: each spatial dim alone checks the
            # non-square shapes a model may get wrong. Dims torch.export found must stay equal share
            # a symbol (the runtime then refuses them unequal) and are not probed apart.
            spatial = [kind for kind in positions if kind in SPATIAL_KINDS]
            if len(spatial) < 2:
                return []
            apart = [kind for kind in spatial
                     if not any(symbols[kind] & symbols[other] for other in spatial if other != kind)]
            return [f for kind in apart if (f := self._probe(module, flat, kind, positions[kind]))]
        found = []
        for kind, at in positions.items():
            failure = self._probe(module, flat, kind, at)
            if failure is not None:
                found.append(failure)
        if found:
            return found
        # no dim fails alone, only all together: pin them all, each with what the joint probe gave
        return [f for kind, at in positions.items() if (f := self._probe(module, flat, kind, at, together))]

    @staticmethod
    def _probe_shapes(flat: FlatInputs, positions: Mapping[str, list[tuple[int, int]]]) -> list[list[int]]:
        """The input shapes with every dim in `positions` at its probe size (batch + 1, others x 2)."""
        shapes = [list(t.shape) for _, t in flat]
        for kind, at in positions.items():
            for index, dim in at:
                shapes[index][dim] = shapes[index][dim] + 1 if kind == "batch" else shapes[index][dim] * 2
        return shapes

    def _probe(self, module: torch.fx.GraphModule, flat: FlatInputs, kind: str, at: list[tuple[int, int]],
               shapes: list[list[int]] | None = None) -> Failure | None:
        shapes = shapes or self._probe_shapes(flat, {kind: at})
        probe = self._probe_inputs(flat, shapes)
        changed = sorted({index for index, _ in at})
        described = ", ".join(f"{'.'.join(flat[i][0])}={tuple(shapes[i])}" for i in changed)
        reason = self._why_not(module, probe)
        if reason is None:
            return None
        index, dim = at[0]
        return Failure(kind, flat[index][1].shape[dim], shapes[index][dim], described, reason)

    def _why_not(self, module: torch.fx.GraphModule, probe: dict[str, Any]) -> str | None:
        references, raised = self._reference(probe)
        if references is None:
            return f"the model raises {raised}"
        outputs, raised = run_graph(module, probe)
        if raised is not None:
            return f"the captured graph raises {raised} (it has the example's size built in)"
        differs = mismatch(outputs, references)
        return None if differs is None else f"the captured graph's {differs}"

    def _reference(self, probe: dict[str, Any]) -> tuple[list[torch.Tensor] | None, str | None]:
        key = tuple(tuple(t.shape) for _, t in flat_tensor_inputs(probe))
        if key not in self._references:
            try:
                with torch.no_grad():
                    self._references[key] = pytree.tree_flatten(self.model(**probe))[0], None
            except Exception as exc:  # noqa: BLE001 - a model that cannot run the probe shape pins its dim
                self._references[key] = None, describe(exc)
        return self._references[key]

    def _probe_inputs(self, flat: FlatInputs, shapes: list[list[int]]) -> dict[str, Any]:
        generator = torch.Generator(device="cpu").manual_seed(1)
        rebuilt = dict(self.kwargs)
        for (path, tensor), shape in zip(flat, shapes):
            rebuilt = with_tensor(rebuilt, path, _resized(path, tensor, shape, generator))
        return rebuilt


def _resized(path: tuple[str, ...], tensor: torch.Tensor, shape: list[int], generator: torch.Generator) -> torch.Tensor:
    """A `shape` version of `tensor`, drawn on the CPU (the generator's device, so that a probe is
    the same everywhere) and moved to the tensor's device."""
    if list(tensor.shape) == shape:
        return tensor
    with torch.device("cpu"):
        return _resized_on_cpu(path, tensor.cpu(), shape, generator).to(tensor.device)


def _resized_on_cpu(path: tuple[str, ...], tensor: torch.Tensor, shape: list[int],
                    generator: torch.Generator) -> torch.Tensor:
    if path[-1] in TOKEN_NAMES:
        side = int(round(shape[0] ** 0.5))
        if side * side == shape[0]:
            rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
            return torch.stack([torch.zeros(shape[0]), rows.flatten().float(), cols.flatten().float()], 1).to(tensor.dtype)
    if tensor.is_floating_point():
        return (torch.randn(*shape, generator=generator) * tensor.float().std().clamp_min(1e-3)
                + tensor.float().mean()).to(tensor.dtype)
    # integer inputs (labels, masks): tile the existing values along the resized dims
    index = [torch.arange(n) % tensor.shape[d] for d, n in enumerate(shape)]
    return tensor[torch.meshgrid(*index, indexing="ij")] if tensor.dim() else tensor
