"""Deployment folders: they load back with diffc.load and give the same outputs, a tampered file is
refused, the served ONNX model computes what the model does, and the Triton configs are well-formed for
plans with several segments (ONNX models, and TensorRT engines as a TensorRT backend records them)."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

import diffc
from diffc import cli
from diffc.backends import valid_targets
from diffc.errors import ArtifactError
from diffc.runtime import save_artifact
from diffc.runtime.export import TRITON_TYPES, export_deployment, triton_config
from tiny_families import first_tensor

ort = pytest.importorskip("onnxruntime")
# the ONNX Runtime target where this diffc has it (its folder serves its own ONNX models), else torch
TARGET = "ort" if "ort-fp32" in valid_targets() else "torch"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A DiT compiled for TARGET and exported once (ONNX export re-traces the model: ~20-50 s here)."""
    from tiny_families import families

    model, inputs = families()["dit"]
    fast = diffc.optimize(model, target=TARGET, passes=[])
    out = export_deployment(fast, tmp_path_factory.mktemp("export") / "dit")
    return fast, inputs, out


def _parse_config(text: str) -> dict:
    """The fields of a config.pbtxt as this module writes them: name, platform, and the input/output
    tensors with their name, data type, dims and reshape."""
    config = {"name": re.search(r'^name: "(.*)"$', text, re.M).group(1),
              "platform": re.search(r'^platform: "(.*)"$', text, re.M).group(1),
              "max_batch_size": int(re.search(r"^max_batch_size: (\d+)$", text, re.M).group(1))}
    for kind in ("input", "output"):
        block = re.search(rf"^{kind} \[\n(.*?)\n\]$", text, re.M | re.S).group(1)
        config[kind] = [{"name": m.group(1), "data_type": m.group(2),
                         "dims": [int(d) for d in m.group(3).split(",")], "reshape": bool(m.group(4))}
                        for m in re.finditer(r'  \{\n    name: "(.*?)"\n    data_type: (\w+)\n    dims: \[ (.*?) \]\n'
                                             r"(    reshape: \{ shape: \[ \] \}\n)?  \}", block)]
    assert text.count("{") == text.count("}") and text.count("[") == text.count("]")
    return config


def test_exported_folder_loads_back_with_the_same_outputs(exported):
    fast, inputs, out = exported
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"manifest.json", "README.md", "schedule.json", "triton/main/config.pbtxt", "triton/main/1/model.onnx"} \
        <= names
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["files"]) == names - {"manifest.json"}  # every file is hashed
    deployment = manifest["target"]["deployment"]
    assert deployment["format"] == "diffc-deployment-1" and "README.md" in deployment["files"]
    assert {"diffc", "torch", "onnx"} <= set(deployment["versions"])
    back = diffc.load(out)
    assert back.target == fast.target
    with torch.no_grad():
        assert torch.equal(first_tensor(back(**inputs)), first_tensor(fast(**inputs)))


