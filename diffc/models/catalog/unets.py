"""Tiny configs of diffusers' UNet denoisers (image, video, 1-D).

The configs follow diffusers' tests/models/unets and the UNets of its pipeline tests (tests/pipelines/...,
diffusers 0.42.1), with widths of 16-64 and one layer per block.
"""
from __future__ import annotations

import torch
from diffusers import (
    DreamLiteUNetModel,
    I2VGenXLUNet,
    Kandinsky3UNet,
    StableCascadeUNet,
    UNet1DModel,
    UNet2DConditionModel,
    UNet2DModel,
    UNet3DConditionModel,
    UNetControlNetXSModel,
    UNetMotionModel,
    UNetSpatioTemporalConditionModel,
)

from . import FLOW, TinyDenoiser, register, seeded, seeded_randn, timesteps

_TEXT = 8  # text sequence length
_FRAMES = 2



def _unet1d(batch: int) -> dict:
    randn = seeded_randn(0)
    return {"sample": randn(batch, 14, 16), "timestep": timesteps(batch)}


register(TinyDenoiser(
    "UNet1DModel", "unet", latent="sample",
    build=seeded(lambda: UNet1DModel(
        block_out_channels=(8, 8, 16, 16), in_channels=14, out_channels=14, time_embedding_type="positional",
        use_timestep_embedding=True, flip_sin_to_cos=False, freq_shift=1.0, out_block_type="OutConv1DBlock",
        mid_block_type="MidResTemporalBlock1D", down_block_types=("DownResnetBlock1D",) * 4,
        up_block_types=("UpResnetBlock1D",) * 3, act_fn="swish")),
    inputs=_unet1d))


def _unet2d(batch: int) -> dict:
    randn = seeded_randn(0)
    return {"sample": randn(batch, 4, 8, 8), "timestep": timesteps(batch)}


register(TinyDenoiser(
    "UNet2DModel", "unet", latent="sample",
    build=seeded(lambda: UNet2DModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        norm_num_groups=8, attention_head_dim=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"))),
    inputs=_unet2d))


def _unet2d_condition(batch: int) -> dict:
    randn = seeded_randn(0)
    return {"sample": randn(batch, 4, 8, 8), "timestep": timesteps(batch), "encoder_hidden_states": randn(batch, _TEXT, 16)}


# attention_head_dim is the number of heads in the SD-style UNets (diffusers keeps the historical name)
register(TinyDenoiser(
    "UNet2DConditionModel", "unet", latent="sample",
    build=seeded(lambda: UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        norm_num_groups=8, cross_attention_dim=16, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))),
    inputs=_unet2d_condition))


def _unet3d_condition(batch: int) -> dict:
    randn = seeded_randn(0)
    return {"sample": randn(batch, 4, _FRAMES, 8, 8), "timestep": timesteps(batch),
            "encoder_hidden_states": randn(batch, _TEXT, 16)}


