"""Quantization on the embedded default models: final-image fidelity of W8A8 and W4A8 mixed,
Hessian placement against uniform precision and the MSE proxy at the same size, and
timestep-aware activation ranges against ranges calibrated at one step (Q-Diffusion)."""
import numpy as np
import pytest
import torch

import diffc
import diffc.models as dm
from diffc.calibration import collect
from diffc.ir import capture, find_denoiser
from diffc.ir.precision import weight_bytes
from diffc.metrics import psnr
from diffc.passes.quant.layers import PROTECTIONS, quantizable_layers

STEPS, LABELS = 20, [0, 3, 5, 7]
MODELS = ("digits-unet", "digits-dit")


def _images(pipe):
    with torch.no_grad():
        return np.asarray(pipe(class_labels=LABELS, num_inference_steps=STEPS,
                               generator=torch.Generator().manual_seed(1234), output_type="np").images, np.float64)


@pytest.fixture(scope="module", params=MODELS)
def model(request, tmp_path_factory):
    pipe = dm.load(request.param)
    pipe.set_progress_bar_config(disable=True)
    denoiser, attribute = find_denoiser(pipe)
    calibration = collect(pipe, num_steps=STEPS, out=tmp_path_factory.mktemp("cal"), progress=False)
    layers = [layer for layer in quantizable_layers(capture(denoiser), PROTECTIONS) if layer.protected is None]
    original = sum(weight_bytes(layer.shape, None) for layer in layers)
    ratios = {f: sum(weight_bytes(layer.shape, f) for layer in layers) / original for f in ("int8", "w4a8")}
    return pipe, attribute, calibration, _images(pipe), ratios


def _final(model, target, passes, calibration=None):
    pipe, attribute, default_calibration, reference, _ = model
    fast = diffc.optimize(pipe, target=target, passes=passes,
                          calibration=calibration if calibration is not None else default_calibration)
    original = getattr(pipe, attribute)
    setattr(pipe, attribute, fast)
    try:
        images = _images(pipe)
    finally:
        setattr(pipe, attribute, original)
    return images, reference, fast.report[-1]["report"]


@pytest.mark.slow
def test_w8a8_keeps_30db(model):
    images, reference, report = _final(model, "torch-int8", ["quant"])
    assert report["size_ratio"] < 0.7
    assert psnr(images, reference) >= 30.0


@pytest.mark.slow
def test_w4a8_mixed_keeps_25db(model):
    budget = 1.2 * model[4]["w4a8"]  # mostly 4-bit weights, a fifth of the extra room for int8 layers
    # the floor at the bar this test holds it to: at the automatic 30 dB no placement of these two formats within
    # the budget keeps digits-dit's held-out images, and the pass declines
    images, reference, report = _final(model, "torch-mixed", [{"pass": "quant", "formats": ["w4a8", "int8"],
                                                               "size_ratio": budget, "min_psnr": 25.0}])
    assert report["layers_quantized"]["w4a8"] > report["layers_quantized"]["int8"]
    assert psnr(images, reference) >= 25.0


@pytest.mark.slow
def test_hessian_placement_beats_uniform_and_the_mse_proxy_at_equal_size(model):
    budget = model[4]["int8"]  # the size of uniform W8A8
    errors = {}
    for label, target, options in (("uniform", "torch-int8", {}),
                                   ("hessian", "torch-mixed", {"size_ratio": budget}),
                                   ("mse", "torch-mixed", {"size_ratio": budget, "sensitivity": "mse"})):
        # the placements alone: the final-image floor moves uniform int8's layers to dynamic scales or full
        # precision past its size, and would confound what is compared
        images, reference, report = _final(model, target, [{"pass": "quant", "min_psnr": None, **options}])
        errors[label] = float(np.mean((images - reference) ** 2))
    assert errors["hessian"] < errors["uniform"]
    assert errors["hessian"] < errors["mse"]


# the ranges alone: the final-image floor would move layers to dynamic scales or full precision
STATIC_ONLY = [{"pass": "quant", "min_psnr": None}]


@pytest.mark.slow
def test_timestep_aware_ranges_beat_single_step_ranges(model, tmp_path):
    pipe = model[0]
    images, reference, _ = _final(model, "torch-int8", STATIC_ONLY)
    whole = float(np.mean((images - reference) ** 2))
    for step in (0, STEPS - 1):
        single = collect(pipe, num_steps=STEPS, timesteps=f"steps:{step}", out=tmp_path / f"step{step}", progress=False)
        images, reference, _ = _final(model, "torch-int8", STATIC_ONLY, calibration=single)
        assert whole < float(np.mean((images - reference) ** 2))


@pytest.mark.slow
def test_cache_then_quant_keeps_25db(model):
    """The default cache schedule, then W8A8, on both default models (on digits-unet this failed to
    lower: the deep cut is a quantized conv's output, read by the next segment)."""
    images, reference, report = _final(model, "torch-int8", ["cache", "quant"])
    assert report["size_ratio"] < 0.7
    assert psnr(images, reference) >= 25.0


@pytest.mark.slow
def test_split_shortcut_and_attention_options_keep_30db(model):
    """W8A8 with split shortcuts, and with attention quantized, both keep the W8A8 bar; split
    shortcuts apply to the UNet's decoder concatenations only (the DiT has none)."""
    for options in ({"split_shortcut": True}, {"attention": True}):
        images, reference, report = _final(model, "torch-int8", [{"pass": "quant", **options}])
        assert psnr(images, reference) >= 30.0
        if options.get("attention"):
            assert report["attention"] and all(e["format"] == "int8" for e in report["attention"])
        else:
            assert bool(report["split_shortcut"]) == (model[1] == "unet")
