"""The ONNX Runtime backend: outputs match the model (single segment) and the torch backend of the
same Plan (cached segments over a denoising loop), dynamic batch and resolution, save/load from
the saved ONNX files, fp16, and clear errors for what it cannot do."""
from __future__ import annotations

import importlib.util
import json
import warnings

import onnx
import pytest
import torch

import diffc
from diffc.api import compile_graph
from diffc.backends import parse_target
from diffc.backends.onnxruntime import OnnxRuntimeBackend
from diffc.errors import ArtifactError, InputError, TargetError
from diffc.passes import PassContext, PassManager
from tiny_families import families, first_tensor

pytest.importorskip("onnxruntime")

TOL = 1e-4


def _spinning(fast) -> set[bool]:
    """Whether each segment session's intra-op threads spin after a run (ONNX Runtime's default)."""
    spinning = set()
    for runner in fast._compiled.runners.values():
        options = runner.primary.session.get_session_options()
        try:
            spinning.add(options.get_session_config_entry("session.intra_op.allow_spinning") != "0")
        except RuntimeError:  # not set: ONNX Runtime's default, which spins
            spinning.add(True)
    return spinning


def _call(fast, model, inputs):
    with torch.no_grad():
        return first_tensor(fast(**inputs)), first_tensor(model(**inputs))


@pytest.fixture(scope="module")
def dit_ort():
    """The tiny DiT compiled for ort with no passes (one segment), exported once for the module."""
    from tiny_families import families

    model, inputs = families()["dit"]
    return model, inputs, diffc.optimize(model, target="ort", passes=[])


def test_single_segment_matches_the_model_at_two_batch_sizes(dit_ort):
    model, inputs, fast = dit_ort
    assert fast.target == "ort-fp32" and list(fast.plan.segments) == ["main"]
    assert _spinning(fast) == {True}  # one session: its threads may spin between steps
    ours, theirs = _call(fast, model, inputs)
    assert (ours - theirs).abs().max() <= TOL
    # the export keeps the batch dynamic: the unconditional half of a CFG batch runs alone
    single = {k: v[:1] for k, v in inputs.items()}
    ours, theirs = _call(fast, model, single)
    assert ours.shape[0] == 1 and (ours - theirs).abs().max() <= TOL


def test_artifact_loads_its_saved_onnx_and_refuses_a_tampered_one(dit_ort, tmp_path, monkeypatch):
    model, inputs, fast = dit_ort
    fast.save(tmp_path / "a")
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert "onnx/main.onnx" in manifest["files"] and manifest["target"]["backend"] == "ort"
    assert manifest["target"]["info"]["segments"]["main"]["file"] == "onnx/main.onnx"

    def no_export(*args, **kwargs):
        raise AssertionError("loading an ort artifact exported the plan again")

    monkeypatch.setattr("diffc.backends.onnxruntime.export_plan", no_export)
    loaded = diffc.load(tmp_path / "a")
    assert torch.equal(_call(loaded, model, inputs)[0], _call(fast, model, inputs)[0])

    onnx_file = tmp_path / "a" / "onnx" / "main.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[-1] ^= 1
    onnx_file.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="onnx/main.onnx does not match its SHA-256"):
        diffc.load(tmp_path / "a")


def test_cached_plan_matches_the_torch_backend_over_a_loop(captured):
    """Cached state (the DiT residual of the skipped blocks) and values crossing segments (sizes,
    lists of chunks) pass between ONNX sessions as they do between torch segments."""
    dg = PassManager([{"pass": "cache", "schedule": "uniform", "interval": 2}]).run(captured("dit"), PassContext())
    torch_model = compile_graph(dg, "torch", "fp32")
    ort_model = compile_graph(dg, "ort", "fp32")
    assert set(ort_model.plan.segments) == {"main0", "cache_blocks", "apply_blocks", "main1"}
    # sessions run one after another: threads left spinning would take the cores from the next
    assert _spinning(ort_model) == {False}
    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(2, 4, 8, 8, generator=generator)
    labels = torch.tensor([1, 2])
    for fast in (torch_model, ort_model):
        fast.begin_loop(4)
    with torch.no_grad():
        for step, t in enumerate((900.0, 700.0, 500.0, 300.0)):
            timestep = torch.tensor([t, t])
            call = {"hidden_states": latent, "timestep": timestep, "class_labels": labels, "return_dict": False}
            expected, got = torch_model(**call)[0], ort_model(**call)[0]
            assert (got - expected).abs().max() <= TOL, f"step {step}"
            assert ort_model.steps.step == step
            if step < 3:
                assert set(ort_model._states["#call0"]) == set(ort_model.plan.state)
    assert not ort_model._states  # freed after the announced last step


