"""Tiny configs of diffusers' image transformers, NucleusMoE to ZImage.

The configs follow diffusers' tests/models/transformers (diffusers 0.42.1), with widths of 16-64, one or two layers
and head dims of 8-16. Models that take packed tokens get a 4x4 token grid (an 8x8 latent with 2x2 packing).
"""
from __future__ import annotations

import torch
from diffusers import (
    NucleusMoEImageTransformer2DModel,
    OmniGenTransformer2DModel,
    OvisImageTransformer2DModel,
    PixArtTransformer2DModel,
    PRXTransformer2DModel,
    QwenImage21Transformer2DModel,
    QwenImageTransformer2DModel,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    Transformer2DModel,
    ZImageTransformer2DModel,
)

from . import FLOW, TinyDenoiser, register, seeded, seeded_randn, timesteps

_TEXT = 8  # text sequence length
_GRID = 4  # packed-token grid side



def _packed_tokens_with_grid(batch: int) -> dict:
    """2x2-packed tokens with the (frames, rows, cols) token grid of each row, as QwenImage-style models take them."""
    randn = seeded_randn(0)
    return {"hidden_states": randn(batch, _GRID * _GRID, 16), "encoder_hidden_states": randn(batch, _TEXT, 16),
            "encoder_hidden_states_mask": torch.ones(batch, _TEXT, dtype=torch.long), "timestep": timesteps(batch, 0.5),
            "img_shapes": [(1, _GRID, _GRID)] * batch}


# the second block is a mixture of experts, the first dense (the released model keeps its first three dense). With
# expert-choice routing each expert takes capacity_factor * tokens / num_experts tokens, which must not exceed the
# tokens. Width 64: the dense MLP's width rounds down to a multiple of 128 (2/3 * 4 * width); at 32 it would be empty
register(TinyDenoiser(
    "NucleusMoEImageTransformer2DModel", "cross-attn-dit", latent="hidden_states", timestep_kind=FLOW,
    note="hidden_states are 2x2-packed tokens; img_shapes gives the (frames, rows, cols) token grid per row",
    build=seeded(lambda: NucleusMoEImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=4,
        joint_attention_dim=16, axes_dims_rope=(8, 4, 4), moe_enabled=True,
        dense_moe_strategy="leave_first_block_dense", num_experts=4, moe_intermediate_dim=32,
        capacity_factors=[2.0, 2.0])),
    inputs=_packed_tokens_with_grid))


def _omnigen(batch: int) -> dict:
    randn = seeded_randn(0)
    size = 8
    image_tokens = (size // 2) ** 2
    length = _TEXT + 1 + image_tokens  # text, the time token, the image
    # causal over the prompt, bidirectional within the image (as OmniGen's processor builds it)
    mask = torch.tril(torch.ones(length, length))
    mask[-image_tokens:, -image_tokens:] = 1.0
    return {"hidden_states": randn(batch, 4, size, size), "timestep": timesteps(batch, 0.5),
            "input_ids": torch.arange(1, _TEXT + 1).repeat(batch, 1), "input_img_latents": [],
            "input_image_sizes": {}, "attention_mask": mask.repeat(batch, 1, 1),
            "position_ids": torch.arange(length).repeat(batch, 1)}


# rope_scaling factors: one per rotary frequency (head dim 16 / 2)
register(TinyDenoiser(
    "OmniGenTransformer2DModel", "single-stream", latent="hidden_states", timestep_kind=FLOW,
    note="timestep runs 0 (noise) to 1 (clean); attention_mask and position_ids cover text + time token + image",
    build=seeded(lambda: OmniGenTransformer2DModel(
        hidden_size=32, num_attention_heads=2, num_key_value_heads=2, intermediate_size=64, num_layers=2,
        pad_token_id=0, vocab_size=1000, in_channels=4, time_step_dim=32,
        rope_scaling={"long_factor": [1.0] * 8, "short_factor": [1.0] * 8})),
    inputs=_omnigen))


def _image_ids() -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.arange(_GRID), torch.arange(_GRID), indexing="ij")
    return torch.stack([torch.zeros(_GRID * _GRID), rows.flatten().float(), cols.flatten().float()], dim=1)


def _ovis(batch: int) -> dict:
    randn = seeded_randn(0)
    return {"hidden_states": randn(batch, _GRID * _GRID, 16), "encoder_hidden_states": randn(batch, _TEXT, 16),
            "timestep": timesteps(batch, 0.5), "img_ids": _image_ids(), "txt_ids": torch.zeros(_TEXT, 3)}


register(TinyDenoiser(
    "OvisImageTransformer2DModel", "flux-like", latent="hidden_states", timestep_kind=FLOW,
    note="hidden_states are 2x2-packed tokens; img_ids/txt_ids are unbatched (tokens, 3)",
    build=seeded(lambda: OvisImageTransformer2DModel(
        patch_size=1, in_channels=16, out_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(4, 6, 6))),
    inputs=_ovis))


def _prx(batch: int) -> dict:
    randn = seeded_randn(0)
    return {"hidden_states": randn(batch, 16, 8, 8), "timestep": timesteps(batch, 0.5),
            "encoder_hidden_states": randn(batch, _TEXT, 16)}


