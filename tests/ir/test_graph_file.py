"""A graph file: one safetensors file (weights + the graph as metadata) and its hash."""
import pytest
import torch

from diffc.errors import ArtifactError
from diffc.ir.graph_file import load_graph, save_graph
from diffc.ir.serialize import graph_to_json
from diffc.ir.step_plan import CACHED, DELTA, FULL, Region, Schedule, StepPlan


def test_round_trip_gives_the_same_graph_and_outputs(captured, family, tmp_path):
    dg = captured("dit").clone()
    nodes = [n.name for n in dg.graph.nodes if n.op == "call_function"]
    dg.step_plan = StepPlan.build([Region("r", (nodes[-2],), DELTA, {nodes[-2]: nodes[-3]})],
                                  {FULL: [], CACHED: ["r"]}, Schedule(FULL, (FULL, CACHED)), {"pass": "test"})
    dg.applied.append({"pass": "test", "modified": True, "report": {"error": 0.5}})
    path = save_graph(dg, tmp_path / "g" / "graph.safetensors", {"key": [1, 2]})
    assert sorted(p.name for p in path.parent.iterdir()) == ["graph.safetensors", "graph.safetensors.sha256"]
    back, extra = load_graph(path)
    assert extra == {"key": [1, 2]}
    assert graph_to_json(back.graph) == graph_to_json(dg.graph)
    assert back.step_plan == dg.step_plan and back.applied == dg.applied and back.signature == dg.signature
    _, inputs = family("dit")
    flat = [inputs["hidden_states"], inputs["timestep"], inputs["class_labels"]]
    assert torch.equal(back(*flat)[0], dg(*flat)[0])


def test_a_modified_or_half_written_file_is_refused(captured, tmp_path):
    path = save_graph(captured("dit"), tmp_path / "graph.safetensors")
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="does not match its SHA-256"):
        load_graph(path)
    path.with_name(path.name + ".sha256").unlink()
    with pytest.raises(ArtifactError, match="is not a saved graph"):
        load_graph(path)
