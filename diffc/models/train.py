"""Reproducible training of the shipped digits models and the scoring classifier.

    python -m diffc.models.train --model classifier  --steps 1500 --warmup-steps 200 --seed 0
    python -m diffc.models.train --model digits-unet --steps 800 --batch-size 32 --seed 0
    python -m diffc.models.train --model digits-dit  --steps 3000 --batch-size 64 --seed 0

The EMA weights are written to --out (default: the package's weights folder). Checkpoints
(weights, EMA, AdamW state and RNG states as safetensors, step in JSON) go to
--checkpoint-dir, outside the package, and a rerun with the same arguments resumes there.
"""

import argparse
import copy
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DiTTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    UNet2DConditionModel,
)
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from . import WEIGHTS_DIR, SCORER_NAME, save_pipeline
from .components import ClassTokenEmbedding
from .digits import IMAGE_SIZE, NUM_CLASSES, load_digits_16, random_shift
from .pipelines import DigitsDiTPipeline, DigitsUNetPipeline
from .quality import DigitClassifier

NUM_TRAIN_TIMESTEPS = 1000
CROSS_ATTENTION_DIM = 64
LABEL_DROPOUT = 0.1  # fraction of labels replaced by the null class, for classifier-free guidance


def build_unet() -> nn.ModuleDict:
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE,
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=CROSS_ATTENTION_DIM,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    class_embedding = ClassTokenEmbedding(num_classes=NUM_CLASSES, embedding_dim=CROSS_ATTENTION_DIM, num_tokens=1)
    return nn.ModuleDict({"unet": unet, "class_embedding": class_embedding})


def build_dit() -> nn.ModuleDict:
    transformer = DiTTransformer2DModel(
        sample_size=IMAGE_SIZE,
        patch_size=2,
        in_channels=1,
        out_channels=1,
        num_layers=6,
        num_attention_heads=4,
        attention_head_dim=16,
        num_embeds_ada_norm=NUM_CLASSES,  # the label embedding adds a null class and drops labels in train mode
        norm_num_groups=1,
    )
    return nn.ModuleDict({"transformer": transformer})


def build_classifier() -> nn.ModuleDict:
    return nn.ModuleDict({"classifier": DigitClassifier()})


class UNetObjective:
    """Epsilon-prediction DDPM loss with label dropout to the null class."""

    def __init__(self):
        self.noise_scheduler = DDPMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_schedule="squaredcos_cap_v2")

    def __call__(self, modules, images, labels, generator):
        noise = torch.randn(images.shape, generator=generator)
        timesteps = torch.randint(0, NUM_TRAIN_TIMESTEPS, (images.shape[0],), generator=generator)
        dropped = torch.rand(labels.shape, generator=generator) < LABEL_DROPOUT
        labels = torch.where(dropped, modules["class_embedding"].null_label, labels)
        noisy = self.noise_scheduler.add_noise(images, noise, timesteps)
        tokens = modules["class_embedding"](labels)
        prediction = modules["unet"](noisy, timesteps, encoder_hidden_states=tokens, return_dict=False)[0]
        return F.mse_loss(prediction, noise)


def dit_objective(modules, images, labels, generator):
    """Rectified-flow loss: x_s = (1 - s) x0 + s noise, target velocity noise - x0.

    Label dropout happens inside the transformer's label embedding (train mode).
    """
    noise = torch.randn(images.shape, generator=generator)
    s = torch.rand(images.shape[0], generator=generator)
    s_image = s.view(-1, 1, 1, 1)
    noisy = (1.0 - s_image) * images + s_image * noise
    prediction = modules["transformer"](
        noisy, timestep=s * NUM_TRAIN_TIMESTEPS, class_labels=labels, return_dict=False
    )[0]
    return F.mse_loss(prediction, noise - images)


def classifier_objective(modules, images, labels, generator):
    # Mild noise makes the scorer robust to the small artefacts of generated samples.
    images = images + 0.1 * torch.randn(images.shape, generator=generator)
    return F.cross_entropy(modules["classifier"](images), labels)


def export_unet(ema: nn.ModuleDict, out: Path) -> None:
    scheduler = DDIMScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        beta_schedule="squaredcos_cap_v2",
        clip_sample=True,
        timestep_spacing="trailing",  # start sampling at t=999, pure noise, even with few steps
    )
    save_pipeline(DigitsUNetPipeline(unet=ema["unet"], class_embedding=ema["class_embedding"], scheduler=scheduler), out)


def export_dit(ema: nn.ModuleDict, out: Path) -> None:
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=1.0)
    save_pipeline(DigitsDiTPipeline(transformer=ema["transformer"], scheduler=scheduler), out)


