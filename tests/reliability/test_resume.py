"""An interrupted optimize resumes from its work folder: finished passes are not run again."""
import pytest
import torch

import diffc
from diffc.passes import PASSES
from tiny_families import first_tensor

PIPELINE = [{"pass": "prune", "amount": 0.2, "additivity_sets": 0}, {"pass": "cache"}]


@pytest.mark.filterwarnings("ignore:calibrating a bare denoiser")
def test_interrupted_optimize_resumes_after_the_last_finished_pass(family, tmp_path, monkeypatch):
    model, inputs = family("dit")
    runs = {"prune": 0, "cache": 0}
    originals = {name: PASSES[name].run for name in runs}

    def counted(name):
        def run(self, dg, ctx):
            runs[name] += 1
            return originals[name](self, dg, ctx)
        return run

    def interrupted(self, dg, ctx):
        raise KeyboardInterrupt

    monkeypatch.setattr(PASSES["prune"], "run", counted("prune"))
    monkeypatch.setattr(PASSES["cache"], "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        diffc.optimize(model, passes=PIPELINE, work_dir=tmp_path / "work")
    assert runs["prune"] == 1
    assert (tmp_path / "work" / "calibration").is_dir() and (tmp_path / "work" / "passes" / "0-prune").is_dir()

    monkeypatch.setattr(PASSES["cache"], "run", counted("cache"))
    resumed = diffc.optimize(model, passes=PIPELINE, work_dir=tmp_path / "work")
    assert runs == {"prune": 1, "cache": 1}  # prune came from its checkpoint
    assert [entry["pass"] for entry in resumed.report] == ["prune", "cache"]

    uninterrupted = diffc.optimize(model, passes=PIPELINE, work_dir=tmp_path / "fresh")
    with torch.no_grad():
        for t in (900, 500, 100):
            call = {**inputs, "timestep": torch.tensor([t, t])}
            assert torch.equal(first_tensor(resumed(**call)), first_tensor(uninterrupted(**call)))

    other = [{**PIPELINE[0], "amount": 0.1}, PIPELINE[1]]
    diffc.optimize(model, passes=other, work_dir=tmp_path / "work")
    assert runs["prune"] == 3  # another config is not served a stale checkpoint
