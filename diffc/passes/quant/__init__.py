"""Mixed-precision quantization (annotate, then the backend materializes).

For each linear / 2-d convolution with a constant weight, the pass writes a frozen precision
spec (diffc.ir.precision) into `dg.annotations[node]["precision"]`: the format (bf16, fp8 W8A8,
int8 W8A8, int4 weight-only in blocks of 128, W4A8; 4-bit weights rounded by GPTQ: rounding.py), the
weight scheme and a static activation
scale calibrated on the whole denoising trajectory (Q-Diffusion, PTQ4DM: ranges shift with the
timestep, so statistics cover every timestep group), or where one scale per timestep group lowers
the expected error enough, that one, picked by the call's timestep (timestep_scales.py). With `split_shortcut` (off by default: see
README) a layer
that reads a channel concatenation directly, the conv_shortcut of a UNet decoder resnet reading
cat([upsampled, skip]), quantizes each concatenated piece with its own scale (Q-Diffusion: the two
halves have very different ranges); the resnet's first conv reads the concatenation through a
group norm, which brings the pieces to a common range, so it keeps one scale. With `attention`
(off by default: see README), the query, key and value of every attention node
(aten.scaled_dot_product_attention) are quantized to the format's 8-bit activation type with
static per-tensor scales; the softmax probabilities stay at the backend's precision inside the
fused kernel. Attention nodes take part in sensitivity (activation term only) and placement: they
have no weight bytes, so a size budget leaves them at high precision (nothing to save), a latency
budget weighs their matmul time like a layer's, a single-format target quantizes them. With
`smoothquant=alpha`, every placeable linear first gets SmoothQuant migration (diffc/passes/quant/
smooth.py: x / s into W * s, exact in full precision). The target's precision says which formats
are allowed: int8 / fp8 / int4 quantize every unprotected layer to that format; mixed chooses a
format per layer minimizing the total HAWQ-v2 sensitivity (Hessian trace x perturbation) under
a size or estimated-latency budget (by default the size of uniform W8A8), solved exactly as an
integer program. Layers that carry the
timestep embedding (TFMQ-DM), the first and the last layer stay at the backend's precision, and so,
where the target's backend runs low-bit kernels (ONNX Runtime; torch on CUDA), does a linear that
no allowed format makes faster at its own shape, timed there (speed.py); the
report gives the reason for each, every layer's format, size and sensitivity, the cheap
layer-output MSE proxy beside it, the Pareto front and the error measured on calibration data."""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...calibration import Statistics, compute_statistics
from ...errors import PassError
from ...ir import DiffusionGraph
from ...ir.precision import FORMATS, INT4, INT8, FP8, PER_TOKEN, ActivationQuant, attention_spec, weight_bytes
from .._search import fitting_items, unjudgeable
from ..base import PASSES, Pass, PassConfig, PassContext, PassResult, register_pass
from .annotate import (RANGE_METHODS, activation_scale, activation_types, annotate, dynamic_activation,
                       layer_activation)
from .floor import (DYNAMIC_SHARES, KEEP_SHARES, BudgetedRaise, drop_precision, keep_for_floor,
                    raise_within_budget, with_dynamic_scales, without_precision)
from .formats import (cost_table, formats_for, layer_times, latency_costs, place_by_latency, runs_dynamic_scales,
                      uniform_bytes)
from .layers import PROTECTIONS, Attention, Layer, attention_nodes, quantizable_layers
from .placement import place_by_size
from .report import attention_report, placement_report, predicted_error
from .rounding import ROUNDINGS, FourBitRounding, round_four_bit, spread_records
from .sensitivity import ACCUMULATIONS, Sensitivity, measure
from .smooth import SEARCH_CALLS, search_alphas, smooth
from .speed import SpeedCheck, check_speed
from .timestep_scales import TimestepScales, judged_timestep_scales
from .weight_only import nothing_pays, weight_only_int8

