"""Capture a diffusers denoiser into a DiffusionGraph through torch.export (non-strict)."""
from __future__ import annotations

import dataclasses
import inspect
import traceback
import warnings
from typing import Any, Mapping

import torch
import torch.fx
from torch.export import Dim
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils import _pytree as pytree

from .._json import jsonable
from ..errors import CaptureError, DiffcError
from .blocks import discover_blocks
from .dtypes import HALF_DTYPES, normalize_to_fp32, source_dtype
from .fxutil import copy_graph
from .examples import LATENT_NAMES, TIMESTEP_NAMES, UNBATCHED_NAMES, dim_kinds, latent_channel_dim
from .examples import example_inputs as derive_example_inputs
from .graph import CONDITIONING, LATENT, TIMESTEP, DiffusionGraph, Signature, TensorInput, TensorOutput
from .probe import (DimKinds, ShapeProber, constant_arguments, describe, flat_tensor_inputs, mismatch, run_graph,
                    tensor_at, with_tensor)

# Nodes torch.export inserts only to check its own assumptions; diffc validates inputs itself.
_CHECK_OPS = {torch.ops.aten._assert_tensor_metadata.default, torch.ops.aten._assert_scalar.default,
              torch.ops.aten.sym_constrain_range_for_size.default}


def capture(model: torch.nn.Module, example_inputs: Mapping[str, Any] | None = None,
            dynamic: bool = True) -> DiffusionGraph:
    """Captures `model` (a diffusers denoiser) as a flat aten-level graph with roles and blocks.

    `example_inputs` are the keyword arguments of one forward call; by default they are derived
    from the model's config. With `dynamic`, batch, resolution and text length stay symbolic where
    the captured graph is verified to reproduce the model with that dim alone at another size; the
    others are pinned to the example's size, with a warning."""
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"capture needs a torch.nn.Module denoiser, got {type(model).__name__}.")
    try:
        return _capture(model.eval(), example_inputs, dynamic)
    except DiffcError:
        raise
    except Exception as exc:  # noqa: BLE001 - nothing from torch or diffusers reaches the caller unexplained
        name = type(model).__name__
        raise CaptureError(f"capturing {name} failed unexpectedly: {describe(exc)}. If {name} runs on the example "
                           "inputs, report this with the traceback; capture(model, dynamic=False) skips the "
                           "checks of other shapes.") from exc


