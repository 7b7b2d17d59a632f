"""The quant pass's final-image floor: the most sensitive static int8 layers take dynamic activation
scales (on backends that run them), then the most sensitive layers go back to full precision, until
the re-sampled final images keep min_psnr on held-out trajectories; when nothing keeps it, the pass
changes nothing, warns, and a low-bit target compiles at fp32."""
import math
import warnings

import pytest
import torch

from diffc.api import compile_graph
from diffc.calibration import FRESH_DRAWS, collect, draw_error, split_items, trajectory_error
from diffc.ir import lint
from diffc.passes import PassContext, PassManager
from diffc.ir.precision import PER_TOKEN, ActivationQuant, precision_specs
from diffc.passes.quant.floor import DYNAMIC_REASON, KEPT_REASON, with_dynamic_scales, without_precision
from digits_tiny import captured_and_calibrated, tiny_digits_pipeline

QUICK = {"samples": 4, "probes": 2, "trajectories": 1}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return captured_and_calibrated(tmp_path_factory.mktemp("cal"))


def _context(calibration, target, live=True):
    denoiser_for = (lambda candidate: compile_graph(candidate, "torch", "fp32")) if live else None
    return PassContext(calibration=calibration, target=target, denoiser_for=denoiser_for)


def _quantize(dg, calibration, target, live=True, **options):
    return PassManager([{"pass": "quant", **QUICK, **options}]).run(dg, _context(calibration, target, live))


def _final_psnr(dg, calibration, items):
    return trajectory_error(calibration, compile_graph(dg, "torch", "fp32"), items)["psnr"]


def _verified_psnr(dg, calibration):
    """The final PSNR the floor verifies a choice on: the held-out trajectories and the fresh draws
    (new seeds for the calibration conditions) together, measured here on their own."""
    _, held_out = split_items(calibration)
    denoiser = compile_graph(dg, "torch", "fp32")
    held, drawn = trajectory_error(calibration, denoiser, held_out), draw_error(calibration, denoiser)
    assert drawn["trajectories"] == FRESH_DRAWS
    count = held["trajectories"] + drawn["trajectories"]
    return 10 * math.log10(count / (held["mse"] * held["trajectories"] + drawn["mse"] * drawn["trajectories"]))


def _floor_between(calibration, placement, better, why):
    """A floor halfway between the worst final PSNR (selection or held-out trajectories) of the
    placement and of a better graph, which must beat it by more than 1 dB."""
    selection, held_out = split_items(calibration)
    worse, best = (min(_final_psnr(g, calibration, items) for items in (selection, held_out))
                   for g in (placement, better))
    assert best > worse + 1.0, why
    return (worse + best) / 2


@pytest.fixture(scope="module")
def unchecked_int8(tiny):
    """int8 on this untrained model keeps ~15 dB; the most sensitive half at full precision ~30 dB"""
    dg, calibration = tiny
    return _quantize(dg, calibration, "torch-int8", min_psnr=None)


