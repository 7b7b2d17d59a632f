"""The PyTorch backend: runs each segment's aten graph eagerly (or through torch.compile) on CPU
or CUDA, in fp32, or with fp16/bf16 weights under autocast.

Precision annotations (written by the quant pass) are lowered at every precision: on CPU as
exact fake quantization (diffc.ir.simulation.simulate), on CUDA with the low-bit kernels of
diffc.backends.quantized. The low-bit targets (int8, fp8, int4, mixed) need them; the rest of
their graph runs in fp32 on CPU and in bf16 on CUDA."""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch
import torch.fx

from ..errors import TargetError
from ..ir import CompiledPlan, Plan
from ..ir.fxutil import attr_value, copy_graph
from ..ir.precision import precision_specs
from ..ir.simulation import simulate
from . import format_times, quantized
from .base import LOW_BIT, Backend

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class TorchBackend(Backend):
    name = "torch"

    @classmethod
    def unavailable_reason(cls, precision: str) -> str | None:
        if precision in DTYPES or precision in LOW_BIT:
            return None
        return f"the torch backend has no precision {precision!r}"

    def compile(self, plan: Plan, precision: str, device: Any = None, compile: bool | None = None,
                cuda_graphs: bool = False, **options: Any) -> CompiledPlan:
        """`compile=None` compiles each segment with torch.compile on CUDA, where per-op dispatch of
        an eager aten graph would cost more than the module it replaces, and runs eagerly elsewhere.

        `cuda_graphs=True` (CUDA, compiled) replays each segment through CUDA graphs (torch.compile's
        "reduce-overhead" mode: one graph per segment and input shape, recorded on first use), so a
        step launches a few graphs instead of every kernel; each call's outputs are copied out of the
        graphs' memory, which the next replay reuses, so cached state and returned outputs stay valid."""
        self.check_request(precision)
        if options:
            raise TargetError(f"the torch backend has no option {', '.join(sorted(options))}; it takes `compile` "
                              "and `cuda_graphs`")
        device = torch.device(device or "cpu")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise TargetError("device cuda was asked for but torch sees no CUDA GPU; use device='cpu'")
        compile = device.type == "cuda" if compile is None else compile
        if cuda_graphs and (device.type != "cuda" or not compile):
            raise TargetError("cuda_graphs=True replays compiled segments on a CUDA GPU; it needs device='cuda' and "
                              f"compile left on (got device {device}, compile={compile})")
        annotations = plan.graph.annotations
        specs = precision_specs(annotations)
        if precision in LOW_BIT and not specs:
            raise TargetError(f"target torch-{precision} lowers the precision annotations of the quant pass, and this "
                              f"graph has none; add the pass (passes=['quant'] or [..., 'quant']) or use torch-fp16 / "
                              "torch-bf16")
        dtype = DTYPES.get(precision, torch.bfloat16 if device.type == "cuda" else torch.float32)
        converted: dict[int, torch.Tensor] = {}

        def convert(tensor: torch.Tensor) -> torch.Tensor:
            # one converted copy per source tensor, so segments and tied weights keep sharing it
            key = id(tensor)
            if key not in converted:
                converted[key] = torch.nn.Parameter(_in_compute_dtype(tensor, dtype, device),
                                                    requires_grad=False) if tensor.is_floating_point() \
                    else tensor.detach().to(device)
            return converted[key]

        runners: dict[str, Callable[..., Any]] = {}
        kernels: dict[str, str] = {}
        for name, segment in plan.segments.items():
            graph = copy_graph(segment.module.graph)
            _retarget_devices(graph, device)
            weights = {n.target: convert(attr_value(segment.module, n.target))
                       for n in graph.nodes if n.op == "get_attr"}
            module = torch.fx.GraphModule(weights, graph)
            if specs:
                module, segment_kernels = self._lower_precision(module, segment.module, annotations, device, dtype)
                kernels.update(segment_kernels)
            runner: Callable[..., Any] = module
            if cuda_graphs:
                runner = _copied_out(torch.compile(module, mode="reduce-overhead", dynamic=True))
            elif compile:
                # torch's automatic dynamic shapes: kernels specialised to the first call's sizes, made
                # size-generic only when other sizes come; dynamic=True from the start made a CPU UNet's
                # compiled segments barely faster than eager ones (30.1 against 24.5 ms per call)
                runner = torch.compile(module)
            if dtype != torch.float32:
                runner = _autocast(runner, device.type, dtype)
            runners[name] = runner
        missing = sorted(set(specs) - set(kernels))
        if missing:
            raise TargetError(f"precision annotations on nodes no segment computes: {missing[:5]}; the plan and its "
                              "annotations disagree, run the quant pass after the passes that change the graph")
        info: dict[str, Any] = {"compile": compile, **({"cuda_graphs": True} if cuda_graphs else {})}
        if kernels:
            info["kernels"] = {k: sum(v == k for v in kernels.values()) for k in sorted(set(kernels.values()))}
        return CompiledPlan(plan=plan, runners=runners, backend=self.name, precision=precision, device=device,
                            input_dtype=dtype, info=info)

    def relative_format_times(self, formats: tuple[str, ...], device: torch.device,
                              shape: format_times.LayerShape | None = None) -> dict[str, float]:
        """Timed as `compile` runs a layer, eagerly: the CUDA kernels, and on CPU the fake quantization
        (which costs more than the layer it simulates: torch has no faster low-bit CPU matmul)."""
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

        def runner(module: torch.fx.GraphModule, annotations: Any, example: torch.Tensor) -> Callable[[], Any]:
            converted = torch.fx.GraphModule({n.target: _in_compute_dtype(attr_value(module, n.target), dtype, device)
                                              for n in module.graph.nodes if n.op == "get_attr"}, module.graph)
            if annotations is not None:
                converted = self._lower_precision(converted, module, annotations, device, dtype)[0]
            run = converted if dtype == torch.float32 else _autocast(converted, device.type, dtype)
            return lambda: run(example)

        return format_times.relative_times(formats, device, runner, shape)

    def runs_low_bit_kernels(self, device: torch.device) -> bool:
        return device.type == "cuda"

    @staticmethod
    def _lower_precision(module: torch.fx.GraphModule, source: torch.fx.GraphModule, annotations: Any,
                         device: torch.device, dtype: torch.dtype) -> tuple[torch.fx.GraphModule, dict[str, str]]:
        """CPU: exact fake quantization of the annotated nodes; CUDA: the low-bit kernels where
        they take the node, the same simulation elsewhere."""
        if device.type == "cuda":
            return quantized.lower(module, annotations, source, dtype)
        names = {n.name for n in module.graph.nodes}
        lowered = simulate(module, annotations, weights_from=source)
        return lowered, {n: quantized.SIMULATED for n in precision_specs(annotations) if n in names}


def _in_compute_dtype(tensor: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Only matmul/conv weights go low-precision; norms and biases stay fp32 for autocast."""
    low = tensor.is_floating_point() and tensor.dim() >= 2
    return tensor.detach().to(device=device, dtype=dtype if low else tensor.dtype)


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


def _copied_out(runner: Callable[..., Any]) -> Callable[..., Any]:
    """A CUDA-graph runner whose outputs are copies: a replay writes into the memory of the previous
    one, and the plan keeps outputs across steps (cached features, the sampler's past outputs)."""
    @functools.wraps(runner)
    def run(*args: torch.Tensor) -> Any:
        torch.compiler.cudagraph_mark_step_begin()
        return tuple(out.clone() if isinstance(out, torch.Tensor) else out for out in runner(*args))

    return run


def _autocast(runner: Callable[..., Any], device_type: str, dtype: torch.dtype) -> Callable[..., Any]:
    @functools.wraps(runner)
    def run(*args: torch.Tensor) -> Any:
        with torch.autocast(device_type, dtype=dtype):
            return runner(*args)

    return run
