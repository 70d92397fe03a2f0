"""Health checks of ready instances (`proxy.engine.health`) with a fake clock: which
instance is due a probe when, and how many misses make it dead."""

from __future__ import annotations

from proxy.engine.fleet import Boot, Fleet, Foreign
from proxy.engine.health import HealthChecks, Probe
from tests.unit.engine.test_fleet import ROUTE, addr, fleet, of, replace

HEALTHY = 200
MISS = None  # no answer (refused, reset, timed out)


def ready_fleet(interval_s: float = 10.0, failures: int = 3) -> tuple[Fleet, str]:
    f = fleet(replace(ROUTE, health_interval_s=interval_s, health_failures=failures, health_path="/healthz"))
    boot = of(Boot, f.request_arrived("site", 1, "k", None, 0.0))[0]
    f.instance_ready(boot.instance_id, addr(1), 1.0)
    return f, boot.instance_id


def test_a_ready_instance_is_due_one_interval_after_it_became_ready() -> None:
    f, iid = ready_fleet(interval_s=10.0)
    h = HealthChecks()
    assert h.due(f, 10.9) == []
    [probe] = h.due(f, 11.0)
    assert probe == Probe(iid, addr(1), "/healthz", 2.0, 3)  # the timeout is capped at 2 s


def test_no_second_probe_while_one_is_out_and_the_next_counts_from_its_start() -> None:
    f, iid = ready_fleet(interval_s=1.0)
    h = HealthChecks()
    [probe] = h.due(f, 2.0)
    assert probe.timeout_s == 1.0  # never longer than the interval
    assert h.due(f, 5.0) == []  # still out
    h.finished(probe, HEALTHY)
    assert h.due(f, 2.9) == []
    assert [p.instance_id for p in h.due(f, 3.0)] == [iid]


def test_a_dropped_probe_frees_the_instance_for_the_next() -> None:
    f, iid = ready_fleet(interval_s=1.0)
    h = HealthChecks()
    h.due(f, 2.0)
    h.dropped(iid)
    assert [p.instance_id for p in h.due(f, 3.0)] == [iid]


def test_misses_in_a_row_make_it_dead_and_an_answer_resets_the_count() -> None:
    f, _ = ready_fleet(interval_s=1.0, failures=3)
    h = HealthChecks()
    now = 1.0
    verdicts = []
    for status in (MISS, 503, HEALTHY, MISS, 500, MISS):
        now += 1.0
        [probe] = h.due(f, now)
        verdicts.append(h.finished(probe, status))
    assert [v.misses for v in verdicts] == [1, 2, 0, 1, 2, 3]
    assert [v.dead for v in verdicts[:-1]] == [None] * 5
    assert verdicts[-1].dead == "failed 3 health checks"
    # the count starts over once a verdict of death is given
    [probe] = h.due(f, now + 1.0)
    assert h.finished(probe, MISS).misses == 1


def test_only_ready_own_instances_of_routes_that_ask_for_it_are_probed() -> None:
    f = fleet(replace(ROUTE, health_interval_s=1.0), replace(ROUTE, name="off", image="off", health_interval_s=0.0))
    h = HealthChecks()
    booting = of(Boot, f.request_arrived("site", 1, "k", None, 0.0))[0]
    off = of(Boot, f.request_arrived("off", 2, "k", None, 0.0))[0]
    f.instance_ready(off.instance_id, addr(2), 0.0)
    f.foreign_seen([Foreign("other-1", "site", "site", "h1", "local", addr(3), owner="other")], 0.0)
    assert h.due(f, 100.0) == []  # booting, interval 0, another engine's
    f.instance_ready(booting.instance_id, addr(1), 100.0)
    f.set_routes((replace(ROUTE, name="off", image="off", health_interval_s=0.0),), 100.0)  # "site" removed
    assert h.due(f, 200.0) == []  # a removed route's instances drain: no probes


def test_a_stopped_instance_leaves_no_schedule_behind() -> None:
    f, iid = ready_fleet(interval_s=1.0)
    h = HealthChecks()
    [probe] = h.due(f, 2.0)
    h.finished(probe, MISS)
    h.forget(iid)
    assert iid not in h.last_probe and iid not in h.misses
