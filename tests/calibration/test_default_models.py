"""Calibration on the embedded default models: statistics equal a brute-force recomputation and
activation ranges differ between early (noisy) and late timestep groups."""
import pytest
import torch

import diffc.models as dm
from diffc.calibration import collect, compute_statistics
from diffc.calibration.statistics import Observer
from diffc.ir import capture

STEPS = 6


@pytest.mark.parametrize("name", ["digits-unet", "digits-dit"])
def test_statistics_match_brute_force_and_ranges_move_with_time(name, tmp_path):
    pipe = dm.load(name)
    pipe.set_progress_bar_config(disable=True)
    cal = collect(pipe, conditions=[2, 8], num_steps=STEPS, out=tmp_path / "set", progress=False)
    denoiser = pipe.unet if name == "digits-unet" else pipe.transformer
    dg = capture(denoiser)
    stats = compute_statistics(cal, dg, groups=2, progress=False, cache=False)
    linears = [n.name for n in dg.graph.nodes if n.target == torch.ops.aten.linear.default]
    watched = [linears[0], linears[-1]]
    values = {(node, group): [] for node in watched for group in (0, 1)}
    for record in cal.records():
        seen = {}
        with torch.no_grad():
            Observer(dg.module, set(watched), seen.__setitem__).run(*[record.inputs[s.name] for s in dg.signature.inputs])
        for node in watched:
            values[(node, record.step * 2 // STEPS)].append(seen[node].double().flatten())
    for (node, group), chunks in values.items():
        brute = torch.cat(chunks)
        s = stats.node(node, group)
        assert s.count == brute.numel()
        assert (s.minimum, s.maximum) == pytest.approx((brute.min().item(), brute.max().item()), rel=1e-6)
        assert s.mean == pytest.approx(brute.mean().item(), rel=1e-4, abs=1e-6)
        assert s.std == pytest.approx(brute.std(unbiased=False).item(), rel=1e-4)
    early, late = stats.node(watched[-1], 0), stats.node(watched[-1], 1)
    assert early.absmax != late.absmax and early.std != pytest.approx(late.std, rel=1e-3)
