"""The video denoisers L to Z (LTX, Latte, MiniMax-H3, Mochi, Motif, Sana video, SkyReels, Wan) at tiny configs.

The configs follow diffusers' tests/models/transformers/test_models_transformer_<name>.py (diffusers 0.42.1), with
fewer layers where that still covers every block kind. The inputs are one denoising call as the class's pipeline
makes it: video latents of 2 frames at 8x8 in the layout the class takes, 8 text tokens, and the timestep in the
range the pipeline passes (the flow-matching pipelines here pass sigma * 1000, so DDPM-range 500 except MiniMax-H3).
"""
from __future__ import annotations

import torch
from diffusers import (
    LatteTransformer3DModel,
    LTX2VideoTransformer3DModel,
    LTXVideoTransformer3DModel,
    MiniMaxH3Transformer3DModel,
    MochiTransformer3DModel,
    MotifVideoTransformer3DModel,
    SanaVideoTransformer3DModel,
    SanaWMLTX2RefinerTransformer3DModel,
    SanaWMTransformer3DModel,
    SkyReelsV2Transformer3DModel,
    WanAnimate2Transformer3DModel,
    WanAnimateTransformer3DModel,
    WanTransformer3DModel,
    WanVACETransformer3DModel,
)
from diffusers.models.transformers.transformer_sana_wm_refiner import SanaWMLTX2AudioVideoRotaryPosEmbed
from diffusers.models.transformers.transformer_wan_animate_2 import WanAnimate2KVCache

from . import DDPM, FLOW, TinyDenoiser, register, seeded, seeded_randn, timesteps

_FRAMES, _SIZE, _TEXT = 2, 8, 8



def _video(randn, batch: int, channels: int, frames: int = _FRAMES) -> torch.Tensor:
    return randn(batch, channels, frames, _SIZE, _SIZE)


# Wan and its descendants: (B, C, F, H, W) latents, text by cross attention, timesteps in the 0..1000 range.
_WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
            text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32)


def _wan_inputs(batch: int) -> dict:
    randn = seeded_randn(0)
    return {"hidden_states": _video(randn, batch, 4), "timestep": timesteps(batch),
            "encoder_hidden_states": randn(batch, _TEXT, 16)}


register(TinyDenoiser(
    "WanTransformer3DModel", "video-dit", seeded(lambda: WanTransformer3DModel(**_WAN)), _wan_inputs,
    latent="hidden_states", timestep_kind=DDPM))

register(TinyDenoiser(
    "SkyReelsV2Transformer3DModel", "video-dit", seeded(lambda: SkyReelsV2Transformer3DModel(**_WAN)), _wan_inputs,
    latent="hidden_states", timestep_kind=DDPM))


def _wan_vace_inputs(batch: int) -> dict:
    randn = seeded_randn(0)
    return {**_wan_inputs(batch), "control_hidden_states": _video(randn, batch, 12)}


register(TinyDenoiser(
    "WanVACETransformer3DModel", "video-dit",
    seeded(lambda: WanVACETransformer3DModel(**{**_WAN, "vace_layers": [0], "vace_in_channels": 12})),
    _wan_vace_inputs, latent="hidden_states", timestep_kind=DDPM))


# Wan-Animate's hidden_states is the noisy latent (4 channels) with the reference latent and its mask concatenated
# (in_channels = 2 * latent_channels + 4 is enforced); out_channels = in_channels keeps the output the latent's shape.
def _wan_animate_inputs(batch: int) -> dict:
    randn = seeded_randn(0)
    frames = 3  # a reference frame and 2 pose-driven ones; the face video has 4 * 2 - 3 frames, as the pipeline cuts it
    return {"hidden_states": _video(randn, batch, 12, frames), "timestep": timesteps(batch),
            "encoder_hidden_states": randn(batch, _TEXT, 16), "encoder_hidden_states_image": randn(batch, 4, 16),
            "pose_hidden_states": _video(randn, batch, 4, frames - 1),
            "face_pixel_values": randn(batch, 3, 4 * (frames - 1) - 3, 16, 16)}


register(TinyDenoiser(
    "WanAnimateTransformer3DModel", "video-dit",
    seeded(lambda: WanAnimateTransformer3DModel(**{
        **_WAN, "in_channels": 12, "latent_channels": 4, "out_channels": 12, "image_dim": 16,
        "motion_encoder_channel_sizes": {"4": 16, "8": 16, "16": 16}, "motion_encoder_size": 16,
        "motion_style_dim": 8, "motion_dim": 4, "motion_encoder_dim": 16, "face_encoder_hidden_dim": 16,
        "face_encoder_num_heads": 2, "inject_face_latents_blocks": 2})),
    _wan_animate_inputs, latent="hidden_states", timestep_kind=DDPM,
    note="hidden_states carries 8 conditioning channels after the 4 latent ones; out_channels widened to match"))


