import functools
import math
import warnings

import pytest
import torch

import diffc
from diffc.calibration import collect
from diffc.errors import PassError
from diffc.ir import lint
from diffc.ir.fxutil import attr_value
from diffc.ir.partition import build_plan
from diffc.passes import PassContext, PassManager
from diffc.calibration.batch import CalibrationBatch, plan_error
from diffc.passes.moe.experts import ConvertedFFN, convert, find_ffns, split_experts
from diffc.passes.moe.step_routing import global_selection
from diffc.passes.rewrites import eliminate_dead_code
from default_models import optimized_psnr
from tiny_families import first_tensor


@functools.lru_cache(maxsize=None)
def _calibration(family_name, num_steps=4):
    from conftest import _family

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return collect(_family(family_name)[0], num_steps=num_steps, progress=False)


def _run(passes, dg, calibration):
    return PassManager(passes).run(dg, PassContext(calibration=calibration))


def test_finds_gelu_and_geglu_ffns(captured):
    dit, _ = find_ffns(captured("dit"))
    assert [f.block for f in dit] == ["transformer_blocks.0.ff", "transformer_blocks.1.ff"]
    assert not dit[0].geglu
    unet, _ = find_ffns(captured("unet2dcond"))
    assert unet and all(f.geglu for f in unet)


def test_all_experts_active_reproduces_the_model_exactly(family, captured):
    model, inputs = family("dit")
    fast = diffc.optimize(model, passes=[{"pass": "moe", "active": 1.0}], calibration=_calibration("dit"))
    with torch.no_grad():
        assert torch.equal(first_tensor(fast(**inputs)), first_tensor(model(**inputs)))


def test_a_search_that_no_share_passes_leaves_the_ffns_dense(family, captured):
    """Without a way to re-sample (no denoiser to compile candidates with) the search lands on its
    fallback, every expert active: the pass declines with the untouched graph, not a routed one
    whose refits were fitted anyway."""
    model, inputs = family("dit")
    dg = captured("dit")
    with pytest.warns(UserWarning, match="stays at 1.0"):
        result = _run([{"pass": "moe"}], dg, _calibration("dit"))
    entry = result.applied[-1]
    assert not entry["modified"] and "declined" in entry["report"]
    lint(result)
    with torch.no_grad():
        flat = [inputs[spec.name] if spec.name in inputs else None for spec in dg.signature.inputs]
        assert torch.equal(result.module(*flat)[0], dg.module(*flat)[0])


def test_optimize_with_progress_shows_the_pass_bars(family, capsys):
    model, _ = family("dit")
    diffc.optimize(model, passes=[{"pass": "moe", "active": 0.5, "recover_steps": 2}], calibration=_calibration("dit"),
                   progress=True)
    shown = capsys.readouterr().err
    assert "moe: scoring experts" in shown and "moe: recovery" in shown


