"""Precision annotations lowered into an exported ONNX model as QuantizeLinear /
DequantizeLinear pairs (opset >= 21), the form ONNX Runtime and TensorRT consume:

- a quantized activation: QuantizeLinear -> DequantizeLinear in front of the layer, with the
  spec's per-tensor scale (int8, or float8e4m3fn), or per-axis scales (each channel group's
  scale repeated over its channels) for a split concatenation; a dynamic one computes its scale
  per token or per sample from the input (ReduceMax of Abs) and rounds onto the int8 grid in
  float (Div, Round, Clip, Mul), since QuantizeLinear takes one scale per tensor or per axis;
- for ONNX Runtime on a CPU, a linear with per-token dynamic input and int8 weight: an integer
  matmul instead (its MatMulIntegerToFloat on the rounded input and the int8 weight, then each
  token's scale), which computes the same values as the float form, faster; also a linear with a
  static int8 input scale (QuantizeLinear onto uint8, then MatMulIntegerToFloat with the scales
  and the bias, a 3-d linear's bias Add folded in): ONNX Runtime's own Q/DQ fusion leaves a Gemm
  dequantized in float (a 512 x 512 x 512 layer: 1.27x the fp32 time; integer, 0.27x) and a
  MatMul on int8 x int8 kernels with its bias a separate pass (motion-wan and textures-pixart:
  21.0 and 23.2 ms per call that way, 18.9 and 20.2 this way);
- a quantized weight: its initializer replaced by the quantized values and a DequantizeLinear
  with per-channel scales (int8, float8e4m3fn) or, for int4, blocked scales (`block_size`);
- bf16 / fp16 layers: the weight and activation rounded through a Cast pair;
- int8 weight-only layers: the weight dequantized once into a float initializer (the values the
  layer computes with; the artifact stores them as int8);
- an attention node: Q/DQ on its query, key and value where they enter the exported attention
  (see `GraphEditor.attention_patterns`), matched to the graph module's attention nodes in
  order; the softmax probabilities stay in float.

Values and scales come from diffc.ir.precision, so the model computes what the torch
backend's CPU simulation computes. The exporter re-traces a module and names its nodes afresh,
so layers are matched by their weights instead: a linear becomes Gemm, or MatMul with a
transposed constant weight (then Add for the bias), a convolution becomes Conv, and each
annotated FX node takes the first unclaimed such ONNX node (in graph order) whose constant
weight holds its weight or its transpose."""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
import torch.fx

from ..errors import TargetError
from ..ir.fxutil import attr_value
from ..ir.precision import (BF16, BLOCKED, FP16, INT8, PER_CHANNEL, PER_TOKEN, ActivationQuant, PrecisionSpec,
                            is_attention, precision_specs, quantizable_weight)
from .onnx_qdq_tensors import raw_tensor, weight_initializers, weight_slot
from .onnx_weights import WeightSlot, update_weight_map

MIN_OPSET = 21
CONTRIB_DOMAIN = "com.microsoft"  # ONNX Runtime's own operators
_LAYER_OPS = ("Conv", "Gemm", "MatMul")


