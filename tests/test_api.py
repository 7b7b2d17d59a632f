import pytest
import torch

import diffc
from diffc.errors import DiffcError, TargetError
from diffc.backends import parse_target, valid_targets


def test_targets_parse():
    assert str(parse_target("torch")) == "torch-fp32"
    assert str(parse_target("TORCH-bf16")) == "torch-bf16"
    assert "torch-fp16" in valid_targets()


@pytest.mark.parametrize("target, reason", [
    ("nonsense-int3", "unknown target"),
    ("torch-int3", "unknown target"),
    ("trt-int4", "TensorRT is not installed"),
])
def test_bad_targets_list_the_valid_ones(target, reason):
    with pytest.raises(TargetError, match=reason) as info:
        parse_target(target)
    assert "torch-fp32" in str(info.value)


def test_bad_target_fails_before_any_work(family, monkeypatch):
    import diffc.api

    monkeypatch.setattr(diffc.api, "capture", lambda *a, **k: pytest.fail("captured before the target was checked"))
    with pytest.raises(TargetError):
        diffc.optimize(family("dit")[0], target="nonsense-int3")


def test_low_bit_target_defaults_to_caching_then_quantization(family, monkeypatch):
    import diffc.api

    class Stop(Exception):
        pass

    pipelines = []

    def record(manager):
        pipelines.append([p.name for p in manager.passes])
        raise Stop

    monkeypatch.setattr(diffc.api.PassManager, "validate", record)
    for target in ("torch-int8", "torch-mixed", "torch", "torch-bf16"):
        with pytest.raises(Stop):
            diffc.optimize(family("dit")[0], target=target)
    assert pipelines == [["cache", "quant"], ["cache", "quant"], ["cache"], ["cache"]]


@pytest.mark.parametrize("passes", [[], ["cache"]])
def test_low_bit_target_without_quant_fails_before_any_work(family, monkeypatch, passes):
    import diffc.api

    monkeypatch.setattr(diffc.api, "capture", lambda *a, **k: pytest.fail("captured before the pipeline was checked"))
    with pytest.raises(TargetError, match=r"no pass that writes them; add it \(passes=\[..., 'quant'\]\)"):
        diffc.optimize(family("dit")[0], target="torch-int8", passes=passes)


def test_unused_budget_is_refused(family):
    with pytest.raises(TargetError, match="budget size was given but no pass"):
        diffc.optimize(family("dit")[0], passes=[], size=0.5)


def test_pipeline_gives_its_denoiser(family):
    model, inputs = family("dit")

    class Pipe:
        transformer = model

    fast = diffc.optimize(Pipe(), passes=[])
    assert fast.config["num_layers"] == model.config.num_layers
    assert fast.config.num_layers == model.config.num_layers
    with pytest.raises(DiffcError, match="denoiser"):
        diffc.optimize(object())


def test_original_model_is_untouched(family):
    model, inputs = family("dit")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    diffc.optimize(model, target="torch-bf16", passes=[])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.filterwarnings("ignore:calibrating a bare denoiser")
def test_step_schedule_is_anchored_to_the_calibrated_timesteps(family):
    from diffc.calibration import collect

    model, inputs = family("dit")
    calibration = collect(model, num_steps=4, progress=False)
    fast = diffc.optimize(model, passes=[{"pass": "cache", "schedule": "dp"}], calibration=calibration)
    schedule = fast.plan.schedule
    assert len(schedule.steps) == 4 and list(schedule.timesteps) == calibration.step_timesteps
    ran = []
    run_variant = fast.plan.run
    fast.plan.run = lambda variant, *args: ran.append(variant) or run_variant(variant, *args)
    longer = [float(t) for t in torch.linspace(calibration.step_timesteps[0], calibration.step_timesteps[-1], 8)]
    with torch.no_grad():  # an unannounced loop twice as long runs each step's nearest calibrated variant
        for t in longer:
            fast(**{**inputs, "timestep": torch.full_like(inputs["timestep"], t, dtype=torch.float32)})
    nearest = [0] + [min(range(4), key=lambda i: abs(calibration.step_timesteps[i] - t)) for t in longer[1:]]
    assert ran == [schedule.steps[i] for i in nearest] and nearest[-1] == 3


class _StopBeforeCalibrating(Exception):
    pass


def test_passes_that_fit_to_the_calibration_get_more_default_conditions(monkeypatch):
    """prune and moe keep what the calibration's conditions use: their default calibration runs
    FITTING_CONDITIONS conditions (every class of this 10-class pipeline), the others 8."""
    from diffc.calibration.collect import _default_conditions
    from digits_tiny import tiny_digits_pipeline

    asked = {}

    def collect_spy(pipe, **options):
        asked.update(options)
        raise _StopBeforeCalibrating

    monkeypatch.setattr(diffc.api, "collect", collect_spy)
    pipe = tiny_digits_pipeline()
    for passes, count in ((["prune"], diffc.api.FITTING_CONDITIONS), (["moe"], diffc.api.FITTING_CONDITIONS),
                          (["cache"], diffc.api.DEFAULT_CONDITIONS)):
        with pytest.raises(_StopBeforeCalibrating):
            diffc.optimize(pipe, passes=passes, progress=False)
        assert asked["condition_count"] == count
    assert _default_conditions(pipe, diffc.api.FITTING_CONDITIONS) == list(range(10))
    assert _default_conditions(pipe, diffc.api.DEFAULT_CONDITIONS) == [0, 1, 2, 3, 5, 6, 7, 8]


def test_latency_budget_is_judged_by_the_targets_measured_format_times(family):
    # on a CPU torch fake-quantizes every low-bit format, so none is faster than the float layer
    from diffc.errors import PassError

    with pytest.raises(PassError, match=r"latency_ratio=0.2 is below every format's time.*measured on this machine"):
        diffc.optimize(family("dit")[0], target="torch-mixed", passes=["quant"], latency_ratio=0.2)
