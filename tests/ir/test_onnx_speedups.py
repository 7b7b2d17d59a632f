"""The FX rewrites export_onnx applies for ONNX Runtime's speed: what the graph looks like after each, the same
values as before (in torch and through ONNX Runtime, at shapes other than the traced ones), and the graphs
they leave alone."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from diffc.ir import onnx_export
from diffc.ir.onnx_export import export_onnx
from diffc.ir.onnx_speedups import faster_for_onnx_runtime

ort = pytest.importorskip("onnxruntime")
ATEN = torch.ops.aten


def _rotate_pairs(x):
    real, imaginary = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    return torch.stack([-imaginary, real], dim=-1).flatten(3)


def _rotate_halves(x):
    real, imaginary = x.reshape(*x.shape[:-1], 2, -1).unbind(-2)
    return torch.cat([-imaginary, real], dim=-1)


class _RotaryAttention(torch.nn.Module):
    """A FLUX-style attention: per-head RMS norms, rotary embedding, SDPA whose output is viewed
    transposed (Wan's form), an additive mask when given."""

    def __init__(self, rotate=_rotate_pairs, heads: int = 2, head_dim: int = 8):
        super().__init__()
        self.rotate, self.heads, self.head_dim = rotate, heads, head_dim
        width = heads * head_dim
        self.to_qkv = torch.nn.Linear(width, 3 * width)
        self.norm_q = torch.nn.RMSNorm(head_dim, eps=1e-6)
        self.norm_k = torch.nn.RMSNorm(head_dim, eps=1e-6)
        with torch.no_grad():
            self.norm_q.weight.uniform_(0.5, 1.5)
            self.norm_k.weight.uniform_(0.5, 1.5)

    def forward(self, x, cos, sin, mask=None):
        batch, tokens, _ = x.shape
        q, k, v = self.to_qkv(x).unflatten(-1, (3, self.heads, self.head_dim)).unbind(2)
        q, k = self.norm_q(q), self.norm_k(k)
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
        q = q * cos + self.rotate(q) * sin
        k = k * cos + self.rotate(k) * sin
        out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                               v.transpose(1, 2), attn_mask=mask)
        return out.transpose(1, 2).reshape(batch, tokens, -1)


def _inputs(batch: int, tokens: int, head_dim: int = 8, seed: int = 0, mask: bool = False):
    generator = torch.Generator().manual_seed(seed)
    angles = torch.randn(tokens, head_dim, generator=generator)
    values = [torch.randn(batch, tokens, 16, generator=generator), angles.cos(), angles.sin()]
    if mask:
        values.append(torch.randn(batch, 1, 1, tokens, generator=generator))
    return values


def _captured(model: torch.nn.Module, inputs, dynamic: bool = True) -> torch.fx.GraphModule:
    tokens = torch.export.Dim("tokens", min=2, max=64)
    shapes = [{0: torch.export.Dim("batch", min=1, max=64), 1: tokens}, {0: tokens}, {0: tokens}]
    if len(inputs) == 4:
        shapes.append({0: shapes[0][0], 3: tokens})
    program = torch.export.export(model.eval(), tuple(inputs), dynamic_shapes=shapes if dynamic else None)
    return program.run_decompositions({}).module()


