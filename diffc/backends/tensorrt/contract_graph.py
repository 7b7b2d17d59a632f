"""The view of an ONNX model the TensorRT contract checks read: ContractGraph (producers, consumers,
constants, element types and shapes of its values), node helpers, and Violation, one problem found."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

_ONNX_TYPES = {1: "FP32", 2: "UINT8", 3: "INT8", 6: "INT32", 7: "INT64", 9: "BOOL", 10: "FP16", 11: "DOUBLE",
               16: "BF16", 17: "FP8", 22: "INT4", 23: "FP4"}


@dataclass(frozen=True)
class Violation:
    node: str
    op: str
    problem: str
    fix: str

    def __str__(self) -> str:
        return f"node {self.node!r} ({self.op}): {self.problem}. Fix: {self.fix}"


class ContractGraph:
    """The lookups the checks need: producers, consumers, constants and element types."""

    def __init__(self, model: Any) -> None:
        import onnx

        self.model = model
        self.nodes = list(model.graph.node)
        self.opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
        self.domains = sorted({o.domain for o in model.opset_import if o.domain not in ("", "ai.onnx")})
        self.initializers = {t.name: t for t in model.graph.initializer}
        self.producer = {out: n for n in self.nodes for out in n.output if out}
        self.consumers: dict[str, list[tuple[Any, int]]] = {}
        for n in self.nodes:
            for index, name in enumerate(n.input):
                if name:
                    self.consumers.setdefault(name, []).append((n, index))
        self.types: dict[str, int] = {}
        for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
            if value.type.HasField("tensor_type"):
                self.types[value.name] = value.type.tensor_type.elem_type
        for tensor in model.graph.initializer:
            self.types[tensor.name] = tensor.data_type
        for n in self.nodes:
            if n.op_type == "Constant":
                value = self.constant_value_attribute(n)
                if value is not None:
                    self.types[n.output[0]] = value.data_type
        self.graph_outputs = {o.name for o in model.graph.output}
        self._onnx = onnx
        self._constant: dict[str, bool] = {}

    @staticmethod
    def constant_value_attribute(node: Any) -> Any:
        return next((a.t for a in node.attribute if a.name == "value"), None)

    def type_name(self, value: str) -> str | None:
        code = self.types.get(value)
        return None if not code else _ONNX_TYPES.get(code, self._onnx.TensorProto.DataType.Name(code))

    def is_constant(self, value: str) -> bool:
        """An initializer, a Constant, or computed from constants only (TensorRT folds those at build time)."""
        if value in self._constant:
            return self._constant[value]
        self._constant[value] = False  # guards cycles through malformed graphs
        producer = self.producer.get(value)
        if value in self.initializers:
            result = True
        elif producer is None:
            result = False
        elif producer.op_type == "Constant":
            result = True
        else:
            result = producer.op_type not in ("QuantizeLinear", "DequantizeLinear") and all(
                self.is_constant(i) for i in producer.input if i)
        self._constant[value] = result
        return result

    def array(self, value: str) -> np.ndarray | None:
        """The value of an initializer or Constant output, else None."""
        from onnx import numpy_helper

        if value in self.initializers:
            return numpy_helper.to_array(self.initializers[value])
        producer = self.producer.get(value)
        if producer is not None and producer.op_type == "Constant":
            tensor = self.constant_value_attribute(producer)
            return None if tensor is None else numpy_helper.to_array(tensor)
        return None

    def shape(self, value: str) -> tuple[int | str, ...] | None:
        if value in self.initializers:
            return tuple(self.initializers[value].dims)
        for info in [*self.model.graph.input, *self.model.graph.value_info, *self.model.graph.output]:
            if info.name == value and info.type.tensor_type.HasField("shape"):
                return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                             for d in info.type.tensor_type.shape.dim)
        array = self.array(value)
        return None if array is None else tuple(array.shape)


def node_attribute(node: Any, name: str, default: Any = None) -> Any:
    """The value of attribute `name` of an ONNX node (strings decoded), `default` when it has none."""
    from onnx import helper

    for attribute in node.attribute:
        if attribute.name == name:
            value = helper.get_attribute_value(attribute)
            return value.decode() if isinstance(value, bytes) else value
    return default


def node_name(node: Any) -> str:
    """How violations name an ONNX node: its name, else its first output, else its op type."""
    name: str = node.name or (node.output[0] if node.output else node.op_type)
    return name
