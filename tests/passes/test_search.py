from types import SimpleNamespace

import pytest

from diffc.errors import PassError
from diffc.passes import PassContext
from diffc.passes._search import search_grid

GRID = (0.1, 0.2, 0.3, 0.4, 0.5)


def _search(errors, quality_rises, infeasible_above=None):
    """search_grid without a live pipeline, over fake candidates whose error is errors[value]."""
    def build(value):
        if infeasible_above is not None and value > infeasible_above:
            raise PassError("no such candidate")
        return value

    ctx = PassContext(calibration=SimpleNamespace(pipeline=None))
    return search_grid(GRID, build, ctx, knob="share", offline_error=lambda value: errors[value], min_psnr=30.0,
                       max_relative_error=0.05, quality_rises=quality_rises, fallback=-1.0,
                       infeasible=(PassError,))


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
