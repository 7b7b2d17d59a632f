import json

import torch

from diffc.ir.serialize import graph_from_json, graph_to_json


def test_graph_json_round_trip_is_exact(family_name, captured):
    dg = captured(family_name)
    data = json.loads(json.dumps(graph_to_json(dg.graph)))
    graph = graph_from_json(data)
    module = torch.fx.GraphModule(dg.weights(), graph)
    inputs = [torch.randn(s.example_shape) if s.dtype.startswith("float") else torch.ones(s.example_shape, dtype=torch.int64)
              for s in dg.signature.inputs]
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(module(*inputs), dg.module(*inputs)))
    assert graph_to_json(graph) == data
