"""Before/after measurement of an optimized denoiser inside its pipeline: denoiser time per step
(as a ratio to the original, measured in the same run), size, and fidelity of the final images
against the original's for the same seeds."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from .metrics import psnr, ssim


class DenoiserTimer:
    """Times every forward call of a denoiser through module hooks (no wrapper, so the pipeline
    still sees the module itself)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.seconds: list[float] = []
        self._start = 0.0
        self._handles = [module.register_forward_pre_hook(self._pre), module.register_forward_hook(self._post)]

    def _sync(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def _pre(self, *_: Any) -> None:
        self._sync()
        self._start = time.perf_counter()

    def _post(self, *_: Any) -> None:
        self._sync()
        self.seconds.append(time.perf_counter() - self._start)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of the distinct parameter and buffer tensors a module holds."""
    seen, total = set(), 0
    for tensor in [*module.parameters(), *module.buffers()]:
        key = tensor.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def parameter_count(module: torch.nn.Module) -> int:
    seen, total = set(), 0
    for tensor in module.parameters():
        key = tensor.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += tensor.numel()
    return total


@dataclass
class Comparison:
    ms_per_step: tuple[float, float]
    parameters: tuple[int, int]
    bytes: tuple[int, int]
    psnr: float
    ssim: float
    scores: tuple[dict[str, float], dict[str, float]]
    images: tuple[np.ndarray, np.ndarray] = field(repr=False)

    @property
    def speedup(self) -> float:
        return self.ms_per_step[0] / self.ms_per_step[1]


def compare(pipe: Any, attribute: str, optimized: torch.nn.Module, generate: Callable[[Any], np.ndarray],
            rounds: int = 3, score: Callable[[np.ndarray], dict[str, float]] | None = None) -> Comparison:
    """Runs `generate(pipe)` with the original and the optimized denoiser in alternating rounds
    (the first is a warm-up) and compares them. `generate` must seed itself so both see the same
    noise. The pipeline is left with its original denoiser."""
    original = getattr(pipe, attribute)
    times: dict[str, list[float]] = {"original": [], "optimized": []}
    images: dict[str, np.ndarray] = {}
    try:
        for round_index in range(rounds + 1):
            for label, module in (("original", original), ("optimized", optimized)):
                setattr(pipe, attribute, module)
                timer = DenoiserTimer(module)
                try:
                    with torch.no_grad():
                        images[label] = np.asarray(generate(pipe), dtype=np.float64)
                finally:
                    timer.close()
                if round_index > 0:
                    # the mean over all calls: cached and full steps differ, a median would pick one kind
                    times[label].append(statistics.fmean(timer.seconds) * 1000)
    finally:
        setattr(pipe, attribute, original)
    ref, out = images["original"], images["optimized"]
    return Comparison(
        ms_per_step=(min(times["original"]), min(times["optimized"])),
        parameters=(parameter_count(original), parameter_count(optimized)),
        bytes=(weight_bytes(original), weight_bytes(optimized)),
        psnr=psnr(out, ref), ssim=ssim(out, ref),
        scores=(score(ref), score(out)) if score else ({}, {}),
        images=(ref, out),
    )


def format_table(result: Comparison) -> str:
    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if b else "-"

    rows = [
        ("denoiser ms/step", f"{result.ms_per_step[0]:.2f}", f"{result.ms_per_step[1]:.2f}",
         f"{result.speedup:.2f}x faster"),
        ("parameters", f"{result.parameters[0]:,}", f"{result.parameters[1]:,}",
         ratio(result.parameters[1], result.parameters[0])),
        ("weights (MB)", f"{result.bytes[0] / 2**20:.2f}", f"{result.bytes[1] / 2**20:.2f}",
         ratio(result.bytes[1], result.bytes[0])),
        ("PSNR vs original (dB)", "-", "inf" if result.psnr == float("inf") else f"{result.psnr:.2f}", ""),
        ("SSIM vs original", "-", f"{result.ssim:.4f}", ""),
    ]
    for key in result.scores[0]:
        rows.append((f"sample {key}", f"{result.scores[0][key]:.3f}", f"{result.scores[1][key]:.3f}", ""))
    header = ("", "original", "optimized", "ratio")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in [header, *rows]]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def side_by_side(reference: np.ndarray, images: np.ndarray, path: str, scale: int = 4) -> None:
    """Writes a PNG: the original's images on the top row, the optimized model's below."""
    from PIL import Image

    top = np.concatenate(list(reference), axis=1)
    bottom = np.concatenate(list(images), axis=1)
    grid = np.concatenate([top, np.ones_like(top[:2]), bottom], axis=0)
    grid = (np.clip(grid, 0, 1) * 255).round().astype(np.uint8)
    if grid.shape[-1] == 1:
        grid = grid[..., 0]
    image = Image.fromarray(grid)
    image.resize((image.width * scale, image.height * scale), Image.NEAREST).save(path)
