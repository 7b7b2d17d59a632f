import pytest
import torch

import diffc
from diffc.errors import CaptureError, LintError
from diffc.ir import LATENT, TIMESTEP, capture, lint
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
