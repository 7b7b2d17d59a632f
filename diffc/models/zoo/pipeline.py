"""One text-to-image (or text-to-video) pipeline for every zoo model: prompts through the zoo's
`AttributeEncoder`, classifier-free guidance with the empty prompt, any diffusers scheduler, and a
per-family call of the denoiser shaped like diffusers' own pipelines (FLUX packs 2x2 patches into
tokens and passes position ids; PixArt passes empty micro-conditions; Wan takes a 5-D latent)."""

import inspect

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from .encoder import AttributeEncoder

FAMILIES = ("unet", "sd3", "flux", "pixart", "wan")
OUTPUT_TYPES = ("np", "pil", "pt")


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C), FLUX's token layout."""
    batch, channels, height, width = latents.shape
    latents = latents.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(batch, (height // 2) * (width // 2), channels * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    batch, _, packed_channels = tokens.shape
    channels = packed_channels // 4
    latents = tokens.view(batch, height // 2, width // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(batch, channels, height, width)


def flux_image_ids(height: int, width: int, device: torch.device) -> torch.Tensor:
    rows = torch.arange(height // 2, device=device).view(-1, 1).expand(height // 2, width // 2)
    columns = torch.arange(width // 2, device=device).view(1, -1).expand(height // 2, width // 2)
    return torch.stack([torch.zeros_like(rows), rows, columns], dim=-1).reshape(-1, 3).float()


def call_denoiser(family: str, denoiser, latents: torch.Tensor, timesteps: torch.Tensor,
                  hidden: torch.Tensor, pooled: torch.Tensor, image_size: int) -> torch.Tensor:
    """One denoiser call as diffusers' pipeline of that family makes it; timesteps have shape (batch,)
    on the scheduler's scale (0..1000). FLUX latents arrive packed."""
    if family == "unet":
        return denoiser(latents, timesteps, encoder_hidden_states=hidden, return_dict=False)[0]
    if family == "sd3":
        return denoiser(hidden_states=latents, timestep=timesteps, encoder_hidden_states=hidden,
                        pooled_projections=pooled, return_dict=False)[0]
    if family == "flux":
        return denoiser(hidden_states=latents, timestep=timesteps / 1000.0, encoder_hidden_states=hidden,
                        pooled_projections=pooled, img_ids=flux_image_ids(image_size, image_size, latents.device),
                        txt_ids=torch.zeros(hidden.shape[1], 3, device=latents.device), return_dict=False)[0]
    if family == "pixart":
        return denoiser(latents, encoder_hidden_states=hidden, timestep=timesteps,
                        added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
    if family == "wan":
        return denoiser(hidden_states=latents, timestep=timesteps, encoder_hidden_states=hidden, return_dict=False)[0]
    raise ValueError(f"unknown zoo family {family!r}; expected one of {FAMILIES}")


class ZooPipeline(DiffusionPipeline):
    """Prompt-conditioned sampling for a zoo model. The denoiser is `unet` (family "unet") or
    `transformer` (the others) and is accessed only through its forward call, `.dtype` and
    `.device`, so an optimized replacement drops in."""

    model_cpu_offload_seq = "text_encoder->transformer->unet"
    _optional_components = ["unet", "transformer"]

    def __init__(self, text_encoder: AttributeEncoder, scheduler, unet=None, transformer=None, family: str = "unet",
                 image_size: int = 16, num_frames: int = 0, default_guidance_scale: float = 3.0):
        super().__init__()
        if family not in FAMILIES:
            raise ValueError(f"unknown zoo family {family!r}; expected one of {FAMILIES}")
        self.register_modules(text_encoder=text_encoder, scheduler=scheduler, unet=unet, transformer=transformer)
        self.register_to_config(family=family, image_size=image_size, num_frames=num_frames,
                                default_guidance_scale=default_guidance_scale)

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.unet if self.config.family == "unet" else self.transformer

    def latent_shape(self, batch: int) -> tuple[int, ...]:
        size = self.config.image_size
        if self.config.num_frames:
            return (batch, 3, self.config.num_frames, size, size)
        return (batch, 3, size, size)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], num_inference_steps: int = 20, guidance_scale: float | None = None,
                 generator: torch.Generator | None = None, output_type: str = "np", return_dict: bool = True):
        """Sample one image (or video) per prompt. Returns `.images` in [0, 1]: (N, H, W, 3) numpy ("np"),
        PIL images ("pil", images only) or an (N, 3, [F,] H, W) tensor ("pt")."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("prompt must hold at least one prompt")
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
        if output_type not in OUTPUT_TYPES or (output_type == "pil" and self.config.num_frames):
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES} ('pil' for images only), got {output_type!r}")
        guidance_scale = self.config.default_guidance_scale if guidance_scale is None else guidance_scale
        use_guidance = guidance_scale > 1.0
        family, size = self.config.family, self.config.image_size

        denoiser = self.denoiser
        device, dtype = denoiser.device, denoiser.dtype
        latents = randn_tensor(self.latent_shape(len(prompts)), generator=generator, device=device, dtype=dtype)
        latents = latents * getattr(self.scheduler, "init_noise_sigma", 1.0)
        if family == "flux":
            latents = pack_latents(latents)

        hidden, pooled = self.text_encoder.encode(([""] * len(prompts) if use_guidance else []) + prompts)
        hidden, pooled = hidden.to(device, dtype), pooled.to(device, dtype)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        step_options = {"generator": generator} if "generator" in inspect.signature(self.scheduler.step).parameters \
            else {}
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = torch.cat([latents, latents]) if use_guidance else latents
            if hasattr(self.scheduler, "scale_model_input"):  # flow-matching schedulers have none
                model_input = self.scheduler.scale_model_input(model_input, t)
            prediction = call_denoiser(family, denoiser, model_input, t.expand(model_input.shape[0]), hidden, pooled,
                                       size)
            if use_guidance:
                unconditional, conditional = prediction.chunk(2)
                prediction = unconditional + guidance_scale * (conditional - unconditional)
            latents = self.scheduler.step(prediction, t, latents, **step_options, return_dict=False)[0]

        if family == "flux":
            latents = unpack_latents(latents, size, size)
        images = (latents / 2.0 + 0.5).clamp(0.0, 1.0).float().cpu()
        if output_type != "pt":
            images = images.movedim(1, -1).numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
