"""Side-by-side benchmark of diffc pass pipelines and peer methods on one pipeline: denoiser time
per image as a ratio to the unoptimized model timed in the same rounds, optimize() time, peak
memory, artifact size, fidelity of the final images against the unoptimized model's for the same
seeds, and (for the embedded digit models) sample quality.

A row is one pipeline spec: `baseline`, diffc passes joined by `+` with an optional target
precision after a colon (`cache`, `quant:int4`, `cache+quant`, `all`), or a peer (`fbc`,
`taylorseer`, `magcache`, `fastercache`, `pab`, `seacache`, `deepcache`, `torchao-int8`,
`torchao-int8-compile`). Rows are appended to the results JSON as they finish, so an interrupted
run resumes where it stopped."""
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
from ..errors import DiffcError
from ..evaluate import DenoiserTimer, weight_bytes
from ..metrics import psnr, ssim
from .peers import PEERS, Peer
from .report import device_label, load_results, write_outputs, write_results

DIFFC_PASSES = ("cache", "quant", "prune", "moe")
# "all" runs every pass that composes; quantization last, because it needs a full-precision graph
# to annotate. moe is left out: its routing per step range is a step plan of its own, which the cache
# schedule cannot nest (bench it as moe or moe+quant)
ALL_PASSES = ("prune", "cache", "quant")
DEFAULT_QUANT_PRECISION = "int8"


@dataclass
class Row:
    pipeline: str
    kind: str  # "diffc", "peer" or "baseline"
    status: str  # "ok" or "failed"
    reason: str = ""
    speedup: float | None = None
    ms_per_image: float | None = None
    baseline_ms_per_image: float | None = None
    optimize_seconds: float | None = None
    peak_memory_mb: float | None = None
    artifact_mb: float | None = None
    weights_mb: float | None = None
    psnr: float | None = None
    ssim: float | None = None
    accuracy: float | None = None
    fid: float | None = None
    denoiser_calls: int | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DiffcPipeline:
    passes: tuple[str, ...]
    target: str


def parse_pipeline(spec: str) -> DiffcPipeline | Peer | None:
    """`baseline` -> None; diffc pass pipelines -> DiffcPipeline; peer names -> Peer."""
    text = spec.strip().lower()
    if text == "baseline":
        return None
    if text in PEERS:
        return PEERS[text]
    name, _, precision = text.partition(":")
    parts = tuple(p for p in name.split("+") if p)
    if parts == ("all",):
        parts = ALL_PASSES
    unknown = [p for p in parts if p not in DIFFC_PASSES]
    if not parts or unknown:
        raise DiffcError(f"unknown pipeline {spec!r}: use baseline, 'all', diffc passes joined by '+' "
                         f"({', '.join(DIFFC_PASSES)}, e.g. cache+quant, quant:int4) or a peer "
                         f"({', '.join(PEERS)})")
    if precision and "quant" not in parts:
        raise DiffcError(f"pipeline {spec!r} names a precision but no quant pass; write e.g. quant:{precision}")
    target = f"torch-{precision or DEFAULT_QUANT_PRECISION}" if "quant" in parts else "torch"
    from ..backends import parse_target

    parse_target(target)
    return DiffcPipeline(parts, target)


def split_pipelines(text: str) -> list[str]:
    """`baseline,cache,peers` -> the listed specs, `peers` standing for every peer; baseline first."""
    specs: list[str] = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        for spec in (list(PEERS) if item == "peers" else [item]):
            parse_pipeline(spec)
            if spec not in specs:
                specs.append(spec)
    return ["baseline", *[s for s in specs if s != "baseline"]]


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
    labels: tuple[int, ...] = tuple(range(10))
    repeats: int = 3
    device: str = "cpu"
    progress: bool = True