@pytest.mark.parametrize("family_name", ["dit", "unet2dcond"])
def test_expert_chain_computes_the_dense_ffn(family_name, captured):
    """Every expert on: the converted FFNs equal the dense ones up to float summation order."""
    dg = captured(family_name)
    converted = dg.clone()
    generator = torch.Generator().manual_seed(0)
    for ffn in find_ffns(converted)[0]:
        width = ffn.down.args[1].meta["tensor_meta"].shape[1]
        activations = torch.rand(64, width, generator=generator)
        weight = attr_value(converted.module, ffn.down.args[1].target)
        shared, experts = split_experts(activations, weight.detach(), 4, True, 64, 0)
        assert sorted(shared + sum(experts, [])) == list(range(width))
        convert(converted, ffn, shared, experts, list(range(len(experts))))
    eliminate_dead_code(converted)
    lint(converted)
    assert converted.num_parameters() == dg.num_parameters()
    flat = [torch.randn(s.example_shape, generator=generator) if s.dtype.startswith("float")
            else torch.ones(s.example_shape, dtype=torch.int64) for s in dg.signature.inputs]
    with torch.no_grad():
        expected, got = dg.module(*flat)[0], converted.module(*flat)[0]
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("refit", [True, False])
def test_timestep_routing_structure_and_numerics(captured, refit):
    dg = captured("dit")
    cal = _calibration("dit")
    out = _run([{"pass": "moe", "active": 0.5, "experts": 8, "step_groups": 2, "refit": refit}], dg, cal)
    lint(out)
    report = out.applied[-1]["report"]
    assert report["ffn_active_share_per_range"] == [0.5, 0.5]
    assert 0 < report["activated_params_reduction"] < 0.5
    plan = build_plan(out)
    if refit:
        # one refit FFN per FFN and step range, each on in its own range's variant only
        regions = [r.name for r in out.step_plan.regions]
        assert len(regions) == 2 * len(report["ffns"]) and all(r.endswith(("_steps0", "_steps1")) for r in regions)
        assert out.step_plan.variants == {"steps_0_2": tuple(r for r in regions if r.endswith("_steps1")),
                                          "steps_2_4": tuple(r for r in regions if r.endswith("_steps0"))}
        assert out.step_plan.schedule.default in ("steps_0_2", "steps_2_4")
    elif out.step_plan:
        assert all(r.mode == "bypass" for r in out.step_plan.regions)
        assert set(plan.variants) == {"full", "steps_0_2", "steps_2_4"} and not plan.state
        full_segments = len(plan.variants["full"].segments)
        assert all(len(v.segments) == full_segments for v in plan.variants.values())
    batch = CalibrationBatch(cal, dg, 64)
    assert report["relative_error"] == pytest.approx(plan_error(out, batch), abs=1e-6)
    assert 0 < report["relative_error"] < 1


def test_routed_variant_equals_graph_without_its_experts(captured):
    """Bypassing an expert region gives exactly what removing that expert from the chain gives."""
    dg = captured("dit")
    out = _run([{"pass": "moe", "active": 0.5, "experts": 8, "step_groups": 2, "allocation": "per_ffn"}], dg,
               _calibration("dit"))
    assert out.step_plan, "the two step ranges of the tiny DiT route different experts"
    plan = build_plan(out)
    variant = "steps_2_4"
    skipped = set(out.step_plan.variants[variant])
    reference = out.clone()
    ref_nodes = {n.name: n for n in reference.graph.nodes}
    for region in out.step_plan.regions:
        if region.name in skipped:
            cut = region.cuts[0]
            ref_nodes[cut].replace_all_uses_with(ref_nodes[region.bases[cut]])
    reference.step_plan = None
    eliminate_dead_code(reference)
    generator = torch.Generator().manual_seed(1)
    inputs = {s.name: (torch.randn(s.example_shape, generator=generator) if s.dtype.startswith("float")
                       else torch.ones(s.example_shape, dtype=torch.int64)) for s in dg.signature.inputs}
    got, _ = plan.run(variant, inputs, {})
    with torch.no_grad():
        assert torch.equal(got[0], reference.module(*inputs.values())[0])


def test_global_allocation_drops_least_score_per_neuron_first():
    ffns = [ConvertedFFN("a", 8, ["a0", "a1", "a2", "a3"], [2, 2, 2, 2], 1),
            ConvertedFFN("b", 8, ["b0", "b1", "b2"], [4, 2, 2], 1)]
    scores = [{(0, 0): 0.1, (0, 1): 0.5, (0, 2): 0.2, (1, 0): 0.05, (1, 1): 0.9},
              {(0, 0): 0.9, (0, 1): 0.8, (0, 2): 0.7, (1, 0): 0.01, (1, 1): 0.02}]
    chosen = global_selection(ffns, scores, 0.5)  # 16 neurons, heads 6: drop 8 of the 10 routed neurons
    assert chosen == [[[], [0]], [[1], []]]
    assert global_selection(ffns, scores, 1.0) == [[[0, 1, 2]] * 2, [[0, 1]] * 2]


