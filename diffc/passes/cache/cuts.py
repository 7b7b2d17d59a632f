"""Where the cache pass cuts the graph: the cached regions and the variants that skip them.

Cuts (see ../shared/papers.md): `deep` (DeepCache: the UNet branch below skip depth d), `encoder`
(Faster Diffusion: the UNet encoder), `blocks` (a DiT block range, caching its residual as in
Delta-DiT), `first_block` (everything after the first transformer block, FORA / first-block
cache), `delta_dit` (rear blocks cached early in sampling, front blocks late). With
schedule='bac', `block_regions` makes every candidate block of the cut its own region (see bac.py)."""
from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch

from ...errors import PassError
from ...ir import LATENT, DiffusionGraph
from ...ir.blocks import RESNET, STAGE, TRANSFORMER_BLOCK, node_flops
from ...ir.partition import region_nodes
from ...ir.step_plan import CACHED, DELTA, FULL, Region

CUTS = ("auto", "deep", "encoder", "blocks", "first_block", "delta_dit")


def cut_regions(dg: DiffusionGraph, cut: str, depth: int, blocks: tuple[int, int] | None,
            mode: str, recomputed_layers: int | None = None) -> tuple[list[Region], dict[str, list[str]]]:
    """The cached regions of `cut` and the variants (each the regions it reuses)."""
    stages = _unet_stages(dg)
    layers = _transformer_layers(dg)
    if cut == "auto":
        # a one-level UNet has no branch below its outermost blocks to cache: cache its encoder
        cut = ("deep" if len(stages["up"]) > 1 else "encoder") if stages else "first_block" if layers else ""
        if not cut:
            raise PassError(f"{dg.signature.model_class}: found neither UNet stages nor transformer blocks to "
                            "cache; this model has no block structure diffc can cut")
    if recomputed_layers is not None and cut != "deep":
        raise PassError(f"recomputed_layers chooses the layers of a UNet's kept up block that cut='deep' recomputes; "
                        f"cut {cut!r} on {dg.signature.model_class} has none. Fix: leave recomputed_layers unset"
                        + (", or cut='deep'" if stages else ""))
    chosen_mode = mode if mode != "auto" else ("raw" if cut in ("deep", "encoder") else "delta")
    try:
        return _cut_regions(dg, cut, depth, blocks, chosen_mode, stages, layers, recomputed_layers)
    except PassError as exc:
        # a residual needs a block input of its output's shape; where the blocks change the
        # stream's shape (a joint text + image stream split at the end), auto caches the output itself
        if mode != "auto" or chosen_mode != DELTA or NO_RESIDUAL not in str(exc):
            raise
        return _cut_regions(dg, cut, depth, blocks, "raw", stages, layers, recomputed_layers)


NO_RESIDUAL = "has the shape of its output"


def _cut_regions(dg: DiffusionGraph, cut: str, depth: int, blocks: tuple[int, int] | None, mode: str,
                 stages: dict[str, list[str]], layers: list[Any],
                 recomputed_layers: int | None) -> tuple[list[Region], dict[str, list[str]]]:
    if cut in ("deep", "encoder"):
        if not stages:
            raise PassError(f"cut {cut!r} needs a UNet (down_blocks/mid_block/up_blocks); "
                            f"{dg.signature.model_class} has none. Use cut='blocks' or 'first_block'")
        cuts = _deep_cuts(dg, stages, depth, recomputed_layers) if cut == "deep" else _encoder_cuts(dg, stages)
        if mode == DELTA:
            raise PassError(f"cut {cut!r} caches the UNet features themselves; use mode='raw'")
        return [Region(cut, tuple(cuts), mode)], {FULL: [], CACHED: [cut]}
    if not layers:
        raise PassError(f"cut {cut!r} needs transformer blocks; {dg.signature.model_class} has none")
    n = len(layers)
    if cut == "delta_dit":
        if n < 2:
            raise PassError(f"delta_dit needs at least 2 transformer blocks, the model has {n}")
        middle = n // 2
        front = _range_region(dg, layers, 0, middle, "front", mode)
        rear = _range_region(dg, layers, middle, n, "rear", mode)
        return [front, rear], {FULL: [], "cached_rear": ["rear"], "cached_front": ["front"]}
    # a single block has nothing after it: cache the block itself
    after_first = (1, n) if n > 1 else (0, n)
    start, end = after_first if cut == "first_block" else (blocks or after_first)
    if not 0 <= start < end <= n:
        raise PassError(f"blocks must be a range within 0..{n} with start < end, got {(start, end)}")
    return [_range_region(dg, layers, start, end, "blocks", mode)], {FULL: [], CACHED: ["blocks"]}


