"""Capture a diffusers denoiser into a DiffusionGraph through torch.export (non-strict)."""
from __future__ import annotations

import inspect
import logging
import traceback
from typing import Any, Mapping

import torch
import torch.fx
from torch.export import Dim
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils import _pytree as pytree

from .._json import jsonable
from ..errors import CaptureError
from .blocks import discover_blocks
from .fxutil import copy_graph
from .examples import LATENT_NAMES, TEXT_NAMES, TIMESTEP_NAMES, TOKEN_NAMES, UNBATCHED_NAMES
from .examples import example_inputs as derive_example_inputs
from .graph import CONDITIONING, LATENT, TIMESTEP, DiffusionGraph, Signature, TensorInput, TensorOutput

log = logging.getLogger(__name__)

# Nodes torch.export inserts only to check its own assumptions; diffc validates inputs itself.
_CHECK_OPS = {torch.ops.aten._assert_tensor_metadata.default, torch.ops.aten._assert_scalar.default,
              torch.ops.aten.sym_constrain_range_for_size.default}
CAPTURE_TOLERANCE = 1e-4


def capture(model: torch.nn.Module, example_inputs: Mapping[str, Any] | None = None,
            dynamic: bool = True) -> DiffusionGraph:
    """Captures `model` (a diffusers denoiser) as a flat aten-level graph with roles and blocks.

    `example_inputs` are the keyword arguments of one forward call; by default they are derived
    from the model's config. With `dynamic`, batch, resolution and text length stay symbolic where
    the captured graph is verified to reproduce the model at another shape."""
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"capture needs a torch.nn.Module denoiser, got {type(model).__name__}.")
    model = model.eval()
    inputs = dict(example_inputs) if example_inputs is not None else derive_example_inputs(model)
    inputs.pop("return_dict", None)
    if dynamic:
        inputs = _batch_of_two_if_one(inputs)
    forward_params = tuple(inspect.signature(model.forward).parameters)
    unknown = [k for k in inputs if k not in forward_params]
    if unknown:
        raise CaptureError(f"example_inputs has {unknown} which {type(model).__name__}.forward does not take "
                           f"(it takes {', '.join(forward_params)}).")
    takes_return_dict = "return_dict" in forward_params
    call_kwargs = {**inputs, "return_dict": False} if takes_return_dict else inputs

    with torch.no_grad():
        reference = model(**inputs, return_dict=True) if takes_return_dict else model(**inputs)
    output_class = type(reference) if hasattr(reference, "to_tuple") else None
    flat_reference, _ = pytree.tree_flatten(reference.to_tuple() if output_class else reference)
    if not flat_reference or not all(isinstance(t, torch.Tensor) for t in flat_reference):
        raise CaptureError(f"{type(model).__name__} returned {type(reference).__name__}; diffc needs tensor outputs.")

    # (dynamic resolution, dynamic text length), most dynamic first; None exports fully static
    attempts: list[tuple[bool, bool] | None] = [(True, True), (False, True), (False, False)] if dynamic else [None]
    failure = ""
    for dims in attempts:
        module = _export(model, call_kwargs, dims)
        mismatch = _verify(model, module, call_kwargs, flat_reference, vary=dims is not None)
        if mismatch is None:
            break
        failure = mismatch
        log.info("capture with dynamic (resolution, text) = %s does not reproduce the model (%s); "
                 "trying fewer dynamic dims", dims, mismatch)
    else:
        raise CaptureError(f"the captured graph of {type(model).__name__} does not reproduce the model: {failure}")

    flat_inputs = _flat_tensor_inputs(call_kwargs)
    ShapeProp(module).propagate(*[t for _, t in flat_inputs])
    signature = _signature(model, module, flat_inputs, flat_reference, forward_params, output_class)
    config = dict(getattr(model, "config", {}) or {})
    return DiffusionGraph(module=module, signature=signature, blocks=discover_blocks(module),
                          config=jsonable(config))


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


