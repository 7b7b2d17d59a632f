"""diffc on complete text-to-image pipelines (tokenizers, text encoders, VAE, denoiser; see
tests/text_pipelines.py): the headline call with no other argument, save_pretrained /
from_pretrained of the pipeline holding the optimized denoiser, errors for what has no default."""
from __future__ import annotations

import functools
import warnings

import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionImg2ImgPipeline

import diffc
import diffc.ir.onnx_export
from diffc.calibration import CalibrationError, collect
from diffc.calibration.prompts import builtin_prompts, default_prompts
from diffc.metrics import psnr
import text_pipelines

# prompts and seeds no calibration chose: the built-in set is not used to judge
HELD_OUT = [(101, "a paper boat drifting on a puddle after the rain"),
            (202, "portrait of an old fisherman mending a net, charcoal drawing")]
slow = pytest.mark.slow


def _attribute(pipe) -> str:
    return "unet" if hasattr(pipe, "unet") else "transformer"


def _held_out_psnr(pipe, fast) -> float:
    attribute = _attribute(pipe)
    original = getattr(pipe, attribute)
    worst = float("inf")
    for seed, prompt in HELD_OUT:
        want = text_pipelines.latents(pipe, prompt, seed)
        setattr(pipe, attribute, fast)
        try:
            got = text_pipelines.latents(pipe, prompt, seed)
        finally:
            setattr(pipe, attribute, original)
        worst = min(worst, psnr(got.numpy(), want.numpy()))
    return worst


@functools.lru_cache(maxsize=None)
def _plain(name: str):
    """The pipeline and its denoiser captured without passes (no calibration): cheap."""
    pipe = text_pipelines.build(name)
    return pipe, diffc.optimize(pipe, passes=[])


# --- the headline call --------------------------------------------------------------------------
@pytest.mark.parametrize("name", [pytest.param(n, marks=slow) for n in text_pipelines.PIPELINES])
def test_optimize_with_no_other_argument_keeps_40_db(name: str) -> None:
    pipe = text_pipelines.build(name)
    fast = diffc.optimize(pipe)
    assert [entry["pass"] for entry in fast.report] == ["cache"]
    assert _held_out_psnr(pipe, fast) >= 40.0


def test_default_calibration_of_a_text_pipeline_runs_the_built_in_prompts(tmp_path) -> None:
    pipe = text_pipelines.build("sd3")
    calibration = collect(pipe, num_steps=2, out=tmp_path, progress=False)
    prompts = default_prompts()
    assert calibration.manifest["settings"]["conditions"] == [repr(p) for p in prompts]
    assert len(set(prompts)) == len(prompts) == 8
    assert all(p in builtin_prompts() for p in prompts)
    # the pipeline's own defaults: its resolution and its guidance (CFG doubles the batch)
    latent = calibration.manifest["meta"]["inputs"]["hidden_states"]
    assert latent == [2, 4, 8, 8]


def test_the_built_in_prompt_set_is_varied() -> None:
    prompts = builtin_prompts()
    assert len(prompts) >= 300 and len(set(prompts)) == len(prompts)
    words = [len(p.split()) for p in prompts]
    assert min(words) <= 3 and max(words) >= 40


def test_prompts_calibrate_the_pipeline_at_its_defaults(monkeypatch) -> None:
    pipe = text_pipelines.build("flux")
    calls = []

    def short_collect(pipe, conditions=None, num_steps=20, **options):
        calls.append((conditions, num_steps))
        return collect(pipe, conditions=conditions, num_steps=3, **options)  # 3 steps: only the plumbing is tested

    monkeypatch.setattr(diffc.api, "collect", short_collect)
    fast = diffc.optimize(pipe, prompts=["a red kite over a beach"], passes=[{"pass": "cache", "refine": 0}])
    assert calls == [(["a red kite over a beach"], 28)]  # FluxPipeline's default step count
    assert fast.report[0]["pass"] == "cache"


def test_prompts_conflict_with_calibration_before_any_work(tmp_path) -> None:
    pipe = text_pipelines.build("flux")
    with pytest.raises(diffc.DiffcError, match="prompts and calibration were given together"):
        diffc.optimize(pipe, prompts=["a cat"], calibration=tmp_path)
    with pytest.raises(diffc.DiffcError, match="list of strings"):
        diffc.optimize(pipe, prompts="a cat")
    with pytest.raises(diffc.DiffcError, match="no pass of .* calibrates"):
        diffc.optimize(pipe, prompts=["a cat"], passes=[])


