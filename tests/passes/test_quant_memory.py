"""Sensitivity estimation's memory: beyond the model, the running gradient sums (bf16, one per
probe) and one layer's temporaries, whatever the number of formats. Measured as the peak resident
set of a fresh process with glibc's mmap threshold fixed, so that freed blocks go back to the
system and the peak is what was live."""
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import resource, sys, tempfile, torch
    from diffc.calibration import record
    from diffc.ir import capture
    from diffc.ir.precision import spec_for
    from diffc.passes.quant.layers import quantizable_layers
    from diffc.passes.quant.sensitivity import measure

    class Wide(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.Linear(1024, 1024) for _ in range(6))

        def forward(self, sample, timestep):
            for layer in self.layers:
                sample = torch.tanh(layer(sample)) + sample
            return (sample,)

    formats = tuple(sys.argv[1].split(","))
    torch.manual_seed(0)
    model = Wide().eval()
    dg = capture(model, example_inputs={"sample": torch.randn(2, 4, 1024), "timestep": torch.ones(2)})
    layers = quantizable_layers(dg, ())
    with tempfile.TemporaryDirectory() as root:
        with record(model, out=root) as recording:
            for _ in range(2):
                x = torch.randn(2, 4, 1024)
                for step in range(6):
                    x = model(x, torch.full((2,), 1.0 - step / 6))[0] * 0.1
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        activations = {layer.node: {f: spec_for(f, 0.05).activation for f in formats} for layer in layers}
        measure(dg, layers, formats, activations, recording.calibration_set, samples=4, probes=4, trajectories=2)
        grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    print(grown / sum(p.numel() * 4 for p in model.parameters()))
""")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings and ru_maxrss in KiB")
@pytest.mark.parametrize("formats", ["int8", "bf16,fp8,int8,int4,w4a8"])
def test_sensitivity_needs_about_three_model_sizes_beyond_the_model(formats):
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", SCRIPT, formats], capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    # four probes' bf16 sums are two model sizes; before, a clone per format and fp32 sums per
    # probe made it 8.4x (int8) and 12.4x (five formats)
    assert float(result.stdout.strip().splitlines()[-1]) < 3.5
