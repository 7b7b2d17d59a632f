"""Every segment of a plan traces into one graph: torch.compile (the default on CUDA) gets no graph
break, so no segment syncs with the host (an .item(), a .tolist() or a data-dependent branch would
break the graph) and each compiles whole."""
from __future__ import annotations

import warnings

import pytest
import torch

import diffc
from tiny_families import first_tensor

CACHED = [{"pass": "cache", "schedule": "uniform", "interval": 2, "forecast": True, "min_psnr": None}]


@pytest.mark.parametrize("name", ["dit", pytest.param("unet2dcond", marks=pytest.mark.slow),
                                  pytest.param("flux", marks=pytest.mark.slow)])
def test_every_segment_traces_without_a_graph_break(family, name):
    model, inputs = family(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = diffc.optimize(model, passes=CACHED, example_inputs=inputs)
    plan = fast.plan
    assert len(plan.segments) > 1, "the cache pass should have split the graph"
    torch._dynamo.reset()
    traced = {segment: torch.compile(plan.segments[segment].module, fullgraph=True, backend="eager", dynamic=True)
              for segment in plan.segments}
    flat = dict(zip([spec.name for spec in plan.graph.signature.inputs], _flat(plan, inputs)))
    with torch.no_grad():
        for variant in plan.variants:
            if plan.lacks_state(variant, {}):
                _, state = plan.run(plan.schedule.default, flat, {})
            else:
                state = {}
            eager, _ = plan.run(variant, flat, dict(state))
            compiled, _ = plan.run(variant, flat, dict(state), traced)
            assert torch.equal(first_tensor(compiled), first_tensor(eager)), variant


def _flat(plan, inputs):
    from diffc.ir.probe import tensor_at

    return [tensor_at(inputs, spec.path) for spec in plan.graph.signature.inputs]