def quantize_segment_onnx(model: Any, module: torch.fx.GraphModule, annotations: Mapping[str, Mapping[str, Any]],
                          precision: str, integer_kernels: bool = False) -> Any:
    """A copy of `model` (the ONNX export of `module`) with every annotated layer of `module`
    in Q/DQ form; with `integer_kernels` (ONNX Runtime on a CPU), an int8 linear with per-channel
    weights and a per-tensor or per-token input scale is ONNX Runtime's MatMulIntegerToFloat
    instead, a CPU kernel: TensorRT and ONNX Runtime's CUDA provider take the Q/DQ pairs. Raises
    TargetError when the model's opset is below 21 or an annotated layer cannot be found in it."""
    import onnx

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        raise TargetError(f"Q/DQ lowering needs ONNX opset >= {MIN_OPSET} (blocked and fp8 DequantizeLinear), the "
                          f"model has {opset}; export it with opset={MIN_OPSET}")
    specs = precision_specs(annotations)
    lowered = onnx.ModelProto()
    lowered.CopyFrom(model)
    editor = GraphEditor(lowered.graph)
    attentions = [n.name for n in module.graph.nodes if is_attention(n)]
    annotated_attention = [n for n in attentions if n in specs and specs[n].operands]
    if annotated_attention:
        patterns = editor.attention_patterns()
        if len(patterns) != len(attentions):
            raise TargetError(f"the ONNX model holds {len(patterns)} attention patterns (MatMul -> Softmax -> MatMul) "
                              f"and the graph module {len(attentions)} attention nodes, so the annotated ones "
                              f"({annotated_attention[:3]}) cannot be matched; export the model with opset 21 from "
                              "this graph module, or leave attention unquantized (quant attention=False)")
        for name, edges in zip(attentions, patterns):
            if name in annotated_attention:
                spec = specs[name]
                for (consumer, index), activation, role in zip(edges, (spec.activation, *spec.operands),
                                                               ("query", "key", "value")):
                    editor.quantize_input(consumer, activation, f"{name}_{role}", index)
    quantized: dict[str, list[WeightSlot]] = {}
    for node in module.graph.nodes:
        spec = specs.get(node.name)
        if spec is None or spec.operands:
            continue
        weight_node = quantizable_weight(node)
        if weight_node is None:
            raise TargetError(f"node {node.name} carries a precision annotation but is not a linear or 2-d convolution")
        weight = attr_value(module, weight_node.target).detach().float()
        layer, flip = editor.claim_layer(node.name, weight)
        integer = integer_kernels and _runs_integer_matmul(spec)
        slot = editor.integer_linear(layer, weight, spec, node.name) if integer else None
        if slot is None:
            if spec.activation is not None:
                editor.quantize_input(layer, spec.activation, node.name)
            if spec.weight is not None:
                slot = editor.quantize_weight(layer, weight, flip, spec, node.name)
        if slot is not None:
            quantized.setdefault(str(weight_node.target), []).append(slot)
    editor.drop_unused_initializers()
    if any(n.domain == CONTRIB_DOMAIN for n in lowered.graph.node) and \
            not any(o.domain == CONTRIB_DOMAIN for o in lowered.opset_import):
        lowered.opset_import.append(onnx.helper.make_opsetid(CONTRIB_DOMAIN, 1))
    update_weight_map(lowered, quantized)
    lowered.ir_version = max(lowered.ir_version, 10)  # int4 and blocked DequantizeLinear
    return lowered


