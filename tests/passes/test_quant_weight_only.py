"""Layers kept at full-precision activations for the timestep path keep them but store and compute
int8 weights (diffc/passes/quant/weight_only.py; layers kept for speed: test_quant_speed.py): where
the target runs them, when the final images keep the floor with them, what the artifact stores, and
what the report says."""
import itertools

import pytest
import torch

import diffc.passes.quant.weight_only as weight_only
from diffc.api import compile_graph
from diffc.ir import lint
from diffc.ir.precision import INT8, precision_specs, weight_bytes
from diffc.ir.simulation import simulate
from diffc.passes import PassContext, PassManager
from diffc.passes.quant.layers import PROTECTIONS, REASONS, TIMESTEP_PATH, quantizable_layers
from digits_tiny import captured_and_calibrated

QUICK = {"samples": 4, "probes": 2, "trajectories": 1}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return captured_and_calibrated(tmp_path_factory.mktemp("cal"))


def _quantize(dg, calibration, target="torch-int8", **options):
    context = PassContext(calibration=calibration, target=target,
                          denoiser_for=lambda candidate: compile_graph(candidate, "torch", "fp32"))
    return PassManager([{"pass": "quant", **QUICK, **options}]).run(dg, context)


def _timestep_path(dg):
    return [layer for layer in quantizable_layers(dg, PROTECTIONS) if layer.protected == REASONS[TIMESTEP_PATH]]


@pytest.fixture(autouse=True)
def any_saving(monkeypatch):
    """The tiny UNet's timestep path is a few percent of its weights, under MIN_SAVING (test_quant.py)."""
    monkeypatch.setattr(weight_only, "MIN_SAVING", 0.0)


@pytest.fixture(scope="module")
def quantized(tiny):
    dg, calibration = tiny
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(weight_only, "MIN_SAVING", 0.0)
        return _quantize(dg, calibration, min_psnr=0.0)


def test_timestep_path_layers_get_int8_weights_and_keep_full_precision_activations(tiny, quantized):
    dg, _ = tiny
    lint(quantized)
    path = _timestep_path(quantized)
    assert path and not dg.annotations
    specs = precision_specs(quantized.annotations)
    for layer in path:
        spec = specs[layer.node]
        assert spec.format == "int8_weight" and spec.activation is None and spec.weight.dtype == INT8
        assert spec.weight.granularity == "per_channel" and "TFMQ-DM" in spec.reason
    report = quantized.applied[-1]["report"]
    check = report["weight_only_int8"]
    group = check["groups"]["timestep_path"]
    assert check["layers"] == [layer.node for layer in path] == group["layers"] and group["kept"]
    assert weight_only._acceptable(group["held_out_psnr_without"], group["held_out_psnr"], 0.0)
    entries = {e["node"]: e for e in report["layers"]}
    for layer in path:
        entry = entries[layer.node]
        assert entry["format"] is None and entry["weight_format"] == "int8_weight"
        assert entry["bytes_after"] == weight_bytes(layer.shape, "int8_weight") < entry["bytes_before"] / 3
    assert report["weight_bytes_after"] == sum(e["bytes_after"] for e in report["layers"])


def test_the_weights_alone_are_quantized_with_a_small_error(tiny, quantized):
    """Only the timestep path's weights: their outputs move by about int8's per-channel rounding."""
    dg, calibration = tiny
    only_weights = {node: entry for node, entry in quantized.annotations.items()
                    if entry.get("precision", {}).get("format") == "int8_weight"}
    record = next(calibration.records())
    flat = [record.inputs[spec.name] for spec in dg.signature.inputs]
    with torch.no_grad():
        got, want = simulate(dg.module, only_weights)(*flat)[0], dg.module(*flat)[0]
    error = float((got - want).norm() / want.norm())
    assert 0 < error < 0.01


@pytest.mark.parametrize("target, options, why", [
    ("trt-int8", {}, "does not run int8 weight-only layers"),
    ("torch-int8", {"weight_only_int8": False}, "weight_only_int8=False"),
])
def test_left_at_full_precision_where_the_target_or_the_user_says_so(tiny, target, options, why):
    dg, calibration = tiny
    result = _quantize(dg, calibration, target, min_psnr=None, **options)
    check = result.applied[-1]["report"]["weight_only_int8"]
    assert check["layers"] == [] and why in check["why"]
    assert not any(precision_specs(result.annotations).get(layer.node) for layer in _timestep_path(result))


@pytest.mark.parametrize("without, with_them", [(-1.0, -1.0), (5.0, 3.5)],
                         ids=["under-the-floor", "losing-1.5-dB-near-the-floor"])
