"""Side-by-side benchmark of diffc pass pipelines and peer methods on one pipeline: denoiser time
per image as a ratio to the unoptimized model timed in the same rounds, optimize() time, peak
memory, artifact size, fidelity of the final images against the unoptimized model's for the same
seeds, and sample quality where the model has a scorer (the digits models, the zoo).

A row is one pipeline spec (`specs`: baseline, diffc passes with options, a peer at a setting);
`peers` and `cache-sweep` expand to sweeps, so each method gives a frontier and the results say
at what speed-up diffc and the best peer reach 30, 35 and 40 dB (`frontier`). Rows are appended
to the results JSON as they finish, so an interrupted run resumes where it stopped."""
from __future__ import annotations

import contextlib
import json
import os
import statistics
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .._progress import progress
from ..errors import PeerNotApplicable
from ..evaluate import DenoiserTimer, weight_bytes
from ..metrics import psnr, psnr_per_image, ssim
from .frontier import comparison
from .peers import PEERS, Peer
from .specs import ALL_PASSES, DiffcPipeline, PeerChoice, parse_pipeline, split_pipelines
from .report import device_label, load_results, write_outputs, write_results

NO_OP = "no-op"  # status of a row whose images are bit-identical to the baseline's
NOT_APPLICABLE = "n/a"  # status of a peer whose own design does not cover the model (errors.PeerNotApplicable)


@dataclass
class Row:
    pipeline: str
    kind: str  # "diffc", "peer" or "baseline"
    status: str  # "ok", "failed", NO_OP or NOT_APPLICABLE
    reason: str = ""
    speedup: float | None = None
    speedup_spread: tuple[float, float] | None = None  # lowest and highest per-round ratio
    ms_per_image: float | None = None
    baseline_ms_per_image: float | None = None
    optimize_seconds: float | None = None
    peak_memory_mb: float | None = None
    artifact_mb: float | None = None
    weights_mb: float | None = None
    psnr: float | None = None
    worst_psnr: float | None = None  # the lowest of the images' own PSNRs (details["psnr_per_image"])
    ssim: float | None = None
    accuracy: float | None = None
    fid: float | None = None
    denoiser_calls: int | None = None
    details: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------- measurement