def test_the_served_onnx_model_computes_the_model(exported):
    fast, inputs, out = exported
    config = _parse_config((out / "triton/main/config.pbtxt").read_text())
    assert config["name"] == "main" and config["platform"] == "onnxruntime_onnx" and config["max_batch_size"] == 0
    session = ort.InferenceSession(str(out / "triton/main/1/model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == [i["name"] for i in config["input"]]
    assert [o.name for o in session.get_outputs()] == [o["name"] for o in config["output"]]
    for tensor, spec in zip(session.get_inputs(), config["input"]):
        assert spec["dims"] == [d if isinstance(d, int) else -1 for d in tensor.shape]
        assert spec["data_type"] == {"tensor(float)": "TYPE_FP32", "tensor(int64)": "TYPE_INT64"}[tensor.type]
    feeds = {i.name: np.asarray(inputs[i.name]).astype(np.float32 if "float" in i.type else np.int64)
             for i in session.get_inputs()}
    got = session.run(None, feeds)[0]
    with torch.no_grad():
        want = first_tensor(fast(**inputs)).numpy()
    assert np.abs(got - want).max() <= 1e-4


def test_readme_and_schedule_say_how_to_serve(exported):
    _, _, out = exported
    readme = (out / "README.md").read_text()
    assert "tritonserver --model-repository" in readme and "diffc.load" in readme
    assert "driven by the client" in readme and "| `main` |" in readme
    schedule = json.loads((out / "schedule.json").read_text())
    assert schedule["variants"] == {"full": ["main"]} and schedule["schedule"]["default"] == "full"
    assert schedule["segments"]["main"]["triton_model"] == "main"
    values = schedule["segments"]["main"]["values"]
    assert [(v["name"], v["kind"]) for v in values["inputs"]] == [
        ("hidden_states", "tensor"), ("timestep", "tensor"), ("class_labels", "tensor")]
    assert [s["name"] for s in schedule["model_inputs"]] == ["hidden_states", "timestep", "class_labels"]


@pytest.mark.parametrize("tampered", ["triton/main/1/model.onnx", "triton/main/config.pbtxt", "README.md"])
def test_a_tampered_file_is_refused(exported, tmp_path, tampered):
    import shutil

    _, _, out = exported
    copy = shutil.copytree(out, tmp_path / "copy")
    target = copy / tampered
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=f"artifact file {re.escape(tampered)} does not match its SHA-256"):
        diffc.load(copy)


def test_export_from_an_artifact_and_again_from_the_export(exported, tmp_path, capsys):
    fast, inputs, out = exported
    assert cli.main(["export", str(out), "--out", str(tmp_path / "again")]) == 0
    assert "wrote" in capsys.readouterr().out
    again = tmp_path / "again"
    names = sorted(p.relative_to(again).as_posix() for p in again.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert (again / "triton/main/config.pbtxt").read_text() == (out / "triton/main/config.pbtxt").read_text()
    with torch.no_grad():
        assert torch.equal(first_tensor(diffc.load(again)(**inputs)), first_tensor(fast(**inputs)))
    assert cli.main(["export", str(out), "--out", str(again)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli.main(["export", str(out), "--target", "torch-fp16", "--out", str(tmp_path / "x")]) == 2
    assert "is an artifact" in capsys.readouterr().err


def test_triton_config_dims_types_and_scalars():
    text = triton_config("main0", "onnxruntime_onnx",
                         [{"name": "sample", "dtype": "FLOAT", "dims": ["batch", 4, "height", "width"]},
                          {"name": "timestep", "dtype": "INT64", "dims": ["batch"]}],
                         [{"name": "features", "dtype": "FLOAT16", "dims": ["batch", 64, "(height//2)", 8]},
                          {"name": "size", "dtype": "INT64", "dims": []}])
    config = _parse_config(text)
    assert config["input"] == [
        {"name": "sample", "data_type": "TYPE_FP32", "dims": [-1, 4, -1, -1], "reshape": False},
        {"name": "timestep", "data_type": "TYPE_INT64", "dims": [-1], "reshape": False}]
    assert config["output"] == [
        {"name": "features", "data_type": "TYPE_FP16", "dims": [-1, 64, -1, 8], "reshape": False},
        {"name": "size", "data_type": "TYPE_INT64", "dims": [1], "reshape": True}]
    with pytest.raises(ArtifactError, match="'s' has type STRING, which Triton does not serve"):
        triton_config("m", "onnxruntime_onnx", [{"name": "s", "dtype": "STRING", "dims": [1]}], [])


def _value_specs(plan, inputs):
    """spec(value) -> name, ONNX type and dims of a value the plan's segments exchange, from running every
    segment once (dims equal to the example batch named "batch"), as a backend records its engines' I/O."""
    env = {spec.name: inputs[spec.name] for spec in plan.graph.signature.inputs}
    pending = list(plan.segments.values())
    with torch.no_grad():
        while pending:
            segment = next(s for s in pending if all(i in env for i in s.inputs))
            env.update(zip(segment.outputs, segment.module(*[env[i] for i in segment.inputs])))
            pending.remove(segment)
    types = {torch.float32: "FLOAT", torch.int64: "INT64", torch.float16: "FLOAT16"}

    def specs(names):
        """The engine tensors of these values: one per tensor, one per item of a list, an int64 scalar
        for a size (as the exporter lays them out)."""
        found = []
        for name in names:
            value = env[name]
            items = [(f"{name}[{i}]", v) for i, v in enumerate(value)] if isinstance(value, (list, tuple)) \
                else [(name, value)]
            for item, tensor in items:
                if isinstance(tensor, int):
                    found.append({"name": item.replace(".", "_"), "dtype": "INT64", "dims": []})
                    continue
                dims = ["batch" if i == 0 and d == 2 else d for i, d in enumerate(tensor.shape)]
                found.append({"name": item.replace(".", "_"), "dtype": types[tensor.dtype], "dims": dims})
        return found
    return specs


def test_triton_repository_for_a_cached_plan_of_engines(family, tmp_path):
    """A plan with several segments and cross-step state, saved as the TensorRT backend saves it (an
    engine file and the recorded inputs/outputs per segment): one tensorrt_plan model per segment."""
    model, inputs = family("dit")
    fast = diffc.optimize(model, passes=[{"pass": "cache", "schedule": "uniform", "interval": 2}])
    plan = fast.plan
    assert len(plan.segments) > 1 and plan.state
    specs = _value_specs(plan, inputs)
    built_for = {"gpu": "NVIDIA L40S", "compute_capability": "8.9", "tensorrt": "10.13.0.35"}
    segments = {name: {"file": f"engines/{name}.plan", "inputs": specs(s.inputs), "outputs": specs(s.outputs)}
                for name, s in plan.segments.items()}
    engines = {f"engines/{name}.plan": f"engine of {name}".encode() for name in plan.segments}
    target = {"backend": "trt", "precision": "fp16", "device": "cuda",
              "info": {"built_for": built_for, "segments": segments}}
    save_artifact(tmp_path / "trt", plan, target, engines)
    out = export_deployment(tmp_path / "trt", tmp_path / "deploy")
    schedule = json.loads((out / "schedule.json").read_text())
    assert schedule["state"] == list(plan.state) and len(set(schedule["schedule"]["steps"])) == 2
    assert all(segment["values"] is None for segment in schedule["segments"].values())  # none recorded here
    for name, segment in plan.segments.items():
        assert (out / f"triton/{name}/1/model.plan").read_bytes() == f"engine of {name}".encode()
        config = _parse_config((out / f"triton/{name}/config.pbtxt").read_text())
        assert config["name"] == name and config["platform"] == "tensorrt_plan"
        assert [t["name"] for t in config["input"]] == [t["name"] for t in specs(segment.inputs)]
        assert [t["name"] for t in config["output"]] == [t["name"] for t in specs(segment.outputs)]
        for tensor, recorded in zip(config["input"] + config["output"], specs(segment.inputs) + specs(segment.outputs)):
            assert tensor["data_type"] == TRITON_TYPES[recorded["dtype"]]
            assert tensor["dims"] == ([-1 if isinstance(d, str) else d for d in recorded["dims"]] or [1])
            assert tensor["reshape"] == (recorded["dims"] == [])
        assert any(t["dims"][0] == -1 for t in config["input"])
        assert schedule["segments"][name]["inputs"] == list(segment.inputs)
    readme = (out / "README.md").read_text()
    assert "built for **NVIDIA L40S** (compute capability 8.9) with **TensorRT 10.13.0.35**" in readme
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"]["info"]["built_for"] == built_for
    assert all(f"engines/{name}.plan" in manifest["files"] for name in plan.segments)


@pytest.mark.slow
def test_cached_plan_exports_one_onnx_model_per_segment(family, tmp_path):
    """The ONNX path for a plan with several segments (exporting each segment takes minutes here, so it
    runs with -m slow; the default run checks several segments through recorded engines above): every
    segment is served, the configs agree with the exported models, and the folder loads back."""
    import onnx

    model, inputs = family("dit")
    fast = diffc.optimize(model, target=TARGET, passes=[{"pass": "cache", "schedule": "uniform", "interval": 2}])
    out = export_deployment(fast, tmp_path / "cached")
    for name in fast.plan.segments:
        config = _parse_config((out / f"triton/{name}/config.pbtxt").read_text())
        proto = onnx.load(str(out / f"triton/{name}/1/model.onnx"))
        assert config["platform"] == "onnxruntime_onnx"
        assert [t["name"] for t in config["input"]] == [i.name for i in proto.graph.input]
        for tensor, value in zip(config["input"] + config["output"], [*proto.graph.input, *proto.graph.output]):
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]
            assert tensor["dims"] == (dims or [1])
    back = diffc.load(out)
    with torch.no_grad():
        for t in (900, 600, 300):
            step = {**inputs, "timestep": torch.tensor([t, t])}
            assert torch.equal(first_tensor(back(**step)), first_tensor(fast(**step)))


def test_low_bit_models_without_compiled_segment_files_are_refused(exported, tmp_path):
    """A plain ONNX export of an int8 plan would serve it unquantized: refused, with what to export instead."""
    fast, _, _ = exported
    save_artifact(tmp_path / "int8", fast.plan, {"backend": "torch", "precision": "int8", "device": "cpu", "info": {}})
    with pytest.raises(ArtifactError, match="would serve them unquantized; export an ort-int8 or trt-int8 model"):
        export_deployment(tmp_path / "int8", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_file_saved_without_its_weights_by_a_backend_that_is_not_loaded_is_refused():
    from diffc.ir.served_files import served_file

    assert served_file("elsewhere", False, b"whole", None, "main") == b"whole"
    with pytest.raises(ArtifactError, match="without its weights.*import diffc"):
        served_file("elsewhere", True, b"compact", None, "main")
