"""Per-layer, per-format sensitivity to quantization.

HAWQ-v2: sensitivity = mean Hessian trace x quantization perturbation, here
    s[l, f] = Tr(H_W)/n_W * ||Q_f(W) - W||^2 + Tr(H_x)/n_x * ||Q_f(x) - x||^2
for layer l's weight W and input activation x, where H is the Hessian of the loss
L = mean (denoiser output - full-precision output)^2 over calibration calls. At the
full-precision point the residual is zero, so H = (2/N) J^T J exactly (N output elements) and
Hutchinson's estimator of each layer's trace needs only vector-Jacobian products:
Tr(J_l^T J_l) = E_u ||J_l^T u||^2 for Rademacher u in output space, one backward pass per probe
for all layers at once.

What reaches the final image is the denoiser's error summed over the steps, and errors of
quantized weights add up coherently from step to step (the same weights see similar inputs)
while activation rounding errors do not. With `accumulate="trajectory"` (the default) the loss
is therefore the error of the mean output over all recorded steps of a trajectory: one probe u
per trajectory, J^T u summed over its steps for the weights, and per step (1/S^2 each, S steps)
for the activations. With `accumulate="step"` each call is its own loss (HAWQ-v2 as published).
Either way every recorded step, hence every timestep group, weighs the same.

Where the identified sampling loop (calibration.sampling_loop) combines guidance branches batched
in one call, the loss is the error of what the loop steps with, the guided combination
sum_m w_m out_m per latent, not of each row: guidance amplifies errors that differ between the
branches (by ~g) and cancels those they share. The probe is then u per latent, spread to its rows
as w_m u (so J^T probe = J_guided^T u), and N counts guided elements.

Beside it, the cheap proxy: the mean squared error of each layer's own output when only that
layer is quantized (same calls)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx

from ..._progress import progress as progress_bar
from ...calibration import CalibrationSet, guidance_rows, sampling_loop
from ...ir import DiffusionGraph
from ...ir.fxutil import attr_value
from ...ir.precision import ActivationQuant, fake_quantize_input, fake_quantize_weight, spec_for
from .layers import Layer

TRAJECTORY, STEP = "trajectory", "step"
ACCUMULATIONS = (TRAJECTORY, STEP)


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
    guided: bool  # the loss was the error of the guided combination the loop steps with


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
    to each quantized input (its gradient is the gradient wrt the activation: the layer's input,
    an attention's query, key and value); computes the proxy MSEs."""

    def __init__(self, module: torch.fx.GraphModule, layers: dict[str, Layer], weights: dict[str, torch.Tensor],
                 formats: tuple[str, ...], activations: dict[str, dict[str, ActivationQuant]],
                 attentions: dict[str, dict[str, tuple[ActivationQuant, ...]]]) -> None:
        super().__init__(module)
        self.layers, self.weights, self.formats, self.activations = layers, weights, formats, activations
        self.attentions = attentions
        self.deltas: dict[str, list[torch.Tensor]] = {}
        self.activation_error: dict[str, dict[str, list[float]]] = {}
        self.output_mse: dict[str, dict[str, float]] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        if n.name in self.attentions:
            return self._attention(n)
        if n.target == torch.ops.aten.copy.default:
            # a functionalized in-place write (Wan's rotary embedding: out[..., 0::2] = x): autograd has
            # no derivative for aten.copy, so its value (src broadcast to dst's shape and dtype) is built
            # from ops that have one
            (destination, source, *_), _ = self.fetch_args_kwargs_from_env(n)
            return source.expand_as(destination).to(destination.dtype)
        if n.name not in self.layers:
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        x = args[0].detach()
        delta = torch.zeros_like(x, requires_grad=True)
        self.deltas[n.name] = [delta]
        rest = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args[2:])
        out = n.target(args[0] + delta, self.weights[n.name], *rest, **kwargs)
        reference = out.detach()
        errors, mses = {}, {}
        with torch.no_grad():
            for name in self.formats:
                activation = self.activations.get(n.name, {}).get(name) or spec_for(name).activation
                xq = x if activation is None else fake_quantize_input(x, activation)
                errors[name] = [float((xq - x).double().pow(2).sum())]
                quantized = n.target(xq, _quantized(self.weights[n.name].detach(), name), *rest, **kwargs)
                mses[name] = float((quantized - reference).double().pow(2).mean())
        self.activation_error[n.name], self.output_mse[n.name] = errors, mses
        return out

    def _attention(self, n: torch.fx.Node) -> Any:
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        operands = [a.detach() for a in args[:3]]
        deltas = [torch.zeros_like(x, requires_grad=True) for x in operands]
        self.deltas[n.name] = deltas
        rest = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args[3:])
        out = n.target(*(a + d for a, d in zip(args[:3], deltas)), *rest, **kwargs)
        reference = out.detach()
        errors, mses = {}, {}
        with torch.no_grad():
            for name in self.formats:
                quantization = self.attentions[n.name].get(name)
                if quantization is None:  # a format without 8-bit activations leaves attention alone
                    errors[name], mses[name] = [0.0] * len(operands), 0.0
                    continue
                quantized = [fake_quantize_input(x, a) for x, a in zip(operands, quantization)]
                errors[name] = [float((q - x).double().pow(2).sum()) for q, x in zip(quantized, operands)]
                mses[name] = float((n.target(*quantized, *rest, **kwargs) - reference).double().pow(2).mean())
        self.activation_error[n.name], self.output_mse[n.name] = errors, mses
        return out


