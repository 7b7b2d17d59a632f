"""The TensorRT backend. Without TensorRT (this CI): the module imports, trt targets stop before any work
with the install instructions, and the parts that do not need a GPU (options, optimization-profile
ranges, the built-for check, saved-engine options) are tested. With a real TensorRT (`pytest -m tensorrt`
on a CUDA machine): engines are built and run for tiny families and compared to torch."""
from __future__ import annotations

import copy
import json

import pytest
import torch

import diffc
from diffc import cli
from diffc.backends import parse_target, tensorrt, valid_targets
from diffc.backends.tensorrt import (INSTALL_HINT, BuildSettings, TensorRTBackend, check_built_for, dim_value,
                                     tensorrt_version)
from diffc.errors import ArtifactError, TargetError
from diffc.ir import onnx_segments

pytestmark_no_trt = pytest.mark.skipif(tensorrt_version() is not None, reason="TensorRT is installed here")


@pytestmark_no_trt
def test_trt_targets_say_how_to_install_tensorrt():
    for precision in ("fp16", "int8", "fp32"):
        reason = TensorRTBackend.unavailable_reason(precision)
        assert reason == INSTALL_HINT
    assert "pip install tensorrt" in INSTALL_HINT and "NVIDIA GPU" in INSTALL_HINT
    assert "docs.nvidia.com/deeplearning/tensorrt" in INSTALL_HINT
    with pytest.raises(TargetError, match="target 'trt-fp16' is not available: TensorRT is not installed"):
        parse_target("trt-fp16")
    assert not any(t.startswith("trt") for t in valid_targets())


def test_unknown_trt_precision_is_named():
    assert TensorRTBackend.unavailable_reason("int3") == "the TensorRT backend has no precision 'int3'"


@pytestmark_no_trt
def test_optimize_with_trt_stops_before_any_work(family, monkeypatch):
    import diffc.api

    monkeypatch.setattr(diffc.api, "capture", lambda *a, **k: pytest.fail("captured before the target was checked"))
    with pytest.raises(TargetError, match="pip install tensorrt"):
        diffc.optimize(family("dit")[0], target="trt-fp16", passes=[])


@pytestmark_no_trt
def test_cli_optimize_with_trt_stops_before_loading_the_model(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_load_pipeline", lambda *a: pytest.fail("loaded a model before the target was checked"))
    assert cli.main(["optimize", "--target", "trt-fp16"]) == 2
    error = capsys.readouterr().err
    assert "diffc: error: target 'trt-fp16' is not available: TensorRT is not installed" in error
    assert "pip install tensorrt" in error
    assert cli.main(["export", "digits-unet", "--target", "trt-int8", "--out", "unused"]) == 2
    assert "pip install tensorrt" in capsys.readouterr().err


def test_trt_targets_need_tensorrt_and_a_cuda_gpu(monkeypatch):
    monkeypatch.setattr(tensorrt, "tensorrt_version", lambda: "10.13.0.35")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "torch sees no CUDA device" in TensorRTBackend.unavailable_reason("fp16")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert all(TensorRTBackend.unavailable_reason(p) is None for p in ("fp32", "fp16", "bf16", "fp8", "int8", "int4",
                                                                     "mixed"))


@pytest.mark.parametrize("precision, formats, source, needed", [
    ("int8", ["int8"], "float32", {"int8", "fp16"}), ("mixed", ["int8", "fp8"], "float32", {"mixed", "int8", "fp16",
                                                                                           "fp8"}),
    ("int8", ["int8"], "bfloat16", {"int8", "bf16"}), ("fp16", [], "bfloat16", {"fp16"})])
def test_the_gpu_must_support_every_format_an_engine_computes_in(monkeypatch, precision, formats, source, needed):
    """A mixed target's fp8 layers and a bf16 model's unquantized layers need an Ada/Hopper or an
    Ampere GPU as trt-fp8 and trt-bf16 do; the check names what is missing and the fix."""
    import types

    from diffc.ir.precision import spec_for

    annotations = {f"layer{i}": {"precision": spec_for(name, 0.05).to_json()} for i, name in enumerate(formats)}
    plan = types.SimpleNamespace(graph=types.SimpleNamespace(annotations=annotations,
                                                             signature=types.SimpleNamespace(source_dtype=source)))
    assert tensorrt.required_formats(plan, precision, None) == needed
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (7, 5))
    if {"fp8", "bf16"} & needed:
        with pytest.raises(TargetError, match=rf"trt-{precision} computes in (fp8|bf16), which needs a GPU of compute "
                                              r"capability 8\.\d or newer; Tesla T4 has 7\.5"):
            tensorrt._check_capability(needed, precision, torch.device("cuda"))
    else:
        tensorrt._check_capability(needed, precision, torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))
    tensorrt._check_capability(needed, precision, torch.device("cuda"))


