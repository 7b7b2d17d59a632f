"""Checks that a DiffusionGraph is well formed: graph, signature, roles, block table and step plan agree."""
from __future__ import annotations

import torch

from ..errors import LintError
from .fxutil import attr_value
from .graph import LATENT, ROLES, TIMESTEP, DiffusionGraph
from .step_plan import StepPlan


def lint(dg: DiffusionGraph) -> None:
    """Raises LintError naming every inconsistency found; returns None when the graph is sound."""
    problems: list[str] = []
    try:
        dg.graph.lint()
    except Exception as exc:  # noqa: BLE001 - fx reports malformed graphs with assorted exceptions
        problems.append(f"fx graph is malformed: {exc}")
    placeholders = [n for n in dg.graph.nodes if n.op == "placeholder"]
    outputs = [n for n in dg.graph.nodes if n.op == "output"]
    sig = dg.signature
    if len(placeholders) != len(sig.inputs):
        problems.append(f"graph has {len(placeholders)} inputs but the signature lists {len(sig.inputs)}")
    roles = [spec.role for spec in sig.inputs]
    for spec in sig.inputs:
        if spec.role not in ROLES:
            problems.append(f"input {spec.name} has unknown role {spec.role!r} (valid: {', '.join(ROLES)})")
        if spec.path[0] not in sig.parameters:
            problems.append(f"input {spec.name} is not a parameter of the original forward {sig.parameters}")
    if roles.count(LATENT) != 1:
        problems.append(f"exactly one input must be the latent, found {roles.count(LATENT)}")
    if roles.count(TIMESTEP) > 1:
        problems.append(f"at most one input may be the timestep, found {roles.count(TIMESTEP)}")
    if len(outputs) != 1:
        problems.append(f"graph must have one output node, has {len(outputs)}")
    else:
        returned = outputs[0].args[0]
        if not isinstance(returned, (tuple, list)) or len(returned) != len(sig.outputs):
            problems.append(f"graph returns {returned!r}, the signature expects a tuple of {len(sig.outputs)}")
    names = {n.name for n in dg.graph.nodes}
    attrs = set()
    for node in dg.graph.nodes:
        if node.op == "get_attr":
            attrs.add(node.target)
            try:
                value = attr_value(dg.module, node.target)
            except AttributeError:
                problems.append(f"get_attr {node.name} reads {node.target}, which the module does not hold")
                continue
            if not isinstance(value, torch.Tensor):
                problems.append(f"get_attr {node.name} reads {node.target}, which is not a tensor")
        elif node.op in ("call_module", "call_method"):
            problems.append(f"node {node.name} is a {node.op}; the IR allows only call_function on aten ops")
    block_names = set()
    for block in dg.blocks:
        if block.name in block_names:
            problems.append(f"block {block.name} is listed twice")
        block_names.add(block.name)
        missing = [n for n in block.nodes if n not in names]
        if missing:
            problems.append(f"block {block.name} lists nodes not in the graph: {missing[:5]}")
        if block.parent is not None and block.parent not in block_names:
            problems.append(f"block {block.name} has parent {block.parent} which is not an earlier block")
        if block.residual is not None:
            for role, node_name in (("add", block.residual.add), ("skip", block.residual.skip)):
                if node_name not in names:
                    problems.append(f"block {block.name}: residual {role} node {node_name} is not in the graph")
    for node_name in dg.annotations:
        if node_name not in names:
            problems.append(f"annotation on {node_name}, which is not in the graph")
    if dg.step_plan is not None:
        if not isinstance(dg.step_plan, StepPlan):
            problems.append(f"step_plan is a {type(dg.step_plan).__name__}, not a StepPlan (passes build one with "
                            "StepPlan.build)")
        else:
            try:
                dg.step_plan.check(names)
            except LintError as exc:
                problems.append(str(exc))
    if problems:
        raise LintError("lint found {} problem(s):\n  - {}".format(len(problems), "\n  - ".join(problems)))

