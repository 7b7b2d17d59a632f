"""Issue 24's zoo check: each default lossy pass decided through a hand-written sampling loop and
`diffc.calibration.record` (no pipeline object: the passes see only the recorded denoiser calls and
re-run the loop they identify from them), then judged on final images of seeds that calibration
never saw, twice: with the calibration's prompts (what the pass's held-out check predicts) and with
prompts it never saw either (how far its choice generalizes): image PSNR against the unoptimized
model's images for the same seed, the zoo scorer's sample accuracy of both, and the pass's own
held-out figure beside them.

    python benchmarks/closed_loop_zoo.py                      # every zoo model with weights
    python benchmarks/closed_loop_zoo.py --models shapes-unet --passes cache,quant
    python benchmarks/closed_loop_zoo.py --smoke              # one model, 4 steps, 2 images

Writes benchmarks/results/<date>-cpu-x86_64/closed-loop/<model>.json and README.md; a model whose
json exists is skipped, so an interrupted run resumes."""
import argparse
import datetime
import json
import platform
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import diffc
from diffc.calibration import record
from diffc.metrics import psnr
from diffc.models import zoo
from diffc.models.zoo.pipeline import call_denoiser, pack_latents

# the pass and the target each default runs under
PASSES = {"cache": ("cache", "torch"), "prune": ("prune", "torch"), "moe": ("moe", "torch"),
          "quant": ("quant", "torch-int8")}
FLOOR_DB, ACCURACY_POINTS = 30.0, 3.0


@torch.no_grad()
def hand_written_loop(pipe: zoo.ZooPipeline, denoiser, prompt: str, seed: int, steps: int) -> torch.Tensor:
    """Sampling written out as a user would: encode, batched classifier-free guidance, scheduler step."""
    family, size = pipe.config.family, pipe.config.image_size
    scheduler, guidance = pipe.scheduler, pipe.config.default_guidance_scale
    latents = torch.randn(pipe.latent_shape(1), generator=torch.Generator().manual_seed(seed))
    latents = latents * getattr(scheduler, "init_noise_sigma", 1.0)
    if family == "flux":
        latents = pack_latents(latents)
    hidden, pooled = pipe.text_encoder.encode(["", prompt])
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        model_input = torch.cat([latents, latents])
        if hasattr(scheduler, "scale_model_input"):
            model_input = scheduler.scale_model_input(model_input, t)
        unconditional, conditional = call_denoiser(family, denoiser, model_input, t.expand(2), hidden, pooled,
                                                   size).chunk(2)
        latents = scheduler.step(unconditional + guidance * (conditional - unconditional), t, latents,
                                 return_dict=False)[0]
    return latents


def sample(pipe: zoo.ZooPipeline, denoiser, prompts: list[str], seeds: list[int], steps: int) -> np.ndarray:
    attribute = "unet" if pipe.config.family == "unet" else "transformer"
    original = getattr(pipe, attribute)
    setattr(pipe, attribute, denoiser)
    try:
        return np.concatenate([np.asarray(pipe(prompts, num_inference_steps=steps, output_type="np",
                                               generator=torch.Generator().manual_seed(seed)).images, np.float64)
                               for seed in seeds])
    finally:
        setattr(pipe, attribute, original)


def pass_figures(report: dict) -> dict:
    """What the pass chose and the final-image PSNR it measured on its own held-out trajectories."""
    held_out = [entry for value in report.values() if isinstance(value, list)
                for entry in value if isinstance(entry, dict) and entry.get("held_out_psnr") is not None]
    check = report.get("final_image_check", {})
    held_out += [entry for entry in check.get("search", []) if entry.get("held_out_psnr") is not None]
    chosen = {key: report[key] for key in ("amount", "active", "steps", "forecast", "size_ratio") if key in report}
    if "kept_full_precision" in check:
        chosen["kept_full_precision"] = len(check["kept_full_precision"])
    # the chosen schedule's figure, not the last budget a back-off tried and dropped
    figure = ([entry for entry in held_out if entry.get("chosen")] or held_out or [{}])[-1].get("held_out_psnr")
    return {"chosen": chosen, "declined": report.get("declined"), "held_out_psnr_by_pass": figure}


