"""Image denoisers A to L: AuraFlow, Bria, Chroma, CogView, DiT, DreamLite, Ernie, FLUX 1/2/3, GLM, HiDream, Hunyuan,
Ideogram, Krea, LongCat and Lumina.

The configs follow diffusers' tests/models/transformers (diffusers 0.42.1), shrunk where a test is larger than needed;
the timestep range follows what each class's pipeline passes: FLOW where it is in [0, 1] (the scheduler's step over
1000, or one minus that), DDPM where it is the step itself. Flux3, HunyuanImage and DreamLite have no model test
there, so their configs follow their constructors. Rotary ids and tables are shared by the batch, so unbatched."""
from __future__ import annotations

import diffusers
import torch
from diffusers.models.embeddings import get_2d_rotary_pos_embed, get_2d_rotary_pos_embed_lumina
from diffusers.models.transformers import transformer_ideogram4 as ideogram4

from . import FLOW, TinyDenoiser, register, seeded, seeded_randn, timesteps

TEXT = 8



def _grid_ids(height: int, width: int, axes: int = 3) -> torch.Tensor:
    """Rotary ids (height * width, axes) of an image grid: (0, row, col) in the middle axes."""
    ids = torch.zeros(height, width, axes)
    ids[..., 1] = torch.arange(height)[:, None]
    ids[..., 2] = torch.arange(width)[None, :]
    return ids.reshape(height * width, axes)


def _text_ids(length: int, axes: int = 3) -> torch.Tensor:
    ids = torch.zeros(length, axes)
    if axes == 4:
        ids[:, 3] = torch.arange(length)
    return ids


def _add(class_name: str, family: str, config: dict, inputs, latent: str = "hidden_states", **kwargs) -> None:
    cls = getattr(diffusers, class_name)
    register(TinyDenoiser(class_name, family, seeded(lambda: cls(**config)), inputs, latent, **kwargs))


def _auraflow(batch: int) -> dict:
    randn = seeded_randn(0)
    return dict(hidden_states=randn(batch, 4, 16, 16), encoder_hidden_states=randn(batch, TEXT, 32),
                timestep=timesteps(batch, 0.5))


_add("AuraFlowTransformer2DModel", "mmdit",
     dict(sample_size=32, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=1,
          attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
          out_channels=4, pos_embed_max_size=256),
     _auraflow, timestep_kind=FLOW)


def _bria_fibo2(batch: int) -> dict:
    randn = seeded_randn(0)
    # One text bundle for the gist Perceiver plus one per injection layer.
    return dict(hidden_states=randn(batch, 4, 8, 8), timestep=timesteps(batch, 0.5),
                encoder_hidden_states=randn(batch, 2, TEXT, 24))


_add("BriaFibo2Transformer2DModel", "single-stream",
     dict(in_channels=4, patch_size=2, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2, cap_feat_dim=24,
          injection_layer_ids=(1,), perceiver_num_layers=1, min_num_gist_tokens=4, max_num_gist_tokens=8,
          gist_step=4, gist_min_text_len=4, gist_max_text_len=16, axes_dims=(4, 6, 6), axes_lens=(64, 64, 64)),
     _bria_fibo2, timestep_kind=FLOW)


def _bria_fibo(batch: int) -> dict:
    randn = seeded_randn(0)
    # One text-encoder layer per double and per single block.
    return dict(hidden_states=randn(batch, 64, 16), encoder_hidden_states=randn(batch, TEXT, 64),
                text_encoder_layers=[randn(batch, TEXT, 32), randn(batch, TEXT, 32)],
                timestep=timesteps(batch, 500.0), img_ids=_grid_ids(8, 8), txt_ids=_text_ids(TEXT))


_add("BriaFiboTransformer2DModel", "flux-like",
     dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
          num_attention_heads=2, joint_attention_dim=64, text_encoder_dim=32, pooled_projection_dim=None,
          axes_dims_rope=[0, 4, 4]),
     _bria_fibo)


def _bria(batch: int) -> dict:
    randn = seeded_randn(0)
    return dict(hidden_states=randn(batch, 64, 16), encoder_hidden_states=randn(batch, TEXT, 32),
                timestep=timesteps(batch, 500.0), img_ids=_grid_ids(8, 8), txt_ids=_text_ids(TEXT))


_add("BriaTransformer2DModel", "flux-like",
     dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
          num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=None, axes_dims_rope=[0, 4, 4]),
     _bria)