@pytest.mark.slow
def test_other_resolution_and_batch_on_a_dynamic_unet(family):
    model, inputs = family("unet2dcond")
    fast = diffc.optimize(model, target="ort", passes=[])
    generator = torch.Generator().manual_seed(3)
    other = {"sample": torch.randn(1, 4, 24, 32, generator=generator), "timestep": torch.tensor([10]),
             "encoder_hidden_states": torch.randn(1, 7, 32, generator=generator)}
    for call in (inputs, other):
        ours, theirs = _call(fast, model, call)
        assert ours.shape == theirs.shape and (ours - theirs).abs().max() <= TOL


@pytest.mark.slow
@pytest.mark.parametrize("name", ["unet2dcond", "unet2d", "dit", "pixart", "sd3", "flux"])
def test_every_family_matches_the_model(name, family):
    model, inputs = family(name)
    ours, theirs = _call(diffc.optimize(model, target="ort", passes=[]), model, inputs)
    assert (ours - theirs).abs().max() <= TOL


@pytest.mark.slow
def test_fp16_is_close_and_keeps_the_timestep_in_fp32(family):
    model, inputs = family("dit")
    fast = diffc.optimize(model, target="ort-fp16", passes=[])
    assert fast.dtype == torch.float16
    session = fast._compiled.runners["main"].primary.session
    types = {v.name: v.type for v in session.get_inputs()}
    assert types == {"hidden_states": "tensor(float16)", "timestep": "tensor(float)", "class_labels": "tensor(int64)"}
    ours, theirs = _call(fast, model, inputs)
    assert ours.dtype == torch.float16
    # float16 keeps ~3 significant digits: the error is bounded relative to the output's scale
    assert (ours.float() - theirs).abs().max() <= 1e-2 * theirs.abs().max()


@pytest.mark.gpu
def test_cuda_io_binding_matches_cpu(dit_ort):
    model, inputs, fast = dit_ort
    cuda = diffc.optimize(model.cuda(), target="ort", passes=[], device="cuda")
    assert cuda._compiled.info["providers"][0] == "CUDAExecutionProvider"
    on_gpu = {k: v.cuda() for k, v in inputs.items()}
    with torch.no_grad():
        first = first_tensor(cuda(**on_gpu))
        second = first_tensor(cuda(**on_gpu))  # the second call writes into preallocated torch tensors
    assert first.is_cuda and torch.equal(first, second)
    assert (first.cpu() - _call(fast, model.cpu(), inputs)[0]).abs().max() <= 1e-3


def test_bad_targets_and_options_are_refused(dit_ort):
    with pytest.raises(TargetError, match="no precision 'bf16'"):
        parse_target("ort-bf16")
    assert parse_target("ort") == parse_target("ort-fp32")
    _, _, fast = dit_ort
    backend = OnnxRuntimeBackend()
    with pytest.raises(TargetError, match="no option profiles"):
        backend.compile(fast.plan, "fp32", profiles={"batch": (1, 2, 4)})
    with pytest.raises(TargetError, match="torch.compile"):
        backend.compile(fast.plan, "fp32", compile=True)
    with pytest.raises(TargetError, match="runs on cpu or cuda"):
        backend.compile(fast.plan, "fp32", device="meta")


def test_low_bit_needs_the_qdq_lowering_and_onnxruntime(monkeypatch):
    real = importlib.util.find_spec

    def without(*missing):
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in missing else real(name, *a))

    without("diffc.backends.onnx_qdq")
    assert "Q/DQ ONNX" in OnnxRuntimeBackend.unavailable_reason("int8")
    assert OnnxRuntimeBackend.unavailable_reason("fp16") is None
    without("diffc.backends.onnx_qdq", "onnxruntime")
    assert "pip install onnxruntime" in OnnxRuntimeBackend.unavailable_reason("fp32")


def test_inputs_outside_the_pinned_shapes_are_refused(dit_ort):
    """A session whose export pinned a dim names the segment, the inputs and the fix on a call of
    another size (the runner exports such segments again for the new shapes instead)."""
    _, inputs, fast = dit_ort
    session = fast._compiled.runners["main"].primary
    with pytest.raises(InputError, match="segment main of this ort model takes inputs"):
        session(torch.randn(2, 4, 6, 8), inputs["timestep"].float(), inputs["class_labels"])


