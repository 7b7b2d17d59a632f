"""Reproducible, resumable training of the zoo models and their scorers.

    python -m diffc.models.zoo.train --model shapes-unet          # a denoiser (see specs.ZOO)
    python -m diffc.models.zoo.train --model scorer-shapes        # the classifier of a data set
    python -m diffc.models.zoo.train --all                        # every scorer, then every model

Weights go to the zoo folder (`--root`, default `zoo.default_root()`: $DIFFC_ZOO or the checkout's
benchmarks/zoo); checkpoints go to --checkpoint-dir and a rerun with the same arguments resumes there.
Each model trains in <= 30 minutes on 2 cores at its default step count.
"""

import argparse
import copy
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torch import nn
from tqdm import tqdm

from ..train import learning_rate, load_checkpoint, save_checkpoint, update_ema
from . import default_root
from .data import dataset
from .encoder import PAD, AttributeEncoder
from .pipeline import ZooPipeline, call_denoiser, pack_latents
from .scorer import ZooScorer, build_classifier
from .specs import NUM_TRAIN_TIMESTEPS, TEXT_DIM, ZOO, ZooSpec, spec

POOL_SIZE = 12000  # training samples drawn once per run (the seed fixes them)
PROMPT_DROPOUT = 0.1  # prompts replaced by the empty prompt, for classifier-free guidance
SCORER_PREFIX = "scorer-"
SCORER_STEPS = 2000


class DenoiserObjective:
    """The loss of one zoo model: epsilon or v prediction on the forward process of its sampler's
    noise schedule, or rectified flow (x_s = (1 - s) x0 + s noise, target noise - x0)."""

    def __init__(self, zoo_spec: ZooSpec):
        self.spec = zoo_spec
        if zoo_spec.prediction != "flow":
            self.forward_process = DDPMScheduler.from_config(zoo_spec.build_scheduler().config)
            assert self.forward_process.config.prediction_type == zoo_spec.prediction

    def __call__(self, modules: nn.ModuleDict, images: torch.Tensor, token_ids: torch.Tensor,
                 generator: torch.Generator) -> torch.Tensor:
        noise = torch.randn(images.shape, generator=generator)
        dropped = torch.rand(token_ids.shape[0], generator=generator) < PROMPT_DROPOUT
        token_ids = torch.where(dropped[:, None], torch.full_like(token_ids, PAD), token_ids)
        hidden, pooled = modules["text_encoder"](token_ids)
        broadcast = (-1,) + (1,) * (images.dim() - 1)
        if self.spec.prediction == "flow":
            s = torch.rand(images.shape[0], generator=generator)
            noisy = (1.0 - s.view(broadcast)) * images + s.view(broadcast) * noise
            timesteps, target = s * NUM_TRAIN_TIMESTEPS, noise - images
        else:
            timesteps = torch.randint(0, NUM_TRAIN_TIMESTEPS, (images.shape[0],), generator=generator)
            noisy = self.forward_process.add_noise(images, noise, timesteps)
            target = noise if self.spec.prediction == "epsilon" else \
                self.forward_process.get_velocity(images, noise, timesteps)
        if self.spec.family == "flux":
            noisy, target = pack_latents(noisy), pack_latents(target)
        prediction = call_denoiser(self.spec.family, modules["denoiser"], noisy, timesteps.float(), hidden, pooled,
                                   self.spec.dataset.image_size)
        return F.mse_loss(prediction, target)


def scorer_objective(modules: nn.ModuleDict, images: torch.Tensor, labels: torch.Tensor,
                     generator: torch.Generator) -> torch.Tensor:
    # mild noise makes the scorer robust to the small artefacts of generated samples
    images = images + 0.1 * torch.randn(images.shape, generator=generator)
    logits = modules["classifier"](images)
    return sum(F.cross_entropy(head, labels[:, index]) for index, head in enumerate(logits))


def export_model(zoo_spec: ZooSpec, ema: nn.ModuleDict, out: Path) -> None:
    data = zoo_spec.dataset
    pipe = ZooPipeline(text_encoder=ema["text_encoder"], scheduler=zoo_spec.build_scheduler(),
                       family=zoo_spec.family, image_size=data.image_size, num_frames=data.num_frames,
                       default_guidance_scale=zoo_spec.guidance_scale, **{zoo_spec.denoiser_attribute: ema["denoiser"]})
    pipe.save_pretrained(out)