# Wan-Animate-2's denoising pass (kv_cache_mode="cached") attends the generation tokens jointly with the reference
# video's K/V, which a reference pass ("extract") leaves in the cache; here the cache holds random pre-RoPE K/V of
# that shape. The reference is 2 latent frames, the generation stream one more (the reference image's slot); the
# in-context block mask is built over the full video, origin_len pixel frames of origin_area pixels. The class takes
# per-sample lists; batched tensors iterate the same way, and the sample comes back as a list of per-sample tensors.
# Its CLIP image projection is 1280 wide whatever the config (most of the model's 1.7 M parameters).
_WA2_HEADS, _WA2_DIM = 2, 32


def _wan_animate_2_inputs(batch: int) -> dict:
    randn = seeded_randn(0)
    grid, frames = _SIZE // 2, _FRAMES + 1
    cache = WanAnimate2KVCache(2)
    for layer in range(2):
        shape = (batch, _FRAMES * grid * grid, _WA2_HEADS, _WA2_DIM // _WA2_HEADS)
        cache.get(layer).store(randn(*shape), randn(*shape))
    return {"hidden_states": _video(randn, batch, 4, frames), "timestep": timesteps(batch),
            "encoder_hidden_states": randn(batch, _TEXT, 16), "condition_latents": _video(randn, batch, 4, frames),
            "encoder_hidden_states_image": randn(batch, 4, 1280), "kv_cache": cache, "kv_cache_mode": "cached",
            "seq_len": frames * grid * grid, "reference_grid_sizes": torch.tensor([[_FRAMES, grid, grid]] * batch),
            "origin_len": 4 * (_FRAMES - 1) + 1, "origin_area": [8 * _SIZE, 8 * _SIZE]}


register(TinyDenoiser(
    "WanAnimate2Transformer3DModel", "other",
    seeded(lambda: WanAnimate2Transformer3DModel(
        patch_size=(1, 2, 2), text_len=16, in_dim=8, dim=_WA2_DIM, ffn_dim=32, freq_dim=32, text_dim=16, out_dim=4,
        num_heads=_WA2_HEADS, num_layers=2)),
    _wan_animate_2_inputs, latent="hidden_states", timestep_kind=DDPM,
    note="sample is a list of per-sample (C, F, H, W) tensors; the first call compiles the flex-attention block mask"))


# LTX takes the latent packed into tokens, (B, F*H*W, C) at patch size 1, with the grid size as extra arguments.
def _ltx_inputs(batch: int) -> dict:
    randn = seeded_randn(0)
    return {"hidden_states": randn(batch, _FRAMES * _SIZE * _SIZE, 4), "encoder_hidden_states": randn(batch, _TEXT, 16),
            "timestep": timesteps(batch), "encoder_attention_mask": torch.ones(batch, _TEXT),
            "num_frames": _FRAMES, "height": _SIZE, "width": _SIZE}


register(TinyDenoiser(
    "LTXVideoTransformer3DModel", "video-dit",
    seeded(lambda: LTXVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2,
                                              attention_head_dim=8, cross_attention_dim=16, num_layers=1,
                                              caption_channels=16)),
    _ltx_inputs, latent="hidden_states", timestep_kind=DDPM, channel_dim=2))


# LTX-2 denoises video and audio together; the video tokens are the latent, the audio stream is conditioning here.
_LTX2 = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
             audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2, audio_attention_head_dim=4,
             audio_cross_attention_dim=8, num_layers=1, caption_channels=16, rope_double_precision=False)


def _ltx2_inputs(batch: int) -> dict:
    randn = seeded_randn(0)
    return {"hidden_states": randn(batch, _FRAMES * _SIZE * _SIZE, 4), "audio_hidden_states": randn(batch, 4, 4),
            "encoder_hidden_states": randn(batch, _TEXT, 16), "audio_encoder_hidden_states": randn(batch, _TEXT, 16),
            "timestep": timesteps(batch), "encoder_attention_mask": torch.ones(batch, _TEXT),
            "audio_encoder_attention_mask": torch.ones(batch, _TEXT), "num_frames": _FRAMES, "height": _SIZE,
            "width": _SIZE, "audio_num_frames": 4, "fps": 25.0}


register(TinyDenoiser(
    "LTX2VideoTransformer3DModel", "video-dit",
    seeded(lambda: LTX2VideoTransformer3DModel(**_LTX2)),
    _ltx2_inputs, latent="hidden_states", timestep_kind=DDPM, channel_dim=2))


