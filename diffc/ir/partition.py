"""Turning a graph's step plan into a Plan of shared segments.

A *region* (diffc.ir.step_plan.Region) is given by its cut nodes: the tensors a later step may reuse. The region's
nodes are those that die when the cut nodes are replaced by cached values. With `mode: "delta"`,
what is cached is the residual `cut - base` (Delta-DiT, first-block caching): a skipping step
recomputes `base` and adds the cached residual. With `mode: "bypass"` nothing is cached: a
skipping step passes `base` on as the cut (a residual unit removed at some steps). A region's
`keep` names nodes that stay computed although only the region uses them (a block's inputs, when
each block is its own region: skipping one block must not skip the blocks before it). Nodes
outside the regions form the main segments, ordered by how many regions' cuts they depend on:

    main0 -> region0 (or apply0) -> main1 -> region1 (or apply1) -> ... -> mainN

A variant skips some regions; every segment is compiled once and shared by all variants."""
from __future__ import annotations

from typing import Callable

import torch
import torch.fx

from ..errors import PassError
from .fxutil import attr_value
from .graph import DiffusionGraph
from .plan import ADAPTIVE_STATE, OUTPUT_PREFIX, Plan, Segment, Variant
from .step_plan import BYPASS, DELTA, Region

DELTA_SUFFIX = "__delta"


def region_nodes(graph: torch.fx.Graph, cuts: list[str], keep: list[str] = ()) -> set[torch.fx.Node]:
    """Nodes that are needed only to compute `cuts` (they die once the cuts are given); `keep`
    are nodes that must stay computed anyway (the bases a cached residual is added to)."""
    by_name = {n.name: n for n in graph.nodes}
    missing = [c for c in [*cuts, *keep] if c not in by_name]
    if missing:
        raise PassError(f"cut nodes {missing} are not in the graph")
    cut_nodes = {by_name[c] for c in cuts}
    output = next(n for n in graph.nodes if n.op == "output")
    live: set[torch.fx.Node] = set()
    stack = [output, *(by_name[k] for k in keep)]
    while stack:
        node = stack.pop()
        if node in live:
            continue
        live.add(node)
        if node not in cut_nodes:
            stack.extend(node.all_input_nodes)
    dead = {n for n in graph.nodes if n not in live and n.op != "placeholder"}
    return dead | cut_nodes


