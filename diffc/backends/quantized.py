"""Low-bit layers for the torch backend on CUDA: precision annotations lowered to real kernels.

- int8 W8A8 linear: torch._int_mm (int8 x int8 -> int32, cuBLAS), rescaled by the activation
  scale (static, or each row's own for dynamic per-token activations) times the per-channel
  weight scales;
- fp8 W8A8 linear: torch._scaled_mm with row-wise scales (e4m3 inputs, bf16 output);
- int4 weight-only linear: the tinygemm kernel (torch._weight_int4pack_mm: int4 weights packed once
  in its tiled layout, dequantized inside the matmul with bf16 block scales, bf16 activations) where
  the layer's shape fits it; otherwise weights packed two per byte with fp16 block scales, unpacked
  to the compute dtype in the layer (memory traffic of int4, matmul in bf16).

Every other annotated node (convolutions, W4A8, inputs with per-channel-group scales, attention,
shapes a kernel cannot take) runs the exact
fake-quantization of diffc.ir.precision; `lower` reports which kernel each node got."""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.fx

from ..ir.fxutil import attr_value, copy_graph
from ..ir.precision import (FP8, FP8_MAX, INT4, INT8, PER_TOKEN, PrecisionSpec, precision_specs, quantizable_weight,
                            quantize_weight)
from ..ir.simulation import simulate

aten = torch.ops.aten
INT_MM, SCALED_MM, INT4_TINYGEMM, INT4_PACKED, SIMULATED = ("int_mm", "scaled_mm", "int4_tinygemm", "int4_packed",
                                                             "simulated")
# cuBLAS int8 GEMM shape rules (torch._int_mm): more than 16 rows, K and N multiples of 8;
# fp8 (torch._scaled_mm): K and N multiples of 16.
_INT_MM_MIN_ROWS, _INT_MM_MULTIPLE, _SCALED_MM_MULTIPLE = 17, 8, 16
# tinygemm (torch._weight_int4pack_mm): groups of 32-256 input channels, N a multiple of 8, K a multiple
# of the group and of 16 x the inner K tiles it is packed with (8: the widest)
_TINYGEMM_GROUPS, _TINYGEMM_N_MULTIPLE, _TINYGEMM_INNER_K_TILES = (32, 64, 128, 256), 8, 8


class Int8Linear(torch.nn.Module):
    """y = (round(x / s_x) @ W_q^T) * s_x * s_w + b with an int32 accumulator; s_x static, or
    per row (token) from the row's largest magnitude when the activation is dynamic."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, spec: PrecisionSpec,
                 out_dtype: torch.dtype) -> None:
        super().__init__()
        self.dynamic = spec.activation.dynamic is not None
        activation_scale = 1.0 if self.dynamic else spec.activation.scale
        q = quantize_weight(weight, spec.weight)
        self.register_buffer("weight_t", q.values.to(torch.int8).t())  # (K, N) column-major view for cuBLAS
        self.register_buffer("output_scale", (q.scale.reshape(1, -1) * activation_scale).float())
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        self.activation_scale = float(activation_scale)
        self.out_dtype = out_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1]).float()
        row_scale = None
        if self.dynamic:
            amax = rows.abs().amax(dim=1, keepdim=True)
            row_scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
        q = torch.round(rows / (self.activation_scale if row_scale is None else row_scale)).clamp(-128, 127)
        q = q.to(torch.int8)
        count = q.shape[0]
        if count < _INT_MM_MIN_ROWS:  # zero rows are exact and let cuBLAS take small batches
            q = torch.cat([q, q.new_zeros(_INT_MM_MIN_ROWS - count, q.shape[1])])
        y = torch._int_mm(q, self.weight_t)[:count].float() * self.output_scale
        if row_scale is not None:
            y = y * row_scale
        if self.bias is not None:
            y = y + self.bias
        return y.to(self.out_dtype).reshape(*shape[:-1], y.shape[-1])


class Fp8Linear(torch.nn.Module):
    """e4m3 W8A8 through torch._scaled_mm with the activation scale per row and the weight
    scale per column."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, spec: PrecisionSpec,
                 out_dtype: torch.dtype) -> None:
        super().__init__()
        activation_scale = spec.activation.scale
        q = quantize_weight(weight, spec.weight)
        self.register_buffer("weight_t", q.values.to(torch.float8_e4m3fn).t())
        self.register_buffer("weight_scale", q.scale.reshape(1, -1).float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().to(out_dtype))
        self.activation_scale = float(activation_scale)
        self.out_dtype = out_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1])
        q = (rows.float() / self.activation_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        row_scale = torch.full((q.shape[0], 1), self.activation_scale, device=q.device, dtype=torch.float32)
        y = torch._scaled_mm(q, self.weight_t, scale_a=row_scale, scale_b=self.weight_scale,
                             out_dtype=torch.bfloat16)
        y = y.to(self.out_dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], y.shape[-1])