def _flat_tensor_inputs(kwargs: Mapping[str, Any]) -> list[tuple[tuple[str, ...], torch.Tensor]]:
    """(path, tensor) for every tensor leaf, in the order torch.export makes placeholders."""
    out = []
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            out.append(((key,), value))
        elif isinstance(value, Mapping):
            for sub, leaf in value.items():
                if isinstance(leaf, torch.Tensor):
                    out.append(((key, sub), leaf))
    return out


def _batch_of_two_if_one(inputs: dict[str, Any]) -> dict[str, Any]:
    """torch.export fixes every size-1 dimension, so a batch-1 example would give a graph that only
    takes batch 1 (and refuses calibration or CFG batches); the batch is repeated to 2 instead."""
    batched = [(path, t) for path, t in _flat_tensor_inputs(inputs) if path[-1] not in UNBATCHED_NAMES and t.dim() >= 1]
    if not batched or any(t.shape[0] != 1 for _, t in batched):
        return inputs
    widened: dict[str, Any] = dict(inputs)
    for path, tensor in batched:
        doubled = tensor.repeat(2, *([1] * (tensor.dim() - 1)))
        if len(path) == 1:
            widened[path[0]] = doubled
        else:
            widened[path[0]] = {**widened[path[0]], path[1]: doubled}
    return widened


def _dynamic_dims(path: tuple[str, ...], tensor: torch.Tensor, resolution: bool, text: bool) -> dict[int, Any] | None:
    leaf = path[-1]
    dims: dict[int, Any] = {}
    if leaf in UNBATCHED_NAMES:
        if (resolution and leaf in TOKEN_NAMES) or (text and leaf in TEXT_NAMES):
            dims[0] = Dim.AUTO
        return dims or None
    if tensor.dim() >= 1:
        dims[0] = Dim.AUTO
    if resolution and leaf in LATENT_NAMES:
        for d in (range(2, tensor.dim()) if tensor.dim() == 4 else range(1, tensor.dim() - 1)):
            dims[d] = Dim.AUTO
    if text and leaf in TEXT_NAMES and tensor.dim() >= 2:
        dims[1] = Dim.AUTO
    return dims or None


