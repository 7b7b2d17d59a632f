"""Error-compensated rounding of 4-bit weights (GPTQ, after Optimal Brain Quantization).

Rounding each int4 weight to its nearest level throws away what the layer's inputs say: errors
along input directions the layer rarely sees cost nothing, along frequent ones they cost the most.
GPTQ rounds one input column at a time and moves the rounding error onto the columns not yet
rounded, weighted by the inverse Hessian of the layer's output error, H = X^T X over calibration
inputs, so that ||(W - Q) X|| is what is minimized, not ||W - Q||. Fitted on few, correlated calls, it moves
error into input directions those calls barely span and other prompts' inputs do not avoid; so
Hessians are summed over calls of half the calibration trajectories, and each layer's damping, and
whether its GPTQ rounding beats round-to-nearest at all, are judged on the other half.

The annotation stays a plain int4 spec: the rewritten weights lie on the int4 grid of the scales
that round-to-nearest derives from the original weights (each block's largest magnitude is pinned
at its +-7 level and every other value is clamped to +-7), so every backend, deriving scales from
the weights it is given, computes exactly these values. Only layers annotated with a 4-bit weight
format carry them: `FourBitRounding.apply` points every other layer back at its original weight, so
a layer the final-image floor raises to 8 bits or full precision loses nothing to this rounding.
fp32 weights only (a half-precision copy of the grid values would not lie on the grid)."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.fx

from ...calibration import CalibrationSet, Record
from ...ir import DiffusionGraph
from ...ir.fxutil import attr_value
from ...ir.precision import FORMATS, INT4, WEIGHT_LEVELS, WeightQuant, fake_quantize_weight, spec_for
from .layers import Layer
from .sensitivity import Sensitivity

aten = torch.ops.aten
ROUNDINGS = ("gptq", "nearest")
# GPTQ's damping, a share of the Hessian's mean diagonal added to it so that directions the fitting
# inputs barely span do not take the error: tried in turn, each layer keeps the one with the least
# output error on calls it was not fitted on (few, correlated calls from one trajectory span few
# directions, and other prompts' inputs have components in the rest)
DAMPINGS = (0.01, 0.1, 1.0)
# recorded calls the Hessians are summed over, spread over the trajectories: fitted, and judged
FIT_CALLS, JUDGE_CALLS = 64, 16
LAZY_COLUMNS = 128


def spread_records(calibration: CalibrationSet, items: set[str] | None, count: int) -> Iterator[Record]:
    """`count` recorded calls of `items` (all items: None), spread evenly over them in trajectory order."""
    calls = [(item["id"], call["step"], call.get("call", 0)) for item in calibration.items if items is None or item["id"] in items
             for call in item["calls"]]
    chosen = sorted({round(k * (len(calls) - 1) / max(count - 1, 1)) for k in range(min(count, len(calls)))})
    for index in chosen:
        item, step, call = calls[index]
        yield next(record for record in calibration.records(steps={step}, items={item}) if record.call == call)


@dataclass
class FourBitRounding:
    """Per layer node, its weight's get_attr target, the original weight and the GPTQ-rounded one;
    `skipped`: layers left to round-to-nearest, with the reason."""

    targets: dict[str, str] = field(default_factory=dict)
    originals: dict[str, torch.Tensor] = field(default_factory=dict)
    rounded: dict[str, torch.Tensor] = field(default_factory=dict)
    output_error: dict[str, dict[str, float]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def apply(self, dg: DiffusionGraph) -> DiffusionGraph:
        """Points each rounded layer of `dg` at its rounded weight where its annotation holds a
        4-bit weight format, at its original weight otherwise; returns `dg`."""
        for node, target in self.targets.items():
            _set_attr(dg.module, target, self.rounded[node] if _four_bit(dg, node) else self.originals[node])
        return dg

    def discount(self, sensitivity: Sensitivity) -> None:
        """Lowers the weight term of each rounded layer's 4-bit sensitivities by the share of its
        output error that GPTQ removed, so that the placement weighs the 4-bit weights it will get."""
        for node, errors in self.output_error.items():
            kept = errors["gptq"] / errors["nearest"]
            for name, value in sensitivity.hessian[node].items():
                if FORMATS[name].weight == INT4:
                    removed = sensitivity.weight_trace[node] * sensitivity.weight_perturbation[node][name] * (1 - kept)
                    sensitivity.hessian[node][name] = value - removed

    def report(self, dg: DiffusionGraph) -> dict[str, Any] | None:
        """The layers of `dg` that carry rounded weights, each one's relative output error on the
        calibration inputs rounded to nearest and with GPTQ; None where no layer was rounded."""
        if not self.targets and not self.skipped:
            return None
        carried = [node for node in self.targets if _four_bit(dg, node)]
        return {"method": "gptq", "layers": len(carried),
                "relative_output_error": {node: {k: float(f"{v:.4g}") for k, v in self.output_error[node].items()}
                                          for node in carried},
                "nearest_kept": self.skipped}


def _four_bit(dg: DiffusionGraph, node: str) -> bool:
    spec = dg.annotations.get(node, {}).get("precision")
    return spec is not None and FORMATS[spec["format"]].weight == INT4


def round_four_bit(dg: DiffusionGraph, layers: list[Layer], calibration: CalibrationSet,
                   items: set[str] | None) -> FourBitRounding:
    """GPTQ-rounded int4 weights of `layers`, from the Hessians of their inputs over recorded calls of
    every other trajectory of `items` (None: all), each layer's damping chosen, and its rounding kept
    only where it lowers the output error below round-to-nearest's, on the calls of the trajectories
    in between (with one trajectory: on every other call of it)."""
    scheme = spec_for("int4").weight
    assert scheme is not None
    nodes = {n.name: n for n in dg.graph.nodes}
    uses: Counter[str] = Counter()
    for n in dg.graph.nodes:
        if n.op == "get_attr":
            uses[str(n.target)] += len(n.users)
    rounding = FourBitRounding()
    candidates = []
    for layer in layers:
        weight, node = attr_value(dg.module, layer.weight), nodes[layer.node]
        reason = _unroundable(node, weight, uses[layer.weight] > 1)
        if reason:
            rounding.skipped[layer.node] = reason
        else:
            candidates.append(layer)
    nodes_to_round = {layer.node for layer in candidates}
    trajectories = [item["id"] for item in calibration.items if items is None or item["id"] in items]
    if len(trajectories) > 1:
        fitting, judging = set(trajectories[0::2]), set(trajectories[1::2])
        fitted = _input_hessians(dg, nodes_to_round, spread_records(calibration, fitting, FIT_CALLS))
        judged = _input_hessians(dg, nodes_to_round, spread_records(calibration, judging, JUDGE_CALLS))
    else:
        records = list(spread_records(calibration, items, FIT_CALLS + JUDGE_CALLS))
        fitted = _input_hessians(dg, nodes_to_round, iter(records[0::2]))
        judged = _input_hessians(dg, nodes_to_round, iter(records[1::2]))
    for layer in candidates:
        original = attr_value(dg.module, layer.weight)
        hessian, judge = fitted.get(layer.node), judged.get(layer.node)
        if hessian is None or judge is None:
            rounding.skipped[layer.node] = "no calibration call reached it"
            continue
        nearest = fake_quantize_weight(original.detach(), scheme)
        tried = [fake_quantize_weight(gptq(original.detach(), hessian, scheme, damping), scheme) for damping in DAMPINGS]
        rounded = min(tried, key=lambda w: _output_error(original, w, judge))
        errors = {"nearest": _output_error(original, nearest, judge), "gptq": _output_error(original, rounded, judge)}
        if errors["gptq"] >= errors["nearest"]:
            rounding.skipped[layer.node] = "error-compensated rounding did not lower its output error"
            continue
        rounding.targets[layer.node], rounding.originals[layer.node] = layer.weight, original
        rounding.rounded[layer.node] = _like(rounded, original)
        rounding.output_error[layer.node] = errors
    return rounding


def gptq(weight: torch.Tensor, hessian: torch.Tensor, scheme: WeightQuant, damping: float = DAMPINGS[0]) -> torch.Tensor:
    """`weight` ([out, in] or [out, in, kh, kw]) rounded column by column onto the int4 block grid
    of its own round-to-nearest scales, each column's error moved onto the later columns through
    the inverse of `hessian` (over the flattened input, in-channel major)."""
    shape, block = weight.shape, scheme.block_size or 128
    w = weight.double().reshape(shape[0], shape[1], -1)
    padded = -(-shape[1] // block) * block
    blocks = torch.nn.functional.pad(w, (0, 0, 0, padded - shape[1])).unflatten(1, (-1, block))
    amax = blocks.abs().amax(dim=2, keepdim=True)
    level = WEIGHT_LEVELS[INT4]
    scale = torch.where(amax > 0, amax / level, torch.ones_like(amax))
    pinned = torch.zeros_like(blocks, dtype=torch.bool).scatter_(2, blocks.abs().argmax(dim=2, keepdim=True), True)
    pinned &= amax > 0

    def columns(t: torch.Tensor) -> torch.Tensor:
        return t.expand_as(blocks).flatten(1, 2)[:, :shape[1]].flatten(1)

    scale, pinned, zero = columns(scale), columns(pinned), columns(amax == 0)
    pinned_level = torch.sign(w.flatten(1)) * level
    upper = _inverse_cholesky(hessian.double(), w.flatten(1).shape[1], damping)
    work, out = w.flatten(1).clone(), torch.empty_like(w.flatten(1))
    count = work.shape[1]
    for start in range(0, count, LAZY_COLUMNS):
        end = min(start + LAZY_COLUMNS, count)
        errors = torch.empty(work.shape[0], end - start, dtype=work.dtype)
        for i in range(start, end):
            column = work[:, i]
            levels = torch.where(pinned[:, i], pinned_level[:, i], torch.round(column / scale[:, i]).clamp(-level, level))
            values = torch.where(zero[:, i], torch.zeros_like(column), levels * scale[:, i])
            out[:, i] = values
            error = (column - values) / upper[i, i]
            work[:, i + 1:end] -= error[:, None] * upper[i, i + 1:end][None, :]
            errors[:, i - start] = error
        work[:, end:] -= errors @ upper[start:end, end:]
    return out.reshape(shape).to(weight.dtype)


def _inverse_cholesky(hessian: torch.Tensor, size: int, damping: float) -> torch.Tensor:
    """The upper Cholesky factor of the damped Hessian's inverse (GPTQ's form of it)."""
    h = hessian.clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    h += torch.eye(size, dtype=h.dtype) * damping * torch.diagonal(h).mean()
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    upper: torch.Tensor = torch.linalg.cholesky(inverse, upper=True)
    return upper


def _output_error(original: torch.Tensor, rounded: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr((W - Q) H (W - Q)^T) / tr(W H W^T): the layer's relative output error on the calibration inputs."""
    w = original.detach().double().flatten(1)
    d = rounded.detach().double().flatten(1) - w
    h = hessian.double()
    return float(((d @ h) * d).sum() / ((w @ h) * w).sum().clamp_min(1e-30))


