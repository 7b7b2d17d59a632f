"""int8 weight-only storage for the layers the placement leaves at full precision for a reason other
than their error: the timestep-embedding path (TFMQ-DM: their input is the timestep embedding, and an
activation error there shifts every step's features) and layers no low-bit kernel makes faster on
the target's backend (speed.py).

Their activations stay as they were, but nothing is gained by keeping their weights in full
precision too. Stored as int8 per output channel and computed from weights dequantized once (torch:
the simulation's constants; ONNX Runtime: a float initializer), they cost no time and a per-channel
weight error of about 0.2%; in DiT-family models the adaLN modulation linears on the timestep path
hold a quarter or more of the weights (FLUX, SD3). It is a saving the user did not trade fidelity
for, so a group is taken only where it saves at least MIN_SAVING of the weight bytes, and where the
held-out final images keep min_psnr and lose at most MAX_LOSS_DB with it, or far above the floor,
add at most FLOOR_SHARE of the squared error the floor allows (shapes-unet's convolutions kept for
speed on ONNX Runtime: 61.6 -> 55.3 dB against a 40 dB floor, 2% of its error). A group that fails
is taken in part, its most sensitive layers left as they were: digits-unet's convolutions kept for
speed lose 15 dB all together (35.3 against 50.7) and 2.5 dB without the most sensitive quarter of
their bytes. The held-out check sees a
few trajectories only: on textures-pixart, whose timestep path is one shared adaLN linear that
every block reads (7% of its weights), it measured +0.7 dB on two held-out trajectories while the
bench's 20 images lost 2.9 dB; a small saving is not worth that risk."""
from __future__ import annotations

import math
import warnings
from collections import Counter
from typing import Any, Callable

from ...calibration import split_items, trajectory_error
from ...ir import DiffusionGraph
from ...ir.precision import weight_bytes
from .._search import unjudgeable
from ..base import PassContext, PassResult
from .annotate import annotate
from .formats import runs_int8_weight_only, uniform_bytes
from .layers import REASONS, TIMESTEP_PATH, Layer
from .sensitivity import measure
from .speed import SpeedCheck

WEIGHT_ONLY = "int8_weight"
MAX_LOSS_DB, MIN_SAVING, FLOOR_SHARE = 1.0, 0.1, 0.1
# shares of a refused group's saving tried (largest first, by bisection) with its most sensitive layers kept
PARTIAL_SHARES = (0.75, 0.5, 0.25)