@pytest.mark.parametrize("options, message", [
    ({"experts": 1}, "experts must be >= 2"),
    ({"ridge": -1.0}, "ridge is the relative L2 penalty"),
    ({"recover_steps": -1}, "recover_steps must be >= 0"),
    ({"recover_rows": 0}, "recover_rows and recover_records must be >= 1"),
    ({"active": 0.0}, "active is the share"),
    ({"experts": 1000}, "cannot be split into 1000 experts"),
])
def test_bad_options_fail_clearly(captured, options, message):
    with pytest.raises(PassError, match=message):
        _run([{"pass": "moe", "active": 0.5, **options}], captured("dit"), _calibration("dit"))


def test_model_without_ffns_fails_clearly(captured):
    with pytest.raises(PassError, match="no FFN of the form"):
        _run([{"pass": "moe", "active": 0.5}], captured("unet2d"), _calibration("unet2d"))


@pytest.mark.slow
@pytest.mark.parametrize("model_name", [
    "digits-unet",
    pytest.param("digits-dit", marks=pytest.mark.xfail(
        reason="without training: 19.8 dB on 2026-11-28, 18.9 dB on 2026-11-30 with mean-output compensation, "
               "23.1 dB on 2026-12-01 with the per-range least-squares refit, 22.9 dB once errors were measured per "
               "call (per-token routing at the same share: 20.2 dB); the small DiT's half-size FFNs cannot serve all "
               "calibration classes without training (the refit on the four test labels alone gives 29.8 dB). With "
               "Dense2MoE's training it passes: see the next test", strict=False)),
])
def test_half_the_ffn_active_on_default_models(model_name):
    """Issue 4: timestep-routed MoE with half the FFN parameters active keeps PSNR >= 25 dB, here
    training-free (the pass's defaults)."""
    psnr, report = optimized_psnr(model_name, [{"pass": "moe", "active": 0.5}])
    assert 0.5 <= report["ffn_active_share"] < 0.55
    assert psnr >= 25


@pytest.mark.slow  # about 5 min for digits-dit and 8 for digits-unet: 800 distillation steps
@pytest.mark.parametrize("model_name", ["digits-unet", "digits-dit"])
def test_half_the_ffn_active_with_recovery_on_default_models(model_name):
    """Issue 4's MoE threshold with Dense2MoE's training: recovery distillation on the calibration
    calls of 8 seeds (more data, not more steps, is what lifts the final images). On digits-unet,
    which starts close to its teacher, the distillation does not help and the start weights are
    kept (measured 2026-12-01: digits-dit 22.9 -> 26.7 dB, digits-unet 33.3 dB)."""
    options = {"pass": "moe", "active": 0.5, "recover_steps": 800, "recover_lr": 1e-3}
    psnr, report = optimized_psnr(model_name, [options], calibration_seeds=list(range(8)))
    assert 0.5 <= report["ffn_active_share"] < 0.55
    assert report["relative_error"] <= report["relative_error_before_recovery"]
    assert psnr >= 25


@pytest.mark.slow  # about 25 s: an ONNX export per segment
def test_routed_graph_lowers_through_ort(captured, family):
    pytest.importorskip("onnxruntime")
    from diffc.api import compile_graph

    _, inputs = family("dit")
    out = _run([{"pass": "moe", "active": 0.5, "experts": 8, "step_groups": 2, "allocation": "per_ffn"}],
               captured("dit"), _calibration("dit"))
    results = []
    for backend in ("torch", "ort"):
        model = compile_graph(out, backend, "fp32")
        with torch.no_grad():
            results.append([first_tensor(model(**{**inputs, "timestep": inputs["timestep"] * 0 + t}))
                            for t in (900, 100)])
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.filterwarnings("ignore:calibrating a bare denoiser")
def test_timestep_routed_experts_then_quant_lower_every_annotation_where_it_is_computed(family):
    """A skipped expert's bypass segment hands on values computed elsewhere: its inputs must not take
    the names of annotated nodes, or the backend would quantize a placeholder."""
    model, inputs = family("dit")
    calibration = collect(model, num_steps=3, progress=False)
    quant = {"pass": "quant", "samples": 3, "probes": 1, "trajectories": 1}
    fast = diffc.optimize(model, target="torch-mixed", passes=["moe", quant], calibration=calibration)
    annotated = set(fast.plan.graph.annotations)
    assert annotated and len(fast.plan.variants) > 1
    for segment in fast.plan.segments.values():
        placeholders = {n.name for n in segment.module.graph.nodes if n.op == "placeholder"}
        assert not placeholders & annotated, segment.name
    with torch.no_grad():
        for t in (900, 500, 100):
            assert torch.isfinite(first_tensor(fast(**{**inputs, "timestep": torch.tensor([t, t])}))).all()


