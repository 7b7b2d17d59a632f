"""The quant pass on a backend that runs low-bit kernels: a linear that no allowed format makes faster
at its own shape (timed by the backend) stays at full precision, with the timings in the report; a
convolution stays at full precision where the backend has no low-bit convolution kernel; when no layer
pays, nothing is quantized and the pass says so."""
import warnings

import pytest
import torch

from diffc.api import compile_graph
from diffc.ir import lint
import diffc.passes.quant.weight_only as weight_only
from diffc.ir.precision import precision_specs
from diffc.passes import PassContext, PassManager
from diffc.passes.quant.layers import PROTECTIONS, quantizable_layers
from diffc.passes.quant.speed import layer_shapes
from digits_tiny import tiny_digits_pipeline

QUICK = {"samples": 4, "probes": 2, "trajectories": 1}


def _placed(quantized):
    """The layers the placement quantized (the timestep path's int8 weight-only layers are not placed)."""
    return {node for node, spec in precision_specs(quantized.annotations).items() if spec.format != "int8_weight"}


def _timer(slow_shapes, asked, dynamic=0.5):
    """int8 pays (0.5x) except at `slow_shapes` (1.3x); int8_dynamic takes `dynamic`."""
    def times(formats, shape):
        asked.append((formats, shape))
        return {"int8": 1.3 if shape in slow_shapes else 0.5, "int8_dynamic": dynamic}
    return times


def _quantize(dg, calibration, timer, live=False, low_bit_convolutions=True, **options):
    denoiser_for = (lambda candidate: compile_graph(candidate, "torch", "fp32")) if live else None
    ctx = PassContext(calibration=calibration, target="ort-int8", layer_format_times=timer, denoiser_for=denoiser_for,
                      low_bit_convolutions=low_bit_convolutions)
    return PassManager([{"pass": "quant", **QUICK, **options}]).run(dg, ctx)


def _placeable_shapes(dg):
    layers = [layer for layer in quantizable_layers(dg, PROTECTIONS) if layer.protected is None]
    return layer_shapes(dg, layers)


def test_linears_no_format_makes_faster_stay_at_full_precision_with_their_times(trained_dit, monkeypatch):
    dg, calibration = trained_dit
    monkeypatch.setattr(weight_only, "MIN_SAVING", 0.0)  # one layer shape is kept: a small share of the weights
    shapes = _placeable_shapes(dg)
    assert None not in shapes.values() and len(set(shapes.values())) > 1
    slow = {max(shapes.values(), key=lambda shape: shape[1] * shape[2])}
    asked = []
    quantized = _quantize(dg, calibration, _timer(slow, asked), min_psnr=None)
    lint(quantized)
    report = quantized.applied[-1]["report"]
    kept = {node for node, shape in shapes.items() if shape in slow}
    assert kept and set(report["speed_check"]["kept_slower"]) == kept
    assert sorted(shape for _, shape in asked) == sorted(set(shapes.values()))  # each shape timed once
    assert all(formats == ("int8",) for formats, _ in asked)  # no floor: nothing moves to dynamic scales
    entries = {e["node"]: e for e in report["layers"]}
    assert all(entries[n]["format"] is None and "no faster quantized here: int8 1.30x" in entries[n]["protected"]
               for n in kept)
    # their activations stay at full precision; their weights are stored int8 (computed from once-dequantized values)
    assert all(entries[n]["weight_format"] == "int8_weight" for n in kept)
    assert set(report["weight_only_int8"]["layers"]) >= kept
    assert _placed(quantized) == set(shapes) - kept
    key = "x".join(map(str, next(iter(slow))))
    assert report["speed_check"]["relative_times"][key] == {"int8": 1.3, "int8_dynamic": 0.5}