def test_left_at_full_precision_when_the_final_images_miss_the_floor_or_lose_too_much(tiny, monkeypatch, without,
                                                                                       with_them):
    dg, calibration = tiny
    figures = itertools.chain([without], itertools.repeat(with_them))  # the group, then each part of it tried

    def measured(calibration, denoiser, items, reference):
        return {"mse": 1.0, "psnr": next(figures), "trajectories": 1}

    monkeypatch.setattr(weight_only, "trajectory_error", measured)
    result = _quantize(dg, calibration, min_psnr=0.0)
    check = result.applied[-1]["report"]["weight_only_int8"]
    group = check["groups"]["timestep_path"]
    assert check["layers"] == [] and not group["kept"] and "lose more than 1.0 dB" in group["why"]
    assert "10% of its error" in group["why"] and "least sensitive 25%" in group["why"]
    assert group["partial"] and not any(part["passes"] for part in group["partial"])
    assert (group["held_out_psnr_without"], group["held_out_psnr"]) == (without, with_them)
    assert not any(precision_specs(result.annotations).get(layer.node) for layer in _timestep_path(result))
    assert any(spec.format == "int8" for spec in precision_specs(result.annotations).values())  # the rest stands


def test_a_group_the_images_refuse_keeps_its_most_sensitive_layers_and_stores_the_rest_as_int8(tiny, monkeypatch):
    """The whole timestep path loses 15 dB; its least sensitive half (by bytes saved) loses 0.5 dB and
    three quarters lose 20: the half is taken, found by bisection (half first, then three quarters)."""
    dg, calibration = tiny
    figures = iter([50.0, 35.0, 49.5, 30.0])

    def measured(calibration, denoiser, items, reference):
        return {"mse": 1.0, "psnr": next(figures), "trajectories": 1}

    monkeypatch.setattr(weight_only, "trajectory_error", measured)
    result = _quantize(dg, calibration, min_psnr=40.0, timestep_scales=False)
    group = result.applied[-1]["report"]["weight_only_int8"]["groups"]["timestep_path"]
    assert group["kept"] and group["held_out_psnr"] == 49.5
    assert [(part["share"], part["passes"]) for part in group["partial"]] == [(0.5, True), (0.75, False)]
    path = {layer.node: layer for layer in _timestep_path(result)}
    taken = set(group["layers"])
    assert taken and taken < set(path)
    specs = precision_specs(result.annotations)
    assert {node for node in path if specs.get(node) is not None and specs[node].format == "int8_weight"} == taken
    saved = {node: weight_bytes(layer.shape, None) - weight_bytes(layer.shape, "int8_weight")
             for node, layer in path.items()}
    assert sum(saved[node] for node in taken) <= 0.5 * sum(saved.values())
    lint(result)


def test_the_artifact_stores_them_as_int8_and_loads_the_same_model(tiny, quantized, tmp_path):
    import diffc
    from safetensors.torch import load_file

    dg, calibration = tiny
    model = compile_graph(quantized, "torch", "int8")
    folder = model.save(tmp_path / "artifact")
    stored = load_file(str(folder / "weights.safetensors"))
    for layer in _timestep_path(quantized):
        assert stored[layer.weight + ".quantized_values"].dtype == torch.int8
    record = next(calibration.records())
    loaded = diffc.load(folder)
    call = {**record.inputs, "return_dict": False}
    with torch.no_grad():
        assert torch.equal(loaded(**call)[0], model(**call)[0])


def test_a_weight_several_layers_read_keeps_its_values_and_the_rest_lowers_to_onnx(trained_dit):
    """DiT computes block 0's conditioning embedding twice from the same weights; ONNX export merges
    the two, so those layers stay as they are and the ort-int8 model compiles."""
    from collections import Counter

    dg, calibration = trained_dit
    readers = Counter(layer.weight for layer in quantizable_layers(dg, PROTECTIONS))
    shared = {layer.node for layer in quantizable_layers(dg, PROTECTIONS) if readers[layer.weight] > 1}
    assert shared
    result = PassManager([{"pass": "quant", **QUICK, "min_psnr": None}]).run(
        dg, PassContext(calibration=calibration, target="ort-int8"))
    taken = set(result.applied[-1]["report"]["weight_only_int8"]["layers"])
    assert taken and not taken & shared
    record = next(calibration.records())
    compiled = compile_graph(result, "ort", "int8")
    with torch.no_grad():
        out = compiled(**record.inputs)[0]
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("before, after, floor, kept", [
    (61.6, 55.3, 40.0, True),  # 6 dB lost far above the floor: 2% of the error the floor allows
    (45.0, 43.5, 40.0, False),  # 1.5 dB lost near it: 14% of it
    (45.0, 44.2, 40.0, True),  # within 1 dB
    (41.0, 39.5, 40.0, False),  # under the floor
    (float("inf"), 50.0, 40.0, True),  # nothing to lose against: the floor decides
])
def test_a_loss_is_judged_against_the_error_the_floor_allows(before, after, floor, kept):
    assert weight_only._acceptable(before, after, floor) is kept
