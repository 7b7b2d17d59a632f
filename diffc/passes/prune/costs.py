"""What removing a unit saves: FLOPs of a graph, and an estimated latency (`Roofline`), a roofline
model whose throughputs are measured on the machine the pass runs on."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx

from ...ir import DiffusionGraph
from ...ir.blocks import node_flops


def graph_flops(dg: DiffusionGraph) -> int:
    return sum(node_flops(n) for n in dg.graph.nodes)


@dataclass(frozen=True)
class Roofline:
    """An estimated-latency model: each op costs the larger of its compute time (FLOPs at the
    machine's matmul throughput) and its memory time (bytes of its tensor inputs and output at the
    machine's copy bandwidth), plus a fixed cost per op (dispatch or kernel launch). The three
    figures are measured on the device the graph's weights live on, so the estimate follows the
    machine the pass runs on, at the calibration shapes recorded in the graph."""

    flops_per_s: float
    bytes_per_s: float
    op_seconds: float

    @classmethod
    def measure(cls, device: torch.device | str = "cpu", repeats: int = 5) -> "Roofline":
        size, elements = 512, 1 << 22

        def best(fn: Callable[[], Any]) -> float:
            fn()
            times = []
            for _ in range(repeats):
                if torch.device(device).type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                fn()
                if torch.device(device).type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            return max(min(times), 1e-9)

        a = torch.randn(size, size, device=device)
        source, target = torch.randn(elements, device=device), torch.empty(elements, device=device)
        tiny = torch.zeros(1, device=device)
        with torch.no_grad():
            flops = 2 * size ** 3 / best(lambda: a @ a)
            bandwidth = 2 * 4 * elements / best(lambda: target.copy_(source))
            op = best(lambda: [tiny.add(1) for _ in range(100)]) / 100
        return cls(flops, bandwidth, op)

    def node_seconds(self, node: torch.fx.Node) -> float:
        if node.op != "call_function":
            return 0.0
        tensors = [a for a in node.all_input_nodes if nbytes(a)] + [node]
        memory = sum(nbytes(t) for t in tensors) / self.bytes_per_s
        return max(node_flops(node) / self.flops_per_s, memory) + self.op_seconds

    def graph_seconds(self, dg: DiffusionGraph) -> float:
        return sum(self.node_seconds(n) for n in dg.graph.nodes)


def nbytes(node: torch.fx.Node) -> int:
    """Bytes of the tensor a node outputs at its recorded shape, 0 when it has none."""
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        return 0
    return math.prod(meta.shape) * meta.dtype.itemsize
