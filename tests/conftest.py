"""Shared fixtures: the six tiny families, each captured once per test session."""
from __future__ import annotations

import functools

import pytest
import torch

from diffc.ir import DiffusionGraph, capture

FAMILY_NAMES = ("unet2dcond", "unet2d", "dit", "pixart", "sd3", "flux")


@functools.lru_cache(maxsize=None)
def _family(name: str) -> tuple[torch.nn.Module, dict]:
    from tiny_families import families

    return families()[name]


@functools.lru_cache(maxsize=None)
def _captured(name: str) -> DiffusionGraph:
    return capture(_family(name)[0])


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
