"""Lowering precision annotations in the torch backend: the CPU path is the exact simulation,
the low-bit layers (int8 via torch._int_mm, fp8 via torch._scaled_mm, int4 via tinygemm or packed
bytes) match it, and targets without annotations fail clearly. Kernel tests on CUDA are marked gpu."""
import pytest
import torch

import diffc
from diffc.backends import parse_target
from diffc.backends.quantized import (INT4_PACKED, INT4_TINYGEMM, INT_MM, SCALED_MM, SIMULATED, Fp8Linear,
                                      Int4TinygemmLinear, Int4WeightOnlyLinear, Int8Linear, kernel_for, lower)
from diffc.backends.torch import TorchBackend
from diffc.errors import TargetError
from diffc.ir import capture
from diffc.ir.partition import build_plan
from diffc.ir.precision import spec_for
from diffc.ir.simulation import simulate
from diffc.passes.quant.layers import PROTECTIONS, quantizable_layers
from digits_tiny import tiny_digits_pipeline


@pytest.fixture(scope="module")
def annotated():
    """The tiny UNet with every unprotected layer annotated in turn int8, fp8 and int4, and
    activation scales from its own example inputs."""
    pipe = tiny_digits_pipeline()
    dg = capture(pipe.unet)
    torch.manual_seed(0)
    flat = [torch.randn(2, 1, 8, 8), torch.tensor([500.0, 500.0]), torch.randn(2, 1, 16)]
    formats = ("int8", "fp8", "int4", "w4a8")
    for index, layer in enumerate(layer for layer in quantizable_layers(dg, PROTECTIONS) if layer.protected is None):
        name = formats[index % len(formats)]
        dg.annotations[layer.node] = {"precision": spec_for(name, 0.02 if name != "fp8" else 0.01).to_json()}
    return dg, flat


def _rows(seed=0, rows=5, features=128):
    torch.manual_seed(seed)
    return torch.randn(rows, features), torch.randn(48, features) * 0.1, torch.randn(48)


@pytest.mark.parametrize("layer, name", [(Int8Linear, "int8"), (Int8Linear, "int8_dynamic"), (Fp8Linear, "fp8"),
                                         (Int4WeightOnlyLinear, "int4"), (Int4TinygemmLinear, "int4")])
def test_low_bit_layers_match_the_simulation(layer, name):
    """On the CPU the tinygemm layer runs the kernel's CPU twin: its packing, block scales and zero
    offsets are the CUDA kernel's, so this checks how the layer hands them over."""
    x, weight, bias = _rows()
    x[1] *= 30.0  # a token far outside the others' range: a dynamic scale follows it, a static one clips it
    x[2] = 0.0
    spec = spec_for(name, 0.05 if name == "int8" else 0.01)
    module = layer(weight, bias, spec, torch.float32 if name.startswith("int8") else torch.bfloat16)
    graph = torch.fx.Graph()
    node = graph.call_function(torch.ops.aten.linear.default,
                               (graph.placeholder("x"), graph.get_attr("weight"), graph.get_attr("bias")))
    graph.output((node,))
    reference = simulate(torch.fx.GraphModule({"weight": weight, "bias": bias}, graph),
                         {node.name: {"precision": spec.to_json()}})(x)[0]
    out = module(x).float()
    tolerance = 1e-5 if name.startswith("int8") else 2e-2  # int32 accumulation is exact; fp8/int4 layers emit bf16
    assert (out - reference).abs().max() <= tolerance * reference.abs().max()


@pytest.mark.parametrize("shape, kernel", [((48, 128), INT4_TINYGEMM), ((48, 256), INT4_TINYGEMM),
                                           ((48, 64), INT4_PACKED), ((44, 128), INT4_PACKED)])
def test_int4_layers_take_tinygemm_where_its_shape_rules_hold(shape, kernel):
    """tinygemm needs N a multiple of 8 and K a multiple of the 128-channel blocks (and of its tiles)."""
    graph = torch.fx.Graph()
    node = graph.call_function(torch.ops.aten.linear.default, (graph.placeholder("x"), graph.get_attr("weight")))
    assert kernel_for(node, spec_for("int4"), torch.randn(shape)) == kernel


def test_int8_layer_pads_small_batches():
    x, weight, bias = _rows(rows=3)
    module = Int8Linear(weight, bias, spec_for("int8", 0.05), torch.float32)
    assert module(x).shape == (3, 48)
    assert torch.allclose(module(x), module(torch.cat([x, x]))[:3])


