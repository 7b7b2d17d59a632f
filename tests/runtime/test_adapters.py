"""LoRA adapters loaded, re-weighted and removed on an optimized model without optimizing again."""
import copy

import pytest
import torch

import diffc
from diffc.errors import InputError
from tiny_families import first_tensor

TO_Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
CONV_IN = "conv_in"


def _adapter(model, rank=2, seed=0):
    """A peft-format adapter on an attention projection (linear) and the input convolution."""
    generator = torch.Generator().manual_seed(seed)
    weights = dict(model.named_parameters())
    q, conv = weights[TO_Q + ".weight"], weights[CONV_IN + ".weight"]
    return {
        f"unet.{TO_Q}.lora_A.weight": torch.randn(rank, q.shape[1], generator=generator),
        f"unet.{TO_Q}.lora_B.weight": torch.randn(q.shape[0], rank, generator=generator) * 0.1,
        f"unet.{CONV_IN}.lora_A.weight": torch.randn(rank, conv.shape[1], 3, 3, generator=generator),
        f"unet.{CONV_IN}.lora_B.weight": torch.randn(conv.shape[0], rank, 1, 1, generator=generator) * 0.1,
    }


def _merged(model, adapter, scale):
    """The reference: the original model with the adapter fused into its weights."""
    merged = copy.deepcopy(model)
    params = dict(merged.named_parameters())
    with torch.no_grad():
        for module in (TO_Q, CONV_IN):
            down, up = adapter[f"unet.{module}.lora_A.weight"], adapter[f"unet.{module}.lora_B.weight"]
            delta = (up.flatten(1) @ down.flatten(1)).reshape(params[module + ".weight"].shape)
            params[module + ".weight"] += scale * delta
    return merged


def _out(model, inputs):
    with torch.no_grad():
        return first_tensor(model(**inputs))


@pytest.fixture(scope="module")
def optimized():
    """The tiny UNet, its inputs and one optimized copy; each test leaves it without adapters."""
    from tiny_families import families

    model, inputs = families()["unet2dcond"]
    fast = diffc.optimize(model, passes=[])
    yield model, inputs, fast


def test_lora_matches_the_fused_model_at_any_strength_and_unloads_exactly(optimized, tmp_path):
    model, inputs, fast = optimized
    before = {k: v.clone() for k, v in model.state_dict().items()}
    original = _out(fast, inputs)
    adapter = _adapter(model)
    assert fast.load_lora(adapter, scale=0.8) == []
    assert fast.lora_adapters == {"default": 0.8}
    assert torch.allclose(_out(fast, inputs), _out(_merged(model, adapter, 0.8), inputs), atol=1e-5)
    fast.set_lora_scale(-0.5)
    assert torch.allclose(_out(fast, inputs), _out(_merged(model, adapter, -0.5), inputs), atol=1e-5)
    fast.set_lora_scale(0.0)
    assert torch.equal(_out(fast, inputs), original)
    # a second adapter adds to the first
    fast.set_lora_scale(1.0)
    fast.load_lora(_adapter(model, seed=1), scale=1.0, name="other")
    both = _out(fast, inputs)
    fast.unload_lora("other")
    assert not torch.equal(_out(fast, inputs), both)
    assert torch.allclose(_out(fast, inputs), _out(_merged(model, adapter, 1.0), inputs), atol=1e-5)
    fast.save(tmp_path / "merged")
    assert torch.equal(_out(diffc.load(tmp_path / "merged"), inputs), _out(fast, inputs))
    fast.unload_lora()
    assert fast.lora_adapters == {}
    assert torch.equal(_out(fast, inputs), original)
    # captured weights share storage with the user's model, which the adapter must leave alone
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_lora_from_a_safetensors_file_in_the_older_diffusers_format(optimized, tmp_path):
    from safetensors.torch import save_file

    model, inputs, fast = optimized
    adapter = _adapter(model)
    older = {k.replace("lora_A", "lora.down").replace("lora_B", "lora.up").removeprefix("unet."): v
             for k, v in adapter.items()}
    older[f"{TO_Q}.alpha"] = torch.tensor(1.0)  # kohya-style alpha: scale alpha / rank = 0.5 on to_q only
    save_file(older, str(tmp_path / "adapter.safetensors"))
    fast.load_lora(tmp_path / "adapter.safetensors")
    halved = dict(adapter)
    halved[f"unet.{TO_Q}.lora_B.weight"] = adapter[f"unet.{TO_Q}.lora_B.weight"] * 0.5
    try:
        assert torch.allclose(_out(fast, inputs), _out(_merged(model, halved, 1.0), inputs), atol=1e-5)
    finally:
        fast.unload_lora()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:calibrating a bare denoiser")
def test_lora_on_a_quantized_model_requantizes_the_new_weights(family):
    """The adapted weights are requantized; the activation scales stay those calibrated on the
    base weights, so the error grows with the adapter's effect but stays far below ignoring it."""
    model, inputs = family("unet2dcond")
    adapter = _adapter(model)
    fast = diffc.optimize(model, target="torch-int8", passes=["quant"])
    plain = _out(fast, inputs)
    base_error = (plain - _out(model, inputs)).norm() / _out(model, inputs).norm()
    fast.load_lora(adapter)
    reference = _out(_merged(model, adapter, 1.0), inputs)
    error = (_out(fast, inputs) - reference).norm() / reference.norm()
    assert error < 3 * base_error
    assert (plain - reference).norm() / reference.norm() > 4 * error
    fast.unload_lora()
    assert torch.equal(_out(fast, inputs), plain)


def test_bad_adapters_are_refused_with_the_fix(optimized):
    model, inputs, fast = optimized
    original = _out(fast, inputs)
    adapter = _adapter(model)
    with pytest.raises(InputError, match="for another model"):
        fast.load_lora({**adapter, f"unet.{TO_Q}.lora_A.weight": torch.randn(2, 5)})
    with pytest.raises(InputError, match="needs both halves"):
        fast.load_lora({k: v for k, v in adapter.items() if "lora_B" not in k})
    with pytest.raises(InputError, match="not a LoRA weight"):
        fast.load_lora({"unet.conv_in.weight": torch.zeros(1)})
    elsewhere = {k.replace("down_blocks.0", "down_blocks.7"): v for k, v in adapter.items()}
    with pytest.raises(InputError, match="strict=False"):
        fast.load_lora(elsewhere)
    with pytest.raises(InputError, match="no adapter named"):
        fast.set_lora_scale(1.0, name="missing")
    assert torch.equal(_out(fast, inputs), original)  # nothing half-applied
    assert fast.load_lora(elsewhere, strict=False) == [TO_Q.replace("down_blocks.0", "down_blocks.7")]
    with pytest.raises(InputError, match="is loaded"):
        fast.load_lora(adapter)
    fast.unload_lora()
