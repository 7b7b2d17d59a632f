"""Error-compensated (GPTQ) rounding of 4-bit weights: the rounded weights lie on the grid every
backend derives from them, lower the layer's output error on its inputs below rounding to nearest,
and are carried only by layers annotated with a 4-bit format."""
import copy

import pytest
import torch

from diffc.calibration import output_error
from diffc.errors import PassError
from diffc.ir import lint
from diffc.ir.fxutil import attr_value
from diffc.ir.precision import FORMATS, fake_quantize_weight, precision_specs, quantize_weight, spec_for
from diffc.ir.simulation import simulate
from diffc.passes import PassContext, PassManager
from diffc.passes.quant.floor import drop_precision
from diffc.passes.quant.layers import PROTECTIONS, quantizable_layers
from diffc.passes.quant.rounding import gptq, round_four_bit
from digits_tiny import captured_and_calibrated

SCHEME = spec_for("int4").weight


def _correlated(shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(*shape, generator=generator)
    columns = weight[0].numel()
    mixing = torch.randn(columns, columns, generator=generator)
    x = torch.randn(2000, columns, generator=generator) @ mixing + torch.randn(columns, generator=generator)
    return weight, (x.T @ x).double()


def _output_error(weight, rounded, hessian):
    difference = (rounded - weight).double().flatten(1)
    return float(((difference @ hessian) * difference).sum())


@pytest.mark.parametrize("shape", [(24, 300), (8, 20, 3, 3)])  # 300: a partial last block of 128
def test_rounded_weights_lie_on_the_nearest_grid_and_cost_less_output_error(shape):
    weight, hessian = _correlated(shape)
    rounded = gptq(weight, hessian, SCHEME)
    own, nearest = quantize_weight(rounded, SCHEME), quantize_weight(weight, SCHEME)
    assert torch.allclose(own.scale, nearest.scale, rtol=1e-6)  # each block's largest magnitude stays at +-7
    assert torch.allclose(fake_quantize_weight(rounded, SCHEME), rounded, rtol=0, atol=1e-6)
    assert own.values.abs().max() <= 7
    assert (own.values != nearest.values).float().mean() > 0.02
    assert _output_error(weight, rounded, hessian) < 0.7 * _output_error(
        weight, fake_quantize_weight(weight, SCHEME), hessian)


def test_uncorrelated_inputs_leave_nothing_to_compensate():
    """With H = I no column's error can be moved where it costs less: rounding to nearest."""
    weight, _ = _correlated((16, 256))
    rounded = gptq(weight, torch.eye(256, dtype=torch.float64), SCHEME)
    assert torch.equal(quantize_weight(rounded, SCHEME).values, quantize_weight(weight, SCHEME).values)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return captured_and_calibrated(tmp_path_factory.mktemp("cal"))


def _int4(dg, calibration, **options):
    return PassManager([{"pass": "quant", "samples": 4, "probes": 2, "trajectories": 1, "min_psnr": None,
                         **options}]).run(dg, PassContext(calibration=calibration, target="torch-int4"))


def test_the_pass_carries_gptq_weights_on_its_four_bit_layers_with_less_error(tiny):
    dg, calibration = tiny
    originals = {name: value.clone() for name, value in dg.weights().items()}
    rounded, nearest = _int4(dg, calibration), _int4(dg, calibration, rounding="nearest")
    lint(rounded)
    assert all(torch.equal(value, originals[name]) for name, value in dg.weights().items())  # input untouched
    report = rounded.applied[-1]["report"]["four_bit_rounding"]
    assert report["layers"] > 0 and nearest.applied[-1]["report"]["four_bit_rounding"] is None
    layers = {layer.node: layer for layer in quantizable_layers(rounded, PROTECTIONS)}
    specs = precision_specs(rounded.annotations)
    for node, errors in report["relative_output_error"].items():
        assert FORMATS[specs[node].format].weight == "int4" and errors["gptq"] < errors["nearest"]
        weight = attr_value(rounded.module, layers[node].weight)
        assert not torch.equal(weight, originals[layers[node].weight])
        assert torch.allclose(fake_quantize_weight(weight, SCHEME), weight, rtol=0, atol=1e-6)
    sensitivity = {name: {e["node"]: e["sensitivity"]["int4"] for e in g.applied[-1]["report"]["layers"]
                          if "sensitivity" in e} for name, g in (("gptq", rounded), ("nearest", nearest))}
    pairs = [(sensitivity["gptq"][node], sensitivity["nearest"][node]) for node in report["relative_output_error"]]
    # the report rounds to 4 digits: a small discount can vanish there
    assert all(gptq <= nearest for gptq, nearest in pairs) and any(gptq < nearest for gptq, nearest in pairs)
    for node, layer in layers.items():
        if node not in specs:  # protected layers keep their weights
            assert torch.equal(attr_value(rounded.module, layer.weight), originals[layer.weight])
    errors = {name: output_error(calibration, simulate(g.module, g.annotations), g).mean_relative
              for name, g in (("gptq", rounded), ("nearest", nearest))}
    assert errors["gptq"] < errors["nearest"]


def test_a_layer_moved_out_of_four_bits_gets_its_original_weight_back(tiny):
    dg, calibration = tiny
    annotated = dg.clone()
    annotated.annotations = copy.deepcopy(_int4(dg, calibration).annotations)
    layers = [layer for layer in quantizable_layers(annotated, PROTECTIONS) if layer.node in annotated.annotations]
    rounding = round_four_bit(annotated, layers, calibration, None)
    node = next(iter(rounding.targets))
    target = rounding.targets[node]
    rounding.apply(annotated)
    assert torch.equal(attr_value(annotated.module, target), rounding.rounded[node])
    raised = annotated.clone()
    raised.annotations = drop_precision(raised.annotations, [node])
    rounding.apply(raised)
    assert torch.equal(attr_value(raised.module, target), attr_value(dg.module, target))
    assert torch.equal(attr_value(annotated.module, target), rounding.rounded[node])  # the other copy keeps its own


def test_an_unknown_rounding_is_refused_with_the_choices(tiny):
    dg, calibration = tiny
    with pytest.raises((ValueError, PassError), match="rounding must be one of .*gptq.*nearest"):
        _int4(dg, calibration, rounding="stochastic")
