"""Low-bit TensorRT engines compute their unquantized layers in half precision, as ModelOpt builds
them: the Q/DQ model is converted to fp16 (bf16 for a bf16 model) with fp32 inputs and outputs, and
still computes what the torch simulation of the annotations computes, up to half-precision rounding."""
import types

import numpy as np
import pytest
import torch

from diffc.backends import tensorrt
from diffc.backends.onnx_half import half_precision_model
from diffc.backends.onnx_qdq import quantize_segment_onnx
from diffc.backends.tensorrt import BuildSettings
from diffc.errors import TargetError
from diffc.ir.simulation import simulate
from quantized_graphs import small_layers_onnx
from test_onnx_qdq import _relative, _run_onnx, _spec

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
TensorProto = onnx.TensorProto
# relative MSE against the fp32 simulation: half-precision rounding of every value, and the odd
# activation that rounding moves across a quantization step (measured: <= 2e-4 fp16, 3e-4 bf16)
HALF_ROUNDING = 2e-3
FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return small_layers_onnx(tmp_path_factory.mktemp("onnx"))


def _annotations(module, name):
    return {n.name: {"precision": _spec(n, name, 0.05 if name != "fp8" else 0.01).to_json()}
            for n in module.graph.nodes if n.op == "call_function"}


def _float_types(model):
    return {i.data_type for i in model.graph.initializer if i.data_type in FLOAT_TYPES}


@pytest.mark.parametrize("name", ["int8", "fp8", "int4", "w4a8"])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_qdq_models_compute_the_simulation(small, name, dtype):
    module, flat, model = small
    annotations = _annotations(module, name)
    qdq = quantize_segment_onnx(model, module, annotations, name)
    before = qdq.SerializeToString()
    half = half_precision_model(qdq, dtype)
    assert qdq.SerializeToString() == before  # the caller's model is left as it was
    onnx.checker.check_model(half, full_check=True)  # strict type inference: every op takes its types
    kind = TensorProto.FLOAT16 if dtype == "fp16" else TensorProto.BFLOAT16
    assert _float_types(half) == {kind}  # weights' scales and the float weights
    assert all(v.type.tensor_type.elem_type == TensorProto.FLOAT for v in (*half.graph.input, *half.graph.output))
    quantize = [n for n in half.graph.node if n.op_type == "QuantizeLinear"]
    scales = {i.name: i.data_type for i in half.graph.initializer}
    assert all(scales[n.input[1]] == kind for n in quantize)  # activations quantized from half precision
    with torch.no_grad():
        references = simulate(module, annotations)(*flat)
    if dtype == "fp16":
        outputs = _run_onnx(half, flat)
    else:  # ONNX Runtime's CPU kernels lack bfloat16; ONNX's reference evaluator has it
        from onnx.reference import ReferenceEvaluator

        feeds = {i.name: t.numpy() for i, t in zip(half.graph.input, flat)}
        outputs = [torch.from_numpy(np.asarray(o, dtype=np.float32)) for o in ReferenceEvaluator(half).run(None, feeds)]
    for out, reference in zip(outputs, references):
        assert out.dtype == torch.float32 and _relative(out, reference) <= HALF_ROUNDING


def _scaled_by(constant, cast_to=None):
    """y = x * constant (optionally rounded through a Cast pair first), an fp32 ONNX model."""
    from onnx import helper

    nodes = [helper.make_node("Constant", [], ["c"], value=helper.make_tensor("c", TensorProto.FLOAT, [], [constant]))]
    source = "x"
    if cast_to is not None:
        nodes += [helper.make_node("Cast", ["x"], ["rounded"], to=cast_to),
                  helper.make_node("Cast", ["rounded"], ["back"], to=TensorProto.FLOAT)]
        source = "back"
    nodes.append(helper.make_node("Mul", [source, "c"], ["y"]))
    graph = helper.make_graph(nodes, "scaled", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def test_bfloat16_values_come_from_the_fp32_originals_not_from_float16():
    """float16 tops out at 65504; a bf16 model keeps a large constant (bf16 has fp32's range), and a
    Cast to float16 the model had (an fp16-rounded layer) stays one."""
    from onnx.reference import ReferenceEvaluator

    half = half_precision_model(_scaled_by(1.0e6), "bf16")
    onnx.checker.check_model(half, full_check=True)
    out = ReferenceEvaluator(half).run(None, {"x": np.array([1.0, 2.0], dtype=np.float32)})[0]
    assert out == pytest.approx([1.0e6, 2.0e6], rel=4e-3)
    clamped = half_precision_model(_scaled_by(1.0e6), "fp16")  # what a float16 value would have been
    constant = next(n for n in clamped.graph.node if n.op_type == "Constant").attribute[0].t
    assert float(onnx.numpy_helper.to_array(constant)) == 65504.0
    rounded = half_precision_model(_scaled_by(1.0, cast_to=TensorProto.FLOAT16), "bf16")
    onnx.checker.check_model(rounded, full_check=True)
    casts = [a.i for n in rounded.graph.node if n.op_type == "Cast" for a in n.attribute if a.name == "to"]
    assert TensorProto.FLOAT16 in casts and TensorProto.BFLOAT16 in casts


def test_unknown_half_precision_is_refused(small):
    with pytest.raises(TargetError, match="fp16 or bf16, not 'fp8'"):
        half_precision_model(small[2], "fp8")
    with pytest.raises(TargetError, match="high_precision_dtype must be one of fp16, bf16, fp32"):
        BuildSettings.from_options({"high_precision_dtype": "half"})


@pytest.mark.parametrize("source, option, expected", [
    ("float32", None, TensorProto.FLOAT16), ("float16", None, TensorProto.FLOAT16),
    ("bfloat16", None, TensorProto.BFLOAT16), ("bfloat16", "fp16", TensorProto.FLOAT16),
    ("float32", "fp32", TensorProto.FLOAT)])
def test_trt_low_bit_models_compute_in_the_models_half_precision(small, source, option, expected):
    module, _, model = small
    plan = types.SimpleNamespace(segments={"main": types.SimpleNamespace(module=module)},
                                 graph=types.SimpleNamespace(annotations=_annotations(module, "int8"),
                                                             signature=types.SimpleNamespace(source_dtype=source)))
    lowered = tensorrt._lower_precision(model, plan, "main", "int8", option)
    assert _float_types(lowered) == {expected}
    assert tensorrt._lower_precision(model, plan, "main", "fp16", option) is model  # float targets: builder flags
