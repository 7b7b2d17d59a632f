import functools
import warnings

import numpy as np
import pytest
import torch

import diffc
from diffc.api import compile_graph
from diffc.calibration import collect
from diffc.errors import PassError
from diffc.ir import capture, lint
from diffc.ir.partition import build_plan, region_nodes
from diffc.passes import PassContext, PassManager
from diffc.passes.cache.cuts import cut_regions
from diffc.passes.cache.schedules import dp_full_steps, refine_full_steps
from digits_tiny import tiny_digits_pipeline
from tiny_families import first_tensor


def _run(passes, dg, calibration=None):
    return PassManager(passes).run(dg, PassContext(calibration=calibration))


def _inputs(dg, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {s.name: (torch.randn(s.example_shape, generator=g) if s.dtype.startswith("float")
                     else torch.ones(s.example_shape, dtype=torch.int64)) for s in dg.signature.inputs}


def test_interval_one_is_exact_on_every_family(family_name, family):
    model, inputs = family(family_name)
    fast = diffc.optimize(model, passes=[{"pass": "cache", "schedule": "uniform", "interval": 1}])
    assert set(fast.plan.variants) == {"full", "cached"}
    with torch.no_grad():
        for step in range(3):
            call = dict(inputs)
            call["timestep"] = inputs["timestep"] * 0 + (0.9 - 0.2 * step if family_name == "flux" else 900 - 200 * step)
            assert torch.equal(first_tensor(fast(**call)), first_tensor(model(**call)))


def test_deep_cut_structure_and_reuse(captured):
    dg = _run([{"pass": "cache", "schedule": "uniform", "interval": 2}], captured("unet2dcond"))
    lint(dg)
    plan = build_plan(dg)
    assert plan.variants["full"].segments == ("main0", "cache_deep", "main1")
    assert plan.variants["cached"].segments == ("main0", "main1")
    region = {n.name for n in plan.segments["cache_deep"].module.graph.nodes if n.op == "call_function"}
    heavy = lambda block: {n for n in dg.block(block).nodes if n.startswith(("conv2d", "linear"))}  # noqa: E731
    assert heavy("mid_block") <= region  # the deep branch holds the mid block
    assert not region & (heavy("down_blocks.0.resnets.0") | heavy("down_blocks.0.attentions.0"))  # nor the outermost
    inputs = _inputs(dg)
    full, state = plan.run("full", inputs, {})
    cached, _ = plan.run("cached", inputs, state)
    assert torch.equal(full[0], cached[0])  # the same step reusing its own cache is exact
    report = dg.applied[-1]["report"]
    assert report["flops_skipped_per_step"] == [0.0, report["flops_skipped_per_step"][1]]
    assert 0.3 < report["flops_skipped_per_step"][1] < 1 and report["predicted_speedup"] > 1.2


def test_deep_cut_within_the_kept_block_caches_its_earlier_layers(captured):
    """recomputed_layers=1 (DeepCache's branch 0): a cached step runs only the last layer of the
    outermost up block, fed by conv_in's skip; the down block and the up block's first layer are cached."""
    whole = _run([{"pass": "cache", "schedule": "uniform", "interval": 2}], captured("unet2dcond"))
    dg = _run([{"pass": "cache", "schedule": "uniform", "interval": 2, "recomputed_layers": 1}], captured("unet2dcond"))
    lint(dg)
    plan = build_plan(dg)
    region = {n.name for n in plan.segments["cache_deep"].module.graph.nodes if n.op == "call_function"}
    assert set(dg.block("down_blocks.0.resnets.0").nodes) <= region
    assert set(dg.block("up_blocks.1.resnets.0").nodes) <= region
    assert not region & set(dg.block("up_blocks.1.resnets.1").nodes)
    inputs = _inputs(dg)
    full, state = plan.run("full", inputs, {})
    cached, _ = plan.run("cached", inputs, state)
    assert torch.equal(full[0], cached[0])
    skipped = dg.applied[-1]["report"]["flops_skipped_per_step"][1]
    assert skipped > whole.applied[-1]["report"]["flops_skipped_per_step"][1] + 0.2


@pytest.mark.parametrize("config, family_name, message", [
    ({"recomputed_layers": 3}, "unet2dcond", r"within 1\.\.2, the layers of up_blocks.1"),
    ({"recomputed_layers": 1, "cut": "encoder"}, "unet2dcond", "leave recomputed_layers unset, or cut='deep'"),
    ({"recomputed_layers": 1}, "dit", "has none. Fix: leave recomputed_layers unset"),
])
def test_recomputed_layers_outside_a_deep_cut_names_the_fix(captured, config, family_name, message):
    with pytest.raises(PassError, match=message):
        _run([{"pass": "cache", "schedule": "uniform", **config}], captured(family_name))
    with pytest.raises(PassError, match="not 'bac'"):
        PassManager([{"pass": "cache", "schedule": "bac", "recomputed_layers": 1}])


def test_residual_cut_on_transformers(captured):
    dg = _run([{"pass": "cache", "schedule": "uniform", "interval": 3}], captured("dit"))
    plan = build_plan(dg)
    assert plan.variants["cached"].segments == ("main0", "apply_blocks", "main1")
    assert any(name.endswith("__delta") for name in plan.state)
    inputs = _inputs(dg)
    full, state = plan.run("full", inputs, {})
    cached, _ = plan.run("cached", inputs, state)
    assert (full[0] - cached[0]).abs().max() < 1e-5  # base + (out - base) == out up to rounding


def test_block_ranges_stop_at_their_first_block_and_cache_no_computed_sizes():
    """A 3-block PixArt whose text stream has the image stream's shape and whose first block computes a
    size the later blocks reuse: delta_dit's front and rear regions are disjoint, and a raw range
    after the first block leaves that block computed."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    model = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=1, out_channels=1,
                                     num_layers=3, cross_attention_dim=8, sample_size=4, patch_size=2,
                                     caption_channels=6, norm_type="ada_norm_single", use_additional_conditions=False)
    dg = capture(model.eval())

    def nodes(region):
        return {n.name for n in region_nodes(dg.graph, list(region.cuts), [*region.bases.values(), *region.keep])}

    (front, rear), _ = cut_regions(dg, "delta_dit", 1, None, "auto")
    assert not nodes(front) & nodes(rear)
    (after_first,), _ = cut_regions(dg, "first_block", 1, None, "raw")
    assert not nodes(after_first) & set(dg.block("transformer_blocks.0").nodes)
    assert set(dg.block("transformer_blocks.1").nodes) <= nodes(after_first)


def test_delta_dit_uses_stage_dependent_variants(captured, tmp_path):
    pipe = tiny_digits_pipeline()
    cal = collect(pipe, conditions=[3], num_steps=6, out=tmp_path / "c", progress=False)
    assert cal.num_steps == 6
    dg = captured("dit")
    with pytest.raises(PassError, match="comes from the calibration set"):
        _run([{"pass": "cache", "cut": "delta_dit", "schedule": "uniform", "interval": 2}], dg)


@pytest.mark.parametrize("config, message", [
    ({"cut": "deep", "depth": 5}, "1 <= depth <= 1"),
    ({"cut": "encoder", "mode": "delta"}, "mode='raw'"),
    ({"cut": "blocks", "blocks": (1, 9)}, "range within 0..2"),
])
def test_invalid_cuts_are_rejected_with_the_reason(captured, config, message):
    name = "unet2dcond" if config["cut"] in ("deep", "encoder") else "dit"
    with pytest.raises(PassError, match=message):
        _run([{"pass": "cache", "schedule": "uniform", **config}], captured(name))
    with pytest.raises(PassError, match="needs a UNet"):
        _run([{"pass": "cache", "cut": "deep", "schedule": "uniform"}], captured("dit"))


def test_bad_options_are_refused():
    with pytest.raises(PassError, match="schedule must be one of"):
        PassManager([{"pass": "cache", "schedule": "weekly"}])


def test_dp_picks_the_cheapest_full_steps():
    errors = {(i, j): (j - i) * (10.0 if 3 <= j <= 5 else 1.0) for i in range(8) for j in range(i + 1, min(i + 4, 8))}
    chosen = dp_full_steps(errors, 8, 3, max_gap=3)
    assert 0 in chosen and len(chosen) == 3
    cost = lambda full: sum(errors[(max(f for f in full if f < j), j)] for j in range(8) if j not in full)  # noqa: E731
    best = min(cost({0, a, b}) for a in range(1, 8) for b in range(a + 1, 8)
               if all(j - max(f for f in {0, a, b} if f <= j) < 3 for j in range(8)))
    assert cost(chosen) == best
    with pytest.raises(PassError, match="raise full_steps or max_gap"):
        dp_full_steps(errors, 8, 1, max_gap=3)


@pytest.fixture(scope="module")
def digits_calibration(tmp_path_factory):
    pipe = tiny_digits_pipeline()
    return pipe, collect(pipe, conditions=[1, 4], num_steps=10, out=tmp_path_factory.mktemp("c") / "set",
                         progress=False)


def test_dp_schedule_beats_uniform_at_equal_full_steps(digits_calibration):
    pipe, cal = digits_calibration
    dg = diffc.capture(pipe.unet)
    dp = _run([{"pass": "cache", "schedule": "dp", "full_steps": 4}], dg, cal).applied[-1]["report"]
    uniform = _run([{"pass": "cache", "schedule": "uniform", "interval": 3}], dg, cal).applied[-1]["report"]
    assert dp["full_steps"] == uniform["full_steps"] == 4
    assert dp["relative_error"] <= uniform["relative_error"]
    assert len(dp["relative_error_per_step"]) == 10


def test_warmup_keeps_the_first_steps_in_full_and_the_budget_elsewhere(digits_calibration):
    pipe, cal = digits_calibration
    dg = diffc.capture(pipe.unet)
    plain = _run([{"pass": "cache", "full_steps": 4, "min_psnr": None}], dg, cal).applied[-1]["report"]
    warm = _run([{"pass": "cache", "full_steps": 4, "min_psnr": None, "warmup": 0.3}], dg, cal).applied[-1]["report"]
    assert warm["full_steps"] == plain["full_steps"] == 4
    assert warm["steps"][:3] == ["full"] * 3 and warm["steps"].count("full") == 4
    # re-sampled on the pipeline: every candidate scored and the refined choice keep the warm-up
    live = _cache_report(diffc.optimize(pipe, passes=[{"pass": "cache", "full_steps": 4, "min_psnr": None,
                                                        "warmup": 0.3}], calibration=cal))
    assert live["dp_candidates"] and all({0, 1, 2} <= set(c["full_steps"]) for c in live["dp_candidates"])
    with pytest.raises(PassError, match=r"warmup=0.4 keeps the first 4 of 10 steps in full.*budget of 4"):
        _run([{"pass": "cache", "full_steps": 4, "warmup": 0.4}], dg, cal)


@pytest.mark.parametrize("options, message", [({"warmup": 1.0}, r"warmup must be a share of the steps in \[0, 1\)"),
                                              ({"warmup": -0.1}, r"in \[0, 1\)"),
                                              ({"warmup": 0.2, "schedule": "uniform"}, "schedule='dp'")])
def test_warmup_refuses_a_share_outside_its_range_or_another_schedule(options, message):
    from diffc.passes.cache import CacheConfig

    with pytest.raises(ValueError, match=message):
        CacheConfig(**options)


def _cache_report(fast):
    return next(entry["report"] for entry in fast.report if entry["pass"] == "cache")


def test_dp_backs_off_below_the_floor_and_declines_when_no_budget_keeps_it(digits_calibration):
    pipe, cal = digits_calibration
    tight = {"pass": "cache", "full_steps": 3, "refine": 0}
    unfloored = _cache_report(diffc.optimize(pipe, passes=[{**tight, "min_psnr": None}], calibration=cal))
    first = next(c for c in unfloored["dp_candidates"] if c.get("chosen"))
    assert unfloored["full_steps"] == 3 and "floor_backoff" not in unfloored

    floor = first["held_out_psnr"] + 0.01
    backed_off = _cache_report(diffc.optimize(pipe, passes=[{**tight, "min_psnr": floor}], calibration=cal))
    assert backed_off["floor_backoff"][0] == {"full_steps": 3, "forecast": first["forecast"],
                                              "held_out_psnr": first["held_out_psnr"]}
    if "declined" not in backed_off:
        chosen = next(c for c in backed_off["dp_candidates"] if c.get("chosen"))
        assert backed_off["full_steps"] > 3 and chosen["held_out_psnr"] >= floor

    with pytest.warns(UserWarning, match="no schedule keeps 1000.0 dB .* nothing is cached"):
        declined = diffc.optimize(pipe, passes=[{**tight, "full_steps": 8, "min_psnr": 1000.0}], calibration=cal)
    report = _cache_report(declined)
    assert report["floor_backoff"][-1]["full_steps"] == 9 and declined.plan.graph.step_plan is None
    sample, step = torch.randn(2, 1, 8, 8), torch.tensor([500, 500])
    labels = pipe.class_embedding(torch.tensor([1, 4]))
    with torch.no_grad():
        assert torch.equal(declined(sample, step, encoder_hidden_states=labels).sample,
                           pipe.unet(sample, step, encoder_hidden_states=labels).sample)


@pytest.fixture(scope="module")
def digits_cached(digits_calibration):
    pipe, cal = digits_calibration
    return diffc.optimize(pipe, passes=[{"pass": "cache", "schedule": "nonuniform", "full_steps": 5}], calibration=cal)


def test_cached_model_in_the_pipeline_loop(digits_calibration, digits_cached, tmp_path):
    pipe, cal = digits_calibration
    fast = digits_cached
    report = fast.report[-1]["report"]
    assert report["steps"][0] == "full" and report["steps"][-1] == "full" and report["full_steps"] == 5
    seen = []
    hook = fast.segments["cache_deep"].register_forward_hook(lambda *a: seen.append(fast.steps.step))
    original = pipe.unet
    try:
        pipe.unet = fast
        images = pipe(class_labels=[1, 4], num_inference_steps=10, generator=torch.Generator().manual_seed(0)).images
        assert seen == [i for i, v in enumerate(report["steps"]) if v == "full"]
        seen.clear()
        pipe(class_labels=[1], num_inference_steps=5, generator=torch.Generator().manual_seed(0))  # new loop, 5 steps
        assert seen and seen[0] == 0
        fast.save(tmp_path / "cached")
        back = diffc.load(tmp_path / "cached")
        pipe.unet = back
        again = pipe(class_labels=[1, 4], num_inference_steps=10, generator=torch.Generator().manual_seed(0)).images
    finally:
        pipe.unet = original
        hook.remove()
    assert np.array_equal(images, again)
    assert back.plan.schedule == fast.plan.schedule


def test_adaptive_schedule_decides_between_segment_calls(digits_calibration):
    pipe, cal = digits_calibration
    fast = diffc.optimize(pipe, passes=[{"pass": "cache", "schedule": "adaptive", "full_fraction": 0.5}],
                          calibration=cal)
    rule = fast.plan.schedule.adaptive
    assert rule["threshold"] > 0 and abs(rule["calibrated_full_share"] - 0.5) <= 0.15
    full_steps = []
    fast.segments["cache_deep"].register_forward_hook(lambda *a: full_steps.append(fast.steps.step))
    original = pipe.unet
    try:
        pipe.unet = fast
        pipe(class_labels=[1, 4], num_inference_steps=10, generator=torch.Generator().manual_seed(0))
    finally:
        pipe.unet = original
    assert full_steps[0] == 0 and 2 <= len(full_steps) <= 8
    assert all(b - a <= rule["max_skip"] + 1 for a, b in zip(full_steps, full_steps[1:]))
    report = fast.report[-1]["report"]
    assert report["predicted_speedup"] > 1 and report["relative_error"] > 0


@functools.lru_cache(maxsize=None)
def _family_calibration(family_name):
    from conftest import _family

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return collect(_family(family_name)[0], num_steps=4, progress=False)


def test_cache_after_a_step_dependent_plan_names_the_pass_and_the_fix(captured, monkeypatch):
    """Timestep-routed experts (moe with step_groups > 1) skip units inside the region caching
    skips as a whole; regions do not nest, so the pipeline is refused before anything runs, and a
    graph that already carries such a plan is refused by the cache pass; both say what to change."""
    from diffc.passes import PASSES

    dg, cal = captured("dit"), _family_calibration("dit")
    moe = {"pass": "moe", "active": 0.5, "experts": 8, "allocation": "per_ffn"}
    cache = {"pass": "cache", "schedule": "uniform", "interval": 2}
    routed = _run([{**moe, "step_groups": 2}], dg, cal)
    with monkeypatch.context() as patched:
        patched.setattr(PASSES["moe"], "run", lambda *args: pytest.fail("moe ran before the pipeline was checked"))
        with pytest.raises(PassError, match=r"pipeline \['moe', 'cache'\]: cache cannot run after moe: .*"
                                            r"give moe step_groups=1"):
            _run([{**moe, "step_groups": 2}, cache], dg, cal)
    with pytest.raises(PassError, match=r"pass cache \(first in the pipeline\) failed: .*step plan from moe.*"
                                        r"give moe step_groups=1"):
        _run([cache], routed, cal)
    with pytest.raises(PassError, match="cache cannot run after cache: run cache once"):
        _run([cache, cache], dg)


def test_static_moe_then_cache_compose(captured):
    """With step_groups=1 the experts are chosen once for every step: no step plan, and the cache
    schedule is laid over the routed FFNs."""
    dg, cal = captured("dit"), _family_calibration("dit")
    routed = _run([{"pass": "moe", "active": 0.5, "experts": 8, "allocation": "per_ffn", "step_groups": 1}], dg, cal)
    assert routed.step_plan is None and routed.num_parameters() < dg.num_parameters()
    both = _run([{"pass": "cache", "schedule": "uniform", "interval": 2}], routed, cal)
    lint(both)
    plan = build_plan(both)
    assert set(plan.variants) == {"full", "cached"} and plan.state
    inputs = _inputs(both)
    routed_out = routed.module(*inputs.values())[0]
    full, state = plan.run("full", inputs, {})
    cached, _ = plan.run("cached", inputs, state)
    assert torch.equal(full[0], routed_out)  # a full step is the routed model itself
    assert (cached[0] - full[0]).abs().max() < 1e-5  # reusing its own step's cache
    report = both.applied[-1]["report"]
    assert 0 < report["relative_error"] < 1 and report["predicted_speedup"] > 1


def test_quant_after_a_prune_that_removed_every_layer_names_both_fixes(captured):
    dg, cal = captured("dit"), _family_calibration("dit")
    with pytest.raises(PassError, match=r"protect fewer layer groups .*let prune \(run before\) remove fewer"):
        PassManager([{"pass": "prune", "amount": 0.55}, "quant"]).run(
            dg, PassContext(calibration=cal, target="torch-int8"))


def test_bench_all_pipeline_runs(captured):
    """The bench's "all" pipeline is a combination whose passes compose."""
    from diffc.bench import ALL_PASSES

    dg, cal = captured("dit"), _family_calibration("dit")
    # on this random tiny DiT the default prune search may remove every block (each adds little), which
    # leaves quant nothing to quantize: a fixed share keeps layers for it
    pipeline = [{"pass": "prune", "amount": 0.25} if name == "prune" else name for name in ALL_PASSES]
    out = PassManager(pipeline).run(dg, PassContext(calibration=cal, target="torch-int8"))
    lint(out)
    assert [entry["pass"] for entry in out.applied] == list(ALL_PASSES)
    assert out.step_plan and any("precision" in a for a in out.annotations.values())
    fast = compile_graph(out, "torch", "int8")
    inputs = _inputs(out)
    with torch.no_grad():
        assert torch.isfinite(first_tensor(fast(**inputs, return_dict=False))).all()


def test_refinement_moves_full_steps_downhill_within_its_budget_and_gaps():
    target = {0, 4, 8}
    calls = []

    def final_error(full):
        calls.append(sorted(full))
        return float(sum(min(abs(s - t) for t in target) for s in full))

    start = {0, 3, 7}
    full, error = refine_full_steps(start, final_error(start), final_error, num_steps=12, max_gap=5, evaluations=50)
    assert full == target and error == 0.0 and len(full) == 3
    assert all(0 in c and max(b - a for a, b in zip(c, c[1:] + [12])) <= 5 for c in calls)
    calls.clear()
    limited, _ = refine_full_steps(start, final_error(start), final_error, num_steps=12, max_gap=5, evaluations=2)
    assert len(calls) == 1 + 2 and limited != target  # stops after its re-runs
    assert refine_full_steps(start, 5.0, final_error, num_steps=12, max_gap=5, evaluations=0) == (start, 5.0)
    calls.clear()
    warm, _ = refine_full_steps({0, 1, 2, 3, 7}, final_error({0, 1, 2, 3, 7}), final_error, num_steps=12, max_gap=5,
                                evaluations=50, warmup=4)
    assert {0, 1, 2, 3} <= warm and all({0, 1, 2, 3} <= set(c) for c in calls)


def test_forecast_extrapolates_the_cached_tensors_from_the_last_two_full_steps(captured):
    from diffc.ir.plan import FORECAST_PREVIOUS_TIME, FORECAST_TIME, PREVIOUS_SUFFIX

    dg = captured("dit")
    uniform = {"pass": "cache", "schedule": "uniform", "interval": 3}
    plain = build_plan(_run([uniform], dg))
    forecasting = build_plan(_run([{**uniform, "forecast": True}], dg))
    assert forecasting.schedule.forecast and not plain.schedule.forecast
    cached = [name for name in forecasting.state]
    inputs = _inputs(dg)
    timestep = dg.signature.timestep.name
    states: dict = {}
    plain_state: dict = {}
    computed = {}
    with torch.no_grad():
        for step, t in enumerate((900.0, 800.0, 700.0, 600.0, 500.0)):
            call = {**inputs, timestep: torch.full_like(inputs[timestep], t, dtype=torch.float32)}
            variant = forecasting.schedule.variant_for(step)
            if step == 4:  # cached, after the full steps at 900 and 600: the forecast is a line through them
                expected = {n: computed[600.0][n] + (computed[600.0][n] - computed[900.0][n]) * ((500 - 600) / (600 - 900))
                            for n in cached}
                reference, _ = plain.run(variant, call, expected)
            out, states = forecasting.run(variant, call, states)
            base, plain_state = plain.run(variant, call, plain_state)
            if variant == "full":
                computed[t] = {n: states[n] for n in cached}
                assert torch.equal(out[0], base[0])  # a full step is the model itself
            elif step < 3:  # one computed value: nothing to extrapolate from, plain reuse
                assert torch.equal(out[0], base[0])
    assert states[FORECAST_TIME] == 600.0 and states[FORECAST_PREVIOUS_TIME] == 900.0
    assert all(torch.equal(states[n + PREVIOUS_SUFFIX], computed[900.0][n]) for n in cached)
    torch.testing.assert_close(out[0], reference[0], rtol=1e-5, atol=1e-6)
    assert not torch.equal(out[0], base[0])


def test_forecast_needs_a_single_cached_region(captured):
    with pytest.raises(PassError, match="forecast extrapolates one cached region; cut 'delta_dit' caches several"):
        _run([{"pass": "cache", "cut": "delta_dit", "schedule": "uniform", "forecast": True}], captured("dit"))


# --- cache memory freed when a loop ends ---------------------------------------------------------
def test_cache_is_freed_after_the_last_step_without_changing_results(digits_calibration, digits_cached, monkeypatch):
    """A loop that follows the calibrated timesteps, or one announced by begin_loop(n), has a known
    last step: the cached tensors go with it. The images are bit-identical to keeping the cache
    until the next loop (the old behaviour). An unannounced loop of another length keeps its cache
    until the next loop starts, with the same images as before."""
    from diffc.ir import StepTracker

    pipe, _ = digits_calibration
    fast = digits_cached
    assert len(fast.plan.schedule.timesteps) == 10
    original = pipe.unet

    def loops():
        images, held = [], []
        for steps, announce in ((10, False), (6, True), (6, False)):
            if announce:
                fast.begin_loop(steps)
            images.append(pipe(class_labels=[1, 4], num_inference_steps=steps,
                               generator=torch.Generator().manual_seed(0)).images)
            held.append(sum(isinstance(v, torch.Tensor) for state in fast._states.values() for v in state.values()))
        return images, held

    try:
        pipe.unet = fast
        freed, held = loops()
        with monkeypatch.context() as patched:
            patched.setattr(StepTracker, "at_last_step", lambda self, timesteps=(): False)
            kept, held_before = loops()
    finally:
        pipe.unet = original
    assert held[:2] == [0, 0] and held[2] > 0
    assert all(count > 0 for count in held_before)
    assert all(np.array_equal(a, b) for a, b in zip(freed, kept))


def test_a_call_that_needs_freed_cache_runs_the_full_variant(captured):
    """Two unnamed calls per step (say conditional and unconditional) keep a cache each, freed after
    their call at the last step. A third call that only the last step makes has no cache to
    reuse, so it computes everything, which is exact."""
    dg = _run([{"pass": "cache", "schedule": "uniform", "interval": 2}], captured("dit"))
    fast = compile_graph(dg, "torch", "fp32")
    reference = compile_graph(_run([], captured("dit")), "torch", "fp32")
    inputs = {name: value for name, value in _inputs(dg).items()}
    fast.begin_loop(4)
    ran = []
    fast.segments["cache_blocks"].register_forward_hook(lambda *a: ran.append(fast.steps.step))
    with torch.no_grad():
        for step, t in enumerate((900.0, 700.0, 500.0, 300.0)):
            call = {**inputs, "timestep": torch.full((2,), t)}
            first, second = first_tensor(fast(**call)), first_tensor(fast(**call))
        third = first_tensor(fast(**call))
    assert ran == [0, 0, 2, 2, 3]  # steps 1 and 3 reuse each call's own cache; the third call finds none
    assert torch.equal(first, second) and not torch.equal(first, third)
    assert torch.equal(third, first_tensor(reference(**call)))
    assert not fast._states


# --- per-block schedules (BAC) -------------------------------------------------------------------
def test_bac_caches_each_block_with_its_own_steps(captured):
    dg, cal = captured("dit"), _family_calibration("dit")
    out = _run([{"pass": "cache", "schedule": "bac", "full_fraction": 0.5}], dg, cal)
    lint(out)
    report = out.applied[-1]["report"]
    plan = build_plan(out)
    assert set(report["block_schedule"]) == {"block0", "block1"} == {r.name for r in out.step_plan.regions}
    assert set(plan.variants) == set(report["steps"]) and len(plan.variants) <= 4
    for step, variant in enumerate(report["steps"]):
        recomputed = {b for b, steps in report["block_schedule"].items() if step in steps}
        assert {s[len("cache_"):] for s in plan.variants[variant].segments if s.startswith("cache_")} == recomputed
    assert all(steps[0] == 0 for steps in report["block_schedule"].values())
    # the blocks' compute stays within half the steps' worth
    shares = report["block_flops_share"]
    spent = sum(shares[b] * len(steps) for b, steps in report["block_schedule"].items())
    assert spent <= 0.5 * report["num_steps"] * sum(shares.values()) + 1e-9
    assert report["predicted_speedup"] > 1 and len(report["relative_error_per_step"]) == report["num_steps"]
    assert len(report["block_change_per_step"]["block0"]) == report["num_steps"]


def test_bac_on_unet_stages_keeps_each_stage_inputs(captured):
    dg, cal = captured("unet2dcond"), _family_calibration("unet2dcond")
    out = _run([{"pass": "cache", "schedule": "bac", "full_fraction": 0.5}], dg, cal)
    lint(out)
    plan = build_plan(out)
    assert [s for s in plan.variants["full"].segments if s.startswith("cache_")] == \
        ["cache_down1", "cache_mid", "cache_up0"]
    inputs = _inputs(out)
    full, state = plan.run("full", inputs, {})
    for variant in plan.variants:
        again, _ = plan.run(variant, inputs, state)
        assert torch.equal(again[0], full[0])  # the same step reusing its own blocks' outputs is exact


def test_bac_recomputes_a_block_that_changes_more_at_least_as_often():
    from diffc.passes.cache.bac import bac_schedule, bac_steps

    rng = np.random.default_rng(0)
    slow = list(np.r_[0.0, rng.uniform(0.0, 0.3, 19)])
    fast_changing = [c * 1.5 + 0.05 for c in slow]
    changes = {"a": slow, "b": fast_changing, "c": slow}
    independent = {"a": None, "b": None, "c": None}
    for threshold in (0.2, 0.5, 1.0):
        steps = bac_steps(changes, independent, threshold, 20, max_gap=6)
        count = {name: sum(name in combo for combo in steps) for name in changes}
        assert count["b"] >= count["a"] == count["c"]
    assert all(combo == {"a", "b", "c"} for combo in bac_steps(changes, independent, 0.0, 20, 6))
    # a block read only by another block is not recomputed while that block is reused
    chained = bac_steps({"a": fast_changing, "b": slow}, {"a": {"b"}, "b": None}, 0.3, 20, 6)
    assert all("b" in combo for combo in chained if "a" in combo)
    # bubbling union: a block recomputes with the blocks it reads
    bubbled = bac_steps({"a": slow, "b": fast_changing}, independent, 0.3, 20, 6, feeders={"a": set(), "b": {"a"}})
    assert any(combo == {"a", "b"} for combo in bubbled) and all("a" in combo for combo in bubbled if "b" in combo)
    costs = {"a": 1.0, "b": 2.0, "c": 4.0}
    schedule, threshold = bac_schedule(changes, costs, independent, budget=8, num_steps=20, max_gap=6, max_variants=3)
    assert len(set(schedule)) <= 3 and threshold > 0
    assert sum(costs[n] for combo in schedule for n in combo) <= 8 * sum(costs.values())


@pytest.mark.parametrize("family_name", ["dit", "unet2dcond", *(pytest.param(name, marks=pytest.mark.slow)
                                                           for name in ("unet2d", "pixart", "sd3", "flux"))])
def test_bac_with_every_step_recomputed_is_exact_on_every_family(captured, family_name, family):
    """Full budget: threshold 0, every block recomputes at every step (residual or raw blocks,
    whichever each family's blocks allow; the four other families run under -m slow)."""
    model, inputs = family(family_name)
    out = _run([{"pass": "cache", "schedule": "bac", "full_fraction": 1.0}], captured(family_name),
               _family_calibration(family_name))
    report = out.applied[-1]["report"]
    assert set(report["steps"]) == {"full"} and report["threshold"] == 0 and len(report["block_schedule"]) >= 2
    fast = compile_graph(out, "torch", "fp32")
    with torch.no_grad():
        for t in ((0.9, 0.5) if family_name == "flux" else (900, 500)):
            call = {**inputs, "timestep": inputs["timestep"] * 0 + t}
            assert torch.equal(first_tensor(fast(**call)), first_tensor(model(**call)))


def test_bac_lowers_to_ort_like_torch_and_survives_save_load(captured, tmp_path):
    pytest.importorskip("onnxruntime")
    out = _run([{"pass": "cache", "schedule": "bac", "full_fraction": 0.5}], captured("dit"), _family_calibration("dit"))
    torch_model, ort_model = compile_graph(out, "torch", "fp32"), compile_graph(out, "ort", "fp32")
    torch_model.save(tmp_path / "bac")
    loaded = diffc.load(tmp_path / "bac")
    assert loaded.plan.schedule == torch_model.plan.schedule
    inputs = _inputs(out)
    steps = out.applied[-1]["report"]["steps"]
    assert len(set(steps)) > 1
    for fast in (torch_model, ort_model, loaded):
        fast.begin_loop(len(steps))
    with torch.no_grad():
        for t in np.linspace(900, 100, len(steps)):
            call = {**inputs, "timestep": torch.full((2,), float(t)), "return_dict": False}
            expected = torch_model(**call)[0]
            assert (ort_model(**call)[0] - expected).abs().max() <= 1e-4
            assert torch.equal(loaded(**call)[0], expected)


@pytest.mark.parametrize("config, family_name, message", [
    ({"cut": "first_block"}, "flux", r"leaves one candidate block .*Fix: widen the candidates"),
    ({"cut": "delta_dit"}, "dit", r"cannot take its candidate blocks from cut 'delta_dit'.*Fix: cut="),
    ({"forecast": True}, "dit", r"forecast extrapolates one cached region.*Fix: forecast=False"),
    ({"mode": "delta"}, "unet2dcond", r"caches UNet stages' outputs themselves; use mode='raw'"),
])
def test_bac_bad_input_names_the_fix(captured, config, family_name, message):
    dg = captured(family_name)
    before = dg.graph.python_code("self").src
    with pytest.raises(PassError, match=message):
        _run([{"pass": "cache", "schedule": "bac", **config}], dg, _family_calibration(family_name))
    assert dg.step_plan is None and dg.graph.python_code("self").src == before
