"""The TensorRT ONNX contract: exported families pass at fp16; unsupported ops, bad types and Q/DQ
placements TensorRT cannot fuse are rejected with the node, the problem and the fix."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from diffc.backends.tensorrt.contract import check_tensorrt_contract, tensorrt_contract_violations
from diffc.errors import TargetError
from diffc.ir.onnx_export import export_graph
from diffc.ir.onnx_segments import onnx_io

# exporting re-traces a family (~30-90 s each on a 2-core machine), so these run with -m slow; the default
# run checks the DiT's per-segment export through the TensorRT build pipeline (tests/backends/test_tensorrt.py)
FAMILIES = ("dit", "unet2dcond", "unet2d", "pixart", "sd3", "flux")


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_exported_families_are_within_the_contract_at_fp16(name, captured, tmp_path):
    model = onnx.load(str(export_graph(captured(name), tmp_path / f"{name}.onnx")))
    assert tensorrt_contract_violations(model, "fp16") == []
    check_tensorrt_contract(model, "fp16", segment="main")
    ops = {n.op_type for n in model.graph.node}
    assert {"MatMul", "Softmax"} <= ops or "Conv" in ops  # the check saw the real graph
    io = onnx_io(model)
    assert [v["name"] for v in io["inputs"]] == [i.name for i in model.graph.input]
    # the batch stays a named dim where the exporter keeps it symbolic (it pins PixArt's shapes)
    assert io["inputs"][0]["dims"][0] in ("batch", captured(name).signature.inputs[0].example_shape[0])


def _model(nodes, inputs, outputs, initializers=(), opset=21):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    return model


def _float(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _const(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def _qdq_conv(weight_axis=0, weight_scale=None, zero=0, activation_scale=0.05):
    """x -> Q -> DQ -> Conv(W: int8 weight -> DQ per output channel) -> y, as TensorRT wants it."""
    weight = np.random.default_rng(0).integers(-127, 127, size=(8, 4, 3, 3)).astype(np.int8)
    scales = np.full(weight.shape[weight_axis], 0.01, np.float32) if weight_scale is None else weight_scale
    inits = [_const("w_q", weight), _const("w_scale", scales), _const("w_zero", np.zeros_like(scales, np.int8)),
             _const("a_scale", np.float32(activation_scale)), _const("a_zero", np.int8(zero))]
    nodes = [helper.make_node("QuantizeLinear", ["x", "a_scale", "a_zero"], ["x_q"], name="quant_x"),
             helper.make_node("DequantizeLinear", ["x_q", "a_scale", "a_zero"], ["x_dq"], name="dequant_x"),
             helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w"], name="dequant_w",
                              axis=weight_axis),
             helper.make_node("Conv", ["x_dq", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    return _model(nodes, [_float("x", [1, 4, 8, 8])], [_float("y", [1, 8, 8, 8])], inits)


def test_a_well_placed_int8_qdq_graph_passes_only_at_int8():
    model = _qdq_conv()
    onnx.checker.check_model(model, full_check=True)
    assert tensorrt_contract_violations(model, "int8") == []
    with pytest.raises(TargetError, match=r"(?s)node 'quant_x' \(QuantizeLinear\).*INT8.*trt-int8"):
        check_tensorrt_contract(model, "fp16")


def test_planted_unsupported_op_is_rejected_with_node_and_fix():
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Det", ["r"], ["y"], name="planted_det")]
    model = _model(nodes, [_float("x", [3, 3])], [_float("y", [])])
    onnx.checker.check_model(model, full_check=True)
    with pytest.raises(TargetError) as info:
        check_tensorrt_contract(model, "fp16", segment="main0")
    message = str(info.value)
    assert "segment 'main0'" in message and "node 'planted_det' (Det)" in message
    assert "does not support the operator Det" in message and "Fix:" in message and "relu" not in message


def test_planted_activation_dq_without_quantize_is_rejected():
    """A DequantizeLinear of a run-time int8 tensor with no QuantizeLinear before it (bad placement)."""
    inits = [_const("s", np.float32(0.1)), _const("w", np.ones((4, 4), np.float32))]
    nodes = [helper.make_node("Cast", ["x"], ["x8"], name="cast", to=TensorProto.INT8),
             helper.make_node("DequantizeLinear", ["x8", "s"], ["xd"], name="stray_dq"),
             helper.make_node("MatMul", ["xd", "w"], ["y"], name="mm")]
    model = _model(nodes, [_float("x", [2, 4])], [_float("y", [2, 4])], inits)
    found = [str(v) for v in tensorrt_contract_violations(model, "int8")]
    assert any("node 'stray_dq' (DequantizeLinear): dequantizes cast (Cast)" in f and "Q->DQ pair" in f for f in found)


@pytest.mark.parametrize("mutate, message", [
    ("q_feeds_relu", r"node 'quant_x' \(QuantizeLinear\): its quantized output feeds relu \(Relu\)"),
    ("weight_dq_into_add", r"node 'dequant_w' \(DequantizeLinear\): the dequantized weight feeds input 1 of add"),
    ("wrong_axis", r"per-channel axis 1 of the weight is not the output-channel axis of conv.*axis=0"),
    ("zero_point", r"node 'quant_x' \(QuantizeLinear\): the zero point is not zero"),
    ("negative_scale", r"scale 'w_scale' has zero, negative or non-finite entries"),
    ("dynamic_scale", r"input 1 \(y_scale\) is computed at run time"),
    ("per_channel_activation", r"activation quantized per channel"),
])
def test_bad_qdq_placements_are_rejected(mutate, message):
    model = _qdq_conv(weight_axis=1) if mutate == "wrong_axis" else _qdq_conv(zero=3) if mutate == "zero_point" \
        else _qdq_conv(weight_scale=np.array([0.1] * 7 + [-0.1], np.float32)) if mutate == "negative_scale" \
        else _qdq_conv()
    nodes = model.graph.node
    if mutate == "q_feeds_relu":
        model.graph.node.append(helper.make_node("Relu", ["x_q"], ["r"], name="relu"))
        model.graph.output.append(helper.make_tensor_value_info("r", TensorProto.INT8, [1, 4, 8, 8]))
    elif mutate == "weight_dq_into_add":
        nodes[3].input[1] = "w_other"
        model.graph.initializer.append(_const("w_other", np.ones((8, 4, 3, 3), np.float32)))
        nodes.append(helper.make_node("Add", ["w_other", "w"], ["w_sum"], name="add"))
        model.graph.output.append(_float("w_sum", [8, 4, 3, 3]))
    elif mutate == "dynamic_scale":
        nodes.insert(0, helper.make_node("ReduceMax", ["x"], ["x_max"], name="max", keepdims=0))
        nodes[1].input[1] = "x_max"
    elif mutate == "per_channel_activation":
        model.graph.initializer.append(_const("c_scale", np.full(4, 0.05, np.float32)))
        model.graph.initializer.append(_const("c_zero", np.zeros(4, np.int8)))
        for node in nodes[:2]:
            node.input[1:] = ["c_scale", "c_zero"]
            node.attribute.append(helper.make_attribute("axis", 1))
    with pytest.raises(TargetError, match=message):
        check_tensorrt_contract(model, "int8")


def _int4_matmul(block_size=32, scale_shape=(2, 16), opset=21, consumer="MatMul"):
    weight = np.random.default_rng(1).integers(-8, 8, size=(64, 16)).astype(np.int8)
    w_q = helper.make_tensor("w_q", TensorProto.INT4, weight.shape, weight.flatten().tolist())
    attributes = {"axis": 0, **({"block_size": block_size} if block_size else {})}
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w"], name="dequant_w4", **attributes),
             helper.make_node(consumer, ["x", "w"], ["y"], name="gemm")]
    scale = np.full(scale_shape, 0.02, np.float32)
    return _model(nodes, [_float("x", [2, 64])], [_float("y", [2, 16])], [w_q, _const("w_scale", scale)], opset)


def test_int4_only_as_blocked_weight_dequantization():
    good = _int4_matmul()
    onnx.checker.check_model(good, full_check=True)
    assert tensorrt_contract_violations(good, "int4") == []
    assert tensorrt_contract_violations(good, "mixed") == []
    with pytest.raises(TargetError, match=r"dequant_w4.*INT4, which trt-int8 does not quantize to.*trt-int4"):
        check_tensorrt_contract(good, "int8")
    with pytest.raises(TargetError, match="without block_size"):
        check_tensorrt_contract(_int4_matmul(block_size=0, scale_shape=(16,)), "int4")
    with pytest.raises(TargetError, match=r"block scale shape \[4, 16\] does not match weight \[64, 16\]"):
        check_tensorrt_contract(_int4_matmul(scale_shape=(4, 16)), "int4")


def test_int4_activation_quantization_is_rejected():
    inits = [_const("s", np.float32(0.1)), _const("w", np.ones((4, 4), np.float32))]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s"], ["xq"], name="q4", output_dtype=TensorProto.INT4),
             helper.make_node("DequantizeLinear", ["xq", "s"], ["xd"], name="dq4"),
             helper.make_node("MatMul", ["xd", "w"], ["y"], name="mm")]
    model = _model(nodes, [_float("x", [2, 4])], [_float("y", [2, 4])], inits)
    with pytest.raises(TargetError, match=r"node 'q4' \(QuantizeLinear\): INT4 quantization of an activation"):
        check_tensorrt_contract(model, "int4")


def test_opset_outside_tensorrts_range_and_custom_domains_are_rejected():
    model = _model([helper.make_node("Relu", ["x"], ["y"])], [_float("x", [2])], [_float("y", [2])], opset=8)
    with pytest.raises(TargetError, match="opset 8, TensorRT's parser reads opsets 9 to 24"):
        check_tensorrt_contract(model, "fp16")
    custom = _model([helper.make_node("Fancy", ["x"], ["y"], domain="com.example")], [_float("x", [2])],
                    [_float("y", [2])])
    custom.opset_import.append(helper.make_opsetid("com.example", 1))
    with pytest.raises(TargetError, match=r"custom operator domain 'com.example' \(Fancy\)"):
        check_tensorrt_contract(custom, "fp16")


def test_types_and_restrictions_of_the_operator_table():
    nodes = [helper.make_node("Cast", ["x"], ["xd"], name="to_double", to=TensorProto.DOUBLE),
             helper.make_node("Cast", ["xd"], ["xs"], name="to_string", to=TensorProto.STRING),
             helper.make_node("Resize", ["x", "", "scales"], ["r"], name="cubic", mode="cubic")]
    model = _model(nodes, [_float("x", [1, 1, 2, 2])], [helper.make_tensor_value_info("xs", TensorProto.STRING, None),
                                                         _float("r", None)],
                   [_const("scales", np.array([1, 1, 2, 2], np.float32))])
    found = [str(v) for v in tensorrt_contract_violations(model, "fp16")]
    assert any("node 'to_string' (Cast): output has type STRING" in f for f in found), found
    assert any("node 'cubic' (Resize): mode='cubic' is not supported" in f for f in found), found
    assert not any("to_double" in f for f in found), found  # DOUBLE is cast down by the parser


def test_unknown_precision_is_refused():
    with pytest.raises(TargetError, match="no precision 'int3'"):
        tensorrt_contract_violations(_qdq_conv(), "int3")


def test_int4_blocks_must_divide_the_blocked_dimension():
    model = _int4_matmul(block_size=128, scale_shape=(1, 16))
    with pytest.raises(TargetError, match=r"weight dim 0 \(64\) is not a multiple of block_size 128.*\(e.g. 64\)"):
        check_tensorrt_contract(model, "int4")
