"""LoRA adapters on ONNX Runtime targets: the segments' initializers are overwritten in place (no export),
quantized layers requantize, a saved artifact holds the merged weights, and activation ranges that an
adapter moves are reported and recalibrated."""
from __future__ import annotations

import copy
import warnings

import onnx
import pytest
import torch

import diffc
from diffc.api import compile_graph
from diffc.backends.onnx_weights import restore_weights
from diffc.backends.onnxruntime import OnnxRuntimeBackend, _lower
from diffc.errors import TargetError
from diffc.ir.precision import quantizable_weight
from diffc.runtime.ranges import RANGE_MARGIN
from quantized_graphs import int8_graph
from tiny_families import first_tensor

pytest.importorskip("onnxruntime")

TO_Q = "transformer_blocks.0.attn1.to_q"  # a linear the exporter stores transposed under a generated name
PATCH = "pos_embed.proj"  # a convolution stored under its own name
FF_IN, FF_OUT = "transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff.net.2"


def _adapter(model, seed=0, size=0.1):
    generator = torch.Generator().manual_seed(seed)
    weights = dict(model.named_parameters())
    q, conv = weights[TO_Q + ".weight"], weights[PATCH + ".weight"]
    return {f"transformer.{TO_Q}.lora_A.weight": torch.randn(2, q.shape[1], generator=generator),
            f"transformer.{TO_Q}.lora_B.weight": torch.randn(q.shape[0], 2, generator=generator) * size,
            f"transformer.{PATCH}.lora_A.weight": torch.randn(2, conv.shape[1], 2, 2, generator=generator),
            f"transformer.{PATCH}.lora_B.weight": torch.randn(conv.shape[0], 2, 1, 1, generator=generator) * size}


def _grow_ff(model, factor):
    """A full-rank adapter that multiplies the first FFN projection by `factor` (its output, the
    input of the quantized second projection, grows about as much)."""
    weight = dict(model.named_parameters())[FF_IN + ".weight"].detach()
    return {f"transformer.{FF_IN}.lora_A.weight": torch.eye(weight.shape[1]),
            f"transformer.{FF_IN}.lora_B.weight": (factor - 1) * weight}


