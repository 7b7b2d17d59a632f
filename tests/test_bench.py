import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from diffc import bench
from diffc.cli import main
from diffc.errors import DiffcError

FAST = ["--steps", "3", "--seeds", "0", "--labels", "0,1", "--repeats", "1"]


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
    per_image = peer["details"]["psnr_per_image"]
    assert len(per_image) == 2 and peer["worst_psnr"] == pytest.approx(min(per_image), abs=0.01)
    assert peer["worst_psnr"] <= peer["psnr"] + 0.01  # the batch's MSE is the images' mean


def test_a_peer_that_does_not_cover_the_model_is_listed_with_its_reason(bench_out):
    row = _rows(bench_out)["deepcache"]
    assert row["status"] == "n/a" and "UNet" in row["reason"]  # DeepCache's own design: UNets only
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
    assert {spec.partition("@")[0] for spec in bench.split_pipelines("peers")[1:]} == set(bench.PEERS)


def test_the_harness_on_a_zoo_model_gives_rows_accuracy_and_the_frontier(tmp_path):
    from diffc.models import zoo

    name = "shapes-unet"
    if name not in zoo.available():
        pytest.skip(f"{name} is not trained in {zoo.default_root()}")
    cached = "cache[schedule=uniform;interval=2]"
    assert main(["bench", name, "--pipelines", f"baseline,{cached},taylorseer@2,fbc", "--steps", "3", "--seeds", "0",
                 "--repeats", "1", "--prompts", "large red circle|small blue cross", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / f"{name}.json").read_text())
    rows = results["rows"]
    assert rows[cached]["status"] == "ok" and rows[cached]["details"]["passes"] == [
        {"pass": "cache", "schedule": "uniform", "interval": 2}]
    assert 0 < rows[cached]["psnr"] < float("inf") and 0 <= rows[cached]["accuracy"] <= 1
    assert rows["taylorseer@2"]["status"] in ("ok", "no-op") and rows["taylorseer@2"]["details"]["family"] == "taylorseer"
    assert rows["fbc"]["status"] == "n/a" and "FirstBlockCache" in rows["fbc"]["reason"]  # transformers only
    assert results["meta"]["prompts"] == ["large red circle", "small blue cross"]
    assert len(results["meta"]["calibration_prompts"]) == 8 and results["meta"]["calibration_seconds"] > 0
    assert set(results["frontier"]["levels"]) == {"30", "35", "40"}
    assert "## Frontier" in (tmp_path / f"{name}.md").read_text()
    summary = _script("zoo_summary").summarize(tmp_path)
    assert f"| {name} | 30 |" in summary and "## int8 defaults against the bar" in summary


def _script(name):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GPU_SCRIPT = Path(__file__).parents[1] / "benchmarks" / "gpu_bench.py"


@pytest.fixture(scope="module")
def gpu_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", GPU_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_bench"] = module  # dataclasses look their module up while the script is executed
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules["gpu_bench"]


def test_gpu_script_guards_each_case_and_keeps_the_budget(gpu_bench):
    runner = gpu_bench.Runner(budget_s=60, reserve_s=0, case_cap_s=1)
    assert runner.case("fine", lambda: {"speedup": 2.0})["status"] == "ok"

    def broken():
        raise ValueError("no kernel for this shape")

    assert runner.case("broken", broken)["reason"] == "ValueError: no kernel for this shape"
    hung = runner.case("hung", lambda: time.sleep(10))
    assert hung["status"] == "failed" and hung["reason"].startswith("CaseTimeout") and hung["case_seconds"] < 5
    spent = gpu_bench.Runner(budget_s=14, reserve_s=10, case_cap_s=60)
    assert spent.case("late", lambda: {"speedup": 2.0})["reason"] == "not started: the run's time budget is spent"
    assert [row["case"] for row in runner.rows] == ["fine", "broken", "hung"]


@pytest.mark.slow
def test_gpu_script_smoke_runs_every_case_on_cpu(tmp_path, gpu_bench):
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(GPU_SCRIPT), "--smoke", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert time.monotonic() - started < gpu_bench.SMOKE.budget_s + 60
    results = json.loads(next(tmp_path.rglob("gpu_bench.json")).read_text())
    cases = {row["case"]: row for row in results["rows"]}
    unet = ["sd15-unet/fp32", "sd15-unet/torch-int8", "sd15-unet/torchao-int8-compile",
            f"sd15-unet/cache-{gpu_bench.SMOKE.cache_steps}"]
    assert {*unet, "pixart/fp32", "pixart/torch-compile", "pixart/diffc-fp32", "flux/fp32", "flux/torch-int8", "flux/torchao-int8-compile",
            "digits-unet/diffc-bench", "digits-dit/diffc-bench"} == set(cases)
    assert all(row["status"] in ("ok", "failed") and "not started" not in row["reason"] for row in cases.values())
    # the UNet's cases go through every code path of the real run: eager, diffc, the torchao peer, the cache loop
    assert all(cases[name]["status"] == "ok" and cases[name]["speedup"] > 0 for name in unet), \
        [cases[name]["reason"] for name in unet]
    assert cases[unet[-1]]["psnr_latents"] > 0
    assert next(tmp_path.rglob("gpu_bench.md")).is_file() and next(tmp_path.rglob("gpu_bench.png")).is_file()
