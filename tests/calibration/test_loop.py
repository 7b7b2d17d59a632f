"""The sampling loop identified from what `record` saw (diffc.calibration.loop): each sampler's
per-step map recovered, stochastic and clipping loops named, and closed-loop re-runs that
reproduce the recorded trajectories."""
import copy
import inspect
import math

import pytest
import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler)

from diffc.calibration import (guidance_rows, identify_loop, loop_error, record, replay_loop, resampling,
                               trajectory_error)
from digits_tiny import tiny_digits_pipeline

STEPS = 6
GUIDANCE = 4.0
SAMPLERS = {
    "ddim": lambda: DDIMScheduler(clip_sample=False),
    "dpm++2m": DPMSolverMultistepScheduler,
    "unipc": UniPCMultistepScheduler,
    "euler": EulerDiscreteScheduler,
    "flow-euler": FlowMatchEulerDiscreteScheduler,
}
SINGLE_STEP = ("ddim", "euler", "flow-euler")
# float32 rounding of this untrained model's final latents (magnitudes ~500) scored against peak 2
REPRODUCED_PSNR = 75


def damped_unet(unet):
    """A copy of the UNet with every output scaled by 0.98."""
    damped = copy.deepcopy(unet)
    with torch.no_grad():
        damped.conv_out.weight.mul_(0.98)
        damped.conv_out.bias.mul_(0.98)
    return damped


@pytest.fixture(scope="module")
def tiny():
    pipe = tiny_digits_pipeline()
    return pipe.unet, pipe.class_embedding


def _scale(scheduler, t):
    """What the loop multiplies the latent by before the call (Euler's input scaling)."""
    if not hasattr(scheduler, "scale_model_input"):
        return 1.0
    return float(copy.deepcopy(scheduler).scale_model_input(torch.ones(1), t)[0])


@torch.no_grad()
def sample(unet, embed, scheduler, out, guidance=GUIDANCE, unbatched=False, final=True, labels=(2, 5, 7),
           probe=False):
    """A hand-written loop (no pipeline) under `record`; returns the recording and, per step, the
    scheduler's own map on the latent the model sees: (latent coefficient, output coefficient),
    probed by stepping copies of a single-step scheduler with unit inputs when `probe`.
    The class tokens are scaled up so that the tiny untrained model's two branches differ."""
    maps, scales = [], []
    with record(unet, out=out) as recording:
        for label in labels:
            scheduler.set_timesteps(STEPS)
            generator = torch.Generator().manual_seed(label)
            x = torch.randn(1, 1, 8, 8, generator=generator) * getattr(scheduler, "init_noise_sigma", 1.0)
            tokens = embed(torch.tensor([10, label])) * 200
            extra = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
            for t in scheduler.timesteps:
                scale = _scale(scheduler, t)
                seen = x * scale
                if guidance is None:
                    eps = unet(seen, t.expand(1), encoder_hidden_states=tokens[1:]).sample
                elif unbatched:
                    uncond = unet(seen, t.expand(1), encoder_hidden_states=tokens[:1]).sample
                    cond = unet(seen, t.expand(1), encoder_hidden_states=tokens[1:]).sample
                    eps = uncond + guidance * (cond - uncond)
                else:
                    uncond, cond = unet(torch.cat([seen, seen]), t.expand(2), encoder_hidden_states=tokens).sample.chunk(2)
                    eps = uncond + guidance * (cond - uncond)
                if probe and label == labels[0]:
                    a = float(copy.deepcopy(scheduler).step(torch.zeros(1), t, torch.ones(1)).prev_sample[0])
                    b = float(copy.deepcopy(scheduler).step(torch.ones(1), t, torch.zeros(1)).prev_sample[0])
                    maps.append((a, b))
                    scales.append(scale)
                x = scheduler.step(eps, t, x, **extra).prev_sample
            if final:
                recording.final(x)
    scales.append(1.0)  # the final latents are not scaled
    own = [(scales[k + 1] * a / scales[k], scales[k + 1] * b) for k, (a, b) in enumerate(maps)]
    return recording.calibration_set, own