def weight_only_int8(dg: DiffusionGraph, ctx: PassContext, layers: list[Layer], kept_for_speed: set[str],
                     floor: float | None, cfg: Any) -> tuple[dict[str, str], dict[str, Any]]:
    """Annotates, group by group (the timestep path, then the layers in `kept_for_speed`), their
    layers int8 weight-only in `dg` where the target runs that (`cfg.weight_only_int8`, the quant
    config), the group saves at least MIN_SAVING of the weight bytes of `layers`, and the held-out
    final images keep `floor` and lose at most MAX_LOSS_DB (or add at most FLOOR_SHARE of the floor's
    squared error) with it (unchecked where they cannot be re-sampled or there is no floor, as the
    placement is). A group that misses that keeps its most sensitive layers (Hessian sensitivity to
    int8 weights, per byte saved) at full precision: the largest of PARTIAL_SHARES of its saving that
    passes the same check is taken. Returns those layers' format and the check's record."""
    # a weight several layers read stays as it is: the ONNX exporter merges such layers when their
    # inputs match too (DiT computes block 0's conditioning embedding twice), leaving one node to lower
    readers = Counter(layer.weight for layer in layers)
    alone = [layer for layer in layers if readers[layer.weight] == 1]
    groups = {"timestep_path": [layer for layer in alone if layer.protected == REASONS[TIMESTEP_PATH]],
              "kept_for_speed": [layer for layer in alone if layer.protected is not None
                                 and layer.node in kept_for_speed]}
    groups = {name: members for name, members in groups.items() if members}
    if not cfg.weight_only_int8 or not groups:
        return {}, {"layers": [], "why": "weight_only_int8=False" if groups else
                    "no layer on the timestep path or kept at full precision for speed"}
    if not runs_int8_weight_only(ctx.target):
        return {}, {"layers": [], "why": f"target {ctx.target} does not run int8 weight-only layers"}
    judged = floor is not None and not unjudgeable(ctx)
    items = (split_items(ctx.calibration)[1] or None) if judged else None

    def held_out_psnr(graph: DiffusionGraph) -> float:
        return round(trajectory_error(ctx.calibration, ctx.denoiser_for(graph), items, ctx.reference)["psnr"], 3)

    check: dict[str, Any] = {"min_psnr": floor, "max_loss_db": MAX_LOSS_DB, "floor_share": FLOOR_SHARE,
                             "min_saving": MIN_SAVING, "groups": {}}
    total = uniform_bytes(layers, "fp32")
    savings = {name: sum(weight_bytes(layer.shape, None) - weight_bytes(layer.shape, WEIGHT_ONLY) for layer in members)
               / max(total, 1) for name, members in groups.items()}
    for name in [name for name, saving in savings.items() if saving < MIN_SAVING]:
        check["groups"][name] = {"layers": [layer.node for layer in groups.pop(name)],
                                 "saving": round(savings[name], 4), "kept": False,
                                 "why": f"saves {savings[name]:.1%} of the weight bytes, under {MIN_SAVING:.0%}: not "
                                        "worth a risk to the images"}
    before = held_out_psnr(dg) if judged and groups else None
    chosen: list[Layer] = []

    def with_int8_weights(members: list[Layer]) -> DiffusionGraph:
        candidate = dg.clone()
        annotate(candidate, {layer.node: WEIGHT_ONLY for layer in members}, {},
                 {layer.node: f"activations at full precision ({layer.protected}); weights int8 per channel "
                              "(weight_only_int8)" for layer in members})
        return candidate

    for name, members in groups.items():
        candidate = with_int8_weights(members)
        entry: dict[str, Any] = {"layers": [layer.node for layer in members], "saving": round(savings[name], 4)}
        if judged:
            assert floor is not None and before is not None
            entry["held_out_psnr"] = after = held_out_psnr(candidate)
            entry["held_out_psnr_without"] = before
            if not _acceptable(before, after, floor):
                partial = _least_sensitive_part(dg, members, ctx, cfg,
                                                lambda part: held_out_psnr(with_int8_weights(part)), before, floor,
                                                total)
                entry["partial"] = partial["tried"]
                if partial["layers"] is None:
                    check["groups"][name] = {**entry, "kept": False,
                                             "why": f"the held-out final images miss min_psnr={floor} dB or lose more "
                                                    f"than {MAX_LOSS_DB} dB with them, closer to the floor than "
                                                    f"{FLOOR_SHARE:.0%} of its error, and so do its least sensitive "
                                                    f"{PARTIAL_SHARES[-1]:.0%} (of the bytes it would save)"}
                    continue
                members = partial["layers"]
                candidate = with_int8_weights(members)
                entry.update(layers=[layer.node for layer in members], saving=partial["saving"],
                             held_out_psnr=partial["held_out_psnr"])
            before = entry["held_out_psnr"]
        check["groups"][name] = {**entry, "kept": True}
        dg.annotations = candidate.annotations
        chosen += members
    return {layer.node: WEIGHT_ONLY for layer in chosen}, {**check, "layers": [layer.node for layer in chosen]}


