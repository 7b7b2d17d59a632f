"""Which of diffusers' denoiser classes diffc covers, checked on each class at a tiny config
(models.catalog): capture, identity of the captured graph, the default cache pass end to end in
a hand-written sampling loop, and ONNX Runtime export.

Each check records "ok" or the error that stopped it (its type, whether it came wrapped in a diffc
error that names the fix, and the message). Run one class with `check_class`; the whole table with
benchmarks/denoiser_coverage.py, which runs each class in its own process with a time limit."""
from __future__ import annotations

import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch.utils import _pytree as pytree

from ..api import optimize
from ..calibration import record
from ..calibration.collect import output_tensor
from ..calibration.replay import LATENT_PEAK, final_error
from ..errors import DiffcError
from ..ir import capture
from ..models import catalog

CHECKS = ("capture", "identity", "cache", "ort")
IDENTITY_TOLERANCE = 1e-5
ORT_TOLERANCE = 1e-4
LOOP_STEPS = 10
CALIBRATION_SEEDS = (0, 1, 2, 3)
HELD_OUT_SEEDS = (100, 101)
LOOP_BATCH = 2


@dataclass
class CoverageRow:
    class_name: str
    family: str = ""
    checks: dict[str, str] = field(default_factory=dict)  # check -> "ok", "failed" or "skipped"
    errors: dict[str, str] = field(default_factory=dict)  # check -> what stopped it
    figures: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def passed(self, check: str) -> bool:
        return self.checks.get(check) == "ok"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class CheckFailed(Exception):
    """A check's own verdict: the numbers miss its tolerance, or the model itself fails in the loop."""


def describe_error(exc: BaseException) -> str:
    """One line: `diffc CaptureError: ...` for an error diffc raised on purpose, `check failed: ...`
    for a check's verdict, `raw ValueError at file:line: ...` for one that escaped from inside
    diffusers, torch or onnxruntime."""
    message = " ".join(str(exc).split())[:400]
    if isinstance(exc, DiffcError):
        return f"diffc {type(exc).__name__}: {message}"
    if isinstance(exc, CheckFailed):
        return f"check failed: {message}"
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {frames[-1].filename.rsplit('site-packages/', 1)[-1]}:{frames[-1].lineno}" if frames else ""
    return f"raw {type(exc).__name__}{where}: {message}"


def max_difference(output: Any, reference: Any) -> float:
    """Largest absolute difference over the outputs' tensors, relative to the reference's largest
    magnitude when that exceeds 1."""
    outputs, references = _tensors(output), _tensors(reference)
    if [tuple(t.shape) for t in outputs] != [tuple(t.shape) for t in references]:
        raise CheckFailed(f"output shapes {[tuple(t.shape) for t in outputs]} differ from the model's "
                          f"{[tuple(t.shape) for t in references]}")
    scale = max([1.0] + [float(t.abs().max()) for t in references if t.numel()])
    return max(float((o.float() - r.float()).abs().max()) for o, r in zip(outputs, references)) / scale


def _tensors(output: Any) -> list[torch.Tensor]:
    sample = getattr(output, "sample", None)
    return [t for t in pytree.tree_leaves(sample if sample is not None else output) if isinstance(t, torch.Tensor)]


def euler_loop(model: Callable[..., Any], entry: catalog.TinyDenoiser, seed: int, steps: int = LOOP_STEPS,
               batch: int = LOOP_BATCH) -> torch.Tensor:
    """A flow-Euler loop a user might write around any denoiser: noise, then `steps` updates of the
    latent by the model's output, the other inputs held at the entry's values."""
    inputs = entry.inputs(batch)
    latent = inputs[entry.latent]
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(latent.shape, generator=generator, dtype=latent.dtype)
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    for step in range(steps):
        sigma = float(sigmas[step])
        # the example's timestep shape: one value per row, per frame, or one shared value
        value = sigma if entry.timestep_kind == catalog.FLOW else sigma * 999
        timestep = torch.full_like(inputs[entry.timestep], value)
        with torch.no_grad():
            out = _update(model(**{**inputs, entry.latent: x, entry.timestep: timestep}), entry, x)
        x = x + (float(sigmas[step + 1]) - sigma) * out
    return x


def _update(output: Any, entry: catalog.TinyDenoiser, latent: torch.Tensor) -> torch.Tensor:
    """The part of a model's output that updates the latent."""
    sample = getattr(output, "sample", output)
    if isinstance(sample, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in sample) and \
            len(sample) == latent.shape[0] and sample[0].dim() == latent.dim() - 1:
        out = torch.stack(list(sample))  # one tensor per row, as ZImage and Wan-Animate 2 return them
    else:
        out = output_tensor(output)
    if entry.output_channels is not None:
        out = out.narrow(entry.channel_dim, 0, entry.output_channels)
    if entry.output_last_tokens:
        out = out[:, out.shape[1] - latent.shape[1]:]
    return out.reshape(latent.shape)