@pytest.mark.parametrize("guidance", [None, GUIDANCE], ids=["no-cfg", "cfg"])
@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_the_fit_recovers_each_deterministic_sampler(tiny, tmp_path, sampler, guidance):
    unet, embed = tiny
    calibration, own = sample(unet, embed, SAMPLERS[sampler](), tmp_path / "rec", guidance,
                              probe=sampler in SINGLE_STEP)
    loop = identify_loop(calibration)
    assert loop.kind == "affine" and loop.latent == "sample" and loop.final and len(loop.maps) == STEPS
    assert loop.residual < 1e-10
    assert loop.members == (1 if guidance is None else 2)
    weights = (1.0,) if guidance is None else (1 - guidance, guidance)
    for k, step_map in enumerate(loop.maps):
        # the guidance scale is a ratio of coefficients: resolved where they are not near zero, less
        # finely for multistep solvers (float32 rounding of their stored history vs. branches that
        # differ by under 1% late in the loop; UniPC with CFG: 6.4e-3 with one thread, under 5e-3 with two)
        if abs(sum(step_map.outputs[0])) > 0.1:
            assert loop.guidance_weights(k) == pytest.approx(weights, abs=1e-3 if sampler in SINGLE_STEP else 1e-2)
    if sampler in SINGLE_STEP:
        assert loop.history == 0
        for step_map, (a, b) in zip(loop.maps, own):
            assert step_map.latents[0] == pytest.approx(a, abs=1e-4)
            assert step_map.outputs[0] == pytest.approx(tuple(b * w for w in weights), abs=1e-4)
    else:
        # multistep: earlier steps enter the update. Their coefficients are not unique (the latent
        # at k is itself a combination of earlier ones), so the re-run below is the check
        assert loop.history >= 1
    # the unmodified model in the re-run loop lands on the recorded final latents
    for produced, recorded in replay_loop(calibration, loop, unet).values():
        assert _close(produced, recorded)


def _close(produced, recorded):
    """Equal to float32 rounding: within 1e-5 of the recorded latents' largest magnitude."""
    return float((produced - recorded).abs().max()) < 1e-5 * float(recorded.abs().max())


def test_a_loop_that_calls_each_branch_separately_pairs_the_calls(tiny, tmp_path):
    unet, embed = tiny
    calibration, own = sample(unet, embed, DDIMScheduler(clip_sample=False), tmp_path / "rec", unbatched=True)
    loop = identify_loop(calibration)
    assert loop.kind == "affine" and loop.members == 2
    assert loop.guidance_weights(0) == pytest.approx((1 - GUIDANCE, GUIDANCE), abs=1e-4)
    assert loop_error(calibration, loop, unet)["psnr"] > REPRODUCED_PSNR


def test_guidance_rows_weigh_the_rows_of_a_batched_guidance_call_and_nothing_else(tiny, tmp_path):
    unet, embed = tiny
    runs = {kind: sample(unet, embed, DDIMScheduler(clip_sample=False), tmp_path / kind, **options)[0]
            for kind, options in (("batched", {}), ("unbatched", {"unbatched": True}), ("no-cfg", {"guidance": None}))}
    batched = runs["batched"]
    loop = identify_loop(batched)
    for call in batched.records():
        rows = guidance_rows(call, loop)
        assert [state for state, _ in rows] == [0, 0]
        assert [weight for _, weight in rows] == pytest.approx([1 - GUIDANCE, GUIDANCE], abs=1e-3)
    for kind in ("unbatched", "no-cfg"):
        loop = identify_loop(runs[kind])
        assert all(guidance_rows(call, loop) is None for call in runs[kind].records()), kind


def test_euler_ancestral_is_named_stochastic_and_re_runs_with_its_noise(tiny, tmp_path):
    unet, embed = tiny
    calibration, _ = sample(unet, embed, EulerAncestralDiscreteScheduler(), tmp_path / "rec")
    loop = identify_loop(calibration)
    assert loop.kind == "stochastic" and "ancestral" in loop.reason and loop.usable
    assert loop_error(calibration, loop, unet)["psnr"] > REPRODUCED_PSNR


def test_a_clipping_loop_is_named_non_affine_and_its_clipping_modelled_where_it_can(tiny, tmp_path):
    unet, embed = tiny
    calibration, _ = sample(unet, embed, DDIMScheduler(clip_sample=True, clip_sample_range=6.0), tmp_path / "rec")
    loop = identify_loop(calibration)
    assert loop.kind == "non-affine" and "clipping" in loop.reason
    # a step where enough elements stay within the range gets the clipped map beside the affine one
    modelled = [m for m in loop.maps if m.clipped is not None]
    assert modelled and all(m.residual < 1e-10 for m in modelled)
    assert loop_error(calibration, loop, unet)["psnr"] > REPRODUCED_PSNR


