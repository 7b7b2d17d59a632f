"""One GPU benchmark run, within 10 minutes on one H100-class machine that has only CUDA and PyTorch.

    pip install --no-deps wheels/*.whl        # diffusers (+ its small deps), diffc, and the peers you bring
    python benchmarks/gpu_bench.py --out benchmarks/results

Random-weight models at the published architectures' sizes (speed only, bf16): the SD1.5 UNet,
PixArt-alpha's transformer and FLUX.1-dev's transformer, per denoiser step against eager bf16;
diffc's quantized targets (torch-fp8, torch-int8, torch-int4) on the SD1.5 UNet and FLUX, caching
over a 50-step DDIM loop on the SD1.5 UNet, the torchao int8 + torch.compile peer; then the
embedded digit models (speed and fidelity, through `diffc.bench`). Every case is guarded: a
failure is recorded with its reason and the run goes on; a global time budget stops starting new
cases so the results are always written. `--smoke` runs every case through the same code on CPU at
tiny sizes (see SMOKE) in about a minute.
"""
from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a repo copy without installing diffc


@dataclass(frozen=True)
class Scale:
    """How much the run measures. The smoke scale keeps every case and code path (guards and budget
    included) but shrinks what makes them slow on a CPU."""

    smoke: bool
    quant_targets: tuple[str, ...]
    quant_pass: str | dict[str, Any]
    repeats: int
    cache_steps: int
    compile_backend: str  # torch.compile backend of the torchao peer
    case_cap_s: float
    budget_s: float


FULL = Scale(smoke=False, quant_targets=("fp8", "int8", "int4"), quant_pass="quant", repeats=10, cache_steps=50,
             compile_backend="inductor", case_cap_s=240, budget_s=560)
# inductor compiles for minutes on a CPU: the smoke run traces with dynamo but runs the graph eagerly;
# the quant pass's sensitivity (backward passes per calibration call and probe) is cut to two calls, one probe
SMOKE = Scale(smoke=True, quant_targets=("int8",), quant_pass={"pass": "quant", "samples": 2, "probes": 1},
              repeats=1, cache_steps=4, compile_backend="eager", case_cap_s=60, budget_s=150)


class CaseTimeout(Exception):
    pass


@dataclass
class Architecture:
    name: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[torch.device, torch.dtype], dict[str, Any]]
    quantize: bool