def measure(dg: DiffusionGraph, layers: list[Layer], formats: tuple[str, ...],
            activations: dict[str, dict[str, ActivationQuant]],
            calibration: CalibrationSet, samples: int, probes: int, accumulate: str = TRAJECTORY,
            trajectories: int = 2, seed: int = 0, progress: bool = False,
            attentions: dict[str, dict[str, tuple[ActivationQuant, ...]]] | None = None) -> Sensitivity:
    """Sensitivities from calibration calls: with `accumulate="step"`, `samples` calls spread over
    the trajectory, each its own loss; with "trajectory", every recorded step of `trajectories`
    trajectories, the loss being the error of their mean output (see the module docstring).
    `attentions`: per attention node and format, the quantization of its query, key and value
    (absent for formats that leave attention alone); they have no weight term."""
    attentions = attentions or {}
    by_node = {layer.node: layer for layer in layers}
    # leaves over the model's own storage, quantized copies made per layer when used, gradients
    # summed in bf16 and taken off each leaf as soon as its backward is done: the memory beyond
    # the model is the running sums (probes x half its size), not copies per format and probe
    weights = {layer.node: attr_value(dg.module, layer.weight).detach().float().requires_grad_(True)
               for layer in layers}
    perturbation = {node: {name: float((_quantized(w.detach(), name) - w.detach()).double().pow(2).sum())
                           for name in formats} for node, w in weights.items()}
    generator = torch.Generator().manual_seed(seed)
    nodes = list(by_node)
    everything = nodes + list(attentions)
    weight_trace = dict.fromkeys(everything, 0.0)
    activation_trace = dict.fromkeys(everything, 0.0)
    activation_term = {n: dict.fromkeys(formats, 0.0) for n in everything}
    mse = {n: dict.fromkeys(formats, 0.0) for n in everything}
    groups = _call_groups(calibration, samples, accumulate, trajectories)
    loop = sampling_loop(calibration)
    guided_calls = 0
    total_calls = sum(len(g) for g in groups)
    bar = progress_bar(range(total_calls), progress, "quant sensitivity", "call")
    ticks = iter(bar)
    for calls in groups:
        # the loss of a group is the error of its mean output: weight errors add up coherently
        # over its calls (one probe u per group), activation rounding errors do not
        steps_in_group = len(calls)
        summed: list[dict[str, torch.Tensor]] = [{} for _ in range(probes)]
        hooks = _SummingHooks(weights, summed, steps_in_group)
        probes_u: dict[tuple[int, ...], list[torch.Tensor]] = {}
        for item, step in calls:
            next(ticks, None)
            record = next(calibration.records(steps={step}, items={item}))
            flat = [record.inputs[spec.name] for spec in dg.signature.inputs]
            runner = _Instrumented(dg.module, by_node, weights, formats, activations, attentions)
            rows = guidance_rows(record, loop)
            guided_calls += rows is not None
            with torch.enable_grad():
                output = runner.run(*flat)[0]
                # one u per latent (guided) or per row, shared by the group's calls
                shape = (max(state for state, _ in rows) + 1, *output.shape[1:]) if rows else tuple(output.shape)
                if shape not in probes_u:
                    probes_u[shape] = [(torch.randint(0, 2, shape, generator=generator, device="cpu") * 2 - 1).to(output)
                                       for _ in range(probes)]
                directions = [torch.stack([weight * u[state] for state, weight in rows]) if rows else u
                              for u in probes_u[shape]]
                elements = output.numel() * shape[0] // output.shape[0]
                inputs = [(node, i, d) for node in everything for i, d in enumerate(runner.deltas[node])]
                leaves = [weights[n] for n in nodes] + [d for _, _, d in inputs]
                activation_squared = {(node, i): 0.0 for node, i, _ in inputs}
                for probe, u in enumerate(directions):
                    hooks.probe = probe
                    torch.autograd.backward(output, grad_tensors=u, retain_graph=probe < probes - 1, inputs=leaves)
                    for node, i, delta in inputs:
                        if delta.grad is not None:
                            activation_squared[node, i] += float(delta.grad.double().pow(2).sum()) / probes
                            delta.grad = None
            # Tr(H) = (2/N) E_u ||J^T u||^2 for the mean squared output error over N elements;
            # the error of a mean of S calls with independent rounding is 1/S^2 of their sum
            scale = 2.0 / elements / steps_in_group ** 2 / len(groups)
            for node, i, delta in inputs:
                x_trace = scale * activation_squared[node, i] / delta.numel()
                activation_trace[node] += x_trace
                for name in formats:
                    activation_term[node][name] += x_trace * runner.activation_error[node][name][i]
            for node in everything:
                for name in formats:
                    mse[node][name] += runner.output_mse[node][name] / total_calls
        hooks.remove()
        for node in nodes:
            squared = sum(float(summed[p][node].double().pow(2).sum()) for p in range(probes) if node in summed[p])
            weight_trace[node] += 2.0 / elements * squared / probes / weights[node].numel() / len(groups)
    hessian = {n: {f: weight_trace[n] * perturbation.get(n, {}).get(f, 0.0) + activation_term[n][f] for f in formats}
               for n in everything}
    return Sensitivity(hessian, mse, weight_trace, activation_trace, perturbation, total_calls, probes,
                       guided=guided_calls == total_calls)


