"""Tests for the evaluation zoo: its procedural data, the pipeline of every family, the scorers and
the trained models committed under benchmarks/zoo."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffc.models import zoo
from diffc.models.zoo import train
from diffc.models.zoo.pipeline import pack_latents, unpack_latents
from diffc.models.zoo.report import RECOGNIZABLE, grid_image

torch.set_num_threads(1)
TRAINED = zoo.available()


def untrained_pipeline(name: str) -> zoo.ZooPipeline:
    zoo_spec = zoo.spec(name)
    data = zoo_spec.dataset
    torch.manual_seed(0)
    pipe = zoo.ZooPipeline(text_encoder=zoo.AttributeEncoder(vocabulary=data.vocabulary()),
                           scheduler=zoo_spec.build_scheduler(), family=zoo_spec.family, image_size=data.image_size,
                           num_frames=data.num_frames, **{zoo_spec.denoiser_attribute: zoo_spec.build_denoiser(data)})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_zoo_spans_families_predictions_samplers_and_data():
    specs = list(zoo.ZOO.values())
    assert len(specs) >= 6
    assert {s.family for s in specs} == set(zoo.FAMILIES)
    assert {s.prediction for s in specs} == {"epsilon", "v_prediction", "flow"}
    assert len({s.sampler.split(",")[0].split(" (")[0] for s in specs}) >= 4
    assert len({s.dataset.name for s in specs}) >= 4


@pytest.mark.parametrize("data_name", sorted(zoo.DATASETS))
def test_data_is_a_function_of_the_seed_and_prompts_parse_back(data_name):
    data = zoo.dataset(data_name)
    images, labels, prompts = data.sample(6, torch.Generator().manual_seed(3))
    again, labels_again, _ = data.sample(6, torch.Generator().manual_seed(3))
    assert torch.equal(images, again) and torch.equal(labels, labels_again)
    assert images.min() >= -1 and images.max() <= 1
    assert images.shape[1] == 3 and images.shape[-1] == data.image_size
    assert images.dim() == (5 if data.num_frames else 4)
    assert [data.parse(prompt) for prompt in prompts] == labels.tolist()
    assert all(word in data.vocabulary() for prompt in prompts for word in prompt.split())


def test_a_prompt_outside_the_format_is_refused_with_the_format():
    with pytest.raises(ValueError, match="does not follow the shapes format"):
        zoo.dataset("shapes").parse("red circle")
    with pytest.raises(ValueError, match="outside the shapes set"):
        zoo.dataset("shapes").parse("large purple circle")


def test_flux_packing_is_a_lossless_token_layout():
    latents = torch.randn(2, 3, 16, 16)
    tokens = pack_latents(latents)
    assert tokens.shape == (2, 64, 12)
    assert torch.equal(unpack_latents(tokens, 16, 16), latents)


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_every_family_samples_with_and_without_guidance(name):
    pipe = untrained_pipeline(name)
    prompts = zoo.prompts(name, 2)
    guided = pipe(prompts, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt")
    plain = pipe(prompts, num_inference_steps=2, guidance_scale=1.0, generator=torch.Generator().manual_seed(0),
                 output_type="pt")
    shape = pipe.latent_shape(2)
    assert guided.images.shape == plain.images.shape == shape
    assert not torch.equal(guided.images, plain.images)
    assert 0 <= guided.images.min() and guided.images.max() <= 1


def test_bad_calls_name_the_problem():
    pipe = untrained_pipeline("motion-wan")
    with pytest.raises(ValueError, match="at least one prompt"):
        pipe([])
    with pytest.raises(ValueError, match="images only"):
        pipe("circle moving up", output_type="pil")
    with pytest.raises(ValueError, match="unknown zoo model 'shapes-sdxl'"):
        zoo.load("shapes-sdxl")


def test_missing_weights_say_how_to_train_them(tmp_path):
    with pytest.raises(ValueError, match="python -m diffc.models.zoo.train --model shapes-unet"):
        zoo.load("shapes-unet", root=tmp_path)
    with pytest.raises(ValueError, match="--model scorer-shapes"):
        zoo.load_scorer("shapes-unet", root=tmp_path)


def test_training_resumes_to_the_same_weights(tmp_path):
    straight = train.train("scorer-textures", tmp_path / "a", tmp_path / "ck-a", seed=0, threads=1, steps=6)
    train.train("scorer-textures", tmp_path / "b", tmp_path / "ck-b", seed=0, threads=1, steps=3)
    resumed = train.train("scorer-textures", tmp_path / "b", tmp_path / "ck-b", seed=0, threads=1, steps=6)
    first, second = (load_file(folder / "diffusion_pytorch_model.safetensors") for folder in (straight, resumed))
    assert first.keys() == second.keys()
    assert all(torch.allclose(first[key], second[key], atol=1e-6) for key in first)


def test_grid_puts_a_videos_frames_in_a_row():
    videos = np.random.default_rng(0).random((3, 4, 16, 16, 3))
    picture = grid_image(videos, columns=2)
    assert picture.size == (2 * 4 * 16 * 4, 2 * 16 * 4)


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_each_scorer_reads_held_out_data(name):
    scorer = zoo.load_scorer(name)
    images, _, prompts = zoo.spec(name).dataset.sample(200, torch.Generator().manual_seed(999))
    assert scorer.accuracy(images / 2 + 0.5, prompts) >= 0.95
    shares = scorer.attribute_accuracy(images / 2 + 0.5, prompts)
    assert list(shares) == [attribute for attribute, _ in zoo.spec(name).dataset.attributes]
    assert min(shares.values()) >= scorer.accuracy(images / 2 + 0.5, prompts)


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_each_trained_model_draws_what_its_prompts_ask(name):
    if name not in TRAINED:
        pytest.skip(f"{name} is not trained in {zoo.default_root()}")
    pipe, scorer = zoo.load(name), zoo.load_scorer(name)
    prompts = zoo.prompts(name, 16)
    images = pipe(prompts, num_inference_steps=20, generator=torch.Generator().manual_seed(1)).images
    assert scorer.accuracy(images, prompts) >= RECOGNIZABLE
