"""Frontiers: the upper envelope of each method's (speed-up, PSNR) points and the speed-up it
reaches at a fidelity level."""
import pytest

from diffc.bench.frontier import comparison, mixed_speedup, pareto, speedup_at

INF = float("inf")


def test_pareto_keeps_only_points_no_other_beats_on_both():
    points = [(1.0, INF), (1.5, 40.0), (1.4, 35.0), (2.0, 30.0), (1.9, 32.0), (3.0, 20.0)]
    assert pareto(points) == [(1.0, INF), (1.5, 40.0), (1.9, 32.0), (2.0, 30.0), (3.0, 20.0)]


def test_speedup_at_mixes_two_settings_over_the_images():
    points = [(1.0, INF), (1.5, 40.0), (2.0, 30.0)]
    assert speedup_at(points, 40.0) == pytest.approx(1.5)
    # 35 dB is an MSE of 10^-3.5: 24% of the images at 30 dB (1e-3), the rest at 40 dB (1e-4)
    fast_share = (10 ** -3.5 - 1e-4) / (1e-3 - 1e-4)
    assert speedup_at(points, 35.0) == pytest.approx(1 / ((1 - fast_share) / 1.5 + fast_share / 2.0))
    assert speedup_at(points, 30.0) == pytest.approx(2.0)
    assert speedup_at(points, 25.0) == pytest.approx(2.0)  # nothing faster measured: no extrapolation


def test_measuring_one_more_setting_never_lowers_the_figure():
    """(2.1, 27) is on the Pareto front between (2.0, 34) and (3.0, 26), but mixing it with (2.0, 34)
    reaches 30 dB at less speed than mixing (3.0, 26) does: the figure stays the better mix."""
    points = [(1.0, INF), (2.0, 34.0), (3.0, 26.0)]
    alone = speedup_at(points, 30.0)
    assert 2.0 < alone < 3.0
    assert speedup_at([*points, (2.1, 27.0)], 30.0) == pytest.approx(alone)


def test_a_method_that_never_reaches_a_level_has_no_speedup_there():
    assert speedup_at([(1.8, 28.0), (2.5, 20.0)], 30.0) is None
    assert speedup_at([(1.0, INF), (1.8, 28.0)], 30.0) == 1.0  # only the unoptimized model reaches it


def _row(pipeline, kind, family, speedup, psnr, status="ok"):
    return {"pipeline": pipeline, "kind": kind, "status": status, "speedup": speedup, "psnr": psnr,
            "details": {"family": family} if family else {}}


def test_comparison_names_the_best_peer_per_level_and_whether_diffc_reaches_it():
    rows = {r["pipeline"]: r for r in [
        _row("baseline", "baseline", None, 1.0, INF),
        _row("cache", "diffc", "diffc cache", 1.9, 36.0),
        _row("cache[full_fraction=0.3]", "diffc", "diffc cache", 2.6, 31.0),
        _row("fbc@0.1", "peer", "fbc", 1.6, 41.0),
        _row("fbc@0.4", "peer", "fbc", 2.2, 33.0),
        _row("taylorseer@2", "peer", "taylorseer", 1.7, 45.0),
        _row("pab@2", "peer", "pab", 3.0, 45.0, status="no-op"),  # changed nothing: not a frontier point
    ]}
    levels = comparison(rows)["levels"]
    assert levels["40"]["best_peer"] == "taylorseer" and levels["40"]["diffc_wins"] is False
    assert levels["35"]["diffc"] == pytest.approx(mixed_speedup((1.9, 36.0), (2.6, 31.0), 35.0))
    assert 1.9 < levels["35"]["diffc"] < 2.6
    assert levels["30"]["diffc_wins"] is True and levels["30"]["best_peer"] == "fbc"


def test_diffc_cache_eager_and_compiled_rows_make_one_frontier():
    rows = {r["pipeline"]: r for r in [
        _row("baseline", "baseline", None, 1.0, INF),
        _row("cache", "diffc", "diffc cache", 2.0, 32.0),
        _row("cache[full_fraction=0.7]:compile", "diffc", "diffc cache + torch.compile", 1.5, 41.0),
        _row("cache+quant", "diffc", "diffc cache+quant (torch-int8)", 3.0, 45.0),  # another method
        _row("torchao-int8-compile@wo", "peer", "torchao-int8-compile", 1.4, 44.0),
    ]}
    levels = comparison(rows)["levels"]
    assert levels["40"]["diffc"] == pytest.approx(mixed_speedup((1.5, 41.0), (2.0, 32.0), 40.0))
    assert levels["40"]["diffc_wins"] is True and levels["30"]["diffc"] == 2.0


def test_a_method_whose_rows_all_declined_stays_at_the_unoptimized_speed():
    rows = {"baseline": _row("baseline", "baseline", None, 1.0, INF),
            "cache": _row("cache", "diffc", "diffc cache", 1.0, INF, status="no-op"),
            "fbc": _row("fbc", "peer", "fbc", 1.4, 38.0)}
    levels = comparison(rows)["levels"]
    assert levels["30"]["diffc"] == 1.0 and levels["30"]["diffc_wins"] is False
