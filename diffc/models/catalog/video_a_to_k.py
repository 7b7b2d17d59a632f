"""Tiny video denoisers, Allegro to Kandinsky.

The configs follow diffusers' tests/models/transformers/test_models_transformer_*.py (diffusers 0.42.1), shrunk
where a test's sizes were larger than needed. Timesteps are in the range each model's pipeline passes: the
flow-matching pipelines here give the scheduler's t (sigma * 1000), so most entries are DDPM-range.
"""
from __future__ import annotations

import torch
from diffusers import (
    AllegroTransformer3DModel,
    AnyFlowFARTransformer3DModel,
    AnyFlowTransformer3DModel,
    ChronoEditTransformer3DModel,
    CogVideoXTransformer3DModel,
    ConsisIDTransformer3DModel,
    CosmosTransformer3DModel,
    EasyAnimateTransformer3DModel,
    HeliosTransformer3DModel,
    HunyuanVideo15Transformer3DModel,
    HunyuanVideoFramepackTransformer3DModel,
    HunyuanVideoTransformer3DModel,
    JoyImageEditPlusTransformer3DModel,
    JoyImageEditTransformer3DModel,
    Kandinsky5Transformer3DModel,
    Kandinsky6SRTransformer3DModel,
    Kandinsky6Transformer3DModel,
)

from . import FLOW, TinyDenoiser, register, seeded, seeded_randn, timesteps

FRAMES, SIZE, TEXT = 2, 8, 8



def _allegro_inputs(batch: int) -> dict:
    randn = seeded_randn(0)
    return {"hidden_states": randn(batch, 4, FRAMES, SIZE, SIZE), "encoder_hidden_states": randn(batch, TEXT, 8),
            "timestep": timesteps(batch, 500.0)}


register(TinyDenoiser(
    "AllegroTransformer3DModel", "video-dit",
    seeded(lambda: AllegroTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=1,
        cross_attention_dim=16, sample_width=SIZE, sample_height=SIZE, sample_frames=FRAMES, caption_channels=8)),
    _allegro_inputs, latent="hidden_states"))

_ANYFLOW = {"patch_size": (1, 2, 2), "num_attention_heads": 2, "attention_head_dim": 12, "in_channels": 4,
            "out_channels": 4, "text_dim": 16, "freq_dim": 32, "ffn_dim": 32, "num_layers": 2,
            "rope_max_seq_len": 32}


def _anyflow_inputs(batch: int) -> dict:
    # (B, F, C, H, W) latents; the flow-map times t and r are given per frame, shape (B, F).
    randn = seeded_randn(0)
    return {"hidden_states": randn(batch, FRAMES, 4, SIZE, SIZE), "encoder_hidden_states": randn(batch, TEXT, 16),
            "timestep": torch.full((batch, FRAMES), 500.0), "r_timestep": torch.full((batch, FRAMES), 250.0)}


register(TinyDenoiser(
    "AnyFlowTransformer3DModel", "video-dit", seeded(lambda: AnyFlowTransformer3DModel(**_ANYFLOW)),
    _anyflow_inputs, latent="hidden_states", note="timestep and r_timestep are per frame, shape (batch, frames)"))


def _anyflow_far_inputs(batch: int) -> dict:
    return {**_anyflow_inputs(batch), "chunk_partition": [1] * FRAMES}


register(TinyDenoiser(
    "AnyFlowFARTransformer3DModel", "video-dit",
    # Chunks past full_chunk_limit are compressed and left out of the output; 4 keeps doubled frames whole.
    seeded(lambda: AnyFlowFARTransformer3DModel(**_ANYFLOW, compressed_patch_size=(1, 4, 4), full_chunk_limit=4)),
    _anyflow_far_inputs, latent="hidden_states",
    note="causal rollout over one-frame chunks; timestep and r_timestep are per frame, shape (batch, frames)"))


def _chronoedit_inputs(batch: int) -> dict:
    randn = seeded_randn(0)
    return {"hidden_states": randn(batch, 16, FRAMES, SIZE, SIZE), "encoder_hidden_states": randn(batch, TEXT, 32),
            "timestep": timesteps(batch, 500.0)}


register(TinyDenoiser(
    "ChronoEditTransformer3DModel", "video-dit",
    seeded(lambda: ChronoEditTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=64)),
    _chronoedit_inputs, latent="hidden_states"))