class Bench:
    """Runs rows against one pipeline; the unoptimized denoiser is timed in the same rounds as
    each row (alternating, after a warm-up) so machine load affects both alike."""

    def __init__(self, pipe: Any, attribute: str, settings: BenchSettings, scorer: Any = None) -> None:
        self.pipe, self.attribute, self.settings, self.scorer = pipe, attribute, settings, scorer
        self.original = getattr(pipe, attribute)
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)
        self.num_images = len(settings.seeds) * len(settings.labels)
        self.reference, _ = self._generate(self.original, contextlib.nullcontext)

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
                            class_labels=list(self.settings.labels), num_inference_steps=self.settings.steps,
                            generator=generator, output_type="np").images, dtype=np.float64))
        finally:
            timer.close()
            setattr(self.pipe, self.attribute, self.original)
        return np.concatenate(images), timer.seconds

    def _time(self, module: torch.nn.Module, per_image_set: Callable[[], Any]) -> tuple[float, float, np.ndarray, int]:
        """Median denoiser ms per image of the baseline and of `module` over alternating rounds
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
        return statistics.median(baseline_ms), statistics.median(ms), images, calls

    def run(self, spec: str) -> Row:
        choice = parse_pipeline(spec)
        kind = "baseline" if choice is None else "peer" if isinstance(choice, Peer) else "diffc"
        row = Row(spec, kind, "ok")
        try:
            self._measure(choice, row)
        except Exception as exc:  # a failing pipeline is a result to report, not a reason to stop the run
            row.status, row.reason = "failed", f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        return row

    def _measure(self, choice: DiffcPipeline | Peer | None, row: Row) -> None:
        device = torch.device(self.settings.device)
        memory = PeakMemory(device)
        per_image_set: Callable[[], Any] = contextlib.nullcontext
        with memory:
            started = time.perf_counter()
            if choice is None:
                module = self.original
            elif isinstance(choice, Peer):
                row.details["peer"] = choice.description
                module, per_image_set = choice.build(self.pipe, self.attribute, self.settings.steps)
            else:
                from ..api import optimize

                row.details.update(passes=list(choice.passes), target=choice.target)
                module = optimize(self.pipe, target=choice.target, passes=list(choice.passes),
                                  device=self.settings.device)
                row.details["reports"] = [{"pass": e["pass"], "summary": _summary(e.get("report"))}
                                          for e in getattr(module, "report", [])]
            row.optimize_seconds = time.perf_counter() - started
            baseline_ms, ms, images, calls = self._time(module, per_image_set)
        row.peak_memory_mb = memory.peak_bytes / 2**20
        row.details["memory_method"] = memory.method
        row.baseline_ms_per_image, row.ms_per_image = baseline_ms, ms
        row.speedup = 1.0 if choice is None else baseline_ms / ms
        row.denoiser_calls = calls
        try:
            row.weights_mb = weight_bytes(module) / 2**20
        except RuntimeError as exc:  # tensor subclasses (torchao) hide their storage; the artifact size still counts
            row.details["weights_mb"] = f"not measurable: {exc}"
        row.artifact_mb = self._artifact_mb(module, row)
        row.psnr, row.ssim = psnr(images, self.reference), ssim(images, self.reference)
        if self.scorer is not None:
            labels = [label for _ in self.settings.seeds for label in self.settings.labels]
            row.accuracy = self.scorer.accuracy(images, labels)
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


def _summary(report: Any) -> str:
    text = json.dumps(report, default=str)
    return text if len(text) <= 400 else text[:400] + "..."


def run_bench(pipe: Any, attribute: str, model_name: str, pipelines: list[str], out: Path, settings: BenchSettings,
              scorer: Any = None, date: str | None = None) -> dict[str, Any]:
    """Benchmarks `pipelines` (baseline first) and writes `<model>.json/.md/.png` under `out`.
    Rows already in `out/<model>.json` from a run with the same settings are kept, not rerun."""
    out.mkdir(parents=True, exist_ok=True)
    meta = {"model": model_name, "device": device_label(settings.device), "date": date or time.strftime("%Y-%m-%d"),
            "steps": settings.steps, "seeds": list(settings.seeds), "labels": list(settings.labels),
            "images": len(settings.seeds) * len(settings.labels), "repeats": settings.repeats,
            "memory_method": PeakMemory(torch.device(settings.device)).method,
            "torch": torch.__version__}
    previous = load_results(out / f"{model_name}.json")
    same = {k: previous.get("meta", {}).get(k) for k in ("steps", "seeds", "labels", "repeats")} == \
        {k: meta[k] for k in ("steps", "seeds", "labels", "repeats")}
    results = {"meta": meta, "rows": dict(previous.get("rows", {})) if same else {}}
    todo = [p for p in pipelines if p not in results["rows"]]
    bench = Bench(pipe, attribute, settings, scorer) if todo else None
    for spec in progress(todo, settings.progress, f"bench {model_name}", "pipeline"):
        assert bench is not None
        results["rows"][spec] = asdict(bench.run(spec))
        write_results(out / f"{model_name}.json", results)
    results["rows"] = {p: results["rows"][p] for p in [*pipelines, *results["rows"]] if p in results["rows"]}
    write_outputs(results, out)
    return results