register(TinyDenoiser(
    "PRXTransformer2DModel", "cross-attn-dit", latent="hidden_states", timestep_kind=FLOW,
    build=seeded(lambda: PRXTransformer2DModel(
        in_channels=16, patch_size=2, context_in_dim=16, hidden_size=32, mlp_ratio=2.0, num_heads=2, depth=2,
        axes_dim=[8, 8])),
    inputs=_prx))


def _pixart(batch: int) -> dict:
    randn = seeded_randn(0)
    return {"hidden_states": randn(batch, 4, 8, 8), "timestep": timesteps(batch, 500.0),
            "encoder_hidden_states": randn(batch, _TEXT, 32),
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}


register(TinyDenoiser(
    "PixArtTransformer2DModel", "cross-attn-dit", latent="hidden_states", output_channels=4,
    build=seeded(lambda: PixArtTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=2, in_channels=4,
        out_channels=8, cross_attention_dim=16, caption_channels=32, attention_bias=True,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6, use_additional_conditions=False)),
    inputs=_pixart))


def _qwen21(batch: int) -> dict:
    randn = seeded_randn(0)
    # one vision slot per 2x2 group of target tokens, after the text slots
    img_mask = torch.zeros(batch, _TEXT + _GRID * _GRID // 4, dtype=torch.bool)
    img_mask[:, _TEXT:] = True
    return {"hidden_states": randn(batch, _GRID * _GRID, 16), "encoder_hidden_states": randn(batch, _TEXT, 16),
            "encoder_hidden_states_mask": torch.ones(batch, _TEXT, dtype=torch.long), "timestep": timesteps(batch, 0.5),
            "img_shapes": [[(1, _GRID, _GRID)]] * batch, "img_mask": img_mask}


register(TinyDenoiser(
    "QwenImage21Transformer2DModel", "single-stream", latent="hidden_states", timestep_kind=FLOW, output_last_tokens=True,
    note="the output covers the whole joint sequence (text + image tokens); the update of the latent is its last"
         " hidden_states.shape[1] tokens",
    build=seeded(lambda: QwenImage21Transformer2DModel(
        patch_size=1, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        context_in_dim=16, mlp_ratio=2, axes_dims_rope=(4, 6, 6))),
    inputs=_qwen21))


register(TinyDenoiser(
    "QwenImageTransformer2DModel", "mmdit", latent="hidden_states", timestep_kind=FLOW,
    note="hidden_states are 2x2-packed tokens; img_shapes gives the (frames, rows, cols) token grid per row",
    build=seeded(lambda: QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4))),
    inputs=_packed_tokens_with_grid))


def _sd3(batch: int) -> dict:
    randn = seeded_randn(0)
    return {"hidden_states": randn(batch, 16, 8, 8), "encoder_hidden_states": randn(batch, _TEXT, 32),
            "pooled_projections": randn(batch, 32), "timestep": timesteps(batch, 500.0)}


# SD3.5's variant: joint + self attention in the first block, RMS-normed q/k
register(TinyDenoiser(
    "SD3Transformer2DModel", "mmdit", latent="hidden_states",
    build=seeded(lambda: SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=32,
        pos_embed_max_size=32, dual_attention_layers=(0,), qk_norm="rms_norm")),
    inputs=_sd3))


def _sana(batch: int) -> dict:
    randn = seeded_randn(0)
    return {"hidden_states": randn(batch, 16, 8, 8), "encoder_hidden_states": randn(batch, _TEXT, 16),
            "timestep": timesteps(batch, 500.0)}


register(TinyDenoiser(
    "SanaTransformer2DModel", "cross-attn-dit", latent="hidden_states",
    build=seeded(lambda: SanaTransformer2DModel(
        patch_size=1, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
        sample_size=8)),
    inputs=_sana))


def _transformer2d(batch: int) -> dict:
    randn = seeded_randn(0)
    return {"hidden_states": randn(batch, 16, 8, 8), "encoder_hidden_states": randn(batch, _TEXT, 16),
            "timestep": timesteps(batch, 500.0)}


register(TinyDenoiser(
    "Transformer2DModel", "other", latent="hidden_states",
    note="continuous input, SD1-style spatial transformer; the timestep is unused (norm_type layer_norm)",
    build=seeded(lambda: Transformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=16, norm_num_groups=8, cross_attention_dim=16,
        num_layers=1, activation_fn="geglu", norm_type="layer_norm")),
    inputs=_transformer2d))


def _zimage(batch: int) -> dict:
    randn = seeded_randn(0)
    return {"x": randn(batch, 16, 1, 8, 8), "cap_feats": randn(batch, _TEXT, 16), "t": timesteps(batch, 0.5)}


register(TinyDenoiser(
    "ZImageTransformer2DModel", "single-stream", latent="x", timestep="t", timestep_kind=FLOW,
    note="x is (B, C, 1, H, W), iterated per row (the pipeline passes a list); the output is a list of per-row"
         " (C, 1, H, W) tensors; t = 1 - sigma",
    build=seeded(lambda: ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, qk_norm=True, cap_feat_dim=16, rope_theta=256.0, t_scale=1000.0,
        axes_dims=[8, 4, 4], axes_lens=[256, 32, 32])),
    inputs=_zimage))