def cached_variant_for(variants: dict[str, list[str]]) -> Any:
    """The cached variant to run at a step (of a number of steps) among `variants`."""
    names = [v for v in variants if v != FULL]

    def pick(step: int, num_steps: int) -> str:
        return _by_stage("", step, num_steps) if len(names) > 1 else names[0]

    return pick


def _by_stage(_: str, step: int, num_steps: int) -> str:
    """Delta-DiT: rear blocks shape details, cached early; front blocks shape outlines, cached late."""
    return "cached_rear" if step < num_steps / 2 else "cached_front"


def block_regions(dg: DiffusionGraph, cut: str, depth: int, blocks: tuple[int, int] | None,
                  mode: str) -> list[Region]:
    """One cached region per candidate block of the cut (see bac.py)."""
    stages = _unet_stages(dg)
    layers = _transformer_layers(dg)
    if stages and cut in ("auto", "deep", "encoder"):
        if mode == "delta":
            raise PassError("schedule='bac' caches UNet stages' outputs themselves; use mode='raw'")
        downs, ups = sorted(stages["down"], key=_index), sorted(stages["up"], key=_index)
        if cut == "encoder":
            chosen = downs + stages["mid"]
        else:
            if not 1 <= depth <= len(ups) - 1:
                raise PassError(f"schedule='bac' with cut {cut!r} takes the stages below skip depth d, which "
                                f"needs 1 <= depth <= {len(ups) - 1} for a UNet with {len(ups)} up blocks, got "
                                f"depth={depth}. Fix: cut='encoder', or schedule='dp' for a one-level UNet")
            chosen = downs[depth:] + stages["mid"] + ups[:len(ups) - depth]
        regions = [_block_region(dg, [dg.block(name)], _short_name(name), "raw") for name in chosen]
    elif layers and cut in ("auto", "blocks", "first_block"):
        n = len(layers)
        start, end = (1, n) if cut == "first_block" else (blocks or (0, n))
        if not 0 <= start < end <= n:
            raise PassError(f"blocks must be a range within 0..{n} with start < end, got {(start, end)}")
        regions = [_transformer_block_region(dg, layers, i, mode) for i in range(start, end)]
    else:
        structure = "UNet stages" if stages else "transformer blocks" if layers else "no UNet stages or transformer blocks"
        raise PassError(f"schedule='bac' cannot take its candidate blocks from cut {cut!r} on "
                        f"{dg.signature.model_class} ({structure}). Fix: cut='auto', 'deep' or 'encoder' on a UNet, "
                        "'auto', 'blocks' or 'first_block' on a transformer")
    if len(regions) < 2:
        raise PassError(f"schedule='bac' gives each block its own steps, but cut {cut!r} leaves one candidate "
                        f"block ({regions[0].name}) in {dg.signature.model_class}. Fix: widen the candidates "
                        "(cut='blocks' with blocks=(0, n), or a smaller depth), or use schedule='dp' for one region")
    return regions


def _transformer_block_region(dg: DiffusionGraph, layers: list[Any], index: int, mode: str) -> Region:
    """A transformer block caches its residual where one of its inputs has its output's shape
    (with mode='auto'; otherwise its output itself). Its inputs stay computed either way."""
    block, name = layers[index], f"block{index}"
    if mode == "raw":
        return _block_region(dg, [block], name, "raw")
    try:
        region = _range_region(dg, layers, index, index + 1, name, "delta")
    except PassError:
        if mode == "delta":
            raise
        return _block_region(dg, [block], name, "raw")
    return dataclasses.replace(region, keep=tuple(i for i in block.inputs if i not in set(block.nodes)))


def _short_name(stage: str) -> str:
    """down_blocks.1 -> down1, mid_block -> mid, up_blocks.0 -> up0."""
    return "mid" if stage == "mid_block" else stage.replace("_blocks.", "")