def test_cpu_lowering_is_the_simulation(annotated):
    dg, flat = annotated
    compiled = TorchBackend().compile(build_plan(dg), "int8")
    assert compiled.input_dtype == torch.float32
    assert compiled.info["kernels"] == {SIMULATED: len(dg.annotations)}
    with torch.no_grad():
        out = compiled.runners["main"](*flat)[0]
        assert torch.equal(out, simulate(dg.module, dg.annotations)(*flat)[0])
        assert not torch.equal(out, dg.module(*flat)[0])


def test_kernel_lowering_matches_the_simulation_on_cpu(annotated):
    """torch._int_mm, torch._scaled_mm and tinygemm (its CPU twin) also run on CPU, so the kernel path is
    checked here."""
    dg, flat = annotated
    lowered, kernels = lower(dg.module, dg.annotations, dg.module, torch.float32)
    assert {INT_MM, SCALED_MM, INT4_TINYGEMM, INT4_PACKED, SIMULATED} == set(kernels.values())
    assert all(kernels[n] == SIMULATED for n, a in dg.annotations.items() if a["precision"]["format"] == "w4a8")
    with torch.no_grad():
        reference = simulate(dg.module, dg.annotations)(*flat)[0]
        out = lowered(*flat)[0].float()
    # the fp8 layers emit bf16 (torch._scaled_mm with row-wise scales), whose rounding moves a
    # few activations across int8 grid points downstream
    assert (out - reference).pow(2).mean() <= 1e-2 * reference.pow(2).mean()


def test_low_bit_target_without_annotations_fails_clearly(family):
    assert str(parse_target("torch-int8")) == "torch-int8"
    with pytest.raises(TargetError, match="has no pass that writes them; add it"):
        diffc.optimize(family("dit")[0], target="torch-int8", passes=[])


def test_fp32_targets_are_unchanged(annotated):
    dg, flat = annotated
    plain = dg.clone()
    plain.annotations.clear()
    compiled = TorchBackend().compile(build_plan(plain), "fp32")
    assert "kernels" not in compiled.info
    with torch.no_grad():
        assert torch.equal(compiled.runners["main"](*flat)[0], dg.module(*flat)[0])


@pytest.mark.gpu
def test_cuda_lowering_uses_the_kernels_and_matches_the_simulation(annotated):
    dg, flat = annotated
    compiled = TorchBackend().compile(build_plan(dg), "mixed", device="cuda")
    assert compiled.input_dtype == torch.bfloat16
    assert {INT_MM, SCALED_MM, INT4_TINYGEMM, INT4_PACKED} <= set(compiled.info["kernels"])
    with torch.no_grad():
        out = compiled.runners["main"](*[t.cuda() for t in flat])[0].float().cpu()
        reference = simulate(dg.module, dg.annotations)(*flat)[0]
    assert (out - reference).pow(2).mean() <= 1e-2 * reference.pow(2).mean()


@pytest.mark.gpu
@pytest.mark.parametrize("layer, name", [(Int8Linear, "int8"), (Fp8Linear, "fp8"), (Int4WeightOnlyLinear, "int4"),
                                         (Int4TinygemmLinear, "int4")])
def test_cuda_layers_match_the_simulation(layer, name):
    if name == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 matmuls need compute capability 8.9 or newer")
    x, weight, bias = _rows(rows=40, features=128)
    spec = spec_for(name, 0.05 if name == "int8" else 0.01)
    module = layer(weight.cuda(), bias.cuda(), spec, torch.bfloat16)
    graph = torch.fx.Graph()
    node = graph.call_function(torch.ops.aten.linear.default,
                               (graph.placeholder("x"), graph.get_attr("weight"), graph.get_attr("bias")))
    graph.output((node,))
    reference = simulate(torch.fx.GraphModule({"weight": weight, "bias": bias}, graph),
                         {node.name: {"precision": spec.to_json()}})(x)[0]
    out = module(x.cuda().to(torch.bfloat16)).float().cpu()
    assert (out - reference).abs().max() <= 2e-2 * reference.abs().max()


