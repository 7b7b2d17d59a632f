"""Export a captured graph, or every segment of a Plan, to ONNX files.

The graph is re-exported with ``torch.onnx.export(dynamo=True)``; its dynamic dimensions are
marked with ``Dim.AUTO`` and the exporter's symbols (s0, s1, ...) are renamed to the readable
names the signature uses (batch, height, width, tokens, text_len) so that users and TensorRT
optimization profiles see them. Weights are embedded in the file when they fit in a protobuf
(under 2 GB), otherwise written next to it as ``<name>.onnx.data``.

A Plan exports as one model per segment (`export_plan`). Its ONNX inputs and outputs are the
segment's `inputs` and `outputs` (model inputs, values passed between segments, cached state)
under `onnx_safe_name`, which escapes every character that is not a letter, a digit or an
underscore as ``_xHH_`` (its code point in hex: "output.sample" -> "output_x2E_sample"), and an
underscore followed by "x" as ``_x5F_``, so `original_name` recovers the name exactly. Three
kinds of value cross segments (the model's ``diffc.segment`` metadata lists them per segment):

- a tensor: one ONNX value;
- a list of tensors (the pieces of a chunk or split used in a later segment): one ONNX value
  per item, named after ``name[i]``;
- a size (an int one segment computes from a shape and a later one uses): an int64 scalar as
  an output; as an input, a float32 vector of that length whose shape carries it, so the size
  stays symbolic in the consumer's graph (an ONNX graph cannot turn a value into a shape)."""
from __future__ import annotations

import contextlib
import json
import logging
import operator
import pathlib
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.fx

from .._progress import progress
from ..errors import CaptureError
from .fxutil import copy_graph
from .graph import DiffusionGraph
from .partition import DELTA_SUFFIX
from .plan import Plan

MIN_OPSET = 21
# Protobuf cannot serialize a message of 2 GiB or more; leave room for the graph itself.
EXTERNAL_DATA_THRESHOLD = 2**31 - 64 * 2**20

_NOISY_LOGGERS = ("torch.onnx", "torch.export", "torch._export", "torch.fx.experimental.symbolic_shapes",
                  "torch._dynamo", "onnxscript", "onnx_ir", "torchvision")
_SYMBOL = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ESCAPED = re.compile(r"_x([0-9A-F]+)_")
SEGMENT_METADATA = "diffc.segment"
TENSOR, TENSORS, SIZE = "tensor", "tensors", "size"


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
    module = _without_noop_squeezes(module)

    with _quiet():
        try:
            program = torch.onnx.export(module, example_inputs, dynamo=True, opset_version=opset,
                                        input_names=list(input_names), output_names=list(output_names),
                                        dynamic_shapes=dynamic_shapes, external_data=False, optimize=True,
                                        verify=False, report=False, verbose=False)
        except Exception as exc:  # noqa: BLE001 - re-raised with the failing op named
            raise CaptureError(_describe_failure(module, path, exc)) from exc
    if program is None:  # pragma: no cover - only when the legacy exporter is selected
        raise CaptureError(f"could not export to ONNX {path}: torch.onnx.export returned no program.")
    model = program.model
    _rename_internal_clashes(model)
    _rename_dims(model, dynamic_dims)
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
        return [{d: n for d, n in x.items() if all(allowed(s) for s in _SYMBOL.findall(n))} for x in dims]

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


def onnx_safe_name(name: str) -> str:
    """`name` as an ONNX (C identifier) name, reversibly: see the module docstring."""
    out = []
    for index, char in enumerate(name):
        plain = char.isascii() and (char.isalpha() or (char.isdigit() and index > 0))
        if plain or (char == "_" and name[index + 1:index + 2] != "x"):
            out.append(char)
        else:
            out.append(f"_x{ord(char):02X}_")
    return "".join(out)


def original_name(onnx_name: str) -> str:
    """The name `onnx_safe_name` was given: original_name(onnx_safe_name(n)) == n."""
    return _ESCAPED.sub(lambda m: chr(int(m.group(1), 16)), onnx_name)