def _chroma(batch: int) -> dict:
    randn = seeded_randn(0)
    return dict(hidden_states=randn(batch, 64, 16), encoder_hidden_states=randn(batch, TEXT, 32),
                timestep=timesteps(batch, 0.5), img_ids=_grid_ids(8, 8), txt_ids=_text_ids(TEXT))


_add("ChromaTransformer2DModel", "flux-like",
     dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
          num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 4, 8), approximator_num_channels=16,
          approximator_hidden_dim=32, approximator_layers=1),
     _chroma, timestep_kind=FLOW)


def _cogview(batch: int) -> dict:
    randn = seeded_randn(0)
    size = torch.tensor([[64, 64]] * batch)
    return dict(hidden_states=randn(batch, 4, 8, 8), encoder_hidden_states=randn(batch, TEXT, 8),
                timestep=timesteps(batch, 500.0), original_size=size, target_size=size,
                crop_coords=torch.zeros(batch, 2, dtype=torch.long))


_add("CogView3PlusTransformer2DModel", "mmdit",
     dict(patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2, out_channels=4,
          text_embed_dim=8, time_embed_dim=8, condition_dim=2, pos_embed_max_size=16, sample_size=8),
     _cogview)
_add("CogView4Transformer2DModel", "mmdit",
     dict(patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4, out_channels=4,
          text_embed_dim=8, time_embed_dim=8, condition_dim=4),
     _cogview)


def _dit(batch: int) -> dict:
    randn = seeded_randn(0)
    return dict(hidden_states=randn(batch, 4, 8, 8), timestep=timesteps(batch, 500.0),
                class_labels=torch.arange(batch) % 4)


_add("DiTTransformer2DModel", "dit",
     dict(in_channels=4, out_channels=8, activation_fn="gelu-approximate", num_attention_heads=2,
          attention_head_dim=8, attention_bias=True, num_layers=1, norm_type="ada_norm_zero", num_embeds_ada_norm=8,
          patch_size=2, sample_size=8),
     _dit, output_channels=4)


def _dreamlite(batch: int) -> dict:
    randn = seeded_randn(0)
    return dict(hidden_states=randn(batch, 16, 8, 8), encoder_hidden_states=randn(batch, TEXT, 32),
                timestep=timesteps(batch, 500.0), class_labels=torch.arange(batch) % 4)


# DreamLite's UNet runs this block with plain layer norms, where the timestep is unused; adaLN-zero (timestep and
# class label, as in DiT) keeps the timestep live.
_add("DreamLiteTransformer2DModel", "other",
     dict(num_attention_heads=2, attention_head_dim=16, in_channels=16, num_layers=1, norm_num_groups=4,
          cross_attention_dim=32, norm_type="ada_norm_zero", num_embeds_ada_norm=8),
     _dreamlite, note="the UNet's spatial transformer block, built with adaLN-zero")


def _ernie(batch: int) -> dict:
    randn = seeded_randn(0)
    return dict(hidden_states=randn(batch, 16, 8, 8), timestep=timesteps(batch, 500.0),
                text_bth=randn(batch, TEXT, 16), text_lens=torch.full((batch,), TEXT))


_add("ErnieImageTransformer2DModel", "single-stream",
     dict(hidden_size=32, num_attention_heads=2, num_layers=1, ffn_hidden_size=32, in_channels=16, out_channels=16,
          patch_size=1, text_in_dim=16, rope_theta=256, rope_axes_dim=(8, 4, 4), eps=1e-6, qk_layernorm=True),
     _ernie)


def _flux2(batch: int) -> dict:
    randn = seeded_randn(0)
    return dict(hidden_states=randn(batch, 64, 16), encoder_hidden_states=randn(batch, TEXT, 32),
                timestep=timesteps(batch, 0.5), img_ids=_grid_ids(8, 8, 4), txt_ids=_text_ids(TEXT, 4),
                guidance=timesteps(batch, 4.0))


_add("Flux2Transformer2DModel", "flux-like",
     dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
          num_attention_heads=2, joint_attention_dim=32, timestep_guidance_channels=256, axes_dims_rope=(4, 4, 4, 4)),
     _flux2, timestep_kind=FLOW)


def _flux3(batch: int) -> dict:
    randn = seeded_randn(0)
    return dict(hidden_states=randn(batch, 64, 16), encoder_hidden_states=randn(batch, TEXT, 32),
                timestep=timesteps(batch, 0.5), img_ids=_grid_ids(8, 8, 4), txt_ids=_text_ids(TEXT, 4))


_add("Flux3Transformer2DModel", "flux-like",
     dict(in_channels=16, cond_in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
          num_attention_heads=2, joint_attention_dim=32, timestep_channels=32, axes_dims_rope=(4, 4, 4, 4)),
     _flux3, timestep_kind=FLOW)