def _least_sensitive_part(dg: DiffusionGraph, members: list[Layer], ctx: PassContext, cfg: Any,
                          psnr_with: Callable[[list[Layer]], float], before: float, floor: float,
                          total: float) -> dict[str, Any]:
    """The largest share (PARTIAL_SHARES, bisected: the loss grows with the share) of the group's
    byte saving, its least sensitive layers per byte first, whose int8 weights the held-out images
    accept (_acceptable) and that still saves MIN_SAVING of `total`; "layers" None when none does."""
    sensitivity = measure(dg, members, (WEIGHT_ONLY,), {}, ctx.calibration, cfg.samples,
                          cfg.probes, cfg.accumulate, cfg.trajectories, cfg.seed).hessian
    saved = {layer.node: weight_bytes(layer.shape, None) - weight_bytes(layer.shape, WEIGHT_ONLY) for layer in members}
    ranked = sorted(members, key=lambda layer: sensitivity[layer.node][WEIGHT_ONLY] / max(saved[layer.node], 1))
    group_saving = sum(saved.values())
    tried: list[dict[str, Any]] = []

    def part(share: float) -> list[Layer]:
        cumulative, taken = 0.0, []
        for layer in ranked:
            if cumulative + saved[layer.node] > share * group_saving:
                break
            cumulative += saved[layer.node]
            taken.append(layer)
        return taken

    def passes(index: int) -> bool:
        taken = part(PARTIAL_SHARES[index])
        saving = sum(saved[layer.node] for layer in taken) / max(total, 1)
        entry: dict[str, Any] = {"share": PARTIAL_SHARES[index], "layers": len(taken), "saving": round(saving, 4)}
        worth_it = bool(taken) and saving >= MIN_SAVING
        if worth_it:
            entry["held_out_psnr"] = psnr_with(taken)
        passed = worth_it and _acceptable(before, entry["held_out_psnr"], floor)
        tried.append({**entry, "passes": passed})
        return passed

    low, high = 0, len(PARTIAL_SHARES)
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if passes(middle) else (middle + 1, high)
    if low == len(PARTIAL_SHARES):
        return {"layers": None, "tried": tried}
    found = next(entry for entry in tried if entry["share"] == PARTIAL_SHARES[low])
    return {"layers": part(PARTIAL_SHARES[low]), "tried": tried, "saving": found["saving"],
            "held_out_psnr": found["held_out_psnr"]}


def _acceptable(before: float, after: float, floor: float) -> bool:
    """The final PSNR `after` keeps the floor and loses little against `before`: at most MAX_LOSS_DB,
    or an added squared error within FLOOR_SHARE of the floor's. A placement that left the images
    as they were (infinite PSNR) has no loss to compare with: the floor decides."""
    if after < floor:
        return False
    if not math.isfinite(before):
        return True
    added = 10 ** (-after / 10) - 10 ** (-before / 10)
    return before - after <= MAX_LOSS_DB or added <= FLOOR_SHARE * 10 ** (-floor / 10)


def nothing_pays(dg: DiffusionGraph, untouched: DiffusionGraph, ctx: PassContext, speed: SpeedCheck,
                 layers: list[Layer], floor: float | None, cfg: Any) -> PassResult:
    """The quant pass where no layer runs faster in a low-bit format on the target (`speed`): nothing
    is placed, but the layers kept for speed may still store int8 weights (weight_only_int8) where the
    final images keep `floor`; otherwise the pass declines and the model stays as it was."""
    message = (f"quant: no layer of {untouched.signature.model_class} runs faster quantized on target "
               f"{ctx.target} here (each shape's time in every allowed format, over the unquantized layer's: "
               f"{speed.times}); no activation is quantized")
    weight_only, check = weight_only_int8(dg, ctx, layers, set(speed.slower), floor, cfg)
    advice = ". Pass only_where_faster=False to quantize for size anyway"
    if not weight_only:
        message += f" and the model runs at full precision{advice}"
        warnings.warn(message, stacklevel=3)
        return PassResult(untouched, modified=False, report={"declined": message, "speed_check": speed.report(),
                                                             "weight_only_int8": check})
    message += f"; {len(weight_only)} layers store int8 weights (weight_only_int8: no time lost){advice}"
    warnings.warn(message, stacklevel=3)
    before = uniform_bytes(layers, "fp32")
    after = sum(weight_bytes(layer.shape, weight_only.get(layer.node)) for layer in layers)
    return PassResult(dg, modified=True, report={
        "target": ctx.target, "placement": message, "layers_quantized": {},
        "layers_protected": sum(1 for layer in layers if layer.protected),
        "weight_only_layers": {WEIGHT_ONLY: len(weight_only)}, "weight_only_int8": check,
        "weight_bytes_before": before, "weight_bytes_after": after, "size_ratio": round(after / max(before, 1), 4),
        "speed_check": speed.report()})
