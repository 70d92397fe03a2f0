"""Unit tests of the pure parts of the bench's `overload` section (loadtests/bench_overload.py):
the plateau next to the saturation, and the target's CPU time read from /proc."""

from __future__ import annotations

from tests.helpers.loadtests import load

bo = load("bench_overload")


def _steps(*goodputs: float) -> list[dict[str, float]]:
    return [{"goodput_per_s": g} for g in goodputs]


def test_the_plateau_is_the_median_from_the_best_step_on_not_the_best() -> None:
    sweep = _steps(250, 350, 490, 897, 951, 822, 779)  # best at index 4, then two steps without gain
    assert bo.plateau(sweep, 4) == 822  # median of 951, 822, 779: below the saturation (951)
    assert bo.plateau(sweep, 3) == 897  # an even count: the upper of the two middle ones


def test_the_steps_before_the_best_do_not_count() -> None:
    sweep = _steps(100, 200, 300)
    assert bo.plateau(sweep, 2) == 300
    assert bo.plateau([], 0) is None
