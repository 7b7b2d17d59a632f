"""Export a captured graph, or every segment of a Plan, to ONNX files.

The graph is re-exported with ``torch.onnx.export(dynamo=True)``; its dynamic dimensions are
marked with ``Dim.AUTO`` and the exporter's symbols (s0, s1, ...) are renamed to the readable
names the signature uses (batch, height, width, tokens, text_len) so that users and TensorRT
optimization profiles see them. Weights are embedded in the file when they fit in a protobuf
(under 2 GB), otherwise written next to it as ``<name>.onnx.data``.

A Plan exports as one model per segment (`export_plan`), its inputs and outputs laid out and
recorded in the model's metadata as diffc.ir.onnx_segments describes; the fix-ups around the
exporter are in diffc.ir.onnx_fixups."""
from __future__ import annotations

import operator
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.fx

from .._progress import progress
from ..errors import CaptureError
from .fxutil import copy_graph
from .graph import DiffusionGraph
from .onnx_fixups import (describe_failure, interleaves_as_stacks, quiet_exporter, rename_dims, rename_internal_clashes,
                          without_exporter_traces, without_noop_squeezes)
from .onnx_segments import (DIM_SYMBOL, SIZE, TENSOR, TENSORS, flatten_values, segment_metadata, segment_values,
                            value_entry)
from .onnx_speedups import faster_for_onnx_runtime
from .partition import DELTA_SUFFIX
from .plan import Plan

MIN_OPSET = 21
# Protobuf cannot serialize a message of 2 GiB or more; leave room for the graph itself.
EXTERNAL_DATA_THRESHOLD = 2**31 - 64 * 2**20


def export_onnx(module: torch.fx.GraphModule, example_inputs: Sequence[torch.Tensor], path: str | pathlib.Path,
                input_names: Sequence[str], output_names: Sequence[str],
                dynamic_dims: Sequence[Mapping[int, str]], opset: int = 21,
                metadata: Mapping[str, str] | None = None) -> pathlib.Path:
    """Writes `module` to `path` as ONNX and returns the path.

    `dynamic_dims[i]` maps dimension indices of input i to readable names ({0: "batch"}); every
    other dimension is exported static. `metadata` goes into the model's metadata_props. Raises
    CaptureError when the opset is below 21, when an op cannot be exported, or when the result
    does not pass the ONNX checker."""
    import onnx
    import onnx_ir as ir

    if opset < MIN_OPSET:
        raise CaptureError(f"ONNX opset {opset} is not supported: diffc exports with opset >= {MIN_OPSET} "
                           f"(needed for its attention and normalization ops); pass opset={MIN_OPSET} or higher.")
    example_inputs = tuple(example_inputs)
    if not (len(example_inputs) == len(input_names) == len(dynamic_dims)):
        raise CaptureError(f"export_onnx got {len(example_inputs)} example inputs, {len(input_names)} input names "
                           f"and {len(dynamic_dims)} dynamic-dim maps; give one of each per graph input.")
    clash = sorted(set(input_names) & set(output_names))
    if clash or len(set(output_names)) != len(output_names) or len(set(input_names)) != len(input_names):
        raise CaptureError(f"ONNX input and output names must all differ (SSA form); got inputs {list(input_names)} "
                           f"and outputs {list(output_names)}" + (f", {clash} on both sides" if clash else "") + ".")
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dynamic_shapes = tuple({int(d): torch.export.Dim.AUTO for d in dims} or None for dims in dynamic_dims)
    module = interleaves_as_stacks(without_noop_squeezes(module))
    faster = faster_for_onnx_runtime(module)

    def exported(chosen: torch.fx.GraphModule) -> Any:
        return torch.onnx.export(chosen, example_inputs, dynamo=True, opset_version=opset,
                                 input_names=list(input_names), output_names=list(output_names),
                                 dynamic_shapes=dynamic_shapes, external_data=False, optimize=True,
                                 verify=False, report=False, verbose=False)

    with quiet_exporter():
        try:
            program = exported(faster)
        except Exception as exc:  # noqa: BLE001 - re-raised with the failing op named
            if faster is module:
                raise CaptureError(describe_failure(module, path, exc)) from exc
            # the speed rewrites are an optimization: a model they leave unexportable exports without them
            try:
                program = exported(module)
            except Exception as plain_exc:  # noqa: BLE001
                raise CaptureError(describe_failure(module, path, plain_exc)) from plain_exc
    if program is None:  # pragma: no cover - only when the legacy exporter is selected
        raise CaptureError(f"could not export to ONNX {path}: torch.onnx.export returned no program.")
    model = program.model
    rename_internal_clashes(model)
    rename_dims(model, dynamic_dims)
    without_exporter_traces(model)
    model.metadata_props.update(metadata or {})

    external = _initializer_bytes(model) >= EXTERNAL_DATA_THRESHOLD
    data_name = path.name + ".data"
    data_path = path.with_name(data_name)
    if data_path.exists():
        data_path.unlink()  # stale weights of an earlier export would otherwise be appended to
    try:
        ir.save(model, path, external_data=data_name if external else None)
    except Exception as exc:  # noqa: BLE001
        raise CaptureError(f"could not write the ONNX model to {path}: {exc}") from exc
    try:
        onnx.checker.check_model(str(path) if external else onnx.load(str(path)))
    except Exception as exc:  # noqa: BLE001
        raise CaptureError(f"the exported ONNX model {path} does not pass onnx.checker: {exc}") from exc
    return path


