import functools
import warnings

import pytest
import torch
from diffusers import SD3Transformer2DModel

import diffc
from diffc.errors import CaptureError, InputError, LintError
from diffc.ir import LATENT, TIMESTEP, capture, lint
from diffc.ir.examples import example_inputs, latent_channel_dim
from diffc.ir.blocks import ATTENTION, FFN, RESNET, STAGE, TRANSFORMER_BLOCK
from tiny_families import first_tensor


def test_roles_and_dynamic_dims(family_name, captured):
    dg = captured(family_name)
    sig = dg.signature
    assert [s.role for s in sig.inputs].count(LATENT) == 1
    assert sig.timestep is not None and sig.timestep.role == TIMESTEP
    assert sig.latent.shape[0] == "batch"
    assert sig.output_class is not None and sig.output_class.startswith("diffusers.")
    lint(dg)


def test_captured_graph_matches_model_at_other_batch(family_name, family, captured):
    model, inputs = family(family_name)
    dg = captured(family_name)
    for batch in (1, 3):
        call = {}
        for spec in dg.signature.inputs:
            if spec.name == "encoder_attention_mask" and spec.name not in inputs:  # neutral: masks nothing
                value = torch.ones(inputs["encoder_hidden_states"].shape[:2])
            else:
                value = inputs[spec.path[0]] if len(spec.path) == 1 else inputs[spec.path[0]][spec.path[1]]
            if spec.shape and spec.shape[0] == "batch":
                value = torch.cat([value] * 3)[:batch]
            call[spec.path] = value
        kwargs = {}
        for path, value in call.items():
            if len(path) == 1:
                kwargs[path[0]] = value
            else:
                kwargs.setdefault(path[0], {})[path[1]] = value
        for key, value in inputs.items():
            kwargs.setdefault(key, value)
        with torch.no_grad():
            ref = model(**kwargs, return_dict=False)[0]
            out = dg.module(*call.values())[0]
        assert (out - ref).abs().max().item() <= 1e-5


def test_unet_block_table(captured):
    dg = captured("unet2dcond")
    kinds = {b.kind for b in dg.blocks}
    assert {STAGE, RESNET, ATTENTION, TRANSFORMER_BLOCK, FFN} <= kinds
    resnet = dg.block("down_blocks.0.resnets.0")
    assert resnet.num_params > 0 and resnet.flops > 0
    assert resnet.residual is not None and not resnet.residual.in_parent
    assert resnet.identity_input is not None
    ffn = next(b for b in dg.blocks if b.kind == FFN)
    assert ffn.residual is not None and ffn.residual.in_parent
    assert ffn.parent is not None and dg.block(ffn.parent).kind == TRANSFORMER_BLOCK
    total = sum(b.num_params for b in dg.blocks if b.kind == STAGE)
    assert 0 < total <= dg.num_parameters()


def test_transformer_blocks_found(captured):
    for name in ("dit", "pixart", "sd3", "flux"):
        blocks = [b for b in captured(name).blocks if b.kind == TRANSFORMER_BLOCK]
        assert len(blocks) == 2, name
        assert all(b.flops > 0 and b.num_params > 0 for b in blocks)


def test_resolution_is_dynamic_for_unet_and_static_where_baked_in(captured):
    assert captured("unet2dcond").signature.latent.shape[2:] == ("height", "width")
    # DiT's positional embedding is a constant of the captured size: capture must pin it
    assert captured("dit").signature.latent.shape[2:] == (8, 8)


def test_unsupported_model_is_named():
    with pytest.raises(CaptureError, match="Linear.*example_inputs"):
        capture(torch.nn.Linear(4, 4))


class DataDependent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = torch.nn.ModuleDict({"gate": Gate()})

    def forward(self, sample, timestep):
        return self.inner["gate"](sample)


