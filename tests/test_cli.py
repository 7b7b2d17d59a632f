import pytest

from diffc.cli import main


def test_inspect_prints_the_block_table(capsys):
    assert main(["inspect", "digits-unet"]) == 0
    out = capsys.readouterr().out
    assert "block" in out and "down_blocks.0.resnets.0" in out and "MFLOPs" in out


def test_optimize_prints_a_before_after_table_and_writes_outputs(capsys, tmp_path):
    out_dir = tmp_path / "out"
    assert main(["optimize", "--passes", "none", "--steps", "2", "--labels", "0,1", "--rounds", "1",
                 "--out", str(out_dir)]) == 0
    out = capsys.readouterr().out
    for row in ("denoiser ms/step", "parameters", "weights (MB)", "PSNR vs original (dB)", "SSIM", "sample accuracy"):
        assert row in out
    assert "inf" in out  # no passes: the images are identical
    assert (out_dir / "side_by_side.png").is_file() and (out_dir / "model" / "manifest.json").is_file()
    assert not (tmp_path / "out.work").exists()  # the resume folder goes once the artifact is written


@pytest.mark.slow
def test_optimize_compile_runs_the_segments_under_torch_compile_and_the_artifact_keeps_it(capsys, tmp_path):
    import json

    out_dir = tmp_path / "out"
    assert main(["optimize", "digits-dit", "--passes", "none", "--steps", "2", "--labels", "0", "--rounds", "1",
                 "--compile", "--out", str(out_dir)]) == 0
    assert "PSNR vs original (dB)" in capsys.readouterr().out
    manifest = json.loads((out_dir / "model" / "manifest.json").read_text())
    assert manifest["target"]["info"]["compile"] is True


@pytest.mark.parametrize("argv, message", [
    (["optimize", "--target", "nonsense-int3"], "unknown target"),
    (["optimize", "no-such-model"], "neither an embedded model"),
    (["inspect", "no-such-model"], "is not an embedded model"),
])
def test_bad_input_exits_2_with_a_message_and_writes_nothing(capsys, tmp_path, argv, message):
    out_dir = tmp_path / "never"
    code = main([*argv, "--out", str(out_dir)] if argv[0] == "optimize" else argv)
    assert code == 2 and message in capsys.readouterr().err
    assert not out_dir.exists()


def test_a_low_bit_torch_target_on_a_cpu_points_to_ort():
    from diffc.backends import parse_target
    from diffc.cli import cpu_target_advice

    advice = cpu_target_advice(parse_target("torch-int8"), "cpu")
    assert "simulates" in advice and "--target ort-int8" in advice
    assert "needs a GPU" in cpu_target_advice(parse_target("torch-fp8"), "cpu")
    assert cpu_target_advice(parse_target("ort-int8"), "cpu") is None
    assert cpu_target_advice(parse_target("torch"), "cpu") is None
    assert cpu_target_advice(parse_target("torch-int8"), "cuda") is None
