import json
import subprocess
import sys
from pathlib import Path

import pytest

from diffc import bench
from diffc.cli import main
from diffc.errors import DiffcError

FAST = ["--steps", "2", "--seeds", "0", "--labels", "0,1", "--repeats", "1"]


def _rows(out: Path, model: str = "digits-dit") -> dict:
    return json.loads((out / f"{model}.json").read_text())["rows"]


@pytest.fixture(scope="module")
def bench_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert main(["bench", "digits-dit", "--pipelines", "baseline,pab,deepcache", *FAST, "--out", str(out)]) == 0
    return out


def test_cli_writes_table_json_and_plot(bench_out):
    for suffix in ("md", "json", "png"):
        assert (bench_out / f"digits-dit.{suffix}").stat().st_size > 0
    table = (bench_out / "digits-dit.md").read_text()
    assert "| baseline |" in table and "| pab |" in table and "| deepcache |" in table


def test_ratios_are_measured_against_the_same_run(bench_out):
    rows = _rows(bench_out)
    assert rows["baseline"]["speedup"] == 1.0 and rows["baseline"]["psnr"] == float("inf")
    peer = rows["pab"]
    assert peer["status"] == "ok", peer["reason"]
    assert peer["speedup"] > 0 and peer["ms_per_image"] > 0 and peer["baseline_ms_per_image"] > 0
    assert peer["speedup"] == pytest.approx(peer["baseline_ms_per_image"] / peer["ms_per_image"])
    assert 0 <= peer["accuracy"] <= 1 and peer["artifact_mb"] > 0


def test_a_peer_that_cannot_run_is_listed_with_its_reason(bench_out):
    row = _rows(bench_out)["deepcache"]
    assert row["status"] == "failed" and "UNet" in row["reason"]
    assert "DeepCache caches UNet" in (bench_out / "digits-dit.md").read_text()


def test_rerun_keeps_finished_rows_and_runs_only_new_ones(bench_out, monkeypatch):
    before = _rows(bench_out)
    ran = []
    original_run = bench.Bench.run

    def recording_run(self, spec):
        ran.append(spec)
        return original_run(self, spec)

    monkeypatch.setattr(bench.Bench, "run", recording_run)
    assert main(["bench", "digits-dit", "--pipelines", "baseline,pab,deepcache,taylorseer", *FAST,
                 "--out", str(bench_out)]) == 0
    after = _rows(bench_out)
    assert ran == ["taylorseer"]
    assert after["pab"] == before["pab"]
    assert list(after) == ["baseline", "pab", "deepcache", "taylorseer"]


def test_unknown_pipeline_names_the_valid_ones(tmp_path, capsys):
    with pytest.raises(DiffcError, match="cache, quant, prune, moe.*fbc"):
        bench.split_pipelines("baseline,turbo")
    with pytest.raises(DiffcError, match="no quant pass"):
        bench.parse_pipeline("cache:int8")
    assert main(["bench", "digits-dit", "--pipelines", "cahce", "--out", str(tmp_path / "x")]) == 2
    assert "unknown pipeline 'cahce'" in capsys.readouterr().err


def test_pipeline_specs_map_to_passes_and_targets():
    assert bench.parse_pipeline("baseline") is None
    assert bench.parse_pipeline("cache+quant") == bench.DiffcPipeline(("cache", "quant"), "torch-int8")
    assert bench.parse_pipeline("quant:int4") == bench.DiffcPipeline(("quant",), "torch-int4")
    assert bench.parse_pipeline("all").passes == bench.ALL_PASSES
    assert bench.split_pipelines("cache,peers")[:2] == ["baseline", "cache"]
    assert set(bench.PEERS) <= set(bench.split_pipelines("peers"))


@pytest.mark.slow
def test_gpu_script_smoke_runs_on_cpu(tmp_path):
    script = Path(__file__).parents[1] / "benchmarks" / "gpu_bench.py"
    done = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(next(tmp_path.rglob("gpu_bench.json")).read_text())
    cases = {row["case"]: row for row in results["rows"]}
    assert {"sd15-unet/bf16", "sd15-unet/cache-50", "flux/torch-int8", "pixart/bf16"} <= set(cases)
    assert all(row["status"] in ("ok", "failed") for row in cases.values())
    assert any(row["status"] == "ok" and row["speedup"] > 0 for row in cases.values())
    assert next(tmp_path.rglob("gpu_bench.md")).is_file() and next(tmp_path.rglob("gpu_bench.png")).is_file()
