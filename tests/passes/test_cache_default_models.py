"""Caching on the embedded default models: final-image fidelity and schedule quality."""
import numpy as np
import pytest
import torch

import diffc
import diffc.models as dm
from diffc.calibration import collect
from diffc.metrics import psnr

STEPS, LABELS = 20, [0, 3, 5, 7]
# Final-image error varies several-fold between seeds (one of these seeds alone can rank two schedules
# either way), so schedules are compared on the mean over eight held-out seeds.
SEEDS = (1234, 7, 11, 23, 42, 99, 5, 3)


def _images(pipe):
    with torch.no_grad():
        return np.stack([np.asarray(pipe(class_labels=LABELS, num_inference_steps=STEPS,
                                         generator=torch.Generator().manual_seed(seed), output_type="np").images,
                                    np.float64) for seed in SEEDS])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["digits-unet", "digits-dit"])
def test_dp_beats_uniform_and_interval_three_and_bac_keep_fidelity(name, tmp_path):
    """Per-block schedules (BAC) over the blocks the uniform schedule caches, at no more compute
    than interval 3, keep 25 dB as well; whether they beat uniform is not asserted (on digits-dit they
    do not: 27.9 dB against 29.1 dB when measured, see the cache pass's report)."""
    pipe = dm.load(name)
    pipe.set_progress_bar_config(disable=True)
    attribute = "unet" if name == "digits-unet" else "transformer"
    original = getattr(pipe, attribute)
    reference = _images(pipe)
    cal = collect(pipe, num_steps=STEPS, out=tmp_path / "cal", progress=False)
    errors, skipped = {}, {}
    same_blocks = "deep" if attribute == "unet" else "first_block"  # what cut="auto" caches with a uniform schedule
    for label, config in (("uniform", {"schedule": "uniform", "interval": 3}),
                          ("dp", {"schedule": "dp", "full_steps": 7, "forecast": False}),
                          ("bac", {"schedule": "bac", "full_steps": 7, "cut": same_blocks})):
        fast = diffc.optimize(pipe, passes=[{"pass": "cache", **config}], calibration=cal)
        report = fast.report[-1]["report"]
        skipped[label] = report["flops_skipped"]
        if label != "bac":
            assert report["full_steps"] == 7  # interval 3 over 20 steps: 0, 3, ..., 18
        setattr(pipe, attribute, fast)
        try:
            images = _images(pipe)
        finally:
            setattr(pipe, attribute, original)
        errors[label] = float(np.mean((images - reference) ** 2))
        if label in ("uniform", "bac"):
            assert psnr(images, reference) >= 25.0
    assert errors["dp"] < errors["uniform"]
    assert skipped["bac"] >= skipped["uniform"] - 0.01  # BAC's blocks cost no more than 7 full steps of them
