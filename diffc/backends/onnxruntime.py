"""The ONNX Runtime backend (`ort`, `ort-fp16`, `ort-int8`, ...): one InferenceSession per plan
segment, built from the segment's ONNX export (diffc.ir.onnx_export.export_plan).

fp16 converts each segment model to float16 (weights and compute); its inputs and outputs are
float16 too, except the timestep inputs, which OptimizedModel keeps in float32. Low-bit targets
lower the quantization pass's precision annotations to Q/DQ nodes (diffc.backends.onnx_qdq).
On a CUDA device the sessions use the CUDA execution provider with IO binding: inputs and outputs
stay torch CUDA tensors, so cached state never leaves the GPU between segments. The runners take
and return torch tensors, so Plan.run drives the step schedule across segments unchanged. A saved
artifact keeps the models without the weights its weights file holds (`_saved_form`), and loading
makes them whole again."""
from __future__ import annotations

import importlib.util
import os
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx

from .._progress import progress
from ..errors import ArtifactError, InputError, TargetError
from ..ir import CompiledPlan, Plan, onnx_export
from ..ir.onnx_export import export_plan
from ..ir.served_files import register_saved_form, register_served_file_maker
from ..ir.onnx_segments import (SEGMENT_METADATA, flatten_values, onnx_io, read_segment_metadata, regroup_values,
                                  segment_values)
from . import format_times
from .base import LOW_BIT, Backend
from .onnx_refit import InPlaceUpdate
from .onnx_weights import map_weights, read_weight_map, restore_weights, strip_weights

ONNX_DIR = "onnx"
# MatMulAddFusion turns a 3-d MatMul + Add into Reshape -> Gemm -> Reshape; on a Q/DQ input,
# onnxruntime 1.32 then builds a QuantizeLinear whose output_dtype (int8) contradicts its default
# uint8 zero point and the session fails to load (a FLUX-style transformer at ort-int8)
DISABLED_OPTIMIZERS = ["MatMulAddFusion"]
INSTALL_HINT = ("onnxruntime is not installed; install it with `pip install onnxruntime` "
                "(`pip install onnxruntime-gpu` for CUDA)")
_TORCH_DTYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(double)": torch.float64,
                 "tensor(int64)": torch.int64, "tensor(int32)": torch.int32, "tensor(bool)": torch.bool,
                 "tensor(int8)": torch.int8, "tensor(uint8)": torch.uint8}