def _block_region(dg: DiffusionGraph, blocks: list[Any], name: str, mode: str) -> Region:
    """The blocks' outputs cached raw. Their inputs stay computed (`keep`): skipping this block must
    not skip whatever computes its inputs, which other blocks' schedules decide."""
    members = {n for b in blocks for n in b.nodes}
    outputs = [o for b in blocks for o in b.outputs]
    cuts = [o for o in dict.fromkeys(outputs) if any(u.name not in members for u in _node(dg, o).users)]
    keep = _outside_inputs(blocks, members)
    if not cuts:
        raise PassError(f"block {blocks[0].name} has no output used after it")
    dead = region_nodes(dg.graph, cuts, keep)
    if not any(n.name in members for n in dead):
        raise PassError(f"caching block {blocks[0].name} would skip nothing: its outputs are needed elsewhere")
    return Region(name, tuple(cuts), mode, keep=tuple(keep))


def _outside_inputs(blocks: list[Any], members: set[str]) -> list[str]:
    """The blocks' inputs computed outside `members`, in order, each once."""
    return [i for i in dict.fromkeys(i for b in blocks for i in b.inputs) if i not in members]


def _unet_stages(dg: DiffusionGraph) -> dict[str, list[str]]:
    stages: dict[str, list[str]] = {"down": [], "up": [], "mid": []}
    for block in dg.blocks:
        if block.kind != STAGE:
            continue
        kind = block.name.split("_")[0] if block.name != "mid_block" else "mid"
        stages[kind].append(block.name)
    return stages if stages["down"] and stages["up"] else {}


def _deep_cuts(dg: DiffusionGraph, stages: dict[str, list[str]], depth: int, recomputed_layers: int | None) -> list[str]:
    ups = sorted(stages["up"], key=_index)
    n = len(ups)
    if not 1 <= depth <= n - 1:
        raise PassError(f"deep caching needs 1 <= depth <= {n - 1} for a UNet with {n} up blocks, got {depth}: "
                        "depth d keeps the d outermost down/up blocks and caches everything below them")
    deepest_kept = dg.block(ups[n - depth])
    if recomputed_layers is not None:
        within = _within_block_cut(dg, deepest_kept, recomputed_layers)
        if within is not None:
            return [within]
    feeding = dg.block(ups[n - depth - 1])
    cuts = [o for o in feeding.outputs if o in deepest_kept.inputs]
    if len(cuts) != 1:
        raise PassError(f"cannot cut between {feeding.name} and {deepest_kept.name}: expected one hidden state passing "
                        f"between them, found {cuts or 'none'}")
    return cuts


def _within_block_cut(dg: DiffusionGraph, up_block: Any, recomputed_layers: int) -> str | None:
    """The hidden state entering the first of `up_block`'s last `recomputed_layers` layers (before
    its skip connection is concatenated), or None when those are all its layers. Caching it skips
    the block's earlier layers and every down layer whose skip only they consume, as DeepCache's
    skip branches within a block do."""
    resnets = sorted((b for b in dg.blocks if b.kind == RESNET and b.parent == up_block.name), key=lambda b: _index(b.name))
    if not 1 <= recomputed_layers <= len(resnets):
        raise PassError(f"recomputed_layers must be within 1..{len(resnets)}, the layers of {up_block.name}; got "
                        f"{recomputed_layers}")
    if recomputed_layers == len(resnets):
        return None
    first = resnets[len(resnets) - recomputed_layers]
    inputs = [_node(dg, i) for i in first.inputs]
    concatenations = [node for node in inputs if node.target == torch.ops.aten.cat.default]
    if len(concatenations) != 1 or not isinstance(concatenations[0].args[0][0], torch.fx.Node):
        raise PassError(f"cannot cut inside {up_block.name}: {first.name} does not take its hidden state concatenated "
                        "with a skip connection. Fix: leave recomputed_layers unset to cut between blocks")
    return concatenations[0].args[0][0].name


def _encoder_cuts(dg: DiffusionGraph, stages: dict[str, list[str]]) -> list[str]:
    encoder = set(stages["down"]) | set(stages["mid"])
    members = {n for b in dg.blocks if b.name in encoder for n in b.nodes}
    cuts = []
    for block in dg.blocks:
        if block.name in encoder:
            for out in block.outputs:
                users = {u.name for u in _node(dg, out).users}
                if users - members and out not in cuts:
                    cuts.append(out)
    return cuts