def segment_values(entries: Sequence[Mapping[str, Any]]) -> list[str]:
    """The ONNX value names of a segment's inputs or outputs, in order, from the entries of its
    ``diffc.segment`` metadata ({"name", "kind", "count"})."""
    names: list[str] = []
    for entry in entries:
        if entry["kind"] == TENSORS:
            names += [onnx_safe_name(f"{entry['name']}[{i}]") for i in range(entry["count"])]
        else:
            names.append(onnx_safe_name(entry["name"]))
    return names


def export_plan(plan: Plan, directory: str | pathlib.Path, opset: int = 21,
                show_progress: bool = False) -> dict[str, pathlib.Path]:
    """Writes one ONNX model per segment of `plan` to `directory` as ``<segment>.onnx`` and
    returns {segment: path}.

    Each model takes and returns the segment's `inputs` and `outputs` (see the module docstring
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
    inputs = [_value_entry(name, i, environment[i]) for i in segment.inputs]
    output_entries = [_value_entry(name, o, environment[o]) for o in segment.outputs]
    module = _flat_segment_module(segment.module, inputs, output_entries)
    example: list[torch.Tensor] = []
    for entry in inputs:
        value = environment[entry["name"]]
        if entry["kind"] == TENSOR:
            example.append(value)
        elif entry["kind"] == TENSORS:
            example += list(value)
        else:
            example.append(torch.empty(int(value)))
    dims = _segment_dynamic_dims(plan, inputs) if dynamic else [{} for _ in example]
    metadata = {SEGMENT_METADATA: json.dumps({"segment": name, "inputs": inputs, "outputs": output_entries})}
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


def _value_entry(segment: str, name: str, value: Any) -> dict[str, Any]:
    if isinstance(value, torch.Tensor):
        return {"name": name, "kind": TENSOR, "count": 1}
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return {"name": name, "kind": TENSORS, "count": len(value)}
    if isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool):
        return {"name": name, "kind": SIZE, "count": 1}
    raise CaptureError(f"segment {segment} passes {name} of type {type(value).__name__} to another segment; "
                       "ONNX export carries tensors, lists of tensors and sizes only. Cut the plan elsewhere.")


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
        return "(" + _SYMBOL.sub(lambda m: symbols.get(m.group(0), m.group(0)), str(expr)) + ")"

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
        return torch.randint(0, 2, shape, generator=generator).to(dtype)  # class labels, ids: small ints
    if spec.role == "timestep":
        return torch.full(shape, 500.0).to(dtype)
    return torch.randn(shape, generator=generator).to(dtype)


def _without_noop_squeezes(module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of `module` (weights shared) without squeezes of dims that are not 1, which torch treats
    as no-ops but the exporter lowers to an ONNX Squeeze that fails (PixArt's `squeeze(1)` of
    [batch, tokens, channels]). Returns `module` itself when it has none."""
    def noop_dims(node: torch.fx.Node) -> tuple[list[int], int] | None:
        if node.op != "call_function" or node.target not in (torch.ops.aten.squeeze.dim, torch.ops.aten.squeeze.dims):
            return None
        source = node.args[0]
        value = source.meta.get("val") if isinstance(source, torch.fx.Node) else None
        if not isinstance(value, torch.Tensor) or len(node.args) < 2:
            return None
        dims = [node.args[1]] if isinstance(node.args[1], int) else list(node.args[1])
        rank = value.dim()
        keep = [d for d in dims if not (isinstance(value.shape[d % rank], int) and value.shape[d % rank] != 1)]
        return (keep, len(dims)) if len(keep) < len(dims) else None

    if not any(noop_dims(n) for n in module.graph.nodes):
        return module
    graph = copy_graph(module.graph)
    for node in list(graph.nodes):
        found = noop_dims(node)
        if found is None:
            continue
        keep, _ = found
        if not keep:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
        else:
            node.target = torch.ops.aten.squeeze.dims
            node.args = (node.args[0], keep)
    graph.lint()
    return torch.fx.GraphModule(module, graph)