# The SANA-WM refiner is video-only LTX-2 that takes its RoPE from the caller (absolute frame positions of the
# autoregressive block); the pipeline's per-token timestep is one value per row here, which the class broadcasts.
# It builds LTX-2's audio modules too (unused by its forward), so it takes LTX-2's config; the RoPE below is the one
# its own `rope` (heads * head_dim wide, LTX-2's default grid) gives frames 0..F-1.
def _refiner_inputs(batch: int) -> dict:
    randn = seeded_randn(0)
    rope = SanaWMLTX2AudioVideoRotaryPosEmbed(dim=16, base_num_frames=20, base_height=2048, base_width=2048,
                                              scale_factors=(8, 32, 32), modality="video", double_precision=False,
                                              num_attention_heads=2)
    coords = rope.prepare_video_coords(batch, _FRAMES, _SIZE, _SIZE, torch.device("cpu"), fps=24.0)
    return {"hidden_states": randn(batch, _FRAMES * _SIZE * _SIZE, 4), "encoder_hidden_states": randn(batch, _TEXT, 16),
            "timestep": timesteps(batch), "video_rotary_emb": rope(coords, device=torch.device("cpu")),
            "encoder_attention_mask": torch.ones(batch, _TEXT)}


register(TinyDenoiser(
    "SanaWMLTX2RefinerTransformer3DModel", "video-dit",
    seeded(lambda: SanaWMLTX2RefinerTransformer3DModel(**_LTX2)), _refiner_inputs,
    latent="hidden_states", timestep_kind=DDPM, channel_dim=2))


def _sana_video_inputs(batch: int) -> dict:
    randn = seeded_randn(0)
    return {"hidden_states": _video(randn, batch, 4), "encoder_hidden_states": randn(batch, _TEXT, 16),
            "timestep": timesteps(batch)}


register(TinyDenoiser(
    "SanaVideoTransformer3DModel", "video-dit",
    seeded(lambda: SanaVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2,
                                               attention_head_dim=12, num_layers=2, num_cross_attention_heads=2,
                                               cross_attention_head_dim=12, cross_attention_dim=24,
                                               caption_channels=16, sample_size=_SIZE, rope_max_seq_len=32)),
    _sana_video_inputs, latent="hidden_states", timestep_kind=DDPM))


# SANA-WM: camera-controlled world model. Its timestep is per frame, (B, 1, F); one value per row is given as
# (B, 1, 1), which the blocks broadcast over the frames.
def _camera(batch: int, frames: int) -> torch.Tensor:
    """(B, F, 20) camera conditions: a flattened 4x4 camera-to-world (a forward dolly) and pinhole [fx, fy, cx, cy]."""
    c2w = torch.eye(4).repeat(batch, frames, 1, 1)
    c2w[..., 2, 3] = torch.arange(frames) * 0.1
    intrinsics = torch.tensor([float(_SIZE), float(_SIZE), _SIZE / 2, _SIZE / 2]).expand(batch, frames, 4)
    return torch.cat([c2w.flatten(-2), intrinsics], dim=-1)


def _sana_wm_inputs(batch: int) -> dict:
    randn = seeded_randn(0)
    return {"hidden_states": _video(randn, batch, 4), "timestep": torch.full((batch, 1, 1), 500.0),
            "encoder_hidden_states": randn(batch, 1, _TEXT, 8), "encoder_attention_mask": torch.ones(batch, _TEXT),
            "camera_conditions": _camera(batch, _FRAMES), "chunk_plucker": _video(randn, batch, 8)}


register(TinyDenoiser(
    "SanaWMTransformer3DModel", "video-dit",
    seeded(lambda: SanaWMTransformer3DModel(
        in_channels=4, num_layers=2, hidden_size=32, num_attention_heads=2, softmax_every_n=2, linear_head_dim=16,
        caption_channels=8, mlp_ratio=2.0, chunk_plucker_channels=8, chunk_plucker_post_attn_blocks=2)),
    _sana_wm_inputs, latent="hidden_states", timestep_kind=DDPM,
    note="timestep is per frame in the pipeline, (B, 1, F); here (B, 1, 1), one value per row"))


def _latte_inputs(batch: int) -> dict:
    randn = seeded_randn(0)
    return {"hidden_states": _video(randn, batch, 4), "encoder_hidden_states": randn(batch, _TEXT, 8),
            "timestep": timesteps(batch)}


