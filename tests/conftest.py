"""Shared fixtures: the six tiny families, each captured once per test session."""
from __future__ import annotations

import functools

import pytest
import torch

from diffc.backends.timing_cache import CACHE_VARIABLE
from diffc.ir import DiffusionGraph, capture

FAMILY_NAMES = ("unet2dcond", "unet2d", "dit", "pixart", "sd3", "flux")


@functools.lru_cache(maxsize=None)
def _family(name: str) -> tuple[torch.nn.Module, dict]:
    from tiny_families import families

    return families()[name]


@functools.lru_cache(maxsize=None)
def _captured(name: str) -> DiffusionGraph:
    return capture(_family(name)[0])


@pytest.fixture(autouse=True, scope="session")
def _format_timings_of_this_run(tmp_path_factory):
    """Layers timed by tests are kept for the test run only, never in the user's per-machine file."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_VARIABLE, str(tmp_path_factory.mktemp("timings") / "format-times.json"))
        yield


@pytest.fixture(params=FAMILY_NAMES)
def family_name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def family():
    """family(name) -> (model, example inputs); shared, do not modify."""
    return _family


@pytest.fixture
def captured():
    """captured(name) -> DiffusionGraph; shared, clone it before rewriting."""
    return _captured


@pytest.fixture(scope="module")
def trained_dit(tmp_path_factory):
    """The embedded digits DiT (all linears: static int8 keeps ~43 dB, dynamic scales ~49 dB), captured,
    and a calibration set of 4 conditions x 4 steps."""
    from diffc.calibration import collect
    from diffc.models import load

    pipe = load("digits-dit")
    pipe.set_progress_bar_config(disable=True)
    calibration = collect(pipe, conditions=[1, 6, 3, 8], num_steps=4, out=tmp_path_factory.mktemp("dit"),
                          progress=False)
    return capture(pipe.transformer), calibration
