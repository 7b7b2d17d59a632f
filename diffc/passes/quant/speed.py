"""Layers that no allowed format makes faster: where the target's backend runs low-bit formats as
their own kernels (ONNX Runtime; torch on CUDA), each linear is timed at its own shape (rows at
the example's batch, input and output channels) in every format it may get, over the layer
unquantized. On a small layer the quantization steps around the matmul (rounding the input, its
dynamic scales, scaling the output) can cost more than the integer kernel saves: such a layer
stays at full precision, faster and exact. Convolutions are not timed: they stay placeable where the
backend runs quantized convolutions as kernels of their own (TensorRT), and at full precision where it does
not (ONNX Runtime runs a Q/DQ convolution without output quantization in float, from weights dequantized on
every call and never prepacked: shapes-unet's 33 convolutions took 9.8 ms a call unquantized, 19.3 ms in
Q/DQ form; torch has no low-bit convolution kernel)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from ...ir import DiffusionGraph
from ...ir.fxutil import node_shape
from .layers import Layer

# a format pays on a layer when it takes less than this share of the unquantized layer's time:
# a margin over the timing noise of one small layer
PAYS_BELOW = 0.9
DYNAMIC = "int8_dynamic"
# (formats, (rows, in, out)) -> each format's time over the unquantized layer's, or None
LayerTimer = Callable[[tuple[str, ...], tuple[int, int, int]], "dict[str, float] | None"]


@dataclass
class SpeedCheck:
    """`slower`: layer -> why it stays at full precision; `dynamic_slower`: layers whose static
    formats pay but whose int8 with dynamic scales does not (the floor keeps them at full precision
    rather than give them dynamic scales); `times`: per timed shape, each format's relative time."""

    slower: dict[str, str] = field(default_factory=dict)
    dynamic_slower: set[str] = field(default_factory=set)
    times: dict[str, dict[str, float]] = field(default_factory=dict)
    skipped: str | None = None

    def mark(self, layers: list[Layer]) -> list[Layer]:
        """`layers` with the slower ones protected, their reason given."""
        return [dataclasses.replace(layer, protected=self.slower[layer.node])
                if layer.protected is None and layer.node in self.slower else layer for layer in layers]

    def rename(self, renamed: dict[str, str]) -> None:
        """Follows layers another step rewrote under new node names (old -> new)."""
        self.slower = {renamed.get(node, node): why for node, why in self.slower.items()}
        self.dynamic_slower = {renamed.get(node, node) for node in self.dynamic_slower}

    def report(self) -> dict[str, Any]:
        if self.skipped:
            return {"checked": False, "why": self.skipped}
        return {"checked": True, "pays_below": PAYS_BELOW, "relative_times": self.times,
                "kept_slower": sorted(self.slower), "no_dynamic_scales": sorted(self.dynamic_slower)}


def layer_shapes(dg: DiffusionGraph, layers: list[Layer]) -> dict[str, tuple[int, int, int] | None]:
    """Each layer's (rows, in, out) at the captured example's shape; None for a convolution or an
    input of unknown shape."""
    nodes = {node.name: node for node in dg.graph.nodes}
    shapes: dict[str, tuple[int, int, int] | None] = {}
    for layer in layers:
        source = nodes.get(layer.input)
        shape = node_shape(source) if source is not None and len(layer.shape) == 2 else None
        if not shape or not all(isinstance(d, int) for d in shape):
            shapes[layer.node] = None
            continue
        out_features, in_features = layer.shape
        shapes[layer.node] = (math.prod(shape[:-1]), in_features, out_features)
    return shapes


def check_speed(dg: DiffusionGraph, layers: list[Layer], formats: tuple[str, ...], timer: LayerTimer | None,
                dynamic_upgrade: bool, why_not: str, low_bit_convolutions: bool = True) -> SpeedCheck:
    """Times every distinct linear shape among `layers` in `formats` (and int8 with dynamic scales
    where the final-image floor may move layers to it); `why_not` is reported when `timer` is None.
    Without `low_bit_convolutions` (the backend has no low-bit convolution kernel), every convolution
    stays at full precision."""
    if timer is None:
        return SpeedCheck(skipped=why_not)
    timed = tuple(dict.fromkeys([*formats, *([DYNAMIC] if dynamic_upgrade else [])]))
    check = SpeedCheck()
    shapes = layer_shapes(dg, layers)
    for layer in layers:
        shape = shapes[layer.node]
        if len(layer.shape) > 2 and not low_bit_convolutions:
            check.slower[layer.node] = ("no faster quantized here: the target's backend has no low-bit convolution "
                                        "kernel, so a quantized convolution computes in float from dequantized "
                                        "weights")
            continue
        if shape is None:
            continue
        key = "x".join(map(str, shape))
        if key not in check.times:
            measured = timer(timed, shape)
            if measured is None:
                return SpeedCheck(skipped=f"the target's backend cannot time a {key} layer on this machine")
            check.times[key] = {name: round(value, 3) for name, value in measured.items()}
        times = check.times[key]
        if min(times[f] for f in formats) >= PAYS_BELOW:
            check.slower[layer.node] = "no faster quantized here: " + ", ".join(
                f"{f} {times[f]:.2f}x" for f in formats) + f" of the unquantized layer's time at {key} (rows x in " \
                "x out), measured on the target's backend"
        elif dynamic_upgrade and times[DYNAMIC] >= PAYS_BELOW:
            check.dynamic_slower.add(layer.node)
    return check
