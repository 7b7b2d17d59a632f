"""Layer-format timings kept per machine: measured once, the same decision on every later run."""
import json

import pytest
import torch

from diffc.backends import format_times, timing_cache
from diffc.backends.timing_cache import CACHE_VARIABLE, kept_times

CPU = torch.device("cpu")
SHAPE = (128, 96, 96)


@pytest.fixture
def kept(monkeypatch, tmp_path):
    path = tmp_path / "cache" / "format-times.json"
    monkeypatch.setenv(CACHE_VARIABLE, str(path))
    return path


def counting(result):
    calls = []
    return calls, lambda: calls.append(1) or (dict(result) if result is not None else None)


def test_a_shape_is_timed_once_on_a_machine_and_read_back_after(kept):
    calls, measure = counting({"int8": 0.62, "int8_dynamic": 1.4})
    first = kept_times("ort", CPU, ("int8", "int8_dynamic"), SHAPE, measure)
    again = kept_times("ort", CPU, ("int8", "int8_dynamic"), SHAPE, measure)
    assert first == again == {"int8": 0.62, "int8_dynamic": 1.4} and len(calls) == 1
    (machine,) = json.loads(kept.read_text())
    assert "ort on cpu" in machine and f"threads={torch.get_num_threads()}" in machine and "onnxruntime" in machine


def test_another_shape_format_set_backend_or_thread_count_is_timed_again(kept, monkeypatch):
    calls, measure = counting({"int8": 0.5})
    kept_times("ort", CPU, ("int8",), SHAPE, measure)
    kept_times("ort", CPU, ("int8",), (16, 96, 96), measure)
    kept_times("torch", CPU, ("int8",), SHAPE, measure)
    kept_times("ort", CPU, ("int8",), None, measure)
    assert len(calls) == 4
    monkeypatch.setattr(torch, "get_num_threads", lambda: 97)
    kept_times("ort", CPU, ("int8",), SHAPE, measure)
    monkeypatch.setattr(timing_cache, "TIMING_METHOD", format_times.TIMING_METHOD + 1)
    kept_times("ort", CPU, ("int8",), SHAPE, measure)
    assert len(calls) == 6
    calls_more, measure_more = counting({"int8": 0.5, "fp8": 2.0})
    kept_times("ort", CPU, ("int8", "fp8"), SHAPE, measure_more)
    assert len(calls_more) == 1


def test_nothing_is_kept_where_the_backend_cannot_time(kept):
    calls, measure = counting(None)
    assert kept_times("trt", CPU, ("int8",), SHAPE, measure) is None
    assert kept_times("trt", CPU, ("int8",), SHAPE, measure) is None
    assert len(calls) == 2 and not kept.exists()


def test_a_damaged_file_is_timed_again_and_rewritten_whole(kept):
    kept.parent.mkdir(parents=True)
    kept.write_text('{"ort on cpu: half a')
    calls, measure = counting({"int8": 0.7})
    assert kept_times("ort", CPU, ("int8",), SHAPE, measure) == {"int8": 0.7} and len(calls) == 1
    assert list(json.loads(kept.read_text()).values()) == [{"int8 @ 128x96x96": {"int8": 0.7}}]
    assert [p.name for p in kept.parent.iterdir()] == [kept.name]  # no partial file left


def test_an_empty_variable_keeps_timings_in_memory_only(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_VARIABLE, "")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls, measure = counting({"int8": 0.7})
    kept_times("ort", CPU, ("int8",), SHAPE, measure)
    kept_times("ort", CPU, ("int8",), SHAPE, measure)
    assert len(calls) == 2 and not any(tmp_path.iterdir())


def test_the_default_file_is_in_the_users_cache_folder(monkeypatch, tmp_path):
    monkeypatch.delenv(CACHE_VARIABLE, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert timing_cache.cache_path() == tmp_path / "diffc" / "format-times.json"
