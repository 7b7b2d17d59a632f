"""Coverage of diffusers' denoiser classes: the catalog has a tiny config for every class, and one
class of each family group goes through capture and identity (the full table, every class through
capture, identity, the default cache pass and ONNX Runtime, is benchmarks/denoiser_coverage.py
and the slow test below)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffc.bench import coverage
from diffc.models import catalog

ROOT = Path(__file__).resolve().parents[2]
# one class per family group, each also exercising what its family needs of capture: a 1-D UNet,
# 5-D video latents, learned variance, text by cross attention, constant arguments (img_shapes),
# a joint stream split into two outputs, rotary position ids, an in-place rotary embedding
ONE_PER_GROUP = ["UNet1DModel", "UNet3DConditionModel", "DiTTransformer2DModel", "SanaTransformer2DModel",
                 "QwenImageTransformer2DModel", "ChromaTransformer2DModel", "Krea2Transformer2DModel",
                 "ChronoEditTransformer3DModel"]


def test_the_catalog_has_every_denoiser_class_of_the_installed_diffusers() -> None:
    missing = set(catalog.denoiser_classes()) - set(catalog.names()) - set(catalog.UNBUILDABLE)
    assert not missing, f"add a tiny config (or an UNBUILDABLE reason) for {sorted(missing)}"
    assert len(catalog.denoiser_classes()) >= 70


def test_one_per_group_covers_every_family_group() -> None:
    groups = {catalog.get(name).family for name in catalog.names()} - {"other"}
    assert groups == {catalog.get(name).family for name in ONE_PER_GROUP}


@pytest.mark.parametrize("class_name", ONE_PER_GROUP)
def test_capture_reproduces_the_model(class_name: str) -> None:
    row = coverage.check_class(class_name, ("capture", "identity"))
    assert row.checks == {"capture": "ok", "identity": "ok"}, row.errors
    assert row.figures["identity_max_diff"] <= coverage.IDENTITY_TOLERANCE
    assert row.figures["transformer_blocks"] + row.figures["blocks"] > 0


@pytest.mark.slow
def test_the_default_cache_pass_runs_in_a_hand_written_loop_of_a_model_with_in_place_ops() -> None:
    """ChronoEdit's rotary embedding fills a buffer through views: captured as exported, the plan's
    segments lost the writes and the cached loop gave NaN; capture now functionalizes the graph."""
    row = coverage.check_class("ChronoEditTransformer3DModel", ("capture", "cache"))
    assert row.checks == {"capture": "ok", "cache": "ok"}, row.errors
    assert row.figures["cache_full_steps"] < row.figures["cache_num_steps"]
    assert row.figures["cache_held_out_psnr"] >= 35


def test_a_constant_argument_is_checked_at_run_time() -> None:
    """QwenImage takes img_shapes (a list of shape tuples) that the graph holds as a constant: the same
    value or none is accepted, another one is refused with the fix."""
    import diffc
    from diffc.errors import InputError

    entry = catalog.get("QwenImageTransformer2DModel")
    model, inputs = entry.build(), entry.inputs(2)
    fast = diffc.optimize(model, passes=[], example_inputs=inputs)
    with torch.no_grad():
        expected = model(**inputs).sample
        assert torch.equal(fast(**inputs).sample, expected)
        assert torch.equal(fast(**{k: v for k, v in inputs.items() if k != "img_shapes"}).sample, expected)
        with pytest.raises(InputError, match="img_shapes.*constant.*example_inputs"):
            fast(**{**inputs, "img_shapes": [(1, 8, 2), (1, 8, 2)]})


def test_errors_are_told_apart_from_raw_exceptions() -> None:
    from diffc.errors import CaptureError

    assert coverage.describe_error(CaptureError("x")).startswith("diffc CaptureError")
    try:
        [][1]
    except IndexError as exc:
        assert coverage.describe_error(exc).startswith("raw IndexError at ")


@pytest.mark.slow
def test_the_coverage_run_meets_the_issue_counts(tmp_path: Path) -> None:
    """Every class through every check (about an hour on two cores): at least 45 classes pass capture,
    identity and the default cache pass, 30 of them ONNX Runtime, and no failure is a raw exception
    from inside diffusers or torch."""
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "denoiser_coverage.py"), "--out", str(tmp_path)],
                   check=True, cwd=ROOT, capture_output=True)
    rows = json.loads((tmp_path / "coverage.json").read_text())
    cached = [n for n, r in rows.items() if all(r["checks"].get(c) == "ok" for c in ("capture", "identity", "cache"))]
    assert len(cached) >= 45 and sum(rows[n]["checks"].get("ort") == "ok" for n in cached) >= 30
    raw = {n: e for n, r in rows.items() for e in r["errors"].values() if e.startswith("raw ")}
    assert not raw, raw