def test_quantized_artifact_round_trips(annotated, tmp_path):
    from diffc.api import compile_graph

    dg, flat = annotated
    fast = compile_graph(dg, "torch", "int8")
    fast.save(tmp_path / "int8")
    loaded = diffc.load(tmp_path / "int8")
    assert loaded.target == "torch-int8"
    call = {"sample": flat[0], "timestep": flat[1], "encoder_hidden_states": flat[2], "return_dict": False}
    with torch.no_grad():
        assert torch.equal(loaded(**call)[0], fast(**call)[0])


def test_grouped_activation_scales_stay_simulated():
    """The int8 / fp8 kernels take one activation scale, so a split concatenation is simulated."""
    from diffc.backends.quantized import kernel_for
    from diffc.ir.precision import ActivationQuant, spec_with

    graph = torch.fx.Graph()
    node = graph.call_function(torch.ops.aten.linear.default, (graph.placeholder("x"), graph.get_attr("weight")))
    weight = torch.randn(48, 64)
    assert kernel_for(node, spec_for("int8", 0.05), weight) == INT_MM
    for dtype, name in (("int8", "int8"), ("fp8_e4m3", "fp8")):
        grouped = spec_with(name, ActivationQuant(dtype, None, "mse", (32, 32), (0.05, 0.01), -1))
        assert kernel_for(node, grouped, weight) == SIMULATED


def test_attention_annotations_are_simulated_by_the_cuda_lowering():
    """No low-bit attention kernel: `lower` leaves q/k/v fake-quantized in front of the fused
    attention and says so."""
    from diffc.ir.precision import ActivationQuant, attention_spec

    graph = torch.fx.Graph()
    q, k, v = (graph.placeholder(n) for n in "qkv")
    sdpa = graph.call_function(torch.ops.aten.scaled_dot_product_attention.default, (q, k, v))
    graph.output((sdpa,))
    module = torch.fx.GraphModule({}, graph)
    spec = attention_spec(*(ActivationQuant("int8", s, "mse") for s in (0.02, 0.03, 0.01)))
    annotations = {sdpa.name: {"precision": spec.to_json()}}
    lowered, kernels = lower(module, annotations, module, torch.float32)
    assert kernels == {sdpa.name: SIMULATED}
    torch.manual_seed(0)
    flat = [torch.randn(2, 2, 5, 8) for _ in range(3)]
    assert torch.equal(lowered(*flat)[0], simulate(module, annotations)(*flat)[0])
    assert not torch.equal(lowered(*flat)[0], module(*flat)[0])


@pytest.mark.parametrize("precision", ["fp32", "mixed"])
def test_an_ort_artifact_stores_each_weight_once(annotated, tmp_path, precision):
    """The ONNX models of a saved ort artifact hold no values for the initializers their weight map
    names (the weights file has them, quantized layers' as their int8 / fp8 / int4 values); loading
    puts them back, so the loaded model computes exactly what the saved one did. Only the save makes
    them compact: the compiled plan keeps its models whole."""
    import onnx

    from diffc.api import compile_graph
    from diffc.backends.onnx_weights import STRIPPED, read_weight_map, restore_weights

    pytest.importorskip("onnxruntime")
    dg, flat = annotated
    graph = dg.clone()
    if precision == "fp32":
        graph.annotations = {}
    fast = compile_graph(graph, "ort", precision)
    in_memory = {rel: data for rel, data in fast._compiled.files.items() if rel.endswith(".onnx")}
    assert in_memory and all(STRIPPED not in {p.key for p in onnx.load_from_string(data).metadata_props}
                             for data in in_memory.values())
    folder = fast.save(tmp_path / precision)
    assert fast._compiled.files == {**fast._compiled.files, **in_memory}  # saving changed nothing in memory
    for path in (folder / "onnx").glob("*.onnx"):
        saved = path.read_bytes()
        full = onnx.load_from_string(restore_weights(saved, fast.plan.segments[path.stem].module, graph.annotations))
        mapping, _ = read_weight_map(full)
        held = {n for slots in mapping.values() for s in slots for n in (s.initializer, s.scale) if n}
        held_bytes = sum(len(i.raw_data) for i in full.graph.initializer if i.name in held)
        assert held_bytes > 0 and len(full.SerializeToString()) - len(saved) >= 0.9 * held_bytes
    loaded = diffc.load(folder)
    assert loaded.target == f"ort-{precision}"
    call = {"sample": flat[0], "timestep": flat[1], "encoder_hidden_states": flat[2], "return_dict": False}
    with torch.no_grad():
        assert torch.equal(loaded(**call)[0], fast(**call)[0])
