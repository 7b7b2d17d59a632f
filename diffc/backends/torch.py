"""The PyTorch backend: runs each segment's aten graph eagerly (or through torch.compile) on CPU
or CUDA, in fp32, or with fp16/bf16 weights under autocast."""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch
import torch.fx

from ..errors import TargetError
from ..ir import CompiledPlan, Plan
from ..ir.fxutil import attr_value, copy_graph
from .base import LOW_BIT, Backend

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class TorchBackend(Backend):
    name = "torch"

    @classmethod
    def unavailable_reason(cls, precision: str) -> str | None:
        if precision in DTYPES:
            return None
        if precision in LOW_BIT:
            return (f"torch-{precision} lowers the precision annotations written by the quantization pass, "
                    "which this version of diffc does not provide yet; use torch-fp16 or torch-bf16")
        return f"the torch backend has no precision {precision!r}"

    def compile(self, plan: Plan, precision: str, device: Any = None, compile: bool = False,
                **options: Any) -> CompiledPlan:
        reason = self.unavailable_reason(precision)
        if reason:
            raise TargetError(reason)
        if options:
            raise TargetError(f"the torch backend has no option {', '.join(sorted(options))}; it takes `compile`")
        device = torch.device(device or "cpu")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise TargetError("device cuda was asked for but torch sees no CUDA GPU; use device='cpu'")
        dtype = DTYPES[precision]
        converted: dict[int, torch.Tensor] = {}

        def convert(tensor: torch.Tensor) -> torch.Tensor:
            # one converted copy per source tensor, so segments and tied weights keep sharing it;
            # only matmul/conv weights go low-precision, norms and biases stay fp32 for autocast
            key = id(tensor)
            if key not in converted:
                target_dtype = dtype if tensor.is_floating_point() and tensor.dim() >= 2 else tensor.dtype
                converted[key] = torch.nn.Parameter(tensor.detach().to(device=device, dtype=target_dtype),
                                                    requires_grad=False) if tensor.is_floating_point() \
                    else tensor.detach().to(device)
            return converted[key]

        runners: dict[str, Callable[..., Any]] = {}
        for name, segment in plan.segments.items():
            graph = copy_graph(segment.module.graph)
            _retarget_devices(graph, device)
            weights = {n.target: convert(attr_value(segment.module, n.target))
                       for n in graph.nodes if n.op == "get_attr"}
            module = torch.fx.GraphModule(weights, graph)
            runner: Callable[..., Any] = torch.compile(module, dynamic=True) if compile else module
            if dtype != torch.float32:
                runner = _autocast(runner, device.type, dtype)
            runners[name] = runner
        return CompiledPlan(plan=plan, runners=runners, backend=self.name, precision=precision, device=device,
                            input_dtype=dtype, info={"compile": compile})


def _retarget_devices(graph: torch.fx.Graph, device: torch.device) -> None:
    """Tensors the graph creates (arange, ones, ...) were recorded on the capture device."""
    def swap(value: Any) -> Any:
        if isinstance(value, torch.device):
            return device
        if isinstance(value, (list, tuple)):
            return type(value)(swap(v) for v in value)
        if isinstance(value, dict):
            return {k: swap(v) for k, v in value.items()}
        return value

    for node in graph.nodes:
        node.args = swap(node.args)
        node.kwargs = swap(node.kwargs)


def _autocast(runner: Callable[..., Any], device_type: str, dtype: torch.dtype) -> Callable[..., Any]:
    @functools.wraps(runner)
    def run(*args: torch.Tensor) -> Any:
        with torch.autocast(device_type, dtype=dtype):
            return runner(*args)

    return run
