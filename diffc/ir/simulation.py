"""The exact fake-quantization simulation of a graph carrying precision annotations
(diffc.ir.precision): the numbers every backend's lowering must reproduce."""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
import torch.fx

from ..errors import LintError
from .fxutil import attr_value, copy_graph
from .precision import (PER_SAMPLE, PER_TOKEN, ActivationQuant, PrecisionSpec, aten, fake_quantize_activation,
                        fake_quantize_dynamic, fake_quantize_weight, is_attention, precision_specs, quantizable_weight)


def simulate(module: torch.fx.GraphModule, annotations: Mapping[str, Mapping[str, Any]],
             weights_from: torch.nn.Module | None = None,
             skip: Callable[[torch.fx.Node, PrecisionSpec], bool] | None = None) -> torch.fx.GraphModule:
    """A copy of `module` that computes every annotated node with fake-quantized weights and
    input activations: the exact numbers of the annotated formats, in the module's dtype.

    Weights are read from `weights_from` (default: `module`) so a backend that converted the
    module's weights still quantizes the originals. Nodes for which `skip` is true are left to
    the caller. Annotated nodes that are absent from `module` are ignored (a segment holds part
    of a graph)."""
    specs = precision_specs(annotations)
    graph = copy_graph(module.graph)
    source = weights_from if weights_from is not None else module
    root: dict[str, Any] = {n.target: attr_value(module, n.target) for n in graph.nodes if n.op == "get_attr"}
    for node in list(graph.nodes):
        spec = specs.get(node.name)
        if spec is None or (skip is not None and skip(node, spec)):
            continue
        if spec.operands:
            if not is_attention(node):
                raise LintError(f"node {node.name} ({node.target}) carries an attention precision annotation but is "
                                "not aten.scaled_dot_product_attention; annotate attention nodes only with it")
            with graph.inserting_before(node):
                node.args = tuple(_quantized_input(graph, root, node.args[i], a, f"diffc_{node.name}_operand{i}_scale")
                                  for i, a in enumerate((spec.activation, *spec.operands))) + tuple(node.args[3:])
            continue
        weight = quantizable_weight(node)
        if weight is None:
            raise LintError(f"node {node.name} ({node.target}) carries a precision annotation but is not a linear or "
                            "2-d convolution with a constant weight (nor an attention with an attention spec); only "
                            "those can be quantized")
        original = attr_value(source, weight.target)
        with graph.inserting_before(node):
            args = list(node.args)
            if spec.weight is not None:
                name = f"diffc_quantized_{node.name}_weight"
                like = attr_value(module, weight.target)
                root[name] = fake_quantize_weight(original, spec.weight).to(device=like.device, dtype=like.dtype)
                args[1] = graph.get_attr(name)
            if spec.activation is not None:
                _check_groups(node, spec.activation)
                _check_dynamic(node, spec.activation)
                args[0] = _quantized_input(graph, root, args[0], spec.activation, f"diffc_{node.name}_input_scale")
            node.args = tuple(args)
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    used = {n.target for n in graph.nodes if n.op == "get_attr"}
    return torch.fx.GraphModule({k: v for k, v in root.items() if k in used}, graph)


def _check_groups(node: torch.fx.Node, activation: ActivationQuant) -> None:
    source = node.args[0]
    value = source.meta.get("val") if isinstance(source, torch.fx.Node) else None
    if not activation.group_sizes or not isinstance(value, torch.Tensor):
        return
    channels = value.shape[activation.axis]
    if isinstance(channels, int) and sum(activation.group_sizes) != channels:
        raise LintError(f"node {node.name}: its activation groups {activation.group_sizes} cover "
                        f"{sum(activation.group_sizes)} channels along axis {activation.axis}, the input has {channels}; "
                        "give group sizes that sum to the input's channels (the concatenated pieces)")


def _check_dynamic(node: torch.fx.Node, activation: ActivationQuant) -> None:
    wanted = PER_TOKEN if node.target == aten.linear.default else PER_SAMPLE
    if activation.dynamic is not None and activation.dynamic != wanted:
        raise LintError(f"node {node.name} ({node.target}) takes dynamic activation scales {wanted!r}, got "
                        f"{activation.dynamic!r}: a linear's are per token, a convolution's per sample (its windows "
                        "mix positions)")


def _quantized_input(graph: torch.fx.Graph, root: dict[str, Any], value: Any, activation: ActivationQuant,
                     scale_name: str) -> torch.fx.Node:
    if activation.dynamic is not None:
        return graph.call_function(fake_quantize_dynamic, (value, activation.dynamic))
    if not activation.group_sizes:
        return graph.call_function(fake_quantize_activation, (value, activation.dtype, activation.scale))
    root[scale_name] = activation.scale_vector()
    return graph.call_function(fake_quantize_activation,
                               (value, activation.dtype, graph.get_attr(scale_name), activation.axis))