class OnnxRuntimeBackend(Backend):
    name = "ort"
    options = ("opset", "fuse_qdq")

    @classmethod
    def unavailable_reason(cls, precision: str) -> str | None:
        if importlib.util.find_spec("onnxruntime") is None:
            return INSTALL_HINT
        if precision in ("fp32", "fp16"):
            return None
        if precision in LOW_BIT:
            if importlib.util.find_spec("diffc.backends.onnx_qdq") is None:
                return (f"ort-{precision} lowers the precision annotations written by the quantization pass to "
                        "Q/DQ ONNX, which this version of diffc does not provide yet; use ort-fp32 or ort-fp16")
            return None
        return f"the ort backend has no precision {precision!r}; it runs fp32, fp16 and {', '.join(LOW_BIT)}"

    def compile(self, plan: Plan, precision: str, device: Any = None, compile: bool = False,
                models: Mapping[str, bytes] | None = None, opset: int = 21, progress_bar: bool = False,
                fuse_qdq: bool = True, **options: Any) -> CompiledPlan:
        """Exports every segment to ONNX, converts it to `precision` and opens one session per
        segment; given `models` ({segment: ONNX bytes} from a saved artifact, see
        artifact_options), opens those instead of exporting again.

        fuse_qdq=False keeps ONNX Runtime from fusing Q/DQ pairs into integer kernels (session
        option ``session.disable_quant_qdq``): every layer then dequantizes and computes in float,
        which is the torch backend's simulation of the annotations up to float rounding; the
        integer kernels are faster but requantize (and on CPUs without VNNI saturate) in ways the
        simulation does not model."""
        self.check_request(precision, compile, "ONNX Runtime sessions")
        if options:
            raise TargetError(f"the ort backend has no option {', '.join(sorted(options))}; it takes `opset` "
                              "and `fuse_qdq`")
        device = torch.device(device or "cpu")
        providers = _providers(device)
        models = _export_models(plan, precision, opset, progress_bar, device) if models is None else \
            {name: restore_weights(data, plan.segments[name].module, plan.graph.annotations)
             if name in plan.segments else data for name, data in models.items()}
        missing = sorted(set(plan.segments) - set(models))
        if missing:
            raise ArtifactError(f"no ONNX model for segments {missing}; re-create the artifact with "
                                "diffc.optimize(..., target='ort...') and fast.save()")
        runners: dict[str, Any] = {}
        files: dict[str, bytes] = {}
        segments: dict[str, Any] = {}
        spin = len(plan.segments) == 1
        with tempfile.TemporaryDirectory(prefix="diffc-ort-") as scratch:
            for name in plan.segments:
                rel = f"{ONNX_DIR}/{name}.onnx"
                path = Path(scratch) / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(models[name])
                data = models.get(name + ".data")
                if data is not None:
                    # ONNX files over 2 GB keep their weights next to them; the session reads them on creation
                    path.with_name(path.name + ".data").write_bytes(data)
                    files[rel + ".data"] = data
                files[rel] = models[name]
                primary = SegmentSession(name, str(path), device, providers, fuse_qdq, spin)
                runners[name] = SegmentRunner(primary, _specializer(plan, name, precision, opset, device, providers,
                                                                    fuse_qdq, spin))
                segments[name] = {"file": rel, **primary.io, "weights_elsewhere": data is None}
        info = {"opset": opset, "providers": providers, "fuse_qdq": fuse_qdq, "segments": segments}
        swap = InPlaceUpdate(plan, runners, files, lambda name, path: SegmentSession(name, path, device, providers,
                                                                                    fuse_qdq, spin), models, ONNX_DIR)
        return CompiledPlan(plan=plan, runners=runners, backend=self.name, precision=precision, device=device,
                            input_dtype=torch.float16 if precision == "fp16" else torch.float32, files=files,
                            info=info, refit=swap.refit, rescale=swap.rescale)

    def relative_format_times(self, formats: tuple[str, ...], device: torch.device,
                              shape: format_times.LayerShape | None = None) -> dict[str, float] | None:
        """Timed as ONNX Runtime runs the Q/DQ model `compile` lowers a layer to (its integer kernels
        where it fuses the Q/DQ pairs), inputs fed from host memory."""
        if self.unavailable_reason("mixed"):
            return None
        import onnx

        from .onnx_qdq import quantize_segment_onnx

        exported: dict[int, Any] = {}
        with tempfile.TemporaryDirectory(prefix="diffc-format-times-") as directory:
            def runner(module: torch.fx.GraphModule, annotations: Any, example: torch.Tensor) -> Callable[[], Any]:
                if id(module) not in exported:
                    path = onnx_export.export_onnx(module, [example], Path(directory) / f"{len(exported)}.onnx",
                                                   ["x"], ["y"], [{}])
                    exported[id(module)] = onnx.load(str(path))
                    map_weights(exported[id(module)], module)
                model = exported[id(module)] if annotations is None else \
                    quantize_segment_onnx(exported[id(module)], module, annotations, "mixed",
                                          integer_kernels=device.type == "cpu")
                session = _inference_session(model.SerializeToString(), device, _providers(device), fuse_qdq=True)
                feed = {"x": example.cpu().numpy()}
                return lambda: session.run(None, feed)

            return format_times.relative_times(formats, device, runner, shape)

    def runs_low_bit_kernels(self, device: torch.device) -> bool:
        return True

    @classmethod
    def artifact_options(cls, root: str | os.PathLike[str], manifest: Mapping[str, Any]) -> dict[str, Any]:
        """The compile options that open a saved artifact's ONNX models (hash-checked by
        read_manifest) instead of exporting the plan again."""
        info = manifest["target"].get("info", {})
        segments = info.get("segments", {})
        models: dict[str, bytes] = {}
        for name in manifest["plan"]["segments"]:
            entry = segments.get(name)
            if entry is None or entry["file"] not in manifest["files"]:
                raise ArtifactError(f"the artifact at {root} has no ONNX model for segment {name!r}; re-create it "
                                    "with diffc.optimize(..., target='ort...') and fast.save()")
            models[name] = (Path(root) / entry["file"]).read_bytes()
            if entry["file"] + ".data" in manifest["files"]:
                models[name + ".data"] = (Path(root) / (entry["file"] + ".data")).read_bytes()
        return {"models": models, "opset": info.get("opset", 21), "fuse_qdq": info.get("fuse_qdq", True)}


