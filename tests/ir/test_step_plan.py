"""StepPlan: typed, immutable, checked by lint, saved in the same JSON form step plans always had."""
import dataclasses

import pytest
import torch

from diffc.api import compile_graph
from diffc.errors import LintError
from diffc.ir import capture, lint
from diffc.ir.step_plan import ADAPTIVE, BYPASS, CACHED, DELTA, FULL, Region, Schedule, StepPlan

SAVED = {  # a cache step plan as artifacts hold it
    "regions": [{"name": "blocks", "cuts": ["add_3"], "mode": "delta", "bases": {"add_3": "add_1"}}],
    "variants": {"full": [], "cached": ["blocks"]},
    "schedule": {"default": "full", "steps": ["full", "cached", "cached", "full"], "repeat": False,
                 "timesteps": [999.0, 666.0, 333.0, 0.0]},
    "summary": {"pass": "cache"},
}


def _plan(**changes):
    plan = StepPlan.build([Region("blocks", ("add_3",), DELTA, {"add_3": "add_1"})], {FULL: [], CACHED: ["blocks"]},
                          Schedule(FULL, (FULL, CACHED, CACHED, FULL)), {"pass": "cache"})
    return dataclasses.replace(plan, **changes)


def test_json_round_trip_keeps_the_saved_form():
    plan = StepPlan.from_json(SAVED)
    assert plan.region("blocks").bases == {"add_3": "add_1"} and plan.variants[CACHED] == ("blocks",)
    assert plan.schedule.timesteps == (999.0, 666.0, 333.0, 0.0) and plan.source == "cache"
    assert plan.to_json() == SAVED


def test_compact_schedule_leaves_out_defaults_and_keeps_what_is_set():
    adaptive = {"probe": "x", "threshold": 0.1, "full": FULL, "cached": CACHED, "max_skip": 2}
    schedule = Schedule(FULL, (ADAPTIVE,), True, adaptive, (), True)
    assert schedule.to_compact_json() == {"default": FULL, "steps": [ADAPTIVE], "repeat": True,
                                          "adaptive": adaptive, "forecast": True}
    assert Schedule.from_json(schedule.to_compact_json()) == schedule


def test_a_step_plan_is_immutable():
    plan = _plan()
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.schedule = Schedule(FULL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.regions[0].mode = BYPASS


def test_anchoring_to_the_calibrated_timesteps():
    plan = _plan()
    anchored = plan.anchored([999.0, 666.0, 333.0, 0.0])
    assert anchored.schedule.timesteps == (999.0, 666.0, 333.0, 0.0) and plan.schedule.timesteps == ()
    assert plan.anchored([999.0, 0.0]) is plan  # another loop length: a per-step schedule is not anchored
    assert plan.anchored(None) is plan
    repeated = _plan(schedule=Schedule(FULL, (FULL, CACHED), repeat=True))
    assert repeated.anchored([3.0, 2.0, 1.0]).schedule.timesteps == (3.0, 2.0, 1.0)


@pytest.mark.parametrize("bad, message", [
    (dict(variants={FULL: (), CACHED: ("nowhere",)}), "skips unknown regions"),
    (dict(schedule=Schedule(FULL, (FULL, "other"))), "unknown variant other"),
    (dict(schedule=Schedule(FULL, (ADAPTIVE,), repeat=True)), "no adaptive rule"),
    (dict(schedule=Schedule(FULL, (FULL, CACHED), timesteps=(1.0,))), "anchored to 1 timesteps"),
    (dict(regions=(Region("blocks", ("add_3",), BYPASS),)), "cuts without a base"),
    (dict(regions=(Region("b", ("x",)), Region("b", ("y",)))), "more than once"),
])
def test_inconsistent_plans_are_refused_with_the_reason(bad, message):
    with pytest.raises(LintError, match=message):
        _plan(**bad).check()


def test_an_unknown_region_mode_is_refused():
    with pytest.raises(LintError, match="mode 'skip' is not one of raw, delta, bypass"):
        Region("blocks", ("add_3",), "skip")


def test_lint_checks_the_step_plan_against_the_graph(captured):
    dg = captured("dit").clone()
    nodes = [n.name for n in dg.graph.nodes if n.op == "call_function"]
    dg.step_plan = StepPlan.build([Region("r", (nodes[-2],), DELTA, {nodes[-2]: nodes[-3]})],
                                  {FULL: [], CACHED: ["r"]}, Schedule(FULL, (FULL, CACHED)), {"pass": "test"})
    lint(dg)
    dg.step_plan = _plan(regions=(Region("blocks", ("no_such_cut",), DELTA, {"no_such_cut": nodes[-3]}),))
    with pytest.raises(LintError, match="names nodes that are not in the graph: \\['no_such_cut'\\]"):
        lint(dg)
    dg.step_plan = SAVED
    with pytest.raises(LintError, match="not a StepPlan"):
        lint(dg)


class NormedStream(torch.nn.Module):
    """A block that reads only a norm of its stream, the norm also used after it (as ConsisID's
    first block): a cached residual's base is then no input of the cached region."""

    def __init__(self):
        super().__init__()
        self.norm, self.up, self.down = torch.nn.LayerNorm(8), torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

    def forward(self, hidden_states, timestep):
        stream = hidden_states * timestep[:, None, None]
        normed = self.norm(stream)
        return self.down(torch.relu(self.up(normed))) + stream + normed


def test_a_delta_region_that_does_not_read_its_base_gets_it_handed_on():
    model = NormedStream().eval()
    inputs = {"hidden_states": torch.randn(2, 5, 8), "timestep": torch.ones(2)}
    dg = capture(model, example_inputs=inputs).clone()
    by_target = {n.target: n.name for n in dg.graph.nodes if n.op == "call_function"}
    stream = by_target[torch.ops.aten.mul.Tensor]
    block_out = next(n.name for n in dg.graph.nodes if n.op == "call_function" and n.target == torch.ops.aten.linear.default
                     and "up" not in str(n.meta.get("nn_module_stack", "")) and n.args[0].name.startswith("relu"))
    dg.step_plan = StepPlan.build([Region("block", (block_out,), DELTA, {block_out: stream})],
                                  {FULL: [], CACHED: ["block"]}, Schedule(FULL, (FULL, CACHED)), {"pass": "test"})
    lint(dg)
    fast = compile_graph(dg, "torch", "fp32")
    fast.begin_loop(2)
    with torch.no_grad():
        expected = model(**inputs)
        for _ in range(2):  # the cached step reuses the full step's residual, exact on the same inputs
            torch.testing.assert_close(fast(**inputs)[0], expected, rtol=0, atol=1e-6)