class Int4WeightOnlyLinear(torch.nn.Module):
    """int4 weights packed two per uint8 with fp16 block scales; unpacked per call."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, spec: PrecisionSpec,
                 out_dtype: torch.dtype) -> None:
        super().__init__()
        q = quantize_weight(weight, spec.weight)
        values = (q.values.flatten(1, 2).to(torch.int16) + 8).to(torch.uint8)  # (N, K padded), 0..15
        self.register_buffer("packed", values[:, 0::2] | (values[:, 1::2] << 4))
        self.register_buffer("scale", q.scale.to(torch.float16))  # (N, blocks, 1)
        self.register_buffer("bias", None if bias is None else bias.detach().to(out_dtype))
        self.in_features = weight.shape[1]
        self.out_dtype = out_dtype

    def unpacked(self) -> torch.Tensor:
        low = (self.packed & 0xF).to(torch.int8) - 8
        high = (self.packed >> 4).to(torch.int8) - 8
        values = torch.stack([low, high], dim=-1).flatten(1)
        blocks = values.reshape(values.shape[0], self.scale.shape[1], -1).to(self.out_dtype)
        return (blocks * self.scale.to(self.out_dtype)).flatten(1)[:, : self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x.to(self.out_dtype), self.unpacked(), self.bias)


class Int4TinygemmLinear(torch.nn.Module):
    """int4 weight-only through tinygemm: values + 8 (0..15) packed once in the kernel's layout, each
    group's scale with a zero offset of 0 (w = (u - 8) * scale: the symmetric grid), bf16 in and out.
    On the CPU the kernel's CPU twin computes the same (it is how this layer is tested without a GPU)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, spec: PrecisionSpec,
                 out_dtype: torch.dtype) -> None:
        super().__init__()
        q = quantize_weight(weight, spec.weight)
        unsigned = q.values.flatten(1).to(torch.int32) + 8  # (N, K), 0..15
        self.on_cuda = weight.device.type == "cuda"
        if self.on_cuda:  # the CUDA packer takes two values per byte, the even input channel high
            pairs = ((unsigned[:, 0::2] << 4) | unsigned[:, 1::2]).to(torch.uint8)
            packed = torch.ops.aten._convert_weight_to_int4pack(pairs, _TINYGEMM_INNER_K_TILES)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unsigned, _TINYGEMM_INNER_K_TILES)
        self.register_buffer("packed", packed)
        scales = q.scale.reshape(q.scale.shape[0], -1).t()  # (groups, N)
        self.register_buffer("scales_and_zeros",
                             torch.stack([scales, torch.zeros_like(scales)], dim=-1).to(torch.bfloat16).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().to(out_dtype))
        self.group = int(spec.weight.block_size)
        self.in_features = weight.shape[1]
        self.out_dtype = out_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        matmul = torch.ops.aten._weight_int4pack_mm if self.on_cuda else torch.ops.aten._weight_int4pack_mm_for_cpu
        y = matmul(rows, self.packed, self.group, self.scales_and_zeros).to(self.out_dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], y.shape[-1])