_COGVIDEOX = {"num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 4, "out_channels": 4,
              "time_embed_dim": 2, "text_embed_dim": 8, "num_layers": 1, "sample_width": SIZE, "sample_height": SIZE,
              "sample_frames": 5, "patch_size": 2, "temporal_compression_ratio": 4, "max_text_seq_length": TEXT}


def _cogvideox_inputs(batch: int) -> dict:
    # (B, F, C, H, W) latents; the text length is fixed at max_text_seq_length (joint sincos position table).
    randn = seeded_randn(0)
    return {"hidden_states": randn(batch, FRAMES, 4, SIZE, SIZE), "encoder_hidden_states": randn(batch, TEXT, 8),
            "timestep": timesteps(batch, 500.0)}


register(TinyDenoiser(
    "CogVideoXTransformer3DModel", "mmdit", seeded(lambda: CogVideoXTransformer3DModel(**_COGVIDEOX)),
    _cogvideox_inputs, latent="hidden_states", note="text length must equal max_text_seq_length"))


def _consisid_inputs(batch: int) -> dict:
    randn = seeded_randn(0)
    return {**_cogvideox_inputs(batch), "id_cond": randn(batch, 2), "id_vit_hidden": [randn(batch, 2, 2)]}


register(TinyDenoiser(
    "ConsisIDTransformer3DModel", "mmdit",
    seeded(lambda: ConsisIDTransformer3DModel(
        **_COGVIDEOX, cross_attn_interval=1, is_kps=False, is_train_face=True, cross_attn_dim_head=8,
        cross_attn_num_heads=1, LFE_id_dim=2, LFE_vit_dim=2, LFE_depth=1, LFE_dim_head=8, LFE_num_heads=2,
        # The face tokens are the perceiver's keys of width int(2/3 * inner_dim) = 10.
        LFE_num_id_token=1, LFE_num_querie=1, LFE_output_dim=10, LFE_ff_mult=1, LFE_num_scale=1)),
    _consisid_inputs, latent="hidden_states", note="text length must equal max_text_seq_length"))


def _cosmos_inputs(batch: int) -> dict:
    randn = seeded_randn(0)
    return {"hidden_states": randn(batch, 4, FRAMES, SIZE, SIZE), "encoder_hidden_states": randn(batch, TEXT, 16),
            "timestep": timesteps(batch, 0.5), "attention_mask": torch.ones(batch, TEXT), "fps": 24}


register(TinyDenoiser(
    "CosmosTransformer3DModel", "video-dit",
    seeded(lambda: CosmosTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=2, mlp_ratio=2,
        text_embed_dim=16, adaln_lora_dim=4, max_size=(4, 32, 32), patch_size=(1, 2, 2),
        # The padding-mask channel is resized with torchvision, which the environment does not have.
        concat_padding_mask=False)),
    # Cosmos 2 pipelines pass sigma / (sigma + 1); Cosmos 1 passed the EDM c_noise.
    _cosmos_inputs, latent="hidden_states", timestep_kind=FLOW, note="built without the padding-mask channel"))


def _easyanimate_inputs(batch: int) -> dict:
    randn = seeded_randn(0)
    return {"hidden_states": randn(batch, 4, FRAMES, SIZE, SIZE), "encoder_hidden_states": randn(batch, TEXT, 16),
            "timestep": timesteps(batch, 500.0)}


register(TinyDenoiser(
    "EasyAnimateTransformer3DModel", "mmdit",
    seeded(lambda: EasyAnimateTransformer3DModel(
        attention_head_dim=16, num_attention_heads=2, in_channels=4, out_channels=4, mmdit_layers=1, num_layers=2,
        patch_size=2, text_embed_dim=16, time_embed_dim=8)),
    _easyanimate_inputs, latent="hidden_states"))


def _helios_inputs(batch: int) -> dict:
    # Helios denoises a chunk of frames given short/mid/long histories of clean latents and their frame indices.
    randn = seeded_randn(0)
    history = FRAMES + torch.arange(7.0)
    return {"hidden_states": randn(batch, 4, FRAMES, SIZE, SIZE), "encoder_hidden_states": randn(batch, TEXT, 16),
            "timestep": timesteps(batch, 500.0),
            "indices_hidden_states": torch.arange(float(FRAMES)).repeat(batch, 1),
            "indices_latents_history_short": history[:1].repeat(batch, 1),
            "indices_latents_history_mid": history[1:3].repeat(batch, 1),
            "indices_latents_history_long": history[3:7].repeat(batch, 1),
            "latents_history_short": randn(batch, 4, 1, SIZE, SIZE),
            "latents_history_mid": randn(batch, 4, 2, SIZE, SIZE),
            "latents_history_long": randn(batch, 4, 4, SIZE, SIZE)}


