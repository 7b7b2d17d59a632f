"""Class-conditional diffusers pipelines for the two digits models.

Both pipelines share one sampling loop (`ClassConditionalPipeline.__call__`); they differ
only in how the denoiser is conditioned and called (`_predict`). The denoiser is accessed
only through its forward call, `.config`, `.dtype` and `.device`, so a user may replace
`pipe.unet` / `pipe.transformer` by any nn.Module offering the same.
"""

import inspect
from typing import Sequence

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from .components import ClassTokenEmbedding

OUTPUT_TYPES = ("np", "pil", "pt")


class ClassConditionalPipeline(DiffusionPipeline):
    """Shared sampling loop with classifier-free guidance; subclasses implement `_predict`."""

    default_guidance_scale: float = 3.0

    @property
    def denoiser(self) -> torch.nn.Module:
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        raise NotImplementedError

    @property
    def null_label(self) -> int:
        raise NotImplementedError

    def _predict(self, latents: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One denoiser call on a batch; timesteps and labels have shape (batch,)."""
        raise NotImplementedError

    def _check_inputs(self, class_labels, num_inference_steps: int, output_type: str) -> list[int]:
        if isinstance(class_labels, int):
            class_labels = [class_labels]
        if isinstance(class_labels, torch.Tensor):
            class_labels = class_labels.tolist()
        class_labels = list(class_labels)
        if not class_labels:
            raise ValueError("class_labels must contain at least one label")
        for label in class_labels:
            if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not 0 <= label < self.num_classes:
                raise ValueError(f"class labels must be integers in 0..{self.num_classes - 1}, got {label!r}")
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        return [int(label) for label in class_labels]

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Sequence[int] | int,
        num_inference_steps: int = 20,
        guidance_scale: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "np",
        return_dict: bool = True,
    ):
        """Sample one image per class label.

        guidance_scale > 1 uses classifier-free guidance, running the unconditional and the
        conditional batch in one denoiser call (batch 2N); guidance_scale <= 1 runs batch N.
        Returns ImagePipelineOutput whose `images` are (N, H, W, C) numpy in [0, 1] ("np"),
        a list of PIL images ("pil") or a (N, C, H, W) tensor in [0, 1] ("pt").
        """
        labels = self._check_inputs(class_labels, num_inference_steps, output_type)
        if guidance_scale is None:
            guidance_scale = self.default_guidance_scale
        use_guidance = guidance_scale > 1.0

        denoiser = self.denoiser
        device, dtype = denoiser.device, denoiser.dtype
        size = denoiser.config.sample_size
        shape = (len(labels), denoiser.config.in_channels, size, size)
        latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        # Flow-matching schedulers start from unit-variance noise and define no init_noise_sigma.
        latents = latents * getattr(self.scheduler, "init_noise_sigma", 1.0)

        label_tensor = torch.tensor(labels, device=device)
        if use_guidance:
            # Unconditional half first, as in the Stable Diffusion pipelines.
            label_tensor = torch.cat([torch.full_like(label_tensor, self.null_label), label_tensor])

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        # stochastic samplers (DDPM, Euler ancestral) draw their noise from the generator too, so a
        # seed fixes the whole trajectory
        step_options = {"generator": generator} if "generator" in inspect.signature(self.scheduler.step).parameters \
            else {}
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = torch.cat([latents, latents]) if use_guidance else latents
            timesteps = t.expand(model_input.shape[0])
            prediction = self._predict(model_input, timesteps, label_tensor)
            if use_guidance:
                unconditional, conditional = prediction.chunk(2)
                prediction = unconditional + guidance_scale * (conditional - unconditional)
            latents = self.scheduler.step(prediction, t, latents, **step_options, return_dict=False)[0]

        images = (latents / 2.0 + 0.5).clamp(0.0, 1.0).float()
        if output_type == "pt":
            output = images.cpu()
        else:
            output = images.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                output = self.numpy_to_pil(output)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (output,)
        return ImagePipelineOutput(images=output)


class DigitsUNetPipeline(ClassConditionalPipeline):
    """UNet2DConditionModel (epsilon prediction) conditioned by cross-attention on class tokens.

    Components: `unet`, `class_embedding` (ClassTokenEmbedding), `scheduler` (DDIM by default;
    any epsilon-prediction scheduler such as DPMSolverMultistepScheduler works).
    """

    default_guidance_scale = 3.0
    model_cpu_offload_seq = "class_embedding->unet"

    def __init__(self, unet, class_embedding: ClassTokenEmbedding, scheduler):
        super().__init__()
        self.register_modules(unet=unet, class_embedding=class_embedding, scheduler=scheduler)

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.unet

    @property
    def num_classes(self) -> int:
        return self.class_embedding.config.num_classes

    @property
    def null_label(self) -> int:
        return self.class_embedding.null_label

    def _predict(self, latents, timesteps, labels):
        tokens = self.class_embedding(labels.to(self.class_embedding.device)).to(latents.device, latents.dtype)
        latents = self.scheduler.scale_model_input(latents, timesteps[0])
        return self.unet(latents, timesteps, encoder_hidden_states=tokens, return_dict=False)[0]


class DigitsDiTPipeline(ClassConditionalPipeline):
    """DiTTransformer2DModel trained with flow matching (velocity = noise - x0).

    Components: `transformer`, `scheduler` (FlowMatchEulerDiscreteScheduler). The class
    embedding lives inside the transformer; its null class is index num_embeds_ada_norm.
    """

    # Higher guidance collapses this small model's samples to one mode per class (FID rises).
    default_guidance_scale = 1.5
    model_cpu_offload_seq = "transformer"

    def __init__(self, transformer, scheduler):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.transformer

    @property
    def num_classes(self) -> int:
        return self.transformer.config.num_embeds_ada_norm

    @property
    def null_label(self) -> int:
        return self.transformer.config.num_embeds_ada_norm

    def _predict(self, latents, timesteps, labels):
        return self.transformer(latents, timestep=timesteps, class_labels=labels, return_dict=False)[0]