@pytest.mark.slow
def test_pinned_segments_are_exported_again_for_other_shapes(family):
    """PixArt's mask shapes cannot stay symbolic in the exporter: a call at another text length
    (and batch) gets a session specialized to its shapes, with a warning, and the model's outputs."""
    model, inputs = family("pixart")
    fast = diffc.optimize(model, target="ort", passes=[])
    call = {**inputs, "encoder_attention_mask": torch.ones(2, inputs["encoder_hidden_states"].shape[1])}
    with pytest.warns(UserWarning, match="exporting it again"):
        ours, theirs = _call(fast, model, call)
    assert (ours - theirs).abs().max() <= TOL


@pytest.mark.slow
def test_int8_annotations_lower_to_qdq_and_match_the_torch_simulation():
    """ort-int8 runs the quantization pass's annotations as Q/DQ nodes (diffc.backends.onnx_qdq):
    its outputs agree with the torch backend's exact simulation of the same annotations."""
    from diffc.ir import capture
    from diffc.ir.precision import spec_for
    from diffc.passes.quant.layers import PROTECTIONS, quantizable_layers
    from digits_tiny import tiny_digits_pipeline

    dg = capture(tiny_digits_pipeline().unet)
    for layer in quantizable_layers(dg, PROTECTIONS):
        if layer.protected is None:
            dg.annotations[layer.node] = {"precision": spec_for("int8", 0.02).to_json()}
    plain = dg.clone()
    plain.annotations.clear()
    reference = compile_graph(plain, "torch", "fp32")
    simulated = compile_graph(dg, "torch", "int8")
    lowered = compile_graph(dg, "ort", "int8")
    ops = {n.op_type for n in onnx.load_from_string(lowered._compiled.files["onnx/main.onnx"]).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    generator = torch.Generator().manual_seed(0)
    call = {"sample": torch.randn(2, 1, 8, 8, generator=generator), "timestep": torch.tensor([500.0, 500.0]),
            "encoder_hidden_states": torch.randn(2, 1, 16, generator=generator), "return_dict": False}
    with torch.no_grad():
        exact, expected, got = reference(**call)[0], simulated(**call)[0], lowered(**call)[0]
    # ORT fuses Q/DQ pairs into integer kernels that requantize between layers, so it is not the
    # simulation bit for bit; its error against fp32 stays of the simulation's size
    simulation_error = (expected - exact).norm() / exact.norm()
    ort_error = (got - exact).norm() / exact.norm()
    print(f"relative error vs fp32: simulation {simulation_error:.4f}, ort-int8 {ort_error:.4f}")
    assert 0 < ort_error <= 1.5 * simulation_error


def _loop_outputs(graph, backends, timesteps=(900.0, 700.0, 500.0, 300.0), precision="fp32", models=None):
    """{backend: [output of each step]} of `graph` compiled for each backend (or of `models`,
    {backend: compiled model}) over one denoising loop of the tiny DiT, so that every variant of a
    step-planned graph's schedule runs."""
    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(2, 4, 8, 8, generator=generator)
    labels = torch.tensor([1, 2])
    outputs = {}
    for backend in backends:
        model = (models or {}).get(backend) or compile_graph(graph, backend, precision)
        model.begin_loop(len(timesteps))
        with torch.no_grad():
            outputs[backend] = [model(hidden_states=latent, timestep=torch.tensor([t, t]), class_labels=labels,
                                      return_dict=False)[0] for t in timesteps]
    return outputs


def _dit_units(captured):
    from diffc.passes.prune import residual_units

    dg = captured("dit")
    return dg, {u.name: u for u in residual_units(dg)}


@pytest.mark.slow
def test_pruned_plan_matches_the_torch_backend(captured):
    """A graph with a unit removed (rewired residual, dead code gone) is one plan segment."""
    from diffc.passes.prune import remove_units

    dg, units = _dit_units(captured)
    pruned = remove_units(dg.clone(), [units["transformer_blocks.1.ff"]])
    assert pruned.num_parameters() < dg.num_parameters()
    outputs = _loop_outputs(pruned, ("torch", "ort"), timesteps=(900.0, 100.0))
    for expected, got in zip(outputs["torch"], outputs["ort"]):
        assert (got - expected).abs().max() <= TOL


@pytest.mark.slow
def test_step_dependent_pruned_plan_matches_the_torch_backend_over_a_loop(captured):
    """Different units removed in different step ranges: bypass segments hand the residual input on
    in place of the skipped unit, and the chunked adaLN modulation and a size cross segments."""
    from diffc.passes.prune import PrunePass

    dg, units = _dit_units(captured)
    planned = PrunePass(amount=0.1)._pruned(dg, [[units["transformer_blocks.1.ff"]],
                                                 [units["transformer_blocks.0.ff"]]], [(0, 2), (2, 4)], 4)
    assert planned.step_plan.schedule.steps == ("steps_0_2",) * 2 + ("steps_2_4",) * 2
    outputs = _loop_outputs(planned, ("torch", "ort"))
    for step, (expected, got) in enumerate(zip(outputs["torch"], outputs["ort"])):
        assert (got - expected).abs().max() <= TOL, f"step {step}"


@pytest.mark.slow
def test_timestep_routed_moe_plan_matches_the_torch_backend_over_a_loop(family, captured):
    """A static expert subset per step range: each range's variant skips the experts it leaves off."""
    from diffc.calibration import collect

    model, _ = family("dit")
    calibration = collect(model, num_steps=4, progress=False)
    routed = PassManager([{"pass": "moe", "active": 0.5, "experts": 8, "step_groups": 2, "allocation": "per_ffn"}]
                         ).run(captured("dit"), PassContext(calibration=calibration))
    assert len(set(routed.step_plan.schedule.steps)) == 2
    outputs = _loop_outputs(routed, ("torch", "ort"))
    for step, (expected, got) in enumerate(zip(outputs["torch"], outputs["ort"])):
        assert (got - expected).abs().max() <= TOL, f"step {step}"


def test_cached_plan_with_int8_annotations_matches_the_torch_simulation(captured):
    """ort-int8 lowers the annotations of every segment of a cached plan to Q/DQ. With Q/DQ fusion
    off every layer dequantizes and computes in float, as the torch backend's simulation does: the
    two agree to float rounding at every step of a loop."""
    from diffc.ir.precision import spec_for
    from diffc.passes.quant.layers import PROTECTIONS, quantizable_layers

    cached = PassManager([{"pass": "cache", "schedule": "uniform", "interval": 2}]).run(captured("dit"), PassContext())
    for layer in quantizable_layers(cached, PROTECTIONS):
        if layer.protected is None:
            cached.annotations[layer.node] = {"precision": spec_for("int8", 0.02).to_json()}
    plain = cached.clone()
    plain.annotations.clear()
    exact = _loop_outputs(plain, ("torch",))["torch"]
    lowered = compile_graph(cached, "ort", "int8", fuse_qdq=False)
    quantized = [name for name, data in lowered._compiled.files.items() if name.endswith(".onnx")
                 and "QuantizeLinear" in {n.op_type for n in onnx.load_from_string(data).graph.node}]
    assert len(quantized) >= 2  # the cached region and the segments around it
    outputs = _loop_outputs(cached, ("torch", "ort"), precision="int8", models={"ort": lowered})
    for step, (reference, expected, got) in enumerate(zip(exact, outputs["torch"], outputs["ort"])):
        assert (expected - reference).abs().max() > 10 * TOL  # the annotations do quantize
        assert (got - expected).abs().max() <= TOL, f"step {step}"


@pytest.mark.parametrize("family", ["flux", pytest.param("pixart", marks=pytest.mark.slow),
                                    pytest.param("sd3", marks=pytest.mark.slow),
                                    pytest.param("unet2dcond", marks=pytest.mark.slow)])
def test_cache_then_quant_lowers_through_ort_int8_on_every_family(family):
    """onnxruntime's MatMulAddFusion once made the FLUX transformer's Q/DQ session fail to load
    (a QuantizeLinear with output_dtype int8 and a uint8 zero point); PixArt's synthetic
    calibration once passed an argument the captured graph lacks."""
    model, example = families()[family]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        calibration = diffc.calibration.collect(model, num_steps=4, example_inputs=example, progress=False)
        fast = diffc.optimize(model, target="ort-int8", example_inputs=example, calibration=calibration,
                              passes=["cache", {"pass": "quant", "min_psnr": None, "samples": 2, "probes": 1,
                                                         "only_where_faster": False}])
    assert fast.target == "ort-int8" and [entry["pass"] for entry in fast.report] == ["cache", "quant"]
    with torch.no_grad():
        out = fast(**example)
    assert torch.isfinite(first_tensor(out)).all()
