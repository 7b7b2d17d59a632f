"""Final-image fidelity of an optimized default model by the protocol of issue 4's thresholds:
labels 0, 3, 5, 7, 20 sampling steps, seed 1234, PSNR against the unoptimized pipeline's images."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

import diffc
import diffc.models as dm
from diffc.calibration import collect
from diffc.metrics import psnr


def optimized_psnr(model_name: str, passes: list[dict[str, Any]], calibration_seeds: list[int] | None = None
                   ) -> tuple[float, dict[str, Any]]:
    """(PSNR of the optimized model's images, the last pass's report); with `calibration_seeds`,
    the calibration set is collected on those seeds instead of the default one."""
    pipe = dm.load(model_name)
    attribute = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
    original = getattr(pipe, attribute)

    def sample() -> np.ndarray:
        with torch.no_grad():
            return np.asarray(pipe(class_labels=[0, 3, 5, 7], num_inference_steps=20,
                                   generator=torch.Generator().manual_seed(1234), output_type="np").images)

    reference = sample()
    calibration = None if calibration_seeds is None else \
        collect(pipe, num_steps=20, seeds=calibration_seeds, progress=False)
    fast = diffc.optimize(pipe, passes=passes, calibration=calibration)
    setattr(pipe, attribute, fast)
    try:
        images = sample()
    finally:
        setattr(pipe, attribute, original)
    return psnr(images, reference), fast.report[-1]["report"]
