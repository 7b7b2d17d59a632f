"""Tests for the shipped digits diffusion models, their pipelines and the scorer."""

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler
from PIL import Image

from diffc import models
from diffc.models.digits import load_digits_16
from diffc.models.pipelines import DigitsUNetPipeline
from diffc.models.quality import pipeline_format

MODEL_NAMES = ["digits-unet", "digits-dit"]

torch.set_num_threads(1)


class RecordingDenoiser(torch.nn.Module):
    """Forwards to a denoiser and records the batch size of every call."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner
        self.batch_sizes: list[int] = []

    @property
    def config(self):
        return self.inner.config

    @property
    def dtype(self):
        return self.inner.dtype

    @property
    def device(self):
        return self.inner.device

    def forward(self, sample, timestep, *args, **kwargs):
        assert timestep.shape == (sample.shape[0],), "timestep must be a 1-D tensor with one entry per sample"
        self.batch_sizes.append(sample.shape[0])
        return self.inner(sample, timestep, *args, **kwargs)


@pytest.fixture(scope="module", params=MODEL_NAMES)
def pipe(request):
    pipeline = models.load(request.param)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def denoiser_attribute(pipe) -> str:
    return "unet" if isinstance(pipe, DigitsUNetPipeline) else "transformer"


@pytest.fixture(scope="module")
def scorer():
    return models.load_scorer()


def sample(pipe, labels=(0, 3, 5, 7), steps=4, seed=1234, **kwargs):
    return pipe(
        class_labels=list(labels), num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), **kwargs
    ).images


def test_available_lists_shipped_models():
    assert models.available() == MODEL_NAMES


def test_unknown_model_name_lists_available():
    with pytest.raises(ValueError, match="digits-unet"):
        models.load("no-such-model")


def test_output_shape_range_and_determinism(pipe):
    images = sample(pipe)
    assert isinstance(images, np.ndarray) and images.dtype == np.float32
    assert images.shape == (4, 16, 16, 1)
    assert 0.0 <= images.min() and images.max() <= 1.0
    np.testing.assert_array_equal(images, sample(pipe))
    assert not np.array_equal(images, sample(pipe, seed=4321))


def test_output_types(pipe):
    pil_images = sample(pipe, labels=(1, 2), steps=2, output_type="pil")
    assert len(pil_images) == 2 and all(isinstance(image, Image.Image) for image in pil_images)
    assert pil_images[0].size == (16, 16)
    tensor = sample(pipe, labels=(1, 2), steps=2, output_type="pt")
    assert tensor.shape == (2, 1, 16, 16) and 0.0 <= tensor.min() and tensor.max() <= 1.0
    np.testing.assert_allclose(
        tensor.permute(0, 2, 3, 1).numpy(), sample(pipe, labels=(1, 2), steps=2), atol=1e-6
    )


@pytest.mark.parametrize("guidance_scale, expected_batch", [(3.0, 6), (1.0, 3)])
def test_guidance_batches_unconditional_and_conditional_in_one_call(pipe, guidance_scale, expected_batch):
    attribute = denoiser_attribute(pipe)
    original = getattr(pipe, attribute)
    recorder = RecordingDenoiser(original)
    setattr(pipe, attribute, recorder)
    try:
        images = sample(pipe, labels=(1, 2, 3), steps=3, guidance_scale=guidance_scale)
    finally:
        setattr(pipe, attribute, original)
    assert images.shape == (3, 16, 16, 1)
    assert recorder.batch_sizes == [expected_batch] * 3


def test_wrapped_denoiser_gives_same_images(pipe):
    attribute = denoiser_attribute(pipe)
    original = getattr(pipe, attribute)
    reference = sample(pipe)
    setattr(pipe, attribute, RecordingDenoiser(original))
    try:
        wrapped = sample(pipe)
    finally:
        setattr(pipe, attribute, original)
    np.testing.assert_array_equal(reference, wrapped)


def test_unet_pipeline_accepts_dpm_solver():
    pipe = models.load("digits-unet")
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    images = sample(pipe, steps=5)
    assert images.shape == (4, 16, 16, 1) and np.isfinite(images).all()


def test_stochastic_sampler_is_fixed_by_the_seed():
    """DDPM adds noise every step; it comes from the call's generator, so the same seed gives the
    same images whatever the global random state (fidelity comparisons rely on it)."""
    pipe = models.load("digits-unet")
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    first = sample(pipe, steps=4)
    torch.manual_seed(123)
    assert np.array_equal(sample(pipe, steps=4), first)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"class_labels": [10]}, "class labels"),
        ({"class_labels": [-1]}, "class labels"),
        ({"class_labels": [1.5]}, "class labels"),
        ({"class_labels": []}, "at least one"),
        ({"class_labels": [1], "num_inference_steps": 0}, "num_inference_steps"),
        ({"class_labels": [1], "output_type": "jpeg"}, "output_type"),
    ],
)
def test_bad_inputs_raise_clear_errors(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe(**kwargs)


def test_scorer_is_accurate_on_real_test_images(scorer):
    images, labels = load_digits_16("test")
    assert scorer.accuracy(pipeline_format(images), labels.numpy()) >= 0.95
    assert scorer.features(pipeline_format(images[:5])).shape[0] == 5


def test_fid_is_lower_for_real_images_than_for_noise(scorer):
    real, _ = load_digits_16("train")
    real_fid = scorer.fid(pipeline_format(real[:300]))
    noise = np.random.default_rng(0).uniform(size=(300, 16, 16, 1)).astype(np.float32)
    assert real_fid < scorer.fid(noise)


def test_generated_samples_are_recognisable(pipe, scorer):
    labels = [label % 10 for label in range(20)]
    images = sample(pipe, labels=labels, steps=20, seed=0)
    assert scorer.accuracy(images, labels) >= 0.7
