"""Unit tests of the pure parts of the bench's `overload` section (loadtests/bench_overload.py):
the plateau next to the saturation, and the saturation search against a stand-in target."""

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


def _cliff(capacity: float, collapsed: float):  # type: ignore[no-untyped-def]
    """A stand-in for one open-loop run against a target that serves all it is offered up
    to `capacity` and `collapsed` per second past it (nginx's shape under the cap)."""
    offered: list[float] = []

    def run(bench: object, port: int, rate: float, duration_s: float, pid: int | None) -> dict[str, object]:
        offered.append(rate)
        good = rate if rate <= capacity else collapsed
        return {"rate": rate, "offered_per_s": rate, "goodput_per_s": good, "goodput_with_tail_per_s": good,
                "shed_per_s": 0.0, "p99_ms": 1.0, "dropped": 0, "errors": 0, "cpu_us_per_ok": 50.0,
                "shed_503": 0, "refused": 0, "reset": 0, "unanswered": 0, "ok_first": 0, "first_p50_ms": None,
                "first_p99_ms": None, "p50_ms": 1.0, "send_lag_p99_ms": 0.0}

    return run, offered


def test_a_knee_between_two_sweep_steps_is_found_by_the_refinement(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """x1.4 steps: 1,345/s all served, 1,882/s past the cliff (1,400). Without the
    midpoints the saturation would be the collapsed window, 1,400."""
    run, offered = _cliff(1700.0, 1400.0)
    monkeypatch.setattr(bo, "_run", run)
    monkeypatch.setattr(bo, "_settle", lambda bl, port: None)

    class Quiet:
        def log(self, msg: str) -> None:
            pass

    r = bo._measure(Quiet(), bo.bl, 0, 5.0, 5.0)
    assert [round(s["rate"]) for s in r["refine"]] == [1591, 2227]  # 1,882 / and x sqrt(1.4)
    assert r["saturation_per_s"] == r["saturation_offered_per_s"] == offered[-4] == r["refine"][0]["rate"]
    assert max(s["goodput_per_s"] for s in r["sweep"]) == 1400.0  # what the coarse sweep alone would say
    assert r["at_2x"]["rate"] == 2 * r["saturation_per_s"]
