"""Property tests: random small UNet and DiT architectures pushed through capture, every registered
pass (an identity config and a random valid one) and every CPU backend.

Checked for each generated model: the captured graph lints and reproduces the model; each pass's
identity config reproduces the outputs exactly; a random config leaves a linted graph whose
compiled model, driven through the calibration trajectories by the runtime, has the error the
pass reported; every CPU backend matches the torch backend; save/load reproduces the outputs.

The default run tries a few derandomized examples per architecture kind; `pytest -m slow` tries
many random ones. A failure prints the config that broke: add it as an `@example` below so it
stays a regression case."""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from diffc import load
from diffc.api import compile_graph
from diffc.backends import BACKENDS
from diffc.calibration import collect, relative_error
from diffc.errors import PassError
from diffc.ir import capture, lint
from diffc.passes import PASSES, PassContext, PassManager
from diffc.runtime.model import OptimizedModel

FAST = settings(max_examples=1, deadline=None, derandomize=True, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# Exporting a UNet to ONNX takes minutes on two cores: the default run checks the explicit UNet
# example on the torch backend; `-m slow` runs random UNets through every backend.
EXPLICIT_ONLY = settings(FAST, phases=[Phase.explicit])
THOROUGH = settings(max_examples=25, deadline=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
CALIBRATION_STEPS = 6


# --- random architectures -------------------------------------------------------------------------
@st.composite
def unet_configs(draw: st.DrawFn) -> dict[str, Any]:
    """UNet2DConditionModel / UNet2DModel: levels, channels, attention placement, conditioning."""
    levels = draw(st.integers(1, 3))
    base = draw(st.sampled_from([8, 16]))
    widths = tuple(base * draw(st.sampled_from([1, 2])) ** min(i, 1) for i in range(levels))
    attention = [draw(st.booleans()) for _ in range(levels)]
    conditioning = draw(st.sampled_from(["text", "text+class", "none", "class"]))
    config: dict[str, Any] = {
        "kind": "unet2dcond" if conditioning.startswith("text") else "unet2d",
        "block_out_channels": widths, "layers_per_block": draw(st.integers(1, 2)),
        "sample_size": draw(st.sampled_from([8, 16])), "in_channels": draw(st.integers(1, 4)),
        "norm_num_groups": 4, "attention": attention, "conditioning": conditioning,
        "head_dim": draw(st.sampled_from([4, 8])),
    }
    if config["kind"] == "unet2dcond":
        config["cross_attention_dim"] = draw(st.sampled_from([8, 12]))
        config["mid_block"] = draw(st.booleans())
    return config


@st.composite
def dit_configs(draw: st.DrawFn) -> dict[str, Any]:
    """DiT (class labels, adaLN) or PixArt (text cross-attention, adaLN-single)."""
    kind = draw(st.sampled_from(["dit", "pixart"]))
    heads, head_dim = draw(st.integers(1, 2)), draw(st.sampled_from([4, 8]))
    in_channels = draw(st.integers(1, 4))
    return {"kind": kind, "num_layers": draw(st.integers(1, 3)), "heads": heads, "head_dim": head_dim,
            "in_channels": in_channels, "learned_sigma": draw(st.booleans()),
            "sample_size": draw(st.sampled_from([4, 8])), "caption_channels": draw(st.sampled_from([6, 10]))}


def build(config: dict[str, Any]) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel, UNet2DConditionModel, UNet2DModel

    torch.manual_seed(0)
    kind, batch = config["kind"], 2
    if kind.startswith("unet"):
        size, channels = config["sample_size"], config["in_channels"]
        down = [("CrossAttnDownBlock2D" if kind == "unet2dcond" else "AttnDownBlock2D") if a else "DownBlock2D"
                for a in config["attention"]]
        up = [d.replace("Down", "Up") for d in reversed(down)]
        common = dict(block_out_channels=config["block_out_channels"], layers_per_block=config["layers_per_block"],
                      sample_size=size, in_channels=channels, out_channels=channels, down_block_types=tuple(down),
                      up_block_types=tuple(up), norm_num_groups=config["norm_num_groups"])
        inputs: dict[str, torch.Tensor] = {"sample": torch.randn(batch, channels, size, size),
                                           "timestep": torch.tensor([10, 10])}
        if "class" in config["conditioning"]:
            common["num_class_embeds"] = 5
            inputs["class_labels"] = torch.tensor([1, 3])
        if kind == "unet2d":
            model: torch.nn.Module = UNet2DModel(attention_head_dim=config["head_dim"], **common)
        else:
            model = UNet2DConditionModel(cross_attention_dim=config["cross_attention_dim"],
                                         attention_head_dim=config["head_dim"],
                                         mid_block_type="UNetMidBlock2DCrossAttn" if config["mid_block"] else None,
                                         **common)
            inputs["encoder_hidden_states"] = torch.randn(batch, 5, config["cross_attention_dim"])
        return model.eval(), inputs
    channels, size = config["in_channels"], config["sample_size"]
    out_channels = channels * 2 if config["learned_sigma"] else channels
    inner = config["heads"] * config["head_dim"]
    latent = torch.randn(batch, channels, size, size)
    if kind == "dit":
        model = DiTTransformer2DModel(num_attention_heads=config["heads"], attention_head_dim=config["head_dim"],
                                      in_channels=channels, out_channels=out_channels, num_layers=config["num_layers"],
                                      sample_size=size, patch_size=2, num_embeds_ada_norm=1000)
        return model.eval(), {"hidden_states": latent, "timestep": torch.tensor([3, 3]),
                              "class_labels": torch.tensor([1, 2])}
    model = PixArtTransformer2DModel(num_attention_heads=config["heads"], attention_head_dim=config["head_dim"],
                                     in_channels=channels, out_channels=out_channels, num_layers=config["num_layers"],
                                     cross_attention_dim=inner, sample_size=size, patch_size=2,
                                     caption_channels=config["caption_channels"], norm_type="ada_norm_single",
                                     use_additional_conditions=False)
    return model.eval(), {"hidden_states": latent, "timestep": torch.tensor([3, 3]),
                          "encoder_hidden_states": torch.randn(batch, 4, config["caption_channels"]),
                          "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}


# --- what each registered pass is tried with ------------------------------------------------------
@dataclass(frozen=True)
class PassCase:
    """How the property tries one registered pass: `identity` options must reproduce the outputs
    exactly (None for a pass that is lossy by nature), `options` draws random valid options for an
    architecture config, and `target` is the target the pass places for and the model is compiled to."""

    identity: dict[str, Any] | None
    options: Callable[[dict[str, Any]], st.SearchStrategy[dict[str, Any]]]
    target: str = "torch-fp32"


def _cache_options(config: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    if config["kind"].startswith("unet"):
        cuts = ["auto", "encoder"] + (["deep"] if len(config["block_out_channels"]) > 1 else [])
    else:
        cuts = ["auto", "blocks", "first_block"] + (["delta_dit"] if config["num_layers"] > 1 else [])
    return st.fixed_dictionaries({
        "cut": st.sampled_from(cuts),
        "schedule": st.sampled_from(["uniform", "nonuniform", "dp", "adaptive"]),
        "interval": st.integers(2, 4),
        "full_fraction": st.sampled_from([0.34, 0.5]),
    })


def _prune_options(config: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({
        "amount": st.sampled_from([0.05, 0.15, 0.3]),
        "target": st.sampled_from(["params", "flops"]),
        "step_groups": st.integers(1, 2),
        "additivity_sets": st.sampled_from([0, 3]),
    })


def _moe_options(config: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({
        "active": st.sampled_from([0.5, 0.75]),
        "experts": st.sampled_from([2, 4]),
        "step_groups": st.integers(1, 2),
        "shared": st.booleans(),
        "allocation": st.sampled_from(["global", "per_ffn"]),
    })


def _quant_options(config: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({
        "formats": st.sampled_from([("int8",), ("bf16", "int8"), ("int8", "int4", "w4a8"), ("fp8", "int8", "int4")]),
        "sensitivity": st.sampled_from(["hessian", "mse"]),
        "samples": st.just(3), "probes": st.just(1), "trajectories": st.just(1),
        "split_shortcut": st.booleans(), "attention": st.booleans(), "smoothquant": st.sampled_from([None, 0.5]),
    })


PASS_CASES: dict[str, PassCase] = {
    "cache": PassCase({"schedule": "uniform", "interval": 1}, _cache_options),
    "prune": PassCase({"amount": 0.0, "additivity_sets": 0}, _prune_options),
    "moe": PassCase({"active": 1.0}, _moe_options),
    "quant": PassCase(None, _quant_options, target="torch-mixed"),
}


def test_every_registered_pass_is_covered() -> None:
    shipped = sorted(name for name, cls in PASSES.items() if cls.__module__.startswith("diffc."))
    assert shipped == sorted(PASS_CASES), "add a PassCase for every registered pass"


# --- the property ---------------------------------------------------------------------------------
def _loop_outputs(fast: Any, inputs: dict[str, Any], timesteps: list[float]) -> list[torch.Tensor]:
    """Runs a short denoising loop (same latent, falling timesteps) and returns every output."""
    outputs = []
    time_name = "timestep"
    with torch.no_grad():
        for t in timesteps:
            call = {**inputs, time_name: torch.full_like(inputs[time_name], t, dtype=torch.float32)}
            result = fast(**call, return_dict=False)
            outputs.append(result[0] if isinstance(result, (tuple, list)) else result)
    return outputs


def _runtime_error_per_step(fast: OptimizedModel, calibration: Any) -> dict[int, float]:
    """Relative output error per step of `fast` called like a denoiser along each calibration
    trajectory (recorded inputs; the model follows the loop and keeps its cross-step state)."""
    signature = fast.plan.graph.signature
    per_step: dict[int, list[float]] = {}
    last_item = None
    for record in calibration.records():
        if record.item != last_item:
            fast.begin_loop(record.num_steps)
            last_item = record.item
        kwargs: dict[str, Any] = {}
        for spec in signature.inputs:
            if len(spec.path) == 1:
                kwargs[spec.path[0]] = record.inputs[spec.name]
            else:
                kwargs.setdefault(spec.path[0], {})[spec.path[1]] = record.inputs[spec.name]
        with torch.no_grad():
            out = fast(**kwargs, return_dict=False)[0].double()
        per_step.setdefault(record.step, []).append(relative_error(out, record.output))
    return {step: sum(v) / len(v) for step, v in sorted(per_step.items())}


@functools.lru_cache(maxsize=4)
def _prepared(config_key: str) -> tuple[torch.nn.Module, dict[str, Any], Any, Any]:
    config = eval(config_key)  # noqa: S307  the key is repr() of a dict of literals made below
    model, inputs = build(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = capture(model)
        calibration = collect(model, num_steps=CALIBRATION_STEPS, progress=False)
    return model, inputs, graph, calibration


@st.composite
def cases(draw: st.DrawFn, architectures: st.SearchStrategy[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """An architecture and, for every registered pass, random valid options for it."""
    config = draw(architectures)
    return config, {name: draw(PASS_CASES[name].options(config)) for name in sorted(PASS_CASES)}


def check_architecture(case: tuple[dict[str, Any], dict[str, Any]], tmp_path_factory: Any,
                       lowered_backends: bool = True) -> None:
    config, pass_options = case
    model, inputs, graph, calibration = _prepared(repr(config))
    lint(graph)
    timesteps = [900.0, 600.0, 300.0, 100.0] if config["kind"].startswith("unet") else [900.0, 500.0, 100.0]
    flat_inputs = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    with torch.no_grad():
        reference = [model(**{**inputs, "timestep": torch.full_like(inputs["timestep"], t, dtype=torch.float32)},
                           return_dict=False)[0] for t in timesteps]

    plain = compile_graph(graph, "torch", "fp32")
    captured_outputs = _loop_outputs(plain, flat_inputs, timesteps)
    for ref, out in zip(reference, captured_outputs):
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)

    for backend, cls in BACKENDS.items():
        if backend == "torch" or not lowered_backends or cls.unavailable_reason("fp32") is not None:
            continue
        lowered = _loop_outputs(compile_graph(graph, backend, "fp32"), flat_inputs, timesteps)
        for ref, out in zip(captured_outputs, lowered):
            torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-4, msg=f"backend {backend} differs")

    for name in sorted(PASS_CASES):
        case = PASS_CASES[name]
        ctx = PassContext(calibration=calibration, target=case.target)
        precision = case.target.partition("-")[2]
        if case.identity is not None:
            exact = _run_unless_refused(name, case.identity, graph, ctx)
            if exact is None:
                continue
            outputs = _loop_outputs(compile_graph(exact, "torch", precision), flat_inputs, timesteps)
            for ref, out in zip(captured_outputs, outputs):
                assert torch.equal(out, ref), f"{name} with {case.identity} is not exact"

        options = pass_options[name]
        rewritten = _run_unless_refused(name, options, graph, ctx)
        if rewritten is None:
            continue
        lint(rewritten)
        fast = compile_graph(rewritten, "torch", precision)
        report = rewritten.applied[-1]["report"]
        outputs = _loop_outputs(fast, flat_inputs, timesteps)
        assert all(torch.isfinite(o).all() for o in outputs), f"{name} {options}: non-finite output"
        _check_reported_error(name, options, report, _runtime_error_per_step(fast, calibration))

        folder = tmp_path_factory.mktemp("artifact")
        fast.reset()
        fast.save(folder / "a")
        reloaded = load(folder / "a")
        fast.reset()
        again = _loop_outputs(fast, flat_inputs, timesteps)
        for out, back in zip(again, _loop_outputs(reloaded, flat_inputs, timesteps)):
            assert torch.equal(out, back), f"{name} {options}: save/load changed the outputs"


# The refusals a pass may give a valid option set, each with the test of the architecture that makes
# it true: the pass needs what the graph lacks. Any other refusal, or one of these on a graph that has
# what the pass needs, fails the property (a pass that refused every architecture would otherwise pass).
def _ffn_count(graph: Any) -> int:
    return sum(block.kind == "ffn" for block in graph.blocks)


def _narrowest_ffn(graph: Any) -> int:
    """The fewest hidden neurons of any FFN: the input width of its widest 2-D weight (the down projection)."""
    from diffc.ir.fxutil import attr_value

    widths = []
    for block in graph.blocks:
        if block.kind == "ffn":
            weights = [attr_value(graph.module, name) for name in block.parameters]
            widths.append(max(w.shape[1] for w in weights if isinstance(w, torch.Tensor) and w.dim() == 2))
    return min(widths, default=0)


def _prunable_units(graph: Any) -> int:
    return sum(block.residual is not None for block in graph.blocks)


EXPECTED_REFUSALS: dict[str, list[tuple[str, Callable[[dict[str, Any], Any], bool]]]] = {
    "moe": [("no FFN of the form", lambda options, graph: _ffn_count(graph) == 0),
            ("cannot be split into", lambda options, graph: 0 < _narrowest_ffn(graph) < options["experts"])],
    "prune": [("has a residual that can be rewired", lambda options, graph: _prunable_units(graph) == 0),
              # the arithmetic is in the message: the units hold less than the amount asks
              ("less than the", lambda options, graph: options["amount"] > 0),
              ("no set of non-nested units removes", lambda options, graph: options["amount"] > 0)],
}


def _run_unless_refused(name: str, options: dict[str, Any], graph: Any, ctx: PassContext) -> Any:
    """The graph after the pass, or None when the pass refuses a valid option set the architecture
    cannot honour (EXPECTED_REFUSALS): the refusal must be one of those, true of this graph, say how
    to fix it, and leave the input graph untouched."""
    try:
        return PassManager([{"pass": name, **options}]).run(graph, ctx)
    except PassError as exc:
        message = str(exc)
        expected = [phrase for phrase, holds in EXPECTED_REFUSALS.get(name, []) if phrase in message]
        assert expected, f"{name} {options} refused an architecture it should handle: {message}"
        assert all(holds(options, graph) for phrase, holds in EXPECTED_REFUSALS[name] if phrase in expected), (
            f"{name} {options} refused with {expected[0]!r}, which this graph does not bear out: {message}")
        assert "; " in message or ", " in message, f"{name} {options}: error without a fix: {message}"
        lint(graph)
        return None


def _check_reported_error(name: str, options: dict[str, Any], report: dict[str, Any],
                          measured: dict[int, float]) -> None:
    """The error a pass reports is what the compiled model does at run time on the same calibration
    calls (the steps the report names, or all of them)."""
    if "relative_error" not in report:
        return
    per_step = report.get("relative_error_per_step")
    steps = sorted(int(s) for s in per_step) if isinstance(per_step, dict) else sorted(measured)
    runtime = sum(measured[s] for s in steps) / len(steps)
    claimed = report["relative_error"]
    assert abs(runtime - claimed) <= 1e-4 + 0.1 * max(claimed, runtime), (
        f"{name} {options}: reported relative error {claimed}, the compiled model gives {runtime} at run time")


@example(case=({"kind": "unet2dcond", "block_out_channels": (8, 16), "layers_per_block": 1, "sample_size": 8,
                "in_channels": 2, "norm_num_groups": 4, "attention": [True, False], "conditioning": "text+class",
                "head_dim": 4, "cross_attention_dim": 8, "mid_block": False},
               {"cache": {"cut": "deep", "schedule": "dp", "interval": 2, "full_fraction": 0.5},
                "prune": {"amount": 0.15, "target": "params", "step_groups": 2, "additivity_sets": 3},
                "moe": {"active": 0.5, "experts": 2, "step_groups": 2, "shared": True, "allocation": "per_ffn"},
                "quant": {"formats": ("int8", "int4", "w4a8"), "sensitivity": "hessian", "samples": 3, "probes": 1,
                          "trajectories": 1}}))
@given(case=cases(unet_configs()))
@EXPLICIT_ONLY
def test_unets(case: tuple[dict[str, Any], dict[str, Any]], tmp_path_factory: Any) -> None:
    check_architecture(case, tmp_path_factory, lowered_backends=False)


@given(case=cases(dit_configs()))
@FAST
def test_random_transformers(case: tuple[dict[str, Any], dict[str, Any]], tmp_path_factory: Any) -> None:
    check_architecture(case, tmp_path_factory)


@pytest.mark.slow
@example(case=({"kind": "unet2dcond", "block_out_channels": (8,), "layers_per_block": 1, "sample_size": 8,
                "in_channels": 1, "norm_num_groups": 4, "attention": [False], "conditioning": "text", "head_dim": 4,
                "cross_attention_dim": 8, "mid_block": False},
               {"cache": {"cut": "auto", "schedule": "uniform", "interval": 2, "full_fraction": 0.34},
                "moe": {"active": 0.5, "experts": 2, "step_groups": 1, "shared": False, "allocation": "global"},
                "prune": {"amount": 0.05, "target": "params", "step_groups": 1, "additivity_sets": 0},
                "quant": {"formats": ("int8",), "sensitivity": "hessian", "samples": 3, "probes": 1,
                          "trajectories": 1, "split_shortcut": False, "attention": False, "smoothquant": None}}))
@example(case=({"kind": "dit", "num_layers": 3, "heads": 2, "head_dim": 4, "in_channels": 1, "learned_sigma": True,
                "sample_size": 4, "caption_channels": 6},
               {"cache": {"cut": "delta_dit", "schedule": "dp", "interval": 2, "full_fraction": 0.5},
                "moe": {"active": 0.75, "experts": 4, "step_groups": 2, "shared": True, "allocation": "global"},
                "prune": {"amount": 0.15, "target": "params", "step_groups": 1, "additivity_sets": 3},
                "quant": {"formats": ("int8", "int4", "w4a8"), "sensitivity": "mse", "samples": 3, "probes": 1,
                          "trajectories": 1, "split_shortcut": False, "attention": True, "smoothquant": 0.5}}))
@given(case=cases(st.one_of(unet_configs(), dit_configs())))
@THOROUGH
def test_many_random_architectures(case: tuple[dict[str, Any], dict[str, Any]], tmp_path_factory: Any) -> None:
    check_architecture(case, tmp_path_factory)
