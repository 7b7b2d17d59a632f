"""The same model, seeds and config give bit-identical plans and artifacts on CPU."""
from pathlib import Path

import pytest
import torch

import diffc
from diffc.calibration import collect


def _artifact_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _optimize_and_save(model: torch.nn.Module, folder: Path, passes: list[str], target: str,
                       options: dict[str, dict]) -> dict[str, bytes]:
    calibration = collect(model, num_steps=3, progress=False)
    pipeline = [{"pass": name, **options.get(name, {})} for name in passes]
    diffc.optimize(model, target=target, passes=pipeline, calibration=calibration).save(folder)
    return _artifact_bytes(folder)


@pytest.mark.filterwarnings("ignore:calibrating a bare denoiser")
@pytest.mark.parametrize("passes, target, options", [
    (["prune", "cache"], "torch", {"prune": {"amount": 0.2, "additivity_sets": 2}}),
    pytest.param(["moe", "quant"], "torch-mixed", {"quant": {"samples": 3, "probes": 1, "trajectories": 1}},
                 marks=pytest.mark.slow),
])
def test_same_inputs_give_the_same_artifact_bytes(family, tmp_path, passes, target, options):
    model, _ = family("dit")
    first = _optimize_and_save(model, tmp_path / "first", passes, target, options)
    second = _optimize_and_save(model, tmp_path / "second", passes, target, options)
    assert first.keys() == second.keys()
    differing = [name for name in first if first[name] != second[name]]
    assert not differing, f"files that differ between two identical runs: {differing}"


def test_recorded_config_does_not_depend_on_the_process(captured):
    # diffusers builds _use_default_values from a set: its order follows PYTHONHASHSEED
    defaulted = captured("dit").config["_use_default_values"]
    assert defaulted and defaulted == sorted(defaulted)