def build_plan(dg: DiffusionGraph) -> Plan:
    """The Plan of `dg`: one segment when it has no step plan, else the partition it describes."""
    spec = dg.step_plan
    if not spec:
        return Plan.single(dg)
    graph = dg.graph
    nodes = list(graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    by_name = {n.name: n for n in nodes}
    regions = sorted(spec.regions, key=lambda r: min(order[by_name[c]] for c in r.cuts))
    region_of: dict[torch.fx.Node, int] = {}
    for index, region in enumerate(regions):
        for node in region_nodes(graph, list(region.cuts), [*region.bases.values(), *region.keep]):
            if node in region_of:
                raise PassError(f"cached regions {regions[region_of[node]].name} and {region.name} overlap at "
                                f"node {node.name}; choose disjoint block ranges")
            region_of[node] = index
    stage = _stages(nodes, regions, by_name, region_of)
    segment_of: dict[torch.fx.Node, str] = {}
    for node in nodes:
        if node.op in ("placeholder", "output"):
            continue
        segment_of[node] = f"cache_{regions[region_of[node]].name}" if node in region_of else f"main{stage[node]}"
    position = {f"main{k}": 2 * k for k in range(len(regions) + 1)}
    position.update({f"cache_{r.name}": 2 * i + 1 for i, r in enumerate(regions)})
    for node, segment in segment_of.items():
        if node.op == "get_attr":
            continue
        for arg in node.all_input_nodes:
            source = segment_of.get(arg)
            if source is not None and arg.op != "get_attr" and position[source] > position[segment]:
                raise PassError(f"invalid cut: node {node.name} (in {segment}) needs {arg.name}, which is computed "
                                f"later (in {source}); the cached region must be a contiguous part of the network")
    env_name = _env_names(dg)
    # the apply segment adds a cached residual to its base, read from the environment: whichever
    # segment computes a base hands it on, even where no later segment reads it otherwise
    bases = {by_name[base] for region in regions if region.mode == DELTA for base in region.bases.values()}
    extract = _SegmentExtractor(dg, env_name, bases)
    segments: dict[str, Segment] = {}
    state: list[str] = []
    for index in range(len(regions) + 1):
        extract(segments, f"main{index}", [n for n in nodes if segment_of.get(n) == f"main{index}"])
        if index < len(regions):
            region = regions[index]
            members = [n for n in nodes if region_of.get(n) == index]
            name = f"cache_{region.name}"
            if region.mode == DELTA:
                extra = {by_name[c]: by_name[region.bases[c]] for c in region.cuts}
                extract(segments, name, members, deltas=extra)
                segments[f"apply_{region.name}"] = _apply_segment(extra, env_name, f"apply_{region.name}",
                                                                  extract.input_name)
                state += [env_name[c] + DELTA_SUFFIX for c in extra]
            elif region.mode == BYPASS:
                skips = {by_name[c]: by_name[region.bases[c]] for c in region.cuts}
                extract(segments, name, members)
                segments[f"apply_{region.name}"] = _bypass_segment(skips, env_name, f"apply_{region.name}",
                                                                   extract.input_name)
            else:
                extract(segments, name, members)
                state += [env_name[by_name[c]] for c in region.cuts]
    variants = {}
    for variant_name, skipped in spec.variants.items():
        sequence = []
        for index in range(len(regions) + 1):
            sequence.append(f"main{index}")
            if index < len(regions):
                region = regions[index]
                if region.name not in skipped:
                    sequence.append(f"cache_{region.name}")
                elif region.mode in (DELTA, BYPASS):
                    sequence.append(f"apply_{region.name}")
        variants[variant_name] = Variant(variant_name, tuple(s for s in sequence if s in segments))
    outputs = tuple(OUTPUT_PREFIX + o.name for o in dg.signature.outputs)
    if spec.schedule.adaptive:
        state += list(ADAPTIVE_STATE)
    plan = Plan(graph=dg, segments=segments, variants=variants, schedule=spec.schedule,
                outputs=outputs, state=tuple(state), metadata={"step_plan": spec.summary})
    plan.check()
    return plan


def _stages(nodes: list[torch.fx.Node], regions: list[Region], by_name: dict[str, torch.fx.Node],
            region_of: dict[torch.fx.Node, int]) -> dict[torch.fx.Node, int]:
    """For main nodes: 1 + the index of the last region whose cut they depend on (0 for none)."""
    stage: dict[torch.fx.Node, int] = {}
    cut_region = {by_name[c]: i for i, r in enumerate(regions) for c in r.cuts}
    for node in nodes:
        value = 0
        for arg in node.all_input_nodes:
            if arg in cut_region:
                value = max(value, cut_region[arg] + 1)
            elif arg in region_of:
                value = max(value, region_of[arg])
            else:
                value = max(value, stage.get(arg, 0))
        stage[node] = value
    return stage


def _env_names(dg: DiffusionGraph) -> dict[torch.fx.Node, str]:
    names: dict[torch.fx.Node, str] = {}
    placeholders = [n for n in dg.graph.nodes if n.op == "placeholder"]
    for node, spec in zip(placeholders, dg.signature.inputs):
        names[node] = spec.name
    for node in dg.graph.nodes:
        names.setdefault(node, node.name)
    return names


class _SegmentExtractor:
    """Copies a set of nodes into a standalone segment graph: values made elsewhere become
    placeholders, values used elsewhere (or returned by the model) become outputs."""

    def __init__(self, dg: DiffusionGraph, env_name: dict[torch.fx.Node, str],
                 handed_on: set[torch.fx.Node]) -> None:
        self.module = dg.module
        self.env_name = env_name
        self.handed_on = handed_on
        # annotations name the graph's nodes, and backends apply them to the segment node of that
        # name: a segment input standing for a value computed elsewhere must not take its name
        self.taken = {n.name for n in dg.graph.nodes}
        output = next(n for n in dg.graph.nodes if n.op == "output")
        self.model_outputs: dict[torch.fx.Node, list[str]] = {}
        for arg, spec in zip(output.args[0], dg.signature.outputs):
            self.model_outputs.setdefault(arg, []).append(OUTPUT_PREFIX + spec.name)

    def __call__(self, segments: dict[str, Segment], name: str, members: list[torch.fx.Node],
                 deltas: dict[torch.fx.Node, torch.fx.Node] | None = None) -> None:
        compute = [n for n in members if n.op != "get_attr"]
        if not compute:
            return
        member_set = set(compute)
        graph = torch.fx.Graph()
        mapping: dict[torch.fx.Node, torch.fx.Node] = {}
        inputs: list[str] = []
        for node in compute:
            for arg in node.all_input_nodes:
                if arg in mapping or arg in member_set:
                    continue
                if arg.op == "get_attr":
                    mapping[arg] = graph.get_attr(arg.target)
                else:
                    mapping[arg] = graph.placeholder(self.input_name(arg))
                    inputs.append(self.env_name[arg])
            mapping[node] = graph.node_copy(node, lambda a: mapping[a])
        outputs: list[torch.fx.Node] = []
        names: list[str] = []
        for node in compute:
            if node in self.handed_on or any(u not in member_set and u.op != "output" for u in node.users):
                outputs.append(mapping[node])
                names.append(self.env_name[node])
            for model_output in self.model_outputs.get(node, []):
                outputs.append(mapping[node])
                names.append(model_output)
        for cut, base in (deltas or {}).items():
            if base not in mapping:  # the region reads only what was computed from its base (a norm of it)
                mapping[base] = graph.placeholder(self.input_name(base))
                inputs.append(self.env_name[base])
            outputs.append(graph.call_function(torch.ops.aten.sub.Tensor, (mapping[cut], mapping[base])))
            names.append(self.env_name[cut] + DELTA_SUFFIX)
        graph.output(tuple(outputs))
        graph.lint()
        root = {n.target: attr_value(self.module, n.target) for n in graph.nodes if n.op == "get_attr"}
        segments[name] = Segment(name, torch.fx.GraphModule(root, graph), tuple(inputs), tuple(names))

    def input_name(self, node: torch.fx.Node) -> str:
        base = _safe(self.env_name[node])
        if node.op == "placeholder":
            return base
        name, index = f"{base}_input", 1
        while name in self.taken:
            name, index = f"{base}_input{index}", index + 1
        return name


def _apply_segment(deltas: dict[torch.fx.Node, torch.fx.Node], env_name: dict[torch.fx.Node, str],
                   name: str, input_name: Callable[[torch.fx.Node], str]) -> Segment:
    graph = torch.fx.Graph()
    outputs, inputs, names = [], [], []
    for cut, base in deltas.items():
        base_in = graph.placeholder(input_name(base))
        delta_in = graph.placeholder(_safe(env_name[cut] + DELTA_SUFFIX))
        inputs += [env_name[base], env_name[cut] + DELTA_SUFFIX]
        outputs.append(graph.call_function(torch.ops.aten.add.Tensor, (base_in, delta_in)))
        names.append(env_name[cut])
    graph.output(tuple(outputs))
    return Segment(name, torch.fx.GraphModule({}, graph), tuple(inputs), tuple(names))


def _bypass_segment(skips: dict[torch.fx.Node, torch.fx.Node], env_name: dict[torch.fx.Node, str],
                    name: str, input_name: Callable[[torch.fx.Node], str]) -> Segment:
    """A skipped bypass region hands on its residual inputs in place of its outputs."""
    graph = torch.fx.Graph()
    outputs, inputs, names = [], [], []
    for cut, skip in skips.items():
        outputs.append(graph.placeholder(input_name(skip)))
        inputs.append(env_name[skip])
        names.append(env_name[cut])
    graph.output(tuple(outputs))
    return Segment(name, torch.fx.GraphModule({}, graph), tuple(inputs), tuple(names))


def _safe(name: str) -> str:
    return name.replace(".", "_")
