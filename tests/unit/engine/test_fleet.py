"""The fleet engine with a fake clock: no sockets, no sleeps."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import invariant, precondition, rule

from proxy.config import Host, Limits, Region, Route
from proxy.engine.fleet import Boot, Fleet, Forward, Record, Reject, Stop
from proxy.engine.lifecycle import TRANSITIONS, LifecycleError, State, next_state
from proxy.engine.scaler import ScalerSettings
from tests.unit.engine.fleet_driver import FleetDriver, addr


def replace(route: Route, **changes: object) -> Route:
    return route._replace(**changes)  # type: ignore[arg-type]


ROUTE = Route(name="site", image="site", idle_timeout_s=60.0, boot_timeout_s=10.0, queue_size=100,
              max_replicas=4, target_concurrency=10)


def fleet(*routes: Route, cap: int = 8, hosts: tuple[Host, ...] | None = None,
          regions: tuple[Region, ...] = (), scaler: ScalerSettings | None = None, budget: float | None = None) -> Fleet:
    f = Fleet(Limits(max_instances=cap, budget_instance_seconds_per_hour=budget),
              hosts or (Host("h1", "local", slots=16),), regions,
              default_region=regions[0].name if regions else "local", scaler=scaler)
    f.set_routes(routes or (ROUTE,), 0.0)
    return f


def of(kind: type, commands: list) -> list:
    return [c for c in commands if isinstance(c, kind)]


def boot_ready(f: Fleet, out: list, now: float) -> list:
    """Make every Boot in `out` ready; return all resulting commands."""
    result = []
    for i, b in enumerate(of(Boot, out)):
        result += f.instance_ready(b.instance_id, addr(i), now)
    return result


def test_cold_request_boots_once_and_waits_then_forwards() -> None:
    f = fleet(replace(ROUTE, queue_size=1000))
    out = f.request_arrived("site", 1, "k", None, 0.0)
    boots = of(Boot, out)
    assert len(boots) == 1 and not of(Forward, out)
    # 499 more arrive during the boot: no new boot, all wait
    for rid in range(2, 501):
        more = f.request_arrived("site", rid, f"k{rid}", None, 0.1)
        assert not of(Boot, more) and not of(Forward, more) and not of(Reject, more)
    assert len(f.pools["site"].queue) == 500
    done = f.instance_ready(boots[0].instance_id, addr(1), 1.0)
    forwards = of(Forward, done)
    assert len(forwards) == 500 and {fw.instance_id for fw in forwards} == {boots[0].instance_id}
    assert sorted(fw.request_id for fw in forwards) == list(range(1, 501))
    ready = [r for r in of(Record, done) if r.kind == "ready"]
    assert ready and ready[0].duration_s == pytest.approx(1.0)


def test_queue_overflow_rejects_at_once_with_retry_after() -> None:
    f = fleet(replace(ROUTE, queue_size=3))
    outs = [f.request_arrived("site", rid, "k", None, 0.0) for rid in range(1, 6)]
    assert len(of(Boot, outs[0])) == 1
    rejected = [c for out in outs for c in of(Reject, out)]
    assert [r.request_id for r in rejected] == [4, 5]
    assert all(r.retry_after_s >= 1 for r in rejected)


def test_request_waiting_longer_than_boot_timeout_gets_503() -> None:
    f = fleet(replace(ROUTE, boot_timeout_s=5.0))
    out = f.request_arrived("site", 1, "k", None, 0.0)
    assert of(Boot, out)
    assert not of(Reject, f.tick(4.9))
    late = f.tick(5.0)
    assert [r.request_id for r in of(Reject, late)] == [1]
    # the boot itself is given up too, with an event and a stop
    late += f.tick(5.2)
    assert of(Stop, late)
    assert any(r.kind == "failed" for r in of(Record, late))


def test_cancelled_request_leaves_the_queue() -> None:
    f = fleet()
    f.request_arrived("site", 1, "k", None, 0.0)
    f.request_arrived("site", 2, "k", None, 0.0)
    f.request_cancelled("site", 1, 0.1)
    assert list(f.pools["site"].queue) == [2]


def test_boot_failure_rejects_waiters_and_backs_off_exponentially() -> None:
    f = fleet()
    out = f.request_arrived("site", 1, "k", None, 0.0)
    iid = of(Boot, out)[0].instance_id
    failed = f.boot_failed(iid, "exit 1", 0.5)
    assert [r.request_id for r in of(Reject, failed)] == [1]
    assert of(Stop, failed) and any(r.kind == "failed" for r in of(Record, failed))
    f.instance_stopped(iid, 0.6)
    # during back-off: no new boot, immediate 503 with Retry-After
    during = f.request_arrived("site", 2, "k", None, 0.8)
    assert not of(Boot, during) and of(Reject, during)[0].retry_after_s >= 1
    # after back-off (1 s): a new boot; a second failure doubles the back-off
    again = f.request_arrived("site", 3, "k", None, 1.6)
    iid2 = of(Boot, again)[0].instance_id
    f.boot_failed(iid2, "exit 1", 1.7)
    f.instance_stopped(iid2, 1.8)
    assert f.pools["site"].backoff_until == pytest.approx(1.7 + 2.0)
    assert of(Reject, f.request_arrived("site", 4, "k", None, 3.0))
    assert of(Boot, f.request_arrived("site", 5, "k", None, 3.8))


def test_idle_instance_drains_and_stops_then_next_request_boots_again() -> None:
    f = fleet(replace(ROUTE, idle_timeout_s=30.0))
    out = f.request_arrived("site", 1, "k", None, 0.0)
    iid = of(Boot, out)[0].instance_id
    f.instance_ready(iid, addr(1), 1.0)
    f.request_finished("site", iid, True, 1.1)
    assert not of(Stop, f.tick(30.0))
    stop = f.tick(31.2)
    assert [s.instance_id for s in of(Stop, stop)] == [iid]
    stopped = f.instance_stopped(iid, 31.5)
    assert any(r.kind == "stopped" for r in of(Record, stopped))
    assert f.live_count() == 0
    assert of(Boot, f.request_arrived("site", 2, "k", None, 40.0))


def test_draining_waits_for_inflight_requests() -> None:
    f = fleet(replace(ROUTE, idle_timeout_s=5.0))
    iid = of(Boot, f.request_arrived("site", 1, "k", None, 0.0))[0].instance_id
    f.instance_ready(iid, addr(1), 0.5)
    # request 1 is still in flight at t=10: the instance is busy, not idle
    assert not of(Stop, f.tick(10.0))
    f.request_finished("site", iid, True, 10.0)
    assert of(Stop, f.tick(15.1))


def test_long_request_keeps_instance_past_idle_timeout_and_idle_counts_from_its_end() -> None:
    """A WebSocket tunnel is one request in flight for its whole life."""
    f = fleet(replace(ROUTE, idle_timeout_s=5.0))
    iid = of(Boot, f.request_arrived("site", 1, "k", None, 0.0))[0].instance_id
    f.instance_ready(iid, addr(1), 0.5)
    for t in range(1, 100):  # open for 20 idle timeouts
        assert not of(Stop, f.tick(float(t))) and f.instances[iid].state is State.READY
    f.request_finished("site", iid, True, 100.0)
    assert not of(Stop, f.tick(104.9)), "idle_timeout counts from the end of the tunnel"
    assert of(Stop, f.tick(105.0))


def test_draining_instance_is_stopped_at_drain_timeout_with_requests_still_open() -> None:
    a = replace(ROUTE, name="a", image="a")
    f = Fleet(Limits(max_instances=8), (Host("h1", "local", slots=8),), drain_timeout_s=30.0)
    f.set_routes((a,), 0.0)
    iid = of(Boot, f.request_arrived("a", 1, "k", None, 0.0))[0].instance_id
    f.instance_ready(iid, addr(1), 0.5)
    out = f.set_routes((replace(a, image="a2"),), 10.0)  # a new image: a rolling deploy
    (new,) = of(Boot, out)
    f.instance_ready(new.instance_id, addr(2), 10.0)  # the new version ready: the old instance drains
    assert f.instances[iid].state is State.DRAINING
    assert not of(Stop, f.tick(39.9)), "an open tunnel is cut only at drain_timeout"
    (stop,) = of(Stop, f.tick(40.0))
    assert stop.instance_id == iid and "drain_timeout" in stop.reason
    assert not of(Stop, f.tick(41.0)), "stopped once"
    f.instance_stopped(iid, 41.5)
    assert f.request_finished("a", iid, False, 42.0) == []  # the cut tunnel ends after its instance


def test_min_replicas_keeps_instances_warm() -> None:
    f = Fleet(Limits(max_instances=8), (Host("h1", "local", slots=8),))
    out = f.set_routes((replace(ROUTE, min_replicas=2, idle_timeout_s=1.0),), 0.0)
    boots = of(Boot, out) + of(Boot, f.tick(0.1))
    boots += of(Boot, f.tick(0.2))
    assert len(boots) >= 1
    for i, b in enumerate(boots):
        f.instance_ready(b.instance_id, addr(i), 1.0)
    for t in range(2, 10):
        for b in of(Boot, f.tick(float(t))):
            f.instance_ready(b.instance_id, addr(99 + t), float(t))
    assert f.pools["site"].count(State.READY) == 2
    assert not of(Stop, f.tick(100.0))


def test_scale_out_under_sustained_load_and_back_in() -> None:
    settings_ = ScalerSettings(stable_window_s=10.0, panic_window_s=1.0, scale_in_delay_s=5.0)
    f = fleet(replace(ROUTE, target_concurrency=10, max_replicas=4, idle_timeout_s=20.0), scaler=settings_)
    iid = of(Boot, f.request_arrived("site", 0, "k", None, 0.0))[0].instance_id
    f.instance_ready(iid, addr(0), 0.5)
    # 35 requests in flight for a while: wants ceil(35/10) = 4 replicas
    rid = 1
    for _ in range(34):
        f.request_arrived("site", rid, f"k{rid}", None, 1.0)
        rid += 1
    boots = []
    t = 1.0
    for _ in range(40):
        t += 0.1
        out = f.tick(t)
        boots += of(Boot, out)
        boot_ready(f, out, t + 0.05)
    assert len(f.pools["site"].live()) == 4  # max_replicas, never more
    assert len(boots) == 3  # the scaler added three replicas to the first one
    # load goes away: in-flight requests finish
    for inst in list(f.pools["site"].instances.values()):
        for _ in range(inst.inflight):
            f.request_finished("site", inst.id, True, t)
    stops = []
    late_boots = []
    for _ in range(400):
        t += 0.1
        out = f.tick(t)
        late_boots += of(Boot, out)
        stops += of(Stop, out)
        for s in stops:
            if s.instance_id in f.instances:
                f.instance_stopped(s.instance_id, t)
    assert f.live_count() == 0  # all the way to zero once idle
    assert late_boots == []  # the averages still remember the load, but nothing boots without demand


def test_panic_mode_reacts_to_a_spike_before_the_stable_window() -> None:
    settings_ = ScalerSettings(stable_window_s=60.0, panic_window_s=2.0, scale_in_delay_s=30.0)
    f = fleet(replace(ROUTE, target_concurrency=5, max_replicas=8), scaler=settings_)
    iid = of(Boot, f.request_arrived("site", 0, "k", None, 0.0))[0].instance_id
    f.instance_ready(iid, addr(0), 0.5)
    f.request_finished("site", iid, True, 0.6)
    t = 0.6
    for _ in range(100):  # a quiet minute: low stable average
        t += 0.5
        f.tick(t)
    for rid in range(1, 31):  # a spike: 30 concurrent, 6x the target
        f.request_arrived("site", rid, f"k{rid}", None, t)
    decisions = []
    for _ in range(5):
        t += 0.1
        out = f.tick(t)
        decisions += [r for r in of(Record, out) if r.kind == "scale"]
        boot_ready(f, out, t)
    assert decisions and decisions[0].detail["panic"] is True
    assert len(f.pools["site"].live()) >= 3


def test_placement_prefers_client_region_then_nearest() -> None:
    regions = (Region("eu", ("us",)), Region("us", ("eu",)), Region("ap", ("us", "eu")))
    hosts = (Host("eu1", "eu", slots=1), Host("us1", "us", slots=2), Host("ap1", "ap", slots=1))
    f = fleet(replace(ROUTE, max_replicas=8), regions=regions, hosts=hosts)
    b1 = of(Boot, f.request_arrived("site", 1, "k", "ap", 0.0))[0]
    assert (b1.host, b1.region) == ("ap1", "ap")
    f.instance_ready(b1.instance_id, addr(1), 0.1)
    f2 = fleet(replace(ROUTE, name="other", image="x"), regions=regions, hosts=hosts)
    f2.host_used["ap1"] = 1  # ap is full: the next nearest for ap is us
    b2 = of(Boot, f2.request_arrived("other", 1, "k", "ap", 0.0))[0]
    assert b2.region == "us"
    f2.host_used["us1"] = 2  # us full too: then eu
    f2.pools["other"].instances.clear()
    f2.instances.clear()
    b3 = of(Boot, f2.request_arrived("other", 2, "k", "ap", 1.0))
    assert len(b3) == 1 and b3[0].region == "eu"


def test_requests_prefer_replicas_in_their_own_region() -> None:
    regions = (Region("eu", ("us",)), Region("us", ("eu",)))
    hosts = (Host("eu1", "eu"), Host("us1", "us"))
    f = fleet(replace(ROUTE, max_replicas=4), regions=regions, hosts=hosts)
    eu = of(Boot, f.request_arrived("site", 1, "a", "eu", 0.0))[0]
    f.instance_ready(eu.instance_id, addr(1), 0.1)
    f.request_finished("site", eu.instance_id, True, 0.1)
    us = f._boot(f.pools["site"], "us", 0.2, "test", out := [])
    assert us
    us_id = of(Boot, out)[0].instance_id
    f.instance_ready(us_id, addr(2), 0.3)
    picks = [of(Forward, f.request_arrived("site", 10 + i, f"key{i}", "us", 1.0))[0] for i in range(3)]
    assert all(p.instance_id == us_id for p in picks[:2])  # own region while under the load bound


def test_global_cap_reclaims_lru_idle_instance_of_another_route() -> None:
    a = replace(ROUTE, name="a", image="a")
    b = replace(ROUTE, name="b", image="b")
    f = fleet(a, b, cap=1)
    ia = of(Boot, f.request_arrived("a", 1, "k", None, 0.0))[0].instance_id
    f.instance_ready(ia, addr(1), 0.1)
    f.request_finished("a", ia, True, 0.2)
    out = f.request_arrived("b", 2, "k", None, 1.0)
    # a's idle instance is reclaimed; b's boot waits for the slot, never exceeding the cap
    assert [s.instance_id for s in of(Stop, out)] == [ia]
    assert not of(Boot, out) and f.live_count() <= 1
    after = f.instance_stopped(ia, 1.5)
    assert len(of(Boot, after)) == 1 and f.live_count() == 1


def test_cap_with_nothing_to_reclaim_rejects_with_retry_after() -> None:
    a = replace(ROUTE, name="a", image="a")
    b = replace(ROUTE, name="b", image="b")
    f = fleet(a, b, cap=1)
    ia = of(Boot, f.request_arrived("a", 1, "k", None, 0.0))[0].instance_id
    f.instance_ready(ia, addr(1), 0.1)  # request 1 still in flight: not idle
    out = f.request_arrived("b", 2, "k", None, 1.0)
    assert of(Reject, out) and not of(Boot, out)
    assert any(r.kind == "cap_reached" for r in of(Record, out))


def test_budget_stops_scale_out_when_spent() -> None:
    f = fleet(budget=100.0)
    iid = of(Boot, f.request_arrived("site", 1, "k", None, 0.0))[0].instance_id
    f.instance_ready(iid, addr(1), 1.0)
    f.request_finished("site", iid, True, 1.0)
    f.tick(61.5)  # idle: stops
    f.instance_stopped(iid, 62.0)  # 62 instance-seconds spent
    iid2 = of(Boot, f.request_arrived("site", 2, "k", None, 63.0))[0].instance_id
    f.instance_ready(iid2, addr(2), 64.0)
    f.request_finished("site", iid2, True, 64.0)
    f.tick(110.0)
    f.instance_stopped(iid2, 110.0)  # 47 more: 109 > 100
    out = f.request_arrived("site", 3, "k", None, 111.0)
    assert of(Reject, out) and any(r.kind == "budget_spent" for r in of(Record, out))
    assert of(Boot, f.request_arrived("site", 4, "k", None, 3700.0))  # an hour later


def test_reload_keeps_unchanged_pools_and_drains_removed_ones() -> None:
    a = replace(ROUTE, name="a", image="a")
    b = replace(ROUTE, name="b", image="b")
    f = fleet(a, b)
    ia = of(Boot, f.request_arrived("a", 1, "k", None, 0.0))[0].instance_id
    ib = of(Boot, f.request_arrived("b", 2, "k", None, 0.0))[0].instance_id
    f.instance_ready(ia, addr(1), 0.1)
    f.instance_ready(ib, addr(2), 0.1)
    f.request_finished("a", ia, True, 0.2)
    f.request_finished("b", ib, True, 0.2)
    out = f.set_routes((a,), 1.0)
    assert [s.instance_id for s in of(Stop, out)] == [ib]
    assert f.instances[ia].state is State.READY


def test_lifecycle_table_rejects_illegal_transitions() -> None:
    assert next_state(State.BOOTING, "ready") is State.READY
    with pytest.raises(LifecycleError):
        next_state(State.STOPPED, "ready")
    for state, moves in TRANSITIONS.items():
        for event in ("ready", "drain", "fail", "stop"):
            if event in moves:
                assert next_state(state, event) is moves[event]
            else:
                with pytest.raises(LifecycleError):
                    next_state(state, event)


class FleetMachine(FleetDriver):
    """Random interleavings of many pools scaling at once: the caps always hold."""

    def __init__(self) -> None:
        super().__init__()
        routes = tuple(replace(ROUTE, name=f"r{i}", image=f"r{i}", max_replicas=3, target_concurrency=1,
                               idle_timeout_s=2.0, queue_size=5) for i in range(4))
        self.routes = routes
        self.fleet = Fleet(Limits(max_instances=5), (Host("h1", "a", slots=3), Host("h2", "b", slots=3)),
                           (Region("a", ("b",)), Region("b", ("a",))), default_region="a",
                           scaler=ScalerSettings(stable_window_s=3.0, panic_window_s=0.5, scale_in_delay_s=1.0))
        self.fleet.set_routes(routes, 0.0)

    @rule(route=st.integers(0, 3), region=st.sampled_from(["a", "b"]), trial_ok=st.booleans())
    def request(self, route: int, region: str, trial_ok: bool) -> None:
        self.rid += 1
        self._apply(self.fleet.request_arrived(f"r{route}", self.rid, str(self.rid), region, self.now,
                                               trial_ok=trial_ok))

    @precondition(lambda self: self.booting)
    @rule(i=st.integers(0, 1000))
    def started(self, i: int) -> None:
        iid = self.booting[i % len(self.booting)]
        self._apply(self.fleet.instance_started(iid, addr(i), self.now))

    @invariant()
    def caps_hold(self) -> None:
        f = self.fleet
        assert f.live_count() <= 5
        for pool in f.pools.values():
            assert len(pool.live()) <= pool.route.max_replicas
        for host in f.hosts.values():
            live_on_host = sum(1 for i in f.instances.values() if i.host == host.name)
            assert live_on_host <= host.slots
            assert f.host_used[host.name] == live_on_host

    @invariant()
    def inflight_adds_up(self) -> None:
        # every forwarded request (trials included) is counted once, on its instance and
        # (once the instance is in rotation) in the balancer
        for inst in self.fleet.instances.values():
            mine = sum(1 for _, iid, _ in self.inflight if iid == inst.id)
            assert inst.inflight == mine
            load = self.fleet.pools[inst.route].balancer.load
            if inst.id in load:
                assert load[inst.id] == mine


TestFleetCaps = FleetMachine.TestCase
TestFleetCaps.settings = settings(max_examples=60, stateful_step_count=60, deadline=None)


# --- trials: a cold pool's first idempotent request probes the booting instance ---------


def test_instance_started_sends_the_first_retryable_request_as_its_trial() -> None:
    f = fleet()
    boot = of(Boot, f.request_arrived("site", 1, "k", None, 0.0))[0]  # a POST: not safe, not trial_ok
    f.request_arrived("site", 2, "k", None, 0.1, trial_ok=True)
    f.request_arrived("site", 3, "k", None, 0.1, trial_ok=True)
    out = f.instance_started(boot.instance_id, addr(1), 0.5)
    assert out == [Forward(2, boot.instance_id, addr(1), trial=True)]
    assert list(f.pools["site"].queue) == [1, 3]
    assert f.instances[boot.instance_id].inflight == 1
    assert f.instance_started(boot.instance_id, addr(1), 0.6) == []  # one trial per instance
    # ready: the others are forwarded and the trial counts in the balancer's load
    ready = f.instance_ready(boot.instance_id, addr(1), 1.0)
    assert [c.request_id for c in of(Forward, ready)] == [1, 3]
    assert not any(c.trial for c in of(Forward, ready))
    assert f.pools["site"].balancer.load[boot.instance_id] == 3
    for _ in range(3):
        f.request_finished("site", boot.instance_id, True, 2.0)
    assert f.pools["site"].balancer.load[boot.instance_id] == 0
    assert f.instances[boot.instance_id].inflight == 0


def test_a_failed_boot_rejects_its_trial_with_the_queue() -> None:
    f = fleet()
    boot = of(Boot, f.request_arrived("site", 1, "k", None, 0.0, trial_ok=True))[0]
    f.request_arrived("site", 2, "k", None, 0.0, trial_ok=True)
    assert of(Forward, f.instance_started(boot.instance_id, addr(1), 0.5))[0].request_id == 1
    out = f.boot_failed(boot.instance_id, "guest crashed", 1.0)
    rejected = of(Reject, out)
    assert sorted(r.request_id for r in rejected) == [1, 2]
    assert all(r.retry_after_s >= 1 for r in rejected)
    assert f.instances[boot.instance_id].inflight == 0


def test_a_trial_whose_client_left_does_not_count_once_ready() -> None:
    f = fleet()
    boot = of(Boot, f.request_arrived("site", 1, "k", None, 0.0, trial_ok=True))[0]
    f.instance_started(boot.instance_id, addr(1), 0.5)
    assert f.request_finished("site", boot.instance_id, False, 0.6) == []
    inst = f.instances[boot.instance_id]
    assert inst.inflight == 0 and inst.trial is None and inst.state is State.BOOTING
    f.instance_ready(boot.instance_id, addr(1), 1.0)
    assert f.pools["site"].balancer.load[boot.instance_id] == 0



def test_an_unreachable_host_backs_off_exponentially_until_it_starts_an_instance() -> None:
    hosts = (Host("h1", "local", slots=4), Host("h2", "local", slots=4))
    f = fleet(hosts=hosts)
    delays = [of(Record, f.host_unreachable("h1", 0.0))[0].detail["retry_in_s"] for _ in range(8)]
    assert delays == [5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 300.0, 300.0]
    assert f.host_down_until["h1"] == 300.0
    boot = of(Boot, f.request_arrived("site", 1, "k", None, 1.0))[0]
    assert boot.host == "h2"  # placed elsewhere meanwhile
    f.instance_started(boot.instance_id, addr(1), 2.0)
    assert f.host_failures == {"h1": 8}  # only h1's own success resets h1
    f2 = fleet(hosts=(Host("h1", "local", slots=4),))
    f2.host_unreachable("h1", 0.0)
    f2.host_unreachable("h1", 0.0)
    b = of(Boot, f2.request_arrived("site", 1, "k", None, 100.0))[0]
    f2.instance_started(b.instance_id, addr(1), 101.0)
    assert of(Record, f2.host_unreachable("h1", 102.0))[0].detail["retry_in_s"] == 5.0


def test_a_cold_request_that_cannot_boot_is_told_why() -> None:
    f = fleet(ROUTE, replace(ROUTE, name="b", image="b"), cap=1)
    boot = of(Boot, f.request_arrived("site", 1, "k", None, 0.0))[0]
    f.instance_ready(boot.instance_id, addr(1), 0.5)  # busy with request 1: nothing to reclaim
    [reject] = of(Reject, f.request_arrived("b", 2, "k", None, 1.0))
    assert reject.reason == "instance cap reached (1)" and not f.pools["b"].queue
    h = fleet(hosts=(Host("h1", "local", slots=1),))
    h.host_used["h1"] = 1
    [reject] = of(Reject, h.request_arrived("site", 1, "k", None, 0.0))
    assert reject.reason == "no host has a free slot"
    refused = h._boot(h.pools["site"], "local", 0.0, "test", out := [])
    assert not refused and refused.reason == "no host has a free slot" and not of(Boot, out)


def test_a_host_its_driver_reports_down_is_out_of_placement_until_reported_up() -> None:
    f = fleet(hosts=(Host("h1", "eu", slots=4), Host("h2", "eu", slots=4)))
    f.host_unreachable("h1", 0.0)
    [down] = f.host_reported("h1", False, "keepalive lost", [], 1.0)
    assert (down.kind, down.host, down.region, down.detail) == ("host_down", "h1", "eu", {"reason": "keepalive lost"})
    assert of(Boot, f.request_arrived("site", 1, "k", None, 3600.0))[0].host == "h2"  # held, not a back-off
    [up] = f.host_reported("h1", True, "", ["old-1"], 4000.0)
    assert (up.kind, up.detail) == ("host_up", {"reaped": ["old-1"]})
    assert f.host_down_until["h1"] <= 4000.0 and "h1" not in f.host_failures  # at once, no back-off left
def test_ready_carries_the_boot_phases_that_add_up_to_the_boot() -> None:
    f = fleet()
    boot = of(Boot, f.request_arrived("site", 1, "k", None, 10.0))[0]
    f.instance_started(boot.instance_id, addr(1), 10.3)
    # the driver's marks, each the end of the phase it names (same clock as `now`)
    marks = {"prepare": 10.01, "libvirt_create": 10.02, "qemu_up": 10.3, "firmware": 10.8, "init": 12.2,
             "network": 12.5, "server": 12.53}
    ready = [r for r in of(Record, f.instance_ready(boot.instance_id, addr(1), 12.6, marks=marks)) if r.kind == "ready"]
    phases = ready[0].detail["phases"]
    assert list(phases) == [*marks, "first_response"]
    assert phases["firmware"] == pytest.approx(0.5) and phases["first_response"] == pytest.approx(0.07)
    assert sum(phases.values()) == pytest.approx(ready[0].duration_s, abs=1e-3)
    assert ready[0].detail["image"] == "site"


def test_boot_phases_never_go_negative() -> None:
    from proxy.engine.fleet import boot_phases

    # a mark read at a coarser resolution may land before the one before it, or after ready
    got = boot_phases(0.0, {"a": 0.5, "b": 0.45, "c": 2.0}, 1.0)
    assert got == {"a": 0.5, "b": 0.0, "c": 0.5, "first_response": 0.0}


def test_ready_without_marks_has_no_phases() -> None:
    f = fleet()
    boot = of(Boot, f.request_arrived("site", 1, "k", None, 0.0))[0]
    ready = [r for r in of(Record, f.instance_ready(boot.instance_id, addr(1), 1.0)) if r.kind == "ready"]
    assert "phases" not in ready[0].detail


def test_a_pool_is_steady_only_when_ready_at_max_replicas_with_nothing_queued() -> None:
    """What the plugin's decision cache relies on (proxy.plugin.decide): no scale-out can follow."""
    f = fleet(replace(ROUTE, max_replicas=1))
    assert not f.steady("site") and not f.steady("nowhere")  # cold
    out = f.request_arrived("site", 1, "k", None, 0.0)
    assert not f.steady("site")  # booting, one queued
    boot_ready(f, out, 1.0)
    assert f.steady("site")
    wide = fleet(ROUTE)  # max_replicas 4: one ready replica may still be joined by more
    boot_ready(wide, wide.request_arrived("site", 1, "k", None, 0.0), 1.0)
    assert not wide.steady("site")
