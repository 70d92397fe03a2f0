"""Paused standbys (`start = "resume"`) in the fleet engine, with a fake clock."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import invariant, precondition, rule

from proxy.config import Host, Limits, Route
from proxy.engine.fleet import Boot, Fleet, Forward, Record, Resume, Stop
from proxy.engine.lifecycle import STANDBYS, State
from tests.unit.engine.test_fleet import FleetMachine, addr, of, replace

RESUME = Route(name="site", image="site", start="resume", standbys=1, idle_timeout_s=60.0, boot_timeout_s=10.0,
               max_replicas=4)
OTHER = Route(name="other", image="other", idle_timeout_s=60.0, boot_timeout_s=10.0)


def fleet(*routes: Route, cap: int = 8, standby_mib: int = 1024, memory: int = 128, slots: int = 16) -> tuple[Fleet, list]:
    f = Fleet(Limits(max_instances=cap), (Host("h1", "local", slots=slots, standby_memory_mib=standby_mib),),
              memory_of=lambda route: memory)
    return f, f.set_routes(routes or (RESUME,), 0.0)


def park_all(f: Fleet, out: list, now: float) -> list[str]:
    ids = [b.instance_id for b in of(Boot, out) if b.standby]
    for n, iid in enumerate(ids):
        f.standby_parked(iid, addr(n), now)
    return ids


def kinds(out: list) -> list[str]:
    return [r.kind for r in of(Record, out)]


def test_a_resume_route_keeps_one_standby_booted_then_paused() -> None:
    f, out = fleet()
    boots = of(Boot, out)
    assert len(boots) == 1 and boots[0].standby and not boots[0].cold
    iid = boots[0].instance_id
    assert f.instances[iid].state is State.PREPARING
    assert not of(Boot, f.tick(1.0)), "one standby is being prepared: no second one"
    parked = f.standby_parked(iid, addr(1), 2.0)
    assert kinds(parked) == ["standby"] and f.instances[iid].state is State.STANDBY
    for t in range(3, 30):
        assert not of(Boot, f.tick(float(t))), "the pool has its standby"
    assert f.snapshot()["totals"]["standby"]["memory_mib"] == 128
    assert f.snapshot()["totals"]["instances"] == 1, "a standby counts against the cap"


def test_a_boot_route_keeps_no_standby() -> None:
    f, out = fleet(replace(RESUME, start="boot"))
    assert not of(Boot, out) and not of(Boot, f.tick(5.0))


def test_a_cold_request_resumes_the_standby_instead_of_booting() -> None:
    f, out = fleet()
    (iid,) = park_all(f, out, 2.0)
    out = f.request_arrived("site", 1, "k", None, 10.0, trial_ok=True)
    assert of(Resume, out) == [Resume(iid, "site", "h1")] and not of(Boot, out)
    assert f.instances[iid].state is State.BOOTING
    trial = f.instance_started(iid, addr(1), 10.01)
    assert trial == [Forward(1, iid, addr(1), trial=True)]
    ready = f.instance_ready(iid, addr(1), 10.03, by="request", marks={"resume": 10.01})
    (rec,) = [r for r in of(Record, ready) if r.kind == "ready"]
    assert rec.detail["start"] == "resume"
    assert abs(rec.duration_s - 0.03) < 1e-9, "resume to first answer, not since the standby's boot"
    assert rec.detail["phases"] == {"resume": 0.01, "first_response": 0.02}
    # warm now: the next request is forwarded at once
    assert of(Forward, f.request_arrived("site", 2, "k", None, 10.1)) == [Forward(2, iid, addr(1))]


def test_the_standby_is_refilled_once_the_resumed_instance_is_ready() -> None:
    f, out = fleet()
    (iid,) = park_all(f, out, 2.0)
    f.request_arrived("site", 1, "k", None, 10.0, trial_ok=True)
    f.instance_started(iid, addr(1), 10.01)
    assert not of(Boot, f.tick(10.02)), "no standby boot beside a start in flight"
    f.instance_ready(iid, addr(1), 10.05, by="request")
    boots = of(Boot, f.tick(10.1))
    assert len(boots) == 1 and boots[0].standby and boots[0].instance_id != iid
    assert [r for r in of(Record, f.tick(10.2)) if r.kind == "summoned"] == []


def test_without_a_standby_a_cold_request_boots() -> None:
    f, _ = fleet()  # the standby is still being prepared
    out = f.request_arrived("site", 1, "k", None, 0.5, trial_ok=True)
    boots = of(Boot, out)
    assert len(boots) == 1 and not boots[0].standby and boots[0].cold and not of(Resume, out)


def test_standbys_are_reclaimed_first_at_the_cap() -> None:
    f, out = fleet(RESUME, OTHER, replace(OTHER, name="third", image="third"), cap=2)
    park_all(f, out, 1.0)
    other = of(Boot, f.request_arrived("other", 1, "k", None, 2.0))[0].instance_id
    f.instance_ready(other, addr(5), 3.0)
    f.request_finished("other", other, True, 3.0)
    assert f.live_count() == 2
    out = f.request_arrived("third", 2, "k", None, 50.0)
    stops = of(Stop, out)
    assert len(stops) == 1 and "standby" in stops[0].reason
    assert f.instances[stops[0].instance_id].route == "site", "the standby, not other's idle instance"
    assert f.instances[other].state is State.READY
    # once the standby is gone, the real boot takes its slot, and no standby comes back into it
    after = f.instance_stopped(stops[0].instance_id, 51.0)
    assert [b.route for b in of(Boot, after)] == ["third"]
    assert not of(Boot, f.tick(52.0))


def test_a_standby_never_reclaims_anything() -> None:
    f, out = fleet(RESUME, OTHER, cap=1)
    assert of(Boot, out)  # the free slot: a standby
    f, out = fleet(OTHER, cap=1)
    inst = of(Boot, f.request_arrived("other", 1, "k", None, 0.0))[0].instance_id
    f.instance_ready(inst, addr(1), 1.0)
    f.request_finished("other", inst, True, 1.0)
    out = f.set_routes((OTHER, RESUME), 2.0)
    assert not of(Boot, out) and not of(Stop, out) and not of(Boot, f.tick(3.0))


def test_standbys_never_exceed_the_host_memory_budget() -> None:
    f, out = fleet(replace(RESUME, standbys=3), standby_mib=300, memory=128)
    for t in range(1, 10):
        park_all(f, out, float(t))
        out = f.tick(float(t) + 0.5)
    parked = [i for i in f.instances.values() if i.state in STANDBYS]
    assert len(parked) == 2, "2 x 128 MiB fit in 300 MiB, a third does not"
    assert f.standby_memory_mib("h1") == 256
    assert f.snapshot()["totals"]["standby"]["hosts"] == {"h1": {"memory_mib": 256, "budget_mib": 300}}


def test_standbys_do_not_count_against_max_replicas() -> None:
    f, out = fleet(replace(RESUME, max_replicas=1))
    (iid,) = park_all(f, out, 1.0)
    out = f.request_arrived("site", 1, "k", None, 2.0)
    assert of(Resume, out)


def test_a_standby_that_dies_is_replaced_and_a_failed_one_backs_off() -> None:
    f, out = fleet()
    (iid,) = park_all(f, out, 1.0)
    died = f.instance_died(iid, "domain gone", 2.0)
    assert of(Stop, died) and f.instances[iid].state is State.FAILED
    f.instance_stopped(iid, 2.5)
    boot = of(Boot, f.tick(3.0))[0]
    failed = f.boot_failed(boot.instance_id, "no HTTP", 4.0)
    assert [r.detail["phase"] for r in of(Record, failed) if r.kind == "failed"] == ["standby"]
    f.instance_stopped(boot.instance_id, 4.1)
    assert not of(Boot, f.tick(4.5)), "backing off"
    assert of(Boot, f.tick(6.0))


def test_removing_the_route_or_lowering_standbys_stops_them() -> None:
    f, out = fleet(replace(RESUME, standbys=2))
    park_all(f, out, 1.0)
    park_all(f, f.tick(2.0), 2.5)
    assert len([i for i in f.instances.values() if i.state is State.STANDBY]) == 2
    out = f.set_routes((RESUME,), 3.0)
    assert len(of(Stop, out)) == 1 and not of(Stop, f.tick(3.1)), "one Stop, not one per tick"
    out = f.set_routes((OTHER,), 4.0)
    assert len(of(Stop, out)) == 1


class StandbyMachine(FleetMachine):
    """The caps machine with every route resuming standbys: caps, slots and the
    standby memory budget always hold, whatever interleaving."""

    def __init__(self) -> None:
        super().__init__()
        self.fleet.memory_of = lambda route: 128
        for name in list(self.fleet.hosts):
            self.fleet.hosts[name] = Host(name, self.fleet.hosts[name].region, slots=3, standby_memory_mib=300)
        routes = tuple(replace(r, start="resume", standbys=2) for r in self.routes)
        self.preparing: list[str] = []
        self._apply(self.fleet.set_routes(routes, 0.0))

    def _apply(self, out: list) -> None:
        for c in out:
            if isinstance(c, Boot) and c.standby:
                self.preparing.append(c.instance_id)
                continue
            if isinstance(c, Resume):
                self.booting.append(c.instance_id)
        super()._apply([c for c in out if not (isinstance(c, Boot) and c.standby)])

    @precondition(lambda self: self.preparing)
    @rule(i=st.integers(0, 1000), ok=st.booleans())
    def parked(self, i: int, ok: bool) -> None:
        iid = self.preparing.pop(i % len(self.preparing))
        if ok:
            self._apply(self.fleet.standby_parked(iid, addr(i), self.now))
        else:
            self._apply(self.fleet.boot_failed(iid, "x", self.now))

    @invariant()
    def caps_hold(self) -> None:
        f = self.fleet
        assert f.live_count() <= 5
        for pool in f.pools.values():
            assert pool.replicas() <= pool.route.max_replicas
        for host in f.hosts.values():
            live_on_host = sum(1 for i in f.instances.values() if i.host == host.name)
            assert live_on_host <= host.slots
            assert f.host_used[host.name] == live_on_host
            assert f.standby_memory_mib(host.name) <= host.standby_memory_mib


TestStandbyCaps = StandbyMachine.TestCase
TestStandbyCaps.settings = settings(max_examples=60, stateful_step_count=60, deadline=None)


def test_a_deploy_stops_the_old_versions_standby_and_parks_one_of_the_new() -> None:
    f, out = fleet()
    (old,) = park_all(f, out, 2.0)
    out = f.deploy("site", "sha256:" + "2" * 64, 3.0)
    (stop,) = of(Stop, out)
    assert stop.instance_id == old and f.instances[old].stopping, "an old standby is never woken"
    f.instance_stopped(old, 3.5)
    (boot,) = of(Boot, f.tick(4.0))
    assert boot.standby and boot.version == "sha256:" + "2" * 64
    f.standby_parked(boot.instance_id, addr(2), 5.0)
    out = f.request_arrived("site", 1, "k", None, 6.0, trial_ok=True)
    assert of(Resume, out) == [Resume(boot.instance_id, "site", "h1")]