def test_prompts_for_a_bare_denoiser_name_the_pipeline() -> None:
    pipe = text_pipelines.build("flux")
    with pytest.raises(diffc.DiffcError, match="need the pipeline that encodes them"):
        diffc.optimize(pipe.transformer, prompts=["a cat"])


def test_an_image_conditioned_pipeline_names_the_input_it_needs() -> None:
    pipe = text_pipelines.build("sd")
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    with pytest.raises(CalibrationError, match="'image'.*conditions=\\[\\{'prompt': \\.\\.\\., 'image': \\.\\.\\.\\}"):
        diffc.optimize(img2img)


# --- save_pretrained / from_pretrained -----------------------------------------------------------
@pytest.mark.parametrize("name", ["sd3", "flux", pytest.param("sd", marks=slow), pytest.param("sdxl", marks=slow),
                                  pytest.param("pixart", marks=slow)])
def test_save_pretrained_round_trips_the_optimized_pipeline_exactly(name: str, tmp_path) -> None:
    pipe, fast = _plain(name)
    attribute = _attribute(pipe)
    original = getattr(pipe, attribute)
    setattr(pipe, attribute, fast)
    try:
        fast.reset()
        want = text_pipelines.latents(pipe, "a lighthouse at dusk", 3, steps=4)
        pipe.save_pretrained(tmp_path / "saved")
    finally:
        setattr(pipe, attribute, original)
    assert (tmp_path / "saved" / attribute / "manifest.json").is_file()
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "saved")
    loaded.set_progress_bar_config(disable=True)
    if hasattr(pipe, "default_sample_size"):
        loaded.default_sample_size = pipe.default_sample_size
    assert type(getattr(loaded, attribute)) is diffc.OptimizedModel
    got = text_pipelines.latents(loaded, "a lighthouse at dusk", 3, steps=4)
    # the loaded denoiser is the saved one, bit for bit, in the same (loaded) pipeline; the pipeline's own
    # components round-trip through diffusers and transformers within float rounding
    setattr(loaded, attribute, fast)
    fast.reset()
    assert torch.equal(got, text_pipelines.latents(loaded, "a lighthouse at dusk", 3, steps=4))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_from_pretrained_refuses_a_tampered_component(tmp_path) -> None:
    pipe, fast = _plain("flux")
    original = pipe.transformer
    pipe.transformer = fast
    try:
        pipe.save_pretrained(tmp_path)
    finally:
        pipe.transformer = original
    weights = next((tmp_path / "transformer").rglob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(diffc.ArtifactError):
        DiffusionPipeline.from_pretrained(tmp_path)


def test_saving_the_original_pipeline_after_swapping_back_keeps_the_original_component(tmp_path) -> None:
    pipe, fast = _plain("flux")
    original = pipe.transformer
    pipe.transformer = fast
    pipe.transformer = original
    pipe.save_pretrained(tmp_path)
    assert type(DiffusionPipeline.from_pretrained(tmp_path).transformer) is type(original)


# --- the command line on a saved text pipeline ------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _saved(name: str, folder: str) -> str:
    pipe = text_pipelines.build(name)
    pipe.save_pretrained(folder)
    return folder


def _size_arguments(name: str) -> list[str]:
    # FluxPipeline's default resolution is fixed at 128 latent pixels, not saved with the pipeline
    return ["--height", "8", "--width", "8"] if name == "flux" else []


@pytest.mark.parametrize("name", [pytest.param(n, marks=slow) for n in text_pipelines.PIPELINES])
def test_cli_optimize_prints_the_table_for_a_saved_text_pipeline(name: str, tmp_path, capsys) -> None:
    from diffc.cli import main

    folder = _saved(name, str(tmp_path / "pipe"))
    assert main(["optimize", folder, "--rounds", "1", "--out", str(tmp_path / "out"), *_size_arguments(name)]) == 0
    out = capsys.readouterr().out
    for row in ("denoiser ms/step", "PSNR vs original (dB)", "SSIM vs original", "prompts ["):
        assert row in out
    assert (tmp_path / "out" / "side_by_side.png").is_file()


def test_cli_optimize_a_text_pipeline_with_given_prompts_and_no_passes(tmp_path, capsys) -> None:
    from diffc.cli import main

    folder = _saved("flux", str(tmp_path / "pipe"))
    assert main(["optimize", folder, "--passes", "[]", "--prompts", "a red kite,a blue door", "--steps", "2",
                 "--rounds", "1", *_size_arguments("flux")]) == 0
    out = capsys.readouterr().out
    assert "prompts ['a red kite', 'a blue door']" in out and "inf" in out


@pytest.mark.parametrize("argv, message", [
    (["--labels", "a cat,a dog"], "not class-conditional: give prompts with --prompts"),
    (["--passes", "[{bad json"], "not valid JSON"),
    (["--height", "-8"], "--height must be a positive integer"),
    (["--prompts", " , "], "no prompt in"),
])
def test_cli_bad_arguments_for_a_text_pipeline_end_in_a_message(argv, message, tmp_path, capsys) -> None:
    from diffc.cli import main

    folder = _saved("flux", str(tmp_path / "pipe"))
    assert main(["optimize", folder, "--out", str(tmp_path / "never"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


# --- LoRA through diffusers' own API ----------------------------------------------------------------
UNIFORM_CACHE = [{"pass": "cache", "schedule": "uniform", "interval": 2}]


def _cache_error_with_and_without_lora(name: str, target: str, lora_path,
                                       monkeypatch) -> tuple[float, float, list[str]]:
    """PSNR of the optimized pipeline against the original on a held-out prompt, without LoRA and
    with the same LoRA loaded into both through pipe.load_lora_weights; and the ONNX exports made
    after optimize returned."""
    pipe = text_pipelines.build(name)
    attribute = _attribute(pipe)
    original = getattr(pipe, attribute)
    fast = diffc.optimize(pipe, target=target, passes=UNIFORM_CACHE)
    exports: list[str] = []

    def count_exports() -> None:
        for owner, name in ((torch.onnx, "export"), (diffc.ir.onnx_export, "export_onnx")):
            def counted(*args, _export=getattr(owner, name), _name=name, **kwargs):
                exports.append(_name)
                return _export(*args, **kwargs)

            monkeypatch.setattr(owner, name, counted)
    text_pipelines.lora_file(pipe, lora_path)
    seed, prompt = HELD_OUT[0]

    def run(denoiser) -> torch.Tensor:
        setattr(pipe, attribute, denoiser)
        if isinstance(denoiser, diffc.OptimizedModel):
            denoiser.reset()
        try:
            return text_pipelines.latents(pipe, prompt, seed)
        finally:
            setattr(pipe, attribute, original)

    without = psnr(run(fast).numpy(), run(original).numpy())
    count_exports()  # from here on (an ORT session specialized to these shapes above is not a LoRA's doing)
    pipe.load_lora_weights(lora_path, adapter_name="style")
    want = run(original)
    pipe.unload_lora_weights()
    setattr(pipe, attribute, fast)
    pipe.load_lora_weights(lora_path, adapter_name="style")  # the text-encoder half goes to the text encoder again
    assert fast.lora_adapters == {"style": 1.0}
    with_lora = psnr(run(fast).numpy(), want.numpy())
    return without, with_lora, exports


@pytest.mark.parametrize("name, target", [("flux", "torch"), pytest.param("sd", "torch", marks=slow),
                                          pytest.param("flux", "ort", marks=slow),
                                          pytest.param("sd", "ort", marks=slow)])
def test_load_lora_weights_on_the_optimized_pipeline_matches_the_original_with_it(name, target, tmp_path,
                                                                                   monkeypatch) -> None:
    without, with_lora, exports = _cache_error_with_and_without_lora(name, target, tmp_path / "lora.safetensors",
                                                                     monkeypatch)
    assert with_lora >= without - 1.0, (without, with_lora)
    assert exports == []  # the adapter went into the compiled model in place


def test_diffusers_adapter_calls_on_the_optimized_denoiser(tmp_path) -> None:
    pipe = text_pipelines.build("flux")
    fast = diffc.optimize(pipe, passes=[])
    original = pipe.transformer
    lora = text_pipelines.lora_file(pipe, tmp_path / "lora.safetensors", text_encoder=False)
    seed, prompt = HELD_OUT[1]
    pipe.transformer = fast
    try:
        fast.reset()
        base = text_pipelines.latents(pipe, prompt, seed, steps=3)
        pipe.load_lora_weights(lora, adapter_name="a")
        pipe.load_lora_weights(lora, adapter_name="b")
        assert pipe.get_list_adapters() == {"transformer": ["a", "b"]}
        pipe.set_adapters(["a"], [0.5])
        assert fast.lora_adapters == {"a": 0.5, "b": 0.0}
        half = text_pipelines.latents(pipe, prompt, seed, steps=3)
        pipe.disable_lora()
        assert torch.equal(text_pipelines.latents(pipe, prompt, seed, steps=3), base)
        pipe.enable_lora()
        assert torch.equal(text_pipelines.latents(pipe, prompt, seed, steps=3), half)
        pipe.delete_adapters("b")
        assert fast.lora_adapters == {"a": 0.5}
        # fused, then unloaded: the adapter stays in the weights, as diffusers keeps it
        pipe.fuse_lora(components=["transformer"], lora_scale=2.0)
        fused = text_pipelines.latents(pipe, prompt, seed, steps=3)
        pipe.unload_lora_weights()
        assert fast.lora_adapters == {}
        assert torch.allclose(text_pipelines.latents(pipe, prompt, seed, steps=3), fused, atol=1e-5)
        pipe.load_lora_weights(lora, adapter_name="c")
        with pytest.raises(diffc.InputError, match="per-block adapter weights"):
            fast.set_adapters(["c"], [{"transformer_blocks": 1.0}])
    finally:
        pipe.transformer = original


def test_cli_export_of_a_saved_text_pipeline_writes_a_loadable_folder(tmp_path, capsys) -> None:
    from diffc.cli import main

    folder = _saved("flux", str(tmp_path / "pipe"))
    assert main(["export", folder, "--passes", "none", "--out", str(tmp_path / "deploy")]) == 0
    assert type(diffc.load(tmp_path / "deploy")) is diffc.OptimizedModel
    with pytest.raises(SystemExit) as exit_:  # argparse: export takes no --labels
        main(["export", folder, "--labels", "1", "--out", str(tmp_path / "never")])
    assert exit_.value.code == 2 and "unrecognized arguments: --labels" in capsys.readouterr().err


@slow
def test_int8_with_a_lora_keeps_35_db_or_warns(tmp_path) -> None:
    pipe = text_pipelines.build("flux")
    original = pipe.transformer
    fast = diffc.optimize(pipe, target="torch-int8", passes=["quant"])
    lora = text_pipelines.lora_file(pipe, tmp_path / "lora.safetensors", text_encoder=False)
    seed, prompt = HELD_OUT[0]
    pipe.load_lora_weights(lora)
    want = text_pipelines.latents(pipe, prompt, seed)
    pipe.unload_lora_weights()
    pipe.transformer = fast
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(lora)
        got = text_pipelines.latents(pipe, prompt, seed)
    finally:
        pipe.transformer = original
    warned = any("recalibrate" in str(w.message) for w in caught)
    assert warned or psnr(got.numpy(), want.numpy()) >= 35.0


# --- a scheduler that steps otherwise than calibration saw ------------------------------------------
def test_a_step_setting_calibration_did_not_see_runs_the_loop_in_full_and_says_so() -> None:
    from diffusers import DDIMScheduler

    pipe = text_pipelines.build("sd")
    calibration = collect(pipe, conditions=["a lighthouse"], num_steps=6, progress=False)
    # a random tiny UNet at 6 steps keeps no 30 dB floor; the test is about the sampler watch, so no floor
    fast = diffc.optimize(pipe, calibration=calibration, passes=[{"pass": "cache", "refine": 0, "forecast": False,
                                                                   "max_gap": 2, "min_psnr": None}])
    assert fast.sampler_watch is not None and "cache" in fast.report[0]["pass"]
    seed, prompt = HELD_OUT[0]
    calibrated = pipe.scheduler
    pipe.scheduler = DDIMScheduler.from_config(calibrated.config, clip_sample=True)
    want = text_pipelines.latents(pipe, prompt, seed, steps=6)
    original, pipe.unet = pipe.unet, fast
    try:
        with pytest.warns(UserWarning, match=r"clip_sample=True \(calibrated with False\).*runs every step in full"):
            got = text_pipelines.latents(pipe, prompt, seed, steps=6)
        assert torch.equal(got, want)
        pipe.scheduler = calibrated  # back to what calibration saw: cached again, with nothing to say
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            cached = text_pipelines.latents(pipe, prompt, seed, steps=6)
    finally:
        pipe.unet = original
    assert not torch.equal(cached, text_pipelines.latents(pipe, prompt, seed, steps=6))
