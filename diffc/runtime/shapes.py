"""The shape check of a call against the signature the graph was captured with: each message names
the input, the dim and what to do."""
from __future__ import annotations

import torch

from ..errors import InputError
from ..ir import TensorInput


def check_shapes(specs: tuple[TensorInput, ...], values: list[torch.Tensor]) -> None:
    """Raises InputError for the first input whose shape the graph cannot take."""
    sizes: dict[str, tuple[int, str]] = {}
    for spec, value in zip(specs, values):
        expected = "(" + ", ".join(str(d) for d in spec.shape) + ")"
        if value.dim() != len(spec.shape):
            raise InputError(f"input {spec.name} has shape {tuple(value.shape)} but the model was compiled for "
                             f"{expected} ({len(spec.shape)} dims)")
        for dim, (want, got) in enumerate(zip(spec.shape, value.shape)):
            if isinstance(want, int):
                if want != got:
                    raise InputError(_static_mismatch(spec, tuple(value.shape), dim, expected))
            elif want in sizes and sizes[want][0] != got:
                raise InputError(_disagreement(spec, dim, got, want, *sizes[want]))
            else:
                sizes.setdefault(want, (got, spec.name))


def _kind(spec: TensorInput, dim: int) -> str | None:
    return spec.kinds[dim] if spec.kinds else None


def _disagreement(spec: TensorInput, dim: int, size: int, name: str, other_size: int, other_input: str) -> str:
    kind = _kind(spec, dim)
    if kind is None or kind == name:
        return f"input {spec.name} has {name}={size} (dim {dim}) but {other_input} has {name}={other_size}; they must agree"
    # torch.export found the model needs two kinds of dim equal (a square-only unpatchify)
    return (f"input {spec.name} has {kind}={size} (dim {dim}) but {name}={other_size}: the model was captured with its "
            f"{kind} tied to its {name} (its graph holds only while they are equal); pass inputs with {kind} == {name}")


def _static_mismatch(spec: TensorInput, shape: tuple[int, ...], dim: int, expected: str) -> str:
    kind = _kind(spec, dim)
    if kind is None:
        return f"input {spec.name} has shape {shape} but the model was compiled for {expected}: dim {dim} must be " \
               f"{spec.shape[dim]}"
    return (f"input {spec.name} has {kind}={shape[dim]} (shape {shape}) but the model was captured with {kind} pinned "
            f"to {spec.shape[dim]}: its graph takes no other {kind}. To run {kind}={shape[dim]}, optimize again with "
            f"example inputs of that {kind} (diffc.optimize(..., example_inputs={{...}})).")