def check_model(name: str, passes: list[str], steps: int, calibration_loops: int, images: int,
                seeds: list[int]) -> dict:
    pipe = zoo.load(name)
    scorer = zoo.load_scorer(name)
    denoiser = pipe.denoiser
    calibration_prompts = zoo.prompts(name, calibration_loops)
    evaluations = {"seen_prompts": calibration_prompts[:images],
                   "unseen_prompts": zoo.prompts(name, images, offset=1000)}  # not among the calibration prompts
    references = {key: sample(pipe, denoiser, prompts, seeds, steps) for key, prompts in evaluations.items()}
    reference_accuracy = {key: scorer.accuracy(references[key], prompts * len(seeds))
                          for key, prompts in evaluations.items()}
    result = {"model": name, "steps": steps, "calibration_loops": calibration_loops, "evaluation_prompts": evaluations,
              "evaluation_seeds": seeds, "reference_accuracy": reference_accuracy, "passes": {}}
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        with record(denoiser, out=Path(folder) / "recording") as recording:
            for seed, prompt in enumerate(calibration_prompts):
                recording.final(hand_written_loop(pipe, denoiser, prompt, seed=seed, steps=steps))
        result["record_seconds"] = round(time.perf_counter() - started, 1)
        for pass_name in tqdm(passes, desc=name, leave=False):
            spec, target = PASSES[pass_name]
            started = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                fast = diffc.optimize(denoiser, target=target, passes=[spec], calibration=recording)
            seconds = time.perf_counter() - started
            modified = fast.report[-1]["modified"]
            entry = {**pass_figures(fast.report[-1]["report"]), "target": fast.target, "modified": modified,
                     "optimize_seconds": round(seconds, 1),
                     "warnings": sorted({str(w.message)[:300] for w in caught if issubclass(w.category, UserWarning)})}
            for key, prompts in evaluations.items():
                images_out = sample(pipe, fast, prompts, seeds, steps)
                accuracy = scorer.accuracy(images_out, prompts * len(seeds))
                measured = float(psnr(images_out, references[key]))
                entry[key] = {"image_psnr": round(measured, 2), "accuracy": accuracy, "holds": bool(
                    not modified or (measured >= FLOOR_DB
                                     and accuracy >= reference_accuracy[key] - ACCURACY_POINTS / 100))}
            result["passes"][pass_name] = entry
    return result


def write_readme(folder: Path) -> None:
    rows = []
    for path in sorted(folder.glob("*.json")):
        result = json.loads(path.read_text())
        loops = result["calibration_loops"]
        label = result["model"] + ("" if loops == 8 else f" ({loops} loops)")
        for pass_name, entry in result["passes"].items():
            by_pass = entry["held_out_psnr_by_pass"]
            measured = [f"{entry[key]['image_psnr']:.1f} | {result['reference_accuracy'][key]:.2f} -> "
                        f"{entry[key]['accuracy']:.2f} | {'yes' if entry[key]['holds'] else '**no**'}"
                        for key in ("seen_prompts", "unseen_prompts")]
            rows.append(
                f"| {label} | {pass_name} ({entry['target']}) | "
                f"{'declined' if entry['declined'] else json.dumps(entry['chosen'])} | "
                f"{'-' if by_pass is None else f'{by_pass:.1f}'} | {' | '.join(measured)} | "
                f"{entry['optimize_seconds']:.0f} |")
    folder.joinpath("README.md").write_text(
        "# Closed-loop decisions on the zoo (issue 24)\n\n"
        "Each default pass calibrated through a hand-written loop and `record` (loop i: prompt i, seed i; 8 loops "
        "unless the model's name says otherwise), judged on "
        "seeds calibration did not see (101, 202): with the calibration's prompts (`seen`, what the pass's held-out "
        "check predicts) and with prompts it never saw (`unseen`, how far the choice generalizes). `held-out (pass)`: "
        "the final-latent PSNR the pass measured on its own held-out trajectories (latents as data in [-1, 1]); "
        "image PSNR: images against the unoptimized model's, same seeds and prompts; "
        f"holds: PSNR >= {FLOOR_DB:.0f} dB and accuracy within {ACCURACY_POINTS:.0f} points, or declined "
        "(unchanged).\n\n"
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}.\n\n"
        "| model | pass | chosen | held-out (pass) dB | seen: image PSNR dB | accuracy | holds "
        "| unseen: image PSNR dB | accuracy | holds | optimize s |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(zoo.available()))
    parser.add_argument("--passes", default=",".join(PASSES))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--loops", type=int, default=8, help="calibration loops (prompt i with seed i)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true", help="one model, 4 steps, 2 images: checks the script runs")
    args = parser.parse_args()
    models, passes = args.models.split(","), args.passes.split(",")
    steps, loops, images, seeds = args.steps, args.loops, 8, [101, 202]
    if args.smoke:
        models, steps, loops, images, seeds = models[:1], 4, 4, 2, [101]
    date = datetime.date.today().isoformat()
    folder = args.out or Path(__file__).parent / "results" / f"{date}-cpu-{platform.machine()}" / "closed-loop"
    folder.mkdir(parents=True, exist_ok=True)
    for name in models:
        path = folder / (f"{name}.json" if loops == 8 else f"{name}-{loops}-loops.json")
        if path.exists():
            continue
        path.write_text(json.dumps(check_model(name, passes, steps, loops, images, seeds), indent=1))
        write_readme(folder)
        print(f"{name}: written to {path}")


if __name__ == "__main__":
    main()