class PeakMemory:
    """Peak memory while the block runs: CUDA max allocated on GPU; on CPU the peak resident set
    size above the value at entry, sampled every 2 ms from /proc (torch's CPU allocator is not
    visible to tracemalloc, and getrusage's peak cannot be reset)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.method = "cuda max_memory_allocated" if self.cuda else "sampled RSS above start"
        self.peak_bytes = 0
        self._stop = threading.Event()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
        else:
            self._start = self._rss()
            self._peak = self._start
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self._peak = max(self._peak, self._rss())

    def __exit__(self, *exc: Any) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated() - self._start
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self._peak, self._rss()) - self._start


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


@dataclass
class BenchSettings:
    steps: int = 20
    seeds: tuple[int, ...] = (0, 1)
    # what each seed generates: class labels, or prompts for a text pipeline (then labels are unused)
    labels: tuple[int, ...] = tuple(range(10))
    prompts: tuple[str, ...] = ()
    # what diffc calibrates on when it optimizes a text pipeline (never the evaluated prompts)
    calibration_prompts: tuple[str, ...] = ()
    repeats: int = 3
    device: str = "cpu"
    progress: bool = True

    @property
    def conditions(self) -> list[Any]:
        return list(self.prompts) if self.prompts else list(self.labels)

    def call_arguments(self) -> dict[str, Any]:
        return {"prompt": list(self.prompts)} if self.prompts else {"class_labels": list(self.labels)}


class Bench:
    """Runs rows against one pipeline; the unoptimized denoiser is timed in the same rounds as
    each row (alternating, after a warm-up) so machine load affects both alike."""

    def __init__(self, pipe: Any, attribute: str, settings: BenchSettings, scorer: Any = None) -> None:
        self.pipe, self.attribute, self.settings, self.scorer = pipe, attribute, settings, scorer
        self.original = getattr(pipe, attribute)
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)
        self.num_images = len(settings.seeds) * len(settings.conditions)
        self.reference, _ = self._generate(self.original, contextlib.nullcontext)
        self.calibration: Any = None
        self.calibration_seconds: float | None = None

    def shared_calibration(self) -> Any:
        """One calibration set for every diffc row (collected at the bench's step count on the
        calibration prompts), so a sweep of settings does not re-collect it per row; its time is
        reported once, in the results' meta."""
        if self.calibration is None:
            from ..calibration import collect

            started = time.perf_counter()
            conditions = list(self.settings.calibration_prompts) or None
            self.calibration = collect(self.pipe, conditions=conditions, num_steps=self.settings.steps,
                                       progress=False)
            self.calibration_seconds = time.perf_counter() - started
        return self.calibration

    def _generate(self, module: torch.nn.Module, per_image_set: Callable[[], Any]) -> tuple[np.ndarray, list[float]]:
        setattr(self.pipe, self.attribute, module)
        timer = DenoiserTimer(module)
        images = []
        try:
            with torch.no_grad():
                for seed in self.settings.seeds:
                    with per_image_set():
                        generator = torch.Generator().manual_seed(seed)
                        images.append(np.asarray(self.pipe(
                            **self.settings.call_arguments(), num_inference_steps=self.settings.steps,
                            generator=generator, output_type="np").images, dtype=np.float64))
        finally:
            timer.close()
            setattr(self.pipe, self.attribute, self.original)
        return np.concatenate(images), timer.seconds

    def _time(self, module: torch.nn.Module, per_image_set: Callable[[], Any]) \
            -> tuple[list[float], list[float], np.ndarray, int]:
        """Denoiser ms per image of the baseline and of `module` per round, over alternating rounds
        after one warm-up round."""
        baseline_ms, ms = [], []
        images, calls = self.reference, 0
        for round_index in range(self.settings.repeats + 1):
            _, base_seconds = self._generate(self.original, contextlib.nullcontext)
            images, seconds = self._generate(module, per_image_set)
            calls = len(seconds)
            if round_index > 0:
                baseline_ms.append(sum(base_seconds) * 1000 / self.num_images)
                ms.append(sum(seconds) * 1000 / self.num_images)
        return baseline_ms, ms, images, calls

    def run(self, spec: str) -> Row:
        choice = parse_pipeline(spec)
        kind = "baseline" if choice is None else "peer" if isinstance(choice, PeerChoice) else "diffc"
        row = Row(spec, kind, "ok")
        if choice is not None:
            row.details["family"] = choice.family
        try:
            self._measure(choice, row)
        except PeerNotApplicable as exc:
            row.status, row.reason = NOT_APPLICABLE, str(exc).splitlines()[0][:300]
        except Exception as exc:  # a failing pipeline is a result to report, not a reason to stop the run
            row.status, row.reason = "failed", f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        return row

    def _build(self, choice: DiffcPipeline | PeerChoice | None, row: Row) -> tuple[torch.nn.Module, Callable[[], Any]]:
        if choice is None:
            return self.original, contextlib.nullcontext
        if isinstance(choice, PeerChoice):
            row.details["peer"] = choice.peer.describe(choice.setting)
            return choice.peer.build(self.pipe, self.attribute, self.settings.steps, choice.setting)
        from ..api import optimize

        row.details.update(passes=choice.pass_specs(), target=choice.target, compiled=choice.compiled,
                           calibration="shared by the diffc rows; its time is in the meta")
        # compile=None is the backend's own choice (compiled on CUDA, eager on CPU)
        module = optimize(self.pipe, target=choice.target, passes=choice.pass_specs(), device=self.settings.device,
                          calibration=self.shared_calibration(), compile=True if choice.compiled else None)
        row.details["reports"] = [{"pass": e["pass"], "summary": _summary(e.get("report"))}
                                  for e in getattr(module, "report", [])]
        declined = [e["report"]["declined"] for e in getattr(module, "report", [])
                    if isinstance(e.get("report"), dict) and e["report"].get("declined")]
        if declined:
            row.details["declined"] = declined
        placements = [e["report"] for e in getattr(module, "report", [])
                      if e["pass"] == "quant" and isinstance(e.get("report"), dict) and "size_ratio" in e["report"]]
        if placements:
            row.details["quant"] = {key: placements[-1].get(key) for key in QUANT_FIGURES}
        return module, contextlib.nullcontext

    def _measure(self, choice: DiffcPipeline | PeerChoice | None, row: Row) -> None:
        device = torch.device(self.settings.device)
        memory = PeakMemory(device)
        with memory:
            started = time.perf_counter()
            module, per_image_set = self._build(choice, row)
            row.optimize_seconds = time.perf_counter() - started
            baseline_ms, ms, images, calls = self._time(module, per_image_set)
        row.peak_memory_mb = memory.peak_bytes / 2**20
        row.details["memory_method"] = memory.method
        row.baseline_ms_per_image, row.ms_per_image = statistics.median(baseline_ms), statistics.median(ms)
        ratios = [base / own for base, own in zip(baseline_ms, ms)]
        row.speedup = 1.0 if choice is None else row.baseline_ms_per_image / row.ms_per_image
        row.speedup_spread = (1.0, 1.0) if choice is None else (min(ratios), max(ratios))
        row.denoiser_calls = calls
        try:
            row.weights_mb = weight_bytes(module) / 2**20
        except RuntimeError as exc:  # tensor subclasses (torchao) hide their storage; the artifact size still counts
            row.details["weights_mb"] = f"not measurable: {exc}"
        row.artifact_mb = self._artifact_mb(module, row)
        row.psnr, row.ssim = psnr(images, self.reference), ssim(images, self.reference)
        per_image = psnr_per_image(images, self.reference)
        row.worst_psnr = min(per_image)
        row.details["psnr_per_image"] = [round(value, 2) for value in per_image]
        if choice is not None and np.array_equal(images, self.reference):
            why = choice.peer.unchanged(choice.setting) if isinstance(choice, PeerChoice) else \
                " ".join(row.details.get("declined", []))
            row.status, row.reason = NO_OP, ("images bit-identical to the baseline's: "
                                             + (why or "the method changed nothing here"))
        if self.scorer is not None:
            conditions = [condition for _ in self.settings.seeds for condition in self.settings.conditions]
            row.accuracy = self.scorer.accuracy(images, conditions)
            if hasattr(self.scorer, "fid"):
                row.fid = self.scorer.fid(images)

    @staticmethod
    def _artifact_mb(module: torch.nn.Module, row: Row) -> float:
        with tempfile.TemporaryDirectory() as tmp:
            if hasattr(module, "save") and hasattr(module, "plan"):
                module.save(Path(tmp) / "artifact")
                row.details["artifact"] = "diffc artifact folder"
            else:
                torch.save(module.state_dict(), Path(tmp) / "state_dict.pt")
                row.details["artifact"] = "torch.save(state_dict)"
            return directory_bytes(Path(tmp)) / 2**20


