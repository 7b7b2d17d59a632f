"""Precision annotations: the plain-data spec a quantization pass writes on a node
(`dg.annotations[node]["precision"]`) and backends lower, the formats it may name, the quantizers
both sides share (so a backend computes exactly the numbers the pass measured); the exact
fake-quantization simulation of an annotated graph is diffc.ir.simulation.

Weights are quantized symmetrically: int8 and fp8 (e4m3fn) with one scale per output channel,
int4 in blocks of `block_size` input channels with one scale per block. Activations take one
static scale per tensor, calibrated by the pass, or one per group of channels along `axis` where
the input is a concatenation of differently ranged tensors (`group_sizes`, `group_scales`: the
split shortcuts of Q-Diffusion), or, in a dynamic format, scales computed at run time from the
input itself: one per token (each row of a linear's input) or one per sample (a convolution's input,
whose windows mix positions, so a per-position scale cannot be factored out of it). Attention nodes (aten.scaled_dot_product_attention) may have
their query, key and value quantized, each with its static per-tensor scale (`attention_spec`). A spec holds the scheme and the activation
scale; weight scales follow from the weights, so every backend derives the same ones."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.fx

from ..errors import LintError

aten = torch.ops.aten

INT8, FP8, INT4, BF16, FP16 = "int8", "fp8_e4m3", "int4", "bf16", "fp16"
NUMBER_TYPES = (INT8, FP8, INT4, BF16, FP16)
INT_LIMITS = {INT8: (-128, 127), INT4: (-8, 7)}
# Symmetric weight scales map the largest magnitude to this level (127, not 128, keeps 0 exact
# and the grid symmetric); activations use the full signed range when rounding.
WEIGHT_LEVELS = {INT8: 127.0, INT4: 7.0, FP8: 448.0}
FP8_MAX = 448.0
INT4_BLOCK = 128
PER_CHANNEL, BLOCKED = "per_channel", "blocked"
# dynamic activation scales: over the last axis of a linear's input, or over all but the batch axis
PER_TOKEN, PER_SAMPLE = "per_token", "per_sample"
QUANTIZABLE_OPS = (aten.linear.default, aten.conv2d.default, aten.convolution.default)
ATTENTION_OP = aten.scaled_dot_product_attention.default


@dataclass(frozen=True)
class Format:
    """A layer format: how its weight and its input activation are stored/computed.
    None means unchanged (the backend's compute precision)."""

    name: str
    weight: str | None
    activation: str | None
    description: str
    dynamic: bool = False  # activation scales computed at run time from each input


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("bf16", BF16, BF16, "bfloat16 weights and activations"),
    Format("fp16", FP16, FP16, "float16 weights and activations"),
    Format("fp8", FP8, FP8, "W8A8 fp8 e4m3: per-channel weight scales, per-tensor activation scale"),
    Format("int8", INT8, INT8, "W8A8 int8: symmetric per-channel weights, per-tensor activations"),
    Format("int8_dynamic", INT8, INT8, "W8A8 int8: symmetric per-channel weights, activation scales computed at run "
           "time per token (linear) or per sample (convolution)", dynamic=True),
    Format("int4", INT4, None, "int4 weight-only, symmetric blocks of 128 input channels"),
    Format("int8_weight", INT8, None, "int8 weight-only: symmetric per-channel weights, activations at the backend's "
           "precision"),
    Format("w4a8", INT4, INT8, "int4 blocked weights with int8 activations"),
)}


@dataclass(frozen=True)
class WeightQuant:
    dtype: str
    granularity: str | None = None
    axis: int = 0
    block_size: int | None = None


