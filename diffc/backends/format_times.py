"""What each layer format costs on this machine: one linear layer, timed as a backend runs it in
that format, over the same layer unquantized. The quant pass's latency budget (`latency_ratio`)
places formats by these ratios wherever the target's backend can time layers here."""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch
import torch.fx

from ..ir.precision import FORMATS, FP8, FP8_MAX, spec_for

aten = torch.ops.aten
# (tokens, input channels, output channels) of the timed layer: a small transformer's projection on
# CPU, an SD/FLUX-size one (4096 tokens, 2048 channels) on a GPU, where small layers only time launches
LAYER_SHAPES = {"cpu": (512, 512, 512), "cuda": (4096, 2048, 2048)}
REPEATS = {"cpu": 7, "cuda": 25}
# (the layer as an FX graph, its precision annotations or None, its input) -> one call of it
RunnerMaker = Callable[[torch.fx.GraphModule, "dict[str, Any] | None", torch.Tensor], Callable[[], Any]]


def one_linear(device: torch.device) -> tuple[torch.fx.GraphModule, torch.Tensor]:
    """A graph of one aten.linear with seeded weights, as capture writes it, and an input for it."""
    rows, inputs, outputs = LAYER_SHAPES["cuda" if device.type == "cuda" else "cpu"]
    generator = torch.Generator().manual_seed(0)
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    layer = graph.call_function(aten.linear.default, (x, graph.get_attr("weight"), graph.get_attr("bias")))
    graph.output((layer,))
    weights = {"weight": torch.randn(outputs, inputs, generator=generator) * inputs ** -0.5,
               "bias": torch.randn(outputs, generator=generator) * 0.1}
    root = torch.nn.Module()
    for name, value in weights.items():
        root.register_buffer(name, value.to(device))
    # tokens of one sample, as a transformer block's projections see them
    return torch.fx.GraphModule(root, graph), torch.randn(1, rows, inputs, generator=generator).to(device)


def layer_annotations(module: torch.fx.GraphModule, example: torch.Tensor, format_name: str) -> dict[str, Any]:
    """The layer of `one_linear` annotated in `format_name`, its static input scale from `example`."""
    node = next(n for n in module.graph.nodes if n.target == aten.linear.default)
    top = float(example.abs().max())
    scale = top / (FP8_MAX if FORMATS[format_name].activation == FP8 else 127.0)
    return {node.name: {"precision": spec_for(format_name, activation_scale=scale).to_json()}}


def median_seconds(call: Callable[[], Any], device: torch.device) -> float:
    def timed() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    timed(), timed()  # first calls allocate and pick kernels
    return statistics.median(timed() for _ in range(REPEATS["cuda" if device.type == "cuda" else "cpu"]))


def relative_times(formats: tuple[str, ...], device: torch.device, make_runner: RunnerMaker) -> dict[str, float]:
    """{format: time of the layer in that format / time of the layer unquantized}."""
    module, example = one_linear(device)
    with torch.no_grad():
        reference = median_seconds(make_runner(module, None, example), device)
        return {name: median_seconds(make_runner(module, layer_annotations(module, example, name), example), device)
                / reference for name in formats}


__all__ = ["LAYER_SHAPES", "layer_annotations", "one_linear", "relative_times"]