class Gate(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent Python control flow cannot be captured
            return x * 2
        return x


def test_uncapturable_op_names_module():
    with pytest.raises(CaptureError, match=r"inner\.gate \(Gate\)"):
        capture(DataDependent(), example_inputs={"sample": torch.randn(2, 4), "timestep": torch.ones(2)})


def test_unknown_example_input_is_refused(family):
    model, inputs = family("dit")
    with pytest.raises(CaptureError, match="does not take"):
        capture(model, example_inputs={**inputs, "not_an_input": torch.ones(1)})


def test_lint_reports_inconsistencies(captured):
    dg = captured("dit").clone()
    dg.annotations["no_such_node"] = {"precision": "int8"}
    with pytest.raises(LintError, match="no_such_node"):
        lint(dg)


@pytest.mark.parametrize("name", ["dit", "flux"])
def test_batch_one_example_still_gives_a_dynamic_batch(name, family):
    model, inputs = family(name)
    single = {k: v[:1] if isinstance(v, torch.Tensor) and v.dim() >= 1 and k not in ("img_ids", "txt_ids") else v
              for k, v in inputs.items()}
    dg = capture(model, example_inputs=single)
    batch_dims = [spec.shape[0] for spec in dg.signature.inputs if spec.name not in ("img_ids", "txt_ids")
                  and len(spec.shape) >= 1]
    assert batch_dims and all(dim == "batch" for dim in batch_dims), dg.signature.inputs
    fast = diffc.optimize(model, passes=[], example_inputs=single)
    with torch.no_grad():
        for call in (single, inputs):
            assert torch.allclose(first_tensor(fast(**call)), first_tensor(model(**call)), atol=1e-5)


@functools.lru_cache(maxsize=None)
def _sd3_at_its_max_size():
    """A tiny SD3 whose positional embedding covers exactly its latent (sample 8 = 4 patches of 2):
    the model itself refuses any larger latent, so the resolution probe cannot run it."""
    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                  pooled_projection_dim=16, out_channels=4, pos_embed_max_size=4).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = diffc.optimize(model, passes=[])
    return model, fast, [str(w.message) for w in caught if "diffc pins" in str(w.message)]


def test_dim_the_model_refuses_at_the_probe_shape_is_pinned_with_a_warning():
    model, fast, pins = _sd3_at_its_max_size()
    assert len(pins) == 2, pins
    assert "pins height of SD3Transformer2DModel to the example's height=8: at height=16" in pins[0]
    assert "hidden_states=(2, 4, 16, 8)" in pins[0] and "Height (8) cannot be greater than" in pins[0]
    assert "pins width" in pins[1] and "Width (8) cannot be greater than" in pins[1]
    sig = fast.plan.graph.signature
    assert sig.latent.shape == ("batch", 4, 8, 8)
    assert sig.input("encoder_hidden_states").shape == ("batch", "text_len", 16)
    inputs = example_inputs(model)
    with torch.no_grad():
        assert (first_tensor(fast(**inputs)) - first_tensor(model(**inputs))).abs().max().item() <= 1e-5


def test_call_at_another_size_of_a_pinned_dim_names_it():
    model, fast, _ = _sd3_at_its_max_size()
    inputs = {**example_inputs(model), "hidden_states": torch.randn(2, 4, 16, 16)}
    with pytest.raises(InputError, match=r"hidden_states has height=16 .*pinned to 8.*optimize again with example "
                                         r"inputs of that height"):
        fast(**inputs)


class TooLong(Exception):
    pass