register(TinyDenoiser(
    "UNet3DConditionModel", "unet-video", latent="sample",
    build=seeded(lambda: UNet3DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        norm_num_groups=8, cross_attention_dim=16, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"))),
    inputs=_unet3d_condition))


def _controlnet_xs(batch: int) -> dict:
    randn = seeded_randn(0)
    # the control image is at pixel scale: conditioning_embedding_out_channels (4, 4) downsamples it 2x
    return {"sample": randn(batch, 4, 8, 8), "timestep": timesteps(batch), "encoder_hidden_states": randn(batch, _TEXT, 16),
            "controlnet_cond": randn(batch, 3, 16, 16), "conditioning_scale": 1.0}


register(TinyDenoiser(
    "UNetControlNetXSModel", "unet", latent="sample",
    build=seeded(lambda: UNetControlNetXSModel(
        sample_size=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(16, 32), cross_attention_dim=16,
        transformer_layers_per_block=1, num_attention_heads=2, norm_num_groups=8, upcast_attention=False,
        ctrl_block_out_channels=(8, 16), ctrl_num_attention_heads=2, ctrl_max_norm_num_groups=4,
        ctrl_conditioning_embedding_out_channels=(4, 4))),
    inputs=_controlnet_xs))


def _motion(batch: int) -> dict:
    randn = seeded_randn(0)
    # the model folds frames into the batch and does not repeat the text itself: AnimateDiff passes it per frame
    text = randn(batch, _TEXT, 16).repeat_interleave(_FRAMES, dim=0)
    return {"sample": randn(batch, 4, _FRAMES, 8, 8), "timestep": timesteps(batch), "encoder_hidden_states": text}


register(TinyDenoiser(
    "UNetMotionModel", "unet-video", latent="sample",
    note="encoder_hidden_states has batch * frames rows (each prompt repeated per frame)",
    build=seeded(lambda: UNetMotionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        norm_num_groups=8, cross_attention_dim=16, num_attention_heads=2, motion_num_attention_heads=2,
        down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
        up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion"))),
    inputs=_motion))


def _svd(batch: int) -> dict:
    randn = seeded_randn(0)
    # added_time_ids: fps, motion bucket id, noise augmentation strength
    return {"sample": randn(batch, _FRAMES, 4, 8, 8), "timestep": timesteps(batch, 0.5),
            "encoder_hidden_states": randn(batch, 1, 32),
            "added_time_ids": torch.tensor([[6.0, 127.0, 0.02]]).repeat(batch, 1)}


# GroupNorm is fixed at 32 groups in the spatio-temporal blocks, so widths are multiples of 32
register(TinyDenoiser(
    "UNetSpatioTemporalConditionModel", "unet-video", latent="sample", timestep_kind=FLOW,
    note="latent is (B, F, C, H, W); the timestep is EDM's c_noise = ln(sigma) / 4 (about -1.6..1.6); the real model"
         " takes the conditioning frames concatenated on channels (in_channels 8), here in_channels 4 as in the tests",
    build=seeded(lambda: UNetSpatioTemporalConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        cross_attention_dim=32, num_attention_heads=(2, 4), addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=24, num_frames=_FRAMES,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"))),
    inputs=_svd))


def _i2vgen(batch: int) -> dict:
    randn = seeded_randn(0)
    # the image's latent as the first frame, zeros after it (as the pipeline builds it)
    image = torch.cat([randn(batch, 4, 1, 8, 8), torch.zeros(batch, 4, _FRAMES - 1, 8, 8)], dim=2)
    return {"sample": randn(batch, 4, _FRAMES, 8, 8), "timestep": timesteps(batch), "fps": torch.full((batch,), 16.0),
            "image_latents": image, "image_embeddings": randn(batch, 16),
            "encoder_hidden_states": randn(batch, _TEXT, 16)}


register(TinyDenoiser(
    "I2VGenXLUNet", "unet-video", latent="sample",
    build=seeded(lambda: I2VGenXLUNet(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        norm_num_groups=8, cross_attention_dim=16, attention_head_dim=8, num_attention_heads=None,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"))),
    inputs=_i2vgen))


def _kandinsky3(batch: int) -> dict:
    randn = seeded_randn(0)
    return {"sample": randn(batch, 4, 8, 8), "timestep": timesteps(batch), "encoder_hidden_states": randn(batch, _TEXT, 16),
            "encoder_attention_mask": torch.ones(batch, _TEXT)}


# layers_per_block=1 fails in diffusers (a channel mismatch in the up blocks), so 2
register(TinyDenoiser(
    "Kandinsky3UNet", "unet", latent="sample",
    build=seeded(lambda: Kandinsky3UNet(
        in_channels=4, time_embedding_dim=16, groups=4, attention_head_dim=8, layers_per_block=2,
        block_out_channels=(16, 32), cross_attention_dim=16, encoder_hid_dim=16)),
    inputs=_kandinsky3))


def _stable_cascade(batch: int) -> dict:
    randn = seeded_randn(0)
    return {"sample": randn(batch, 16, 8, 8), "timestep_ratio": timesteps(batch, 0.5),
            "clip_text_pooled": randn(batch, 1, 32), "clip_text": randn(batch, _TEXT, 32),
            "clip_img": randn(batch, 1, 32)}


# the Stable Cascade prior (stage C): timestep_ratio is the fraction of the schedule left, in [0, 1]
register(TinyDenoiser(
    "StableCascadeUNet", "unet", latent="sample", timestep="timestep_ratio", timestep_kind=FLOW,
    build=seeded(lambda: StableCascadeUNet(
        in_channels=16, out_channels=16, conditioning_dim=32, block_out_channels=(32, 32),
        num_attention_heads=(2, 2), down_num_layers_per_block=(1, 1), up_num_layers_per_block=(1, 1),
        switch_level=(False,), clip_text_in_channels=32, clip_text_pooled_in_channels=32,
        clip_image_in_channels=32)),
    inputs=_stable_cascade))


def _dreamlite(batch: int) -> dict:
    randn = seeded_randn(0)
    # time_ids: the original (height, width)
    return {"sample": randn(batch, 4, 8, 16), "timestep": timesteps(batch), "encoder_hidden_states": randn(batch, _TEXT, 12),
            "encoder_attention_mask": torch.ones(batch, _TEXT),
            "added_cond_kwargs": {"time_ids": torch.tensor([[64.0, 64.0]]).repeat(batch, 1)}}


register(TinyDenoiser(
    "DreamLiteUNetModel", "unet", latent="sample",
    note="sample is the [latent | condition image] diptych along width; the pipeline keeps the left half",
    build=seeded(lambda: DreamLiteUNetModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DreamLiteCrossAttnNoSelfAttnDownBlock2D", "DreamLiteCrossAttnDownBlock2D"),
        up_block_types=("DreamLiteCrossAttnUpBlock2D", "DreamLiteUpBlock2D"), cross_attention_dim=16,
        attention_head_dim=8, norm_num_groups=8, transformer_layers_per_block=1, encoder_hid_dim=12,
        encoder_hid_dim_type="text_proj_rms", addition_embed_type="time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=16)),
    inputs=_dreamlite))