def test_without_final_latents_the_loop_ends_at_its_last_call(tiny, tmp_path):
    unet, embed = tiny
    calibration, _ = sample(unet, embed, DDIMScheduler(clip_sample=False), tmp_path / "rec", final=False)
    loop = identify_loop(calibration)
    assert loop.kind == "affine" and not loop.final and len(loop.maps) == STEPS - 1
    last_inputs = [r.inputs["sample"][:1] for r in calibration.records(steps={STEPS - 1})]
    replayed = replay_loop(calibration, loop, unet)
    for (produced, recorded), expected in zip(replayed.values(), last_inputs):
        assert torch.allclose(recorded.float(), expected) and _close(produced, recorded)


def test_a_set_missing_steps_is_unidentified_and_says_why(tiny, tmp_path):
    unet, embed = tiny
    with record(unet, out=tmp_path / "rec", timesteps="uniform:3") as recording:
        x = torch.randn(1, 1, 8, 8)
        scheduler = DDIMScheduler(clip_sample=False)
        scheduler.set_timesteps(STEPS)
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t.expand(1), encoder_hidden_states=embed(torch.tensor([3]))).sample, t, x).prev_sample
    loop = identify_loop(recording.calibration_set)
    assert loop.kind == "unidentified" and "timesteps='all'" in loop.reason and not loop.usable
    assert resampling(recording.calibration_set) is None
    with pytest.raises(Exception, match="cannot re-sample.*timesteps='all'"):
        trajectory_error(recording.calibration_set, unet)


def test_trajectory_error_of_a_recorded_loop_measures_a_candidate_closed_loop(tiny, tmp_path):
    unet, embed = tiny
    calibration, _ = sample(unet, embed, DPMSolverMultistepScheduler(), tmp_path / "rec")
    assert resampling(calibration) == "loop"
    assert trajectory_error(calibration, unet)["psnr"] > REPRODUCED_PSNR

    damped = damped_unet(unet)
    worse = trajectory_error(calibration, damped)
    assert worse["psnr"] < REPRODUCED_PSNR - 20 and worse["trajectories"] == 3
    # final latents are scored as data in [-1, 1] (peak 2), whatever range a trajectory spans: the
    # PSNR a pixel-space pipeline gives its images (x + 1) / 2, here of the damped model's own loop
    damped_loop, _ = sample(damped, embed, DPMSolverMultistepScheduler(), tmp_path / "damped")
    finals, damped_finals = calibration.final_outputs(), damped_loop.final_outputs()
    mse = sum(float((damped_finals[i].double() - finals[i].double()).pow(2).mean()) for i in finals) / len(finals)
    assert worse["psnr"] == pytest.approx(10 * math.log10(4 / mse), abs=1e-3)
    # the fitted loop is kept in the set's manifest for the next process
    assert calibration.manifest["loop"]["kind"] == "affine"


@torch.no_grad()
def _final(denoiser, embed, scheduler, unbatched):
    scheduler.set_timesteps(STEPS)
    x = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    tokens = embed(torch.tensor([10, 4])) * 200
    for t in scheduler.timesteps:
        if unbatched:
            uncond = denoiser(x, t.expand(1), encoder_hidden_states=tokens[:1]).sample
            cond = denoiser(x, t.expand(1), encoder_hidden_states=tokens[1:]).sample
        else:
            uncond, cond = denoiser(torch.cat([x, x]), t.expand(2), encoder_hidden_states=tokens).sample.chunk(2)
        x = scheduler.step(uncond + GUIDANCE * (cond - uncond), t, x).prev_sample
    return x


