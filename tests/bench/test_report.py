from diffc.bench.report import markdown_table


def _results(details):
    row = {"pipeline": "quant[size_ratio=1.2;size_relative_to=w4a8]:mixed", "kind": "diffc", "status": "ok",
           "reason": "", "speedup": 0.9, "speedup_spread": [0.8, 1.0], "ms_per_image": 50.0,
           "baseline_ms_per_image": 45.0, "optimize_seconds": 20.0, "peak_memory_mb": 100.0, "artifact_mb": 1.5,
           "psnr": 32.4, "ssim": 0.98, "accuracy": 0.7, "fid": None, "details": details}
    meta = {"model": "m", "device": "cpu", "date": "2026-12-06", "steps": 20, "seeds": [0], "repeats": 3,
            "images": 10, "memory_method": "sampled RSS above start"}
    return {"meta": meta, "rows": {row["pipeline"]: row}}


def test_a_quant_row_notes_its_placement_and_budgeted_size():
    quant = {"layers_quantized": {"int8": 19, "int4": 20, "w4a8": 8, "bf16": 0}, "layers_protected": 13,
             "weight_only_layers": {"int8_weight": 9},
             "size_ratio": 0.4863, "placeable_size_ratio": {"relative_to": "w4a8", "ratio": 1.1987}}
    table = markdown_table(_results({"quant": quant}))
    assert ("layers: 19 int8, 20 int4, 8 w4a8 quantized, 13 kept at full-precision activations (9 of them with int8 "
            "weights); weights 0.49 of fp32; placeable layers 1.20x their w4a8 size") in table
    quant["placeable_size_ratio"] = {"relative_to": "fp32", "ratio": 0.5}
    assert "placeable layers" not in markdown_table(_results({"quant": quant}))
    assert markdown_table(_results({})).splitlines()[-1].endswith("|  |")  # no placement, no note


def _zoo_summary():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[2] / "benchmarks" / "zoo_summary.py"
    spec = importlib.util.spec_from_file_location("zoo_summary", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_zoo_summary_shows_flips_and_a_declined_w4a8_row():
    def row(pipeline, psnr, worst, status="ok", details=None):
        return {"pipeline": pipeline, "kind": "peer" if "torchao" in pipeline else "diffc", "status": status,
                "reason": "", "speedup": 1.2, "psnr": psnr, "worst_psnr": worst, "accuracy": 1.0,
                "details": details or {}}

    summary = _zoo_summary()
    rows = {"baseline": row("baseline", float("inf"), float("inf")),
            "torchao-int8@dynamic": row("torchao-int8@dynamic", 41.6, 35.5),
            "quant": row("quant", 30.4, 17.7),
            summary.W4A8_MIXED: row(summary.W4A8_MIXED, float("inf"), float("inf"), "no-op",
                                    {"declined": ["quant: the final images miss 30.0 dB ..."]})}
    text = "\n".join(summary.int8_lines({"m": {"rows": rows}}) + summary.w4a8_lines({"m": {"rows": rows}}))
    assert "| m | quant | 1.20 | 30.4 | 17.7 | 38.6 | 35.5 | 1.00 (1.00) | **no** | yes |" in text
    assert "| m | - | inf | - | **no** (declined: nothing quantized) |" in text


def test_rows_timed_beside_other_work_are_dropped_to_be_measured_again(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).parents[2] / "benchmarks" / "zoo_bench.py"
    spec = importlib.util.spec_from_file_location("zoo_bench", path)
    zoo_bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(zoo_bench)
    rows = {"baseline": {"speedup_spread": [1.0, 1.0]}, "quiet": {"speedup_spread": [2.0, 2.4]},
            "noisy": {"speedup_spread": [0.1, 2.6]}, "failed": {"speedup_spread": None}}
    results = tmp_path / "m.json"
    results.write_text(json.dumps({"meta": {"model": "m"}, "rows": rows}))
    assert zoo_bench.drop_noisy_rows(results, 1.3) == ["noisy"]
    assert list(json.loads(results.read_text())["rows"]) == ["baseline", "quiet", "failed"]
    assert zoo_bench.drop_noisy_rows(results, 1.3) == []
    assert zoo_bench.drop_noisy_rows(tmp_path / "none.json", 1.3) == []
