"""Save a grid of samples: one row per class, one column per seed.

    python -m diffc.models.grid digits-unet docs/samples-digits-unet.png
"""

import argparse

import numpy as np
import torch
from PIL import Image

from . import load
from .digits import NUM_CLASSES


def sample_grid(pipe, seeds: int, num_inference_steps: int, upscale: int) -> Image.Image:
    rows = []
    for label in range(NUM_CLASSES):
        # One generator per column, so a column shares its seed across classes.
        generators = [torch.Generator().manual_seed(seed) for seed in range(seeds)]
        images = pipe(
            class_labels=[label] * seeds, num_inference_steps=num_inference_steps, generator=generators, output_type="np"
        ).images
        rows.append(np.concatenate(list(images[..., 0]), axis=1))
    grid = (np.concatenate(rows, axis=0) * 255).round().astype(np.uint8)
    image = Image.fromarray(grid, mode="L")
    return image.resize((image.width * upscale, image.height * upscale), Image.NEAREST)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--upscale", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipe = load(args.model)
    pipe.set_progress_bar_config(disable=True)
    sample_grid(pipe, args.seeds, args.steps, args.upscale).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