class TextLimit(torch.nn.Module):
    """Holds at most 8 text tokens and says so in its own way."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, sample, timestep, encoder_hidden_states):
        if encoder_hidden_states.shape[1] > 8:
            raise TooLong("at most 8 text tokens")
        return sample * timestep[:, None, None, None] + self.proj(encoder_hidden_states).mean(1)[:, :, None, None]


def test_model_raising_at_the_probe_shape_does_not_leak_its_exception():
    inputs = {"sample": torch.randn(2, 4, 8, 8), "timestep": torch.ones(2), "encoder_hidden_states": torch.randn(2, 8, 4)}
    with pytest.warns(UserWarning, match=r"pins text_len of TextLimit to the example's text_len=8: at text_len=16 "
                                         r"\(probe inputs encoder_hidden_states=\(2, 16, 4\)\) the model raises "
                                         r"TooLong: at most 8 text tokens"):
        dg = capture(TextLimit(), example_inputs=inputs)
    assert dg.signature.input("encoder_hidden_states").shape == ("batch", 8, 4)
    assert dg.signature.latent.shape[:3] == ("batch", 4, "height") and isinstance(dg.signature.latent.shape[3], str)


class SquareOnly(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, sample, timestep):
        if sample.shape[2] != sample.shape[3]:
            raise ValueError("square latents only")
        return self.conv(sample) * timestep[:, None, None, None]


def test_dims_that_vary_only_together_stay_symbolic():
    # like diffusers' DiT, which unpatchifies square latents only: probed together, height and width pass
    inputs = {"sample": torch.randn(2, 4, 8, 8), "timestep": torch.ones(2)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dg = capture(SquareOnly(), example_inputs=inputs)
    assert not [str(w.message) for w in caught if "diffc pins" in str(w.message)]
    assert dg.signature.latent.shape == ("batch", 4, "height", "height")
    assert dg.signature.latent.kinds == ("batch", None, "height", "width")


def test_a_call_breaking_a_tie_torch_export_found_names_both_dims():
    model = SquareOnly()
    fast = diffc.optimize(model, passes=[], example_inputs={"sample": torch.randn(2, 4, 8, 8), "timestep": torch.ones(2)})
    square = torch.randn(3, 4, 16, 16)
    with torch.no_grad():
        assert torch.equal(first_tensor(fast(square, torch.ones(3))), model(square, torch.ones(3)))
    with pytest.raises(InputError, match=r"sample has width=16 \(dim 3\) but height=8: the model was captured with its "
                                         r"width tied to its height .* pass inputs with width == height"):
        fast(torch.randn(2, 4, 8, 16), torch.ones(2))


class SquareOnlyOutsideExport(torch.nn.Module):
    """Refuses non-square latents where torch.export cannot see it (as a check skipped while
    exporting), so the graph takes them but the model does not."""

    def forward(self, sample, timestep):
        if not torch.compiler.is_exporting() and sample.shape[2] != sample.shape[3]:
            raise ValueError("square latents only")
        return sample * timestep[:, None, None, None]


def test_non_square_shapes_are_probed_on_their_own():
    inputs = {"sample": torch.randn(2, 4, 8, 8), "timestep": torch.ones(2)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dg = capture(SquareOnlyOutsideExport(), example_inputs=inputs)
    pins = [str(w.message) for w in caught if "diffc pins" in str(w.message)]
    assert len(pins) == 2, pins
    assert "pins height of SquareOnlyOutsideExport to the example's height=8: at height=16 (probe inputs " \
           "sample=(2, 4, 16, 8)) the model raises ValueError: square latents only" in pins[0]
    assert "at width=16 (probe inputs sample=(2, 4, 8, 16))" in pins[1]
    assert dg.signature.latent.shape == ("batch", 4, 8, 8)


def test_model_raising_at_the_example_inputs_is_named():
    with pytest.raises(CaptureError, match=r"SquareOnly raises ValueError: square latents only on the example inputs "
                                           r"\(sample=\(2, 4, 8, 6\), timestep=\(2,\)\); pass example_inputs"):
        capture(SquareOnly(), example_inputs={"sample": torch.randn(2, 4, 8, 6), "timestep": torch.ones(2)})


class StaticOnly(torch.nn.Module):
    """Stands for a model with an op that takes no symbolic sizes."""

    def forward(self, sample, timestep):
        if isinstance(sample.shape[0], torch.SymInt):
            raise NotImplementedError("no symbolic sizes here")
        return sample * timestep[:, None]


def test_model_that_exports_only_with_static_shapes_is_captured_static():
    inputs = {"sample": torch.randn(2, 4), "timestep": torch.ones(2)}
    with pytest.warns(UserWarning, match=r"exporting StaticOnly with batch symbolic failed .*no symbolic sizes here"
                                         r".*captured it with static shapes"):
        dg = capture(StaticOnly(), example_inputs=inputs)
    assert dg.signature.latent.shape == (2, 4)


class _Mixing(torch.nn.Module):
    """Attention under a class name no rule knows."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.qkv, self.out = torch.nn.Linear(width, 3 * width), torch.nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.out(torch.nn.functional.scaled_dot_product_attention(q, k, v))


class _Feed(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.up, self.down = torch.nn.Linear(width, 4 * width), torch.nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.nn.functional.gelu(self.up(x)))


