"""A tiny, untrained class-conditional UNet pipeline of the embedded-model kind, for fast tests."""
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

from diffc.models.components import ClassTokenEmbedding
from diffc.models.pipelines import DigitsUNetPipeline


def tiny_digits_pipeline(seed: int = 0) -> DigitsUNetPipeline:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8).eval()
    embedding = ClassTokenEmbedding(num_classes=10, embedding_dim=16, num_tokens=1).eval()
    pipe = DigitsUNetPipeline(unet=unet, class_embedding=embedding, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def captured_and_calibrated(out, conditions=(1, 6, 3, 8), num_steps: int = 4):
    """The tiny pipeline's UNet captured, and a calibration set of its pipeline (one loop per condition)."""
    from diffc.calibration import collect
    from diffc.ir import capture

    pipe = tiny_digits_pipeline()
    calibration = collect(pipe, conditions=list(conditions), num_steps=num_steps, out=out, progress=False)
    return capture(pipe.unet), calibration
