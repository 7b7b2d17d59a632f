"""Tiny configs of the six diffusers families diffc must capture, with example inputs."""
import torch
from diffusers import (DiTTransformer2DModel, FluxTransformer2DModel, PixArtTransformer2DModel,
                       SD3Transformer2DModel, UNet2DConditionModel, UNet2DModel)


def families():
    torch.manual_seed(0)
    out = {}
    out["unet2dcond"] = (UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8).eval(),
        dict(sample=torch.randn(2, 4, 16, 16), timestep=torch.tensor([10, 10]),
             encoder_hidden_states=torch.randn(2, 7, 32)))
    out["unet2d"] = (UNet2DModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=3,
                                 out_channels=3, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8).eval(),
                     dict(sample=torch.randn(2, 3, 16, 16), timestep=torch.tensor([10, 10])))
    out["dit"] = (DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                        num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000).eval(),
                  dict(hidden_states=torch.randn(2, 4, 8, 8), timestep=torch.tensor([3, 3]),
                       class_labels=torch.tensor([1, 2])))
    out["pixart"] = (PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                              num_layers=2, cross_attention_dim=16, sample_size=8, patch_size=2,
                                              caption_channels=24, norm_type="ada_norm_single",
                                              use_additional_conditions=False).eval(),
                     dict(hidden_states=torch.randn(2, 4, 8, 8), timestep=torch.tensor([3, 3]),
                          encoder_hidden_states=torch.randn(2, 5, 24),
                          added_cond_kwargs={"resolution": None, "aspect_ratio": None}))
    out["sd3"] = (SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                        pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16).eval(),
                  dict(hidden_states=torch.randn(2, 4, 8, 8), encoder_hidden_states=torch.randn(2, 5, 16),
                       pooled_projections=torch.randn(2, 16), timestep=torch.tensor([3.0, 3.0])))
    out["flux"] = (FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                          attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                          pooled_projection_dim=32, axes_dims_rope=(4, 4, 8)).eval(),
                   dict(hidden_states=torch.randn(1, 16, 16), encoder_hidden_states=torch.randn(1, 8, 32),
                        pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.5]),
                        img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3)))
    return out


def first_tensor(output):
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "sample"):
        return output.sample
    return output[0]
