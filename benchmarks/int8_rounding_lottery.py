"""Whether a zoo model's bench samples survive int8 weight rounding as such, apart from any quantizer:
each variant rounds every Linear weight of the denoiser to int8 per output channel (a symmetric scale
mapping the largest magnitude to `level`, round to nearest; or stochastic rounding), regenerates the
bench's images (same prompts, seeds and steps as `diffc bench`) and gives each image's PSNR against
the unmodified model. A sample that flips to other content under some of these equally small
roundings (all within a few % of the same weight error) flips by lot, not by a quantizer's fault: a
pass, torchao or a cache row that flips it has drawn a bad rounding, and its batch PSNR is that
sample's.

    python benchmarks/int8_rounding_lottery.py motion-wan --out benchmarks/results/<date>-cpu-x86_64/lottery

Results go to OUT/<model>.json (one entry per variant, written as each finishes: an interrupted run
resumes where it stopped) and OUT/<model>.md.
"""

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from diffc.metrics import psnr, psnr_per_image
from diffc.models import zoo

# an image this far below the variant's median image reads as other content, not as noise
FLIP_MARGIN_DB = 15.0


def rounded(weight: torch.Tensor, level: float, generator: torch.Generator | None) -> torch.Tensor:
    scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=torch.finfo(weight.dtype).tiny) / level
    scaled = weight / scale
    if generator is None:
        levels = torch.round(scaled)
    else:
        levels = torch.floor(scaled + torch.rand(scaled.shape, generator=generator))
    return levels.clamp(-128, 127) * scale


def variants(levels: list[float], stochastic: int) -> dict[str, tuple[float, bool]]:
    """By name: (the level the largest magnitude maps to, whether rounding is stochastic)."""
    chosen = {f"nearest, amax/{level:g}": (level, False) for level in levels}
    chosen.update({f"stochastic, amax/127, seed {seed}": (127.0, True) for seed in range(stochastic)})
    return chosen


def generate(pipe: Any, prompts: list[str], seeds: list[int], steps: int) -> np.ndarray:
    images = []
    with torch.no_grad():
        for seed in seeds:
            images.append(np.asarray(pipe(prompt=prompts, num_inference_steps=steps,
                                          generator=torch.Generator().manual_seed(seed), output_type="np").images,
                                     dtype=np.float64))
    return np.concatenate(images)


def flipped(per_image: list[float]) -> list[int]:
    median = float(np.median(per_image))
    return [index for index, value in enumerate(per_image) if value < median - FLIP_MARGIN_DB]


def write_markdown(path: Path, model: str, results: dict[str, Any]) -> None:
    rows = results["variants"]
    count = len(next(iter(rows.values()))["psnr_per_image"]) if rows else 0
    lines = [f"# int8 weight rounding variants on {model}", "",
             f"{results['steps']} steps, seeds {results['seeds']}, {count} images (prompt-major within each seed, as "
             f"`diffc bench` orders them); every Linear of the denoiser rounded to int8 per output channel. A flip: an "
             f"image more than {FLIP_MARGIN_DB:g} dB below the variant's median image.", "",
             "| variant | weight relative MSE | batch PSNR dB | median image dB | worst image dB | flipped images |",
             "|---|---|---|---|---|---|"]
    for name, row in rows.items():
        per_image = row["psnr_per_image"]
        lines.append(f"| {name} | {row['weight_relative_mse']:.2e} | {row['psnr']:.2f} | {np.median(per_image):.1f} | "
                     f"{min(per_image):.1f} | {', '.join(str(i) for i in flipped(per_image)) or '-'} |")
    flips = {index: sum(index in flipped(row["psnr_per_image"]) for row in rows.values()) for index in range(count)}
    unstable = {index: times for index, times in flips.items() if times}
    lines += ["", "Images that flip under some variant (index: variants that flip it): "
              + (", ".join(f"{index}: {times} of {len(rows)}" for index, times in unstable.items()) or "none")]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", choices=sorted(zoo.ZOO))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--levels", default="127,127.5,126,125", help="largest magnitude's level, per variant")
    parser.add_argument("--stochastic", type=int, default=2, help="stochastic-rounding variants (one per seed)")
    args = parser.parse_args()
    seeds = [int(seed) for seed in args.seeds.split(",")]
    pipe: Any = zoo.load(args.model)
    pipe.set_progress_bar_config(disable=True)
    prompts = list(zoo.prompts(args.model, 10))
    denoiser = getattr(pipe, zoo.spec(args.model).denoiser_attribute)
    linears = [module for module in denoiser.modules() if isinstance(module, torch.nn.Linear)]
    originals = [module.weight.data.clone() for module in linears]
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.model}.json"
    results = json.loads(path.read_text()) if path.exists() else {"steps": args.steps, "seeds": seeds, "variants": {}}
    if (results["steps"], results["seeds"]) != (args.steps, seeds):
        raise SystemExit(f"{path} holds a run at {results['steps']} steps, seeds {results['seeds']}; use another --out")
    reference = generate(pipe, prompts, seeds, args.steps)
    chosen = variants([float(level) for level in args.levels.split(",")], args.stochastic)
    for index, (name, (level, stochastic)) in enumerate(tqdm(chosen.items(), desc=f"rounding {args.model}",
                                                             unit="variant")):
        if name in results["variants"]:
            continue
        generator = torch.Generator().manual_seed(index) if stochastic else None
        error = energy = 0.0
        try:
            for module, original in zip(linears, originals):
                module.weight.data = rounded(original, level, generator)
                error += float((module.weight.data - original).double().pow(2).sum())
                energy += float(original.double().pow(2).sum())
            images = generate(pipe, prompts, seeds, args.steps)
        finally:
            for module, original in zip(linears, originals):
                module.weight.data = original
        results["variants"][name] = {"weight_relative_mse": error / energy, "psnr": psnr(images, reference),
                                     "psnr_per_image": psnr_per_image(images, reference)}
        path.write_text(json.dumps(results, indent=1))
    write_markdown(args.out / f"{args.model}.md", args.model, results)
    print(f"wrote {args.out / args.model}.{{json,md}}")


if __name__ == "__main__":
    main()
