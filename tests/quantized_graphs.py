"""Captured graphs with hand-written precision annotations, for tests of what backends and the
runtime do with them (without running the quantization pass)."""
import torch
import torch.fx

from diffc.ir.onnx_export import export_onnx
from diffc.ir.precision import spec_for
from diffc.passes.quant.layers import PROTECTIONS, quantizable_layers
from diffc.runtime.ranges import measure, quantized_activations


def int8_graph(captured, family: str, inputs):
    """The captured tiny `family` with every unprotected layer at int8 W8A8, activation scales at
    each input's maximum on `inputs` (what the quantization pass writes with activation_range="max")."""
    dg = captured(family).clone()
    layers = [layer for layer in quantizable_layers(dg, PROTECTIONS) if layer.protected is None]
    for layer in layers:
        dg.annotations[layer.node] = {"precision": spec_for("int8", 1.0, "max").to_json()}
    peaks = measure(dg, [inputs], quantized_activations(dg.annotations))
    for layer in layers:
        scale = float(peaks[(layer.node, 0)][0]) / 127
        dg.annotations[layer.node] = {"precision": spec_for("int8", scale, "max").to_json()}
    return dg


def small_layers_onnx(directory):
    """(module, flat inputs, its ONNX export): a Gemm (2-d linear), a MatMul + Add (3-d linear), a
    bias-free MatMul and a Conv, with seeded weights and inputs."""
    import onnx

    torch.manual_seed(0)
    aten = torch.ops.aten
    weights = {"lin.weight": torch.randn(48, 32) * 0.2, "lin.bias": torch.randn(48), "tok.weight": torch.randn(32, 32)
               * 0.2, "tok.bias": torch.randn(32), "nob.weight": torch.randn(16, 32) * 0.2,
               "conv.weight": torch.randn(8, 4, 3, 3) * 0.2, "conv.bias": torch.randn(8)}
    graph = torch.fx.Graph()
    x, tokens, image = graph.placeholder("x"), graph.placeholder("tokens"), graph.placeholder("image")
    get = {name: graph.get_attr(name) for name in weights}
    lin = graph.call_function(aten.linear.default, (x, get["lin.weight"], get["lin.bias"]))
    tok = graph.call_function(aten.linear.default, (tokens, get["tok.weight"], get["tok.bias"]))
    nob = graph.call_function(aten.linear.default, (tok, get["nob.weight"]))
    conv = graph.call_function(aten.conv2d.default, (image, get["conv.weight"], get["conv.bias"], [1, 1], [1, 1]))
    graph.output((lin, nob, conv))
    module = torch.fx.GraphModule(weights, graph)
    flat = [torch.randn(4, 32), torch.randn(2, 9, 32), torch.randn(2, 4, 8, 8)]
    path = export_onnx(module, flat, directory / "small.onnx", ["x", "tokens", "image"], ["lin", "nob", "conv"],
                       [{}, {}, {}])
    return module, flat, onnx.load(str(path))