def _capture(model: torch.nn.Module, example_inputs: Mapping[str, Any] | None, dynamic: bool) -> DiffusionGraph:
    inputs = dict(example_inputs) if example_inputs is not None else derive_example_inputs(model)
    inputs.pop("return_dict", None)
    # what each dim is depends on the names, ranks and the latent's channel dim, which widening keeps
    kinds = _dim_kinds(model, flat_tensor_inputs(inputs))
    if dynamic:
        inputs = _text_of_two_if_one(_batch_of_two_if_one(inputs), kinds)
    forward_params = tuple(inspect.signature(model.forward).parameters)
    unknown = [k for k in inputs if k not in forward_params]
    if unknown:
        raise CaptureError(f"example_inputs has {unknown} which {type(model).__name__}.forward does not take "
                           f"(it takes {', '.join(forward_params)}).")
    takes_return_dict = "return_dict" in forward_params
    call_kwargs = {**inputs, "return_dict": False} if takes_return_dict else inputs

    try:
        with torch.no_grad():
            reference = model(**inputs, return_dict=True) if takes_return_dict else model(**inputs)
    except Exception as exc:  # noqa: BLE001 - the model's own error, with the inputs that caused it
        shapes = ", ".join(f"{'.'.join(path)}={tuple(t.shape)}" for path, t in flat_tensor_inputs(inputs))
        raise CaptureError(f"{type(model).__name__} raises {describe(exc)} on the example inputs ({shapes}); pass "
                           "example_inputs={...} that its forward accepts.") from exc
    output_class = type(reference) if hasattr(reference, "to_tuple") else None
    flat_reference, _ = pytree.tree_flatten(reference.to_tuple() if output_class else reference)
    if not flat_reference or not all(isinstance(t, torch.Tensor) for t in flat_reference):
        raise CaptureError(f"{type(model).__name__} returned {type(reference).__name__}; diffc needs tensor outputs.")

    flat_inputs = flat_tensor_inputs(call_kwargs)
    if dynamic:
        module = _symbolic_module(model, call_kwargs, flat_reference, kinds)
    else:
        module = _static_module(model, call_kwargs, flat_reference)
    loaded_in = source_dtype(model)
    if loaded_in in HALF_DTYPES:
        normalize_to_fp32(module)
        flat_inputs = [(path, t.float() if t.dtype in HALF_DTYPES else t) for path, t in flat_inputs]
        flat_reference = [t.float() if t.dtype in HALF_DTYPES else t for t in flat_reference]
    ShapeProp(module).propagate(*[t for _, t in flat_inputs])
    signature = _signature(model, module, flat_inputs, kinds, flat_reference, forward_params, output_class)
    signature = dataclasses.replace(signature, constants=tuple(sorted(constant_arguments(inputs).items())),
                                    source_dtype=str(loaded_in).replace("torch.", ""))
    config = dict(getattr(model, "config", {}) or {})
    # diffusers lists the defaulted keys in set order, which changes from one process to the next
    # (PYTHONHASHSEED): sorted, the same model gives the same artifact bytes in any process
    if isinstance(config.get("_use_default_values"), list):
        config["_use_default_values"] = sorted(config["_use_default_values"])
    return DiffusionGraph(module=module, signature=signature, blocks=discover_blocks(module),
                          config=jsonable(config))


def _dim_kinds(model: torch.nn.Module, flat_inputs: list[tuple[tuple[str, ...], torch.Tensor]]) -> DimKinds:
    named_latent = any(path[-1] in LATENT_NAMES for path, _ in flat_inputs)
    roles = [_role(path, index, named_latent) for index, (path, _) in enumerate(flat_inputs)]
    latent = next((tensor for (_, tensor), role in zip(flat_inputs, roles) if role == LATENT), None)
    channel_dim = latent_channel_dim(getattr(model, "config", None), latent) if latent is not None else 1
    return {path: dim_kinds(path[-1], tensor.dim(), role == LATENT, channel_dim)
            for (path, tensor), role in zip(flat_inputs, roles)}


def _symbolic_module(model: torch.nn.Module, kwargs: dict[str, Any], flat_reference: list[torch.Tensor],
                     kinds: DimKinds) -> torch.fx.GraphModule:
    """The graph with every dim that may change symbolic except those a probe failed for, which are
    pinned (and the graph exported again) until every symbolic dim passes its probe."""
    name = type(model).__name__
    prober = ShapeProber(model, kwargs, kinds)
    pinned: set[str] = set()
    while True:
        symbolic = ", ".join(_marked(kinds, pinned))
        try:
            module = _export(model, kwargs, kinds, pinned)
        except CaptureError as exc:
            if not symbolic:
                raise
            static = _static_module(model, kwargs, flat_reference)  # its own error when static shapes fail too
            warnings.warn(f"exporting {name} with {symbolic} symbolic failed ({exc}); captured it with static "
                          "shapes instead: the optimized model runs only the example's batch and sizes.", stacklevel=4)
            return static
        outputs, raised = run_graph(module, kwargs)
        differs = raised or mismatch(outputs, flat_reference)
        if differs is not None:
            static = _static_module(model, kwargs, flat_reference)
            warnings.warn(f"the graph of {name} captured with {symbolic} symbolic does not reproduce the model at the "
                          f"example shape ({differs}); captured it with static shapes instead: the optimized model "
                          "runs only the example's batch and sizes.", stacklevel=4)
            return static
        failures = prober.failures(module)
        if not failures:
            return module
        for failure in failures:
            warnings.warn(failure.warning(name), stacklevel=4)
        pinned |= {failure.kind for failure in failures}