def _merged(model, adapter, scale=1.0):
    merged = copy.deepcopy(model)
    params = dict(merged.named_parameters())
    with torch.no_grad():
        for key in adapter:
            if ".lora_A." in key:
                module = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
                down, up = adapter[key], adapter[key.replace("lora_A", "lora_B")]
                weight = params[module + ".weight"]
                weight += scale * (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
    return merged


def _out(model, inputs):
    with torch.no_grad():
        return first_tensor(model(**inputs)).float()


def _relative(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture
def no_export(monkeypatch):
    """Counts ONNX exports; a LoRA swap must not cause any."""
    calls = []

    def counted(*args, **kwargs):
        calls.append(args)
        raise AssertionError("a LoRA swap exported the plan to ONNX again")

    monkeypatch.setattr(torch.onnx, "export", counted)
    monkeypatch.setattr("diffc.ir.onnx_export.export_onnx", counted)
    return calls


@pytest.fixture(scope="module")
def dit_ort():
    from conftest import _family

    model, inputs = _family("dit")
    return model, inputs, diffc.optimize(model, target="ort", passes=[])


def test_lora_on_ort_matches_the_torch_target_without_an_export(dit_ort, captured, no_export):
    model, inputs, fast = dit_ort
    reference = compile_graph(captured("dit").clone(), "torch", "fp32")
    original = _out(fast, inputs)
    adapter = _adapter(model)
    for target in (fast, reference):
        target.load_lora(adapter, scale=0.8)
    assert (_out(fast, inputs) - _out(reference, inputs)).abs().max() <= 1e-4
    assert (_out(fast, inputs) - _out(_merged(model, adapter, 0.8), inputs)).abs().max() <= 1e-4
    fast.set_lora_scale(-0.5)
    assert (_out(fast, inputs) - _out(_merged(model, adapter, -0.5), inputs)).abs().max() <= 1e-4
    fast.set_lora_scale(0.0)
    assert torch.equal(_out(fast, inputs), original)  # the base initializers' bytes are back
    fast.set_lora_scale(1.0)
    fast.unload_lora()
    assert torch.equal(_out(fast, inputs), original)
    assert no_export == []


def test_a_saved_ort_artifact_holds_the_merged_weights(dit_ort, tmp_path, no_export):
    model, inputs, fast = dit_ort
    adapter = _adapter(model, seed=1)
    fast.load_lora(adapter)
    try:
        fast.save(tmp_path / "merged")
        loaded = diffc.load(tmp_path / "merged")  # opens the saved ONNX files: no export either
        assert torch.equal(_out(loaded, inputs), _out(fast, inputs))
        assert (_out(loaded, inputs) - _out(_merged(model, adapter), inputs)).abs().max() <= 1e-4
    finally:
        fast.unload_lora()
    assert no_export == []


def _saved_model(fast):
    """The main segment's ONNX model as an artifact saves it, with its weights put back."""
    return restore_weights(fast._compiled.files["onnx/main.onnx"], fast.plan.segments["main"].module,
                           fast.plan.graph.annotations)


def test_fp16_initializers_take_the_adapter_in_float16(dit_ort):
    model, inputs, fast = dit_ort
    plan = fast.plan
    fp16 = _lower(onnx.load_from_string(_saved_model(fast)), plan, "main", "fp16", torch.device("cpu"))
    half = diffc.runtime.OptimizedModel(OnnxRuntimeBackend().compile(plan, "fp16", models={
        "main": fp16.SerializeToString()}))
    adapter = _adapter(model, size=0.3)
    half.load_lora(adapter)
    try:
        stored = onnx.load_from_string(half._compiled.files["onnx/main.onnx"])
        assert {i.data_type for i in stored.graph.initializer if i.name == PATCH + ".weight"} == {10}  # FLOAT16
        expected = _out(_merged(model, adapter), inputs)
        assert (_out(half, inputs) - expected).abs().max() <= 1e-2 * expected.abs().max()
        assert (_out(half, inputs) - _out(model, inputs)).abs().max() > 5e-2 * expected.abs().max()
    finally:
        half.unload_lora()


def test_a_model_without_a_weight_map_refuses_in_place_weights(dit_ort):
    model, inputs, fast = dit_ort
    stripped = onnx.load_from_string(_saved_model(fast))
    kept = [p for p in stripped.metadata_props if not p.key.startswith("diffc.weights")]
    del stripped.metadata_props[:]
    stripped.metadata_props.extend(kept)
    old = diffc.runtime.OptimizedModel(OnnxRuntimeBackend().compile(fast.plan, "fp32", models={
        "main": stripped.SerializeToString()}))
    before = _out(old, inputs)
    with pytest.raises(TargetError, match="records no weight map.*re-create it"):
        old.load_lora(_adapter(model))
    assert old.lora_adapters == {} and torch.equal(_out(old, inputs), before)  # nothing half-applied
    assert torch.equal(_out(fast, inputs), before)  # the plan's weights are the base ones again


@pytest.fixture(scope="module")
def dit_int8():
    from conftest import _captured, _family

    model, inputs = _family("dit")
    return model, inputs, compile_graph(int8_graph(_captured, "dit", inputs), "ort", "int8")


def _range_warnings(caught):
    return [str(w.message) for w in caught if "quantized layer" in str(w.message)]


def test_int8_lora_requantizes_and_warns_when_a_range_moves(dit_int8, no_export):
    model, inputs, fast = dit_int8
    fast.calibration_inputs = [inputs]
    plain = _out(fast, inputs)
    base_error = _relative(plain, _out(model, inputs))
    small = _adapter(model, size=0.02)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast.load_lora(small)
    assert _range_warnings(caught) == []  # a small adapter stays within the calibrated ranges
    reference = _out(_merged(model, small), inputs)
    error = _relative(_out(fast, inputs), reference)
    assert not torch.equal(_out(fast, inputs), plain) and error < 1.5 * base_error
    fast.unload_lora()
    assert torch.equal(_out(fast, inputs), plain)

    grow = _grow_ff(model, 3.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast.load_lora(grow)
    [message] = _range_warnings(caught)
    ff_out = next(n.name for n in fast.plan.graph.graph.nodes
                  if getattr(quantizable_weight(n), "target", None) == FF_OUT + ".weight")
    assert f"{ff_out} (2." in message and f"{RANGE_MARGIN}x" in message and "fast.recalibrate()" in message
    reference = _out(_merged(model, grow), inputs)
    clipped = _relative(_out(fast, inputs), reference)
    assert clipped < 0.8 * _relative(plain, reference)  # far closer than ignoring the adapter

    factors = fast.recalibrate()
    assert factors[ff_out] > RANGE_MARGIN
    assert _relative(_out(fast, inputs), reference) < clipped  # no more clipping
    fast.unload_lora()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast.load_lora(grow)  # the scales are those of the adapter now
    assert _range_warnings(caught) == []
    fast.unload_lora()
    assert no_export == []


def test_int8_lora_without_calibration_inputs_says_so(dit_int8):
    model, inputs, fast = dit_int8
    fast.calibration_inputs = None
    with pytest.warns(UserWarning, match=r"could not be checked.*fast.recalibrate\(calibration_set\)"):
        fast.load_lora(_adapter(model, size=0.02))
    fast.unload_lora()
    with pytest.raises(diffc.errors.InputError, match="recalibrate needs calibration inputs"):
        fast.recalibrate()


@pytest.fixture(scope="module")
def dit_dynamic():
    """The int8 DiT with every quantized linear on dynamic per-token scales: on ORT, MatMulIntegerToFloat
    layers whose int8 weight is stored [in, out]; and the torch simulation of the same graph."""
    from conftest import _captured, _family
    from diffc.ir.precision import PER_TOKEN, ActivationQuant, spec_with

    model, inputs = _family("dit")
    dg = int8_graph(_captured, "dit", inputs)
    dynamic = spec_with("int8_dynamic", ActivationQuant("int8", dynamic=PER_TOKEN)).to_json()
    for node in dg.module.graph.nodes:
        if node.name in dg.annotations and node.target == torch.ops.aten.linear.default:
            dg.annotations[node.name] = {"precision": dynamic}
    return model, inputs, compile_graph(dg, "ort", "int8"), compile_graph(dg, "torch", "int8")


def test_lora_on_integer_matmul_layers_matches_the_torch_simulation(dit_dynamic, no_export):
    model, inputs, on_ort, simulated = dit_dynamic
    adapter = _adapter(model)
    outputs = []
    for fast in (simulated, on_ort):  # one at a time: both were compiled from one graph and share its weights
        plain = _out(fast, inputs)
        fast.load_lora(adapter)
        outputs.append(_out(fast, inputs))
        fast.unload_lora()
        assert torch.equal(_out(fast, inputs), plain)
    # integer and float sums round differently; a later layer's dynamic rounding can flip a level (1.9e-7
    # with or without the adapter)
    assert _relative(outputs[1], outputs[0]) < 1e-6
    assert _relative(outputs[1], _out(_merged(model, adapter), inputs)) < 1e-2
    assert no_export == []