def test_a_floor_between_the_placement_and_full_precision_keeps_the_most_sensitive_layers(tiny, unchecked_int8):
    dg, calibration = tiny
    _, held_out = split_items(calibration)
    report = unchecked_int8.applied[-1]["report"]
    ranked = sorted((e for e in report["layers"] if e["format"]), key=lambda e: e["sensitivity"]["int8"],
                    reverse=True)
    half = without_precision(unchecked_int8, [e["node"] for e in ranked[:len(ranked) // 2]])
    floor = _floor_between(calibration, unchecked_int8, half,
                           "keeping the most sensitive half at full precision should help")

    # TensorRT takes static int8 scales only, so layers go straight back to full precision
    quantized = _quantize(dg, calibration, "trt-int8", min_psnr=floor)
    lint(quantized)
    check = quantized.applied[-1]["report"]["final_image_check"]
    kept = check["kept_full_precision"]
    assert check["judged_on"] == "pipeline" and 0 < check["kept_share"] <= 0.5 and "dynamic_scales" not in check
    # ranked by its own sensitivities: its scales come from the selection trajectories alone
    own = sorted((e for e in quantized.applied[-1]["report"]["layers"] if "sensitivity" in e),
                 key=lambda e: e["sensitivity"]["int8"], reverse=True)
    assert kept == [e["node"] for e in own[:len(kept)]]  # the most sensitive first
    assert not any("precision" in quantized.annotations.get(node, {}) for node in kept)
    entries = {e["node"]: e for e in quantized.applied[-1]["report"]["layers"]}
    assert all(entries[node]["format"] is None and entries[node]["protected"] == KEPT_REASON for node in kept)
    assert check["search"][-1]["fresh_draws"] == FRESH_DRAWS
    assert _verified_psnr(quantized, calibration) >= floor
    assert check["search"][-1]["held_out_psnr"] >= floor


def _dynamic_layers(report):
    """{node: per token} for every static int8 linear of the placement (convolutions keep static scales)."""
    return {e["node"]: PER_TOKEN for e in report["layers"] if e["format"] == "int8" and len(e["shape"]) == 2}


def test_static_int8_linears_take_dynamic_scales_before_any_goes_back_to_full_precision(trained_dit):
    """With one static scale per layer (per-timestep-group scales off: with them, static int8 beats
    all-dynamic on this model), dynamic scales should help this model"""
    dg, calibration = trained_dit
    _, held_out = split_items(calibration)
    unchecked_int8 = _quantize(dg, calibration, "torch-int8", min_psnr=None, timestep_scales=False)
    report = unchecked_int8.applied[-1]["report"]
    layers = _dynamic_layers(report)
    dynamic = {node: ActivationQuant("int8", dynamic=granularity) for node, granularity in layers.items()}
    all_dynamic = with_dynamic_scales(unchecked_int8, list(layers), dynamic)
    floor = _floor_between(calibration, unchecked_int8, all_dynamic, "dynamic activation scales should help this model")

    quantized = _quantize(dg, calibration, "torch-int8", min_psnr=floor, timestep_scales=False)
    lint(quantized)
    check = quantized.applied[-1]["report"]["final_image_check"]
    moved = check["dynamic_scales"]
    ranked = sorted((e for e in quantized.applied[-1]["report"]["layers"] if e["node"] in layers),
                    key=lambda e: e["sensitivity"]["int8"], reverse=True)
    assert 0 < check["dynamic_share"] <= 1.0 and check["kept_full_precision"] == []
    assert moved == [e["node"] for e in ranked[:len(moved)]]  # the most sensitive first
    specs = precision_specs(quantized.annotations)
    assert all(specs[n].format == "int8_dynamic" and specs[n].activation.dynamic == layers[n]
               and specs[n].reason == DYNAMIC_REASON for n in moved)
    assert all(specs[n].format == "int8" and specs[n].activation.scale > 0 for n in set(layers) - set(moved))
    entries = quantized.applied[-1]["report"]
    assert entries["layers_quantized"]["int8_dynamic"] == len(moved)
    # the placed layers keep int8 weights either way (the weight-only group has its own check, which this
    # floor may refuse)
    assert entries["placeable_size_ratio"] == report["placeable_size_ratio"]
    assert check["search"][-1]["fresh_draws"] == FRESH_DRAWS
    assert _verified_psnr(quantized, calibration) >= floor


def test_sensitivity_is_measured_on_the_guided_combination_where_the_loop_batches_guidance(tiny, unchecked_int8,
                                                                                         tmp_path):
    assert unchecked_int8.applied[-1]["report"]["guided_sensitivity"]
    dg, _ = tiny
    # two of four steps recorded: no loop is identified, so rows are their own loss
    sparse = collect(tiny_digits_pipeline(), conditions=[1, 6], num_steps=4, timesteps="uniform:2", out=tmp_path,
                     progress=False)
    assert not _quantize(dg, sparse, "torch-int8", live=False, min_psnr=None).applied[-1]["report"][
        "guided_sensitivity"]


def test_a_placement_that_meets_the_floor_is_measured_once_and_kept_whole(tiny, unchecked_int8):
    dg, calibration = tiny
    quantized = _quantize(dg, calibration, "torch-int8", min_psnr=10.0)
    check = quantized.applied[-1]["report"]["final_image_check"]
    assert check["kept_full_precision"] == [] and check["dynamic_share"] == 0.0 and check["dynamic_scales"] == []
    assert [set(entry) - {"guidance_lost", "population_psnr"} for entry in check["search"]] == [
        {"dynamic_share", "psnr", "passes"}, {"dynamic_share", "held_out_psnr", "fresh_draws", "passes"}]
    # selection and held-out trajectories and the fresh draws: enough to see a spread
    assert "population_psnr" in check["search"][-1] and check["search"][-1]["fresh_draws"] == FRESH_DRAWS
    def layers(graph):  # by the layer's own node (the fitted trajectories may pick other timestep-scaled layers)
        return {name.removesuffix("_timestep_scaled") for name in graph.annotations}

    assert layers(quantized) == layers(unchecked_int8)


def test_a_floor_nothing_keeps_changes_nothing_and_the_target_compiles_at_fp32(tiny):
    dg, calibration = tiny
    with pytest.warns(UserWarning, match="nothing is quantized"):
        declined = _quantize(dg, calibration, "torch-int8", min_psnr=500.0)
    entry = declined.applied[-1]
    assert not entry["modified"] and "min_psnr" in entry["report"]["declined"]
    assert not declined.annotations
    lint(declined)
    with pytest.warns(UserWarning, match="declined.*torch-fp32 instead"):
        fast = compile_graph(declined, "torch", "int8")
    assert fast.target == "torch-fp32"
    example = {"sample": torch.randn(2, 1, 8, 8), "timestep": torch.tensor([10, 10]),
               "encoder_hidden_states": torch.randn(2, 1, 16)}
    with torch.no_grad():
        assert torch.equal(fast(**example)[0], compile_graph(dg, "torch", "fp32")(**example)[0])


def test_without_a_way_to_re_sample_the_placement_stands_and_says_it_is_unchecked(tiny):
    dg, calibration = tiny
    # the automatic floor: 40 dB for 8-bit formats, 30 dB with 4-bit ones
    with pytest.warns(UserWarning, match="not checked against min_psnr=40.0 dB \\(no denoiser"):
        quantized = _quantize(dg, calibration, "torch-int8", live=False)
    with pytest.warns(UserWarning, match="not checked against min_psnr=30.0 dB \\(no denoiser"):
        _quantize(dg, calibration, "torch-int4", live=False)
    check = quantized.applied[-1]["report"]["final_image_check"]
    assert check["judged_on"] is None and check["kept_full_precision"] == []
    assert quantized.annotations


def test_the_check_can_be_turned_off_without_a_warning(tiny):
    dg, calibration = tiny
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantized = _quantize(dg, calibration, "torch-int8", live=False, min_psnr=None)
    assert quantized.applied[-1]["report"]["final_image_check"] == {"min_psnr": None, "kept_full_precision": []}


def test_after_a_lossy_pass_the_floor_is_held_against_that_passs_images(tiny):
    """cache then quant: quant's floor bounds the error it adds to the cached graph's images (else a
    cache at 38 dB would leave a 40 dB quant floor nothing to keep); the report says so."""
    from diffc.calibration import ResampledReference

    dg, calibration = tiny
    ctx = _context(calibration, "torch-int8")
    cached = PassManager([{"pass": "cache", "min_psnr": None}]).run(dg, ctx)
    assert cached.applied[-1]["modified"]
    reference = ResampledReference(lambda: compile_graph(cached, "torch", "fp32"), ["cache"])
    _, held_out = split_items(calibration)
    own = compile_graph(cached, "torch", "fp32")
    assert trajectory_error(calibration, own, held_out, reference)["psnr"] == float("inf") and reference.used
    assert trajectory_error(calibration, own, held_out)["psnr"] < 100  # against the original's images
    composed = PassManager([{"pass": "cache", "min_psnr": None}, {"pass": "quant", **QUICK, "min_psnr": 5.0}]).run(
        dg, _context(calibration, "torch-int8"))
    assert "judged_against" not in composed.applied[0]
    assert composed.applied[1]["judged_against"] == "final images of the graph after cache"
