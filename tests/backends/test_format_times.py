"""The measured cost table: each backend times one linear layer per format on this machine, as it
runs that format, and the quant pass's latency budget places by it."""
import math

import pytest
import torch

from diffc import api
from diffc.backends import get_backend
from diffc.backends.format_times import LAYER_SHAPES, layer_annotations, one_linear, relative_times
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


def test_relative_times_divide_each_format_by_the_unquantized_layer():
    calls = []

    def runner(module, annotations, example):
        fmt = None if annotations is None else next(iter(precision_specs(annotations).values())).format
        calls.append(fmt)
        return lambda: example @ example.transpose(-1, -2) if fmt == "int8" else example.sum()

    times = relative_times(("bf16", "int8"), CPU, runner)
    assert calls == [None, "bf16", "int8"]
    assert set(times) == {"bf16", "int8"} and times["int8"] > times["bf16"]


@pytest.mark.parametrize("backend", ["torch", "ort"])
def test_backends_time_every_format_on_cpu(backend):
    times = get_backend(backend).relative_format_times(("bf16",) + LOW_BIT, CPU)
    assert set(times) == {"bf16", *LOW_BIT}
    assert all(math.isfinite(value) and value > 0 for value in times.values())


def test_tensorrt_measures_nothing_here():
    assert get_backend("trt").relative_format_times(("int8",), CPU) is None


def test_api_measures_once_per_backend_device_and_formats(monkeypatch):
    api._format_times.cache_clear()
    measured = []
    monkeypatch.setattr(type(get_backend("ort")), "relative_format_times",
                        lambda self, formats, device: measured.append((formats, device)) or {"int8": 0.5})
    first = api._format_times("ort", "cpu", ("int8",))
    assert api._format_times("ort", "cpu", ("int8",)) is first
    assert measured == [(("int8",), CPU)]
    api._format_times.cache_clear()