def _transformer_layers(dg: DiffusionGraph) -> list[Any]:
    """Top-level transformer blocks on the latent's path, in execution order (e.g. transformer_blocks.*
    then single_transformer_blocks.* for FLUX). Blocks that see only the conditioning (a text
    refiner, a perceiver resampler) run before the trunk and are not what caching skips."""
    on_latent_path = _downstream_of_latent(dg)
    return [b for b in dg.blocks if b.kind == TRANSFORMER_BLOCK and b.parent is None
            and (on_latent_path is None or b.nodes[0] in on_latent_path or set(b.inputs) & on_latent_path)]


def _downstream_of_latent(dg: DiffusionGraph) -> set[str] | None:
    """Names of the nodes computed from the latent input (None for a graph without one)."""
    placeholders = [n for n in dg.graph.nodes if n.op == "placeholder"]
    index = next((i for i, spec in enumerate(dg.signature.inputs) if spec.role == LATENT), None)
    if index is None or index >= len(placeholders):
        return None
    start = placeholders[index]
    seen, stack = {start.name}, [start]
    while stack:
        for user in stack.pop().users:
            if user.name not in seen:
                seen.add(user.name)
                stack.append(user)
    return seen


def _range_region(dg: DiffusionGraph, layers: list[Any], start: int, end: int, name: str, mode: str) -> Region:
    first, last = layers[start], layers[end - 1]
    members = {n for b in layers[start:end] for n in b.nodes}
    # a shape the blocks compute (a symbolic size later blocks reuse) is no state to cache
    cuts = [o for o in last.outputs if _node(dg, o).meta.get("tensor_meta") is not None
            and any(u.name not in members for u in _node(dg, o).users)]
    if not cuts:
        raise PassError(f"block range {start}..{end} has no output used after it")
    bases: dict[str, str] = {}
    if mode == DELTA:
        for cut in cuts:
            shape = _node(dg, cut).meta.get("tensor_meta")
            match = [i for i in first.inputs if _node(dg, i).meta.get("tensor_meta") is not None
                     and tuple(_node(dg, i).meta["tensor_meta"].shape) == tuple(shape.shape)] if shape else []
            match = _residual_stream(dg, layers, start, match)
            if not match:
                raise PassError(f"cannot cache the residual of blocks {start}..{end}: no input of {first.name} has the "
                                f"shape of its output {cut}; use mode='raw'")
            bases[cut] = match[0] if len(cuts) == 1 else match[min(cuts.index(cut), len(match) - 1)]
    # caching the range must not skip the blocks before it: the bases stop a residual's region there, and
    # the range's inputs stop a raw one
    keep = [] if mode == DELTA else _outside_inputs(layers[start:end], members)
    dead = region_nodes(dg.graph, cuts, [*bases.values(), *keep])
    if not any(n.name in members for n in dead):
        raise PassError(f"caching blocks {start}..{end} would skip nothing: their outputs are needed elsewhere")
    return Region(name, tuple(cuts), mode, bases, keep=tuple(keep))


def _residual_stream(dg: DiffusionGraph, layers: list[Any], start: int, candidates: list[str]) -> list[str]:
    """The candidates for the base of a block range's residual, those of its residual stream first:
    the previous block's outputs, then inputs the first block adds to directly (its skip
    connection). An input of the same shape that only feeds attention (a text stream as long as
    the image's) would make the cached residual the difference of two unrelated streams."""
    previous = set(layers[start - 1].outputs) if start > 0 else set()
    members = set(layers[start].nodes)
    added = {c for c in candidates if any(u.name in members and u.target == torch.ops.aten.add.Tensor
                                          for u in _node(dg, c).users)}
    return sorted(candidates, key=lambda c: (c not in previous, c not in added))


def _node(dg: DiffusionGraph, name: str) -> torch.fx.Node:
    for node in dg.graph.nodes:
        if node.name == name:
            return node
    raise PassError(f"node {name} not in graph")


def _index(name: str) -> int:
    match = re.search(r"(\d+)$", name)
    return int(match.group(1)) if match else 0


def segment_flops(dg: DiffusionGraph, segment: Any) -> int:
    """The FLOPs of the graph's nodes that a plan segment computes."""
    names = {n.name for n in segment.module.graph.nodes if n.op == "call_function"}
    return sum(node_flops(n) for n in dg.graph.nodes if n.name in names)