def test_a_cached_model_keeps_each_separately_called_branch_apart(tiny, tmp_path):
    """A loop calling the conditional and unconditional branches one after the other, with no
    cache_context: each call index keeps its own cached features, so it samples what the batched
    loop samples with the same schedule."""
    import diffc

    unet, embed = tiny
    calibration, _ = sample(unet, embed, DDIMScheduler(clip_sample=False), tmp_path / "rec", unbatched=True)
    assert {r.call for r in calibration.records()} == {0, 1}
    fast = diffc.optimize(unet, passes=[{"pass": "cache", "schedule": "uniform", "interval": 2}], calibration=calibration)
    scheduler = DDIMScheduler(clip_sample=False)
    batched, unbatched = _final(fast, embed, scheduler, False), _final(fast, embed, scheduler, True)
    assert not torch.allclose(_final(unet, embed, scheduler, False), batched, atol=1e-4)  # the cache changes it
    assert torch.allclose(batched, unbatched, atol=1e-4)


class _Unconditioned(torch.nn.Module):
    """The planted failure: a candidate that lost its conditioning (every row gets the first row's
    tokens, as if cross-attention were pruned away) while staying close per row."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        tokens = encoder_hidden_states[:1].expand_as(encoder_hidden_states)
        return self.unet(sample, timestep, encoder_hidden_states=tokens)


def test_a_candidate_that_loses_the_guidance_signal_is_refused_whatever_its_psnr(tiny, tmp_path, monkeypatch):
    import diffc.passes._search as search
    from diffc.calibration import guidance_loss
    from diffc.passes import PassContext

    unet, embed = tiny
    calibration, _ = sample(unet, embed, DDIMScheduler(clip_sample=False), tmp_path / "rec")
    loop = identify_loop(calibration)
    assert guidance_loss(calibration, loop, unet) == pytest.approx(0.0, abs=1e-6)
    assert guidance_loss(calibration, loop, _Unconditioned(unet)) > 0.9
    # every candidate keeps 60 dB; the larger amounts are the unconditioned model
    monkeypatch.setattr(search, "trajectory_error", lambda *args: {"psnr": 60.0})
    ctx = PassContext(calibration=calibration,
                      denoiser_for=lambda value: _Unconditioned(unet) if value > 0.2 else unet)
    chosen, searched = search.search_grid((0.1, 0.2, 0.3, 0.4), lambda value: value, ctx, knob="amount",
                                          offline_error=lambda value: 0.0, min_psnr=30.0, max_relative_error=None,
                                          quality_rises=False, fallback=0.0)
    assert chosen == 0.2
    refused = [entry for entry in searched if entry.get("guidance_lost", 0) > 0.9]
    assert refused and not any(entry["passes"] for entry in refused) and all(e["psnr"] == 60.0 for e in refused)


def test_propagation_weights_of_a_recorded_loop_come_from_re_runs(tiny, tmp_path):
    """Without a pipeline, how far an output error at each step reaches the end is measured by
    re-running the identified loop with the unmodified model; none without that model."""
    from diffc.calibration import propagation_weights

    unet, embed = tiny
    calibration, _ = sample(unet, embed, DDIMScheduler(clip_sample=False), tmp_path / "rec")
    weights = propagation_weights(calibration, denoiser=unet)
    assert len(weights) == STEPS and all(w > 0 for w in weights)
    assert propagation_weights(calibration) is None


def test_trajectories_replay_together_when_some_inputs_have_no_batch_dim(family, tmp_path):
    """FLUX's position ids (tokens, 3) are shared by the rows of a call: replaying several
    trajectories in one call passes them once, not concatenated like the latents."""
    model, example = family("flux")
    scheduler = FlowMatchEulerDiscreteScheduler()
    with record(model, out=tmp_path / "rec") as recording, torch.no_grad():
        for seed in range(3):
            generator = torch.Generator().manual_seed(seed)
            x = torch.randn(1, 16, 16, generator=generator)
            text = torch.randn(2, 8, 32, generator=generator)
            scheduler.set_timesteps(STEPS)
            for t in scheduler.timesteps:
                uncond, cond = model(hidden_states=torch.cat([x, x]), encoder_hidden_states=text,
                                     pooled_projections=torch.zeros(2, 32), timestep=(t / 1000).expand(2),
                                     img_ids=example["img_ids"], txt_ids=example["txt_ids"]).sample.chunk(2)
                x = scheduler.step(uncond + GUIDANCE * (cond - uncond), t, x).prev_sample
            recording.final(x)
    loop = identify_loop(recording.calibration_set)
    assert loop.kind == "affine" and loop.members == 2
    assert loop_error(recording.calibration_set, loop, model)["psnr"] > REPRODUCED_PSNR