def kernel_for(node: torch.fx.Node, spec: PrecisionSpec, weight: torch.Tensor) -> str:
    """The kernel a CUDA lowering gives an annotated node: the low-bit layers take linears with
    a constant (or no) bias and one activation scale."""
    bias = node.args[2] if len(node.args) > 2 else None
    grouped = spec.activation is not None and bool(spec.activation.group_sizes)
    if node.target != aten.linear.default or weight.dim() != 2 or grouped or \
            (isinstance(bias, torch.fx.Node) and bias.op != "get_attr"):
        return SIMULATED
    n, k = weight.shape
    weight_type = spec.weight.dtype if spec.weight else None
    activation_type = spec.activation.dtype if spec.activation else None
    if weight_type == INT8 and activation_type == INT8 and k % _INT_MM_MULTIPLE == 0 and n % _INT_MM_MULTIPLE == 0 \
            and spec.activation.dynamic in (None, PER_TOKEN):
        return INT_MM
    if weight_type == FP8 and activation_type == FP8 and k % _SCALED_MM_MULTIPLE == 0 and n % _SCALED_MM_MULTIPLE == 0:
        return SCALED_MM
    if weight_type == INT4 and activation_type is None:
        group = spec.weight.block_size or 0
        fits = (spec.weight.axis == 1 and group in _TINYGEMM_GROUPS and n % _TINYGEMM_N_MULTIPLE == 0
                and k % group == 0 and k % (16 * _TINYGEMM_INNER_K_TILES) == 0)
        return INT4_TINYGEMM if fits else INT4_PACKED
    return SIMULATED


def lower(module: torch.fx.GraphModule, annotations: Mapping[str, Mapping[str, Any]], weights_from: torch.nn.Module,
          compute_dtype: torch.dtype) -> tuple[torch.fx.GraphModule, dict[str, str]]:
    """`module` with each annotated linear replaced by its low-bit layer where a kernel takes it
    and the rest simulated exactly. Returns the module and the kernel of each annotated node."""
    specs = precision_specs(annotations)
    kernels: dict[str, str] = {}
    layers: dict[str, torch.nn.Module] = {}
    for node in module.graph.nodes:
        spec = specs.get(node.name)
        if spec is not None and spec.operands:  # attention: fake-quantized q/k/v into the fused SDPA kernel
            kernels[node.name] = SIMULATED
            continue
        weight_node = quantizable_weight(node) if spec is not None else None
        if spec is None or weight_node is None:
            continue
        weight = attr_value(weights_from, weight_node.target).detach().float()
        kernel = kernel_for(node, spec, weight)
        kernels[node.name] = kernel
        if kernel == SIMULATED:
            continue
        bias_node = node.args[2] if len(node.args) > 2 else None
        bias = attr_value(weights_from, bias_node.target).detach().float() if bias_node is not None else None
        device = attr_value(module, weight_node.target).device
        weight, bias = weight.to(device), None if bias is None else bias.to(device)
        layer = {INT_MM: Int8Linear, SCALED_MM: Fp8Linear, INT4_TINYGEMM: Int4TinygemmLinear,
                 INT4_PACKED: Int4WeightOnlyLinear}[kernel]
        layers[node.name] = layer(weight, bias, spec, compute_dtype)
    simulated = simulate(module, annotations, weights_from=weights_from, skip=lambda n, s: n.name in layers)
    graph = copy_graph(simulated.graph)
    root: dict[str, Any] = {n.target: attr_value(simulated, n.target) for n in graph.nodes if n.op == "get_attr"}
    for node in list(graph.nodes):
        if node.name not in layers:
            continue
        target = f"diffc_lowbit_{node.name}"
        root[target] = layers[node.name]
        with graph.inserting_before(node):
            replacement = graph.call_module(target, (node.args[0],))
        node.replace_all_uses_with(replacement)
        graph.erase_node(node)
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
            root.pop(node.target, None)
    return torch.fx.GraphModule(root, graph), kernels


__all__ = ["Fp8Linear", "Int4TinygemmLinear", "Int4WeightOnlyLinear", "Int8Linear", "kernel_for", "lower"]