def test_layers_with_dynamic_activation_scales_are_refused_before_any_build():
    from diffc.ir.partition import build_plan
    from diffc.ir.precision import PER_TOKEN, ActivationQuant, spec_with
    from diffc.passes.quant.layers import PROTECTIONS, quantizable_layers
    from digits_tiny import tiny_digits_pipeline

    dg = diffc.ir.capture(tiny_digits_pipeline().unet)
    linear = next(layer for layer in quantizable_layers(dg, PROTECTIONS) if len(layer.shape) == 2)
    dg.annotations[linear.node] = {"precision": spec_with("int8_dynamic",
                                                          ActivationQuant("int8", dynamic=PER_TOKEN)).to_json()}
    with pytest.raises(TargetError, match="static activation scales.*torch or ort target"):
        TensorRTBackend().compile(build_plan(dg), "int8")


def test_build_options_are_validated():
    settings = BuildSettings.from_options({"profiles": {"batch": (1, 2, 4), "height": 32}, "optimization_level": 5,
                                           "workspace_bytes": 1 << 30, "timing_cache": None, "cuda_graph": True})
    assert settings.profiles == {"batch": (1, 2, 4), "height": (32, 32, 32)}
    assert settings.timing_cache is None and settings.cuda_graph and settings.optimization_level == 5
    assert BuildSettings.from_options(json.loads(json.dumps(settings.to_json()))) == settings
    for options, message in [({"profile": {}}, "no option profile"),
                             ({"optimization_level": 7}, "optimization_level must be an integer from 0 to 5"),
                             ({"workspace_bytes": -1}, "workspace_bytes must be a positive number"),
                             ({"profiles": {"batch": (4, 2, 8)}}, r"profile 'batch' must be .* min <= opt <= max"),
                             ({"profiles": {"batch": (1, 2)}}, "profile 'batch' must be")]:
        with pytest.raises(TargetError, match=message):
            BuildSettings.from_options(options)


def test_dim_values_of_exporter_expressions():
    sizes = {"batch": 2, "height": 17, "width": 32}
    assert dim_value("height", sizes) == 17
    assert dim_value("2*((height - 1)//2) + 2", sizes) == 18
    assert dim_value("((height//2))*((width//2))", sizes) == 128
    for bad in ("tokens", "Max(height, 4)", "height ** 2", "__import__('os')"):
        with pytest.raises(ValueError):
            dim_value(bad, sizes)


def test_profile_ranges_per_onnx_input():
    inputs = [{"name": "sample", "dims": ["batch", 4, "height", "width"]},
              {"name": "cached", "dims": ["batch", 64, "(height//2)", "(width//2)"]},
              {"name": "tokens", "dims": ["batch", "text_len", 32]}]
    ranges = tensorrt.dim_ranges(inputs, {"batch": (1, 2, 4), "height": (16, 32, 64)},
                                 {"batch": 2, "height": 16, "width": 16, "text_len": 7}, "main0")
    assert ranges["sample"] == [(1, 2, 4), (4, 4, 4), (16, 32, 64), (16, 16, 16)]
    assert ranges["cached"] == [(1, 2, 4), (64, 64, 64), (8, 16, 32), (8, 8, 8)]
    assert ranges["tokens"] == [(1, 2, 4), (7, 7, 7), (32, 32, 32)]
    with pytest.raises(TargetError, match=r"segment 'main0': dim 1 of input 'x' is 's77'.*profiles=\{'s77'"):
        tensorrt.dim_ranges([{"name": "x", "dims": ["batch", "s77"]}], {}, {"batch": 2}, "main0")