register(TinyDenoiser(
    "HeliosTransformer3DModel", "video-dit",
    seeded(lambda: HeliosTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2, rope_dim=(4, 4, 4))),
    _helios_inputs, latent="hidden_states"))


def _hunyuan15_inputs(batch: int) -> dict:
    # All-zero image embeddings select text-to-video.
    randn = seeded_randn(0)
    return {"hidden_states": randn(batch, 4, FRAMES, SIZE, SIZE), "timestep": timesteps(batch, 500.0),
            "encoder_hidden_states": randn(batch, TEXT, 16), "encoder_attention_mask": torch.ones(batch, TEXT),
            "encoder_hidden_states_2": randn(batch, 4, 8), "encoder_attention_mask_2": torch.ones(batch, 4),
            "image_embeds": torch.zeros(batch, 3, 12)}


register(TinyDenoiser(
    "HunyuanVideo15Transformer3DModel", "mmdit",
    seeded(lambda: HunyuanVideo15Transformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=16, text_embed_2_dim=8,
        image_embed_dim=12, rope_axes_dim=(2, 2, 4), target_size=16, task_type="t2v")),
    _hunyuan15_inputs, latent="hidden_states",
    note="~4.3M parameters: the ByT5 text projection has a fixed 2048-wide hidden layer"))

_HUNYUAN = {"in_channels": 4, "out_channels": 4, "num_attention_heads": 2, "attention_head_dim": 10, "num_layers": 1,
            "num_single_layers": 1, "num_refiner_layers": 1, "patch_size": 2, "patch_size_t": 1,
            "guidance_embeds": True, "text_embed_dim": 16, "pooled_projection_dim": 8, "rope_axes_dim": (2, 4, 4)}


def _hunyuan_inputs(batch: int) -> dict:
    # The pipelines pass the distilled guidance scale times 1000.
    randn = seeded_randn(0)
    return {"hidden_states": randn(batch, 4, FRAMES, SIZE, SIZE), "timestep": timesteps(batch, 500.0),
            "encoder_hidden_states": randn(batch, TEXT, 16), "encoder_attention_mask": torch.ones(batch, TEXT),
            "pooled_projections": randn(batch, 8), "guidance": timesteps(batch, 6000.0)}


register(TinyDenoiser(
    "HunyuanVideoTransformer3DModel", "flux-like", seeded(lambda: HunyuanVideoTransformer3DModel(**_HUNYUAN)),
    _hunyuan_inputs, latent="hidden_states"))


def _framepack_inputs(batch: int) -> dict:
    # Frame indices of the section being denoised and of its clean / 2x / 4x-compressed context are not batched.
    randn = seeded_randn(0)
    return {**_hunyuan_inputs(batch), "image_embeds": randn(batch, 4, 16),
            "indices_latents": torch.arange(1, 1 + FRAMES),
            "latents_clean": randn(batch, 4, 2, SIZE, SIZE), "indices_latents_clean": torch.tensor([0, 1 + FRAMES]),
            "latents_history_2x": randn(batch, 4, 2, SIZE, SIZE),
            "indices_latents_history_2x": torch.arange(2 + FRAMES, 4 + FRAMES),
            "latents_history_4x": randn(batch, 4, 8, SIZE, SIZE),
            "indices_latents_history_4x": torch.arange(4 + FRAMES, 12 + FRAMES)}


register(TinyDenoiser(
    "HunyuanVideoFramepackTransformer3DModel", "flux-like",
    seeded(lambda: HunyuanVideoFramepackTransformer3DModel(
        **_HUNYUAN, has_image_proj=True, image_proj_dim=16, has_clean_x_embedder=True)),
    _framepack_inputs, latent="hidden_states"))

_JOYIMAGE = {"patch_size": [1, 2, 2], "in_channels": 16, "hidden_size": 32, "num_attention_heads": 2, "text_dim": 16,
             "num_layers": 2, "rope_dim_list": [4, 6, 6], "theta": 256}


def _joyimage_inputs(batch: int) -> dict:
    # (B, items, C, F, H, W): the edit pipeline stacks the reference image latents before the target.
    randn = seeded_randn(0)
    return {"hidden_states": randn(batch, 2, 16, 1, SIZE, SIZE), "encoder_hidden_states": randn(batch, TEXT, 16),
            "timestep": timesteps(batch, 500.0)}


