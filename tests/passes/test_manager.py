from dataclasses import dataclass

import pytest
import torch

from diffc.errors import PassError
from diffc.passes import (PASSES, Pass, PassConfig, PassContext, PassManager, PassResult, build_pipeline,
                          register_pass)


@dataclass(frozen=True)
class ScaleOutput(PassConfig):
    factor: float = 1.0


class ScalePass(Pass):
    """Test pass: multiplies the model output by `factor` (identity at 1.0)."""

    name = "test_scale"
    Config = ScaleOutput

    def run(self, dg, ctx):
        if self.config.factor == 1.0:
            return PassResult(dg, modified=False, report={"factor": 1.0})
        output = next(n for n in dg.graph.nodes if n.op == "output")
        first = output.args[0][0]
        with dg.graph.inserting_before(output):
            scaled = dg.graph.call_function(torch.ops.aten.mul.Tensor, (first, self.config.factor))
        output.args = ((scaled, *output.args[0][1:]),)
        dg.module.recompile()
        return PassResult(dg, modified=True, report={"factor": self.config.factor})


class BreakGraph(Pass):
    name = "test_break"

    def run(self, dg, ctx):
        dg.annotations["ghost"] = {"precision": "int8"}
        return PassResult(dg, modified=True)


class NeedsCalibration(Pass):
    name = "test_needs_calibration"
    requires = ("calibrated",)
    runs_after = ("test_scale",)

    def run(self, dg, ctx):
        return PassResult(dg, modified=False)


class ClaimsFullPrecision(Pass):
    name = "test_bad_ensures"
    ensures = ("full_precision",)

    def run(self, dg, ctx):
        node = next(n for n in dg.graph.nodes if n.op == "call_function")
        dg.annotations[node.name] = {"precision": "int8"}
        return PassResult(dg, modified=True)


for cls in (ScalePass, BreakGraph, NeedsCalibration, ClaimsFullPrecision):
    register_pass(cls)


def _inputs(dg):
    return [torch.randn(s.example_shape) if s.dtype.startswith("float") else torch.ones(s.example_shape, dtype=torch.int64)
            for s in dg.signature.inputs]


def test_pipeline_as_data_runs_and_is_recorded(captured):
    dg = captured("dit")
    out = PassManager([{"pass": "test_scale", "factor": 2.0}]).run(dg)
    x = _inputs(dg)
    with torch.no_grad():
        assert torch.allclose(out.module(*x)[0], 2 * dg.module(*x)[0])
    assert out.applied[-1]["pass"] == "test_scale" and out.applied[-1]["factor"] == 2.0
    assert out.applied[-1]["report"] == {"factor": 2.0} and out.applied[-1]["modified"]
    assert dg.applied == []  # the input graph is untouched
    with torch.no_grad():
        assert torch.equal(dg.module(*x)[0], captured("dit").module(*x)[0])


def test_identity_config_is_exact(captured):
    dg = captured("dit")
    out = PassManager(["test_scale"]).run(dg)
    x = _inputs(dg)
    with torch.no_grad():
        assert torch.equal(out.module(*x)[0], dg.module(*x)[0])


def test_config_is_frozen_and_validated():
    p = ScalePass(factor=3.0)
    with pytest.raises(Exception):
        p.config.factor = 1.0  # type: ignore[misc]
    with pytest.raises(PassError, match="no option nope; its options are: factor"):
        ScalePass(nope=1)


def test_unknown_pass_and_bad_entries():
    with pytest.raises(PassError, match="unknown pass 'nope'.*test_scale"):
        build_pipeline(["nope"])
    with pytest.raises(PassError, match="no 'pass' key"):
        build_pipeline([{"factor": 2.0}])
    with pytest.raises(PassError, match="unknown pipeline"):
        build_pipeline("no-such-preset")
    assert build_pipeline("none") == []


def test_order_is_validated_before_running():
    with pytest.raises(PassError, match="test_needs_calibration must run after test_scale.*"
                                        r"\['test_scale', 'test_needs_calibration'\]"):
        PassManager(["test_needs_calibration", "test_scale"]).validate()


def test_requires_names_pass_and_fix(captured):
    with pytest.raises(PassError, match="pass test_needs_calibration .after test_scale. requires calibrated.*Fix: pass "
                                        "calibration="):
        PassManager(["test_scale", "test_needs_calibration"]).run(captured("dit"))
    PassManager(["test_scale", "test_needs_calibration"]).run(captured("dit"), PassContext(calibration=object()))


def test_lint_failure_names_pass_and_predecessors(captured):
    with pytest.raises(PassError, match=r"pass test_break \(after test_scale\) left an invalid graph(.|\n)*ghost"):
        PassManager(["test_scale", "test_break"]).run(captured("dit"))


def test_ensures_is_checked(captured):
    with pytest.raises(PassError, match="should ensure full_precision"):
        PassManager(["test_bad_ensures"]).run(captured("dit"))


def test_registration_requires_frozen_config():
    @dataclass
    class Mutable:
        x: int = 0

    class Bad(Pass):
        name = "test_bad_config"
        Config = Mutable

        def run(self, dg, ctx):
            return PassResult(dg, False)

    with pytest.raises(PassError, match="frozen"):
        register_pass(Bad)
    assert "test_bad_config" not in PASSES