SENSITIVITIES = ("hessian", "mse")
AUTO_FLOOR_8BIT, AUTO_FLOOR_4BIT = 40.0, 30.0


@dataclass(frozen=True)
class QuantConfig(PassConfig):
    formats: tuple[str, ...] | None = None
    size_ratio: float | None = None
    # the size size_ratio multiplies: the weights in fp32, or every placeable layer in this format
    # (size_ratio=1.2, size_relative_to="w4a8": 20% more than uniform W4A8)
    size_relative_to: str = "fp32"
    latency_ratio: float | None = None
    sensitivity: str = "hessian"
    accumulate: str = "trajectory"
    trajectories: int = 2
    samples: int = 8
    probes: int = 4
    activation_range: str = "mse"
    percentile: float = 99.99
    groups: int = 4
    protect: tuple[str, ...] = PROTECTIONS
    pareto_points: int = 10
    seed: int = 0
    split_shortcut: bool = False
    attention: bool = False
    # SmoothQuant migration strength alpha for every linear, "auto" to search it per layer, None for none
    smoothquant: float | str | None = None
    # final-image PSNR (dB) the placement must keep on held-out calibration trajectories; the most
    # sensitive layers move to the next precision until it does (floor.py). "auto": 40 dB when
    # every format has 8 bits or more (int8 should be near-lossless), 30 dB with 4-bit ones.
    # None: no check
    min_psnr: float | str | None = "auto"
    # static int8 inputs whose range drifts with the noise level get one scale per timestep group,
    # picked by the call's timestep, where that lowers their expected error enough (timestep_scales.py);
    # "auto": only when the re-sampled final images come closer with them
    timestep_scales: bool | str = "auto"
    # where the target's backend runs low-bit kernels here (ONNX Runtime, torch on CUDA), a linear
    # that no allowed format makes faster at its own shape stays at full precision (speed.py);
    # False quantizes it anyway (for size)
    only_where_faster: bool = True
    # layers kept at full-precision activations for the timestep path (TFMQ-DM) or for speed (no
    # faster low-bit kernel here) store and compute int8 per-channel weights (weight-only) where the
    # backend runs that at full-precision speed and the final images keep min_psnr with them
    # (weight_only.py): DiT-family adaLN modulation linears hold a quarter or more of the weights
    weight_only_int8: bool = True
    # how 4-bit weights are rounded: "gptq" moves each column's rounding error onto the columns not
    # yet rounded, minimizing the layer's output error on calibration inputs (rounding.py); "nearest"
    rounding: str = "gptq"

    def __post_init__(self) -> None:
        if isinstance(self.formats, str):
            raise ValueError(f"formats is a list of format names, e.g. formats=[{self.formats!r}], got the string "
                             f"{self.formats!r}")
        if self.formats is not None:
            object.__setattr__(self, "formats", tuple(self.formats))
        object.__setattr__(self, "protect", tuple(self.protect))
        if self.sensitivity not in SENSITIVITIES:
            raise ValueError(f"sensitivity must be one of {SENSITIVITIES}, got {self.sensitivity!r}")
        if self.accumulate not in ACCUMULATIONS:
            raise ValueError(f"accumulate must be one of {ACCUMULATIONS}, got {self.accumulate!r}")
        if self.activation_range not in RANGE_METHODS:
            raise ValueError(f"activation_range must be one of {RANGE_METHODS}, got {self.activation_range!r}")
        unknown = sorted(set(self.protect) - set(PROTECTIONS))
        if unknown:
            raise ValueError(f"protect names unknown layer groups {unknown}; choose from {PROTECTIONS}")
        if self.size_relative_to != "fp32" and self.size_relative_to not in FORMATS:
            raise ValueError(f"size_relative_to is 'fp32' or a format ({', '.join(FORMATS)}), got "
                             f"{self.size_relative_to!r}")
        for name in ("size_ratio", "latency_ratio"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if min(self.samples, self.probes, self.groups, self.trajectories) < 1 or self.pareto_points < 2:
            raise ValueError("samples, probes, groups and trajectories must be >= 1 and pareto_points >= 2")
        if self.smoothquant is not None and self.smoothquant != "auto" and not (
                isinstance(self.smoothquant, (int, float)) and 0 <= self.smoothquant <= 1):
            raise ValueError(f"smoothquant is the migration strength alpha in [0, 1] (0.5 in SmoothQuant), 'auto' to "
                             f"search it per layer, or None to leave activations alone; got {self.smoothquant!r}")
        if isinstance(self.min_psnr, str) and self.min_psnr != "auto":
            raise ValueError(f"min_psnr is a PSNR in dB, 'auto' or None, got {self.min_psnr!r}")
        if not (isinstance(self.timestep_scales, bool) or self.timestep_scales == "auto"):
            raise ValueError(f"timestep_scales is True, False or 'auto', got {self.timestep_scales!r}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        if not 0 < self.percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {self.percentile}")


@register_pass
class QuantPass(Pass):
    name = "quant"
    Config = QuantConfig
    requires = ("calibrated", "full_precision")
    writes_precision = True

    def run(self, dg: DiffusionGraph, ctx: PassContext) -> PassResult:
        cfg = self.config
        untouched = dg.clone()
        formats = formats_for(ctx.target, cfg.formats)
        budget_kind, ratio = self._budget(ctx, formats)
        costs, source = latency_costs(ctx.format_times, formats, ratio) if budget_kind == "latency" else ({}, "")
        layers = quantizable_layers(dg, cfg.protect)
        placeable = [layer for layer in layers if layer.protected is None]
        if not placeable:
            removers = [entry["pass"] for entry in dg.applied
                        if getattr(PASSES.get(entry["pass"]), "removes_layers", False)]
            earlier = f", or let {' and '.join(removers)} (run before) remove fewer layers" if removers else ""
            raise PassError(f"{dg.signature.model_class} has no linear or convolution layer left to quantize "
                            f"({len(layers)} found, all protected); protect fewer layer groups (protect=...)"
                            f"{earlier}")
        speed = self._speed(dg, ctx, placeable, formats)
        if len(speed.slower) == len(placeable):
            return nothing_pays(dg, untouched, ctx, speed, speed.mark(layers), self._floor({}), cfg)
        layers = speed.mark(layers)
        placeable = [layer for layer in layers if layer.protected is None]
        smoothed, alphas = self._smooth(dg, ctx, placeable, formats)
        if smoothed:
            layers = speed.mark(quantizable_layers(dg, cfg.protect))
            placeable = [layer for layer in layers if layer.protected is None]
        activations, stats = self._activations(dg, ctx, placeable, formats)
        dg, activations, stepwise = self._timestep_scales(dg, ctx, placeable, formats, activations, stats)
        if stepwise.scales:
            speed.rename(stepwise.renamed)
            layers = speed.mark(quantizable_layers(dg, cfg.protect))
            placeable = [layer for layer in layers if layer.protected is None]
        attentions = attention_nodes(dg) if cfg.attention and activation_types(formats) else []
        attention_quant = self._attention_activations(dg, ctx, attentions, formats)
        sensitivity = measure(dg, placeable, formats, activations, ctx.calibration, cfg.samples, cfg.probes, cfg.accumulate,
                              cfg.trajectories, cfg.seed, attentions=attention_quant)
        rounding = self._rounding(dg, ctx, placeable, formats)
        rounding.discount(sensitivity)
        # attention rows follow the layers: no weight bytes in any format, matmul time at 8 bits
        # where the format quantizes activations, at bf16 where it leaves attention alone
        rows = [layer.node for layer in placeable] + [a.node for a in attentions]
        objective = np.array([[(sensitivity.hessian if cfg.sensitivity == "hessian" else sensitivity.mse)[node][f]
                               for f in formats] for node in rows])
        sizes = np.array([[weight_bytes(layer.shape, f) for f in formats] for layer in placeable]
                         + [[0.0] * len(formats) for _ in attentions], float).reshape(len(rows), len(formats))
        if len(formats) == 1:
            choice = [0] * len(rows)
            rule = f"every unprotected layer in {formats[0]} (target {ctx.target})"
        elif budget_kind == "size":
            choice = place_by_size(objective, sizes, ratio * uniform_bytes(placeable, cfg.size_relative_to),
                                   len(placeable))
            rule = f"minimum predicted error within size_ratio={ratio} of the weights in {cfg.size_relative_to}"
        elif budget_kind == "latency":
            choice = place_by_latency(objective, layer_times(placeable, attentions, attention_quant, formats, costs),
                                      ratio * float(sum(x.flops for x in [*placeable, *attentions])), costs, source)
            rule = f"minimum predicted error within latency_ratio={ratio} of the unquantized matmul time, by format " \
                f"times {source}: {cost_table(costs)}"
        else:
            reference = next((f for f in ("int8", "fp8") if f in formats), None)
            if reference is None:
                raise PassError(f"formats {list(formats)} hold neither int8 nor fp8, so there is no W8A8 size to "
                                "budget by default; give a budget: size_ratio=... or latency_ratio=...")
            choice = place_by_size(objective, sizes, float(sizes[:, formats.index(reference)].sum()), len(placeable))
            rule = f"minimum predicted error at the size of uniform {reference}"
        chosen = {layer.node: formats[i] for layer, i in zip(placeable, choice)}
        annotate(dg, chosen, activations, {layer.node: rule for layer in placeable})
        rounding.apply(dg)
        attention_chosen = {a.node: formats[i] for a, i in zip(attentions, choice[len(placeable):])}
        for node, name in attention_chosen.items():
            if name in attention_quant[node]:
                dg.annotations.setdefault(node, {})["precision"] = attention_spec(*attention_quant[node][name],
                                                                                  reason=rule).to_json()
        placed = {**chosen, **{node: name for node, name in attention_chosen.items() if name in attention_quant[node]}}
        floor = self._floor(placed)
        within = None if budget_kind != "size" or len(formats) == 1 else BudgetedRaise(
            [layer.node for layer in placeable], formats, objective[:len(placeable)], sizes[:len(placeable)],
            np.array([weight_bytes(layer.shape, None) for layer in placeable], float),
            ratio * uniform_bytes(placeable, cfg.size_relative_to), dict(placed), activations, {}, rule, rounding)
        kept, floor_check = self._final_image_floor(dg, ctx, placed, sensitivity, floor,
                                                    {layer.node: dynamic_activation(layer) for layer in placeable
                                                     if layer.node not in speed.dynamic_slower}, within, rounding)
        if kept is None:
            return self._declined(untouched, floor_check, floor, speed)
        for node in floor_check.get("dynamic_scales", []):
            chosen[node] = placed[node] = "int8_dynamic"
        for node, change in floor_check.get("raised_within_budget", {}).items():
            if change["to"] is not None:
                chosen[node] = placed[node] = change["to"]
        dg.annotations = drop_precision(dg.annotations, kept)
        rounding.apply(dg)
        for node in kept:
            placed.pop(node)
            chosen.pop(node, None)
        weight_only, weight_only_check = weight_only_int8(dg, ctx, layers, set(speed.slower), floor, cfg)
        report = placement_report(cfg, dg, ctx, layers, placeable, formats, chosen, sensitivity,
                                  sizes[:len(placeable)], objective[:len(placeable)], rule, weight_only)
        report["weight_only_int8"] = weight_only_check
        report["speed_check"] = speed.report()
        report["final_image_check"] = {**floor_check, "kept_full_precision": kept}
        report["attention"] = attention_report(attentions, attention_chosen, attention_quant, sensitivity,
                                                     set(kept))
        report["smoothquant"] = None if cfg.smoothquant is None else {"alpha": cfg.smoothquant, "layers": smoothed} \
            if alphas is None else {"alpha": cfg.smoothquant, "layers": smoothed,
                                    "alphas": {node: alphas[node] for node in smoothed}}
        report["predicted_error"] = predicted_error(sensitivity, placed)
        report["timestep_scales"] = stepwise.report()
        report["four_bit_rounding"] = rounding.report(dg)
        return PassResult(dg, modified=True, report=report)

    def _fitting(self, ctx: PassContext) -> set[str] | None:
        """The trajectories activation scales are calibrated on: those the floor does not verify on,
        so its held-out figure is out of sample (every trajectory without a floor check)."""
        return fitting_items(ctx) if self.config.min_psnr is not None else None

    def _floor(self, placed: dict[str, str]) -> float | None:
        floor = self.config.min_psnr
        if floor != "auto":
            return floor
        four_bit = any(FORMATS[f].weight == INT4 for f in placed.values())
        return AUTO_FLOOR_4BIT if four_bit else AUTO_FLOOR_8BIT

    def _final_image_floor(self, dg: DiffusionGraph, ctx: PassContext, placed: dict[str, str],
                           sensitivity: Sensitivity, floor: float | None, dynamic: dict[str, ActivationQuant],
                           within: BudgetedRaise | None,
                           rounding: FourBitRounding) -> tuple[list[str] | None, dict[str, Any]]:
        """The quantized nodes to keep at full precision for the final-image floor (floor.py):
        none when there is no floor or no way to re-sample (with a warning saying so), None when
        no share of them keeps it. Where the backend runs dynamic activation scales, static int8
        linears first take them (per token), the fewest that keep the floor, and those nodes are written into
        `dg` and listed as "dynamic_scales"; only when all of them together miss it are layers
        kept at full precision (from the all-dynamic placement), or raised `within` a size budget."""
        if floor is None:
            return [], {"min_psnr": None}
        why = unjudgeable(ctx)
        if why:
            warnings.warn(f"quant: the final images are not checked against min_psnr={floor} dB ({why}), so the "
                          "placement stands on per-call sensitivities alone. Calibrate with the pipeline, or record "
                          "every step of your loop, to have it checked", stacklevel=3)
            return [], {"min_psnr": floor, "judged_on": None, "unchecked": why}
        ranked = sorted(placed, key=lambda node: sensitivity.hessian[node][placed[node]], reverse=True)
        # convolutions keep static scales: one scale per sample (their windows mix positions) is
        # the whole tensor's maximum, coarser than a calibrated clipping range
        static = [node for node in ranked if placed[node] == "int8" and node in dynamic
                  and dynamic[node].dynamic == PER_TOKEN]
        steps: dict[str, Any] = {}
        if static and runs_dynamic_scales(ctx.target):
            upgraded, steps = keep_for_floor(dg, ctx, static, floor, change=lambda graph, nodes: with_dynamic_scales(
                graph, nodes, dynamic), shares=DYNAMIC_SHARES, knob="dynamic_share")
            moved = static if upgraded is None else upgraded
            dg.annotations = with_dynamic_scales(dg, moved, dynamic).annotations
            if upgraded is not None:
                return [], {**steps, "dynamic_scales": upgraded}
            steps = {"dynamic_search": steps["search"], "dynamic_scales": static}
        if within is not None:
            kept, check = raise_within_budget(dg, ctx, ranked, floor, dataclasses.replace(
                within, dynamic={node: dynamic[node] for node in static} if steps else {}))
            return kept, {**check, **steps}
        kept, check = keep_for_floor(dg, ctx, ranked, floor,
                                     change=lambda graph, nodes: rounding.apply(without_precision(graph, nodes)))
        return kept, {**check, **steps}

    def _declined(self, untouched: DiffusionGraph, floor_check: dict[str, Any], floor: float,
                  speed: SpeedCheck) -> PassResult:
        worst = [entry for entry in floor_check["search"] if "psnr" in entry or "held_out_psnr" in entry]
        measured = worst[-1].get("held_out_psnr", worst[-1].get("psnr")) if worst else None
        budget = floor_check.get("within_size_budget")
        moved = "raised to wider formats within size_ratio" if budget else "kept at full precision"
        message = (f"quant: the final images miss {floor} dB PSNR even with up to {max(KEEP_SHARES):.0%} of "
                   f"the quantized layers (the most sensitive) {moved} ({measured} dB), so nothing is "
                   "quantized and the model runs at full precision. Lower min_psnr to accept the loss, or "
                   + ("raise size_ratio." if budget else
                      "use a wider format (int8 rather than int4, fp8 rather than int8)."))
        warnings.warn(message, stacklevel=3)
        return PassResult(untouched, modified=False, report={"declined": message, "final_image_check": floor_check,
                                                             "speed_check": speed.report()})

    def _speed(self, dg: DiffusionGraph, ctx: PassContext, placeable: list[Layer],
               formats: tuple[str, ...]) -> SpeedCheck:
        if not self.config.only_where_faster:
            return SpeedCheck(skipped="only_where_faster=False")
        return check_speed(dg, placeable, formats, ctx.layer_format_times,
                           runs_dynamic_scales(ctx.target) and self.config.min_psnr is not None,
                           f"target {ctx.target} simulates its low-bit formats on this device, or cannot time them "
                           "here", ctx.low_bit_convolutions)

    def _smooth(self, dg: DiffusionGraph, ctx: PassContext, placeable: list[Layer],
                formats: tuple[str, ...]) -> tuple[list[str], dict[str, float | None] | None]:
        """With smoothquant=alpha and a format that quantizes activations, SmoothQuant migration
        on every placeable linear (from its input's per-channel maxima over the trajectory); with
        "auto", at each layer's own alpha (smooth.search_alphas), also returned."""
        cfg = self.config
        linears = [layer for layer in placeable if not layer.pieces and len(layer.shape) == 2]
        if cfg.smoothquant is None or not activation_types(formats) or not linears:
            return [], None
        fitting = self._fitting(ctx)
        stats = compute_statistics(ctx.calibration, dg, groups=cfg.groups, nodes=sorted({layer.input for layer in linears}),
                                   progress=False, items=fitting)
        if cfg.smoothquant != "auto":
            return smooth(dg, linears, stats.node, float(cfg.smoothquant)), None
        alphas = search_alphas(dg, linears, stats.node, list(spread_records(ctx.calibration, fitting, SEARCH_CALLS)),
                               cfg.activation_range, cfg.percentile)
        return smooth(dg, linears, stats.node, alphas), alphas

    def _rounding(self, dg: DiffusionGraph, ctx: PassContext, placeable: list[Layer],
                  formats: tuple[str, ...]) -> FourBitRounding:
        """GPTQ-rounded weights for the layers a 4-bit format may take (none with rounding="nearest")."""
        if self.config.rounding == "nearest" or not any(FORMATS[f].weight == INT4 for f in formats):
            return FourBitRounding()
        return round_four_bit(dg, placeable, ctx.calibration, self._fitting(ctx))

    def _attention_activations(self, dg: DiffusionGraph, ctx: PassContext, attentions: list[Attention],
                               formats: tuple[str, ...]) -> dict[str, dict[str, tuple[ActivationQuant, ...]]]:
        """Per attention node and format with 8-bit activations, the static per-tensor
        quantization of its query, key and value from statistics over every recorded step."""
        if not attentions:
            return {}
        cfg = self.config
        stats = compute_statistics(ctx.calibration, dg, groups=cfg.groups,
                                   nodes=sorted({i for a in attentions for i in a.inputs}), progress=False,
                                   items=self._fitting(ctx))
        quantized = [f for f in formats if FORMATS[f].activation in (INT8, FP8)]
        return {a.node: {f: tuple(ActivationQuant(FORMATS[f].activation,
                                                  activation_scale(stats.node(i), FORMATS[f].activation,
                                                                   cfg.activation_range, cfg.percentile),
                                                  cfg.activation_range) for i in a.inputs)
                         for f in quantized} for a in attentions}

    def _budget(self, ctx: PassContext, formats: tuple[str, ...]) -> tuple[str | None, float | None]:
        cfg = self.config
        size = cfg.size_ratio if cfg.size_ratio is not None else ctx.take_budget("size_ratio")
        latency = cfg.latency_ratio if cfg.latency_ratio is not None else ctx.take_budget("latency_ratio")
        if size is not None and latency is not None:
            raise PassError("give one budget, size_ratio or latency_ratio, not both")
        if (size is not None or latency is not None) and len(formats) == 1:
            raise PassError(f"a budget chooses among formats, but target {ctx.target} allows only {formats[0]}; use "
                            "a mixed target (e.g. torch-mixed) with a budget")
        for value in (size, latency):
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise PassError(f"a budget ratio must be a positive number, got {value!r}")
        return ("size", float(size)) if size is not None else ("latency", float(latency)) if latency is not None \
            else (None, None)

    def _activations(self, dg: DiffusionGraph, ctx: PassContext, layers: list[Layer],
                     formats: tuple[str, ...]) -> tuple[dict[str, dict[str, ActivationQuant]], Statistics | None]:
        """Per layer and format, the quantization of the layer's input: scales computed at run time
        in a dynamic format; otherwise static, from statistics over every recorded step (all
        timestep groups merged); with split_shortcut, a concatenated input gets a scale per piece
        from the piece's own statistics (Q-Diffusion)."""
        quantized = [f for f in formats if FORMATS[f].activation in (INT8, FP8)]
        dynamic = {layer.node: {f: dynamic_activation(layer) for f in quantized if FORMATS[f].dynamic}
                   for layer in layers}
        if all(FORMATS[f].dynamic for f in quantized):
            return dynamic, None
        cfg, stats = self.config, self._input_statistics(dg, ctx, layers)
        return {layer.node: {**dynamic[layer.node],
                             **{f: layer_activation(layer, stats.node, FORMATS[f].activation, cfg.activation_range,
                                                    cfg.percentile, cfg.split_shortcut)
                                for f in quantized if not FORMATS[f].dynamic}}
                for layer in layers}, stats

    def _input_statistics(self, dg: DiffusionGraph, ctx: PassContext, layers: list[Layer]) -> Statistics:
        cfg = self.config
        watched = {layer.input for layer in layers}
        if cfg.split_shortcut:
            watched |= {piece for layer in layers for piece, _ in layer.pieces}
        stats = compute_statistics(ctx.calibration, dg, groups=cfg.groups, nodes=sorted(watched), progress=False,
                                   items=self._fitting(ctx))
        missing = sorted(watched - set(stats.stats))
        if missing:
            raise PassError(f"the calibration statistics have no values for {missing[:5]}; the calibration set does "
                            "not run these nodes. Collect it again with this model")
        return stats

    def _timestep_scales(self, dg: DiffusionGraph, ctx: PassContext, layers: list[Layer], formats: tuple[str, ...],
                         activations: dict[str, dict[str, ActivationQuant]],
                         stats: Statistics | None) -> tuple[DiffusionGraph, Any, TimestepScales]:
        """With static int8 activations among the formats: per-timestep-group scales where they pay
        and the final images say so (timestep_scales.py)."""
        cfg = self.config
        static = [f for f in formats if FORMATS[f].activation == INT8 and not FORMATS[f].dynamic]
        if not cfg.timestep_scales or not static or stats is None:
            return dg, activations, TimestepScales(skipped="off" if not cfg.timestep_scales
                                                   else "no format with static int8 inputs")
        candidates = [layer for layer in layers if not (cfg.split_shortcut and layer.pieces)]
        return judged_timestep_scales(dg, ctx, candidates, static[0], activations,
                                      stats.node, cfg.groups, self._fitting(ctx),
                                      cfg.activation_range, cfg.percentile, judge=cfg.timestep_scales == "auto")


__all__ = ["QuantConfig", "QuantPass"]