def export_graph(dg: DiffusionGraph, path: str | pathlib.Path, opset: int = 21) -> pathlib.Path:
    """Exports a captured DiffusionGraph with inputs named after its signature ("." becomes "__"),
    its dynamic dimensions named as in the signature, and outputs named as its outputs.

    Where the exporter cannot keep every dynamic dimension symbolic, the text length, then everything
    but the batch, then everything are pinned to the captured sizes (the file's input shapes say which)."""
    generator = torch.Generator().manual_seed(0)
    inputs = tuple(_example_input(spec, generator) for spec in dg.signature.inputs)
    input_names, output_names = onnx_names(dg)
    dims = [{d: s for d, s in enumerate(spec.shape) if isinstance(s, str)} for spec in dg.signature.inputs]
    return _export_pinning_on_failure(dg.module, inputs, path, input_names, output_names, dims, opset)


def _export_pinning_on_failure(module: torch.fx.GraphModule, inputs: Sequence[Any], path: str | pathlib.Path,
                               input_names: Sequence[str], output_names: Sequence[str],
                               dims: list[dict[int, str]], opset: int,
                               metadata: Mapping[str, str] | None = None) -> pathlib.Path:
    """export_onnx, retried with the dims that involve text_len, then all but the batch, then all
    pinned to their example sizes where the exporter cannot keep them symbolic."""
    def keep(allowed: Callable[[str], bool]) -> list[dict[int, str]]:
        return [{d: n for d, n in x.items() if all(allowed(s) for s in DIM_SYMBOL.findall(n))} for x in dims]

    attempts: list[list[dict[int, str]]] = []
    for attempt in (dims, keep(lambda s: s != "text_len"), keep(lambda s: s == "batch"), [{} for _ in dims]):
        if attempt not in attempts:
            attempts.append(attempt)
    for index, attempt in enumerate(attempts):
        try:
            return export_onnx(module, inputs, path, input_names, output_names, attempt, opset=opset,
                               metadata=metadata)
        except CaptureError:
            if index == len(attempts) - 1:
                raise
    raise AssertionError("unreachable: the last attempt returns or raises")


def onnx_names(dg: DiffusionGraph) -> tuple[list[str], list[str]]:
    """The ONNX input and output names export_graph gives `dg`: each input's name with "." as "__"
    ("added_cond_kwargs.text_embeds" -> "added_cond_kwargs__text_embeds"); each output's name,
    prefixed "output__" where it equals an input name (UNets take and return "sample")."""
    inputs = [spec.name.replace(".", "__") for spec in dg.signature.inputs]
    outputs = [f"output__{o.name}" if o.name in inputs else o.name for o in dg.signature.outputs]
    return inputs, outputs


