"""Every tensor diffc builds for a graph follows the graph's device.

Without a GPU, the check runs the model on the CPU with torch's default device set to "meta": a
tensor built without naming its device (an example input, a mask, a probe's random direction, a
constant a pass adds) lands on meta, and the first op mixing it with the model's CPU tensors
fails. On CUDA the same tensor would have been built on the CPU beside a model on the GPU.
Under `-m gpu` the whole optimize() path runs with a model on CUDA."""
from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager
from typing import Iterator

import pytest
import torch

import diffc
from tiny_families import first_tensor


@contextmanager
def default_device(device: str) -> Iterator[None]:
    torch.set_default_device(device)
    try:
        yield
    finally:
        torch.set_default_device(None)


def _optimize_under_meta_default(family, name: str, passes, target: str) -> tuple[torch.Tensor, torch.Tensor]:
    model, inputs = family(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with default_device("meta"):
            fast = diffc.optimize(model, target=target, passes=passes, example_inputs=inputs)
            out = first_tensor(fast(**inputs))
        with torch.no_grad():
            reference = first_tensor(model(**inputs))
    return out, reference


def test_default_low_bit_pipeline_builds_nothing_on_the_default_device(family):
    out, reference = _optimize_under_meta_default(family, "dit", "default", "torch-int8")
    assert out.device.type == "cpu" and torch.isfinite(out).all()
    assert (out - reference).pow(2).mean() <= 0.1 * reference.pow(2).mean()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["unet2dcond", "unet2d", "dit", "pixart", "sd3", "flux"])
@pytest.mark.parametrize("passes, target", [(["cache"], "torch"), (["prune"], "torch"), (["moe"], "torch"),
                                            (["quant"], "torch-int8")])
def test_each_pass_builds_nothing_on_the_default_device(family, name, passes, target):
    if name == "unet2d" and passes == ["moe"]:
        pytest.skip("UNet2DModel has no transformer FFN for moe")
    out, reference = _optimize_under_meta_default(family, name, passes, target)
    assert out.device.type == "cpu" and torch.isfinite(out).all()


def test_example_inputs_follow_the_model_and_not_the_default_device(family):
    from diffc.ir.examples import example_inputs

    model, _ = family("flux")
    with default_device("meta"):
        inputs = example_inputs(model)
    assert {value.device.type for value in inputs.values() if isinstance(value, torch.Tensor)} == {"cpu"}
    assert torch.equal(inputs["hidden_states"], example_inputs(model)["hidden_states"])


@pytest.mark.gpu
@pytest.mark.parametrize("target", ["torch", "torch-int8"])
def test_optimize_runs_on_a_model_on_cuda(family, target):
    model, inputs = family("dit")
    model = copy.deepcopy(model).to("cuda")  # the fixture's model is shared
    inputs = {key: value.to("cuda") if isinstance(value, torch.Tensor) else value for key, value in inputs.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = diffc.optimize(model, target=target)
    out = first_tensor(fast(**inputs))
    with torch.no_grad():
        reference = first_tensor(model(**inputs))
    assert out.device.type == "cuda" and torch.isfinite(out).all()
    assert (out.float() - reference.float()).pow(2).mean() <= 0.1 * reference.float().pow(2).mean()
    assert fast.compile_options == {"compile": True}, "segments on CUDA are compiled unless compile=False"


def test_segments_run_eagerly_on_the_cpu_unless_compile_is_asked_for(family):
    model, inputs = family("dit")
    assert diffc.optimize(model, passes=[], example_inputs=inputs).compile_options == {"compile": False}


def test_cuda_graphs_need_a_cuda_device_and_compiled_segments(family):
    from diffc.errors import TargetError

    model, inputs = family("dit")
    with pytest.raises(TargetError, match=r"cuda_graphs=True replays compiled segments on a CUDA GPU; it needs "
                                          r"device='cuda' and compile left on \(got device cpu, compile=False\)"):
        diffc.optimize(model, passes=[], example_inputs=inputs, cuda_graphs=True)


@pytest.mark.gpu
def test_cuda_graphs_keep_cached_state_and_past_outputs_valid(family):
    """A cached plan with forecasts, replayed through CUDA graphs over a loop, computes what the
    compiled plan without graphs computes, and an output returned at one step still holds its values
    after later steps (a multistep sampler keeps it): the graphs' memory is reused by each replay."""
    model, inputs = family("dit")
    model = copy.deepcopy(model).to("cuda")
    inputs = {key: value.to("cuda") if isinstance(value, torch.Tensor) else value for key, value in inputs.items()}
    passes = [{"pass": "cache", "schedule": "uniform", "interval": 2, "forecast": True, "min_psnr": None}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = diffc.optimize(model, passes=passes, example_inputs=inputs, target="torch-fp32")
        graphed = diffc.optimize(model, passes=passes, example_inputs=inputs, target="torch-fp32", cuda_graphs=True)
    assert graphed.compile_options == {"compile": True, "cuda_graphs": True}
    outputs = {}
    for name, fast in (("plain", plain), ("graphed", graphed)):
        fast.begin_loop(6)
        kept = []
        with torch.no_grad():
            for step in range(6):
                timestep = torch.full((2,), 900 - 150 * step, device="cuda")
                kept.append(first_tensor(fast(**{**inputs, "timestep": timestep})))
        outputs[name] = torch.stack(kept)
    assert torch.allclose(outputs["graphed"], outputs["plain"], rtol=1e-4, atol=1e-4)
