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


def test_shapes_survive_the_round_trip(family_name, captured):
    dg = captured(family_name)
    graph = graph_from_json(json.loads(json.dumps(graph_to_json(dg.graph))))
    reloaded = {node.name: node.meta.get("tensor_meta") for node in graph.nodes}
    compared = 0
    for node in dg.graph.nodes:
        meta = node.meta.get("tensor_meta")
        if hasattr(meta, "shape"):
            assert tuple(reloaded[node.name].shape) == tuple(meta.shape), node.name
            assert reloaded[node.name].dtype == meta.dtype, node.name
            compared += 1
    assert compared > 10
