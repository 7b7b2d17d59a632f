"""Running a built TensorRT engine: EngineRunner binds torch CUDA tensors directly (`set_tensor_address` +
`execute_async_v3` on torch's current stream), so cached state stays on the GPU between segments and
steps, optionally replayed through a captured CUDA graph.

`tensorrt` is imported only inside functions, so this module imports on machines without TensorRT."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ...errors import ArtifactError, DiffcError, InputError
from ...ir.onnx_segments import flatten_values, regroup_values

if TYPE_CHECKING:
    import tensorrt as trt

_TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
                 "INT64": torch.int64, "BOOL": torch.bool, "UINT8": torch.uint8, "INT8": torch.int8,
                 "FP8": torch.float8_e4m3fn}


def _shape(dims: "trt.Dims") -> tuple[int, ...]:
    return tuple(dims[i] for i in range(len(dims)))


class EngineRunner:
    """Runs one segment's engine on torch CUDA tensors, called like the segment (its values in, a tuple of
    its values out, all on the GPU; see diffc.ir.onnx_segments for lists and sizes). Inputs
    outside the engine's optimization profile raise InputError naming the option that widens it."""

    def __init__(self, engine: bytes, segment: str, io: Mapping[str, Any], device: torch.device,
                 cuda_graph: bool = False) -> None:
        import tensorrt as trt

        self.segment = segment
        self.device = device
        self.cuda_graph = cuda_graph
        self.entries = io["entries"]
        self.inputs = [spec["name"] for spec in io["inputs"]]
        self.outputs = [spec["name"] for spec in io["outputs"]]
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        with torch.cuda.device(device):
            engine_object = self._runtime.deserialize_cuda_engine(engine)
            if engine_object is None:
                raise ArtifactError(f"TensorRT could not deserialize the engine of segment {segment!r}; it is "
                                    "corrupt or from another TensorRT version. Rebuild it on this machine")
            self._engine = engine_object
            self._context = engine_object.create_execution_context()
        self._dtypes = {name: _TORCH_DTYPES[self._engine.get_tensor_dtype(name).name]
                        for name in [*self.inputs, *self.outputs]}
        self._profile = {name: [_shape(dims) for dims in self._engine.get_tensor_profile_shape(name, 0)]
                         for name in self.inputs}
        self._graphs: dict[tuple[tuple[int, ...], ...],
                           tuple[torch.cuda.CUDAGraph, list[torch.Tensor], list[torch.Tensor]]] = {}

    @property
    def engine(self) -> "trt.ICudaEngine":
        return self._engine

    def refitted(self) -> None:
        """After a refit of the engine: CUDA graphs captured before it are captured again on use."""
        self._graphs.clear()

    def __call__(self, *values: Any) -> tuple[Any, ...]:
        if len(values) != len(self.entries["inputs"]):
            raise InputError(f"segment {self.segment!r} takes {len(self.entries['inputs'])} values, got {len(values)}")
        with torch.cuda.device(self.device):
            flat = flatten_values(self.entries["inputs"], values, self.device)
            tensors = [self._conform(name, t) for name, t in zip(self.inputs, flat)]
            if self.cuda_graph:
                outputs = self._replay(tensors)
            else:
                outputs = self._bind(tensors)
                self._enqueue()
        return regroup_values(self.entries["outputs"], outputs)

    def _conform(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        value = tensor.to(device=self.device, dtype=self._dtypes[name]).contiguous()
        low, _, high = self._profile[name]
        shape = tuple(value.shape)
        if len(shape) != len(low) or any(not lo <= s <= hi for s, lo, hi in zip(shape, low, high)):
            raise InputError(f"segment {self.segment!r}: input {name!r} has shape {shape}, outside the engine's "
                             f"optimization profile {tuple(low)} .. {tuple(high)}. Rebuild with a wider profile, e.g. "
                             "the compile option profiles={'batch': (1, 2, 8), 'height': (32, 64, 128)}")
        return value

    def _bind(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Sets input shapes and addresses, allocates the outputs and binds them; returns the outputs."""
        for name, value in zip(self.inputs, inputs):
            if not self._context.set_input_shape(name, tuple(value.shape)):
                raise InputError(f"segment {self.segment!r}: TensorRT refused shape {tuple(value.shape)} for "
                                 f"input {name!r}")
            self._context.set_tensor_address(name, value.data_ptr())
        outputs = []
        for name in self.outputs:
            shape = _shape(self._context.get_tensor_shape(name))
            value = torch.empty(shape, dtype=self._dtypes[name], device=self.device)
            self._context.set_tensor_address(name, value.data_ptr())
            outputs.append(value)
        return outputs

    def _enqueue(self) -> None:
        stream = torch.cuda.current_stream(self.device)
        if not self._context.execute_async_v3(stream.cuda_stream):
            raise DiffcError(f"TensorRT failed to run segment {self.segment!r} (execute_async_v3 returned False); "
                             "its log above says why")

    def _replay(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """One captured CUDA graph per input-shape combination; inputs are copied into its static buffers
        and the outputs cloned out, because the next replay overwrites them."""
        key = tuple(tuple(t.shape) for t in tensors)
        if key not in self._graphs:
            static_inputs = [t.clone() for t in tensors]
            static_outputs = self._bind(static_inputs)
            self._enqueue()  # TensorRT finishes shape-dependent setup on the first enqueue, outside capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._enqueue()
            self._graphs[key] = (graph, static_inputs, static_outputs)
        graph, static_inputs, static_outputs = self._graphs[key]
        for static, value in zip(static_inputs, tensors):
            static.copy_(value)
        graph.replay()
        return [out.clone() for out in static_outputs]
