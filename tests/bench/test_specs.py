"""Bench row specs: diffc pass pipelines with options, peers at a setting, and the sweeps."""
import pytest

from diffc import bench
from diffc.bench.frontier import OURS
from diffc.bench.specs import WARMUP_SWEEP, cache_sweep, parse_pipeline, peer_sweep, split_pipelines
from diffc.errors import DiffcError


def test_pass_options_reach_optimize_as_pass_dicts():
    choice = parse_pipeline("cache[full_fraction=0.5;forecast=true]+quant:int4")
    assert choice.target == "torch-int4" and choice.family == "diffc cache+quant (torch-int4)"
    assert choice.pass_specs() == [{"pass": "cache", "full_fraction": 0.5, "forecast": True}, "quant"]
    assert parse_pipeline("cache").pass_specs() == ["cache"] and parse_pipeline("cache").family == "diffc cache"


def test_a_peer_runs_at_its_documented_default_unless_a_setting_is_named():
    peer = next(iter(bench.PEERS.values()))
    assert parse_pipeline(peer.name).setting == peer.default
    other = peer.settings[-1]
    assert parse_pipeline(f"{peer.name}@{other}").setting == other
    with pytest.raises(DiffcError, match=f"peer '{peer.name}' has no setting 'x'"):
        parse_pipeline(f"{peer.name}@x")


def test_sweeps_expand_and_commas_inside_options_do_not_split():
    specs = split_pipelines("cache-sweep,peers,cache[full_fraction=0.5;forecast=false]")
    assert specs[0] == "baseline"
    assert set(cache_sweep()) <= set(specs) and set(peer_sweep()) <= set(specs)
    assert len(specs) == len(set(specs))
    assert all(p.partition("@")[0] in bench.PEERS for p in peer_sweep())
    shallow = set(cache_sweep(unet=True)) - set(cache_sweep())
    assert shallow and all("recomputed_layers=1" in spec for spec in shallow)
    assert shallow <= set(split_pipelines("cache-sweep", unet=True)) and not shallow & set(specs)
    assert all(parse_pipeline(spec).family in OURS for spec in shallow)  # one diffc frontier
    compiled = [parse_pipeline(spec) for spec in cache_sweep(unet=True) if spec.endswith(":compile")]
    assert compiled and all(choice.compiled and choice.target == "torch" for choice in compiled)
    warm = [parse_pipeline(spec) for spec in cache_sweep() if "warmup=" in spec]
    assert len(warm) == 2 * len(WARMUP_SWEEP) and all(choice.family in OURS for choice in warm)  # eager, compiled
    assert sorted(dict(dict(choice.options)["cache"])["warmup"] for choice in warm) == sorted(
        2 * [warmup for _, warmup in WARMUP_SWEEP])


def test_compile_after_the_colon_runs_the_torch_backends_segments_under_torch_compile():
    assert parse_pipeline("cache:compile") == bench.DiffcPipeline(("cache",), "torch", compiled=True)
    choice = parse_pipeline("cache[full_fraction=0.5]+quant:int8+compile")
    assert (choice.target, choice.compiled) == ("torch-int8", True)
    assert choice.family == "diffc cache+quant (torch-int8) + torch.compile"
    assert not parse_pipeline("cache+quant:int8").compiled
    with pytest.raises(DiffcError, match="torch.compile runs the torch backend's segments, not ort-int8's"):
        parse_pipeline("quant:ort-int8+compile")


@pytest.mark.parametrize("spec, message", [
    ("cahce", "unknown pipeline 'cahce'"),
    ("cache:int8", "no quant pass"),
    ("cache[full_fraction]", "is not key=value"),
    ("cache[full_fraction=0.5", "must close with"),
])
def test_bad_specs_name_the_fix(spec, message):
    with pytest.raises(DiffcError, match=message):
        parse_pipeline(spec)


def test_a_whole_target_after_the_colon_picks_the_backend():
    assert parse_pipeline("quant:ort-int8") == bench.DiffcPipeline(("quant",), "ort-int8")
    assert parse_pipeline("cache+quant:ort-int8").family == "diffc cache+quant (ort-int8)"
    assert parse_pipeline("cache:ort").target == "ort"
    with pytest.raises(DiffcError, match="low-bit target \\(ort-int8\\) but no quant pass"):
        parse_pipeline("cache:ort-int8")
    with pytest.raises(DiffcError, match="unknown target"):
        parse_pipeline("quant:onnx-int8")