@pytest.mark.parametrize("weight_only_int8", [True, False])
def test_when_no_linear_pays_no_activation_is_quantized_and_the_pass_says_so(trained_dit, weight_only_int8):
    """Only the weights may still be stored int8 (they cost no time); without that, nothing changes."""
    dg, calibration = trained_dit
    before = {k: v.clone() for k, v in dg.weights().items()}
    with pytest.warns(UserWarning, match=r"no layer of .* runs faster quantized on target ort-int8.*"
                                         r"only_where_faster=False"):
        result = _quantize(dg, calibration, _timer(set(_placeable_shapes(dg).values()), []), min_psnr=None,
                           weight_only_int8=weight_only_int8)
    report = result.applied[-1]["report"]
    assert report["speed_check"]["kept_slower"]
    assert all(torch.equal(before[k], v) for k, v in result.weights().items())
    specs = precision_specs(result.annotations)
    if not weight_only_int8:
        assert not specs and not result.applied[-1]["modified"] and "full precision" in report["declined"]
        return
    lint(result)
    assert set(specs) >= set(_placeable_shapes(dg)) and {spec.format for spec in specs.values()} == {"int8_weight"}
    assert report["layers_quantized"] == {} and report["weight_only_layers"] == {"int8_weight": len(specs)}
    assert report["size_ratio"] < 0.5 and set(report["weight_only_int8"]["layers"]) == set(specs)


def test_only_where_faster_false_quantizes_every_layer_and_times_nothing(trained_dit):
    dg, calibration = trained_dit
    asked = []
    quantized = _quantize(dg, calibration, _timer(set(_placeable_shapes(dg).values()), asked), min_psnr=None,
                          only_where_faster=False)
    assert not asked and _placed(quantized) == set(_placeable_shapes(dg))
    assert quantized.applied[-1]["report"]["speed_check"] == {"checked": False, "why": "only_where_faster=False"}


def test_without_a_timer_the_placement_is_unchanged_and_the_report_says_why(trained_dit):
    dg, calibration = trained_dit
    quantized = _quantize(dg, calibration, None, min_psnr=None)
    check = quantized.applied[-1]["report"]["speed_check"]
    assert not check["checked"] and "simulates its low-bit formats" in check["why"]
    assert _placed(quantized) == set(_placeable_shapes(dg))


def test_the_floor_gives_dynamic_scales_only_to_layers_they_do_not_slow_down(trained_dit):
    """Every layer pays in static int8 and none with dynamic scales: a floor int8 misses keeps layers
    at full precision and never tries dynamic scales."""
    dg, calibration = trained_dit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = _quantize(dg, calibration, _timer(set(), [], dynamic=1.4), live=True, min_psnr=90.0,
                              timestep_scales=False)
    report = quantized.applied[-1]["report"]
    assert set(report["speed_check"]["no_dynamic_scales"]) == set(_placeable_shapes(dg))
    check = report["final_image_check"]
    assert "dynamic_search" not in check and not check.get("dynamic_scales")
    assert all(spec.format != "int8_dynamic" for spec in precision_specs(quantized.annotations).values())


@pytest.fixture(scope="module")
def tiny_unet(tmp_path_factory):
    from diffc.calibration import collect
    from diffc.ir import capture

    pipe = tiny_digits_pipeline()
    calibration = collect(pipe, conditions=[1, 6], num_steps=4, out=tmp_path_factory.mktemp("unet"), progress=False)
    return capture(pipe.unet), calibration


@pytest.mark.parametrize("kernels", [False, True], ids=["no-conv-kernel", "conv-kernel"])
def test_convolutions_stay_at_full_precision_where_the_backend_has_no_low_bit_kernel_for_them(tiny_unet, kernels):
    dg, calibration = tiny_unet
    layers = [layer for layer in quantizable_layers(dg, PROTECTIONS) if layer.protected is None]
    convolutions = {layer.node for layer in layers if len(layer.shape) > 2}
    linears = {layer.node for layer in layers} - convolutions
    assert convolutions and linears
    quantized = _quantize(dg, calibration, _timer(set(), []), low_bit_convolutions=kernels, min_psnr=None)
    lint(quantized)
    placed = _placed(quantized)
    kept = set(quantized.applied[-1]["report"]["speed_check"]["kept_slower"])
    if kernels:
        assert convolutions <= placed and not kept & convolutions
    else:
        assert kept == convolutions and not placed & convolutions and linears <= placed
        entries = {e["node"]: e for e in quantized.applied[-1]["report"]["layers"]}
        assert all("no low-bit convolution kernel" in entries[n]["protected"] for n in convolutions)
