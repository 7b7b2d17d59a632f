"""diffc.replay re-runs the recorded passes: the record of applied passes is a recipe."""
from pathlib import Path

import pytest

import diffc
from diffc.calibration import collect


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.filterwarnings("ignore:calibrating a bare denoiser")
def test_replay_reproduces_the_artifact_bit_for_bit(family, tmp_path):
    model, _ = family("dit")
    calibration = collect(model, num_steps=3, progress=False)
    passes = [{"pass": "prune", "amount": 0.2, "additivity_sets": 0}, {"pass": "cache"}]
    fast = diffc.optimize(model, target="torch", passes=passes, calibration=calibration)
    fast.save(tmp_path / "original")
    diffc.replay(tmp_path / "original", model, calibration=calibration).save(tmp_path / "from-artifact")
    diffc.replay(fast, model, calibration=calibration).save(tmp_path / "from-model")
    original = _files(tmp_path / "original")
    assert _files(tmp_path / "from-artifact") == original
    assert _files(tmp_path / "from-model") == original
    graph = diffc.replay(fast.plan.graph, model, calibration=calibration)
    assert [entry["pass"] for entry in graph.applied] == ["prune", "cache"]
    assert graph.step_plan == fast.plan.graph.step_plan


@pytest.mark.filterwarnings("ignore:calibrating a bare denoiser")
def test_replay_gives_the_passes_the_budget_they_read(family, tmp_path):
    model, _ = family("dit")
    calibration = collect(model, num_steps=2, progress=False)
    passes = [{"pass": "quant", "samples": 2, "probes": 1, "trajectories": 1}]
    fast = diffc.optimize(model, target="torch-mixed", passes=passes, calibration=calibration, size_ratio=0.5)
    assert fast.report[0]["budget"] == {"size_ratio": 0.5}
    fast.save(tmp_path / "original")
    diffc.replay(tmp_path / "original", model, calibration=calibration).save(tmp_path / "replayed")
    assert _files(tmp_path / "replayed") == _files(tmp_path / "original")


def test_replay_refuses_what_holds_no_record(family):
    with pytest.raises(diffc.DiffcError, match="replay takes an OptimizedModel, an artifact folder or a DiffusionGraph"):
        diffc.replay(42, family("dit")[0])