def export_classifier(ema: nn.ModuleDict, out: Path) -> None:
    ema["classifier"].save_pretrained(out)
    images, labels = load_digits_16("test")
    with torch.no_grad():
        accuracy = (ema["classifier"].eval()(images).argmax(1) == labels).float().mean().item()
    print(f"classifier test accuracy: {accuracy:.4f}")


# name -> (builder, objective factory, exporter, default learning rate)
RECIPES = {
    "digits-unet": (build_unet, UNetObjective, export_unet, 1e-3),
    "digits-dit": (build_dit, lambda: dit_objective, export_dit, 1e-3),
    SCORER_NAME: (build_classifier, lambda: classifier_objective, export_classifier, 1e-3),
}


def learning_rate(step: int, total_steps: int, peak: float, warmup_steps: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, step: int, max_decay: float) -> None:
    # Short warm-up of the decay so early EMA weights are not dominated by the random init.
    decay = min(max_decay, (1 + step) / (10 + step))
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)


def save_checkpoint(folder: Path, step: int, model, ema, optimizer, generator) -> None:
    """Write a checkpoint atomically (temporary folder, then rename) so a kill never leaves half of one."""
    temporary = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    save_file(model.state_dict(), temporary / "model.safetensors")
    save_file(ema.state_dict(), temporary / "ema.safetensors")
    optimizer_state = optimizer.state_dict()
    tensors = {
        f"state.{index}.{key}": value
        for index, state in optimizer_state["state"].items()
        for key, value in state.items()
    }
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.data"] = generator.get_state()
    save_file(tensors, temporary / "optimizer_and_rng.safetensors")
    (temporary / "state.json").write_text(json.dumps({"step": step, "param_groups": optimizer_state["param_groups"]}))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(temporary, folder)


def load_checkpoint(folder: Path, model, ema, optimizer, generator) -> int:
    """Restore a checkpoint written by save_checkpoint; return its step (0 if there is none)."""
    if not (folder / "state.json").exists():
        return 0
    meta = json.loads((folder / "state.json").read_text())
    model.load_state_dict(load_file(folder / "model.safetensors"))
    ema.load_state_dict(load_file(folder / "ema.safetensors"))
    tensors = load_file(folder / "optimizer_and_rng.safetensors")
    torch.set_rng_state(tensors.pop("rng.torch"))
    generator.set_state(tensors.pop("rng.data"))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    for group in meta["param_groups"]:
        group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta["step"]


def train(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    build, make_objective, export, default_lr = RECIPES[args.model]
    peak_lr = args.lr or default_lr

    model = build()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    objective = make_objective()
    optimizer = torch.optim.AdamW(model.parameters(), lr=peak_lr, weight_decay=0.01)
    checkpoint_dir = args.checkpoint_dir or Path.home() / ".cache" / "diffc" / "checkpoints" / f"{args.model}-seed{args.seed}"
    start_step = load_checkpoint(checkpoint_dir, model, ema, optimizer, generator)
    num_params = sum(parameter.numel() for parameter in model.parameters())
    print(f"{args.model}: {num_params / 1e6:.3f}M parameters, starting at step {start_step}, checkpoints in {checkpoint_dir}")

    images, labels = load_digits_16("train")
    model.train()
    progress = tqdm(range(start_step, args.steps), initial=start_step, total=args.steps, desc=args.model, mininterval=5)
    smoothed_loss = None
    started = time.time()
    for step in progress:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, peak_lr, args.warmup_steps)
        batch = torch.randint(0, len(labels), (args.batch_size,), generator=generator)
        batch_images = random_shift(images[batch], generator)
        loss = objective(model, batch_images, labels[batch], generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        update_ema(ema, model, step, args.ema_decay)

        smoothed_loss = loss.item() if smoothed_loss is None else 0.98 * smoothed_loss + 0.02 * loss.item()
        progress.set_postfix(loss=f"{smoothed_loss:.4f}")
        if (step + 1) % args.checkpoint_every == 0 and step + 1 < args.steps:
            save_checkpoint(checkpoint_dir, step + 1, model, ema, optimizer, generator)
    print(f"trained {args.steps - start_step} steps in {time.time() - started:.0f}s")

    save_checkpoint(checkpoint_dir, args.steps, model, ema, optimizer, generator)
    out = args.out or WEIGHTS_DIR / args.model
    export(ema, Path(out))
    print(f"wrote EMA weights to {out}")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, choices=sorted(RECIPES))
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="where the EMA weights go (default: package weights)")
    parser.add_argument("--checkpoint-dir", type=Path, default=None, help="default: ~/.cache/diffc/checkpoints/<model>-seed<seed>")
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default depends on the model)")
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--ema-decay", type=float, default=0.995)
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


if __name__ == "__main__":
    train(parse_args())