def export_scorer(data_name: str, ema: nn.ModuleDict, out: Path) -> None:
    ema["classifier"].save_pretrained(out)
    images, labels, _ = dataset(data_name).sample(1000, torch.Generator().manual_seed(12345))
    scorer = ZooScorer(ema["classifier"], dataset(data_name))
    accuracy = (scorer.predict(images / 2.0 + 0.5) == labels).all(dim=1).float().mean().item()
    print(f"{SCORER_PREFIX}{data_name} accuracy on 1000 held-out samples: {accuracy:.4f}")


def recipe(name: str):
    """(modules, loss, exporter, steps, batch size, peak learning rate, data set name) for a zoo name."""
    if name.startswith(SCORER_PREFIX):
        data_name = name[len(SCORER_PREFIX):]
        modules = nn.ModuleDict({"classifier": build_classifier(data_name)})
        return modules, scorer_objective, lambda ema, out: export_scorer(data_name, ema, out), SCORER_STEPS, 64, \
            2e-3, data_name
    zoo_spec = spec(name)
    data = zoo_spec.dataset
    modules = nn.ModuleDict({"denoiser": zoo_spec.build_denoiser(data),
                             "text_encoder": AttributeEncoder(vocabulary=data.vocabulary(), dim=TEXT_DIM)})
    return modules, DenoiserObjective(zoo_spec), lambda ema, out: export_model(zoo_spec, ema, out), \
        zoo_spec.train_steps, zoo_spec.batch_size, zoo_spec.learning_rate, zoo_spec.data


def train(name: str, root: Path, checkpoint_dir: Path | None, seed: int, threads: int, steps: int | None) -> Path:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model, objective, export, default_steps, batch_size, peak_lr, data_name = recipe(name)
    total_steps = steps or default_steps
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=peak_lr, weight_decay=0.01)
    checkpoint_dir = checkpoint_dir or Path.home() / ".cache" / "diffc" / "zoo-checkpoints" / f"{name}-seed{seed}"
    start_step = load_checkpoint(checkpoint_dir, model, ema, optimizer, generator)
    count = sum(parameter.numel() for parameter in model.parameters())
    print(f"{name}: {count / 1e6:.3f}M parameters, starting at step {start_step}, checkpoints in {checkpoint_dir}")

    data = dataset(data_name)
    # the pool is a function of the seed alone, so a resumed run trains on the same samples
    images, labels, prompts = data.sample(POOL_SIZE, torch.Generator().manual_seed(seed + 1))
    conditions = labels if name.startswith(SCORER_PREFIX) else model["text_encoder"].tokenize(prompts)
    model.train()
    progress = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps, desc=name, mininterval=10)
    smoothed = None
    started = time.time()
    for step in progress:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, total_steps, peak_lr, warmup_steps=100)
        batch = torch.randint(0, POOL_SIZE, (batch_size,), generator=generator)
        loss = objective(model, images[batch], conditions[batch], generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        update_ema(ema, model, step, max_decay=0.995)
        smoothed = loss.item() if smoothed is None else 0.98 * smoothed + 0.02 * loss.item()
        progress.set_postfix(loss=f"{smoothed:.4f}", refresh=False)
        if (step + 1) % 100 == 0 and step + 1 < total_steps:
            save_checkpoint(checkpoint_dir, step + 1, model, ema, optimizer, generator)
    print(f"trained {total_steps - start_step} steps in {time.time() - started:.0f}s")
    save_checkpoint(checkpoint_dir, total_steps, model, ema, optimizer, generator)
    out = root / ("scorers/" + data_name if name.startswith(SCORER_PREFIX) else name)
    export(ema, out)
    print(f"wrote EMA weights to {out}")
    return out


def all_names() -> list[str]:
    scorers = sorted({SCORER_PREFIX + zoo_spec.data for zoo_spec in ZOO.values()})
    return scorers + list(ZOO)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=all_names())
    parser.add_argument("--all", action="store_true", help="train every scorer and model in turn")
    parser.add_argument("--root", type=Path, default=None, help="the zoo folder (default: $DIFFC_ZOO or benchmarks/zoo)")
    parser.add_argument("--checkpoint-dir", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=None, help="default: the model's own step count")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if bool(args.model) == args.all:
        parser.error("give either --model NAME or --all")
    root = args.root or default_root()
    for name in all_names() if args.all else [args.model]:
        train(name, root, args.checkpoint_dir if not args.all else None, args.seed, args.threads, args.steps)


if __name__ == "__main__":
    main()
