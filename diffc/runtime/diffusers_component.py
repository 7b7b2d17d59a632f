"""OptimizedModel as a diffusers pipeline component.

diffusers pipelines save, load and adapt a component through a fixed set of methods, and only
for a subclass of its ModelMixin: `pipe.save_pretrained` calls the component's
`save_pretrained(folder)`; `DiffusionPipeline.from_pretrained` imports the class named in
model_index.json and calls its `from_pretrained(folder, **loading options)`; the LoRA loaders
(`pipe.load_lora_weights`, `set_adapters`, `fuse_lora`, `delete_adapters`, ...) call the PEFT
adapter API below. Each is mapped onto the artifact (`save` / diffc.load, hashes checked) and
onto OptimizedModel's own adapters (`load_lora`, `set_lora_scale`, `unload_lora`)."""
from __future__ import annotations

import os
import warnings
from typing import Any, Callable, Mapping, Sequence

import torch
from diffusers import ModelMixin

from ..errors import InputError
from .adapters import read_adapter

_ARTIFACT_LOADERS: list[Callable[..., Any]] = []


def register_artifact_loader(loader: Callable[..., Any]) -> None:
    """diffc.load (which needs the backends, a layer above this one) registers itself here, so
    that diffusers can load a saved component through the class alone."""
    _ARTIFACT_LOADERS[:] = [loader]