def _token_routed(active, family_name="dit"):
    from conftest import _captured

    return _run([{"pass": "moe", "active": active, "routing": "token", "experts": 4}], _captured(family_name).clone(),
                _calibration(family_name))


def test_token_routing_structure_and_numerics(captured):
    dg = captured("dit")
    out = _token_routed(0.5)
    lint(out)
    report = out.applied[-1]["report"]
    assert out.step_plan is None and report["routing"].startswith("per token")
    targets = [n.target for n in out.graph.nodes]
    assert targets.count(torch.ops.aten.topk.default) == targets.count(torch.ops.aten.scatter_add.default) == 2 * 3
    tokens = 16  # the tiny DiT's patches
    for block, sizes in report["expert_sizes"].items():  # half the neurons: the shared one and a share of routed
        routed_share = (0.5 * sum(sizes) - sizes[0]) / sum(sizes[1:])
        assert report["capacity_tokens"][block] == math.ceil(routed_share * tokens)
    assert 0.5 <= report["ffn_active_share"] < 0.6 and report["activated_params_reduction"] > 0
    batch = CalibrationBatch(_calibration("dit"), dg, 32)
    assert report["relative_error"] == pytest.approx(batch.error(out.module), rel=1e-4, abs=1e-6)  # reported to 6 decimals
    assert 0 < report["relative_error"] < 0.1


def test_token_routing_writes_no_step_plan_so_cache_may_follow():
    assert not PassManager([{"pass": "moe", "routing": "token"}]).passes[0].writes_step_plan()
    PassManager([{"pass": "moe", "routing": "token"}, "cache"]).validate()
    with pytest.raises(PassError, match="cache cannot run after moe"):
        PassManager(["moe", "cache"]).validate()


def test_token_routing_with_every_token_computes_the_dense_model(captured):
    dg = captured("dit")
    out = _token_routed(0.99)
    assert set(out.applied[-1]["report"]["capacity_tokens"].values()) == {16}
    generator = torch.Generator().manual_seed(3)
    flat = [torch.randn(s.example_shape, generator=generator) if s.dtype.startswith("float")
            else torch.ones(s.example_shape, dtype=torch.int64) for s in dg.signature.inputs]
    with torch.no_grad():
        expected, got = dg.module(*flat)[0], out.module(*flat)[0]
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))


@pytest.mark.slow  # about 40 s: ONNX export and save/load
def test_token_routed_model_lowers_through_ort_and_round_trips(family, tmp_path):
    pytest.importorskip("onnxruntime")
    model, inputs = family("dit")
    fast = diffc.optimize(model, target="ort", passes=[{"pass": "moe", "active": 0.5, "routing": "token",
                                                        "experts": 4}], calibration=_calibration("dit"))
    reference = diffc.optimize(model, passes=[{"pass": "moe", "active": 0.5, "routing": "token", "experts": 4}],
                               calibration=_calibration("dit"))
    fast.save(tmp_path / "a")
    loaded = diffc.load(tmp_path / "a")
    with torch.no_grad():
        expected = first_tensor(reference(**inputs))
        assert torch.allclose(first_tensor(fast(**inputs)), expected, atol=1e-4, rtol=1e-4)
        assert torch.equal(first_tensor(loaded(**inputs)), first_tensor(fast(**inputs)))


def test_token_routing_needs_a_static_token_count(captured):
    with pytest.raises(PassError, match="static token count.*dynamic=False"):
        _run([{"pass": "moe", "active": 0.5, "routing": "token"}], captured("unet2dcond"), _calibration("unet2dcond"))
    with pytest.raises(PassError, match="routing must be one of"):
        _run([{"pass": "moe", "routing": "tokens"}], captured("dit"), _calibration("dit"))


