"""LoRA adapters loaded, re-weighted and removed on an optimized model without optimizing again."""
import copy
import warnings

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
    # min_psnr=None: on synthetic calibration the floor declines and nothing would be quantized
    fast = diffc.optimize(model, target="torch-int8", passes=[{"pass": "quant", "min_psnr": None}])
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


def test_other_components_keys_are_skipped_with_one_warning(optimized):
    model, inputs, fast = optimized
    adapter = _adapter(model)
    whole = {**adapter,
             "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 8),
             "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(8, 2),
             "text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora_A.weight": torch.zeros(2, 8),
             "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 8),
             "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(1.0)}
    with pytest.warns(UserWarning, match=r"4 keys of text_encoder, 1 keys of text_encoder_2.*"
                                         r"pipe.load_lora_weights\(file\)") as caught:
        fast.load_lora(whole, scale=0.8)
    try:
        assert len([w for w in caught if "text_encoder" in str(w.message)]) == 1
        assert torch.allclose(_out(fast, inputs), _out(_merged(model, adapter, 0.8), inputs), atol=1e-5)
    finally:
        fast.unload_lora()
    only_text = {k: v for k, v in whole.items() if not k.startswith("unet.")}
    with pytest.raises(InputError, match="only other components' keys.*pipe.load_lora_weights"):
        fast.load_lora(only_text)
    with pytest.raises(InputError, match="not a LoRA weight"):
        fast.load_lora({**adapter, "vae.decoder.conv_in.weight": torch.zeros(1)})  # no known component
    assert fast.lora_adapters == {}


def test_recalibrate_on_a_torch_int8_target_clears_the_range_warning(family, captured):
    """torch targets lower new scales by compiling the plan again; the warning names the layer and how far."""
    from diffc.api import compile_graph
    from diffc.ir.precision import quantizable_weight
    from diffc.runtime.ranges import RANGE_MARGIN
    from quantized_graphs import int8_graph

    model, inputs = family("dit")
    dg = int8_graph(captured, "dit", inputs)
    fast = compile_graph(dg, "torch", "int8")
    fast.calibration_inputs = inputs  # one call, as a dict
    ff_in, ff_out = "transformer_blocks.1.ff.net.0.proj", "transformer_blocks.1.ff.net.2.weight"
    weight = dict(model.named_parameters())[ff_in + ".weight"].detach()
    grow = {f"transformer.{ff_in}.lora_A.weight": torch.eye(weight.shape[1]),
            f"transformer.{ff_in}.lora_B.weight": weight}  # doubles the projection
    node = next(n.name for n in dg.graph.nodes if getattr(quantizable_weight(n), "target", None) == ff_out)
    with pytest.warns(UserWarning, match=rf"{node} \(1\.[5-9]\d*x\).*beyond|beyond {RANGE_MARGIN}x.*{node}"):
        fast.load_lora(grow)
    before = fast.plan.graph.annotations[node]["precision"]["activation"]["scale"]
    factors = fast.recalibrate([inputs])
    assert fast.plan.graph.annotations[node]["precision"]["activation"]["scale"] == pytest.approx(
        before * factors[node])
    fast.unload_lora()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fast.load_lora(grow)
    fast.unload_lora()
