import warnings
from types import SimpleNamespace

import numpy as np
import pytest

from diffc.errors import PassError
from diffc.passes import PassContext
from diffc.calibration import split_items
from diffc.passes._search import fitting_items, search_grid

GRID = (0.1, 0.2, 0.3, 0.4, 0.5)


def _search(errors, quality_rises, infeasible_above=None):
    """search_grid without a live pipeline, over fake candidates whose error is errors[value]; a
    search that finds no passing value must say so."""
    def build(value):
        if infeasible_above is not None and value > infeasible_above:
            raise PassError("no such candidate")
        return value

    ctx = PassContext(calibration=SimpleNamespace(pipeline=None))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chosen, searched = search_grid(GRID, build, ctx, knob="share", offline_error=lambda value: errors[value],
                                       min_psnr=30.0, max_relative_error=0.05, quality_rises=quality_rises,
                                       fallback=-1.0, infeasible=(PassError,))
    said = [str(w.message) for w in caught if "no value meets max_relative_error=0.05, so it stays at -1.0" in
            str(w.message)]
    assert bool(said) == (chosen == -1.0), said
    return chosen, searched


@pytest.mark.parametrize("passing", range(len(GRID) + 1))
def test_largest_passing_value_when_quality_falls(passing):
    """The first `passing` grid values are within the bar: the last of them is chosen."""
    errors = {v: 0.01 if i < passing else 0.1 for i, v in enumerate(GRID)}
    chosen, searched = _search(errors, quality_rises=False)
    assert chosen == (GRID[passing - 1] if passing else -1.0)
    assert len(searched) <= 3
    assert all(entry["passes"] == (errors[entry["share"]] <= 0.05) for entry in searched)


@pytest.mark.parametrize("failing", range(len(GRID) + 1))
def test_smallest_passing_value_when_quality_rises(failing):
    """The first `failing` grid values miss the bar: the next one is chosen."""
    errors = {v: 0.1 if i < failing else 0.01 for i, v in enumerate(GRID)}
    chosen, searched = _search(errors, quality_rises=True)
    assert chosen == (GRID[failing] if failing < len(GRID) else -1.0)
    assert [set(entry) for entry in searched] == [{"share", "relative_error", "passes"}] * len(searched)


def test_an_infeasible_value_fails_without_being_measured():
    chosen, searched = _search(dict.fromkeys(GRID, 0.0), quality_rises=False, infeasible_above=0.25)
    assert chosen == 0.2
    assert all(entry["share"] <= 0.25 for entry in searched)


def test_without_a_way_to_re_sample_the_safest_value_is_kept_with_a_warning():
    ctx = PassContext(calibration=SimpleNamespace(pipeline=None))
    with pytest.warns(UserWarning, match="cannot judge candidates on final outputs.*stays at -1.0"):
        chosen, searched = search_grid(GRID, lambda v: v, ctx, knob="share", offline_error=lambda v: 0.0,
                                       min_psnr=30.0, max_relative_error=None, quality_rises=False, fallback=-1.0)
    assert chosen == -1.0 and not searched[0]["passes"]


def _resampled(monkeypatch, selection_psnr, held_out_psnr):
    """search_grid judging on final outputs, with PSNR per value faked on the selection and
    held-out trajectories."""
    import diffc.passes._search as search

    monkeypatch.setattr(search, "resampling", lambda calibration: "loop")
    monkeypatch.setattr(search, "sampling_loop", lambda calibration: SimpleNamespace(usable=False))
    monkeypatch.setattr(search, "split_items", lambda calibration: ({"chosen-on"}, {"kept-back"}))
    monkeypatch.setattr(search, "trajectory_error", lambda calibration, value, items, reference: {
        "psnr": (selection_psnr if items == {"chosen-on"} else held_out_psnr)[value]})
    ctx = PassContext(calibration=SimpleNamespace(pipeline=None), denoiser_for=lambda graph: graph)
    return search_grid(GRID, lambda v: v, ctx, knob="share", offline_error=lambda v: 0.0, min_psnr=30.0,
                       max_relative_error=None, quality_rises=False, fallback=0.0)


