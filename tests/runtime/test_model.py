import os

import pytest
import torch

import diffc
from diffc.errors import ArtifactError, InputError
from tiny_families import first_tensor


def _reference(model, inputs):
    with torch.no_grad():
        return first_tensor(model(**inputs))


def test_identity_pipeline_is_exact_and_round_trips(family_name, family, tmp_path):
    model, inputs = family(family_name)
    ref = _reference(model, inputs)
    fast = diffc.optimize(model, target="torch", passes=[])
    with torch.no_grad():
        out = first_tensor(fast(**inputs))
        assert (out - ref).abs().max().item() <= 1e-5
        fast.save(tmp_path / "artifact")
        back = diffc.load(tmp_path / "artifact")
        assert torch.equal(first_tensor(back(**inputs)), out)
    assert type(fast(**inputs)).__name__ == type(model(**inputs)).__name__
    assert isinstance(fast(**inputs, return_dict=False), tuple)


def test_positional_arguments_and_scalar_timestep(family):
    model, inputs = family("unet2dcond")
    fast = diffc.optimize(model, passes=[])
    with torch.no_grad():
        ref = model(inputs["sample"], 10, inputs["encoder_hidden_states"]).sample
        out = fast(inputs["sample"], 10, inputs["encoder_hidden_states"]).sample
    assert (out - ref).abs().max().item() <= 1e-5


def test_wrong_input_shape_is_named(family):
    model, inputs = family("unet2dcond")
    fast = diffc.optimize(model, passes=[])
    with pytest.raises(InputError, match=r"encoder_hidden_states has shape \(2, 7, 16\).*dim 2 must be 32"):
        fast(**{**inputs, "encoder_hidden_states": torch.randn(2, 7, 16)})
    with pytest.raises(InputError, match="batch=3.*batch=2"):
        fast(**{**inputs, "encoder_hidden_states": torch.randn(3, 7, 32)})
    with pytest.raises(InputError, match="unexpected argument 'bogus'"):
        fast(**inputs, bogus=1)
    with pytest.raises(InputError, match="timestep_cond.*captured without it"):
        fast(**inputs, timestep_cond=torch.randn(2, 4))


def test_step_tracking_in_a_loop(family):
    model, inputs = family("dit")
    fast = diffc.optimize(model, passes=[])
    with torch.no_grad():
        for t in (900, 600, 300):
            fast(**{**inputs, "timestep": torch.tensor([t, t])})
        assert fast.steps.step == 2
        fast(**{**inputs, "timestep": torch.tensor([900, 900])})
        assert fast.steps.step == 0


def test_loop_longer_than_announced_is_refused(family):
    model, inputs = family("dit")
    fast = diffc.optimize(model, passes=[])
    fast.begin_loop(2)
    with torch.no_grad():
        for t in (900, 600):
            fast(**{**inputs, "timestep": torch.tensor([t, t])})
        with pytest.raises(InputError, match=r"step 3 of a loop announced with begin_loop\(2\).*begin_loop\(num_steps\)"):
            fast(**{**inputs, "timestep": torch.tensor([300, 300])})
        fast(**{**inputs, "timestep": torch.tensor([900, 900])})  # a new loop, not announced, runs
        assert fast.steps.step == 0 and fast.steps.num_steps is None


def test_half_precision_targets_run_close(family):
    model, inputs = family("dit")
    ref = _reference(model, inputs)
    for target in ("torch-bf16", "torch-fp16"):
        fast = diffc.optimize(model, target=target, passes=[])
        with torch.no_grad():
            out = first_tensor(fast(**inputs)).float()
        assert (out - ref).abs().max().item() < 0.1, target
        with pytest.raises(InputError, match="cannot be cast"):
            fast.to(torch.float32)


def test_tampered_artifact_is_refused(family, tmp_path):
    model, inputs = family("dit")
    diffc.optimize(model, passes=[]).save(tmp_path / "a")
    weights = tmp_path / "a" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="weights.safetensors does not match its SHA-256"):
        diffc.load(tmp_path / "a")
    (tmp_path / "a" / "graphs" / "main.json").unlink()
    with pytest.raises(ArtifactError, match="missing"):
        diffc.load(tmp_path / "a")


def test_artifact_from_another_release_is_refused(family, tmp_path, monkeypatch):
    import diffc.runtime.artifact as artifact

    model, _ = family("dit")
    diffc.optimize(model, passes=[]).save(tmp_path / "a")
    major, minor = torch.__version__.split(".")[:2]
    monkeypatch.setattr(torch, "__version__", f"{major}.{minor}.99")  # another patch release reads it
    diffc.load(tmp_path / "a")
    monkeypatch.setattr(torch, "__version__", "9.1.0")
    with pytest.raises(ArtifactError, match=r"saved with torch .*has torch 9\.1\.0.*Re-create the artifact"):
        diffc.load(tmp_path / "a")
    monkeypatch.undo()
    monkeypatch.setattr(artifact, "diffc_version", lambda: "7.0.0")
    with pytest.raises(ArtifactError, match=r"this environment has diffc 7\.0\.0"):
        diffc.load(tmp_path / "a")


def test_loading_never_unpickles(family, tmp_path, monkeypatch):
    import pickle

    model, inputs = family("dit")
    fast = diffc.optimize(model, passes=[])
    fast.save(tmp_path / "a")

    def refuse(*args, **kwargs):
        raise AssertionError("an artifact load unpickled something")

    for module, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(module, name, refuse)
    reloaded = diffc.load(tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(first_tensor(reloaded(**inputs)), first_tensor(fast(**inputs)))


def test_save_is_atomic_and_never_clobbers(family, tmp_path, monkeypatch):
    model, _ = family("dit")
    fast = diffc.optimize(model, passes=[])
    fast.save(tmp_path / "a")
    with pytest.raises(ArtifactError, match="already exists"):
        fast.save(tmp_path / "a")
    before = sorted(os.listdir(tmp_path))

    import diffc.runtime.artifact as artifact

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(artifact, "save_file", explode)
    with pytest.raises(OSError, match="disk full"):
        fast.save(tmp_path / "b")
    with pytest.raises(OSError, match="disk full"):
        fast.save(tmp_path / "a", overwrite=True)
    assert sorted(os.listdir(tmp_path)) == before  # no half-written folder, the old one intact
    diffc.load(tmp_path / "a")


def test_not_an_artifact(tmp_path):
    with pytest.raises(ArtifactError, match="not a diffc artifact"):
        diffc.load(tmp_path)


@pytest.mark.slow
def test_torch_compile_matches(family):
    model, inputs = family("dit")
    fast = diffc.optimize(model, passes=[], compile=True)
    with torch.no_grad():
        assert (first_tensor(fast(**inputs)) - _reference(model, inputs)).abs().max().item() <= 1e-4
    assert fast.plan.graph.applied == [] and fast._compiled.info["compile"]