def export_plan(plan: Plan, directory: str | pathlib.Path, opset: int = 21,
                show_progress: bool = False) -> dict[str, pathlib.Path]:
    """Writes one ONNX model per segment of `plan` to `directory` as ``<segment>.onnx`` and
    returns {segment: path}.

    Each model takes and returns the segment's `inputs` and `outputs` (see diffc.ir.onnx_segments
    for names and kinds) with the dims that are dynamic in the captured graph kept dynamic and
    named after the signature (batch, height, "((height//2))*((width//2))", ...)."""
    directory = pathlib.Path(directory)
    environment = _example_environment(plan)
    paths: dict[str, pathlib.Path] = {}
    for name in progress(list(plan.segments), show_progress, "ONNX export", "segment"):
        paths[name] = _export_segment(plan, name, directory / f"{name}.onnx", opset, environment)
    return paths


def export_segment(plan: Plan, name: str, path: str | pathlib.Path, opset: int = 21,
                   inputs: Sequence[Any] | None = None) -> pathlib.Path:
    """Writes segment `name` of `plan` to `path` as export_plan does; returns the path. Given
    `inputs` (the segment's input values), the model is exported for exactly their shapes (no
    dynamic dims): what a backend uses where the exporter could not keep a dim dynamic and a call
    comes at another size."""
    if name not in plan.segments:
        raise CaptureError(f"the plan has no segment {name!r}; its segments are {sorted(plan.segments)}")
    if inputs is None:
        return _export_segment(plan, name, pathlib.Path(path), opset, _example_environment(plan))
    segment = plan.segments[name]
    with torch.no_grad():
        outputs = tuple(segment.module(*inputs))
    environment = {**dict(zip(segment.inputs, inputs)), **dict(zip(segment.outputs, outputs))}
    return _export_segment(plan, name, pathlib.Path(path), opset, environment, dynamic=False)


def _export_segment(plan: Plan, name: str, path: pathlib.Path, opset: int,
                    environment: Mapping[str, Any], dynamic: bool = True) -> pathlib.Path:
    segment = plan.segments[name]
    inputs = [value_entry(name, i, environment[i]) for i in segment.inputs]
    output_entries = [value_entry(name, o, environment[o]) for o in segment.outputs]
    module = _flat_segment_module(segment.module, inputs, output_entries)
    example = flatten_values(inputs, [environment[entry["name"]] for entry in inputs])
    dims = _segment_dynamic_dims(plan, inputs) if dynamic else [{} for _ in example]
    metadata = segment_metadata(name, inputs, output_entries)
    return _export_pinning_on_failure(module, example, path, segment_values(inputs), segment_values(output_entries),
                                      dims, opset, metadata)


def _example_environment(plan: Plan) -> dict[str, Any]:
    """Every value the plan's segments read or write, computed once from example inputs (the
    captured shapes): segments run as soon as their inputs exist, so a segment that reads
    cached state runs after the one that fills it."""
    generator = torch.Generator().manual_seed(0)
    environment: dict[str, Any] = {spec.name: _example_input(spec, generator) for spec in plan.graph.signature.inputs}
    pending = list(plan.segments.values())
    with torch.no_grad():
        while pending:
            ready = next((s for s in pending if all(i in environment for i in s.inputs)), None)
            if ready is None:
                missing = {s.name: [i for i in s.inputs if i not in environment] for s in pending}
                raise CaptureError(f"cannot export the plan: no segment produces the inputs {missing}; "
                                   "the plan is inconsistent (check it with plan.check())")
            environment.update(zip(ready.outputs, tuple(ready.module(*[environment[i] for i in ready.inputs]))))
            pending.remove(ready)
    return environment


