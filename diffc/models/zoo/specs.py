"""What each zoo model is: its denoiser family and size, data, prediction type and sampler.

The zoo differs from the shipped digits models on purpose: RGB procedural data with prompts read
by a sequence encoder, five denoiser families (cross-attention UNet, SD3.5-style joint attention
with qk-norm and a dual-attention layer, FLUX double/single streams, PixArt, Wan video), three
prediction types and four samplers.
"""

from dataclasses import dataclass
from typing import Any, Callable

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
    WanTransformer3DModel,
)

from .data import Dataset, dataset

TEXT_DIM = 64
NUM_TRAIN_TIMESTEPS = 1000


@dataclass(frozen=True)
class ZooSpec:
    name: str
    family: str  # a key of pipeline.FAMILIES
    data: str  # a key of data.DATASETS
    prediction: str  # "epsilon", "v_prediction" or "flow"
    sampler: str  # what the scheduler is, in words (the README's table)
    build_denoiser: Callable[[Dataset], Any]
    build_scheduler: Callable[[], Any]
    guidance_scale: float
    train_steps: int
    batch_size: int = 32
    learning_rate: float = 1e-3

    @property
    def dataset(self) -> Dataset:
        return dataset(self.data)

    @property
    def denoiser_attribute(self) -> str:
        return "unet" if self.family == "unet" else "transformer"


def _unet_v(data: Dataset) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=data.image_size, in_channels=3, out_channels=3, block_out_channels=(32, 64),
        layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=TEXT_DIM, attention_head_dim=8,
        norm_num_groups=8,
    )


def _unet_eps(data: Dataset) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=data.image_size, in_channels=3, out_channels=3, block_out_channels=(16, 32, 48),
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=TEXT_DIM,
        attention_head_dim=4, norm_num_groups=8, transformer_layers_per_block=1,
    )


def _sd3(data: Dataset) -> SD3Transformer2DModel:
    # pos_embed_max_size above the latent grid (8 patches), so a larger probe shape stays valid
    return SD3Transformer2DModel(
        sample_size=data.image_size, patch_size=2, in_channels=3, out_channels=3, num_layers=4,
        attention_head_dim=16, num_attention_heads=4, joint_attention_dim=TEXT_DIM, caption_projection_dim=64,
        pooled_projection_dim=TEXT_DIM, pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm",
    )


def _flux(data: Dataset) -> FluxTransformer2DModel:
    return FluxTransformer2DModel(
        patch_size=1, in_channels=12, out_channels=12, num_layers=2, num_single_layers=4, attention_head_dim=16,
        num_attention_heads=4, joint_attention_dim=TEXT_DIM, pooled_projection_dim=TEXT_DIM, guidance_embeds=False,
        axes_dims_rope=(4, 6, 6),
    )


def _pixart(data: Dataset) -> PixArtTransformer2DModel:
    return PixArtTransformer2DModel(
        num_attention_heads=6, attention_head_dim=16, in_channels=3, out_channels=3, num_layers=6,
        cross_attention_dim=96, sample_size=data.image_size, patch_size=4, caption_channels=TEXT_DIM,
        use_additional_conditions=False, norm_num_groups=8,
    )


def _wan(data: Dataset) -> WanTransformer3DModel:
    return WanTransformer3DModel(
        patch_size=(2, 4, 4), num_attention_heads=8, attention_head_dim=16, in_channels=3, out_channels=3,
        text_dim=TEXT_DIM, freq_dim=64, ffn_dim=384, num_layers=6, rope_max_seq_len=64,
    )


def _dpm_solver_v() -> DPMSolverMultistepScheduler:
    return DPMSolverMultistepScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_schedule="squaredcos_cap_v2",
                                       prediction_type="v_prediction", algorithm_type="dpmsolver++", solver_order=2,
                                       timestep_spacing="trailing")


# Stable Diffusion's noise schedule and step spacing, for the epsilon models: with the cosine schedule
# the last alpha_bar is ~0, and an epsilon model's first x0 estimate divides by its root
SD_BETAS = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


def _unipc_eps() -> UniPCMultistepScheduler:
    return UniPCMultistepScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, **SD_BETAS, prediction_type="epsilon",
                                   timestep_spacing="leading", steps_offset=1)


def _ddim_eps() -> DDIMScheduler:
    return DDIMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, **SD_BETAS, prediction_type="epsilon",
                         clip_sample=False, set_alpha_to_one=False, timestep_spacing="leading", steps_offset=1)


def _flow_euler(shift: float) -> Callable[[], FlowMatchEulerDiscreteScheduler]:
    return lambda: FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=shift)


def _unipc_flow() -> UniPCMultistepScheduler:
    return UniPCMultistepScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, prediction_type="flow_prediction",
                                   use_flow_sigmas=True, flow_shift=2.0)


ZOO = {
    spec.name: spec
    for spec in (
        ZooSpec("shapes-unet", "unet", "shapes", "v_prediction", "DPM-Solver++ 2M", _unet_v, _dpm_solver_v, 3.0,
                train_steps=2000),
        ZooSpec("textures-unet", "unet", "textures", "epsilon", "UniPC (bh2)", _unet_eps, _unipc_eps, 3.0,
                train_steps=4500),
        ZooSpec("compositions-sd3", "sd3", "compositions", "flow", "flow-matching Euler, shift 2", _sd3,
                _flow_euler(2.0), 3.0, train_steps=8000),
        ZooSpec("shapes-flux", "flux", "shapes", "flow", "flow-matching Euler, shift 1", _flux, _flow_euler(1.0), 3.0,
                train_steps=3000),
        ZooSpec("textures-pixart", "pixart", "textures-32", "epsilon", "DDIM", _pixart, _ddim_eps, 3.0,
                train_steps=12000),
        ZooSpec("motion-wan", "wan", "motion", "flow", "UniPC (flow, shift 2)", _wan, _unipc_flow, 3.0,
                train_steps=12000),
    )
}


def spec(name: str) -> ZooSpec:
    if name not in ZOO:
        raise ValueError(f"unknown zoo model {name!r}; the zoo holds {sorted(ZOO)}")
    return ZOO[name]
