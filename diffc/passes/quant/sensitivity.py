"""Per-layer, per-format sensitivity to quantization.

HAWQ-v2: sensitivity = mean Hessian trace x quantization perturbation, here
    s[l, f] = Tr(H_W)/n_W * ||Q_f(W) - W||^2 + Tr(H_x)/n_x * ||Q_f(x) - x||^2
for layer l's weight W and input activation x, where H is the Hessian of the loss
L = mean (denoiser output - full-precision output)^2 over calibration calls. At the
full-precision point the residual is zero, so H = (2/N) J^T J exactly (N output elements) and
Hutchinson's estimator of each layer's trace needs only vector-Jacobian products:
Tr(J_l^T J_l) = E_u ||J_l^T u||^2 for Rademacher u in output space, one backward pass per probe
for all layers at once.

Beside it, the cheap proxy: the mean squared error of each layer's own output when only that
layer is quantized (same calls). Calls are spread evenly over the trajectory, so every timestep
group weighs the same."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx

from ..._progress import progress as progress_bar
from ...calibration import CalibrationSet
from ...ir import DiffusionGraph
from ...ir.fxutil import attr_value
from ...ir.precision import fake_quantize_activation, fake_quantize_weight, spec_for
from .layers import Layer


@dataclass
class Sensitivity:
    """hessian[l][f] and mse[l][f]: predicted loss increase and layer-output MSE of layer l in
    format f; the traces are per element (Tr / n)."""

    hessian: dict[str, dict[str, float]]
    mse: dict[str, dict[str, float]]
    weight_trace: dict[str, float]
    activation_trace: dict[str, float]
    weight_perturbation: dict[str, dict[str, float]]
    calls: int
    probes: int


def sample_calls(calibration: CalibrationSet, samples: int) -> list[tuple[str, int]]:
    """(item, step) pairs spread evenly over the recorded steps, cycling through trajectories."""
    steps = calibration.steps
    items = [i["id"] for i in calibration.items]
    if not steps or not items:
        raise ValueError("the calibration set holds no recorded calls")
    count = min(samples, len(steps) * len(items))
    picks = np.unique(np.round(np.linspace(0, len(steps) - 1, count)).astype(int)) if count <= len(steps) \
        else np.arange(count) % len(steps)
    return [(items[k % len(items)], steps[int(p)]) for k, p in enumerate(picks)]


class _Instrumented(torch.fx.Interpreter):
    """Runs the graph with each layer's weight as a leaf that needs grad and a zero tensor added
    to its input (its gradient is the gradient wrt the activation); computes the proxy MSEs."""

    def __init__(self, module: torch.fx.GraphModule, layers: dict[str, Layer], weights: dict[str, torch.Tensor],
                 formats: tuple[str, ...], scales: dict[str, dict[str, float]],
                 quantized_weights: dict[str, dict[str, torch.Tensor]]) -> None:
        super().__init__(module)
        self.layers, self.weights, self.formats, self.scales = layers, weights, formats, scales
        self.quantized_weights = quantized_weights
        self.deltas: dict[str, torch.Tensor] = {}
        self.activation_error: dict[str, dict[str, float]] = {}
        self.output_mse: dict[str, dict[str, float]] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        if n.name not in self.layers:
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        x = args[0].detach()
        delta = torch.zeros_like(x, requires_grad=True)
        self.deltas[n.name] = delta
        rest = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args[2:])
        out = n.target(args[0] + delta, self.weights[n.name], *rest, **kwargs)
        reference = out.detach()
        errors, mses = {}, {}
        with torch.no_grad():
            for name in self.formats:
                spec = spec_for(name, self.scales.get(n.name, {}).get(name), None)
                xq = x if spec.activation is None else fake_quantize_activation(x, spec.activation.dtype,
                                                                                spec.activation.scale)
                errors[name] = float((xq - x).double().pow(2).sum())
                quantized = n.target(xq, self.quantized_weights[n.name][name], *rest, **kwargs)
                mses[name] = float((quantized - reference).double().pow(2).mean())
        self.activation_error[n.name], self.output_mse[n.name] = errors, mses
        return out


def measure(dg: DiffusionGraph, layers: list[Layer], formats: tuple[str, ...], scales: dict[str, dict[str, float]],
            calibration: CalibrationSet, samples: int, probes: int, seed: int = 0,
            progress: bool = False) -> Sensitivity:
    by_node = {layer.node: layer for layer in layers}
    originals = {layer.node: attr_value(dg.module, layer.weight).detach().float() for layer in layers}
    weights = {node: w.clone().requires_grad_(True) for node, w in originals.items()}
    quantized: dict[str, dict[str, torch.Tensor]] = {}
    perturbation: dict[str, dict[str, float]] = {}
    for node, w in originals.items():
        quantized[node], perturbation[node] = {}, {}
        for name in formats:
            scheme = spec_for(name, 1.0).weight
            wq = w if scheme is None else fake_quantize_weight(w, scheme)
            quantized[node][name] = wq
            perturbation[node][name] = float((wq - w).double().pow(2).sum())
    generator = torch.Generator().manual_seed(seed)
    weight_trace = {n: 0.0 for n in by_node}
    activation_term = {n: {f: 0.0 for f in formats} for n in by_node}
    activation_trace = {n: 0.0 for n in by_node}
    mse = {n: {f: 0.0 for f in formats} for n in by_node}
    calls = sample_calls(calibration, samples)
    for item, step in progress_bar(calls, progress, "quant sensitivity", "call"):
        record = next(calibration.records(steps={step}, items={item}))
        flat = [record.inputs[spec.name] for spec in dg.signature.inputs]
        runner = _Instrumented(dg.module, by_node, weights, formats, scales, quantized)
        with torch.enable_grad():
            output = runner.run(*flat)[0]
            leaves = [weights[n] for n in by_node] + [runner.deltas[n] for n in by_node]
            squared = torch.zeros(len(leaves), dtype=torch.float64)
            for probe in range(probes):
                u = (torch.randint(0, 2, output.shape, generator=generator) * 2 - 1).to(output.dtype)
                grads = torch.autograd.grad(output, leaves, grad_outputs=u, retain_graph=probe < probes - 1,
                                            allow_unused=True)
                squared += torch.tensor([0.0 if g is None else float(g.double().pow(2).sum()) for g in grads],
                                        dtype=torch.float64)
        # Tr(H) = (2/N) E_u ||J^T u||^2 for the mean-squared output error over N elements
        traces = (2.0 / output.numel()) * squared.numpy() / probes
        for index, node in enumerate(by_node):
            weight_trace[node] += traces[index] / originals[node].numel() / len(calls)
            x_trace = traces[len(by_node) + index] / runner.deltas[node].numel()
            activation_trace[node] += x_trace / len(calls)
            for name in formats:
                activation_term[node][name] += x_trace * runner.activation_error[node][name] / len(calls)
                mse[node][name] += runner.output_mse[node][name] / len(calls)
    hessian = {n: {f: weight_trace[n] * perturbation[n][f] + activation_term[n][f] for f in formats} for n in by_node}
    return Sensitivity(hessian, mse, weight_trace, activation_trace, perturbation, len(calls), probes)

