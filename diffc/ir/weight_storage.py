"""Weights of quantized layers stored as the layer computes with them: int8 and fp8 values, int4
packed two to a byte, bf16 / fp16, each with its scales, so a saved W8A8 model takes about a
quarter of its fp32 bytes. Loading dequantizes them; quantizing a loaded weight again gives back
the same values and scales (the largest magnitude of each channel or block sits on the grid's top
level, so its scale comes back to the bit), and the loaded model computes what the saved one did."""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping

import torch
import torch.fx

from .precision import (BF16, FP8, FP16, INT4, INT8, QuantizedWeight, WeightQuant, dequantize_weight, precision_specs,
                        quantizable_weight, quantize_weight)

VALUES, SCALES = ".quantized_values", ".quantized_scales"
_STORED_AS = {INT8: torch.int8, FP8: torch.float8_e4m3fn, BF16: torch.bfloat16, FP16: torch.float16}


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """Integers in [-8, 7], flattened, two per byte (the first in the low nibble, two's complement,
    as ONNX stores INT4); an odd count is padded with a zero."""
    flat = values.reshape(-1).to(torch.int8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    nibbles = (flat & 0xF).to(torch.uint8)
    return nibbles[0::2] | (nibbles[1::2] << 4)


def unpack_int4(packed: torch.Tensor, shape: Iterable[int]) -> torch.Tensor:
    """pack_int4's integers back, as float values of `shape`."""
    low, high = (packed & 0xF).to(torch.int16), (packed >> 4).to(torch.int16)
    pairs = torch.stack([low, high], dim=1).reshape(-1)
    signed = torch.where(pairs > 7, pairs - 16, pairs).float()
    shape = tuple(shape)
    return signed[:int(torch.Size(shape).numel())].reshape(shape)


def quantized_weight_schemes(modules: Iterable[torch.fx.GraphModule], annotations: Mapping[str, Mapping[str, Any]],
                             aliases: Mapping[str, str]) -> dict[str, WeightQuant]:
    """Stored weight name -> the scheme of the layers that read it, for weights that only layers
    with one and the same weight scheme read (a weight read anywhere else keeps its values)."""
    specs = precision_specs(annotations)
    schemes: dict[str, set[WeightQuant]] = {}
    read_otherwise: set[str] = set()
    for module in modules:
        for node in module.graph.nodes:
            if node.op != "get_attr":
                continue
            name = aliases.get(node.target, node.target)
            for user in node.users:
                spec = specs.get(user.name)
                if quantizable_weight(user) is node and spec is not None and spec.weight is not None \
                        and user.args.count(node) == 1:
                    schemes.setdefault(name, set()).add(spec.weight)
                else:
                    read_otherwise.add(name)
    return {name: next(iter(found)) for name, found in schemes.items()
            if len(found) == 1 and name not in read_otherwise}


def pack_weights(weights: Mapping[str, torch.Tensor],
                 schemes: Mapping[str, WeightQuant]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """`weights` with each weight of `schemes` replaced by its quantized values and scales, and
    what unpack_weights needs to rebuild it (JSON)."""
    packed = dict(weights)
    entries: dict[str, Any] = {}
    for name, scheme in schemes.items():
        weight = packed.pop(name)
        q = quantize_weight(weight, scheme)
        values = pack_int4(q.values) if scheme.dtype == INT4 else q.values.to(_STORED_AS[scheme.dtype])
        packed[name + VALUES] = values.contiguous()
        if q.scale is not None:
            packed[name + SCALES] = q.scale.contiguous()
        entries[name] = {"scheme": dataclasses.asdict(scheme), "shape": list(q.shape),
                         "values_shape": list(q.values.shape), "dtype": str(weight.dtype).removeprefix("torch.")}
    return packed, entries


def unpack_weights(stored: Mapping[str, torch.Tensor], entries: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """pack_weights' output back to weights (dequantized, in their saved dtype)."""
    weights = dict(stored)
    for name, entry in entries.items():
        scheme = WeightQuant(**entry["scheme"])
        values = weights.pop(name + VALUES)
        values = unpack_int4(values, entry["values_shape"]) if scheme.dtype == INT4 else values.float()
        q = QuantizedWeight(values, weights.pop(name + SCALES, None), scheme, tuple(entry["shape"]))
        weights[name] = dequantize_weight(q).to(getattr(torch, entry["dtype"]))
    return weights


__all__ = ["pack_int4", "pack_weights", "quantized_weight_schemes", "unpack_int4", "unpack_weights"]