def architectures(smoke: bool) -> list[Architecture]:
    """Published configs (random weights); with `smoke`, tiny configs of the same classes."""
    from diffusers import FluxTransformer2DModel, PixArtTransformer2DModel, UNet2DConditionModel

    def unet() -> torch.nn.Module:
        if smoke:
            # one cross-attention stage: capturing the UNet dominates the smoke run's time
            return UNet2DConditionModel(block_out_channels=(32,), layers_per_block=1, sample_size=8,
                                        down_block_types=("CrossAttnDownBlock2D",),
                                        up_block_types=("CrossAttnUpBlock2D",), cross_attention_dim=32,
                                        attention_head_dim=8, norm_num_groups=16)
        # diffusers' defaults are the SD1.x UNet; SD1.5's text encoder width is 768
        return UNet2DConditionModel(cross_attention_dim=768)

    def unet_inputs(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
        side, width, tokens = (8, 32, 7) if smoke else (64, 768, 77)
        return {"sample": torch.randn(2, 4, side, side, device=device, dtype=dtype),
                "timestep": torch.tensor([500, 500], device=device),
                "encoder_hidden_states": torch.randn(2, tokens, width, device=device, dtype=dtype)}

    def pixart() -> torch.nn.Module:
        if smoke:
            return PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                            num_layers=2, cross_attention_dim=16, sample_size=8, patch_size=2,
                                            caption_channels=24, norm_type="ada_norm_single",
                                            use_additional_conditions=False)
        # PixArt-alpha XL-2 at 512 px: 28 layers, 16 heads of 72, T5-XXL captions (4096)
        return PixArtTransformer2DModel(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                                        num_layers=28, cross_attention_dim=1152, sample_size=64, patch_size=2,
                                        caption_channels=4096, norm_type="ada_norm_single",
                                        use_additional_conditions=False)

    def pixart_inputs(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
        side, caption, tokens = (8, 24, 5) if smoke else (64, 4096, 120)
        return {"hidden_states": torch.randn(2, 4, side, side, device=device, dtype=dtype),
                "timestep": torch.tensor([500, 500], device=device),
                "encoder_hidden_states": torch.randn(2, tokens, caption, device=device, dtype=dtype),
                "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}

    def flux() -> torch.nn.Module:
        if smoke:
            return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                          attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                          pooled_projection_dim=32, axes_dims_rope=(4, 4, 8), guidance_embeds=True)
        # FLUX.1-dev: 19 double + 38 single blocks, 24 heads of 128, T5 4096, CLIP pooled 768
        return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                                      attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                      pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))

    def flux_inputs(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
        # 1024 px -> 64x64 latent patches (4096 tokens) of 64 channels; 512 text tokens
        image_tokens, channels, text_tokens, text, pooled = (16, 16, 8, 32, 32) if smoke else (4096, 64, 512, 4096, 768)
        return {"hidden_states": torch.randn(1, image_tokens, channels, device=device, dtype=dtype),
                "encoder_hidden_states": torch.randn(1, text_tokens, text, device=device, dtype=dtype),
                "pooled_projections": torch.randn(1, pooled, device=device, dtype=dtype),
                "timestep": torch.tensor([0.5], device=device, dtype=dtype),
                "img_ids": torch.zeros(image_tokens, 3, device=device, dtype=dtype),
                "txt_ids": torch.zeros(text_tokens, 3, device=device, dtype=dtype),
                "guidance": torch.tensor([3.5], device=device, dtype=dtype)}

    return [Architecture("sd15-unet", unet, unet_inputs, quantize=True),
            Architecture("pixart", pixart, pixart_inputs, quantize=False),
            Architecture("flux", flux, flux_inputs, quantize=True)]


def first_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return first_tensor(output[0])
    return first_tensor(output.sample if hasattr(output, "sample") else output.to_tuple())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_ms(call: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Median milliseconds of `call` after two warm-up calls."""
    for _ in range(2):
        call()
    times = []
    for _ in range(repeats):
        sync(device)
        started = time.perf_counter()
        call()
        sync(device)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


class Runner:
    """Runs cases under a global deadline; each case gets at most `case_cap_s` and the time left
    (less a reserve for writing results), and is interrupted by an alarm past it."""

    def __init__(self, budget_s: float, reserve_s: float, case_cap_s: float) -> None:
        self.deadline = time.monotonic() + budget_s
        self.reserve_s = reserve_s
        self.case_cap_s = case_cap_s
        self.rows: list[dict[str, Any]] = []

    def left(self) -> float:
        return self.deadline - time.monotonic() - self.reserve_s

    @contextmanager
    def _alarm(self, seconds: float) -> Iterator[None]:
        def expire(*_: Any) -> None:
            raise CaseTimeout(f"stopped after {seconds:.0f} s to keep the whole run within its time budget")

        previous = signal.signal(signal.SIGALRM, expire)
        signal.alarm(max(1, int(seconds)))
        try:
            yield
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)

    def case(self, name: str, measure: Callable[[], dict[str, Any]], cap_s: float | None = None) -> dict[str, Any]:
        """Runs `measure` into a row of results; `cap_s` can only tighten the run's case cap."""
        row: dict[str, Any] = {"case": name, "status": "ok", "reason": ""}
        if self.left() < 5:
            row.update(status="failed", reason="not started: the run's time budget is spent")
        else:
            started = time.monotonic()
            try:
                with self._alarm(min(cap_s or self.case_cap_s, self.case_cap_s, self.left())):
                    row.update(measure())
            except Exception as exc:  # every failure is a result with its reason; the run goes on
                row.update(status="failed", reason=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
                traceback.print_exc()
            row["case_seconds"] = round(time.monotonic() - started, 1)
        self.rows.append(row)
        print(f"{name}: {row['status']} {row.get('speedup', '')} {row['reason']}", flush=True)
        return row


def peak_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None


def run_architectures(runner: Runner, scale: Scale, device: torch.device, dtype: torch.dtype,
                      precision: str) -> None:
    from diffc import optimize
    from diffc.calibration import collect

    repeats = scale.repeats
    for arch in architectures(scale.smoke):
        state: dict[str, Any] = {}

        def build() -> dict[str, Any]:
            torch.manual_seed(0)
            started = time.perf_counter()
            with torch.device(device):
                model = arch.build().to(dtype).eval()
            state["model"], state["inputs"] = model, arch.inputs(device, dtype)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            with torch.no_grad():
                state["eager_ms"] = median_ms(lambda: model(**state["inputs"]), device, repeats)
            return {"ms_per_step": state["eager_ms"], "baseline_ms_per_step": state["eager_ms"], "speedup": 1.0,
                    "build_seconds": time.perf_counter() - started, "peak_memory_mb": peak_mb(device),
                    "parameters": sum(p.numel() for p in model.parameters())}

        if runner.case(f"{arch.name}/{precision}", build)["status"] != "ok":
            continue

        def diffc_target(target: str, passes: list[str | dict[str, Any]], compile: bool | None = None,
                         cuda_graphs: bool = False) -> Callable[[], dict[str, Any]]:
            def measure() -> dict[str, Any]:
                started = time.perf_counter()
                fast = optimize(state["model"], target=target, passes=passes, example_inputs=state["inputs"],
                                device=device, compile=compile, cuda_graphs=cuda_graphs)
                seconds = time.perf_counter() - started
                with torch.no_grad():
                    ms = median_ms(lambda: fast(**state["inputs"]), device, repeats)
                    reference = first_tensor(state["model"](**state["inputs"])).float()
                    error = first_tensor(fast(**state["inputs"])).float() - reference
                return {"ms_per_step": ms, "baseline_ms_per_step": state["eager_ms"], "speedup": state["eager_ms"] / ms,
                        "optimize_seconds": seconds, "relative_error": float(error.norm() / reference.norm())}
            return measure

        # every optimize() captures the model, the slow part on a CPU; a quantized target runs the same
        # code, so the smoke run times the unquantized one only where there is no quantized one
        if not (scale.smoke and arch.quantize):
            # the identity through diffc (segments compiled on CUDA) against torch.compile of the module itself
            runner.case(f"{arch.name}/torch-compile", module_compile_case(state, device, repeats,
                                                                          scale.compile_backend))
            runner.case(f"{arch.name}/diffc-{precision}", diffc_target(f"torch-{precision}", []))
            if arch.name == "sd15-unet" and device.type == "cuda":
                # the smallest model, where kernel launches weigh most: segments replayed as CUDA graphs
                runner.case(f"{arch.name}/diffc-{precision}-cuda-graphs",
                            diffc_target(f"torch-{precision}", [], cuda_graphs=True))
        if arch.quantize:
            for low_bit in scale.quant_targets:
                # eager, as measured before segments were compiled by default: whether the low-bit
                # layers trace under torch.compile is not known until a GPU run shows it
                runner.case(f"{arch.name}/torch-{low_bit}", diffc_target(f"torch-{low_bit}", [scale.quant_pass],
                                                                         compile=False))
            runner.case(f"{arch.name}/torchao-int8-compile", torchao_case(state, device, repeats, scale.compile_backend))
        if arch.name == "sd15-unet":
            runner.case(f"{arch.name}/cache-{scale.cache_steps}",
                        cache_loop_case(state, device, collect, optimize, precision, scale.cache_steps))
        state.clear()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def module_compile_case(state: dict[str, Any], device: torch.device, repeats: int,
                        compile_backend: str) -> Callable[[], dict[str, Any]]:
    def measure() -> dict[str, Any]:
        compiled = torch.compile(state["model"], backend=compile_backend)
        with torch.no_grad():
            ms = median_ms(lambda: compiled(**state["inputs"]), device, repeats)
        return {"ms_per_step": ms, "baseline_ms_per_step": state["eager_ms"], "speedup": state["eager_ms"] / ms,
                "peer": f"torch.compile of the module ({compile_backend})"}
    return measure


def torchao_case(state: dict[str, Any], device: torch.device, repeats: int,
                 compile_backend: str) -> Callable[[], dict[str, Any]]:
    def measure() -> dict[str, Any]:
        import copy

        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        model = copy.deepcopy(state["model"])
        quantize_(model, Int8WeightOnlyConfig())
        compiled = torch.compile(model, backend=compile_backend)
        with torch.no_grad():
            ms = median_ms(lambda: compiled(**state["inputs"]), device, repeats)
        return {"ms_per_step": ms, "baseline_ms_per_step": state["eager_ms"], "speedup": state["eager_ms"] / ms,
                "peer": f"torchao Int8WeightOnly + torch.compile ({compile_backend})"}
    return measure


def cache_loop_case(state: dict[str, Any], device: torch.device, collect: Callable, optimize: Callable,
                    precision: str, steps: int) -> Callable[[], dict[str, Any]]:
    """A DDIM loop of `steps` steps with the eager UNet and with diffc's cache pass (calibrated on the
    same number of steps); full-loop time and the final latents' PSNR against the eager loop."""
    def loop(denoiser: Callable) -> tuple[torch.Tensor, float]:
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler()
        scheduler.set_timesteps(steps)
        inputs = state["inputs"]
        latents = torch.randn(inputs["sample"].shape, generator=torch.Generator().manual_seed(0)).to(inputs["sample"])
        sync(device)
        started = time.perf_counter()
        with torch.no_grad():
            for t in scheduler.timesteps:
                timestep = t.to(device).expand(latents.shape[0])
                noise = first_tensor(denoiser(sample=latents, timestep=timestep,
                                              encoder_hidden_states=inputs["encoder_hidden_states"]))
                latents = scheduler.step(noise, t, latents).prev_sample
        sync(device)
        return latents.float(), time.perf_counter() - started

    def measure() -> dict[str, Any]:
        model = state["model"]
        loop(model)  # warm-up
        reference, eager_s = loop(model)
        started = time.perf_counter()
        calibration = collect(model, num_steps=steps, progress=False)
        fast = optimize(model, target=f"torch-{precision}", passes=["cache"], calibration=calibration,
                        example_inputs=state["inputs"], device=device, compile=False)
        optimize_s = time.perf_counter() - started
        loop(fast)
        latents, cached_s = loop(fast)
        span = float(reference.max() - reference.min())
        mse = float(((latents - reference) ** 2).mean())
        return {"ms_per_step": cached_s * 1000 / steps, "baseline_ms_per_step": eager_s * 1000 / steps,
                "speedup": eager_s / cached_s, "optimize_seconds": optimize_s,
                "psnr_latents": float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(span ** 2 / mse)).item()}
    return measure


def run_default_models(runner: Runner, scale: Scale, device: torch.device, out: Path, date: str) -> None:
    from diffc import models
    from diffc.bench import BenchSettings, run_bench
    from diffc.ir import find_denoiser

    smoke = scale.smoke
    settings = BenchSettings(steps=2 if smoke else 20, seeds=(0,) if smoke else (0, 1),
                             labels=(0, 1) if smoke else tuple(range(10)), repeats=1 if smoke else 3,
                             device=str(device), progress=False)
    pipelines = ["baseline", "pab"] if smoke else ["baseline", "cache", "quant", "cache+quant", "pab", "deepcache",
                                                   "torchao-int8"]
    for name in models.available():
        def measure(name: str = name) -> dict[str, Any]:
            pipe = models.load(name).to(device)
            _, attribute = find_denoiser(pipe)
            results = run_bench(pipe, attribute, name, pipelines, out, settings, models.load_scorer(), date=date)
            best = max((r for r in results["rows"].values() if r["status"] == "ok"), key=lambda r: r["speedup"])
            return {"ms_per_step": None, "speedup": best["speedup"], "psnr": best["psnr"],
                    "note": f"best of {len(results['rows'])} rows: {best['pipeline']}; full table in {name}.md"}
        runner.case(f"{name}/diffc-bench", measure, cap_s=200)


def write(runner: Runner, out: Path, meta: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_bench.json").write_text(json.dumps({"meta": meta, "rows": runner.rows}, indent=1, default=str))
    lines = [f"# diffc GPU benchmark on {meta['device']} ({meta['date']})", "",
             "Random-weight architectures: speed only (per denoiser step, median after warm-up, vs eager "
             f"{meta['precision']} in the same run); the cache case times a whole {meta['cache_steps']}-step DDIM loop. "
             f"{'SMOKE RUN: tiny configs on CPU, the figures say nothing about GPU speed. ' if meta['smoke'] else ''}", "",
             "| case | status | speed-up | ms/step | baseline ms/step | optimize s | note |", "|---|---|---|---|---|---|---|"]

    def cell(value: Any, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    for row in runner.rows:
        note = row["reason"] or row.get("note") or row.get("peer") or ""
        if "relative_error" in row:
            note = f"relative output error {row['relative_error']:.2e}"
        if "psnr_latents" in row:
            note = f"final latents PSNR {row['psnr_latents']:.2f} dB vs eager loop"
        lines.append(f"| {row['case']} | {row['status']} | {cell(row.get('speedup'), '.2f')} | "
                     f"{cell(row.get('ms_per_step'), '.2f')} | {cell(row.get('baseline_ms_per_step'), '.2f')} | "
                     f"{cell(row.get('optimize_seconds'), '.1f')} | {note.replace('|', '/')} |")
    (out / "gpu_bench.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        measured = [r for r in runner.rows if r["status"] == "ok" and r.get("speedup")]
        ax.barh([r["case"] for r in measured], [r["speedup"] for r in measured], color="tab:blue")
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xlabel(f"speed-up vs eager {meta['precision']} (same run)")
        ax.tick_params(axis="y", labelsize=6)
        fig.tight_layout()
        fig.savefig(out / "gpu_bench.png", dpi=120)
        plt.close(fig)
    except ImportError as exc:
        (out / "gpu_bench.png.missing").write_text(f"no plot: {exc}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true",
                        help="every case on CPU at tiny sizes through the same code (about a minute)")
    parser.add_argument("--out", default="benchmarks/results", help="parent folder; a <date>-<device> folder is made in it")
    parser.add_argument("--budget-s", type=float, default=None,
                        help=f"whole-run budget (default {FULL.budget_s:.0f} s, smoke {SMOKE.budget_s:.0f} s)")
    args = parser.parse_args(argv)
    scale = SMOKE if args.smoke else FULL
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    precision, dtype = ("bf16", torch.bfloat16) if device.type == "cuda" else ("fp32", torch.float32)
    if device.type == "cpu":
        torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    device_name = torch.cuda.get_device_name(device).replace(" ", "-") if device.type == "cuda" else "cpu"
    date = time.strftime("%Y-%m-%d")
    out = Path(args.out) / f"{date}-{device_name}{'-smoke' if args.smoke else ''}"
    runner = Runner(args.budget_s or scale.budget_s, reserve_s=10, case_cap_s=scale.case_cap_s)
    meta = {"device": device_name, "date": date, "smoke": args.smoke, "precision": precision,
            "cache_steps": scale.cache_steps, "torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        run_architectures(runner, scale, device, dtype, precision)
        run_default_models(runner, scale, device, out, date)
    finally:
        write(runner, out, meta)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
