import numpy as np
import pytest
import torch

import diffc
from diffc.calibration import (CalibrationError, CalibrationSet, collect, compute_statistics, node_error, output_error,
                               record, resampling, select_steps, trajectory_error)
from diffc.ir import capture
from digits_tiny import tiny_digits_pipeline

STEPS = 6


class CallCounter:
    def __init__(self, module, fail_after=None):
        self.calls, self.fail_after = 0, fail_after
        module.register_forward_pre_hook(self)

    def __call__(self, *_):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt("simulated interruption")


@pytest.fixture(scope="module")
def collected(tmp_path_factory):
    pipe = tiny_digits_pipeline()
    cal = collect(pipe, conditions=[1, 7], num_steps=STEPS, out=tmp_path_factory.mktemp("cal") / "set", progress=False)
    return pipe, cal, capture(pipe.unet)


def test_collect_records_every_step_with_cfg_batches(collected):
    pipe, cal, _ = collected
    assert len(cal.items) == 2 and cal.steps == list(range(STEPS)) and len(cal) == 2 * STEPS
    record = next(cal.records())
    assert record.inputs["sample"].shape[0] == 2  # guidance doubles the batch of one condition
    assert set(record.inputs) == {"sample", "timestep", "encoder_hidden_states"}
    assert cal.final_outputs()["seed0-cond0"].shape == (1, 8, 8, 1)


def test_each_condition_gets_its_own_seed_unless_seeds_are_given(collected, tmp_path):
    pipe, cal, _ = collected
    assert [(item["id"], item["seed"]) for item in cal.items] == [("seed0-cond0", 0), ("seed1-cond1", 1)]
    with torch.no_grad():
        first_latents = [next(cal.records(steps={0}, items={item["id"]})).inputs["sample"] for item in cal.items]
    assert not torch.equal(*first_latents)  # held-out trajectories are new noise, not only a new condition
    crossed = collect(pipe, conditions=[1, 7], num_steps=2, seeds=(5, 6), out=tmp_path / "crossed", progress=False)
    assert [item["id"] for item in crossed.items] == ["seed5-cond0", "seed5-cond1", "seed6-cond0", "seed6-cond1"]


def test_resume_skips_finished_trajectories(tmp_path):
    pipe = tiny_digits_pipeline()
    counter = CallCounter(pipe.unet, fail_after=STEPS + 2)  # dies inside the second trajectory
    with pytest.raises(KeyboardInterrupt):
        collect(pipe, conditions=[1, 2, 3], num_steps=STEPS, out=tmp_path / "set", progress=False)
    counter.fail_after = None
    counter.calls = 0
    cal = collect(pipe, conditions=[1, 2, 3], num_steps=STEPS, out=tmp_path / "set", progress=False)
    assert counter.calls == 2 * STEPS  # only the two unfinished trajectories ran again
    assert len(cal.items) == 3
    counter.calls = 0
    collect(pipe, conditions=[1, 2, 3], num_steps=STEPS, out=tmp_path / "set", progress=False)
    assert counter.calls == 0
    with pytest.raises(CalibrationError, match="other settings.*num_steps"):
        collect(pipe, conditions=[1, 2, 3], num_steps=STEPS + 1, out=tmp_path / "set", progress=False)


