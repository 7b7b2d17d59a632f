"""Captured graphs with hand-written precision annotations, for tests of what backends and the
runtime do with them (without running the quantization pass)."""
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
