"""Quantized weights stored as their values and scales: exact round trips, which weights qualify,
and an artifact of a W8A8 model at about a quarter of the fp32 bytes."""
import pytest
import torch

import diffc
from diffc.api import compile_graph
from diffc.ir import capture
from diffc.ir.precision import FORMATS, dequantize_weight, quantize_weight, spec_for
from diffc.ir.weight_storage import (VALUES, pack_int4, pack_weights, quantized_weight_schemes, unpack_int4,
                                     unpack_weights)
from diffc.passes.quant.layers import PROTECTIONS, quantizable_layers
from digits_tiny import tiny_digits_pipeline


def test_int4_packs_two_per_byte_and_unpacks_signed():
    values = torch.tensor([-8.0, 7.0, 0.0, -1.0, 3.0])
    packed = pack_int4(values)
    assert packed.dtype == torch.uint8 and packed.numel() == 3
    assert torch.equal(unpack_int4(packed, (5,)), values)


@pytest.mark.parametrize("name", ["int8", "fp8", "int4", "bf16"])
def test_a_stored_weight_quantizes_back_to_the_same_values_and_scales(name):
    torch.manual_seed(0)
    weight = torch.randn(48, 200) * torch.rand(48, 1) * 3
    weight[5] = 0.0  # a channel of zeros keeps its scale of one
    scheme = spec_for(name, 0.05).weight
    packed, entries = pack_weights({"w": weight, "other": torch.ones(3)}, {"w": scheme})
    assert "w" not in packed and torch.equal(packed["other"], torch.ones(3))
    assert packed["w" + VALUES].element_size() * packed["w" + VALUES].numel() < weight.numel() * 4 / 1.9
    loaded = unpack_weights(packed, entries)["w"]
    assert loaded.shape == weight.shape and loaded.dtype == weight.dtype
    again, original = quantize_weight(loaded, scheme), quantize_weight(weight, scheme)
    assert torch.equal(again.values, original.values)
    assert (again.scale is None and original.scale is None) or torch.equal(again.scale, original.scale)
    assert torch.equal(dequantize_weight(again), dequantize_weight(original))


def _linear_graph():
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    shared, own = graph.get_attr("shared"), graph.get_attr("own")
    first = graph.call_function(torch.ops.aten.linear.default, (x, shared), name="first")
    second = graph.call_function(torch.ops.aten.linear.default, (first, own), name="second")
    third = graph.call_function(torch.ops.aten.linear.default, (second, shared), name="third")
    graph.output((third,))
    return torch.fx.GraphModule({"shared": torch.randn(8, 8), "own": torch.randn(8, 8)}, graph)


def test_only_weights_every_reader_quantizes_alike_are_stored_quantized():
    module = _linear_graph()
    int8, int4 = spec_for("int8", 0.05).to_json(), spec_for("int4").to_json()
    annotations = {"first": {"precision": int8}, "second": {"precision": int8}}
    assert set(quantized_weight_schemes([module], annotations, {})) == {"own"}  # third reads shared unquantized
    annotations["third"] = {"precision": int4}
    assert set(quantized_weight_schemes([module], annotations, {})) == {"own"}  # two schemes for shared
    annotations["third"] = {"precision": int8}
    assert set(quantized_weight_schemes([module], annotations, {})) == {"own", "shared"}
    assert FORMATS["int8"].weight == "int8"


def test_a_w8a8_artifact_takes_about_a_quarter_of_the_fp32_bytes_and_reloads_exactly(tmp_path):
    dg = capture(tiny_digits_pipeline().unet)
    full = compile_graph(dg.clone(), "torch", "fp32")
    for layer in quantizable_layers(dg, PROTECTIONS):
        dg.annotations[layer.node] = {"precision": spec_for("int8", 0.02).to_json()}
    fast = compile_graph(dg, "torch", "int8")
    full.save(tmp_path / "fp32")
    fast.save(tmp_path / "int8")
    ratio = (tmp_path / "int8" / "weights.safetensors").stat().st_size / \
        (tmp_path / "fp32" / "weights.safetensors").stat().st_size
    assert ratio < 0.35
    torch.manual_seed(0)
    call = {"sample": torch.randn(2, 1, 8, 8), "timestep": torch.tensor([500.0, 500.0]),
            "encoder_hidden_states": torch.randn(2, 1, 16), "return_dict": False}
    with torch.no_grad():
        assert torch.equal(diffc.load(tmp_path / "int8")(**call)[0], fast(**call)[0])