def test_statistics_match_brute_force(collected):
    _, cal, dg = collected
    stats = compute_statistics(cal, dg, groups=2, progress=False, cache=False)
    linear = next(n for n in dg.graph.nodes if n.target == torch.ops.aten.linear.default)
    values = {0: [], 1: []}
    for rec in cal.records():
        seen = {}
        from diffc.calibration.statistics import Observer

        with torch.no_grad():
            Observer(dg.module, {linear.name}, seen.__setitem__).run(*[rec.inputs[s.name] for s in dg.signature.inputs])
        values[rec.step * 2 // STEPS].append(seen[linear.name].double().flatten())
    for group in (0, 1):
        brute = torch.cat(values[group])
        s = stats.node(linear.name, group)
        assert s.count == brute.numel()
        assert s.minimum == pytest.approx(brute.min().item(), rel=1e-6)
        assert s.maximum == pytest.approx(brute.max().item(), rel=1e-6)
        assert s.mean == pytest.approx(brute.mean().item(), rel=1e-4, abs=1e-7)
        assert s.std == pytest.approx(brute.std(unbiased=False).item(), rel=1e-4)
        q = s.abs_percentile(99.0)
        assert np.mean(brute.abs().numpy() <= q) >= 0.99
    merged = stats.node(linear.name)
    assert merged.count == sum(stats.node(linear.name, g).count for g in (0, 1))
    # ranges move with the timestep: the latent input's range differs between noisy and clean steps
    latent = dg.signature.latent.name
    assert stats.node(latent, 0).absmax != stats.node(latent, 1).absmax
    assert stats.traces and all(np.isnan(t[0]) and np.isfinite(t[1]) for t in stats.traces.values())


def test_statistics_are_cached_with_the_set(collected):
    _, cal, dg = collected
    first = compute_statistics(cal, dg, groups=2, progress=False)
    again = compute_statistics(CalibrationSet(cal.root), dg, groups=2, progress=False)
    name = next(iter(first.stats))
    assert again.node(name, 0).histogram.tolist() == first.node(name, 0).histogram.tolist()


def test_a_graph_of_the_same_structure_with_other_weights_gets_its_own_statistics(collected):
    """SmoothQuant at another alpha changes weights, not the graph: cached statistics of the first
    alpha gave the second one the wrong activation scales."""
    _, cal, dg = collected
    first = compute_statistics(cal, dg, groups=1, progress=False)
    scaled = dg.clone()
    weight = next(name for name, tensor in scaled.weights().items() if tensor.dim() == 4)
    owner, _, leaf = weight.rpartition(".")
    setattr(scaled.module.get_submodule(owner), leaf, torch.nn.Parameter(scaled.weights()[weight] * 3))
    again = compute_statistics(cal, scaled, groups=1, progress=False)
    assert any(again.node(name, 0).maximum != first.node(name, 0).maximum for name in first.stats)


def test_statistics_of_some_trajectories_are_theirs_alone(collected):
    """What quant calibrates its scales on when its held-out check must stay out of sample."""
    _, cal, dg = collected
    first = cal.items[0]["id"]
    every = compute_statistics(cal, dg, groups=1, progress=False)
    one = compute_statistics(cal, dg, groups=1, progress=False, items={first})
    name = next(iter(every.stats))
    assert one.node(name, 0).count * 2 == every.node(name, 0).count
    assert compute_statistics(cal, dg, groups=1, progress=False, items={first}).node(name, 0).count == \
        one.node(name, 0).count  # cached apart from the statistics of every trajectory


def test_evaluation_api(collected):
    pipe, cal, dg = collected
    assert output_error(cal, dg.module, dg).mean_relative == 0.0
    noisy = output_error(cal, lambda *x: (dg.module(*x)[0] * 1.1,), dg)
    assert noisy.mean_relative == pytest.approx(0.01, rel=1e-3)
    first_conv = next(n.name for n in dg.graph.nodes if n.target == torch.ops.aten.conv2d.default)
    assert node_error(cal, dg, dg.clone(), [first_conv]) == {first_conv: 0.0}
    assert trajectory_error(cal, pipe.unet)["psnr"] == float("inf")
    # opened from disk the set has no pipeline: the loop identified from its calls re-runs instead
    from_disk = CalibrationSet(cal.root)
    assert resampling(from_disk) == "loop" and trajectory_error(from_disk, pipe.unet)["psnr"] > 100


def test_record_a_hand_written_cfg_loop_and_optimize_with_it(tmp_path):
    pipe = tiny_digits_pipeline()
    unet, embed = pipe.unet, pipe.class_embedding
    scheduler = pipe.scheduler
    with record(unet, out=tmp_path / "rec", timesteps="uniform:3") as recording:
        for label in (2, 5):
            scheduler.set_timesteps(STEPS)
            x = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(label))
            tokens = embed(torch.tensor([10, label]))
            for t in scheduler.timesteps:
                eps = unet(torch.cat([x, x]), t.expand(2), encoder_hidden_states=tokens).sample
                uncond, cond = eps.chunk(2)
                x = scheduler.step(uncond + 3.0 * (cond - uncond), t, x).prev_sample
    cal = recording.calibration_set
    assert [i["num_steps"] for i in cal.items] == [STEPS, STEPS] and cal.steps == select_steps(STEPS, "uniform:3")
    fast = diffc.optimize(unet, passes=[], calibration=recording)
    rec = next(cal.records())
    assert torch.equal(fast(rec.inputs["sample"], rec.inputs["timestep"],
                            encoder_hidden_states=rec.inputs["encoder_hidden_states"]).sample, rec.output)