def _static_module(model: torch.nn.Module, kwargs: dict[str, Any],
                   flat_reference: list[torch.Tensor]) -> torch.fx.GraphModule:
    module = _export(model, kwargs, {}, None)
    outputs, raised = run_graph(module, kwargs)
    differs = raised or mismatch(outputs, flat_reference)
    if differs is not None:
        raise CaptureError(f"the captured graph of {type(model).__name__} does not reproduce the model at the example "
                           f"shape: {differs}. Check that its forward is deterministic (no dropout or random ops "
                           "in eval mode) and keeps no state between calls.")
    return module


DENOISER_ATTRIBUTES = ("unet", "transformer")


def find_denoiser(model_or_pipeline: Any) -> tuple[torch.nn.Module, str | None]:
    """The denoiser of a diffusers pipeline (and the attribute it lives under), or the model itself."""
    if not isinstance(model_or_pipeline, torch.nn.Module):
        for attribute in DENOISER_ATTRIBUTES:
            candidate = getattr(model_or_pipeline, attribute, None)
            if isinstance(candidate, torch.nn.Module):
                return candidate, attribute
        raise CaptureError(f"expected a denoiser (nn.Module) or a diffusers pipeline with a "
                           f"{' or '.join(DENOISER_ATTRIBUTES)}; got {type(model_or_pipeline).__name__}")
    return model_or_pipeline, None


def _batch_of_two_if_one(inputs: dict[str, Any]) -> dict[str, Any]:
    """torch.export fixes every size-1 dimension, so a batch-1 example would give a graph that only
    takes batch 1 (and refuses calibration or CFG batches); the batch is repeated to 2 instead."""
    batched = [(path, t) for path, t in flat_tensor_inputs(inputs) if path[-1] not in UNBATCHED_NAMES and t.dim() >= 1]
    if not batched or any(t.shape[0] != 1 for _, t in batched):
        return inputs
    widened: dict[str, Any] = dict(inputs)
    for path, tensor in batched:
        widened = with_tensor(widened, path, tensor.repeat(2, *([1] * (tensor.dim() - 1))))
    return widened


def _text_of_two_if_one(inputs: dict[str, Any], kinds: DimKinds) -> dict[str, Any]:
    """Likewise a one-token text would give a graph that takes one token only: its token (and its
    mask's, its ids') is repeated to 2 (the probe then checks other lengths)."""
    at = [(path, dim) for path, dims in kinds.items() for dim, kind in enumerate(dims) if kind == "text_len"]
    if not at or any(tensor_at(inputs, path).shape[dim] != 1 for path, dim in at):
        return inputs
    for path, dim in at:
        inputs = with_tensor(inputs, path, tensor_at(inputs, path).repeat_interleave(2, dim=dim))
    return inputs


def _shape_spec(path: tuple[str, ...], value: Any, kinds: DimKinds, pinned: set[str] | None) -> Any:
    """The dynamic_shapes entry of one argument, in its structure: dims for a tensor, None for a constant."""
    if isinstance(value, torch.Tensor):
        if pinned is None:
            return None
        dims = {d: Dim.AUTO for d, kind in enumerate(kinds[path]) if kind not in (None, *pinned)}
        return dims or None
    if len(path) > 1:  # below the first level only constants (shape tuples of a list): every leaf static
        return pytree.tree_map(lambda _: None, value)
    if isinstance(value, Mapping):
        return {k: _shape_spec((*path, k), v, kinds, pinned) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_shape_spec((*path, str(i)), v, kinds, pinned) for i, v in enumerate(value))
    return None


def _marked(kinds: DimKinds, pinned: set[str]) -> list[str]:
    """The kinds of dim an export with `pinned` marks symbolic."""
    marked = {kind for dims in kinds.values() for kind in dims}
    return sorted(kind for kind in marked if kind is not None and kind not in pinned)


