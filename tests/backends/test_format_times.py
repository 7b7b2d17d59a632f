"""The measured cost table: each backend times one linear layer per format on this machine, as it
runs that format, and the quant pass's latency budget places by it."""
import math
import time

import pytest
import torch

from diffc import api
from diffc.backends import get_backend
from diffc.backends import format_times
from diffc.backends.format_times import LAYER_SHAPES, layer_annotations, one_linear, passthrough, relative_times
from diffc.backends.timing_cache import CACHE_VARIABLE
from diffc.ir.precision import FORMATS, precision_specs
from diffc.ir.simulation import simulate

CPU = torch.device("cpu")
LOW_BIT = ("fp8", "int8", "int8_dynamic", "int4", "w4a8")


def test_the_timed_layer_is_the_annotated_format_and_quantizes():
    module, example = one_linear(CPU)
    rows, inputs, outputs = LAYER_SHAPES["cpu"]
    assert tuple(example.shape) == (1, rows, inputs)
    (reference,) = module(example)
    for name in LOW_BIT:
        annotations = layer_annotations(module, example, name)
        (spec,) = precision_specs(annotations).values()
        assert spec.format == name
        (quantized,) = simulate(module, annotations)(example)
        error = (quantized - reference).norm() / reference.norm()
        assert 0 < error < (0.15 if FORMATS[name].weight == "int4" else 0.05), name


def test_relative_times_divide_each_format_by_the_unquantized_layer_without_the_call_cost():
    calls = []

    def runner(module, annotations, example):
        layer = any(n.target == torch.ops.aten.linear.default for n in module.graph.nodes)
        fmt = None if annotations is None else next(iter(precision_specs(annotations).values())).format
        calls.append(fmt if layer else "passthrough")
        work = {None: 1, "bf16": 1, "int8": 3}[fmt] if layer else 0

        def call():
            # a fixed cost every call pays (2 ms), then the layer's own work (1 ms a unit)
            end = time.perf_counter() + 0.002 + 0.001 * work
            while time.perf_counter() < end:
                pass
        return call

    times = relative_times(("bf16", "int8"), CPU, runner, shape=(64, 32, 16))
    assert calls == ["bf16", "int8", "passthrough", None]
    assert set(times) == {"bf16", "int8"}
    # with the fixed cost left in, int8 would time 5/3 = 1.7x
    assert 0.8 < times["bf16"] < 1.25 and 2.4 < times["int8"] < 3.75


@pytest.mark.parametrize("noisy", [False, True])
def test_rounds_are_added_while_a_ratio_moves_with_the_load(monkeypatch, noisy):
    samples = iter(range(10**6))

    def sampler(call, device):
        # the layer's time; a format's swings by 60% every other sample when the machine is loaded
        def sample():
            index = next(samples)
            if call == "passthrough":
                return 0.0
            return 0.001 * (1 + (0.6 * (index % 2) if noisy and call == "int8" else 0))
        return sample

    monkeypatch.setattr(format_times, "_timer", sampler)
    monkeypatch.setattr(format_times, "REPEATS", {"cpu": 4, "cuda": 4})
    rounds = []
    monkeypatch.setattr(format_times, "_unsettled", lambda ratios, real=format_times._unsettled:
                        rounds.append(len(next(iter(ratios)))) or real(ratios))
    def runner(module, annotations, example):
        layer = any(n.target == torch.ops.aten.linear.default for n in module.graph.nodes)
        return "int8" if annotations else "unquantized" if layer else "passthrough"

    relative_times(("int8",), CPU, runner)
    assert rounds == ([4, 8] if noisy else [4])


def test_the_timed_layer_takes_the_asked_shape_and_the_passthrough_only_copies():
    module, example = one_linear(CPU, (24, 40, 8))
    assert tuple(example.shape) == (1, 24, 40) and tuple(module(example)[0].shape) == (1, 24, 8)
    (copied,) = passthrough(example)(example)
    assert torch.equal(copied, example) and copied is not example


@pytest.mark.parametrize("backend", ["torch", "ort"])
def test_backends_time_every_format_on_cpu(backend):
    times = get_backend(backend).relative_format_times(("bf16",) + LOW_BIT, CPU)
    assert set(times) == {"bf16", *LOW_BIT}
    assert all(math.isfinite(value) and value > 0 for value in times.values())


def test_onnx_runtime_times_a_layer_of_any_shape_and_runs_real_kernels():
    backend = get_backend("ort")
    times = backend.relative_format_times(("int8", "int8_dynamic"), CPU, (16, 24, 40))
    assert set(times) == {"int8", "int8_dynamic"} and all(math.isfinite(v) and v > 0 for v in times.values())
    assert backend.runs_low_bit_kernels(CPU)
    # torch simulates low-bit formats on a CPU: no format can pay there, so no layer is judged by speed
    assert not get_backend("torch").runs_low_bit_kernels(CPU)
    assert get_backend("torch").runs_low_bit_kernels(torch.device("cuda"))


def test_tensorrt_measures_nothing_here():
    assert get_backend("trt").relative_format_times(("int8",), CPU) is None


def test_only_tensorrt_runs_quantized_convolutions_as_low_bit_kernels():
    # ONNX Runtime runs a Q/DQ convolution (no output quantization) in float from dequantized weights;
    # torch has no low-bit convolution kernel; TensorRT fuses the Q/DQ pairs into int8 / fp8 convolutions
    assert not get_backend("ort").runs_low_bit_convolutions(CPU)
    assert not get_backend("torch").runs_low_bit_convolutions(torch.device("cuda"))
    assert get_backend("trt").runs_low_bit_convolutions(torch.device("cuda"))


def test_api_measures_once_per_backend_device_and_formats(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_VARIABLE, str(tmp_path / "times.json"))
    api._format_times.cache_clear()
    measured = []
    monkeypatch.setattr(type(get_backend("ort")), "relative_format_times",
                        lambda self, formats, device, shape=None: measured.append((formats, device, shape))
                        or {"int8": 0.5})
    first = api._format_times("ort", "cpu", ("int8",))
    assert api._format_times("ort", "cpu", ("int8",)) is first
    api._format_times("ort", "cpu", ("int8",), (8, 16, 16))
    api._format_times("ort", "cpu", ("int8",), (8, 16, 16))
    assert measured == [(("int8",), CPU, None), (("int8",), CPU, (8, 16, 16))]
    api._format_times.cache_clear()