def _saved_form(files: Mapping[str, bytes], info: Mapping[str, Any]) -> dict[str, bytes]:
    """The models without the weights the artifact's weights file holds (`restore_weights` makes them
    whole again on load); a model over 2 GB keeps its external weights file as it is."""
    saved = dict(files)
    for entry in info.get("segments", {}).values():
        if entry.get("weights_elsewhere"):
            saved[entry["file"]] = strip_weights(files[entry["file"]])
    return saved


register_saved_form("ort", _saved_form)
register_served_file_maker("ort", lambda data, plan, name: restore_weights(data, plan.segments[name].module,
                                                                         plan.graph.annotations))


def _inference_session(model: str | bytes, device: torch.device, providers: Sequence[str], fuse_qdq: bool,
                       spin: bool = True) -> Any:
    """An InferenceSession of `model` (a path or the bytes) with the backend's session settings.
    spin=False: its intra-op threads sleep as soon as a run ends instead of spinning for more work.
    A plan of several segments has a session (and a thread pool) each, run one after the other with
    torch between them, and threads left spinning take the 2 cores of this CPU from the next: a cached
    textures-pixart at ort-int8 ran its 20-step loop in 157 ms spinning, 89 ms not (one process each);
    one segment alone runs faster spinning (130 against 161 ms for the same model uncached at fp32)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if not fuse_qdq:
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    provider_options: list[dict[str, Any]] = [{}] * len(providers)
    if device.type == "cuda":
        provider_options = [{"device_id": device.index or 0}, {}]
    return onnxruntime.InferenceSession(model, sess_options=options, providers=list(providers),
                                        provider_options=provider_options, disabled_optimizers=DISABLED_OPTIMIZERS)


def _providers(device: torch.device) -> list[str]:
    import onnxruntime

    if device.type == "cpu":
        return ["CPUExecutionProvider"]
    if device.type != "cuda":
        raise TargetError(f"the ort backend runs on cpu or cuda, not {device.type}; pass device='cpu' or 'cuda'")
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        raise TargetError("device cuda was asked for, but this onnxruntime has no CUDAExecutionProvider; "
                          "install onnxruntime-gpu (pip uninstall onnxruntime && pip install onnxruntime-gpu)")
    if not torch.cuda.is_available():
        raise TargetError("device cuda was asked for but torch sees no CUDA GPU; use device='cpu'")
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def _export_models(plan: Plan, precision: str, opset: int, progress_bar: bool, device: torch.device) \
        -> dict[str, bytes]:
    """{segment: ONNX bytes} ({segment + ".data": weights} too for models over 2 GB), in `precision`."""
    import onnx

    models: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory(prefix="diffc-onnx-") as directory:
        paths = export_plan(plan, directory, opset=opset, show_progress=progress_bar)
        for name in progress(list(paths), progress_bar, f"ort-{precision}", "segment"):
            path = Path(directory) / "lowered" / f"{name}.onnx"
            exported = onnx.load(str(paths[name]))
            map_weights(exported, plan.segments[name].module)
            _save(_lower(exported, plan, name, precision, device), path)
            models[name] = path.read_bytes()
            if path.with_name(path.name + ".data").exists():
                models[name + ".data"] = path.with_name(path.name + ".data").read_bytes()
    return models


def _lower(model: Any, plan: Plan, name: str, precision: str, device: torch.device) -> Any:
    """The exported fp32 model of segment `name` in `precision`, for sessions on `device`."""
    if precision == "fp16":
        return _to_float16(model, plan)
    if precision in LOW_BIT:
        from .onnx_qdq import quantize_segment_onnx

        return quantize_segment_onnx(model, plan.segments[name].module, plan.graph.annotations, precision,
                                     integer_kernels=device.type == "cpu")
    return model


def _save(model: Any, path: Path) -> None:
    """Writes `model`, its weights next to it as `<name>.onnx.data` when a protobuf cannot hold them."""
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    large = model.ByteSize() >= onnx_export.EXTERNAL_DATA_THRESHOLD
    onnx.save_model(model, str(path), save_as_external_data=large, all_tensors_to_one_file=True,
                    location=path.name + ".data")


def _specializer(plan: Plan, name: str, precision: str, opset: int, device: torch.device,
                 providers: Sequence[str], fuse_qdq: bool, spin: bool) -> Callable[[Sequence[Any]], SegmentSession]:
    """Builds a session of segment `name` for the shapes of given inputs: for calls outside the
    shapes the export had to pin."""
    def specialize(args: Sequence[Any]) -> SegmentSession:
        import onnx

        with tempfile.TemporaryDirectory(prefix="diffc-onnx-") as directory:
            exported = onnx_export.export_segment(plan, name, Path(directory) / "exported.onnx", opset,
                                                  inputs=[_to_cpu(a) for a in args])
            path = Path(directory) / f"{name}.onnx"
            model = onnx.load(str(exported))
            map_weights(model, plan.segments[name].module)
            _save(_lower(model, plan, name, precision, device), path)
            session = SegmentSession(name, str(path), device, providers, fuse_qdq, spin)
            if not path.with_name(path.name + ".data").exists():
                session.model_bytes = path.read_bytes()  # a LoRA swap rewrites it in place (InPlaceUpdate)
            return session

    return specialize


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().float() if value.is_floating_point() else value.detach().cpu()
    if isinstance(value, (list, tuple)):
        return [_to_cpu(v) for v in value]
    return value


def _to_float16(model: Any, plan: Plan) -> Any:
    """The model with float16 weights and compute; timestep inputs stay float32 (OptimizedModel
    passes them in float32), every other float input and output is float16."""
    from .onnx_half import FP16, half_precision_model

    timesteps = {spec.name for spec in plan.graph.signature.inputs if spec.role == "timestep"}
    entries = read_segment_metadata(model)
    keep = segment_values([e for e in entries["inputs"] if e["name"] in timesteps])
    return half_precision_model(model, FP16, keep_io_types=keep)


class SegmentRunner:
    """A segment's session, plus sessions specialized to other input shapes where the exported
    model pinned a dim the call differs in (built on first use, with a warning, since an export
    takes a while)."""

    def __init__(self, primary: "SegmentSession", specialize: Callable[[Sequence[Any]], "SegmentSession"]) -> None:
        self.primary = primary
        self._specialize = specialize
        self._specialized: dict[tuple[Any, ...], SegmentSession] = {}

    @property
    def specialized(self) -> dict[tuple[Any, ...], "SegmentSession"]:
        return dict(self._specialized)

    def use(self, primary: "SegmentSession",
            specialized: Mapping[tuple[Any, ...], "SegmentSession"] | None = None) -> None:
        """Runs `primary` from now on, and `specialized` for the shapes they were specialized to; a
        session specialized to other shapes and not given is exported again on use."""
        self.primary = primary
        self._specialized = dict(specialized or {})

    def __call__(self, *args: Any) -> tuple[Any, ...]:
        flat = self.primary.flatten(args)
        if self.primary.accepts(flat):
            return self.primary.run(flat)
        key = tuple(tuple(t.shape) for t in flat)
        if key not in self._specialized:
            warnings.warn(f"segment {self.primary.name} was exported with pinned shapes {self.primary.input_shapes} "
                          f"(the exporter could not keep those dims dynamic); exporting it again for {list(key)}",
                          stacklevel=2)
            self._specialized[key] = self._specialize(args)
        return self._specialized[key](*args)


class SegmentSession:
    """One segment as an InferenceSession: called with the segment's inputs (tensors, lists of
    tensors, sizes) as torch tensors, returns its outputs the same way."""

    def __init__(self, name: str, path: str, device: torch.device, providers: Sequence[str],
                 fuse_qdq: bool = True, spin: bool = True) -> None:
        import onnx

        self.name, self.device = name, device
        # the ONNX bytes of a session specialized to other shapes, which a LoRA swap rewrites (None: not kept)
        self.model_bytes: bytes | None = None
        try:
            self.session = _inference_session(path, device, providers, fuse_qdq, spin)
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime refusing the graph (an op or type it lacks)
            raise TargetError(f"ONNX Runtime cannot load segment {name}: {' '.join(str(exc).split())[:300]}. Compile "
                              "for target='torch' to run this model") from exc
        proto = onnx.load(path, load_external_data=False)
        entries = read_segment_metadata(proto)
        if entries is None:
            raise ArtifactError(f"the ONNX model of segment {name!r} has no {SEGMENT_METADATA!r} metadata; it was not "
                                "written by diffc.ir.onnx_export.export_plan. Re-create the artifact.")
        self.inputs, self.outputs = entries["inputs"], entries["outputs"]
        self.weight_map = read_weight_map(proto)
        self.initializer_types = {i.name: i.data_type for i in proto.graph.initializer}
        self.io = {**onnx_io(proto), "entries": {"inputs": self.inputs, "outputs": self.outputs}}
        declared = {v.name: v for v in self.session.get_inputs()}
        self.input_names = segment_values(self.inputs)
        self.input_types = [_TORCH_DTYPES[declared[n].type] for n in self.input_names]
        self.input_shapes = [declared[n].shape for n in self.input_names]
        self.output_names = segment_values(self.outputs)
        produced = {v.name: v for v in self.session.get_outputs()}
        self.output_types = [_TORCH_DTYPES[produced[n].type] for n in self.output_names]
        self._output_shapes: dict[tuple[tuple[int, ...], ...], list[tuple[int, ...]]] = {}

    def __call__(self, *args: Any) -> tuple[Any, ...]:
        flat = self.flatten(args)
        if not self.accepts(flat):
            shapes = [tuple(t.shape) for t in flat]
            raise InputError(f"segment {self.name} of this ort model takes inputs {self.input_names} with shapes "
                             f"{self.input_shapes}, got {shapes}; the ONNX export kept only the named dims dynamic. "
                             "Optimize again with example_inputs of the size you run.")
        return self.run(flat)

    def accepts(self, flat: Sequence[torch.Tensor]) -> bool:
        """Whether the flat inputs fit the model's declared shapes (ranks and pinned sizes)."""
        for value, shape in zip(flat, self.input_shapes):
            if value.dim() != len(shape) or any(isinstance(want, int) and value.shape[d] != want
                                                for d, want in enumerate(shape)):
                return False
        return True

    def run(self, flat: Sequence[torch.Tensor]) -> tuple[Any, ...]:
        flat = [value.detach().to(device=self.device, dtype=dtype).contiguous()
                for value, dtype in zip(flat, self.input_types)]
        try:
            results = self._run_cuda(flat) if self.device.type == "cuda" else self._run_cpu(flat)
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime's own failure, named with the segment and shapes
            shapes = ", ".join(str(tuple(t.shape)) for t in flat)
            message = " ".join(str(exc).split())[:300]
            raise TargetError(f"ONNX Runtime failed running segment {self.name} at input shapes {shapes}: {message}. "
                              "The exported graph does not run at these shapes; compile for target='torch' to run "
                              "the model, and report this with the model's class") from exc
        return regroup_values(self.outputs, results)

    def flatten(self, args: Sequence[Any]) -> list[torch.Tensor]:
        """The segment's inputs as the model's flat inputs (see diffc.ir.onnx_segments)."""
        if len(args) != len(self.inputs):
            raise InputError(f"segment {self.name} takes {len(self.inputs)} inputs "
                             f"({', '.join(e['name'] for e in self.inputs)}), got {len(args)}")
        return flatten_values(self.inputs, args, self.device)

    def _run_cpu(self, flat: list[torch.Tensor]) -> list[torch.Tensor]:
        results = self.session.run(self.output_names, {n: t.numpy() for n, t in zip(self.input_names, flat)})
        return [torch.from_numpy(r) for r in results]

    def _run_cuda(self, flat: list[torch.Tensor]) -> list[torch.Tensor]:
        """IO binding on torch CUDA memory. Output shapes depend on the input shapes only: the first
        call at new shapes lets ONNX Runtime allocate to learn them, later calls write into torch
        tensors directly."""
        index = self.device.index or 0
        binding = self.session.io_binding()
        for name, tensor in zip(self.input_names, flat):
            binding.bind_input(name, "cuda", index, _numpy_dtype(tensor.dtype), tuple(tensor.shape),
                               tensor.data_ptr())
        key = tuple(tuple(t.shape) for t in flat)
        # ONNX Runtime runs on its own stream: the inputs torch is still writing must be ready
        torch.cuda.current_stream(self.device).synchronize()
        if key not in self._output_shapes:
            for name in self.output_names:
                binding.bind_output(name, "cuda", index)
            self.session.run_with_iobinding(binding)
            binding.synchronize_outputs()
            self._output_shapes[key] = [tuple(v.shape()) for v in binding.get_outputs()]
            binding.clear_binding_outputs()
        outputs = [torch.empty(shape, dtype=dtype, device=self.device)
                   for shape, dtype in zip(self._output_shapes[key], self.output_types)]
        for name, tensor in zip(self.output_names, outputs):
            binding.bind_output(name, "cuda", index, _numpy_dtype(tensor.dtype), tuple(tensor.shape),
                                tensor.data_ptr())
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return outputs


def _numpy_dtype(dtype: torch.dtype) -> Any:
    return torch.empty((), dtype=dtype).numpy().dtype