def test_mismatched_calibration_set_is_refused(collected):
    from tiny_families import families

    _, cal, _ = collected
    with pytest.raises(CalibrationError, match="recorded from UNet2DConditionModel, not DiTTransformer2DModel"):
        diffc.optimize(families()["dit"][0], passes=[], calibration=cal)


@pytest.mark.filterwarnings("ignore:calibrating a bare denoiser")
def test_calibration_set_of_another_configuration_is_refused(tmp_path):
    from diffusers import DiTTransformer2DModel
    from tiny_families import families

    cal = collect(families()["dit"][0], num_steps=2, out=tmp_path / "set", progress=False)
    wider = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=3, out_channels=6,
                                  num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=1000).eval()
    with pytest.raises(CalibrationError, match=r"hidden_states has shape \(2, 4, 8, 8\) but the model takes \(.batch., 3, 8, 8\)"):
        diffc.optimize(wider, passes=["cache"], calibration=cal)


def test_non_finite_inputs_are_named(tmp_path):
    pipe = tiny_digits_pipeline()
    pipe.unet.register_forward_pre_hook(
        lambda m, args, kwargs: ((args[0].clone().index_fill_(0, torch.tensor([1]), float("nan")), *args[1:]), kwargs),
        with_kwargs=True)
    with pytest.raises(CalibrationError, match=r"non-finite values \(NaN/Inf\) in sample at step 0 of trajectory "
                                               r"seed0-cond0, batch rows \[1\]"):
        collect(pipe, conditions=[3], num_steps=2, out=tmp_path / "set", progress=False)


def test_non_finite_activation_is_named(collected, tmp_path):
    _, cal, dg = collected
    broken = dg.clone()
    conv = next(n for n in broken.graph.nodes if n.target == torch.ops.aten.conv2d.default)
    with broken.graph.inserting_after(conv):
        nan = broken.graph.call_function(torch.ops.aten.div.Tensor, (conv, 0.0))
    conv.replace_all_uses_with(nan, delete_user_cb=lambda user: user is not nan)
    broken.module.recompile()
    with pytest.raises(CalibrationError, match=r"non-finite activation in node \w+ at step 0 of trajectory seed0-cond0"):
        compute_statistics(cal, broken, groups=2, progress=False, cache=False, nodes=[nan.name])


@pytest.mark.parametrize("spec, expected", [
    ("all", [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]), ("uniform:4", [0, 3, 6, 9]), ("groups:2", [2, 7]),
    ("steps:1,8", [1, 8]),
])
def test_step_selection(spec, expected):
    assert select_steps(10, spec) == expected


def test_skewed_normal_selection_prefers_late_steps():
    steps = select_steps(50, "normal:10")
    assert len(steps) == 10 and np.mean(steps) > 25
    with pytest.raises(diffc.DiffcError, match="strategies"):
        select_steps(10, "bogus:3")


def test_bare_model_gets_synthetic_trajectories_with_a_warning(tmp_path):
    from tiny_families import families

    model = families()["dit"][0]
    with pytest.warns(UserWarning, match="synthetic"):
        cal = collect(model, num_steps=3, out=tmp_path / "set", progress=False)
    assert len(cal) == 3
    cal.check_compatible(capture(model))


