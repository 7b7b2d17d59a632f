"""A denoising step never waits for the device: the optimized model reads one value on the host per
call, the call's timestep, before any of the call's work is queued (the step it belongs to decides
which segments run); cached steps forecast on the device, and adaptive caching decides from a value
the previous step computed (ir.plan.HostScalar), so nothing is read back between segments."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch.overrides import TorchFunctionMode

import diffc
from diffc.calibration import collect
from diffc.ir import plan as plan_module
from tiny_families import first_tensor

HOST_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__float__,
              torch.Tensor.__int__, torch.Tensor.__bool__, torch.Tensor.__index__}


class _Trace(TorchFunctionMode):
    """Records host reads of tensor values and segment runs, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[str] = []
        self.in_host_scalar = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            self.events.append("previous step's value" if self.in_host_scalar else "read")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("cache", [
    {"schedule": "uniform", "interval": 2, "forecast": True},
    {"schedule": "adaptive", "full_fraction": 0.5, "forecast": True},
], ids=["forecast", "adaptive"])
def test_a_step_reads_its_timestep_first_and_nothing_after(family, monkeypatch, cache):
    model, inputs = family("dit")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        calibration = collect(model, num_steps=6, progress=False)
        fast = diffc.optimize(model, passes=[{"pass": "cache", "min_psnr": None, **cache}], calibration=calibration)
    trace = _Trace()
    run_segment, host_value = plan_module.Plan.run_segment, plan_module.HostScalar.value

    def traced_segment(self, name, env, runners):
        trace.events.append(f"segment {name}")
        return run_segment(self, name, env, runners)

    def traced_value(self):
        trace.in_host_scalar = True
        try:
            return host_value(self)
        finally:
            trace.in_host_scalar = False

    monkeypatch.setattr(plan_module.Plan, "run_segment", traced_segment)
    monkeypatch.setattr(plan_module.HostScalar, "value", traced_value)
    calls, outputs = [], []
    fast.begin_loop(10)
    with torch.no_grad(), trace:
        for step in range(10):
            trace.events.clear()
            timestep = torch.tensor([999 - 100 * step] * 2)
            outputs.append(first_tensor(fast(**{**inputs, "timestep": timestep})))
            calls.append(list(trace.events))
    for events in calls:
        first_segment = next(i for i, event in enumerate(events) if event.startswith("segment"))
        assert events[:first_segment] == ["read"], events
        assert "read" not in events[first_segment:], events
    sequences = {tuple(e for e in events if e.startswith("segment")) for events in calls}
    assert len(sequences) > 1, "some steps should have reused cached work"
    if cache["schedule"] == "adaptive":
        assert any("previous step's value" in events for events in calls)
    assert all(torch.isfinite(out).all() for out in outputs)
