"""The quant pass's final-image floor under a size budget: the most sensitive layers with sub-8-bit
weights move to wider formats while the other layers are placed again in the bytes left, so the
floor never costs more than the size the user set; where no share fits and keeps the floor, the
pass changes nothing and says to raise size_ratio."""
import numpy as np
import pytest

from diffc.api import compile_graph
from diffc.errors import PassError
from diffc.ir import lint
from diffc.ir.precision import FORMATS, PER_TOKEN, ActivationQuant, precision_specs
import diffc.passes._search as search
from diffc.passes import PassContext, PassManager
from diffc.passes.quant.floor import RAISED_REASON, BudgetedRaise
from digits_tiny import captured_and_calibrated

FORMATS_ = ("int8", "int4")
BUDGET = {"size_ratio": 1.8, "size_relative_to": "w4a8"}


def _raise(budget, placed=None, dynamic=None):
    # three layers of 100 weights: int8 100 bytes, int4 50, full precision 400
    sizes = np.array([[100.0, 50.0]] * 3)
    objective = np.array([[1.0, 4.0], [1.0, 3.0], [1.0, 2.0]])
    activations = {node: {"int8": ActivationQuant("int8", 0.1)} for node in "abc"}
    return BudgetedRaise(list("abc"), FORMATS_, objective, sizes, np.full(3, 400.0), budget,
                         placed or {"a": "int4", "b": "int4", "c": "int4"}, activations, dynamic or {}, "rule")


def test_a_raised_layer_takes_a_wider_format_and_the_others_make_room():
    within = _raise(budget=200.0, placed={"a": "int8", "b": "int4", "c": "int4"})
    assert within.placement([]) == within.placed  # the least error in 200 bytes: "a" gains most from int8
    # "b" may no longer be int4: the solver moves "a" back down to keep the total
    assert within.placement(["b"]) == {"a": "int4", "b": "int8", "c": "int4"}
    with pytest.raises(PassError, match="budget"):
        within.placement(["b", "c"])  # two int8 layers and one int4 take 250 bytes
    assert within.feasible(["b", "c"], (0.0, 0.5, 1.0)) == (0.0, 0.5)
    roomy = _raise(budget=500.0, placed={"a": "int8", "b": "int4", "c": "int4"})
    assert roomy.placement(["a"])["a"] is None  # above int8 only full precision is left


def test_int8_written_with_run_time_scales_where_the_floor_gave_them():
    within = _raise(budget=200.0, placed={"a": "int8", "b": "int4", "c": "int4"},
                    dynamic={"b": ActivationQuant("int8", dynamic=PER_TOKEN)})
    assert within.written(within.placement(["b"])) == {"a": "int4", "b": "int8_dynamic", "c": "int4"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return captured_and_calibrated(tmp_path_factory.mktemp("cal"))


def _quantize(dg, calibration, denoiser_for=None, **options):
    denoiser_for = denoiser_for or (lambda candidate: compile_graph(candidate, "torch", "fp32"))
    context = PassContext(calibration=calibration, target="trt-mixed", denoiser_for=denoiser_for)
    return PassManager([{"pass": "quant", "samples": 4, "probes": 2, "trajectories": 1, **BUDGET, **options}]).run(
        dg, context)


def test_a_floor_the_budgeted_placement_misses_is_met_within_the_budget(tiny, monkeypatch):
    """The final images as a function of the placement, so the floor's outcome is known: each layer
    raised adds 1 dB to 10 dB, and the floor asks for three. TensorRT takes static int8 scales
    only, so the floor goes straight to raising layers."""
    dg, calibration = tiny

    def final_images(calibration, candidate, items, reference=None):
        raised = sum(entry.get("precision", {}).get("reason") == RAISED_REASON
                     for entry in candidate.annotations.values())
        return {"psnr": 10.0 + raised, "mse": 1.0, "trajectories": 1}

    monkeypatch.setattr(search, "trajectory_error", final_images)
    monkeypatch.setattr(search, "guidance_loss", lambda *args: None)
    monkeypatch.setattr(search, "draw_error", lambda *args: None)
    quantized = _quantize(dg, calibration, denoiser_for=lambda candidate: candidate, min_psnr=13.0,
                          timestep_scales=False)  # judged on re-sampled images of its own
    lint(quantized)
    report = quantized.applied[-1]["report"]
    check = report["final_image_check"]
    assert check["raised_share"] > 0 and len(check["raised"]) >= 3
    assert report["placeable_size_ratio"]["ratio"] <= BUDGET["size_ratio"] + 1e-6
    changed = check["raised_within_budget"]
    specs = precision_specs(quantized.annotations)
    assert {node: spec.format for node, spec in specs.items() if node in changed} == {
        node: change["to"] for node, change in changed.items()}
    sensitivity = {e["node"]: e["sensitivity"] for e in report["layers"] if "sensitivity" in e}
    for node in check["raised"]:  # 4-bit layers, now in wider formats
        assert FORMATS[changed[node]["from"]].weight == "int4" and FORMATS[changed[node]["to"]].weight != "int4"
        assert specs[node].reason == RAISED_REASON
    placed_before = {e["node"]: changed[e["node"]]["from"] if e["node"] in changed else e["format"]
                     for e in report["layers"] if e["node"] in sensitivity}
    four_bit = sorted((node for node, name in placed_before.items() if name and FORMATS[name].weight == "int4"),
                      key=lambda node: sensitivity[node][placed_before[node]], reverse=True)
    assert check["raised"] == four_bit[:len(check["raised"])]  # the most sensitive first


def test_a_floor_no_share_keeps_within_the_budget_changes_nothing_and_says_raise_size_ratio(tiny):
    dg, calibration = tiny
    with pytest.warns(UserWarning, match="within size_ratio.*raise size_ratio"):
        declined = _quantize(dg, calibration, min_psnr=40.0)
    entry = declined.applied[-1]
    assert not entry["modified"] and not declined.annotations
    assert entry["report"]["final_image_check"]["within_size_budget"] > 0