def _targets(module: torch.fx.GraphModule) -> list:
    return [n.target for n in module.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("rotate", [_rotate_pairs, _rotate_halves], ids=["pairs", "halves"])
def test_attention_rotations_and_norms_are_rewritten_and_compute_the_same(rotate):
    torch.manual_seed(0)
    model = _RotaryAttention(rotate)
    module = _captured(model, _inputs(2, 6))
    rewritten = faster_for_onnx_runtime(module)
    before, after = _targets(module), _targets(rewritten)
    assert ATEN.scaled_dot_product_attention.default in before and ATEN.rms_norm.default in before
    for gone in (ATEN.scaled_dot_product_attention.default, ATEN.rms_norm.default, ATEN.neg.default):
        assert gone not in after
    assert after.count(ATEN.unbind.int) == before.count(ATEN.unbind.int) - 2  # q, k, v's split stays
    assert after.count(ATEN.matmul.default) == 2 + 2  # scores and weighted values; one rotation each for q, k
    assert after.count(ATEN.expand.default) >= 4  # cos and sin widened for q and k
    rotations = [name for name, _ in rewritten.named_buffers() if name.startswith("_diffc_rotation_")]
    assert len(rotations) == 1
    with torch.no_grad():
        for batch, tokens in ((2, 6), (3, 11)):
            values = _inputs(batch, tokens, seed=batch)
            torch.testing.assert_close(rewritten(*values), model(*values), rtol=1e-5, atol=1e-6)
    assert not [name for name, _ in module.named_buffers() if name.startswith("_diffc_rotation_")]


def test_exported_rewrites_run_in_onnx_runtime_at_other_shapes(tmp_path):
    torch.manual_seed(1)
    model = _RotaryAttention()
    example = _inputs(2, 6, mask=True)
    module = _captured(model, example)
    dims = [{0: "batch", 1: "tokens"}, {0: "tokens"}, {0: "tokens"}, {0: "batch", 3: "tokens"}]
    path = export_onnx(module, example, tmp_path / "m.onnx", ["x", "cos", "sin", "mask"], ["y"], dims)
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    assert "Neg" not in ops and "Split" not in ops and "Expand" in ops
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch, tokens in ((2, 6), (5, 13)):
        values = _inputs(batch, tokens, seed=tokens, mask=True)
        got = session.run(None, {name: v.numpy() for name, v in zip(("x", "cos", "sin", "mask"), values)})[0]
        with torch.no_grad():
            np.testing.assert_allclose(got, model(*values).numpy(), rtol=1e-5, atol=1e-5)


def test_attention_it_cannot_write_out_is_left_as_it_is():
    class Masked(torch.nn.Module):
        def forward(self, q, k, v, mask):
            causal = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            return causal + torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    q, k, v = (torch.randn(2, 2, 5, 8) for _ in range(3))
    mask = torch.rand(2, 1, 5, 5) > 0.3
    module = torch.export.export(Masked(), (q, k, v, mask)).run_decompositions({}).module()
    assert faster_for_onnx_runtime(module) is module


def test_broadcasts_already_in_long_spans_or_per_batch_are_not_widened():
    class Modulated(torch.nn.Module):
        def forward(self, x, shift, bias, gain):
            # adaLN's per-batch rows, a bias over 512 channels, a scalar-like gain
            return (x * (1 + shift[:, None]) + bias) * gain

    values = (torch.randn(4, 3, 512), torch.randn(4, 512), torch.randn(512), torch.randn(1, 1, 1))
    module = torch.export.export(Modulated(), values).run_decompositions({}).module()
    assert faster_for_onnx_runtime(module) is module


def test_a_batch_of_one_is_not_widened():
    class HeadScale(torch.nn.Module):
        def forward(self, x, weight):
            return x * weight

    module = torch.export.export(HeadScale(), (torch.randn(1, 5, 2, 8), torch.randn(8))).run_decompositions(
        {}).module()
    assert faster_for_onnx_runtime(module) is module
    module = torch.export.export(HeadScale(), (torch.randn(3, 5, 2, 8), torch.randn(8))).run_decompositions(
        {}).module()
    rewritten = faster_for_onnx_runtime(module)
    assert ATEN.expand.default in _targets(rewritten)
    values = (torch.randn(3, 5, 2, 8), torch.randn(8))
    assert torch.equal(rewritten(*values), values[0] * values[1])


def test_half_precision_rms_norms_stay_as_they_are():
    norm = torch.nn.RMSNorm(8, eps=1e-6).to(torch.bfloat16)
    module = torch.export.export(norm, (torch.randn(2, 4, 8, dtype=torch.bfloat16),)).run_decompositions(
        {}).module()
    assert ATEN.rms_norm.default in _targets(faster_for_onnx_runtime(module))


def test_group_norms_become_instance_norms_that_compute_the_same(tmp_path):
    torch.manual_seed(2)
    norm = torch.nn.GroupNorm(4, 16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    example = torch.randn(2, 16, 5, 6)
    batch = torch.export.Dim("batch", min=1, max=64)
    module = torch.export.export(norm.eval(), (example,), dynamic_shapes=({0: batch},)).run_decompositions(
        {}).module()
    rewritten = faster_for_onnx_runtime(module)
    assert ATEN.group_norm.default not in _targets(rewritten)
    assert ATEN.instance_norm.default in _targets(rewritten)
    other = torch.randn(3, 16, 5, 6)
    with torch.no_grad():
        torch.testing.assert_close(rewritten(other), norm(other), rtol=1e-5, atol=1e-5)
    path = export_onnx(module, [example], tmp_path / "m.onnx", ["x"], ["y"], [{0: "batch"}])
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    assert "InstanceNormalization" in ops and "GroupNormalization" not in ops
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        np.testing.assert_allclose(session.run(None, {"x": other.numpy()})[0], norm(other).numpy(), atol=1e-5)


def test_a_model_the_rewrites_leave_unexportable_exports_without_them(tmp_path, monkeypatch):
    class Unexportable(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("a rewrite that broke the graph")

    class HeadScale(torch.nn.Module):
        def forward(self, x, weight):
            return x * weight

    monkeypatch.setattr(onnx_export, "faster_for_onnx_runtime", lambda module: Unexportable())
    values = (torch.randn(3, 5, 2, 8), torch.randn(8))
    module = torch.export.export(HeadScale(), values).run_decompositions({}).module()
    path = export_onnx(module, values, tmp_path / "m.onnx", ["x", "weight"], ["y"], [{}, {}])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": values[0].numpy(), "weight": values[1].numpy()})[0]
    np.testing.assert_allclose(got, (values[0] * values[1]).numpy(), rtol=1e-6)