def _export(model: torch.nn.Module, kwargs: dict[str, Any], kinds: DimKinds,
            pinned: set[str] | None) -> torch.fx.GraphModule:
    """torch.export of `model`; with `pinned` (kinds of dim kept static), the others are symbolic
    (where the model lets them be), else every dim is static. Static dims are spelled out for every
    input: with dynamic_shapes=None, an export after a symbolic one of the same tensors stays symbolic."""
    dynamic_shapes = {key: _shape_spec((key,), value, kinds, pinned) for key, value in kwargs.items()}
    stack: list[str] = []
    handles = _track_module_stack(model, stack)
    try:
        exported = _attempt_export(model, kwargs, dynamic_shapes, stack, frozen=False)
        if exported is None:
            # ops without a backward (flex attention) refuse parameters that require grad; inference needs none
            stack.clear()
            exported = _attempt_export(model, kwargs, dynamic_shapes, stack, frozen=True)
    finally:
        for handle in handles:
            handle.remove()
    return _flatten(_functional(exported))


def _attempt_export(model: torch.nn.Module, kwargs: dict[str, Any], dynamic_shapes: dict[str, Any],
                    stack: list[str], frozen: bool) -> torch.export.ExportedProgram | None:
    """The export, with the parameters set not to require grad while `frozen`; None where an unfrozen
    export failed for want of a backward (to be tried frozen), else its failure as a CaptureError."""
    wanted = [p for p in model.parameters() if p.requires_grad] if frozen else []
    for parameter in wanted:
        parameter.requires_grad_(False)
    try:
        return torch.export.export(model, (), kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as exc:  # noqa: BLE001 - re-raised with the module and op named
        if not frozen and "backward" in str(exc):
            return None
        raise CaptureError(_describe_failure(model, stack, exc)) from exc
    finally:
        for parameter in wanted:
            parameter.requires_grad_(True)


def _functional(exported: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """`exported` without in-place ops or nested submodules: a model that fills a buffer through
    views (`out = empty_like(x); out[..., ::2] = ...`, as several rotary embeddings do) exports
    mutations that passes cutting the graph into segments would separate from their readers, and
    one that switches autocast or grad mode exports higher-order ops with their own subgraphs.
    Functionalizing rewrites both into plain aten ops (copies into views become slice_scatter);
    graphs that have neither are kept as exported."""
    def rewritten(node: torch.fx.Node) -> bool:
        if isinstance(node.target, torch._ops.HigherOrderOperator):
            return True
        schema = getattr(node.target, "_schema", None)
        return schema is not None and schema.is_mutable

    if any(rewritten(node) for node in exported.graph.nodes if node.op == "call_function"):
        exported = exported.run_decompositions({})
    kept = sorted({str(node.target) for node in exported.graph.nodes
                   if node.op == "call_function" and isinstance(node.target, torch._ops.HigherOrderOperator)})
    if kept:
        raise CaptureError(f"the graph keeps the higher-order op(s) {', '.join(kept)} with their own subgraphs (flex "
                           "attention's score and mask functions, a data-dependent branch), which diffc's passes and "
                           "backends do not lower; run the model with an attention that is plain ops (diffusers' "
                           "set_attention_backend('native') where the model allows it)")
    return exported


def _track_module_stack(model: torch.nn.Module, stack: list[str]) -> list[Any]:
    handles = []
    for name, sub in model.named_modules():
        label = f"{name or '<root>'} ({type(sub).__name__})"

        def push(_module: Any, _args: Any, label: str = label) -> None:
            stack.append(label)

        def pop(_module: Any, _args: Any, _out: Any) -> None:
            if stack:
                stack.pop()

        handles.append(sub.register_forward_pre_hook(push))
        handles.append(sub.register_forward_hook(pop))
    return handles


def _describe_failure(model: torch.nn.Module, stack: list[str], exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    model_frames = [f for f in frames if "/torch/" not in f.filename]
    where = ""
    if model_frames:
        f = model_frames[-1]
        where = f" at {f.filename.rsplit('/', 2)[-1]}:{f.lineno} `{(f.line or '').strip()}`"
    module = stack[-1] if stack else type(model).__name__
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (f"could not capture {type(model).__name__}: module {module} failed{where}: "
            f"{type(exc).__name__}: {first_line}. diffc captures with torch.export (non-strict); make this "
            "op traceable (no data-dependent Python control flow) or pass example_inputs that avoid it.")


def _flatten(exported: torch.export.ExportedProgram) -> torch.fx.GraphModule:
    """A plain GraphModule: placeholders in input order, a tuple of tensors out, no pytree
    (un)flattening hooks and no export-internal assertion nodes."""
    unlifted = exported.module()
    graph = copy_graph(unlifted.graph)
    for node in list(graph.nodes):
        if node.op == "call_module" or (node.op == "call_function" and node.target in _CHECK_OPS):
            graph.erase_node(node)
    for node in list(graph.nodes):
        if node.op == "placeholder" and not node.users and not isinstance(node.meta.get("val"), torch.Tensor):
            graph.erase_node(node)
    graph._codegen = torch.fx.graph.CodeGen()
    graph.eliminate_dead_code()
    graph.lint()
    return torch.fx.GraphModule(unlifted, graph)


def _signature(model: torch.nn.Module, module: torch.fx.GraphModule,
               flat_inputs: list[tuple[tuple[str, ...], torch.Tensor]], kinds: DimKinds,
               flat_reference: list[torch.Tensor], forward_params: tuple[str, ...],
               output_class: type | None) -> Signature:
    placeholders = [n for n in module.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(flat_inputs):
        raise CaptureError(f"captured {len(placeholders)} graph inputs for {len(flat_inputs)} tensor inputs; "
                           "an input is unused or duplicated in the model.")
    dim_names: dict[str, str] = {}
    inputs = []
    named_latent = any(path[-1] in LATENT_NAMES for path, _ in flat_inputs)
    for index, ((path, tensor), node) in enumerate(zip(flat_inputs, placeholders)):
        role = _role(path, index, named_latent)
        shape = tuple(_dim_name(dim_names, str(s), kinds[path][d] or f"{path[-1]}_dim{d}")
                      if isinstance(s, torch.SymInt) else int(s) for d, s in enumerate(node.meta["val"].shape))
        inputs.append(TensorInput(path=path, role=role, shape=shape, dtype=str(tensor.dtype).replace("torch.", ""),
                                  example_shape=tuple(tensor.shape), kinds=kinds[path]))
    output_node = next(n for n in module.graph.nodes if n.op == "output")
    names = ["sample"] + [f"output_{i}" for i in range(1, len(flat_reference))]
    outputs = tuple(
        TensorOutput(name=name,
                     shape=tuple(dim_names.get(str(s), str(s)) if isinstance(s, torch.SymInt) else int(s)
                                 for s in arg.meta["val"].shape),
                     dtype=str(ref.dtype).replace("torch.", ""))
        for name, arg, ref in zip(names, output_node.args[0], flat_reference))
    return Signature(model_class=f"{type(model).__module__}.{type(model).__qualname__}",
                     parameters=forward_params, inputs=tuple(inputs), outputs=outputs,
                     output_class=f"{output_class.__module__}.{output_class.__qualname__}" if output_class else None,
                     return_dict_default=output_class is not None)


def _dim_name(names: dict[str, str], symbol: str, kind: str) -> str:
    """A readable name for a dynamic dimension: its kind where torch.export first met its symbol.
    Dimensions with the same meaning get the same name even where torch.export gave them separate
    symbols (a mask's batch is the latent's batch), so the runtime checks that they agree."""
    return names.setdefault(symbol, kind)


def _role(path: tuple[str, ...], index: int, named_latent: bool) -> str:
    """The latent is the input named as one (in whatever order the call passed it), else the first."""
    if path[-1] in LATENT_NAMES or (index == 0 and not named_latent):
        return LATENT
    if path[-1] in TIMESTEP_NAMES:
        return TIMESTEP
    return CONDITIONING