def _export(model: torch.nn.Module, kwargs: dict[str, Any], dims: tuple[bool, bool] | None) -> torch.fx.GraphModule:
    dynamic_shapes: dict[str, Any] | None = None
    if dims is not None:
        dynamic_shapes = {}
        for key, value in kwargs.items():
            if isinstance(value, torch.Tensor):
                dynamic_shapes[key] = _dynamic_dims((key,), value, *dims)
            elif isinstance(value, Mapping):
                dynamic_shapes[key] = {k: (_dynamic_dims((key, k), v, *dims) if isinstance(v, torch.Tensor)
                                           else None) for k, v in value.items()}
            else:
                dynamic_shapes[key] = None
    stack: list[str] = []
    handles = _track_module_stack(model, stack)
    try:
        exported = torch.export.export(model, (), kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as exc:  # noqa: BLE001 - re-raised with the module and op named
        raise CaptureError(_describe_failure(model, stack, exc)) from exc
    finally:
        for handle in handles:
            handle.remove()
    return _flatten(exported)


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


def _verify(model: torch.nn.Module, module: torch.fx.GraphModule, kwargs: dict[str, Any],
            flat_reference: list[torch.Tensor], vary: bool) -> str | None:
    """None when the graph reproduces the model at the example shape and, for its dynamic dims,
    at another batch (and resolution); else what went wrong."""
    checks = [("example shape", kwargs, flat_reference)]
    if vary:
        other = _other_shape(module, kwargs)
        if other is not None:
            with torch.no_grad():
                other_ref, _ = pytree.tree_flatten(model(**other))
            checks.append(("another batch/resolution", other, other_ref))
    for label, call_kwargs, refs in checks:
        flat = [t for _, t in _flat_tensor_inputs(call_kwargs)]
        try:
            with torch.no_grad():
                outs = module(*flat)
        except Exception as exc:  # noqa: BLE001 - any failure means this capture is not valid
            return f"{label}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        for out, ref in zip(outs, refs):
            if out.shape != ref.shape:
                return f"{label}: output shape {tuple(out.shape)} != {tuple(ref.shape)}"
            diff = (out.double() - ref.double()).abs().max().item() if out.numel() else 0.0
            scale = max(ref.double().abs().max().item(), 1.0)
            if not diff <= CAPTURE_TOLERANCE * scale:
                return f"{label}: max abs difference {diff:.3g}"
    return None


def _other_shape(module: torch.fx.GraphModule, kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """The example inputs with each dynamic dim changed (batch +1, the others doubled);
    None when nothing is dynamic."""
    placeholders = [n for n in module.graph.nodes if n.op == "placeholder"]
    changed = False
    generator = torch.Generator().manual_seed(1)
    flat = _flat_tensor_inputs(kwargs)
    new_sizes: dict[str, int] = {}
    for (path, tensor), node in zip(flat, placeholders):
        val = node.meta.get("val")
        for d, size in enumerate(val.shape):
            if isinstance(size, torch.SymInt) and str(size) not in new_sizes:
                base = tensor.shape[d]
                is_batch = d == 0 and path[-1] not in UNBATCHED_NAMES
                new_sizes[str(size)] = base + 1 if is_batch else base * 2
                changed |= new_sizes[str(size)] != base
    if not changed:
        return None
    rebuilt = dict(kwargs)
    for (path, tensor), node in zip(flat, placeholders):
        val = node.meta.get("val")
        shape = [new_sizes.get(str(s), tensor.shape[d]) if isinstance(s, torch.SymInt) else tensor.shape[d]
                 for d, s in enumerate(val.shape)]
        new = _resized(path, tensor, shape, generator)
        if len(path) == 1:
            rebuilt[path[0]] = new
        else:
            rebuilt[path[0]] = {**rebuilt[path[0]], path[1]: new}
    return rebuilt


def _resized(path: tuple[str, ...], tensor: torch.Tensor, shape: list[int], generator: torch.Generator) -> torch.Tensor:
    if list(tensor.shape) == shape:
        return tensor
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


def _signature(model: torch.nn.Module, module: torch.fx.GraphModule,
               flat_inputs: list[tuple[tuple[str, ...], torch.Tensor]], flat_reference: list[torch.Tensor],
               forward_params: tuple[str, ...], output_class: type | None) -> Signature:
    placeholders = [n for n in module.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(flat_inputs):
        raise CaptureError(f"captured {len(placeholders)} graph inputs for {len(flat_inputs)} tensor inputs; "
                           "an input is unused or duplicated in the model.")
    dim_names: dict[str, str] = {}
    inputs = []
    for index, ((path, tensor), node) in enumerate(zip(flat_inputs, placeholders)):
        role = _role(path, index)
        shape = tuple(_dim_name(dim_names, str(s), path, role, d, tensor.dim()) if isinstance(s, torch.SymInt)
                      else int(s) for d, s in enumerate(node.meta["val"].shape))
        inputs.append(TensorInput(path=path, role=role, shape=shape, dtype=str(tensor.dtype).replace("torch.", ""),
                                  example_shape=tuple(tensor.shape)))
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


def _dim_name(names: dict[str, str], symbol: str, path: tuple[str, ...], role: str, dim: int, rank: int) -> str:
    """A readable name for a dynamic dimension. Dimensions with the same meaning get the same name
    even where torch.export gave them separate symbols (a mask's batch is the latent's batch), so
    the runtime checks that they agree."""
    if symbol in names:
        return names[symbol]
    leaf = path[-1]
    if leaf in TOKEN_NAMES or (role == LATENT and rank == 3 and dim == 1):
        name = "tokens"
    elif leaf in TEXT_NAMES and (dim == 1 or leaf in UNBATCHED_NAMES):
        name = "text_len"
    elif dim == 0:
        name = "batch"
    elif role == LATENT and rank == 4:
        name = "height" if dim == 2 else "width"
    else:
        name = f"{leaf}_dim{dim}"
    names[symbol] = name
    return name


def _role(path: tuple[str, ...], index: int) -> str:
    if index == 0 or path[-1] in LATENT_NAMES:
        return LATENT
    if path[-1] in TIMESTEP_NAMES:
        return TIMESTEP
    return CONDITIONING

