"""Fix-ups export_onnx applies around torch.onnx.export: before it, squeezes the exporter mis-lowers are
dropped from the FX graph and strided scatters that interleave become stacks; after it, the exporter's dim symbols get readable names and internal values
that clash with the graph's input and output names are renamed; around it, the exporter's logging is
silenced and its failures are described by the node that caused them. The exporter's per-node debug
metadata (the FX node, its stack trace and module path) is dropped: on a small model it is most of
the file, and nothing reads it."""
from __future__ import annotations

import contextlib
import logging
import pathlib
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.fx

from .fxutil import copy_graph
from .onnx_segments import DIM_SYMBOL

_NOISY_LOGGERS = ("torch.onnx", "torch.export", "torch._export", "torch.fx.experimental.symbolic_shapes",
                  "torch._dynamo", "onnxscript", "onnx_ir", "torchvision")


def without_noop_squeezes(module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of `module` (weights shared) without squeezes of dims that are not 1 (or symbolic), which torch treats
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
        # a symbolic dim was traced at a size other than 1 (torch.export specializes 0 and 1), so the
        # graph after it assumes the squeeze did nothing (Allegro's squeeze(1) of [batch, tokens, channels])
        keep = [d for d in dims if isinstance(value.shape[d % rank], int) and value.shape[d % rank] == 1]
        return (keep, len(dims)) if len(keep) < len(dims) else None

    def drop(graph: torch.fx.Graph, node: torch.fx.Node, found: tuple[list[int], int]) -> None:
        keep, _ = found
        if not keep:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
        else:
            node.target = torch.ops.aten.squeeze.dims
            node.args = (node.args[0], keep)

    return _rewritten(module, noop_dims, drop)


def interleaves_as_stacks(module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of `module` (weights shared) where a chain of strided slice_scatters that together
    overwrite a whole dim (`out[..., 0::2] = a; out[..., 1::2] = b`, the interleave of Wan's rotary
    embedding) is a stack of the sources flattened into that dim: the same values, where the exporter
    lowers each strided scatter to Transpose -> ScatterND -> Transpose, which ONNX Runtime runs
    slowly (Wan at 16 px: 35% of the model's time in those Transposes). Returns `module` itself when
    it has none."""
    def chain(node: torch.fx.Node) -> tuple[int, list[torch.fx.Node]] | None:
        """(dim, sources in order of their start) when `node` ends a covering chain."""
        found: dict[int, torch.fx.Node] = {}
        step, dim, current = None, None, node
        while _is_strided_scatter(current) and len(found) < (step or len(found) + 1):
            _, source, this_dim, start, end, this_step = current.args
            rank = current.meta["val"].dim()
            if (step, dim) != (None, None) and (this_step, this_dim % rank) != (step, dim) or start in found:
                return None
            step, dim = this_step, this_dim % rank
            size = current.meta["val"].shape[dim]
            if not isinstance(size, int) or size % step or end < size or not 0 <= start < step:
                return None
            found[start] = source
            current = current.args[0]
        if step is None or sorted(found) != list(range(step)):
            return None
        return dim, [_copied_value(found[start]) for start in range(step)]

    def stack(graph: torch.fx.Graph, node: torch.fx.Node, found: tuple[int, list[torch.fx.Node]]) -> None:
        dim, sources = found
        with graph.inserting_before(node):
            stacked = graph.call_function(torch.ops.aten.stack.default, (sources, dim + 1))
            interleaved = graph.call_function(torch.ops.aten.flatten.using_ints, (stacked, dim, dim + 1))
        node.replace_all_uses_with(interleaved)

    return _rewritten(module, chain, stack)


def _rewritten(module: torch.fx.GraphModule, match: Callable[[torch.fx.Node], Any],
               rewrite: Callable[[torch.fx.Graph, torch.fx.Node, Any], None]) -> torch.fx.GraphModule:
    """A copy of `module` (weights shared) with `rewrite` applied wherever `match` finds something (not
    None), then the nodes left unused dropped (a scattered buffer, the copies into its slices);
    `module` itself when `match` finds nothing."""
    if all(match(node) is None for node in module.graph.nodes):
        return module
    graph = copy_graph(module.graph)
    for node in list(graph.nodes):
        found = match(node)
        if found is not None:
            rewrite(graph, node, found)
    rewritten = torch.fx.GraphModule(module, graph)
    rewritten.graph.eliminate_dead_code()
    rewritten.graph.lint()
    rewritten.recompile()
    return rewritten


def _is_strided_scatter(node: Any) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and \
        node.target == torch.ops.aten.slice_scatter.default and len(node.args) == 6 and \
        isinstance(node.meta.get("val"), torch.Tensor) and all(isinstance(a, int) for a in node.args[2:]) and \
        node.args[5] > 1


def _copied_value(source: torch.fx.Node) -> torch.fx.Node:
    """What a functionalized `out[...] = value` scatters: `value` itself where the copy only
    carried it into the slice's shape and dtype unchanged."""
    if source.op == "call_function" and source.target == torch.ops.aten.copy.default:
        value = source.args[1]
        into, held = source.meta.get("val"), value.meta.get("val") if isinstance(value, torch.fx.Node) else None
        if isinstance(held, torch.Tensor) and isinstance(into, torch.Tensor) and held.shape == into.shape \
                and held.dtype == into.dtype:
            return value
    return source


# node metadata keys the exporter writes for debugging (the FX node, its stack trace, module scope)
_EXPORTER_TRACE_KEYS = ("namespace", "pkg.torch.onnx.", "pkg.onnxscript.")


def without_exporter_traces(model: Any) -> None:
    """Drops the exporter's debug metadata from every node of the model and its functions."""
    graphs = [model.graph, *model.functions.values()]
    for graph in graphs:
        for node in graph.all_nodes():
            for key in [k for k in node.metadata_props if k.startswith(_EXPORTER_TRACE_KEYS)]:
                del node.metadata_props[key]


def rename_dims(model: Any, dynamic_dims: Sequence[Mapping[int, str]]) -> None:
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
        return names.get(text) or DIM_SYMBOL.sub(lambda m: names.get(m.group(0), m.group(0)), text)

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


def rename_internal_clashes(model: Any) -> None:
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


def describe_failure(module: torch.fx.GraphModule, path: pathlib.Path, exc: BaseException) -> str:
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
    # the innermost cause says why (e.g. "No decompositions registered for the complex-valued input");
    # the outer ones are the exporter's generic advice
    root = " ".join(str(cause).split())
    reason = (root[:300] + " | " if cause is not exc else "") + text[:300] + (" ..." if len(text) > 300 else "")
    where = f"op {op} in node {node_name}: " if op else ""
    return (f"could not export {path.name} to ONNX: {where}{type(cause).__name__}: {reason}. Rewrite or decompose "
            "that op before export, or report it as an unsupported op.")


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
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