def _rename_dims(model: Any, dynamic_dims: Sequence[Mapping[int, str]]) -> None:
    """Renames the exporter's dim symbols to readable names on every value of the main graph.
    Where the exporter unified two named dims into one symbol, the first name wins; symbols inside
    shape expressions ("2*((s0 - 1)//2) + 2") are renamed too."""
    import onnx_ir as ir

    names: dict[str, str] = {}
    for value, dims in zip(model.graph.inputs, dynamic_dims):
        if value.shape is None:
            continue
        for index, name in sorted(dims.items()):
            if index >= len(value.shape):
                continue
            dim = value.shape[index]
            # Two symbols may get one name (the exporter left timestep's batch independent of the
            # latent's); one symbol keeps its first name.
            if isinstance(dim, ir.SymbolicDim) and dim.value and dim.value not in names:
                names[dim.value] = name
    if not names:
        return

    def rename(text: str) -> str:
        return names.get(text) or _SYMBOL.sub(lambda m: names.get(m.group(0), m.group(0)), text)

    def values() -> Iterator[Any]:
        yield from model.graph.inputs
        yield from model.graph.outputs
        for node in model.graph.all_nodes():
            yield from node.outputs

    for value in values():
        shape = value.shape
        if shape is None or not any(isinstance(d, ir.SymbolicDim) and d.value for d in shape):
            continue
        value.shape = ir.Shape([ir.SymbolicDim(rename(d.value)) if isinstance(d, ir.SymbolicDim) and d.value
                                else d for d in shape])


def _rename_internal_clashes(model: Any) -> None:
    """Renames the internal values that carry the name of a graph input or output. The exporter
    names values after the re-traced module's nodes and the graph's outputs after `output_names`,
    so a segment output named after a node of the captured graph ("add_11") can meet an internal
    value of that name, which onnx.checker rejects as not SSA."""
    boundary = {v.name: v for v in [*model.graph.inputs, *model.graph.outputs]}
    taken = set(boundary)
    for node in model.graph.all_nodes():
        taken.update(v.name for v in node.outputs if v.name)
    taken.update(model.graph.initializers)
    for node in model.graph.all_nodes():
        for value in node.outputs:
            if value.name in boundary and boundary[value.name] is not value:
                index = 1
                while f"{value.name}__{index}" in taken:
                    index += 1
                value.name = f"{value.name}__{index}"
                taken.add(value.name)


def _initializer_bytes(model: Any) -> int:
    total = 0
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is not None:
            total += tensor.nbytes
    return total


def _describe_failure(module: torch.fx.GraphModule, path: pathlib.Path, exc: BaseException) -> str:
    """'could not export <path> to ONNX: op X in node Y: reason': the node the exporter's message
    names ("node %add_3"), else the first node whose target it mentions ("aten.foo.default")."""
    text = " ".join(str(exc).split())
    cause = exc
    while cause.__cause__ is not None and cause.__cause__ is not cause:
        cause = cause.__cause__
        text += " | " + " ".join(str(cause).split())
    op, node_name = None, None
    for node in module.graph.nodes:
        if node.op != "call_function":
            continue
        if re.search(rf"node %?{re.escape(node.name)}\b", text):
            op, node_name = str(node.target), node.name
            break
        if op is None and str(node.target) in text:
            op, node_name = str(node.target), node.name
    reason = text[:600] + (" ..." if len(text) > 600 else "")
    where = f"op {op} in node {node_name}: " if op else ""
    return (f"could not export {path.name} to ONNX: {where}{type(exc).__name__}: {reason}. Rewrite or decompose "
            "that op before export, or report it as an unsupported op.")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silences the exporter's logging and warnings for the duration of one export only."""
    saved = []
    for name in _NOISY_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.level))
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)