def check_class(class_name: str, checks: tuple[str, ...] = CHECKS) -> CoverageRow:
    """Runs `checks` on `class_name` at its catalog config; a failed check skips those that need it."""
    row = CoverageRow(class_name)
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            _run_checks(row, class_name, checks)
        finally:
            row.seconds = round(time.perf_counter() - started, 1)
    row.warnings = list(dict.fromkeys(" ".join(str(w.message).split())[:300] for w in caught
                                      if issubclass(w.category, UserWarning)))
    return row


def _run_checks(row: CoverageRow, class_name: str, checks: tuple[str, ...]) -> None:
    try:
        entry = catalog.get(class_name)
        row.family = entry.family
        model = entry.build()
    except Exception as exc:  # noqa: BLE001  (the row records why the class could not be built)
        row.checks = {check: "skipped" for check in checks}
        row.errors["build"] = describe_error(exc)
        return
    example = entry.inputs(LOOP_BATCH)
    needs_capture = {"identity": "capture", "ort": "capture"}
    for check in checks:
        requirement = needs_capture.get(check)
        if requirement and requirement in row.checks and not row.passed(requirement):
            row.checks[check] = "skipped"
            continue
        try:
            row.figures.update(_CHECKS[check](model, entry, example))
            row.checks[check] = "ok"
        except Exception as exc:  # noqa: BLE001  (the row records what stopped the check)
            row.checks[check] = "failed"
            row.errors[check] = describe_error(exc)


def _capture(model: torch.nn.Module, entry: catalog.TinyDenoiser, example: dict[str, Any]) -> dict[str, Any]:
    graph = capture(model, example_inputs=example)
    symbolic = sorted({dim for spec in graph.signature.inputs for dim in spec.shape if isinstance(dim, str)})
    return {"nodes": sum(1 for _ in graph.graph.nodes), "blocks": len(graph.blocks),
            "transformer_blocks": sum(b.kind == "transformer_block" for b in graph.blocks), "dynamic": symbolic}


def _identity(model: torch.nn.Module, entry: catalog.TinyDenoiser, example: dict[str, Any]) -> dict[str, Any]:
    fast = optimize(model, passes=[], example_inputs=example)
    with torch.no_grad():
        reference = model(**example)
        difference = max_difference(fast(**example), reference)
    if difference > IDENTITY_TOLERANCE:
        raise CheckFailed(f"captured graph differs from the model by {difference:.2e} > {IDENTITY_TOLERANCE}")
    return {"identity_max_diff": difference}


def _ort(model: torch.nn.Module, entry: catalog.TinyDenoiser, example: dict[str, Any]) -> dict[str, Any]:
    fast = optimize(model, target="ort", passes=[], example_inputs=example)
    with torch.no_grad():
        difference = max_difference(fast(**example), model(**example))
    if difference > ORT_TOLERANCE:
        raise CheckFailed(f"ONNX Runtime differs from the model by {difference:.2e} > {ORT_TOLERANCE}")
    return {"ort_max_diff": difference}


def _cache(model: torch.nn.Module, entry: catalog.TinyDenoiser, example: dict[str, Any]) -> dict[str, Any]:
    """The default pass pipeline, calibrated on the loop's own recorded calls, judged on held-out seeds."""
    try:
        with record(model) as recording:
            for seed in CALIBRATION_SEEDS:
                recording.final(euler_loop(model, entry, seed))
    except DiffcError:
        raise
    except Exception as exc:  # noqa: BLE001  (the class's own forward fails in the loop: not diffc's doing)
        raise CheckFailed(f"the model raises {type(exc).__name__}: {exc} in the hand-written loop") from exc
    fast = optimize(model, calibration=recording)
    report = fast.report[-1]["report"] if fast.report else {}
    finals = {str(seed): (euler_loop(fast, entry, seed), euler_loop(model, entry, seed)) for seed in HELD_OUT_SEEDS}
    if not all(torch.isfinite(out).all() for out, _ in finals.values()):
        raise CheckFailed("the cached loop's final latents are not finite")
    held_out = final_error(finals, LATENT_PEAK)["psnr"]
    figures: dict[str, Any] = {"cache_held_out_psnr": round(held_out, 2)}
    if "declined" in report:
        figures["cache_declined"] = report["declined"][:200]
    else:
        figures.update({"cache_full_steps": report.get("full_steps"), "cache_num_steps": report.get("num_steps"),
                        "cache_predicted_speedup": report.get("predicted_speedup"), "cache_cut": report.get("cut")})
    return figures


_CHECKS: dict[str, Callable[[torch.nn.Module, catalog.TinyDenoiser, dict[str, Any]], dict[str, Any]]] = {
    "capture": _capture, "identity": _identity, "cache": _cache, "ort": _ort,
}
