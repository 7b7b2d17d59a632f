"""What each layer format costs on this machine: one linear layer, timed as a backend runs it in
that format, over the same layer unquantized. The quant pass's latency budget (`latency_ratio`)
places formats by these ratios wherever the target's backend can time layers here, and, timed at
each layer's own shape, keeps the layers that no format makes faster at full precision."""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Iterable

import torch
import torch.fx

from ..ir.precision import FORMATS, FP8, FP8_MAX, spec_for

aten = torch.ops.aten
# (tokens, input channels, output channels) of the layer timed for the cost table: a small
# transformer's projection on CPU, an SD/FLUX-size one (4096 tokens, 2048 channels) on a GPU,
# where small layers only time launches
LAYER_SHAPES = {"cpu": (512, 512, 512), "cuda": (4096, 2048, 2048)}
LayerShape = tuple[int, int, int]
REPEATS = {"cpu": 7, "cuda": 25}
# rounds are added, up to this many times the first ones, while a ratio's middle half spans more than
# SETTLED_SPREAD: a ratio that moves with the machine's load is measured until its median holds
MAX_REPEAT_FACTOR, SETTLED_SPREAD = 3, 0.1
# bumped when how a format is lowered or timed changes, so timings kept per machine are taken again
TIMING_METHOD = 1
MIN_REPEAT_SECONDS, MAX_CALLS = 0.002, 200
MIN_RATIO = 1e-3  # a format measured as free (its time within the noise of the call's fixed cost)
# (the layer as an FX graph, its precision annotations or None, its input) -> one call of it
RunnerMaker = Callable[[torch.fx.GraphModule, "dict[str, Any] | None", torch.Tensor], Callable[[], Any]]


def one_linear(device: torch.device, shape: LayerShape | None = None) -> tuple[torch.fx.GraphModule, torch.Tensor]:
    """A graph of one aten.linear with seeded weights, as capture writes it, and an input for it:
    `shape` (rows, in, out), by default the device's cost-table layer."""
    rows, inputs, outputs = shape or LAYER_SHAPES["cuda" if device.type == "cuda" else "cpu"]
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


def passthrough(example: torch.Tensor) -> torch.fx.GraphModule:
    """A graph that only copies its input: what a call costs without the layer (dispatch, feeding
    inputs, returning outputs), subtracted from every timing, as a whole model's layers pay it once."""
    graph = torch.fx.Graph()
    graph.output((graph.call_function(aten.clone.default, (graph.placeholder("x"),)),))
    return torch.fx.GraphModule(torch.nn.Module(), graph)


def layer_annotations(module: torch.fx.GraphModule, example: torch.Tensor, format_name: str) -> dict[str, Any]:
    """The layer of `one_linear` annotated in `format_name`, its static input scale from `example`."""
    node = next(n for n in module.graph.nodes if n.target == aten.linear.default)
    top = float(example.abs().max())
    scale = top / (FP8_MAX if FORMATS[format_name].activation == FP8 else 127.0)
    return {node.name: {"precision": spec_for(format_name, activation_scale=scale).to_json()}}


def _timer(call: Callable[[], Any], device: torch.device) -> Callable[[], float]:
    """One sample of `call`'s time: its mean over enough calls to last MIN_REPEAT_SECONDS (a small
    layer takes microseconds, below the timer's noise)."""
    def timed(calls: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) / calls

    timed(1)  # the first call allocates and picks kernels
    calls = max(1, min(MAX_CALLS, int(MIN_REPEAT_SECONDS / max(timed(1), 1e-7))))
    return lambda: timed(calls)


def relative_times(formats: tuple[str, ...], device: torch.device, make_runner: RunnerMaker,
                   shape: LayerShape | None = None) -> dict[str, float]:
    """{format: time of the layer in that format / time of the layer unquantized}, each without
    the cost of a call that does no work (`passthrough`): the median over rounds that time every
    variant in turn, so a load that comes and goes weighs on both sides of each ratio."""
    module, example = one_linear(device, shape)
    empty = passthrough(example)
    with torch.no_grad():
        samplers = {name: _timer(make_runner(module, layer_annotations(module, example, name), example), device)
                    for name in formats}
        fixed, reference = (_timer(make_runner(graph, None, example), device) for graph in (empty, module))
        ratios: dict[str, list[float]] = {name: [] for name in formats}
        repeats, rounds = REPEATS["cuda" if device.type == "cuda" else "cpu"], 0
        while rounds == 0 or (rounds < MAX_REPEAT_FACTOR * repeats and _unsettled(ratios.values())):
            for _ in range(repeats):
                overhead = fixed()
                layer = max(reference() - overhead, 1e-9)
                for name, sample in samplers.items():
                    ratios[name].append(max(sample() - overhead, 0.0) / layer)
            rounds += repeats
    return {name: max(statistics.median(values), MIN_RATIO) for name, values in ratios.items()}


def _unsettled(samples: Iterable[list[float]]) -> bool:
    """Whether the middle half of any format's ratios spans more than SETTLED_SPREAD."""
    return any(_middle_half(values) > SETTLED_SPREAD for values in samples if len(values) > 1)


def _middle_half(values: list[float]) -> float:
    low, _, high = statistics.quantiles(values, n=4)
    return high - low


__all__ = ["LAYER_SHAPES", "TIMING_METHOD", "LayerShape", "layer_annotations", "one_linear", "passthrough",
           "relative_times"]