def _flux(batch: int) -> dict:
    randn = seeded_randn(0)
    return dict(hidden_states=randn(batch, 64, 16), encoder_hidden_states=randn(batch, TEXT, 32),
                pooled_projections=randn(batch, 32), timestep=timesteps(batch, 0.5), img_ids=_grid_ids(8, 8),
                txt_ids=_text_ids(TEXT))


_add("FluxTransformer2DModel", "flux-like",
     dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
          num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8)),
     _flux, timestep_kind=FLOW)


def _glm(batch: int) -> dict:
    randn = seeded_randn(0)
    # One prior (AR-stage) token per latent patch.
    return dict(hidden_states=randn(batch, 4, 8, 8), encoder_hidden_states=randn(batch, TEXT, 32),
                prior_token_id=torch.arange(batch * 16).reshape(batch, 16) % 64,
                prior_token_drop=torch.zeros(batch, dtype=torch.bool), timestep=timesteps(batch, 500.0),
                target_size=torch.tensor([[64.0, 64.0]] * batch), crop_coords=torch.zeros(batch, 2))


_add("GlmImageTransformer2DModel", "mmdit",
     dict(patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
          text_embed_dim=32, time_embed_dim=16, condition_dim=8, prior_vq_quantizer_codebook_size=64),
     _glm)


def _hidream(batch: int) -> dict:
    randn = seeded_randn(0)
    # The Llama input is indexed by layer first (`encoder_hidden_states_llama3[k]`): a list keeps batch at dim 0.
    return dict(hidden_states=randn(batch, 4, 16, 16), timesteps=timesteps(batch, 500.0),
                encoder_hidden_states_t5=randn(batch, TEXT, 8),
                encoder_hidden_states_llama3=[randn(batch, TEXT, 4), randn(batch, TEXT, 4)],
                pooled_embeds=randn(batch, 8))


_add("HiDreamImageTransformer2DModel", "flux-like",
     dict(patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
          num_attention_heads=4, caption_channels=[8, 4], text_emb_dim=8, num_routed_experts=2,
          num_activated_experts=2, axes_dims_rope=(4, 2, 2), max_resolution=(32, 32), llama_layers=(0, 1),
          force_inference_output=True),
     _hidream, timestep="timesteps", note="encoder_hidden_states_llama3 is a list of per-layer tensors")


def _hunyuan_image(batch: int) -> dict:
    randn = seeded_randn(0)
    return dict(hidden_states=randn(batch, 16, 8, 8), timestep=timesteps(batch, 500.0),
                encoder_hidden_states=randn(batch, TEXT, 32),
                encoder_attention_mask=torch.ones(batch, TEXT, dtype=torch.bool))


_add("HunyuanImageTransformer2DModel", "flux-like",
     dict(in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=16, num_layers=1,
          num_single_layers=1, num_refiner_layers=1, patch_size=(1, 1), text_embed_dim=32, rope_axes_dim=(8, 8)),
     _hunyuan_image)


def _hunyuan_dit(batch: int) -> dict:
    randn = seeded_randn(0)
    cos, sin = get_2d_rotary_pos_embed(8, ((0, 0), (4, 4)), (4, 4), use_real=True)
    # image_meta_size: original size, target size, crop top-left.
    return dict(hidden_states=randn(batch, 4, 8, 8), timestep=timesteps(batch, 500.0),
                encoder_hidden_states=randn(batch, TEXT, 8), text_embedding_mask=torch.ones(batch, TEXT),
                encoder_hidden_states_t5=randn(batch, TEXT, 8), text_embedding_mask_t5=torch.ones(batch, TEXT),
                image_meta_size=torch.tensor([[64.0, 64.0, 64.0, 64.0, 0.0, 0.0]] * batch),
                style=torch.zeros(batch, dtype=torch.long), image_rotary_emb=(cos, sin))


_add("HunyuanDiT2DModel", "cross-attn-dit",
     dict(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
          cross_attention_dim=8, cross_attention_dim_t5=8, pooled_projection_dim=4, hidden_size=16, text_len=TEXT,
          text_len_t5=TEXT, activation_fn="gelu-approximate"),
     _hunyuan_dit, output_channels=4)