def test_a_choice_that_misses_the_floor_on_held_out_trajectories_backs_off(monkeypatch):
    selection = dict(zip(GRID, (40, 38, 35, 31, 20)))
    held_out = dict(zip(GRID, (39, 33, 29, 28, 18)))
    chosen, searched = _resampled(monkeypatch, selection, held_out)
    assert chosen == 0.2  # 0.4 passed on the selection; 0.4 and 0.3 missed on the held-out ones
    verified = [e for e in searched if "held_out_psnr" in e]
    assert [(e["share"], e["passes"]) for e in verified] == [(0.4, False), (0.3, False), (0.2, True)]


def test_when_nothing_holds_on_held_out_trajectories_nothing_changes(monkeypatch):
    selection = dict.fromkeys(GRID, 40)
    held_out = dict.fromkeys(GRID, 10)
    with pytest.warns(UserWarning, match="no value keeps 30.0 dB on the held-out"):
        chosen, _ = _resampled(monkeypatch, selection, held_out)
    assert chosen == 0.0


@pytest.mark.parametrize("quality_rises", [True, False])
def test_optimistic_search_stops_at_the_boldest_value_when_it_passes_and_bisects_otherwise(quality_rises):
    boldest = GRID[0] if quality_rises else GRID[-1]
    ctx = PassContext(calibration=SimpleNamespace(pipeline=None))
    everything_passes = dict.fromkeys(GRID, 0.0)
    chosen, searched = search_grid(GRID, lambda v: v, ctx, knob="share", offline_error=lambda v: everything_passes[v],
                                   min_psnr=30.0, max_relative_error=0.05, quality_rises=quality_rises,
                                   fallback=-1.0, optimistic=True)
    assert chosen == boldest and [entry["share"] for entry in searched] == [boldest]
    only_the_safest = {v: 0.0 if v == (GRID[-1] if quality_rises else GRID[0]) else 0.1 for v in GRID}
    chosen, searched = search_grid(GRID, lambda v: v, ctx, knob="share", offline_error=lambda v: only_the_safest[v],
                                   min_psnr=30.0, max_relative_error=0.05, quality_rises=quality_rises,
                                   fallback=-1.0, optimistic=True)
    assert chosen == (GRID[-1] if quality_rises else GRID[0]) and searched[0]["share"] == boldest
    assert len(searched) <= 4


def test_fitting_items_leave_out_the_trajectories_a_choice_is_verified_on():
    calibration = SimpleNamespace(pipeline=object(), replay={}, items=[{"id": f"t{i}"} for i in range(8)])
    selection, held_out = split_items(calibration)
    assert held_out and fitting_items(PassContext(calibration=calibration, denoiser_for=lambda g: g)) == selection
    assert fitting_items(PassContext(calibration=calibration)) is None  # nothing verifies: fit on everything


def test_the_population_psnr_weighs_the_spread_of_the_trajectories():
    from diffc.calibration import population_psnr

    assert population_psnr([30.0, 30.0, 30.0]) == pytest.approx(30.0)
    assert population_psnr([20.0, 30.0, 40.0]) == pytest.approx(30.0 - 100.0 * 2.302585 / 20, rel=1e-6)
    assert population_psnr([30.0, 31.0]) is None and population_psnr([30.0, 31.0, float("inf")]) is None
    # a log-normal population of squared errors: its mean's PSNR, from a sample's spread
    generator = np.random.default_rng(0)
    psnrs = generator.normal(32.0, 4.0, 200_000)
    exact = 10 * np.log10(1.0 / np.mean(10 ** (-psnrs / 10)))
    assert population_psnr(list(psnrs)) == pytest.approx(exact, abs=0.05)


