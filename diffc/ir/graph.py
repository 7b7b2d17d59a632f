"""The IR: an aten-level FX graph with its signature, I/O roles and block table."""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from .blocks import Block
from .examples import dim_kinds
from .fxutil import attr_value, copy_graph, module_device
from .step_plan import StepPlan

LATENT, TIMESTEP, CONDITIONING = "latent", "timestep", "conditioning"
ROLES = (LATENT, TIMESTEP, CONDITIONING)


@dataclass(frozen=True)
class TensorInput:
    """One tensor the denoiser takes. `path` locates it in the forward call: ("sample",) or
    ("added_cond_kwargs", "text_embeds"). A str in `shape` names a dynamic dimension (batch,
    height, width, tokens, text_len); `example_shape` is the shape it was captured at; `kinds` says
    what each dim is (batch, height, frames...; None for channels and features), pinned or not."""

    path: tuple[str, ...]
    role: str
    shape: tuple[int | str, ...]
    dtype: str
    example_shape: tuple[int, ...]
    kinds: tuple[str | None, ...] = ()

    @property
    def name(self) -> str:
        return ".".join(self.path)


@dataclass(frozen=True)
class TensorOutput:
    name: str
    shape: tuple[int | str, ...]
    dtype: str


@dataclass(frozen=True)
class Signature:
    """How the original forward is called and what it returns.

    `parameters` are the forward's parameter names in order (to bind positional arguments);
    `output_class` is the import path of the output dataclass returned when return_dict=True.
    `source_dtype` is the floating dtype of the model's weights: capture normalizes a half-precision
    model's graph to fp32 (passes measure in fp32), its outputs go back to the caller in this dtype
    and a target without a precision compiles in it."""

    model_class: str
    parameters: tuple[str, ...]
    inputs: tuple[TensorInput, ...]
    outputs: tuple[TensorOutput, ...]
    output_class: str | None
    return_dict_default: bool = True
    # non-tensor arguments the graph was captured with as constants (shapes, counts, flags), as JSON
    # values: a call may leave them out or pass the same value, not another
    constants: tuple[tuple[str, Any], ...] = ()
    source_dtype: str = "float32"

    def input(self, name: str) -> TensorInput:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        raise KeyError(name)

    @property
    def latent(self) -> TensorInput:
        return next(s for s in self.inputs if s.role == LATENT)

    @property
    def timestep(self) -> TensorInput | None:
        return next((s for s in self.inputs if s.role == TIMESTEP), None)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Signature":
        return cls(
            model_class=data["model_class"],
            parameters=tuple(data["parameters"]),
            inputs=tuple(_tensor_input(i) for i in data["inputs"]),
            outputs=tuple(TensorOutput(o["name"], tuple(o["shape"]), o["dtype"]) for o in data["outputs"]),
            output_class=data["output_class"],
            return_dict_default=data["return_dict_default"],
            constants=tuple((name, value) for name, value in data.get("constants", [])),
            source_dtype=data.get("source_dtype", "float32"),
        )


def _tensor_input(data: dict[str, Any]) -> TensorInput:
    path, shape = tuple(data["path"]), tuple(data["shape"])
    # artifacts saved before inputs carried their kinds: the layout capture assumed then
    kinds = data.get("kinds") or dim_kinds(path[-1], len(shape), data["role"] == LATENT)
    return TensorInput(path, data["role"], shape, data["dtype"], tuple(data["example_shape"]), tuple(kinds))


@dataclass
class DiffusionGraph:
    """A captured denoiser: `module` is a flat fx.GraphModule whose placeholders are the signature's
    inputs in order and whose output is the tuple of the signature's outputs. Weights live in
    `module` under the original model's state-dict names.

    `config` is the model's diffusers config (so pipelines can read `unet.config`), `applied`
    records each pass run on it (name, config, budget it read, report): `diffc.replay` re-runs it, and
    `annotations` holds per-node precision specs written by passes and read by backends;
    `step_plan` (an immutable StepPlan, written by passes) describes step-dependent work (cached
    regions, variants, schedule) that `diffc.ir.partition.build_plan` turns into a Plan."""

    module: torch.fx.GraphModule
    signature: Signature
    blocks: list[Block]
    config: dict[str, Any] = field(default_factory=dict)
    applied: list[dict[str, Any]] = field(default_factory=list)
    annotations: dict[str, dict[str, Any]] = field(default_factory=dict)
    step_plan: StepPlan | None = None

    @property
    def graph(self) -> torch.fx.Graph:
        return self.module.graph

    def block(self, name: str) -> Block:
        for block in self.blocks:
            if block.name == name:
                return block
        raise KeyError(f"no block named {name!r}; blocks: {', '.join(b.name for b in self.blocks[:20])} ...")

    def weights(self) -> dict[str, torch.Tensor]:
        """Every tensor the graph reads through get_attr, by its qualified name."""
        out = {}
        for node in self.graph.nodes:
            if node.op == "get_attr":
                value = attr_value(self.module, node.target)
                if isinstance(value, torch.Tensor):
                    out[node.target] = value
        return out

    @property
    def device(self) -> torch.device:
        """Where the graph's weights are: tensors a pass builds for it go there too."""
        return module_device(self.module)

    def num_parameters(self) -> int:
        seen: set[int] = set()
        total = 0
        for tensor in self.weights().values():
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel()
        return total

    def clone(self) -> "DiffusionGraph":
        """A copy whose graph can be rewritten freely; weight tensors are shared, not copied."""
        graph = copy_graph(self.graph)
        module = torch.fx.GraphModule(self.weights(), graph)
        return DiffusionGraph(module, self.signature, copy.deepcopy(self.blocks), copy.deepcopy(self.config),
                              copy.deepcopy(self.applied), copy.deepcopy(self.annotations), self.step_plan)

    def __call__(self, *flat_inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.module(*flat_inputs))