def _unroundable(node: torch.fx.Node, weight: torch.Tensor, shared: bool) -> str | None:
    if weight.dtype != torch.float32:
        return f"its weight is {weight.dtype}, not float32: a half-precision copy of the int4 grid is off the grid"
    if node.target != aten.linear.default and _conv_options(node)[3] != 1:
        return "a grouped convolution"
    if shared:
        return "its weight is shared with another layer"
    return None


def _conv_options(node: torch.fx.Node) -> tuple[Any, Any, Any, int]:
    """(stride, padding, dilation, groups) of a conv2d / convolution node."""
    args = list(node.args)
    if node.target == aten.conv2d.default:
        defaults = [None, None, None, [1, 1], [0, 0], [1, 1], 1]
        stride, padding, dilation, groups = (args + defaults[len(args):])[3:7]
    else:
        stride, padding, dilation, groups = args[3], args[4], args[5], args[8]
    return stride, padding, dilation, int(groups)  # type: ignore[arg-type]


def _input_hessians(dg: DiffusionGraph, nodes: set[str], records: Iterator[Record]) -> dict[str, torch.Tensor]:
    """X^T X over every input row (a linear) or patch (a convolution) each of `nodes` reads."""
    sums: dict[str, torch.Tensor] = {}

    class Collector(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> Any:
            if n.name in nodes:
                args, _ = self.fetch_args_kwargs_from_env(n)
                rows = _input_rows(n, args[0].detach().float(), args[1].shape)
                gram = (rows.T @ rows).double()
                sums[n.name] = sums[n.name] + gram if n.name in sums else gram
            return super().run_node(n)

    with torch.no_grad():
        for record in records:
            Collector(dg.module).run(*[record.inputs[spec.name] for spec in dg.signature.inputs])
    return sums


def _input_rows(node: torch.fx.Node, x: torch.Tensor, weight_shape: torch.Size) -> torch.Tensor:
    """The layer's input as rows against its flattened weight's columns (in-channel major)."""
    if node.target == aten.linear.default:
        return x.reshape(-1, weight_shape[1])
    stride, padding, dilation, _ = _conv_options(node)
    patches = torch.nn.functional.unfold(x, tuple(weight_shape[2:]), dilation=tuple(dilation),
                                         padding=tuple(padding), stride=tuple(stride))
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


def _like(value: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    value = value.to(device=original.device, dtype=original.dtype)
    return torch.nn.Parameter(value, requires_grad=False) if isinstance(original, torch.nn.Parameter) else value


def _set_attr(module: torch.nn.Module, target: str, value: torch.Tensor) -> None:
    owner, _, name = target.rpartition(".")
    setattr(module.get_submodule(owner) if owner else module, name, value)