@dataclass(frozen=True)
class ActivationQuant:
    """`scale` for the whole tensor, or with `group_sizes`, consecutive groups of that many
    channels along `axis`, each quantized with its own scale from `group_scales`, or with
    `dynamic` (PER_TOKEN, PER_SAMPLE) scales computed at run time from the input's largest
    magnitude per token or per sample."""

    dtype: str
    scale: float | None = None
    range_method: str | None = None
    group_sizes: tuple[int, ...] = ()
    group_scales: tuple[float, ...] = ()
    axis: int = 1
    dynamic: str | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "ActivationQuant":
        data = dict(data)
        for key in ("group_sizes", "group_scales"):
            data[key] = tuple(data.get(key, ()))
        return cls(**data)

    def scale_vector(self) -> torch.Tensor:
        """The per-channel scales along `axis` (fp32) of a grouped activation."""
        return torch.repeat_interleave(torch.tensor(self.group_scales, dtype=torch.float32),
                                       torch.tensor(self.group_sizes))

    def problems(self) -> list[str]:
        if self.dtype not in (INT8, FP8):
            return []
        if self.dynamic is not None:
            if self.dynamic not in (PER_TOKEN, PER_SAMPLE) or self.dtype != INT8:
                return [f"dynamic activations are int8 with scales {PER_TOKEN!r} or {PER_SAMPLE!r}, got "
                        f"{self.dtype} {self.dynamic!r}"]
            if self.scale is not None or self.group_sizes:
                return ["dynamic activations compute their scales at run time: give no scale or group scales"]
            return []
        if self.group_sizes:
            if len(self.group_sizes) != len(self.group_scales) or min(self.group_sizes) < 1:
                return [f"grouped activations need one positive size per group scale, got sizes {self.group_sizes} "
                        f"and scales {self.group_scales}"]
            bad = [s for s in self.group_scales if not math.isfinite(s) or s <= 0]
            return [f"{self.dtype} activation group scales must be finite and positive, got {bad}"] if bad else []
        if self.scale is None or not math.isfinite(self.scale) or self.scale <= 0:
            return [f"{self.dtype} activations need a finite positive scale, got {self.scale}"]
        return []