def _quantized(weight: torch.Tensor, name: str) -> torch.Tensor:
    scheme = spec_for(name, 1.0).weight
    return weight if scheme is None else fake_quantize_weight(weight, scheme)


class _SummingHooks:
    """Moves each weight's gradient, once backward has accumulated it, into the current probe's
    running sum over the group's steps (bf16: the sums only feed a Hutchinson estimate, whose
    probe noise is far above bf16 rounding) and frees it."""

    def __init__(self, weights: dict[str, torch.Tensor], summed: list[dict[str, torch.Tensor]], steps: int) -> None:
        self.summed, self.steps, self.probe = summed, steps, 0
        self.handles = [w.register_post_accumulate_grad_hook(self._taker(node)) for node, w in weights.items()]

    def _taker(self, node: str) -> Any:
        def take(weight: torch.Tensor) -> None:
            contribution = (weight.grad / self.steps).to(torch.bfloat16)
            weight.grad = None
            sums = self.summed[self.probe]
            sums[node] = sums[node].add_(contribution) if node in sums else contribution
        return take

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _call_groups(calibration: CalibrationSet, samples: int, accumulate: str,
                 trajectories: int) -> list[list[tuple[str, int]]]:
    if accumulate == STEP:
        return [[call] for call in sample_calls(calibration, samples)]
    items = calibration.items
    if not items:
        raise ValueError("the calibration set holds no recorded calls")
    picks = np.unique(np.round(np.linspace(0, len(items) - 1, min(trajectories, len(items)))).astype(int))
    groups = []
    for index in picks:
        item = items[int(index)]
        groups.append([(item["id"], step) for step in sorted({c["step"] for c in item["calls"]})])
    return groups
