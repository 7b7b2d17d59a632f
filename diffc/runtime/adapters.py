"""LoRA adapters on an optimized model: loaded, re-weighted and removed without optimizing again.

The graph keeps the denoiser's own parameter names, so an adapter's low-rank pair for a module
(A: rank x in, B: out x rank; convolutions carry kernel dims on A) maps onto that module's weight:
W = W0 + sum over adapters of scale * (B @ A). The base weights W0 of every touched layer are kept,
so any adapter's strength can change at any time and the result never drifts from repeated
in-place updates; a weight no adapter touches any more gets W0 back. The owner hands the changed
weights to its compiled plan afterwards (see OptimizedModel.load_lora).

A LoRA file for a whole pipeline also holds other components' keys (diffusers' "text_encoder.",
"text_encoder_2.", kohya's "lora_te_", "lora_te2_", "te_", ...): `denoiser_keys` keeps the denoiser's
and skips those with one warning."""
from __future__ import annotations

import contextlib
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence

import torch

from ..errors import InputError
from ..ir.fxutil import attr_value

# peft ("<module>.lora_A[.<adapter>].weight") and diffusers' older attention-processor format
# ("<module>.lora.down.weight"); kohya-style adapters carry "<module>.alpha" (the scale is alpha / rank)
_PAIR_KEY = re.compile(r"^(?P<module>.+?)\.(?:lora_(?P<peft>[AB])(?:\.[^.]+)?|lora\.(?P<old>down|up))\.weight$")
_ALPHA_KEY = re.compile(r"^(?P<module>.+?)\.alpha$")
# what pipelines and peft put in front of the denoiser's own module names
_PREFIXES = ("unet.", "transformer.", "base_model.model.")
# other pipeline components a LoRA file may carry keys for, and their prefixes (diffusers, kohya)
COMPONENT_PREFIXES = {
    "text_encoder_2": ("text_encoder_2.", "lora_te2_", "te2_"),
    "text_encoder_3": ("text_encoder_3.", "lora_te3_", "te3_"),
    "text_encoder": ("text_encoder.", "lora_te_", "lora_te1_", "te_", "te1_"),
}


