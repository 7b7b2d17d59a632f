"""LoRA on TensorRT targets refits the engines by weight name (diffc.backends.tensorrt.refit). Checked on
the CPU: the ONNX the backend hands TensorRT's parser holds every weight a LoRA can touch under an
initializer name the weight map records, and the values a refit sets there compute the adapted model; the
refit code itself runs against a stand-in for TensorRT's Refitter. The real refit is marked tensorrt."""
from __future__ import annotations

import ctypes
import sys
import types

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import diffc
from diffc.api import compile_graph
from diffc.backends import tensorrt
from diffc.backends.onnx_weights import WeightSlot, replace_initializers, weight_tensors
from diffc.backends.onnxruntime import SegmentSession
from diffc.backends.tensorrt import BuildSettings
from diffc.backends.tensorrt.refit import EngineRefit
from diffc.errors import TargetError
from diffc.ir.partition import build_plan
from diffc.ir.precision import PrecisionSpec, quantizable_weight, quantize_weight
from quantized_graphs import int8_graph
from test_ort_lora import PATCH, TO_Q, _adapter, _merged, _out
from tiny_families import first_tensor

pytest.importorskip("onnxruntime")


def _lora_weights(plan):
    """Every weight a LoRA can touch: those of the linear and convolution layers."""
    return {str(w.target) for segment in plan.segments.values() for n in segment.module.graph.nodes
            if (w := quantizable_weight(n)) is not None}


def _merged_weights(plan, adapter):
    weights = plan.graph.weights()
    out = {}
    for key, down in adapter.items():
        if ".lora_A." in key:
            name = key.removeprefix("transformer.").replace(".lora_A.weight", ".weight")
            up = adapter[key.replace("lora_A", "lora_B")]
            out[name] = weights[name] + (up.flatten(1) @ down.flatten(1)).reshape(weights[name].shape)
    return out


@pytest.fixture(scope="module")
def parsed(tmp_path_factory):
    """The int8 DiT plan and the ONNX model of each segment as TensorRT's builder would receive it."""
    from conftest import _captured, _family

    model, inputs = _family("dit")
    plan = build_plan(int8_graph(_captured, "dit", inputs))
    received = {}

    def build_engine(path, precision, ranges, settings, segment):
        received[segment] = onnx.load(str(path))
        return f"engine of {segment}".encode()

    patch = pytest.MonkeyPatch()
    patch.setattr(tensorrt, "build_engine", build_engine)
    try:
        _, io = tensorrt._build_all(plan, "int8", BuildSettings.from_options({"timing_cache": None}), False)
    finally:
        patch.undo()
    return model, inputs, plan, io, received


def test_every_lora_weight_is_a_named_initializer_of_the_parsed_onnx(parsed):
    model, inputs, plan, io, received = parsed
    record = io["main"]["weights"]
    initializers = {i.name: i for i in received["main"].graph.initializer}
    annotations = plan.graph.annotations
    weights = plan.graph.weights()
    assert _lora_weights(plan) <= set(record["map"])
    kinds = set()
    for name in _lora_weights(plan):
        for slot in map(WeightSlot.from_json, record["map"][name]):
            assert slot.initializer in initializers and (slot.scale is None or slot.scale in initializers)
            stored = torch.from_numpy(numpy_helper.to_array(initializers[slot.initializer]).astype(np.float32))
            stored = stored.t() if slot.transposed else stored
            if slot.node is None:
                kinds.add("float")
                # the unquantized layers of a low-bit engine compute in fp16 (ModelOpt's form)
                assert initializers[slot.initializer].data_type == onnx.TensorProto.FLOAT16
                assert torch.equal(stored, weights[name].detach().half().float())
            else:
                kinds.add("quantized")
                spec = PrecisionSpec.from_json(annotations[slot.node]["precision"])
                assert torch.equal(stored, quantize_weight(weights[name], spec.weight).values)
    assert kinds == {"float", "quantized"}  # protected layers stay float, the others are Q/DQ
    assert record["scales"] and set(record["scales"]) <= set(initializers)


def test_the_values_a_refit_sets_compute_the_adapted_model(parsed, tmp_path):
    """The named weights a refit hands TensorRT, written into the parsed ONNX, give the adapted model:
    ONNX Runtime (Q/DQ fusion off) matches the torch simulation of the same LoRA'd int8 plan."""
    model, inputs, plan, io, received = parsed
    adapter = _adapter(model)  # to_q is a quantized layer, the patch embedding a protected (float) one
    merged = _merged_weights(plan, adapter)
    record = io["main"]["weights"]
    mapping = {w: [WeightSlot.from_json(s) for s in slots] for w, slots in record["map"].items()}
    tensors = weight_tensors(mapping, merged, plan.graph.annotations, record["types"])
    assert {s.initializer for w in (TO_Q + ".weight", PATCH + ".weight") for s in mapping[w]} <= set(tensors)
    refit = onnx.ModelProto()
    refit.CopyFrom(received["main"])
    replace_initializers(refit, tensors)
    onnx.save(refit, str(tmp_path / "main.onnx"))
    session = SegmentSession("main", str(tmp_path / "main.onnx"), torch.device("cpu"), ["CPUExecutionProvider"],
                             fuse_qdq=False)
    simulated = compile_graph(plan.graph.clone(), "torch", "int8")
    simulated.calibration_inputs = [inputs]
    simulated.load_lora(adapter)
    expected = _out(simulated, inputs)
    got = session(*[inputs[name] for name in plan.segments["main"].inputs])[0]
    assert float((got - expected).norm() / expected.norm()) < 3e-3  # fp16 compute around the Q/DQ layers
    assert float((got - _out(model, inputs)).norm() / expected.norm()) > 3e-2  # the adapter shows