def _ideogram4(batch: int) -> dict:
    randn = seeded_randn(0)
    side, text = 4, TEXT
    tokens = text + side * side
    # Text and image tokens are one packed sequence: text rows of the latent and image rows of the text are zeros.
    hidden_states = torch.cat([torch.zeros(batch, text, 16), randn(batch, side * side, 16)], dim=1)
    features = torch.cat([randn(batch, text, 24), torch.zeros(batch, side * side, 24)], dim=1)
    positions = torch.zeros(tokens, 3, dtype=torch.long)
    positions[:text] = torch.arange(text)[:, None]
    positions[text:] = _grid_ids(side, side).long() + ideogram4.IMAGE_POSITION_OFFSET
    indicator = torch.full((tokens,), ideogram4.OUTPUT_IMAGE_INDICATOR)
    indicator[:text] = ideogram4.LLM_TOKEN_INDICATOR
    return dict(hidden_states=hidden_states, timestep=timesteps(batch, 0.5), encoder_hidden_states=features,
                position_ids=positions.expand(batch, -1, -1).clone(),
                segment_ids=torch.ones(batch, tokens, dtype=torch.long),
                indicator=indicator.expand(batch, -1).clone())


_add("Ideogram4Transformer2DModel", "single-stream",
     dict(in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=4, intermediate_size=32,
          adaln_dim=16, llm_features_dim=24, rope_theta=10_000, mrope_section=(2, 1, 1), norm_eps=1e-5),
     _ideogram4, timestep_kind=FLOW, note="the latent is the packed text+image sequence; text rows are zeros")


def _krea2(batch: int) -> dict:
    randn = seeded_randn(0)
    positions = torch.cat([torch.zeros(TEXT, 3), _grid_ids(8, 8)])
    return dict(hidden_states=randn(batch, 64, 16), encoder_hidden_states=randn(batch, TEXT, 3, 16),
                timestep=timesteps(batch, 0.5), position_ids=positions,
                encoder_attention_mask=torch.ones(batch, TEXT, dtype=torch.bool))


_add("Krea2Transformer2DModel", "single-stream",
     dict(in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=4, num_key_value_heads=2,
          intermediate_size=32, timestep_embed_dim=8, text_hidden_dim=16, num_text_layers=3,
          text_num_attention_heads=2, text_num_key_value_heads=1, text_intermediate_size=16,
          num_layerwise_text_blocks=1, num_refiner_text_blocks=1, axes_dims_rope=(4, 2, 2), rope_theta=1000.0),
     _krea2, timestep_kind=FLOW)


def _longcat(batch: int) -> dict:
    randn = seeded_randn(0)
    return dict(hidden_states=randn(batch, 64, 16), encoder_hidden_states=randn(batch, TEXT, 32),
                timestep=timesteps(batch, 0.5), img_ids=_grid_ids(8, 8), txt_ids=_text_ids(TEXT),
                guidance=timesteps(batch, 3.5))


_add("LongCatImageTransformer2DModel", "flux-like",
     dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
          num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8]),
     _longcat, timestep_kind=FLOW)


def _lumina2(batch: int) -> dict:
    randn = seeded_randn(0)
    return dict(hidden_states=randn(batch, 4, 16, 16), timestep=timesteps(batch, 0.5),
                encoder_hidden_states=randn(batch, TEXT, 32),
                encoder_attention_mask=torch.ones(batch, TEXT, dtype=torch.bool))


_add("Lumina2Transformer2DModel", "single-stream",
     dict(sample_size=16, patch_size=2, in_channels=4, hidden_size=24, num_layers=2, num_refiner_layers=1,
          num_attention_heads=3, num_kv_heads=1, multiple_of=2, axes_dim_rope=(4, 2, 2), axes_lens=(128, 128, 128),
          cap_feat_dim=32),
     _lumina2, timestep_kind=FLOW)


def _lumina_next(batch: int) -> dict:
    randn = seeded_randn(0)
    # The pipeline passes a complex rotary table over a 384 x 384 patch grid; 32 x 32 covers this size doubled.
    return dict(hidden_states=randn(batch, 4, 16, 16), timestep=timesteps(batch, 0.5),
                encoder_hidden_states=randn(batch, TEXT, 32), encoder_mask=torch.ones(batch, TEXT),
                image_rotary_emb=get_2d_rotary_pos_embed_lumina(8, 32, 32), cross_attention_kwargs={})


_add("LuminaNextDiT2DModel", "cross-attn-dit",
     dict(sample_size=16, patch_size=2, in_channels=4, hidden_size=24, num_layers=2, num_attention_heads=3,
          num_kv_heads=1, multiple_of=16, learn_sigma=False, qk_norm=True, cross_attention_dim=32),
     _lumina_next, timestep_kind=FLOW, note="image_rotary_emb is a complex tensor")
