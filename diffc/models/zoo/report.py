"""Samples every trained zoo model, scores the samples with its data set's classifier and writes
the zoo's README table and a PNG grid per model (benchmarks/zoo/grids/).

    python -m diffc.models.zoo.report [--root benchmarks/zoo] [--samples 32] [--steps 20]
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import ZOO, available, default_root, load, load_scorer, prompts, spec

GRID_SCALE = 4  # pixels per sample pixel in the grids, so 16 px samples are visible
# the share of samples whose every attribute is read back right below which a model has not learned
# its data well enough to stand for a trained model of its family
RECOGNIZABLE = 0.6


def grid_image(images: np.ndarray, columns: int) -> Image.Image:
    """Images (N, H, W, 3) or videos (N, F, H, W, 3) in [0, 1] -> one PNG grid; a video is a row of
    its frames, so `columns` videos per row become columns * F tiles."""
    if images.ndim == 5:
        images = np.concatenate(list(np.moveaxis(images, 1, 0)), axis=2)
    rows = [images[start:start + columns] for start in range(0, len(images), columns)]
    rows[-1] = np.concatenate([rows[-1], np.zeros((columns - len(rows[-1]), *images.shape[1:]))]) \
        if len(rows[-1]) < columns else rows[-1]
    canvas = np.concatenate([np.concatenate(list(row), axis=1) for row in rows], axis=0)
    picture = Image.fromarray((canvas.clip(0, 1) * 255).round().astype(np.uint8))
    return picture.resize((picture.width * GRID_SCALE, picture.height * GRID_SCALE), Image.NEAREST)


def evaluate(name: str, root: Path, samples: int, steps: int) -> dict:
    pipe, scorer = load(name, root), load_scorer(name, root)
    asked = prompts(name, samples)
    started = time.perf_counter()
    images = pipe(asked, num_inference_steps=steps, generator=torch.Generator().manual_seed(0)).images
    seconds = time.perf_counter() - started
    grid_image(images[:16], columns=4 if images.ndim == 5 else 8).save(root / "grids" / f"{name}.png")
    zoo_spec = spec(name)
    denoiser = getattr(pipe, zoo_spec.denoiser_attribute)
    return {"family": f"{zoo_spec.family} ({type(denoiser).__name__})", "data": zoo_spec.data,
            "prediction": zoo_spec.prediction, "sampler": zoo_spec.sampler,
            "parameters_m": sum(p.numel() for p in denoiser.parameters()) / 1e6,
            "accuracy": scorer.accuracy(images, asked), "attribute_accuracy": scorer.attribute_accuracy(images, asked),
            "samples": samples, "steps": steps,
            "guidance_scale": pipe.config.default_guidance_scale, "seconds": seconds, "prompts": asked[:16]}


def readme_table(results: dict) -> str:
    lines = ["| model | family | data | prediction | sampler | params (M) | sample accuracy | grid |",
             "|---|---|---|---|---|---|---|---|"]
    for name, entry in results.items():
        lines.append(f"| `{name}` | {entry['family']} | {entry['data']} | {entry['prediction']} | {entry['sampler']} "
                     f"| {entry['parameters_m']:.2f} | {entry['accuracy']:.3f} ({entry['samples']} samples, "
                     f"{entry['steps']} steps, CFG {entry['guidance_scale']:g}) | ![{name}](grids/{name}.png) |")
    weak = [f"`{name}` ({entry['accuracy']:.0%}; per attribute: "
            + ", ".join(f"{attribute} {share:.0%}" for attribute, share in entry["attribute_accuracy"].items()) + ")"
            for name, entry in results.items() if entry["accuracy"] < RECOGNIZABLE]
    if weak:
        lines += ["", f"Not yet learned well enough (under {RECOGNIZABLE:.0%} of samples right): {'; '.join(weak)}. "
                  "They are to be retrained, and results on them are marked as such."]
    return "\n".join(lines) + "\n"


README_HEADER = """# The evaluation zoo

Six small diffusion models this project trains to test diffc on models that differ from the two shipped
digits defaults: in family (cross-attention UNet, SD3.5-style joint attention with qk-norm and a dual-attention
layer, FLUX double/single-stream, PixArt, Wan video), prediction type (epsilon, v, flow), sampler (DDIM,
DPM-Solver++ 2M, UniPC, flow-matching Euler), width, depth, patch size and data. The data are procedural
(`diffc/models/zoo/data.py`): shapes with size and colour, textures (stripes, bars, checker, dots) in four
colours, two-object compositions ("red circle left of square") and 4-frame videos of a moving shape. Every
model is conditioned on its prompt through a sequence encoder (`encoder.py`: word tokens, a transformer layer,
cross- or joint-attention), with classifier-free guidance on the empty prompt.

    from diffc.models import zoo
    pipe = zoo.load("shapes-flux")                       # weights from here ($DIFFC_ZOO to move them)
    prompts = zoo.prompts("shapes-flux", 8)
    images = pipe(prompts, generator=torch.Generator().manual_seed(0)).images
    zoo.load_scorer("shapes-flux").accuracy(images, prompts)

Train (reproducible from the seed, resumable, each <= 30 min on 2 cores):
`python -m diffc.models.zoo.train --model NAME` (or `--all`; scorers are `scorer-<data set>`). This page is
written by `python -m diffc.models.zoo.report`: sample accuracy is the share of samples whose every
attribute the data set's classifier reads back matches the prompt (each classifier reads >= 95% of
held-out real samples right; see tests/models/test_zoo.py). Grids: one sample per tile (videos: a row of
4 frames), prompts in `samples.json`.

"""


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=None)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    root = args.root or default_root()
    (root / "grids").mkdir(parents=True, exist_ok=True)
    missing = [name for name in ZOO if name not in available(root)]
    if missing:
        raise SystemExit(f"not trained yet: {missing}; python -m diffc.models.zoo.train --model NAME")
    results = {name: evaluate(name, root, args.samples, args.steps) for name in ZOO}
    (root / "samples.json").write_text(json.dumps(results, indent=1))
    (root / "README.md").write_text(README_HEADER + readme_table(results))
    print(readme_table(results))


if __name__ == "__main__":
    main()