register(TinyDenoiser(
    "JoyImageEditTransformer3DModel", "mmdit", seeded(lambda: JoyImageEditTransformer3DModel(**_JOYIMAGE)),
    _joyimage_inputs, latent="hidden_states", channel_dim=2,
    note="latent (batch, items, C, frames, H, W): item 0 is the reference image, item 1 the target"))


def _joyimage_plus_inputs(batch: int) -> dict:
    # Pre-patchified tokens (B, patches, C, 1, 2, 2) of the target then one reference image, each 4x4 patches.
    randn = seeded_randn(0)
    grid = (1, SIZE // 2, SIZE // 2)
    return {"hidden_states": randn(batch, 2 * (SIZE // 2) ** 2, 16, 1, 2, 2),
            "encoder_hidden_states": randn(batch, TEXT, 16), "encoder_hidden_states_mask": torch.ones(batch, TEXT),
            "timestep": timesteps(batch, 500.0), "shape_list": [[grid, grid]] * batch}


register(TinyDenoiser(
    "JoyImageEditPlusTransformer3DModel", "mmdit",
    seeded(lambda: JoyImageEditPlusTransformer3DModel(**_JOYIMAGE)),
    _joyimage_plus_inputs, latent="hidden_states", channel_dim=2,
    note="latent is patchified tokens (batch, patches, C, pt, ph, pw); shape_list gives each image's patch grid"))


def _kandinsky5_inputs(batch: int) -> dict:
    # (B, F, H, W, C) latents; rotary positions of the patch grid and of the text tokens are not batched.
    randn = seeded_randn(0)
    return {"hidden_states": randn(batch, FRAMES, SIZE, SIZE, 4), "encoder_hidden_states": randn(batch, TEXT, 16),
            "pooled_projections": randn(batch, 8), "timestep": timesteps(batch, 500.0),
            "visual_rope_pos": [torch.arange(FRAMES), torch.arange(SIZE // 2), torch.arange(SIZE // 2)],
            "text_rope_pos": torch.arange(TEXT)}


register(TinyDenoiser(
    "Kandinsky5Transformer3DModel", "video-dit",
    seeded(lambda: Kandinsky5Transformer3DModel(
        in_visual_dim=4, out_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16, patch_size=(1, 2, 2),
        model_dim=32, ff_dim=64, num_text_blocks=1, num_visual_blocks=1, axes_dims=(4, 6, 6))),
    _kandinsky5_inputs, latent="hidden_states", channel_dim=-1))


def _kandinsky6_inputs(batch: int) -> dict:
    randn = seeded_randn(0)
    return {"hidden_states": randn(batch, FRAMES, SIZE, SIZE, 4), "encoder_hidden_states": randn(batch, TEXT, 8),
            "pooled_projections": randn(batch, 8), "timestep": timesteps(batch, 500.0)}


register(TinyDenoiser(
    "Kandinsky6Transformer3DModel", "video-dit",
    seeded(lambda: Kandinsky6Transformer3DModel(
        in_visual_dim=4, out_visual_dim=4, in_text_dim=8, in_text_dim2=8, time_dim=16, patch_size=(1, 2, 2),
        model_dim=48, ff_dim=64, num_text_blocks=1, num_visual_blocks=1, axes_dims=(4, 4, 4), visual_cond=False,
        in_audio_dim=4, out_audio_dim=4)),
    _kandinsky6_inputs, latent="hidden_states", channel_dim=-1))


def _kandinsky6_sr_inputs(batch: int) -> dict:
    # (B, F, H, W, 2C+1): noisy latent, anchor latent and anchor mask; NABLA needs a token grid divisible by 8.
    randn = seeded_randn(0)
    return {"hidden_states": randn(batch, FRAMES, 16, 16, 9), "timestep": timesteps(batch, 500.0)}


register(TinyDenoiser(
    "Kandinsky6SRTransformer3DModel", "dit",
    # out_visual_dim is free (the PiFlow checkpoints widen it); 2 * 4 + 1 makes the output match the latent.
    seeded(lambda: Kandinsky6SRTransformer3DModel(
        in_visual_dim=4, out_visual_dim=9, time_dim=16, patch_size=(1, 2, 2), model_dim=24, ff_dim=32,
        num_visual_blocks=2, axes_dims=(4, 4, 4))),
    _kandinsky6_sr_inputs, latent="hidden_states", channel_dim=-1,
    note="latent (batch, frames, H, W, 2C+1) holds the noisy latent, anchor latent and anchor mask"))