def test_switched_off_experts_are_replaced_by_their_mean_output(captured):
    """With compensation, a bypassed expert hands on acc + its mean output over the calibration
    tokens of the ranges that switch it off; with it on, the chain computes what it did."""
    from diffc.calibration.statistics import Observer

    dg, cal = captured("dit"), _calibration("dit")
    options = {"pass": "moe", "active": 0.5, "experts": 8, "step_groups": 2, "allocation": "per_ffn", "refit": False}
    out = _run([options], dg, cal)
    region = out.step_plan.regions[0]
    off_ranges = [name for name, skipped in out.step_plan.variants.items() if region.name in skipped]
    nodes = {n.name: n for n in out.graph.nodes}
    cut = nodes[region.cuts[0]]
    assert region.bases[cut.name] == cut.args[0].name == f"{region.name}_compensated"
    expert_out = cut.args[1]  # the expert's down projection, its bias the negated mean
    batch = CalibrationBatch(cal, dg, 32)
    off = torch.zeros(len(batch.row_steps), dtype=torch.bool)
    for name in off_ranges:
        start, end = (int(v) for v in name.split("_")[1:])
        off |= (batch.row_steps >= start) & (batch.row_steps < end)
    seen = []
    with torch.no_grad():
        for flat in batch.calls(off):
            Observer(out.module, {expert_out.name}, lambda _, v: seen.append(v)).run(*flat)
    centred = torch.cat(seen).reshape(-1, expert_out.meta["tensor_meta"].shape[-1]).double().mean(0)
    mean = attr_value(out.module, f"{region.name}_mean_output").double()
    assert centred.abs().max() < 1e-4 * max(float(mean.abs().max()), 1e-3)
    acc = cut.args[0].args[0]
    values = {}
    with torch.no_grad():
        Observer(out.module, {acc.name, expert_out.name, cut.name}, values.__setitem__).run(*batch.batches[0])
    # expert on: (acc + mean) + (expert - mean) is the uncompensated link acc + expert, up to rounding
    assert torch.allclose(values[cut.name], values[acc.name] + (values[expert_out.name] + mean.float()), atol=1e-5)


def test_ridge_fit_recovers_a_linear_map_and_refit_lowers_the_error(captured):
    """The refit solves least squares exactly (a planted linear map comes back without ridge), and
    refitting the kept neurons' down-projection per step range lowers the calibration error of
    the same expert choice."""
    from diffc.passes.moe.step_routing import ridge_fit

    generator = torch.Generator().manual_seed(0)
    features = torch.randn(500, 12, generator=generator)
    weight, bias = torch.randn(5, 12, generator=generator), torch.randn(5, generator=generator)
    got_weight, got_bias = ridge_fit(features, features @ weight.T + bias, 0.0)
    assert torch.allclose(got_weight, weight, atol=1e-4) and torch.allclose(got_bias, bias, atol=1e-4)
    shrunk, _ = ridge_fit(features, features @ weight.T + bias, 10.0)
    assert shrunk.norm() < weight.norm()
    dg, cal = captured("dit"), _calibration("dit")
    errors = {refit: _run([{"pass": "moe", "active": 0.5, "step_groups": 2, "refit": refit}], dg, cal)
              .applied[-1]["report"]["relative_error"] for refit in (True, False)}
    assert errors[True] < errors[False]


def test_recovery_distils_the_routed_experts(captured):
    """recover_steps distils the routed graph through each step range's variant: the calibration
    error falls, the plan and the dense graph's weights are kept."""
    dg, cal = captured("dit"), _calibration("dit")
    before = {k: v.clone() for k, v in dg.weights().items()}
    out = _run([{"pass": "moe", "active": 0.5, "step_groups": 2, "max_records": 8, "recover_steps": 20,
                 "recover_lr": 1e-3}], dg, cal)
    lint(out)
    report = out.applied[-1]["report"]
    assert out.step_plan and report["relative_error"] < report["relative_error_before_recovery"]
    assert report["recovery_loss"]["steps"] == 20
    assert all(torch.equal(v, before[k]) for k, v in dg.weights().items())
