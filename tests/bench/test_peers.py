"""The bench's peer methods on the shipped digits models: each runs, changes the images at an
aggressive setting (a peer that changes nothing is a no-op), leaves the pipeline's own denoiser
as it was, and refuses an architecture it does not cover with the reason."""
import contextlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from diffc import models
from diffc.bench.peers import PEERS
from diffc.bench.peers_external import one_timestep_per_call
from diffc.errors import PeerNotApplicable
from diffc.models.zoo.specs import ZOO

torch.set_num_threads(1)

LABELS = [0, 1]
# cache-dit computes its first 8 steps by default (max_warmup_steps), so some must follow
STEPS = 12


@pytest.fixture(scope="module")
def dit():
    return models.load("digits-dit"), "transformer"


@pytest.fixture(scope="module")
def unet():
    return models.load("digits-unet"), "unet"


def generate(pipe, attribute, module=None, per_image_set=contextlib.nullcontext) -> np.ndarray:
    original = getattr(pipe, attribute)
    setattr(pipe, attribute, original if module is None else module)
    try:
        with torch.no_grad(), per_image_set():
            return pipe(class_labels=LABELS, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
                        output_type="np").images
    finally:
        setattr(pipe, attribute, original)


def check_peer_acts(pipe, attribute, peer_name: str, setting: str) -> None:
    original = getattr(pipe, attribute)
    baseline = generate(pipe, attribute)
    module, per_image_set = PEERS[peer_name].build(pipe, attribute, STEPS, setting)
    assert getattr(pipe, attribute) is original and module is not original
    images = generate(pipe, attribute, module, per_image_set)
    assert np.abs(images - baseline).max() > 1e-3, f"{peer_name} left the images as they were: a no-op"
    np.testing.assert_array_equal(generate(pipe, attribute, module, per_image_set), images,
                                  err_msg="per_image_set must start every pipeline call afresh")
    np.testing.assert_array_equal(generate(pipe, attribute), baseline,
                                  err_msg=f"{peer_name} changed the pipeline's own denoiser")
    assert "forward" not in vars(original)


@pytest.mark.parametrize("peer_name, setting", [("fbc", "0.4"), ("taylorseer", "2"), ("magcache", "0.24"),
                                                ("fastercache", "10"), ("pab", "4"), ("seacache", "0.5")])
def test_diffusers_hooks_act_on_a_transformer(dit, peer_name, setting):
    check_peer_acts(*dit, peer_name, setting)


def test_a_diffusers_hook_names_why_it_cannot_apply_to_a_unet(unet):
    with pytest.raises(PeerNotApplicable, match="FirstBlockCache .*transformer_blocks.*UNet2DConditionModel"):
        PEERS["fbc"].build(*unet, STEPS, "0.05")


def test_deepcache_acts_on_a_unet_and_refuses_a_transformer(unet, dit):
    pytest.importorskip("DeepCache")
    check_peer_acts(*unet, "deepcache", "5")
    with pytest.raises(PeerNotApplicable, match="DeepCache caches UNet.*DiTTransformer2DModel"):
        PEERS["deepcache"].build(*dit, STEPS, "3")


def test_deepcache_scalar_timestep_gives_the_unet_the_same_output(unet):
    pipe, _ = unet
    sample, tokens = torch.randn(2, 1, 16, 16), torch.randn(2, 2, pipe.unet.config.cross_attention_dim)
    timesteps = torch.tensor([500, 500])
    args, kwargs = one_timestep_per_call(pipe.unet, (sample, timesteps), {"encoder_hidden_states": tokens})
    assert args[1].ndim == 0
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(*args, **kwargs).sample,
                                   pipe.unet(sample, timesteps, encoder_hidden_states=tokens).sample)


@pytest.mark.parametrize("peer_name", ["cache-dit", "cache-dit-taylorseer"])
def test_cache_dit_acts_on_a_transformer(dit, peer_name):
    pytest.importorskip("cache_dit")
    check_peer_acts(*dit, peer_name, "0.3")


def test_cache_dit_refuses_a_unet(unet):
    pytest.importorskip("cache_dit")
    with pytest.raises(PeerNotApplicable, match="cache-dit caches transformer blocks.*UNet2DConditionModel"):
        PEERS["cache-dit"].build(*unet, STEPS, "0.08")


def test_torchao_int8_acts(dit):
    pytest.importorskip("torchao")
    check_peer_acts(*dit, "torchao-int8", "weight-only")


def test_every_peer_sweeps_settings_holding_its_default():
    for peer in PEERS.values():
        assert peer.default in peer.settings, peer.name
        assert len(set(peer.settings)) == len(peer.settings)
        assert "{" not in peer.describe(peer.default)



@pytest.mark.parametrize("peer_name, model_name, reason", [
    ("fbc", "compositions-sd3", "last block .*context_pre_only"),
    ("seacache", "compositions-sd3", "last block .*context_pre_only"),
    ("fastercache", "shapes-flux", "tensor_format.*packed tokens"),
])
def test_a_diffusers_hook_names_why_it_cannot_apply_to_a_zoo_transformer(peer_name, model_name, reason):
    spec = ZOO[model_name]
    pipe = SimpleNamespace(transformer=spec.build_denoiser(spec.dataset))  # these builds never call the pipeline
    with pytest.raises(PeerNotApplicable, match=reason):
        PEERS[peer_name].build(pipe, "transformer", STEPS, PEERS[peer_name].default)


def test_a_threshold_peer_says_why_it_can_leave_the_images_unchanged():
    for name in ("fbc", "magcache", "seacache", "cache-dit", "cache-dit-taylorseer"):
        assert "at threshold 0.05 the peer reused nothing" in PEERS[name].unchanged("0.05")
    assert PEERS["torchao-int8"].unchanged("dynamic") == ""  # a quantizer always changes the images