def test_engines_built_for_another_gpu_or_tensorrt_are_refused():
    here = {"gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "tensorrt": "10.13.0.35"}
    check_built_for(dict(here), here)
    for key, other in (("gpu", "NVIDIA L4"), ("compute_capability", "8.9"), ("tensorrt", "10.3.0.26")):
        with pytest.raises(ArtifactError, match=r"built for .* but this machine has NVIDIA H100.*rebuild them here"):
            check_built_for({**here, key: other}, here)
    with pytest.raises(ArtifactError, match="no record of the GPU and TensorRT version"):
        check_built_for({}, here)


def test_saved_engines_come_back_as_compile_options(tmp_path):
    (tmp_path / "engines").mkdir()
    (tmp_path / "engines" / "main.plan").write_bytes(b"engine bytes")
    io = {"inputs": [{"name": "x", "dtype": "FLOAT", "dims": ["batch"]}],
          "outputs": [{"name": "y", "dtype": "FLOAT", "dims": ["batch"]}],
          "entries": {"inputs": [{"name": "x", "kind": "tensor", "count": 1}],
                      "outputs": [{"name": "y", "kind": "tensor", "count": 1}]}}
    built_for = {"gpu": "g", "compute_capability": "9.0", "tensorrt": "10.13"}
    manifest = {"plan": {"segments": {"main": {}}},
                "target": {"info": {"built_for": built_for, "settings": BuildSettings().to_json(),
                                    "segments": {"main": {"file": "engines/main.plan", **io}}}}}
    options = TensorRTBackend.artifact_options(tmp_path, manifest)
    assert options["engines"]["main"] == {"engine": b"engine bytes", **io}
    assert options["built_for"] == built_for
    assert BuildSettings.from_options({k: v for k, v in options.items() if k not in ("engines", "built_for")}) \
        == BuildSettings()
    manifest["plan"]["segments"]["cache_deep"] = {}
    with pytest.raises(ArtifactError, match=r"no TensorRT engine for segments \['cache_deep'\]"):
        TensorRTBackend.artifact_options(tmp_path, manifest)


# --- with a real TensorRT on a CUDA GPU -------------------------------------------------------------
FP16_TOLERANCE = 2e-2  # relative to the output's scale: fp16 accumulation over a tiny model


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float().cpu() - want.float().cpu()).abs().max() / want.abs().max().clamp_min(1e-6))


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.parametrize("name", ["dit", "unet2dcond", "sd3"])
def test_fp16_engines_match_torch(name, family, tmp_path):
    model, inputs = family(name)
    model = copy.deepcopy(model).to("cuda")
    cuda_inputs = {k: v.to("cuda") if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    with torch.no_grad():
        want = model(**cuda_inputs, return_dict=False)[0]
        fast = diffc.optimize(model, target="trt-fp16", passes=[])
        got = fast(**cuda_inputs, return_dict=False)[0]
    assert got.device.type == "cuda" and got.shape == want.shape
    assert _relative_error(got, want) <= FP16_TOLERANCE
    info = fast._compiled.info
    assert info["built_for"]["tensorrt"] == tensorrt_version()
    assert set(fast._compiled.files) == {f"engines/{s}.plan" for s in fast.plan.segments}


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_cached_plan_profiles_and_cuda_graphs(family, tmp_path):
    """Several segments with state kept on the GPU, a batch range, CUDA-graph replay: the same outputs
    as the torch backend of the same Plan, step by step; a batch outside the profile is refused."""
    from diffc.api import _compile_plan
    from diffc.errors import InputError

    model, inputs = family("dit")
    model = copy.deepcopy(model).to("cuda")
    reference = diffc.optimize(model, passes=[{"pass": "cache", "schedule": "uniform", "interval": 2}])
    plan = reference.plan
    assert len(plan.segments) > 1
    fast = _compile_plan(plan, "trt", "fp16", "cuda", profiles={"batch": (1, 2, 4)}, cuda_graph=True,
                         timing_cache=tmp_path / "timing.cache")
    assert (tmp_path / "timing.cache").stat().st_size > 0
    for batch in (2, 4):
        latent = torch.randn(batch, 4, 8, 8, device="cuda")
        labels = torch.arange(batch, device="cuda")
        reference.begin_loop(4)
        fast.begin_loop(4)
        for t in (900, 600, 300, 100):
            timestep = torch.full((batch,), t, device="cuda")
            want = reference(latent, timestep, labels, return_dict=False)[0]
            got = fast(latent, timestep, labels, return_dict=False)[0]
            assert _relative_error(got, want) <= FP16_TOLERANCE
    with pytest.raises(InputError, match="outside the engine's optimization profile"):
        fast.begin_loop(1)
        fast(torch.randn(8, 4, 8, 8, device="cuda"), torch.full((8,), 900, device="cuda"),
             torch.zeros(8, dtype=torch.long, device="cuda"))


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_saved_engines_load_back_and_refuse_another_machine(family, tmp_path):
    """diffc.load runs the saved engines (no rebuild: same outputs bit for bit) and refuses them when the
    manifest says they were built for another TensorRT version."""
    model, inputs = family("dit")
    model = copy.deepcopy(model).to("cuda")
    fast = diffc.optimize(model, target="trt-fp16", passes=[])
    fast.save(tmp_path / "a")
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["target"]["info"]["built_for"] == tensorrt.machine_description(torch.device("cuda"))
    loaded = diffc.load(tmp_path / "a")
    cuda_inputs = {k: v.to("cuda") for k, v in inputs.items()}
    with torch.no_grad():
        assert torch.equal(loaded(**cuda_inputs, return_dict=False)[0], fast(**cuda_inputs, return_dict=False)[0])
    manifest["target"]["info"]["built_for"]["tensorrt"] = "9.0.0"
    (tmp_path / "a" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="with TensorRT 9.0.0, but this machine has"):
        diffc.load(tmp_path / "a")


def test_build_pipeline_up_to_the_engine_builder(family, monkeypatch, tmp_path):
    """Everything before TensorRT's builder runs on the CPU: per-segment export, the contract check, the
    recorded inputs/outputs and the optimization-profile ranges handed to the builder."""
    built = {}

    def build_engine(path, precision, ranges, settings, segment):
        import onnx

        assert onnx.load(str(path)).graph.node and precision == "fp16"
        built[segment] = ranges
        return f"engine of {segment}".encode()

    monkeypatch.setattr(tensorrt, "build_engine", build_engine)
    plan = diffc.optimize(family("dit")[0], passes=[]).plan
    settings = BuildSettings.from_options({"timing_cache": tmp_path / "cache"})
    engines, io = tensorrt._build_all(plan, "fp16", settings, progress_bar=False)
    assert engines == {"main": b"engine of main"}
    assert [e["name"] for e in io["main"]["entries"]["inputs"]] == list(plan.segments["main"].inputs)
    assert [spec["name"] for spec in io["main"]["inputs"]] == list(built["main"])
    example = {spec.name.replace(".", "_x2E_"): tuple(spec.example_shape) for spec in plan.graph.signature.inputs}
    for name, dims in built["main"].items():
        assert tuple(low for low, _, _ in dims) == tuple(high for _, _, high in dims) == example[name]
    with pytest.raises(TargetError, match=r"profiles were given for \['heigth'\], but no segment has a dynamic dim"):
        tensorrt.check_profile_names({"heigth": (8, 16, 32)}, io)


def test_segment_values_map_onto_engine_tensors_and_back():
    entries = [{"name": "h", "kind": "tensor", "count": 1}, {"name": "chunks", "kind": "tensors", "count": 2},
               {"name": "n", "kind": "size", "count": 1}]
    h, a, b = torch.randn(2, 3), torch.randn(1), torch.randn(4)
    flat = onnx_segments.flatten_values(entries, [h, [a, b], 5], torch.device("cpu"))
    assert [t.shape for t in flat] == [(2, 3), (1,), (4,), (5,)] and flat[0] is h and flat[1] is a
    values = onnx_segments.regroup_values(entries, [h, a, b, torch.tensor(7)])
    assert values[0] is h and values[1] == [a, b] and values[2] == 7 and isinstance(values[2], int)


def _recorded_text_loop(family, text_lengths: tuple[int, ...]):
    model, inputs = family("unet2dcond")
    with diffc.calibration.record(model) as recording:
        for length in text_lengths:
            latents = inputs["sample"].clone()
            text = torch.randn(2, length, inputs["encoder_hidden_states"].shape[-1])
            with torch.no_grad():
                for t in (900, 500, 100):
                    latents = latents - 0.1 * model(latents, torch.tensor([t, t]), text).sample
    return model, recording.calibration_set


def test_engine_profiles_default_to_the_sizes_calibration_ran_at(family):
    from diffc.api import calibrated_sizes

    model, calibration = _recorded_text_loop(family, (77, 77, 12))
    dg = diffc.ir.capture(model, example_inputs=family("unet2dcond")[1])
    sizes = calibrated_sizes(dg.signature, calibration)
    assert sizes["text_len"] == (12, 77, 77), "the pipeline's own text length, not the example's"
    assert sizes["batch"] == (1, 2, 2) and sizes["height"] == (16, 16, 16)
    inputs = [{"name": "tokens", "dims": ["batch", "text_len", 32]}, {"name": "sample", "dims": ["batch", 4, 16, 16]}]
    settings = BuildSettings.from_options({"calibrated_profiles": sizes, "profiles": {"batch": (1, 1, 4)}})
    ranges = tensorrt.dim_ranges(inputs, {**settings.calibrated_profiles, **settings.profiles},
                                 {"batch": 2, "text_len": 7}, "main0")
    assert ranges["tokens"] == [(1, 1, 4), (12, 77, 77), (32, 32, 32)], "the user's profiles win"
    assert BuildSettings.from_options(json.loads(json.dumps(settings.to_json()))) == settings


def test_optimize_hands_the_calibrated_sizes_to_the_trt_backend(family, monkeypatch):
    model, calibration = _recorded_text_loop(family, (77,))
    handed: dict = {}

    def fake_compile(self, plan, precision, device=None, compile=False, **options):
        handed.update(options)
        raise TargetError("stop here")

    monkeypatch.setattr(TensorRTBackend, "unavailable_reason", classmethod(lambda cls, precision: None))
    monkeypatch.setattr(TensorRTBackend, "compile", fake_compile)
    with pytest.raises(TargetError, match="stop here"):
        diffc.optimize(model, target="trt-fp16", passes=[], calibration=calibration, timing_cache=None,
                       profiles={"batch": (1, 2, 4)})
    assert handed["calibrated_profiles"]["text_len"] == (77, 77, 77)
    # the backend's own compile options pass through optimize; a name neither a pass nor it takes is refused
    assert handed["timing_cache"] is None and handed["profiles"] == {"batch": (1, 2, 4)}
    with pytest.raises(TargetError, match=r"budget timing_cahce was given but no pass .* uses it; .* \(the trt backend's "
                                          r"compile options are profiles, .*timing_cache"):
        diffc.optimize(model, target="trt-fp16", passes=[], calibration=calibration, timing_cahce=None)
