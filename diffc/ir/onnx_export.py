"""Export a captured graph (or one plan segment) to an ONNX file.

The graph is re-exported with ``torch.onnx.export(dynamo=True)``; its dynamic dimensions are
marked with ``Dim.AUTO`` and the exporter's symbols (s0, s1, ...) are renamed to the readable
names the signature uses (batch, height, width, tokens, text_len) so that users and TensorRT
optimization profiles see them. Weights are embedded in the file when they fit in a protobuf
(under 2 GB), otherwise written next to it as ``<name>.onnx.data``."""
from __future__ import annotations

import contextlib
import logging
import pathlib
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.fx

from ..errors import CaptureError
from .fxutil import copy_graph
from .graph import DiffusionGraph

MIN_OPSET = 21
# Protobuf cannot serialize a message of 2 GiB or more; leave room for the graph itself.
EXTERNAL_DATA_THRESHOLD = 2**31 - 64 * 2**20

_NOISY_LOGGERS = ("torch.onnx", "torch.export", "torch._export", "torch.fx.experimental.symbolic_shapes",
                  "torch._dynamo", "onnxscript", "onnx_ir", "torchvision")
_SYMBOL = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def export_onnx(module: torch.fx.GraphModule, example_inputs: Sequence[torch.Tensor], path: str | pathlib.Path,
                input_names: Sequence[str], output_names: Sequence[str],
                dynamic_dims: Sequence[Mapping[int, str]], opset: int = 21) -> pathlib.Path:
    """Writes `module` to `path` as ONNX and returns the path.

    `dynamic_dims[i]` maps dimension indices of input i to readable names ({0: "batch"}); every
    other dimension is exported static. Raises CaptureError when the opset is below 21, when an
    op cannot be exported, or when the result does not pass the ONNX checker."""
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
    _rename_dims(model, dynamic_dims)

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
    attempts: list[list[dict[int, str]]] = []
    for attempt in (dims, [{d: n for d, n in x.items() if n != "text_len"} for x in dims],
                    [{d: n for d, n in x.items() if n == "batch"} for x in dims], [{} for _ in dims]):
        if attempt not in attempts:
            attempts.append(attempt)
    for index, attempt in enumerate(attempts):
        try:
            return export_onnx(dg.module, inputs, path, input_names, output_names, attempt, opset=opset)
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