class _FakeTensorRT(types.ModuleType):
    """What refit_engine uses of TensorRT, recording the calls."""

    def __init__(self, engine):
        super().__init__("tensorrt")
        fake = self
        self.set, self.refits = {}, 0
        self.DataType = types.SimpleNamespace(**{k: k for k in ("FLOAT", "HALF", "BF16", "INT8", "FP8", "INT4")})

        class Logger:
            WARNING = 2

            def __init__(self, level):
                pass

        class Weights:
            def __init__(self, kind, pointer, count):
                self.kind, self.count = kind, count
                size = {"INT8": 1, "FP8": 1, "HALF": 2, "BF16": 2, "FLOAT": 4}[kind] * count
                self.data = ctypes.string_at(pointer, size)

        class Refitter:
            def __init__(self, engine, logger):
                pass

            def set_named_weights(self, name, weights):
                fake.set[name] = weights
                return name in engine.names

            def get_missing_weights(self):
                return [n for n in engine.fused if n not in fake.set]

            def refit_cuda_engine(self):
                fake.refits += 1
                return not self.get_missing_weights()

        self.Logger, self.Weights, self.Refitter = Logger, Weights, Refitter


class _FakeRunner:
    def __init__(self, names, fused):
        self.engine = types.SimpleNamespace(refittable=True, names=set(names), fused=list(fused),
                                            serialize=lambda: b"refitted engine")
        self.refits = 0

    def refitted(self):
        self.refits += 1


def test_refit_sets_named_weights_supplies_fused_ones_and_saves_the_engine(parsed, monkeypatch):
    model, inputs, plan, io, received = parsed
    record = io["main"]["weights"]
    names = [i.name for i in received["main"].graph.initializer]
    q_slot, patch_slot = (WeightSlot.from_json(record["map"][w][0]) for w in (TO_Q + ".weight", PATCH + ".weight"))
    runner = _FakeRunner(names, fused=[patch_slot.initializer])  # TensorRT asks for the patch weights too
    fake = _FakeTensorRT(runner.engine)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    files = {"engines/main.plan": b"engine of main"}
    swap = EngineRefit(plan, {"main": runner}, files, {"main": "engines/main.plan"}, io)
    merged = _merged_weights(plan, _adapter(model))
    swap.refit({TO_Q + ".weight": merged[TO_Q + ".weight"]})
    assert set(fake.set) == {q_slot.initializer, q_slot.scale, patch_slot.initializer} and fake.refits == 1
    spec = PrecisionSpec.from_json(plan.graph.annotations[q_slot.node]["precision"])
    values = quantize_weight(merged[TO_Q + ".weight"], spec.weight).values
    sent = np.frombuffer(fake.set[q_slot.initializer].data, np.int8).reshape(values.t().shape if q_slot.transposed
                                                                           else values.shape)
    assert fake.set[q_slot.initializer].kind == "INT8" and fake.set[q_slot.scale].kind == "HALF"
    assert torch.equal(torch.from_numpy(sent.astype(np.float32)), values.t() if q_slot.transposed else values)
    supplied = np.frombuffer(fake.set[patch_slot.initializer].data, np.float16)
    assert np.array_equal(supplied, plan.graph.weights()[PATCH + ".weight"].detach().half().numpy().ravel())
    assert files["engines/main.plan"] == b"refitted engine" and runner.refits == 1

    fake.set.clear()
    runner.engine.fused.clear()
    node = q_slot.node
    swap.rescale({node: plan.graph.annotations[node]["precision"]})
    assert set(fake.set) == {f"{node}_input_scale"} and fake.set[f"{node}_input_scale"].kind == "HALF"
    runner.engine.refittable = False
    with pytest.raises(TargetError, match="built without refit=True"):
        swap.refit({TO_Q + ".weight": merged[TO_Q + ".weight"]})


@pytest.mark.tensorrt
def test_lora_refits_trt_engines_without_a_rebuild(family, tmp_path, monkeypatch):
    model, inputs = family("dit")
    fast = diffc.optimize(model.cuda(), target="trt-fp16", passes=[], timing_cache=None)
    on_gpu = {k: v.cuda() for k, v in inputs.items()}
    with torch.no_grad():
        base = first_tensor(fast(**on_gpu)).float()
    monkeypatch.setattr(tensorrt, "build_engine", lambda *a, **k: pytest.fail("a LoRA swap rebuilt an engine"))
    adapter = _adapter(model.cpu(), size=0.3)
    fast.load_lora({k: v.cuda() for k, v in adapter.items()})
    expected = _out(_merged(model.cpu(), adapter), inputs)
    with torch.no_grad():
        got = first_tensor(fast(**on_gpu)).float().cpu()
    assert (got - expected).abs().max() <= 2e-2 * expected.abs().max()
    fast.save(tmp_path / "merged")
    with torch.no_grad():
        assert torch.equal(first_tensor(diffc.load(tmp_path / "merged")(**on_gpu)).float().cpu(), got)
    fast.unload_lora()
    with torch.no_grad():
        assert (first_tensor(fast(**on_gpu)).float() - base).abs().max() <= 1e-3 * base.abs().max()