class _Layer(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm, self.mixing, self.feed = torch.nn.LayerNorm(width), _Mixing(width), _Feed(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixing(self.norm(x))
        return x + self.feed(x)


class _InPlaceRotary(torch.nn.Module):
    """Fills its output through views, as several diffusers rotary embeddings do."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        out[..., 0::2] = x[..., 0::2] * 0.6 - x[..., 1::2] * 0.8
        out[..., 1::2] = x[..., 0::2] * 0.8 + x[..., 1::2] * 0.6
        return out


class _UnknownDenoiser(torch.nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.proj_in, self.time = torch.nn.Linear(4, width), torch.nn.Linear(1, width)
        self.rotary = _InPlaceRotary()
        self.layers = torch.nn.ModuleList([_Layer(width) for _ in range(3)])
        self.proj_out = torch.nn.Linear(width, 4)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        x = self.rotary(self.proj_in(hidden_states)) + self.time(timestep[:, None, None] / 1000)
        for layer in self.layers:
            x = layer(x)
        return self.proj_out(x)


def test_blocks_of_a_class_no_name_rule_knows_are_found_by_structure() -> None:
    torch.manual_seed(0)
    model = _UnknownDenoiser().eval()
    graph = capture(model, example_inputs={"hidden_states": torch.randn(2, 8, 4), "timestep": torch.full((2,), 500.0)})
    kinds = {block.name: block.kind for block in graph.blocks}
    assert kinds == {**{f"layers.{i}": "transformer_block" for i in range(3)},
                     **{f"layers.{i}.mixing": "attention" for i in range(3)},
                     **{f"layers.{i}.feed": "ffn" for i in range(3)}}
    assert all(block.residual is not None for block in graph.blocks if block.kind == "transformer_block")


def test_capture_functionalizes_a_model_that_writes_through_views() -> None:
    torch.manual_seed(0)
    model = _UnknownDenoiser().eval()
    inputs = {"hidden_states": torch.randn(2, 8, 4), "timestep": torch.full((2,), 500.0)}
    graph = capture(model, example_inputs=inputs)
    mutating = [n.name for n in graph.graph.nodes if n.op == "call_function"
                and getattr(getattr(n.target, "_schema", None), "is_mutable", False)]
    assert not mutating
    with torch.no_grad():
        assert torch.equal(graph.module(*inputs.values())[0], model(**inputs))


class FramesFirst(torch.nn.Module):
    """Takes (batch, frames, channels, height, width), as CogVideoX and SVD's UNet do."""

    config = {"in_channels": 4}

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, sample, timestep):
        return self.conv(sample.flatten(0, 1)).unflatten(0, sample.shape[:2]) * timestep[:, None, None, None, None]


class ChannelsLast(torch.nn.Module):
    """Takes (batch, frames, height, width, channels), as Kandinsky 5 does."""

    config = {"in_visual_dim": 4}

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, sample, timestep):
        return self.proj(sample) * timestep[:, None, None, None, None]


@pytest.mark.parametrize("model, example, shape", [
    (FramesFirst(), torch.randn(2, 3, 4, 8, 8), ("batch", "frames", 4, "height", "width")),
    (ChannelsLast(), torch.randn(2, 3, 8, 6, 4), ("batch", "frames", "height", "width", 4)),
])
def test_a_video_latent_keeps_its_channels_static_wherever_the_model_takes_them(model, example, shape):
    fast = diffc.optimize(model, passes=[], example_inputs={"sample": example, "timestep": torch.ones(2)})
    assert fast.plan.graph.signature.latent.shape == shape
    longer = torch.randn(*[2 * size if kind in ("frames", "width") else size
                           for size, kind in zip(example.shape, fast.plan.graph.signature.latent.kinds)])
    with torch.no_grad():
        assert torch.allclose(first_tensor(fast(longer, torch.ones(2))), model(longer, torch.ones(2)), atol=1e-6)
    channel_dim = shape.index(4)
    other_channels = torch.randn(*[3 if d == channel_dim else size for d, size in enumerate(example.shape)])
    with pytest.raises(InputError, match=rf"dim {channel_dim} must be 4"):
        fast(other_channels, torch.ones(2))


def test_an_ambiguous_video_layout_keeps_channels_at_dim_one():
    assert latent_channel_dim({"in_channels": 4}, torch.zeros(2, 4, 4, 8, 8)) == 1
    assert latent_channel_dim({"in_channels": 4}, torch.zeros(2, 2, 4, 8, 8)) == 2
    assert latent_channel_dim({}, torch.zeros(2, 2, 4, 8, 8)) == 1
    assert latent_channel_dim(None, torch.zeros(2, 16, 4)) == 2