@dataclass(frozen=True)
class PrecisionSpec:
    """What a backend must do with one matmul/conv node, or an attention node: then `weight` is
    None, `activation` quantizes the query and `operands` the key and the value. `reason` says
    why the pass chose it."""

    format: str
    weight: WeightQuant | None
    activation: ActivationQuant | None
    reason: str = ""
    operands: tuple[ActivationQuant, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "PrecisionSpec":
        if not isinstance(data, Mapping):
            raise LintError(f"a precision annotation must be a spec dict, got {data!r}; write it with "
                            "PrecisionSpec(...).to_json() (diffc.ir.precision)")
        try:
            weight = WeightQuant(**data["weight"]) if data.get("weight") else None
            activation = ActivationQuant.from_json(data["activation"]) if data.get("activation") else None
            operands = tuple(ActivationQuant.from_json(o) for o in data.get("operands", ()))
            spec = cls(format=data["format"], weight=weight, activation=activation, reason=data.get("reason", ""),
                       operands=operands)
        except (KeyError, TypeError) as exc:
            raise LintError(f"malformed precision annotation {dict(data)}: {exc}. Write it with "
                            "PrecisionSpec(...).to_json() (diffc.ir.precision)") from exc
        spec.validate()
        return spec

    def validate(self) -> None:
        problems = []
        if self.format not in FORMATS:
            problems.append(f"unknown format {self.format!r} (formats: {', '.join(FORMATS)})")
        for part in (self.weight, self.activation):
            if part is not None and part.dtype not in NUMBER_TYPES:
                problems.append(f"unknown number type {part.dtype!r} (types: {', '.join(NUMBER_TYPES)})")
        if self.weight is not None and self.weight.dtype == INT4 and not (self.weight.block_size or 0) > 0:
            problems.append("int4 weights need a positive block_size")
        for part in (self.activation, *self.operands):
            if part is not None:
                problems += part.problems()
        if self.operands and (self.weight is not None or len(self.operands) != 2 or self.activation is None):
            problems.append("an attention spec has no weight, quantizes the query as `activation` and the key and "
                            f"value as two `operands`, got weight {self.weight} and {len(self.operands)} operands")
        if problems:
            raise LintError("invalid precision spec: " + "; ".join(problems))


def spec_for(format_name: str, activation_scale: float | None = None, range_method: str | None = None,
             reason: str = "") -> PrecisionSpec:
    """The spec of a format with diffc's weight schemes and the given activation scale."""
    if format_name not in FORMATS:
        raise LintError(f"unknown format {format_name!r}; formats: {', '.join(FORMATS)}")
    activation = FORMATS[format_name].activation
    quantized = None
    if FORMATS[format_name].dynamic:
        quantized = ActivationQuant(activation, dynamic=PER_TOKEN)
    elif activation in (INT8, FP8):
        quantized = ActivationQuant(activation, float(activation_scale) if activation_scale else None, range_method)
    return spec_with(format_name, quantized, reason)


def spec_with(format_name: str, activation: ActivationQuant | None, reason: str = "") -> PrecisionSpec:
    """The spec of a format with diffc's weight schemes and the given quantization of the input
    activation (required when the format quantizes activations to int8 / fp8)."""
    if format_name not in FORMATS:
        raise LintError(f"unknown format {format_name!r}; formats: {', '.join(FORMATS)}")
    fmt = FORMATS[format_name]
    weight = None
    if fmt.weight in (INT8, FP8):
        weight = WeightQuant(fmt.weight, PER_CHANNEL, axis=0)
    elif fmt.weight == INT4:
        weight = WeightQuant(INT4, BLOCKED, axis=1, block_size=INT4_BLOCK)
    elif fmt.weight is not None:
        weight = WeightQuant(fmt.weight)
    if fmt.activation in (INT8, FP8):
        if activation is None or activation.dtype != fmt.activation:
            raise LintError(f"format {format_name} quantizes activations to {fmt.activation}; give an "
                            f"ActivationQuant of that type, got {activation}")
        if (activation.dynamic is not None) != fmt.dynamic:
            raise LintError(f"format {format_name} takes {'dynamic' if fmt.dynamic else 'static'} activation scales, "
                            f"got {activation}")
    else:
        activation = ActivationQuant(fmt.activation) if fmt.activation is not None else None
    spec = PrecisionSpec(format_name, weight, activation, reason)
    spec.validate()
    return spec


def attention_spec(query: ActivationQuant, key: ActivationQuant, value: ActivationQuant,
                   reason: str = "") -> PrecisionSpec:
    """The spec of an attention node whose query, key and value are quantized to 8 bits (int8 or
    fp8, one static scale per tensor each); the softmax probabilities stay at the backend's
    precision inside the fused attention."""
    types = {query.dtype, key.dtype, value.dtype}
    if len(types) != 1 or not types <= {INT8, FP8}:
        raise LintError(f"attention quantizes query, key and value to one 8-bit type (int8 or fp8), got {types}")
    spec = PrecisionSpec("int8" if query.dtype == INT8 else "fp8", None, query, reason, (key, value))
    spec.validate()
    return spec


def precision_specs(annotations: Mapping[str, Mapping[str, Any]]) -> dict[str, PrecisionSpec]:
    """The precision specs among a graph's annotations, by node name."""
    return {name: PrecisionSpec.from_json(a["precision"]) for name, a in annotations.items() if "precision" in a}


# --- layers -------------------------------------------------------------------------------------
def is_attention(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target == ATTENTION_OP \
        and len(node.args) >= 3


def quantizable_weight(node: torch.fx.Node) -> torch.fx.Node | None:
    """The weight (a get_attr node) of a linear or 2-d convolution node, None for other nodes."""
    if node.op != "call_function" or node.target not in QUANTIZABLE_OPS or len(node.args) < 2:
        return None
    if node.target == aten.convolution.default and (len(node.args) < 7 or node.args[6]):
        return None  # transposed convolutions keep their precision
    weight = node.args[1]
    if not isinstance(weight, torch.fx.Node) or weight.op != "get_attr":
        return None
    meta = weight.meta.get("tensor_meta")
    if meta is not None and len(meta.shape) not in (2, 4):
        return None
    return weight


# --- quantizers ---------------------------------------------------------------------------------
@dataclass
class QuantizedWeight:
    """Integer (or fp8) values and the scales that map them back: w ~ values * scale, with
    `scale` broadcastable to the weight (per-channel) or to its blocks (blocked)."""

    values: torch.Tensor
    scale: torch.Tensor | None
    scheme: WeightQuant
    shape: tuple[int, ...]


def quantize_weight(weight: torch.Tensor, scheme: WeightQuant) -> QuantizedWeight:
    w = weight.detach().float()
    if scheme.dtype in (BF16, FP16):
        return QuantizedWeight(w.to(_torch_dtype(scheme.dtype)), None, scheme, tuple(w.shape))
    if scheme.granularity == BLOCKED:
        blocks = _blocks(w, scheme.axis, scheme.block_size or INT4_BLOCK)
        amax = blocks.abs().amax(dim=scheme.axis + 1, keepdim=True)
        scale = _scale_from_amax(amax, WEIGHT_LEVELS[scheme.dtype])
        values = _round_to(blocks / scale, scheme.dtype)
        return QuantizedWeight(values, scale, scheme, tuple(w.shape))
    reduce = [d for d in range(w.dim()) if d != scheme.axis]
    amax = w.abs().amax(dim=reduce, keepdim=True) if reduce else w.abs()
    scale = _scale_from_amax(amax, WEIGHT_LEVELS[scheme.dtype])
    return QuantizedWeight(_round_to(w / scale, scheme.dtype), scale, scheme, tuple(w.shape))


def dequantize_weight(q: QuantizedWeight) -> torch.Tensor:
    if q.scale is None:
        return q.values.float()
    values = q.values.float() * q.scale
    if q.scheme.granularity == BLOCKED:
        axis = q.scheme.axis
        merged = values.flatten(axis, axis + 1)
        return merged.narrow(axis, 0, q.shape[axis]).contiguous()
    return values


def fake_quantize_weight(weight: torch.Tensor, scheme: WeightQuant) -> torch.Tensor:
    return dequantize_weight(quantize_weight(weight, scheme)).to(weight.dtype)


def blocked_scales(q: QuantizedWeight) -> torch.Tensor:
    """Blocked scales laid out as ONNX's blocked DequantizeLinear takes them: the weight's shape
    with the blocked axis reduced to its number of blocks."""
    return q.scale.squeeze(q.scheme.axis + 1)


def _blocks(w: torch.Tensor, axis: int, block: int) -> torch.Tensor:
    """w with `axis` split into (blocks, block), zero-padded to a whole number of blocks."""
    size = w.shape[axis]
    count = -(-size // block)
    pad = count * block - size
    if pad:
        shape = list(w.shape)
        shape[axis] = pad
        w = torch.cat([w, w.new_zeros(shape)], dim=axis)
    return w.unflatten(axis, (count, block))


def _scale_from_amax(amax: torch.Tensor, level: float) -> torch.Tensor:
    # an all-zero channel gets scale 1 (any scale represents it exactly)
    return torch.where(amax > 0, amax / level, torch.ones_like(amax))


def _round_to(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """Rounds scaled values onto the number type's grid (round half to even, saturating, as
    ONNX QuantizeLinear does); returns them in a float tensor for int types."""
    if dtype == FP8:
        return x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
    low, high = INT_LIMITS[dtype]
    return torch.round(x).clamp(low, high)


def fake_quantize_activation(x: torch.Tensor, dtype: str, scale: float | torch.Tensor | None,
                             axis: int | None = None) -> torch.Tensor:
    """x rounded onto the activation grid and mapped back, in x's dtype. A tensor `scale` holds
    one scale per channel along `axis`."""
    if dtype in (BF16, FP16):
        return x.to(_torch_dtype(dtype)).to(x.dtype)
    if isinstance(scale, torch.Tensor):
        trailing = x.dim() - 1 - axis % x.dim()
        scale = scale.to(x.device).reshape([-1] + [1] * trailing)
    if dtype == FP8:
        return ((x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(x.dtype) * scale).to(x.dtype)
    low, high = INT_LIMITS[dtype]
    return (torch.round(x / scale).clamp(low, high) * scale).to(x.dtype)


def fake_quantize_dynamic(x: torch.Tensor, granularity: str) -> torch.Tensor:
    """x rounded onto the int8 grid with a scale per token (the last axis) or per sample (all
    but the first axis) from its own largest magnitude, and mapped back, in x's dtype."""
    dims = [-1] if granularity == PER_TOKEN else list(range(1, x.dim()))
    scale = _scale_from_amax(x.float().abs().amax(dim=dims, keepdim=True), 127.0)
    low, high = INT_LIMITS[INT8]
    return (torch.round(x.float() / scale).clamp(low, high) * scale).to(x.dtype)


def fake_quantize_input(x: torch.Tensor, activation: ActivationQuant) -> torch.Tensor:
    """x quantized as `activation` says (per tensor, per channel group, or dynamically)."""
    if activation.dynamic is not None:
        return fake_quantize_dynamic(x, activation.dynamic)
    if activation.group_sizes:
        return fake_quantize_activation(x, activation.dtype, activation.scale_vector(), activation.axis)
    return fake_quantize_activation(x, activation.dtype, activation.scale)


def _torch_dtype(name: str) -> torch.dtype:
    return {BF16: torch.bfloat16, FP16: torch.float16}[name]


def weight_bytes(shape: tuple[int, ...], format_name: str | None) -> int:
    """Storage of a weight in a format, scales included (fp32 when None): per-channel scales
    and int4 block scales are counted as fp32 and fp16 respectively."""
    numel = math.prod(shape)
    fmt = FORMATS.get(format_name) if format_name else None
    if fmt is None or fmt.weight is None:
        return 4 * numel
    if fmt.weight in (BF16, FP16):
        return 2 * numel
    if fmt.weight in (INT8, FP8):
        return numel + 4 * shape[0]
    blocks = -(-shape[1] // INT4_BLOCK) if len(shape) > 1 else 1
    return -(-numel // 2) + 2 * shape[0] * blocks * math.prod(shape[2:])
