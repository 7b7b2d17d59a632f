"""Models loaded in fp16 or bf16 (as pipelines are): capture gives an fp32 graph and records the
source dtype, passes measure in fp32, a target without a precision compiles in the model's own,
and outputs go back in it."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import diffc
from diffc.ir import capture, lint
from tiny_families import first_tensor


def _half(family, name: str, dtype: torch.dtype) -> tuple[torch.nn.Module, dict]:
    model, inputs = family(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # diffusers asks for torch_dtype in from_pretrained instead of .to()
        model = copy.deepcopy(model).to(dtype)  # the fixture's model is shared
    cast = {key: value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() else value
            for key, value in inputs.items()}
    return model, cast


def _relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return float((out.float() - reference.float()).pow(2).mean() / reference.float().pow(2).mean())


def test_capture_normalizes_a_bf16_model_to_fp32_and_records_its_dtype(family):
    model, inputs = _half(family, "dit", torch.bfloat16)
    dg = capture(model, example_inputs=inputs)
    assert dg.signature.source_dtype == "bfloat16"
    assert {t.dtype for t in dg.weights().values() if t.is_floating_point()} == {torch.float32}
    named = {value for node in dg.graph.nodes for value in (*node.args, *node.kwargs.values())
             if isinstance(value, torch.dtype)}
    assert not named & {torch.float16, torch.bfloat16}
    assert {spec.dtype for spec in dg.signature.inputs if spec.role != "timestep"} <= {"float32", "int64"}
    assert all(p.dtype == torch.bfloat16 for p in model.parameters()), "the user's model was changed"
    assert not lint(dg)
    flat = [inputs[spec.name].float() if inputs[spec.name].is_floating_point() else inputs[spec.name]
            for spec in dg.signature.inputs]
    with torch.no_grad():
        assert _relative_error(dg(*flat)[0], first_tensor(model(**inputs))) < 1e-3


@pytest.mark.parametrize("name, dtype, precision", [
    ("dit", torch.bfloat16, "bf16"), pytest.param("unet2dcond", torch.float16, "fp16", marks=pytest.mark.slow)])
def test_a_target_without_precision_compiles_in_the_models_dtype(family, name, dtype, precision):
    model, inputs = _half(family, name, dtype)
    fast = diffc.optimize(model, passes=[], example_inputs=inputs)
    assert fast.target == f"torch-{precision}"
    out = first_tensor(fast(**inputs))
    with torch.no_grad():
        reference = first_tensor(model(**inputs))
    assert out.dtype == dtype
    assert _relative_error(out, reference) < 1e-2
    explicit = diffc.optimize(model, target="torch-fp32", passes=[], example_inputs=inputs)
    assert explicit.target == "torch-fp32" and first_tensor(explicit(**inputs)).dtype == dtype


@pytest.mark.parametrize("name, passes, target", [
    ("dit", ["cache"], "torch"),
    pytest.param("unet2dcond", ["moe"], "torch", marks=pytest.mark.slow),
    pytest.param("pixart", ["prune"], "torch", marks=pytest.mark.slow),
    pytest.param("sd3", ["quant"], "torch-int8", marks=pytest.mark.slow)])
def test_passes_run_on_half_precision_models(family, name, passes, target):
    model, inputs = _half(family, name, torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = diffc.optimize(model, target=target, passes=passes, example_inputs=inputs)
    out = first_tensor(fast(**inputs))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert fast.plan.graph.applied[0]["pass"] == passes[0]


def test_the_source_dtype_survives_save_and_load(family, tmp_path):
    model, inputs = _half(family, "dit", torch.bfloat16)
    fast = diffc.optimize(model, passes=[], example_inputs=inputs)
    loaded = diffc.load(fast.save(tmp_path / "artifact"))
    assert loaded.plan.graph.signature.source_dtype == "bfloat16"
    assert torch.equal(first_tensor(loaded(**inputs)), first_tensor(fast(**inputs)))