class GraphEditor:
    def __init__(self, graph: Any) -> None:
        self.graph = graph
        self.initializers = {i.name: i for i in graph.initializer}
        self.claimed: set[str] = set()

    def producer(self, value: str) -> Any:
        return next((n for n in self.graph.node if value in n.output), None)

    def constant_weight(self, layer: Any) -> tuple[str, Any] | None:
        """The initializer holding a layer's weight and the Transpose between them (or None)."""
        if len(layer.input) < 2:
            return None
        value = layer.input[1]
        if value in self.initializers:
            return value, None
        producer = self.producer(value)
        if producer is not None and producer.op_type == "Transpose" and producer.input[0] in self.initializers:
            return producer.input[0], producer
        return None

    def claim_layer(self, fx_name: str, weight: torch.Tensor) -> tuple[Any, bool]:
        """The first unclaimed Conv / Gemm / MatMul whose constant weight is `weight` (flip:
        stored transposed)."""
        from onnx import numpy_helper

        for layer in self.graph.node:
            if layer.op_type not in _LAYER_OPS or layer.output[0] in self.claimed:
                continue
            constant = self.constant_weight(layer)
            if constant is None:
                continue
            tensor = self.initializers[constant[0]]
            dims = tuple(tensor.dims)
            shapes = [(False, tuple(weight.shape))] + ([(True, tuple(weight.t().shape))] if weight.dim() == 2 else [])
            orientations = [flip for flip, shape in shapes if dims == shape]
            if not orientations:
                continue
            stored = torch.from_numpy(numpy_helper.to_array(tensor).astype(np.float32))
            for flip in orientations:
                if torch.allclose(stored, weight.t() if flip else weight, atol=1e-6, rtol=1e-5):
                    self.claimed.add(layer.output[0])  # SSA: a node's output names it
                    return layer, flip
        raise TargetError(f"no Conv, Gemm or MatMul in the ONNX model holds the weight of node {fx_name}; the model "
                          "is not an export of this graph module (or the exporter changed the weight)")

    def insert_before(self, layer: Any, nodes: list[Any]) -> None:
        index = list(self.graph.node).index(layer)
        for offset, node in enumerate(nodes):
            self.graph.node.insert(index + offset, node)

    def attention_patterns(self) -> list[list[tuple[Any, int]]]:
        """Per exported attention (graph order): where its query, key and value enter it, as
        (consumer node, input index). The exporter writes aten SDPA as
        MatMul(Mul(q, c), Mul(k^T, c)) [-> Add(mask)] -> Softmax -> MatMul(., v); the query and key
        are quantized in front of the constant scaling Muls, which commutes exactly with the
        transposes and reshapes in between (per-tensor quantization is elementwise)."""
        patterns = []
        for softmax in self.graph.node:
            if softmax.op_type != "Softmax":
                continue
            scores = self.producer(softmax.input[0])
            if scores is not None and scores.op_type == "Add":
                scores = next((p for p in map(self.producer, scores.input) if p is not None and p.op_type == "MatMul"),
                              None)
            weighted = next((n for n in self.graph.node if n.op_type == "MatMul" and n.input[0] == softmax.output[0]),
                            None)
            if scores is None or scores.op_type != "MatMul" or weighted is None:
                continue
            edges = []
            for index in (0, 1):
                scaling = self.producer(scores.input[index])
                constant = [i for i, v in enumerate(scaling.input) if self._is_constant(v)] \
                    if scaling is not None and scaling.op_type == "Mul" else []
                edges.append((scaling, 1 - constant[0]) if len(constant) == 1 else (scores, index))
            patterns.append(edges + [(weighted, 1)])
        return patterns

    def _is_constant(self, value: str) -> bool:
        producer = self.producer(value)
        return value in self.initializers or (producer is not None and producer.op_type == "Constant")

    def quantize_input(self, layer: Any, activation: ActivationQuant, name: str, index: int = 0) -> None:
        """Q/DQ (or a rounding Cast pair) on input `index` of node `layer`."""
        from onnx import TensorProto, helper

        source = layer.input[index]
        if activation.dynamic is not None:
            nodes = [*self.dynamic_rounding_nodes(source, activation, name),
                     helper.make_node("Mul", [f"{name}_input_q", f"{name}_input_scale"], [f"{name}_input_dq"],
                                      name=f"{name}_input_dq")]
        elif activation.dtype in (BF16, FP16):
            target = TensorProto.BFLOAT16 if activation.dtype == BF16 else TensorProto.FLOAT16
            nodes = [helper.make_node("Cast", [source], [f"{name}_input_rounded"], to=target, name=f"{name}_input_cast"),
                     helper.make_node("Cast", [f"{name}_input_rounded"], [f"{name}_input_dq"], to=TensorProto.FLOAT,
                                      name=f"{name}_input_uncast")]
        else:
            zero_type = TensorProto.INT8 if activation.dtype == INT8 else TensorProto.FLOAT8E4M3FN
            if activation.group_sizes:  # one scale per channel along the axis: per-axis Q/DQ
                scales = activation.scale_vector()
                self.add(raw_tensor(f"{name}_input_scale", scales, TensorProto.FLOAT))
                self.add(raw_tensor(f"{name}_input_zero", torch.zeros(scales.shape), zero_type))
                per_axis = {"axis": activation.axis}
            else:
                self.add(helper.make_tensor(f"{name}_input_scale", TensorProto.FLOAT, [], [activation.scale]))
                self.add(helper.make_tensor(f"{name}_input_zero", zero_type, [], [0]))
                per_axis = {}
            inputs = [f"{name}_input_scale", f"{name}_input_zero"]
            nodes = [helper.make_node("QuantizeLinear", [source, *inputs], [f"{name}_input_q"], name=f"{name}_input_q",
                                      **per_axis),
                     helper.make_node("DequantizeLinear", [f"{name}_input_q", *inputs], [f"{name}_input_dq"],
                                      name=f"{name}_input_dq", **per_axis)]
        self.insert_before(layer, nodes)
        layer.input[index] = f"{name}_input_dq"

    def dynamic_rounding_nodes(self, source: str, activation: ActivationQuant, name: str) -> list[Any]:
        """`source` divided by its scale per token (last axis) or per sample (every axis but the
        first) and rounded onto the int8 grid, in float, as diffc.ir.precision.fake_quantize_dynamic
        computes it: the values are `<name>_input_q`, the scales `<name>_input_scale`."""
        from onnx import TensorProto, helper

        bounds = {"low": helper.make_tensor(f"{name}_input_low", TensorProto.FLOAT, [], [-128.0]),
                  "high": helper.make_tensor(f"{name}_input_high", TensorProto.FLOAT, [], [127.0])}
        for tensor in bounds.values():
            self.add(tensor)
        rounded = f"{name}_input_rounded"
        return [*self.dynamic_scaling_nodes(source, activation, name),
                helper.make_node("Round", [f"{name}_input_scaled"], [rounded], name=rounded),
                helper.make_node("Clip", [rounded, bounds["low"].name, bounds["high"].name], [f"{name}_input_q"],
                                 name=f"{name}_input_q")]

    def dynamic_scaling_nodes(self, source: str, activation: ActivationQuant, name: str) -> list[Any]:
        """`source` divided by its own scale per token or per sample, not yet rounded: the values
        are `<name>_input_scaled`, the scales `<name>_input_scale`."""
        from onnx import TensorProto, helper

        axes = [-1] if activation.dynamic == PER_TOKEN else [1, 2, 3]
        constants = {"axes": helper.make_tensor(f"{name}_input_axes", TensorProto.INT64, [len(axes)], axes),
                     "levels": helper.make_tensor(f"{name}_input_levels", TensorProto.FLOAT, [], [127.0]),
                     "zero": helper.make_tensor(f"{name}_input_zero", TensorProto.FLOAT, [], [0.0]),
                     "one": helper.make_tensor(f"{name}_input_one", TensorProto.FLOAT, [], [1.0])}
        for tensor in constants.values():
            self.add(tensor)
        c = {key: tensor.name for key, tensor in constants.items()}

        def step(op: str, inputs: list[str], output: str, **attributes: Any) -> Any:
            return helper.make_node(op, inputs, [f"{name}_input_{output}"], name=f"{name}_input_{output}", **attributes)

        def value(output: str) -> str:
            return f"{name}_input_{output}"

        return [step("Abs", [source], "abs"),
                step("ReduceMax", [value("abs"), c["axes"]], "amax", keepdims=1),
                step("Greater", [value("amax"), c["zero"]], "nonzero"),
                step("Div", [value("amax"), c["levels"]], "top"),
                step("Where", [value("nonzero"), value("top"), c["one"]], "scale"),
                step("Div", [source, value("scale")], "scaled")]

    def quantize_weight(self, layer: Any, weight: torch.Tensor, flip: bool, spec: PrecisionSpec,
                        name: str) -> WeightSlot:
        """Replaces the layer's weight by its quantized form; returns the slot that now holds it."""
        from onnx import helper

        _, transposed_by = self.constant_weight(layer)
        slot = weight_slot(name, spec, flip)
        for tensor in weight_initializers(slot, weight, spec):
            self.add(tensor)
        target = slot.initializer
        nodes = []
        if slot.scale is not None:
            target = f"{name}_weight_dq"
            kind = self.initializers[slot.initializer].data_type
            self.add(raw_tensor(f"{name}_weight_zero", torch.zeros(tuple(self.initializers[slot.scale].dims)), kind))
            nodes = [helper.make_node("DequantizeLinear", [slot.initializer, slot.scale, f"{name}_weight_zero"],
                                      [target], name=f"{name}_weight_dq", **_dq_attributes(spec, flip))]
        self.insert_before(transposed_by or layer, nodes)
        if transposed_by is not None:
            transposed_by.input[0] = target
        else:
            layer.input[1] = target
        return slot

    def integer_linear(self, layer: Any, weight: torch.Tensor, spec: PrecisionSpec, name: str) -> WeightSlot | None:
        """A linear with per-token dynamic int8 input and per-channel int8 weight as ONNX Runtime's
        integer matmul: the input rounded onto uint8 around zero point 128 (the product is
        exactly the signed one; MLAS has fast u8 x s8 kernels where s8 x s8 falls back to slow
        ones), ONNX Runtime's MatMulIntegerToFloat with the weight stored [in, out] and each channel's
        scale, then each token's scale. None, with nothing changed, when the layer is not a plain
        MatMul or Gemm."""
        from onnx import TensorProto, helper

        attributes = {a.name: helper.get_attribute_value(a) for a in layer.attribute}
        if layer.op_type not in ("MatMul", "Gemm") or attributes.get("transA", 0) or \
                attributes.get("alpha", 1.0) != 1.0 or attributes.get("beta", 1.0) != 1.0:
            return None
        _, transposed_by = self.constant_weight(layer)
        slot = weight_slot(name, spec, True)
        for tensor in weight_initializers(slot, weight, spec):
            self.add(tensor)
        self.add(helper.make_tensor(f"{name}_input_shift_u8", TensorProto.UINT8, [], [128]))
        biased = layer.op_type == "Gemm" and len(layer.input) > 2 and layer.input[2]

        def step(op: str, inputs: list[str], output: str, **attributes: Any) -> Any:
            return helper.make_node(op, inputs, [output], name=output, **attributes)

        v = f"{name}_input_"
        if spec.activation.dynamic is None:
            # the static scale: QuantizeLinear onto uint8 around zero point 128 is the int8 grid shifted
            self.add(helper.make_tensor(v + "scale", TensorProto.FLOAT, [], [spec.activation.scale]))
            rounding = [step("QuantizeLinear", [layer.input[0], v + "scale", v + "shift_u8"], v + "u8")]
        else:
            # rounding, clipping and the shift onto uint8 in one QuantizeLinear of unit scale (ties to
            # even, as torch.round): one pass over the activation where Round, Clip, Add, Cast took four
            self.add(helper.make_tensor(v + "unit", TensorProto.FLOAT, [], [1.0]))
            rounding = [*self.dynamic_scaling_nodes(layer.input[0], spec.activation, name),
                        step("QuantizeLinear", [v + "scaled", v + "unit", v + "shift_u8"], v + "u8")]
        # ONNX Runtime's MatMulIntegerToFloat scales the int32 product per channel and adds the bias
        # in its own pass over the output, where Cast, Mul, Mul and Add took four; its input scale is
        # one per tensor, so a per-token scale is a Mul after it, and the bias an Add after that
        per_token = spec.activation.dynamic is not None
        bias_add = None if biased or per_token else self.bias_add(layer, weight.shape[0])
        bias = layer.input[2] if biased else bias_add[1] if bias_add is not None else None
        bias_in_kernel = bias is not None and not per_token and self.is_bias(bias, weight.shape[0])
        nodes = [helper.make_node("MatMulIntegerToFloat",
                                  [v + "u8", slot.initializer, v + ("unit" if per_token else "scale"), slot.scale,
                                   v + "shift_u8", "", *([bias] if bias_in_kernel else [])],
                                  [f"{name}_product"], name=f"{name}_product", domain=CONTRIB_DOMAIN)]
        if per_token:
            nodes.append(step("Mul", [nodes[-1].output[0], v + "scale"], f"{name}_token_scaled"))
        if biased and not bias_in_kernel:
            nodes.append(step("Add", [nodes[-1].output[0], layer.input[2]], f"{name}_biased"))
        nodes[-1].output[0] = (bias_add[0] if bias_add is not None else layer).output[0]
        nodes = [*rounding, *nodes]
        self.insert_before(layer, nodes)
        self.graph.node.remove(layer)
        if bias_add is not None:
            self.graph.node.remove(bias_add[0])
        if transposed_by is not None and not any(transposed_by.output[0] in n.input for n in self.graph.node):
            self.graph.node.remove(transposed_by)
        return slot

    def bias_add(self, layer: Any, features: int) -> tuple[Any, str] | None:
        """The Add that alone consumes a MatMul's output and adds a constant vector of `features`
        values (its bias), and that vector; None where there is none."""
        consumers = [n for n in self.graph.node if layer.output[0] in n.input]
        if len(consumers) != 1 or consumers[0].op_type != "Add" or \
                layer.output[0] in {o.name for o in self.graph.output}:
            return None
        add = consumers[0]
        bias = add.input[1] if add.input[0] == layer.output[0] else add.input[0]
        return (add, bias) if self.is_bias(bias, features) else None

    def is_bias(self, value: str, features: int) -> bool:
        return value in self.initializers and list(self.initializers[value].dims) == [features]

    def add(self, tensor: Any) -> None:
        self.graph.initializer.append(tensor)
        self.initializers[tensor.name] = tensor

    def drop_unused_initializers(self) -> None:
        used = {i for n in self.graph.node for i in n.input} | {o.name for o in self.graph.output}
        keep = [i for i in self.graph.initializer if i.name in used]
        del self.graph.initializer[:]
        self.graph.initializer.extend(keep)


def _runs_integer_matmul(spec: PrecisionSpec) -> bool:
    activation, weight = spec.activation, spec.weight
    if activation is None or activation.dtype != INT8 or weight is None or weight.dtype != INT8 or \
            weight.granularity != PER_CHANNEL or weight.axis != 0:
        return False
    return activation.dynamic == PER_TOKEN or (activation.dynamic is None and not activation.group_sizes)


def _dq_attributes(spec: PrecisionSpec, flip: bool) -> dict[str, int]:
    if spec.weight.granularity == BLOCKED:
        return {"axis": 1 - spec.weight.axis if flip else spec.weight.axis, "block_size": spec.weight.block_size}
    return {"axis": 1 if flip else 0}


__all__ = ["quantize_segment_onnx"]
