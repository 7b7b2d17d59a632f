"""Held-out trajectories the calibration set never recorded: fresh seeds for its conditions,
sampled by the live pipeline with the reference denoiser and with a candidate, the conditions of a
seed in one batched call where they batch (prompts, class labels), as users batch them.

Why: a floor verified on the two held-out trajectories of an eight-trajectory set sees typical
samples. Where samples spread widely (a quantized video model whose noise sometimes lands near
a bifurcation: 17.5-36.5 dB per video on the bench where its eight calibration trajectories read
29-33), a few trajectories miss the tail that sets a batch's figure; more draws show it."""
from __future__ import annotations

import weakref
from typing import Any

import torch

from ..ir import find_denoiser
from .collect import call_pipeline
from .evaluate import ResampledReference, as_tensor, sampling_with
from .replay import final_error
from .store import CalibrationSet

# fresh held-out trajectories a floor's verification adds where a live pipeline samples them
FRESH_DRAWS = 24


def fresh_draws(calibration: CalibrationSet, count: int = FRESH_DRAWS) -> list[tuple[int, tuple[int, ...]]]:
    """(seed, condition indices) of the calls that sample `count` fresh trajectories: seeds after
    the recorded ones, each running the set's conditions in turn; [] without a live pipeline."""
    if calibration.pipeline is None or calibration.replay is None or count <= 0:
        return []
    conditions = len(calibration.replay["conditions"])
    seed = max((int(item["seed"]) for item in calibration.items), default=-1) + 1
    draws = []
    while count > 0:
        draws.append((seed, tuple(range(min(count, conditions)))))
        count -= len(draws[-1][1])
        seed += 1
    return draws


def draw_error(calibration: CalibrationSet, candidate: Any, reference: ResampledReference | None = None,
               count: int = FRESH_DRAWS) -> dict[str, Any] | None:
    """The candidate's final-output error on `count` fresh trajectories (fresh_draws), each sample
    a trajectory of calibration.replay.final_error, against the reference's outputs on the same
    draws: the graph a pass received (`reference`) or, without one, the pipeline's own denoiser;
    the reference's outputs are sampled once and kept. None without a live pipeline."""
    draws = fresh_draws(calibration, count)
    if not draws:
        return None
    references = _reference_outputs(calibration, draws, reference)
    pairs = {}
    for draw in draws:
        for index, (produced, expected) in enumerate(zip(_sample(calibration, candidate, draw), references[draw])):
            pairs[f"draw-seed{draw[0]}-{index}"] = (produced, expected)
    return final_error(pairs, 1.0)


# the pipeline's own denoiser's outputs on fresh draws, by calibration set (its conditions, steps and call
# arguments make the draws) and denoiser, kept while both live
_ORIGINAL_OUTPUTS: "weakref.WeakKeyDictionary[CalibrationSet, weakref.WeakKeyDictionary[Any, dict[Any, Any]]]" = \
    weakref.WeakKeyDictionary()


def _reference_outputs(calibration: CalibrationSet, draws: list[tuple[int, tuple[int, ...]]],
                       reference: ResampledReference | None) -> dict[Any, list[torch.Tensor]]:
    original = find_denoiser(calibration.pipeline)[0]
    kept = reference.drawn if reference is not None else \
        _ORIGINAL_OUTPUTS.setdefault(calibration, weakref.WeakKeyDictionary()).setdefault(original, {})
    missing = [draw for draw in draws if draw not in kept]
    if missing:
        denoiser = reference.denoiser() if reference is not None else original
        kept.update({draw: _sample(calibration, denoiser, draw) for draw in missing})
    return {draw: kept[draw] for draw in draws}


def _sample(calibration: CalibrationSet, denoiser: Any, draw: tuple[int, tuple[int, ...]]) -> list[torch.Tensor]:
    """One output per sample of the draw: its conditions in one call where they are all prompts or
    all class labels, one call each otherwise (dicts of call arguments)."""
    seed, indices = draw
    replay = calibration.replay
    assert replay is not None
    conditions = [replay["conditions"][index] for index in indices]
    batches = [conditions] if all(isinstance(c, str) for c in conditions) or \
        all(isinstance(c, int) and not isinstance(c, bool) for c in conditions) else [[c] for c in conditions]
    outputs: list[torch.Tensor] = []
    with sampling_with(calibration, denoiser) as pipe, torch.no_grad():
        for batch in batches:
            condition = batch if len(batch) > 1 else batch[0]
            result = as_tensor(call_pipeline(pipe, condition, calibration.settings["num_steps"], seed,
                                             replay["call_kwargs"]))
            outputs.extend(result.unbind(0))
    return outputs