class PipelineComponent(ModelMixin):
    """The diffusers-facing half of OptimizedModel (see the module docstring). A subclass
    provides `save`, `target`, `dtype`, `load_lora`, `set_lora_scale`, `unload_lora` and
    `lora_adapters`."""

    def __init__(self) -> None:
        super().__init__()
        self._disabled_scales: dict[str, float] | None = None
        self._fused_scales: dict[str, float] = {}

    # --- save_pretrained / from_pretrained -----------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike[str], **options: Any) -> None:
        """Writes the artifact (manifest, graphs, weights, backend files, hashes) as this
        component's folder of a saved pipeline; `options` of ModelMixin.save_pretrained
        (sharding, variants, push_to_hub) do not apply and are refused when set."""
        unsupported = sorted(k for k, v in options.items() if v not in (None, False, True) or k == "push_to_hub" and v)
        if unsupported:
            raise InputError(f"an optimized model saves as one diffc artifact; {', '.join(unsupported)} cannot be "
                             "honoured. Save without them (fast.save(folder) or pipe.save_pretrained(folder))")
        self.save(save_directory, overwrite=True)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike[str], **options: Any) -> Any:
        """Loads the artifact a pipeline saved in a component folder (what
        DiffusionPipeline.from_pretrained calls). `device_map` may name one device; a `torch_dtype`
        other than the compiled one is ignored with a warning: the precision was chosen at
        optimization (optimize again for another)."""
        if not _ARTIFACT_LOADERS:
            raise InputError("import diffc before loading a pipeline that holds a diffc component")
        path = os.fspath(pretrained_model_name_or_path)
        if not os.path.isfile(os.path.join(path, "manifest.json")):
            raise InputError(f"{path} holds no diffc artifact (manifest.json); a saved pipeline keeps the optimized "
                             "denoiser there only when it was saved with it in place")
        device_map = options.get("device_map")
        device = device_map if isinstance(device_map, (str, torch.device)) and device_map != "auto" else None
        loaded = _ARTIFACT_LOADERS[0](path, device=device)
        dtype = options.get("torch_dtype") or options.get("dtype")
        if isinstance(dtype, torch.dtype) and dtype != loaded.dtype:
            warnings.warn(f"the optimized denoiser in {path} is compiled for {loaded.target} ({loaded.dtype}) and "
                          f"keeps that precision; torch_dtype={dtype} applies to the other components. Optimize for the "
                          "precision you want (e.g. target='torch-fp16').", stacklevel=2)
        return loaded

    # --- what ModelMixin's casts would do to the compiled segments: go through `to` ---------------
    def half(self, *_: Any) -> Any:
        return self.to(torch.float16)

    def float(self, *_: Any) -> Any:
        return self.to(torch.float32)

    def bfloat16(self) -> Any:
        return self.to(torch.bfloat16)

    def cuda(self, device: Any = None) -> Any:
        return self.to(torch.device("cuda", device) if isinstance(device, int) else device or "cuda")

    def cpu(self) -> Any:
        return self.to("cpu")

    # --- the PEFT adapter API of diffusers models ------------------------------------------------
    @property
    def peft_config(self) -> dict[str, dict[str, float]]:
        """The loaded adapters, as pipelines list them (get_list_adapters)."""
        return {name: {"scale": scale} for name, scale in self.lora_adapters.items()}

    def load_lora_adapter(self, pretrained_model_name_or_path_or_dict: Any, prefix: str | None = "transformer",
                          hotswap: bool = False, **options: Any) -> None:
        """What `pipe.load_lora_weights(...)` calls: the keys under `prefix` (the pipeline's
        name for its denoiser) become an adapter of this model at strength 1; the rest of the
        file (text encoders) is the pipeline's business. With `hotswap`, an adapter of the same
        name is replaced."""
        state_dict = read_adapter(pretrained_model_name_or_path_or_dict)
        if prefix is not None:
            state_dict = {k[len(prefix) + 1:]: v for k, v in state_dict.items() if k.startswith(prefix + ".")}
            alphas = options.get("network_alphas") or {}
            state_dict.update({k[len(prefix) + 1:]: torch.tensor(float(v)) for k, v in alphas.items()
                               if k.startswith(prefix + ".")})
        if not state_dict:
            warnings.warn(f"the LoRA holds no weights for the denoiser (no key under {prefix!r}); nothing was loaded "
                          "into it", stacklevel=2)
            return
        state_dict = _with_config_alphas(state_dict, options.get("metadata"))
        name = options.get("adapter_name") or f"default_{len(self.lora_adapters)}"
        if hotswap and name in self.lora_adapters:
            self.unload_lora(name)
        self.load_lora(state_dict, scale=1.0, name=name)

    def set_adapters(self, adapter_names: str | Sequence[str],
                     weights: float | Sequence[float | None] | None = None) -> None:
        """Makes exactly `adapter_names` active, at `weights` (1.0 by default); every other
        loaded adapter is switched off (strength 0), as diffusers does."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        strengths = list(weights) if isinstance(weights, (list, tuple)) else [weights] * len(names)
        if len(strengths) != len(names):
            raise InputError(f"{len(names)} adapters but {len(strengths)} weights; give one weight per adapter")
        unknown = sorted(set(names) - set(self.lora_adapters))
        if unknown:
            raise InputError(f"no adapter named {unknown} is loaded (loaded: {sorted(self.lora_adapters)})")
        for strength in strengths:
            if isinstance(strength, Mapping):
                raise InputError("per-block adapter weights (a dict of down/mid/up scales) are not supported on an "
                                 "optimized model: each adapter has one strength; pass a number")
        chosen = {name: 1.0 if s is None else float(s) for name, s in zip(names, strengths)}
        for name in self.lora_adapters:
            self.set_lora_scale(chosen.get(name, 0.0), name)

    def delete_adapters(self, adapter_names: str | Sequence[str]) -> None:
        for name in [adapter_names] if isinstance(adapter_names, str) else adapter_names:
            self.unload_lora(name)

    def disable_lora(self) -> None:
        """Switches every adapter off until enable_lora()."""
        if self._disabled_scales is None:
            self._disabled_scales = dict(self.lora_adapters)
            for name in self._disabled_scales:
                self.set_lora_scale(0.0, name)

    def enable_lora(self) -> None:
        if self._disabled_scales is not None:
            for name, scale in self._disabled_scales.items():
                if name in self.lora_adapters:
                    self.set_lora_scale(scale, name)
            self._disabled_scales = None

    def fuse_lora(self, lora_scale: float = 1.0, safe_fusing: bool = False,
                  adapter_names: Sequence[str] | None = None) -> None:
        """Adapters are always merged into the compiled weights; fusing multiplies their strength
        by `lora_scale` until unfuse_lora(). With `safe_fusing`, weights that would turn
        non-finite are refused."""
        names = list(adapter_names) if adapter_names is not None else list(self.lora_adapters)
        for name in names:
            self._fused_scales.setdefault(name, self.lora_adapters[name])
            self.set_lora_scale(self._fused_scales[name] * lora_scale, name)
        if safe_fusing and not all(bool(torch.isfinite(w).all()) for w in self.plan.graph.weights().values()):
            self.unfuse_lora()
            raise InputError("fusing the adapters gives non-finite weights; the fusion was undone")

    @property
    def fused_adapters(self) -> list[str]:
        """Adapters fused with fuse_lora() and not unfused since."""
        return list(self._fused_scales)

    def forget_fused(self, names: Sequence[str]) -> None:
        """Called once fused adapters became part of the base weights (unload_lora)."""
        for name in names:
            self._fused_scales.pop(name, None)

    def unfuse_lora(self) -> None:
        """Restores the strengths adapters had before fuse_lora()."""
        for name, scale in self._fused_scales.items():
            if name in self.lora_adapters:
                self.set_lora_scale(scale, name)
        self._fused_scales.clear()


def _with_config_alphas(state_dict: dict[str, torch.Tensor], metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """A PEFT LoraConfig saved with the adapter scales it by lora_alpha / r: written here as the
    per-module alphas the adapter reader understands."""
    if not metadata or "lora_alpha" not in metadata:
        return state_dict
    if metadata.get("rank_pattern") or metadata.get("alpha_pattern"):
        raise InputError("this adapter's LoraConfig sets per-module ranks or alphas (rank_pattern / alpha_pattern), "
                         "which an optimized model does not read; fuse it into the denoiser before diffc.optimize")
    alpha = torch.tensor(float(metadata["lora_alpha"]))
    modules = {key.split(".lora_A")[0] for key in state_dict if ".lora_A" in key}
    return {**state_dict, **{f"{module}.alpha": alpha for module in modules if f"{module}.alpha" not in state_dict}}