# Latte predicts a learned variance (8 output channels for a 4-channel latent); its temporal position embedding is
# fixed at `video_length` frames, so the example's frame count is the only one it takes.
register(TinyDenoiser(
    "LatteTransformer3DModel", "video-dit",
    seeded(lambda: LatteTransformer3DModel(sample_size=_SIZE, num_layers=2, patch_size=2, attention_head_dim=8,
                                           num_attention_heads=2, caption_channels=8, in_channels=4,
                                           cross_attention_dim=16, out_channels=8, attention_bias=True,
                                           activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                                           norm_type="ada_norm_single", norm_elementwise_affine=False,
                                           norm_eps=1e-6, video_length=_FRAMES)),
    _latte_inputs, latent="hidden_states", timestep_kind=DDPM, output_channels=4,
    note="takes exactly video_length frames"))


def _mochi_inputs(batch: int) -> dict:
    randn = seeded_randn(0)
    return {"hidden_states": _video(randn, batch, 4), "encoder_hidden_states": randn(batch, _TEXT, 16),
            "timestep": timesteps(batch), "encoder_attention_mask": torch.ones(batch, _TEXT, dtype=torch.bool)}


register(TinyDenoiser(
    "MochiTransformer3DModel", "video-dit",
    seeded(lambda: MochiTransformer3DModel(patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2,
                                           pooled_projection_dim=16, in_channels=4, text_embed_dim=16,
                                           time_embed_dim=4, max_sequence_length=16)),
    _mochi_inputs, latent="hidden_states", timestep_kind=DDPM))


# Motif's pipeline concatenates a condition latent and a mask to the latent (in_channels 2 * 16 + 1); at
# in_channels = out_channels the class is the plain text-to-video denoiser.
def _motif_inputs(batch: int) -> dict:
    randn = seeded_randn(0)
    return {"hidden_states": _video(randn, batch, 4), "timestep": timesteps(batch),
            "encoder_hidden_states": randn(batch, _TEXT, 32), "encoder_attention_mask": torch.ones(batch, _TEXT)}


register(TinyDenoiser(
    "MotifVideoTransformer3DModel", "video-dit",
    seeded(lambda: MotifVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=1,
        num_single_layers=1, num_decoder_layers=0, patch_size=2, patch_size_t=1, text_embed_dim=32,
        rope_axes_dim=(4, 4, 4))),
    _motif_inputs, latent="hidden_states", timestep_kind=DDPM,
    note="in_channels = out_channels: the pipeline's concatenated condition latent and mask are left out"))


# MiniMax-H3 runs one packed sequence of text, audio and video rows laid out by the caller: the rows' modality tags,
# rotary (t, h, w) positions and the index of each row's timestep in a table of distinct noise levels (sigma in
# [0, 1]) shared by the whole batch, so it takes no per-row timestep; the table holds one level, as a (1,) tensor
# since its time projection refuses a 0-dim one. The video latent comes patchified: (B, tokens, 4 * 1 * 2 * 2).
def _minimax_h3_inputs(batch: int) -> dict:
    randn = seeded_randn(0)
    audio, grid = 4, _SIZE // 2
    video = _FRAMES * grid * grid
    length = _TEXT + audio + video
    text_rows, audio_rows = torch.arange(_TEXT), torch.arange(_TEXT, _TEXT + audio)
    video_rows = torch.arange(_TEXT + audio, length)
    tags = torch.zeros(length, dtype=torch.long)
    tags[text_rows], tags[audio_rows] = 1, 2
    positions = torch.zeros(length, 3)
    positions[:_TEXT + audio, 0] = torch.arange(_TEXT + audio, dtype=torch.float32)
    frame, row, col = torch.meshgrid(torch.arange(_FRAMES), torch.arange(grid), torch.arange(grid), indexing="ij")
    positions[video_rows] = torch.stack([frame + _TEXT, row, col], dim=-1).reshape(-1, 3).float()
    return {"hidden_states": randn(batch, video, 16), "audio_hidden_states": randn(batch, audio, 4),
            "encoder_hidden_states": randn(batch, _TEXT, 8), "timestep": torch.tensor([0.5]),
            "timestep_indices": torch.zeros(length, dtype=torch.long), "token_tags": tags, "position_ids": positions,
            "video_indices": video_rows, "audio_indices": audio_rows, "text_indices": text_rows}


register(TinyDenoiser(
    "MiniMaxH3Transformer3DModel", "other",
    seeded(lambda: MiniMaxH3Transformer3DModel(
        num_attention_heads=2, attention_head_dim=16, hidden_size=24, num_layers=1, num_refiner_layers=1, ffn_dim=32,
        in_channels=4, audio_in_channels=4, patch_size=(1, 2, 2), text_dim=8, freq_dim=8, time_embed_hidden_dim=24,
        time_embed_dim=16, rope_freq_dim=2)),
    _minimax_h3_inputs, latent="hidden_states", timestep_kind=FLOW, channel_dim=2,
    note="timestep is a (1,) table of noise levels indexed per row by timestep_indices, not 0-dim"))
