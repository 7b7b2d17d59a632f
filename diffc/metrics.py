"""Fidelity of images against a reference: PSNR and SSIM on arrays in [0, 1], shape (N, H, W, C)."""
from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter


def psnr(images: np.ndarray, reference: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB over the whole batch; inf for identical images."""
    mse = float(np.mean((np.asarray(images, np.float64) - np.asarray(reference, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * float(np.log10(1.0 / mse))


def psnr_per_image(images: np.ndarray, reference: np.ndarray) -> list[float]:
    """PSNR of each image (or video) along the first axis: one sample that flips to other content
    reads 15-20 dB where the batch's figure, dominated by it, hides that the rest stayed close."""
    return [psnr(image, ref) for image, ref in zip(np.asarray(images), np.asarray(reference))]


def ssim(images: np.ndarray, reference: np.ndarray, sigma: float = 1.5) -> float:
    """Mean structural similarity (Wang et al. 2004, Gaussian window) over images and channels."""
    a = np.asarray(images, np.float64)
    b = np.asarray(reference, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"ssim needs images of the same shape, got {a.shape} and {b.shape}")
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    scores = []
    for image, ref in zip(a.reshape(-1, *a.shape[-3:]), b.reshape(-1, *b.shape[-3:])):
        for channel in range(image.shape[-1]):
            x, y = image[..., channel], ref[..., channel]

            def blur(z: np.ndarray) -> np.ndarray:
                return gaussian_filter(z, sigma, mode="reflect")

            mx, my = blur(x), blur(y)
            vx, vy, cov = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
            value = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
            scores.append(float(value.mean()))
    return float(np.mean(scores))