# what a quant row's placement did, kept whole beside its truncated report: layers per format, the
# weights' size against fp32 and, where a size budget bounds them, the placeable layers' against its reference
QUANT_FIGURES = ("layers_quantized", "layers_protected", "weight_only_layers", "size_ratio", "placeable_size_ratio")


def _summary(report: Any) -> str:
    text = json.dumps(report, default=str)
    return text if len(text) <= 400 else text[:400] + "..."


SETTINGS_KEYS = ("steps", "seeds", "labels", "prompts", "repeats")


def run_bench(pipe: Any, attribute: str, model_name: str, pipelines: list[str], out: Path, settings: BenchSettings,
              scorer: Any = None, date: str | None = None) -> dict[str, Any]:
    """Benchmarks `pipelines` (baseline first) and writes `<model>.json/.md/.png` under `out`.
    Rows already in `out/<model>.json` from a run with the same settings are kept, not rerun."""
    out.mkdir(parents=True, exist_ok=True)
    meta = {"model": model_name, "device": device_label(settings.device), "date": date or time.strftime("%Y-%m-%d"),
            "steps": settings.steps, "seeds": list(settings.seeds),
            "labels": [] if settings.prompts else list(settings.labels), "prompts": list(settings.prompts),
            "calibration_prompts": list(settings.calibration_prompts),
            "images": len(settings.seeds) * len(settings.conditions), "repeats": settings.repeats,
            "memory_method": PeakMemory(torch.device(settings.device)).method,
            "torch": torch.__version__, "load_average_at_start": list(os.getloadavg())}
    previous = load_results(out / f"{model_name}.json")
    same = {k: previous.get("meta", {}).get(k) for k in SETTINGS_KEYS} == {k: meta[k] for k in SETTINGS_KEYS}
    results = {"meta": meta, "rows": dict(previous.get("rows", {})) if same else {}}
    todo = [p for p in pipelines if p not in results["rows"]]
    bench = Bench(pipe, attribute, settings, scorer) if todo else None
    for spec in progress(todo, settings.progress, f"bench {model_name}", "pipeline"):
        assert bench is not None
        results["rows"][spec] = asdict(bench.run(spec))
        if bench.calibration_seconds is not None:
            meta["calibration_seconds"] = bench.calibration_seconds
        write_results(out / f"{model_name}.json", results)
    results["rows"] = {p: results["rows"][p] for p in [*pipelines, *results["rows"]] if p in results["rows"]}
    meta["load_average_at_end"] = list(os.getloadavg())
    results["frontier"] = comparison(results["rows"])
    write_outputs(results, out)
    return results


__all__ = ["ALL_PASSES", "NOT_APPLICABLE", "NO_OP", "PEERS", "Bench", "BenchSettings", "DiffcPipeline", "Peer",
           "PeerChoice", "Row", "parse_pipeline", "run_bench", "split_pipelines"]
