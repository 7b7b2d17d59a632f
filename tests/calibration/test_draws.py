"""Fresh held-out draws: new seeds for the calibration conditions, sampled by the live pipeline in
batches, against the reference's outputs kept once."""
import copy

import pytest
import torch

from diffc.calibration import FRESH_DRAWS, CalibrationSet, collect, draw_error, fresh_draws
from diffc.calibration.collect import call_pipeline
from digits_tiny import tiny_digits_pipeline


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    pipe = tiny_digits_pipeline()
    return pipe, collect(pipe, conditions=[1, 6, 3], num_steps=3, out=tmp_path_factory.mktemp("cal"), progress=False)


def _counting_calls(monkeypatch, pipe):
    calls = []
    original = type(pipe).__call__

    def counted(self, *args, **kwargs):
        calls.append(kwargs.get("class_labels"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(pipe), "__call__", counted)
    return calls


def test_draws_take_new_seeds_and_every_condition_in_turn(live):
    _, calibration = live
    recorded = {item["seed"] for item in calibration.items}
    draws = fresh_draws(calibration, 7)
    assert draws == [(3, (0, 1, 2)), (4, (0, 1, 2)), (5, (0,))]
    assert not recorded & {seed for seed, _ in draws}
    assert sum(len(indices) for _, indices in fresh_draws(calibration)) == FRESH_DRAWS
    assert fresh_draws(CalibrationSet(calibration.root), 7) == []  # loaded from disk: no pipeline samples
    assert draw_error(CalibrationSet(calibration.root), torch.nn.Identity()) is None


def test_the_reference_itself_reproduces_its_draws_and_its_outputs_are_sampled_once(live, monkeypatch):
    pipe, calibration = live
    calls = _counting_calls(monkeypatch, pipe)
    same = draw_error(calibration, pipe.unet, count=5)
    # two seeds: one batched call for the reference's outputs, one for the candidate's, per seed
    assert same["psnr"] == float("inf") and same["trajectories"] == 5 and len(calls) == 4
    assert calls[:2] == [[1, 6, 3], [1, 6]]
    calls.clear()
    assert draw_error(calibration, pipe.unet, count=5)["psnr"] == float("inf") and len(calls) == 2


def test_a_perturbed_candidate_is_measured_on_each_sample(live):
    pipe, calibration = live
    noisy = copy.deepcopy(pipe.unet)
    with torch.no_grad():
        for parameter in noisy.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    error = draw_error(calibration, noisy, count=4)
    assert error["trajectories"] == 4 and len(error["trajectory_psnrs"]) == 4
    expected, original = [], pipe.unet
    for seed, indices in fresh_draws(calibration, 4):
        labels = [[1, 6, 3][i] for i in indices]
        pair = []
        for denoiser in (noisy, original):
            pipe.unet = denoiser
            try:
                result = call_pipeline(pipe, labels if len(labels) > 1 else labels[0], 3, seed, {})
            finally:
                pipe.unet = original
            pair.append(torch.as_tensor(result.images).double())
        expected += [float((a - b).pow(2).mean()) for a, b in zip(*pair)]
    assert error["mse"] == pytest.approx(sum(expected) / len(expected), rel=1e-9)


def test_the_reference_outputs_kept_belong_to_their_calibration_set(live, tmp_path):
    """Two sets on the same pipeline draw the same seeds for other conditions: each set's reference
    outputs are its own, so the unmodified denoiser reproduces both exactly."""
    pipe, calibration = live
    assert draw_error(calibration, pipe.unet, count=3)["psnr"] == float("inf")
    other = collect(pipe, conditions=[7, 2, 9], num_steps=3, out=tmp_path, progress=False)
    assert fresh_draws(other, 3) == fresh_draws(calibration, 3)
    assert draw_error(other, pipe.unet, count=3)["psnr"] == float("inf")