def _flat_segment_module(module: torch.fx.GraphModule, inputs: Sequence[Mapping[str, Any]],
                         outputs: Sequence[Mapping[str, Any]]) -> torch.fx.GraphModule:
    """A copy of the segment graph with flat tensor inputs and outputs: a list input becomes one
    placeholder per item, a size input a placeholder whose length is the size; a list output
    becomes its items, a size output an int64 scalar."""
    graph = copy_graph(module.graph)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for node, entry in zip(placeholders, inputs):
        if entry["kind"] == TENSORS:
            with graph.inserting_before(node):
                items = [graph.placeholder(f"{node.name}_{i}") for i in range(entry["count"])]
            for user in list(node.users):
                if user.target is operator.getitem and user.args[0] is node and isinstance(user.args[1], int):
                    user.replace_all_uses_with(items[user.args[1]])
                    graph.erase_node(user)
                else:
                    user.args = torch.fx.node.map_aggregate(user.args, lambda a: list(items) if a is node else a)
                    user.kwargs = torch.fx.node.map_aggregate(user.kwargs, lambda a: list(items) if a is node else a)
            graph.erase_node(node)
        elif entry["kind"] == SIZE:
            with graph.inserting_before(node):
                carrier = graph.placeholder(f"{node.name}_carrier")
            with graph.inserting_after(carrier):
                size = graph.call_function(torch.ops.aten.sym_size.int, (carrier, 0))
            node.replace_all_uses_with(size)
            graph.erase_node(node)
    output = next(n for n in graph.nodes if n.op == "output")
    flat: list[Any] = []
    with graph.inserting_before(output):
        for value, entry in zip(output.args[0], outputs):
            if entry["kind"] == TENSORS:
                flat += [graph.call_function(operator.getitem, (value, i)) for i in range(entry["count"])]
            elif entry["kind"] == SIZE:
                # a size the exporter specialized to a constant would leave a bare int as a graph output
                flat.append(graph.call_function(torch.ops.aten.scalar_tensor.default, (value,),
                                                {"dtype": torch.int64}))
            else:
                flat.append(value)
    output.args = (tuple(flat),)
    graph.lint()
    return torch.fx.GraphModule(module, graph)


def _segment_dynamic_dims(plan: Plan, inputs: Sequence[Mapping[str, Any]]) -> list[dict[int, str]]:
    """Readable names of the dynamic dims of each flat input, from the shapes the captured graph
    recorded for the value: a captured symbol gets its signature name, an expression of them the
    expression in parentheses. A value without a recorded shape is exported static."""
    graph = plan.graph.graph
    by_name = {n.name: n for n in graph.nodes}
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    source = {spec.name: node for spec, node in zip(plan.graph.signature.inputs, placeholders)}
    symbols: dict[str, str] = {}
    for spec, node in zip(plan.graph.signature.inputs, placeholders):
        value = node.meta.get("val")
        for dim, name in zip(getattr(value, "shape", ()), spec.shape):
            if isinstance(name, str) and isinstance(dim, torch.SymInt) and dim.node.expr.is_Symbol:
                symbols.setdefault(str(dim.node.expr), name)

    def readable(size: Any) -> str | None:
        if not isinstance(size, torch.SymInt):
            return None
        expr = size.node.expr
        if not expr.free_symbols or any(str(s) not in symbols for s in expr.free_symbols):
            return None
        if expr.is_Symbol:
            return symbols[str(expr)]
        return "(" + DIM_SYMBOL.sub(lambda m: symbols.get(m.group(0), m.group(0)), str(expr)) + ")"

    def named(shape: Sequence[Any]) -> dict[int, str]:
        return {d: n for d, n in ((d, readable(s)) for d, s in enumerate(shape)) if n is not None}

    dims: list[dict[int, str]] = []
    for entry in inputs:
        base = entry["name"].removesuffix(DELTA_SUFFIX)
        node = source.get(base) or by_name.get(base)
        value = node.meta.get("val") if node is not None else None
        if entry["kind"] == TENSOR:
            dims.append(named(getattr(value, "shape", ())))
        elif entry["kind"] == TENSORS:
            items = list(value) if isinstance(value, (list, tuple)) else [None] * entry["count"]
            dims += [named(getattr(item, "shape", ())) for item in items]
        else:
            dims.append(named([value]))
    return dims


def _example_input(spec: Any, generator: torch.Generator) -> torch.Tensor:
    dtype = getattr(torch, spec.dtype)
    shape = tuple(spec.example_shape)
    if dtype == torch.bool:
        return torch.zeros(shape, dtype=dtype)
    if not dtype.is_floating_point and not dtype.is_complex:
        # an integer mask keeps every token; labels and ids are 0, a valid index into any table
        # (HunyuanDiT's style embedding has one row)
        return (torch.ones if "mask" in spec.name else torch.zeros)(shape, dtype=dtype)
    if spec.role == "timestep":
        return torch.full(shape, 500.0).to(dtype)
    return torch.randn(shape, generator=generator).to(dtype)


def _initializer_bytes(model: Any) -> int:
    total = 0
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is not None:
            total += tensor.nbytes
    return total