def test_tail_aware_search_backs_off_where_the_trajectories_spread_below_the_floor(monkeypatch):
    """Values 0.3-0.5 keep 30 dB on average, but 0.4 and 0.5 spread so widely that the population
    figure falls below it; without the tail the boldest value is chosen."""
    import diffc.passes._search as search

    spread = {0.1: 0.5, 0.2: 1.0, 0.3: 2.0, 0.4: 8.0, 0.5: 12.0}
    monkeypatch.setattr(search, "resampling", lambda calibration: "loop")
    monkeypatch.setattr(search, "sampling_loop", lambda calibration: SimpleNamespace(usable=False))
    monkeypatch.setattr(search, "split_items", lambda calibration: ({"a", "b", "c"}, {"d", "e"}))
    monkeypatch.setattr(search, "trajectory_error", lambda calibration, value, items, reference: {
        "psnr": 34.0, "trajectory_psnrs": [34.0 + spread[value] * k for k in (-1, 0, 1)][:len(items)]})
    ctx = PassContext(calibration=SimpleNamespace(pipeline=None), denoiser_for=lambda graph: graph)
    for tail_aware, expected in ((False, 0.5), (True, 0.3)):
        chosen, searched = search_grid(GRID, lambda v: v, ctx, knob="share", offline_error=lambda v: 0.0,
                                       min_psnr=30.0, max_relative_error=None, quality_rises=False, fallback=0.0,
                                       tail_aware=tail_aware)
        assert chosen == expected
        assert all(("population_psnr" in e) == tail_aware for e in searched)
    verified = [e for e in searched if "held_out_psnr" in e]
    assert verified[-1]["share"] == 0.3 and verified[-1]["passes"]


def test_tail_aware_verification_adds_the_fresh_draws_to_the_held_out_trajectories(monkeypatch):
    """Every value keeps 34 dB on the recorded trajectories; the fresh draws of 0.4 and 0.5 show a
    tail the two held-out trajectories did not hold (24 draws at 26 dB), so the search backs off to
    0.3, whose draws keep 33 dB. Without the tail check the draws are not sampled."""
    import diffc.passes._search as search

    monkeypatch.setattr(search, "resampling", lambda calibration: "pipeline")
    monkeypatch.setattr(search, "sampling_loop", lambda calibration: SimpleNamespace(usable=False))
    monkeypatch.setattr(search, "split_items", lambda calibration: ({"a", "b", "c"}, {"d", "e"}))
    monkeypatch.setattr(search, "trajectory_error", lambda calibration, value, items, reference: {
        "psnr": 34.0, "mse": 10 ** -3.4, "trajectories": len(items), "trajectory_psnrs": [34.0] * len(items)})
    drawn_psnr = {0.1: 33.0, 0.2: 33.0, 0.3: 33.0, 0.4: 26.0, 0.5: 26.0}
    sampled = []

    def draws(calibration, value, reference):
        sampled.append(value)
        return {"psnr": drawn_psnr[value], "mse": 10 ** (-drawn_psnr[value] / 10), "trajectories": 24,
                "trajectory_psnrs": [drawn_psnr[value]] * 24}

    monkeypatch.setattr(search, "draw_error", draws)
    ctx = PassContext(calibration=SimpleNamespace(pipeline=object()), denoiser_for=lambda graph: graph)
    for tail_aware, expected in ((False, 0.5), (True, 0.3)):
        sampled.clear()
        chosen, searched = search_grid(GRID, lambda v: v, ctx, knob="share", offline_error=lambda v: 0.0,
                                       min_psnr=30.0, max_relative_error=None, quality_rises=False, fallback=0.0,
                                       tail_aware=tail_aware)
        assert chosen == expected and bool(sampled) == tail_aware
    verified = [e for e in searched if "held_out_psnr" in e]
    assert [(e["share"], e["passes"], e["fresh_draws"]) for e in verified] == [
        (0.5, False, 24), (0.4, False, 24), (0.3, True, 24)]
    # 2 held-out trajectories at 34 dB and 24 draws at 26 dB: the mean squared error of all 26
    assert verified[0]["held_out_psnr"] == pytest.approx(-10 * np.log10((2 * 10 ** -3.4 + 24 * 10 ** -2.6) / 26),
                                                         abs=1e-3)