def test_synthetic_trajectories_call_the_model_with_the_inputs_it_was_captured_with(tmp_path):
    """diffc's PixArt example passes an attention mask; a model captured without one would refuse
    the recorded calls when a pass re-runs them."""
    from tiny_families import families

    model, example = families()["pixart"]
    with pytest.warns(UserWarning, match="synthetic"):
        cal = collect(model, num_steps=2, out=tmp_path / "set", example_inputs=example, progress=False)
    assert "encoder_attention_mask" not in cal.manifest["meta"]["inputs"]
    assert trajectory_error(cal, diffc.optimize(model, passes=[], example_inputs=example))["psnr"] > 60


def test_a_recorded_loop_without_an_optional_input_is_captured_without_it(tmp_path):
    """A PixArt loop that passes no attention mask: the capture leaves out the mask diffc's own
    example holds, instead of refusing the recording as recorded with other inputs."""
    from tiny_families import families

    model, example = families()["pixart"]
    example = {name: value for name, value in example.items() if name != "timestep"}
    with torch.no_grad(), record(model, out=tmp_path / "rec") as recording:
        latents = example["hidden_states"]
        for t in (900, 500):
            out = model(**example, timestep=torch.tensor([t, t]), return_dict=False)[0][:, :4]
            latents = latents - 0.1 * out
            example = {**example, "hidden_states": latents}
        recording.final(latents)
    fast = diffc.optimize(model, passes=[], calibration=recording, progress=False)
    with torch.no_grad():
        assert torch.allclose(fast(**example, timestep=torch.tensor([500, 500]))[0],
                              model(**example, timestep=torch.tensor([500, 500]), return_dict=False)[0], atol=1e-5)


def test_a_denoiser_diffc_has_no_example_for_is_captured_from_its_recorded_calls(tmp_path):
    """The zoo's Wan video transformer: no built-in example inputs, so the first recorded call is
    the example, and the latent is the input named as one whatever the call's argument order."""
    from diffc.models import zoo

    pipe = zoo.load("motion-wan")
    pipe.set_progress_bar_config(disable=True)
    with record(pipe.transformer, out=tmp_path / "rec") as recording:
        pipe(zoo.prompts("motion-wan", 1), num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    fast = diffc.optimize(pipe.transformer, passes=[], calibration=recording, progress=False)
    assert [i.name for i in fast.plan.graph.signature.inputs if i.role == "latent"] == ["hidden_states"]


def test_a_pipeline_whose_denoiser_diffc_has_no_example_for_is_optimized_without_calibrating_passes():
    """No pass calibrates, so capture takes its example from one short call of the pipeline (two steps),
    and the optimized transformer computes what the original does at the bench's batch."""
    from diffc.models import zoo

    pipe = zoo.load("motion-wan")
    pipe.set_progress_bar_config(disable=True)
    fast = diffc.optimize(pipe, passes=[], progress=False)
    calls = []
    hook = pipe.transformer.register_forward_pre_hook(lambda _, args, kwargs: calls.append(kwargs), with_kwargs=True)
    with torch.no_grad():
        pipe(zoo.prompts("motion-wan", 3), num_inference_steps=1, generator=torch.Generator().manual_seed(1))
    hook.remove()
    inputs = {name: value for name, value in calls[0].items() if name != "return_dict"}
    with torch.no_grad():
        expected = pipe.transformer(**inputs, return_dict=False)[0]
        produced = fast(**inputs, return_dict=False)[0]
    assert produced.shape == expected.shape and torch.allclose(produced, expected, atol=1e-5)


def test_a_reference_denoiser_replaces_the_recorded_final_images(collected):
    from diffc.calibration import ResampledReference

    pipe, cal, _ = collected
    from_disk = CalibrationSet(cal.root)  # the identified loop re-runs: any callable denoiser fits in it

    def damped(**kwargs):
        return (pipe.unet(**{**kwargs, "return_dict": False})[0] * 0.9,)

    reference = ResampledReference(lambda: damped, ["damping"])
    assert not reference.used
    assert trajectory_error(from_disk, damped, reference=reference)["psnr"] == float("inf") and reference.used
    against_damped = trajectory_error(from_disk, pipe.unet, reference=reference)["psnr"]
    assert against_damped == pytest.approx(trajectory_error(from_disk, damped)["psnr"], rel=1e-3)