def read_adapter(adapter: Mapping[str, torch.Tensor] | str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """A LoRA state dict, from a mapping or a .safetensors file."""
    if isinstance(adapter, Mapping):
        return dict(adapter)
    path = os.fspath(adapter)
    if not path.endswith(".safetensors"):
        raise InputError(f"a LoRA adapter is a state dict or a .safetensors file, got {path!r}; load other formats "
                         "yourself (e.g. torch.load(path, weights_only=True)) and pass the dict")
    if not os.path.exists(path):
        raise InputError(f"no LoRA adapter file at {path}")
    from safetensors.torch import load_file

    return load_file(path)


def denoiser_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keys of `state_dict` that are not another pipeline component's; those are skipped with one
    warning (an error when nothing is left for the denoiser). Keys of no known component stay, so
    lora_deltas still names what it cannot place."""
    kept: dict[str, torch.Tensor] = {}
    skipped: Counter[str] = Counter()
    for key, value in state_dict.items():
        component = next((c for c, prefixes in COMPONENT_PREFIXES.items() if key.startswith(prefixes)), None)
        if component is None:
            kept[key] = value
        else:
            skipped[component] += 1
    if not skipped:
        return kept
    counts = ", ".join(f"{count} keys of {component}" for component, count in sorted(skipped.items()))
    if not kept:
        raise InputError(f"the adapter holds only other components' keys ({counts}) and none for the denoiser "
                         "(prefixes unet., transformer.); load it with pipe.load_lora_weights(file)")
    warnings.warn(f"the adapter also holds {counts}: diffc applies the denoiser's keys (unet., transformer.) and "
                  "skipped those; pipe.load_lora_weights(file) puts them on the text encoder", stacklevel=3)
    return kept


def lora_deltas(state_dict: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor],
                strict: bool = True) -> tuple[dict[str, torch.Tensor], list[str]]:
    """{weight name: B @ A (times alpha / rank where the adapter gives alpha)} for every module of
    the adapter found in `weights`, and the modules that were not found (an error when strict)."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, float] = {}
    for key, value in state_dict.items():
        name = _strip_prefix(key)
        pair = _PAIR_KEY.match(name)
        alpha = _ALPHA_KEY.match(name)
        if pair:
            which = "down" if (pair["peft"] or "") == "A" or pair["old"] == "down" else "up"
            pairs.setdefault(pair["module"], {})[which] = value
        elif alpha:
            alphas[alpha["module"]] = float(value)
        else:
            raise InputError(f"adapter key {key!r} is not a LoRA weight (expected '<module>.lora_A.weight' / "
                             "'.lora_B.weight', or '.lora.down.weight' / '.lora.up.weight')")
    deltas: dict[str, torch.Tensor] = {}
    missing = []
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"down", "up"}:
            raise InputError(f"adapter module {module!r} has only its lora_{'A' if 'down' in pair else 'B'} "
                             "weight; a LoRA layer needs both halves")
        target = module + ".weight"
        if target not in weights:
            missing.append(module)
            continue
        down, up = pair["down"].float(), pair["up"].float()
        rank = down.shape[0]
        if up.shape[1] != rank:
            raise InputError(f"adapter module {module!r}: lora_A has rank {rank} but lora_B has {up.shape[1]} "
                             "columns; the two halves come from different adapters")
        delta = (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
        weight = weights[target]
        if delta.shape != weight.shape:
            raise InputError(f"adapter module {module!r} changes a weight of shape {tuple(delta.shape)}, but the "
                             f"model's {target} is {tuple(weight.shape)}; the adapter is for another model")
        deltas[target] = delta * (alphas[module] / rank if module in alphas else 1.0)
    if missing and strict:
        raise InputError(
            f"{len(missing)} adapter modules are not in the optimized graph, e.g. {missing[:3]}: either the adapter "
            "is for another model, or a pass removed or split their weights (prune, moe). Fuse the adapter into the "
            "model before diffc.optimize, or pass strict=False to skip those modules")
    return deltas, missing


@dataclass
class Adapters:
    """The adapters loaded on one model: each one's deltas and strength, and the base weights of
    the layers they touch."""

    deltas: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    scales: dict[str, float] = field(default_factory=dict)
    base: dict[str, torch.Tensor] = field(default_factory=dict)
    # the touched weights as they were when the activation scales were last measured (recalibrate);
    # a touched weight absent here had its base value then
    calibrated: dict[str, torch.Tensor] = field(default_factory=dict)

    def apply(self, modules: Sequence[torch.nn.Module]) -> list[str]:
        """Writes W0 + sum of scale * delta into every touched weight of `modules` (the graph's
        module and its segments' modules, which share weight tensors); returns the weights whose
        value changed. A weight is first given its own storage: captured weights share it with the
        user's model, which must not change."""
        touched = {name for deltas in self.deltas.values() for name in deltas}
        for name in sorted(touched - set(self.base)):
            self.base[name] = attr_value(modules[0], name).detach().clone()
            private = self.base[name].clone()
            for module in modules:
                if _has_attr(module, name):
                    _set_attr(module, name, private)
        changed = []
        with torch.no_grad():
            for name in sorted(self.base):
                merged = self.base[name].float()
                for adapter, deltas in self.deltas.items():
                    if name in deltas:
                        merged = merged + self.scales[adapter] * deltas[name].to(merged.device)
                weight = attr_value(modules[0], name)
                value = merged.to(weight.dtype)
                if not torch.equal(weight, value):
                    weight.copy_(value)
                    changed.append(name)
        return changed

    def fold(self, names: Sequence[str]) -> None:
        """Makes adapters part of the base weights at their current strength and forgets them: the
        weights keep their value, and unloading the others no longer removes these."""
        with torch.no_grad():
            for adapter in names:
                for name, delta in self.deltas.pop(adapter).items():
                    merged = self.base[name].float() + self.scales[adapter] * delta.to(self.base[name].device)
                    self.base[name] = merged.to(self.base[name].dtype)
                del self.scales[adapter]

    @contextlib.contextmanager
    def at_calibration(self, modules: Sequence[torch.nn.Module]) -> Iterator[None]:
        """Within it, the touched weights hold the values the activation scales were calibrated
        for (base weights, or those of the last recalibrate); the merged ones afterwards."""
        with torch.no_grad():
            for name in self.base:
                weight = attr_value(modules[0], name)
                weight.copy_(self.calibrated.get(name, self.base[name]).to(weight.dtype))
        try:
            yield
        finally:
            self.apply(modules)

    def mark_calibrated(self, modules: Sequence[torch.nn.Module]) -> None:
        """Records the current touched weights as those the activation scales are calibrated for."""
        self.calibrated = {name: attr_value(modules[0], name).detach().clone() for name in self.base}


def _has_attr(module: torch.nn.Module, target: str) -> bool:
    try:
        attr_value(module, target)
    except AttributeError:
        return False
    return True


def _set_attr(module: torch.nn.Module, target: str, value: torch.Tensor) -> None:
    *path, leaf = target.split(".")
    parent = attr_value(module, ".".join(path)) if path else module
    if isinstance(getattr(parent, leaf), torch.nn.Parameter):
        value = torch.nn.Parameter(value, requires_grad=False)
    setattr(parent, leaf, value)


def _strip_prefix(key: str) -> str:
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key
