"""Rolling deploys and rollbacks in the fleet engine, with a fake clock (rules in
proxy/engine/fleet.py, "Rolling deploy")."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import invariant, rule

from proxy.config import Host, Limits, Route
from proxy.engine.fleet import Boot, Fleet, Forward, Record, Stop
from proxy.engine.lifecycle import State
from tests.unit.engine.fleet_driver import FleetDriver, addr

V1, V2, V3 = "sha256:" + "1" * 64, "sha256:" + "2" * 64, "sha256:" + "3" * 64
ROUTE = Route(name="site", image="site", idle_timeout_s=600.0, boot_timeout_s=30.0, max_replicas=4,
              target_concurrency=1000)


def of(kind: type, commands: list) -> list:  # type: ignore[type-arg]
    return [c for c in commands if isinstance(c, kind)]


def records(kind: str, commands: list) -> list[Record]:  # type: ignore[type-arg]
    return [c for c in of(Record, commands) if c.kind == kind]


def warm(route: Route = ROUTE, replicas: int = 2, cap: int = 8) -> tuple[Fleet, list[str]]:
    """A fleet whose pool serves V1 on `replicas` ready instances."""
    f = Fleet(Limits(max_instances=cap), (Host("h1", "local", slots=16),))
    f.set_routes((route,), 0.0, versions={route.name: V1})
    ids = []
    for n in range(replicas):
        boot = f._boot(f.pools[route.name], "local", 0.0, "test", [])
        assert boot and boot.version == V1
        f.instance_ready(boot.instance_id, addr(n), 1.0)
        ids.append(boot.instance_id)
    return f, ids


def forward(f: Fleet, rid: int, now: float) -> Forward:
    (fwd,) = of(Forward, f.request_arrived("site", rid, f"key{rid}", None, now))
    return fwd


def test_old_instances_serve_until_a_new_one_is_ready_then_drain_and_stop() -> None:
    f, old = warm()
    busy = forward(f, 1, 2.0)  # in flight on an old instance across the switch
    out = f.deploy("site", V2, 3.0)
    (started,) = records("deploy_started", out)
    assert started.detail == {"from": V1, "to": V2, "reason": "deploy", "surge": 2, "cap_room": 6}
    boots = of(Boot, out)
    assert len(boots) == 2 and all(b.version == V2 for b in boots), "as many new as old were ready"
    for rid in range(2, 12):  # meanwhile every request goes to an old replica, none waits
        fwd = forward(f, rid, 3.5)
        assert fwd.instance_id in old
        f.request_finished("site", fwd.instance_id, True, 3.6)
    out = f.instance_ready(boots[0].instance_id, addr(10), 5.0)
    (deployed,) = records("deployed", out)
    assert deployed.detail["from"] == V1 and deployed.detail["to"] == V2 and deployed.detail["drained"] == 2
    assert all(f.instances[i].state is State.DRAINING for i in old)
    for rid in range(20, 40):  # only the new version takes requests now
        assert forward(f, rid, 5.5).instance_id == boots[0].instance_id
    # the old instance without requests stopped at once; the busy one when its request ends
    stopped = {s.instance_id for s in of(Stop, out)}
    assert busy.instance_id not in stopped and len(stopped & set(old)) == 1
    out = f.request_finished("site", busy.instance_id, True, 6.0)
    assert [s.instance_id for s in of(Stop, out)] == [busy.instance_id]
    assert f.pools["site"].rollout is None and f.pools["site"].previous == V1


def test_the_surge_counts_against_the_cap_not_max_replicas() -> None:
    f, old = warm(Route(**{**ROUTE._asdict(), "max_replicas": 2}), replicas=2, cap=3)
    out = f.deploy("site", V2, 3.0)
    assert records("deploy_started", out)[0].detail["cap_room"] == 1
    assert len(of(Boot, out)) == 1, "one slot under the cap: a surge of one, max_replicas notwithstanding"
    assert f.live_count() == 3
    assert not of(Boot, f.tick(3.1)), "never past the cap"
    assert any(f.instances[i].state is State.READY for i in old), "the old version serves until the new one is ready"


def test_at_the_cap_one_old_replica_makes_room_the_other_serves_on() -> None:
    f, old = warm(replicas=2, cap=2)
    out = f.deploy("site", V2, 3.0)
    assert not of(Boot, out)
    draining = [i for i in old if f.instances[i].state is State.DRAINING]
    serving = [i for i in old if f.instances[i].state is State.READY]
    assert len(draining) == 1 and len(serving) == 1
    assert forward(f, 1, 3.1).instance_id == serving[0]
    (boot,) = of(Boot, f.instance_stopped(draining[0], 3.2))  # the freed slot goes to the new version
    assert boot.version == V2


def test_failed_boots_of_the_new_version_roll_back_while_the_old_ones_serve() -> None:
    route = Route(**{**ROUTE._asdict(), "rollback_after_failures": 3})
    f, old = warm(route, replicas=1)
    out = f.deploy("site", V2, 10.0)
    t = 10.0
    failed = 0
    for _ in range(20):  # bounded: boots come after each back-off
        for boot in of(Boot, out):
            assert boot.version == V2
            out = f.boot_failed(boot.instance_id, "kernel panic", t + 0.5)
            failed += 1
            f.instance_stopped(boot.instance_id, t + 0.6)
            assert forward(f, 100 + failed, t + 0.7).instance_id == old[0], "the old version serves meanwhile"
            if records("rolled_back", out):
                break
        if records("rolled_back", out):
            break
        t += 1.0
        out = f.tick(t)
    (rb,) = records("rolled_back", out)
    assert failed == 3
    assert rb.detail["from"] == V2 and rb.detail["to"] == V1 and rb.detail["automatic"] is True
    assert "3 boot(s) of " + V2 + " failed (last: kernel panic)" == rb.detail["reason"]
    pool = f.pools["site"]
    assert pool.version == V1 and pool.previous == V2 and pool.rollout is None and pool.backoff_until == 0.0
    assert f.instances[old[0]].state is State.READY
    for later in (t + 5, t + 60):
        assert not of(Boot, f.tick(later)), "nothing more of the bad version"


def test_one_failure_short_of_the_limit_does_not_roll_back() -> None:
    f, old = warm(replicas=1)
    out = f.deploy("site", V2, 10.0)
    (boot,) = of(Boot, out)
    out = f.boot_failed(boot.instance_id, "timeout", 11.0)
    f.instance_stopped(boot.instance_id, 11.1)
    assert not records("rolled_back", out)
    assert not of(Boot, f.tick(11.5)), "the next surge boot waits for the back-off"
    (again,) = of(Boot, f.tick(12.1))
    out = f.instance_ready(again.instance_id, addr(5), 14.0)
    assert records("deployed", out) and f.pools["site"].version == V2
    assert f.instances[old[0]].state is not State.READY


def test_a_cold_pool_switches_at_once_and_its_next_boot_is_the_new_version() -> None:
    f = Fleet(Limits(max_instances=8), (Host("h1", "local", slots=16),))
    f.set_routes((ROUTE,), 0.0, versions={"site": V1})
    out = f.deploy("site", V2, 1.0)
    assert records("deploy_started", out)[0].detail["surge"] == 0 and not of(Boot, out)
    (boot,) = of(Boot, f.request_arrived("site", 1, "k", None, 2.0))
    assert boot.version == V2
    assert records("deployed", f.instance_ready(boot.instance_id, addr(1), 3.0))


def test_rollback_goes_to_the_previous_version_the_same_way() -> None:
    f, old = warm(replicas=1)
    out = f.deploy("site", V2, 1.0)
    (b2,) = of(Boot, out)
    f.instance_ready(b2.instance_id, addr(2), 2.0)
    f.instance_stopped(old[0], 2.1)
    out = f.rollback("site", 3.0)
    assert records("deploy_started", out)[0].detail == {"from": V2, "to": V1, "reason": "rollback", "surge": 1,
                                                         "cap_room": 7}
    (b1,) = of(Boot, out)
    assert b1.version == V1 and forward(f, 1, 3.5).instance_id == b2.instance_id
    out = f.instance_ready(b1.instance_id, addr(3), 4.0)
    assert records("deployed", out)[0].detail["to"] == V1
    assert f.instances[b2.instance_id].state in (State.DRAINING, State.STOPPED) or of(Stop, out)
    assert forward(f, 2, 4.5).instance_id == b1.instance_id


def test_deploying_the_version_served_is_a_no_op() -> None:
    f, _ = warm()
    assert f.deploy("site", V1, 1.0) == []
    assert not records("deploy_started", f.set_routes((ROUTE,), 2.0, versions={"site": V1}))


def test_a_reload_with_another_version_is_a_rolling_deploy_with_its_reason() -> None:
    f, old = warm()
    out = f.set_routes((ROUTE,), 2.0, versions={"site": V2}, reasons={"site": "reload"})
    assert records("deploy_started", out)[0].detail["reason"] == "reload"
    assert len(of(Boot, out)) == 2 and all(f.instances[i].state is State.READY for i in old)


def test_an_old_instance_that_was_booting_is_drained_once_ready_after_the_switch() -> None:
    f, old = warm(replicas=1)
    pool = f.pools["site"]
    late = f._boot(pool, "local", 1.0, "scale", [])  # an old-version boot under way
    assert late
    out = f.deploy("site", V3, 1.5)
    (new,) = of(Boot, out)
    f.instance_ready(new.instance_id, addr(7), 2.0)
    assert f.instances[old[0]].state is State.DRAINING
    out = f.instance_ready(late.instance_id, addr(8), 2.5)
    assert f.instances[late.instance_id].state is not State.READY, "no second version takes requests"
    assert forward(f, 1, 3.0).instance_id == new.instance_id


def test_status_shows_versions() -> None:
    f, old = warm(replicas=1)
    f.deploy("site", V2, 1.0)
    (route,) = f.snapshot()["routes"]
    assert route["version"] == V2 and route["previous_version"] == V1 and route["rollout"]["to"] == V2
    versions = {i["id"]: i["version"] for i in route["instances"]}
    assert versions[old[0]] == V1 and set(versions.values()) == {V1, V2}


def test_a_boot_of_another_version_than_asked_switches_its_pool() -> None:
    f, old = warm(replicas=1)
    pool = f.pools["site"]
    boot = f._boot(pool, "local", 2.0, "scale", [])
    assert boot and boot.version == V1
    out = f.booted_other_version(boot.instance_id, V2, 2.1)  # V1 was gone: the shell booted V2
    assert records("deploy_started", out)[0].detail["to"] == V2 and pool.version == V2
    assert not of(Boot, out), "the instance booting now is the surge"
    assert forward(f, 1, 2.2).instance_id == old[0]
    assert records("deployed", f.instance_ready(boot.instance_id, addr(3), 3.0))
    assert f.instances[old[0]].state is not State.READY


class RolloutMachine(FleetDriver):
    """Random interleavings of requests, boots, failures and deploys back and forth over
    three versions: the caps hold, every boot is of its pool's version, no request waits
    while a replica serves, and once a replica of the wanted version takes requests no
    other version does."""

    def __init__(self) -> None:
        super().__init__()
        self.routes = tuple(Route(name=f"r{i}", image=f"r{i}", max_replicas=2, target_concurrency=1,
                                  idle_timeout_s=5.0, queue_size=5, rollback_after_failures=2) for i in range(2))
        self.fleet = Fleet(Limits(max_instances=5), (Host("h1", "local", slots=4), Host("h2", "local", slots=4)))
        self.fleet.set_routes(self.routes, 0.0, versions={r.name: V1 for r in self.routes})

    STOP_ENDS_BOOT = True

    def seen(self, c: object) -> None:
        if isinstance(c, Boot):
            assert c.version == self.fleet.pools[c.route].version
        elif isinstance(c, Record) and c.kind == "rolled_back":
            assert self.fleet.pools[c.route].version == c.detail["to"]

    @rule(route=st.integers(0, 1))
    def request(self, route: int) -> None:
        self.rid += 1
        pool = self.fleet.pools[f"r{route}"]
        serving = bool(pool.balancer.load)
        out = self.fleet.request_arrived(f"r{route}", self.rid, str(self.rid), None, self.now)
        if serving:
            assert any(isinstance(c, Forward) and c.request_id == self.rid for c in out), "no wait for a boot"
        self._apply(out)

    @rule(route=st.integers(0, 1), version=st.sampled_from([V1, V2, V3]), back=st.booleans())
    def deploy(self, route: int, version: str, back: bool) -> None:
        name = f"r{route}"
        self._apply(self.fleet.rollback(name, self.now) if back else self.fleet.deploy(name, version, self.now))

    @invariant()
    def caps_hold(self) -> None:
        f = self.fleet
        assert f.live_count() <= 5
        for pool in f.pools.values():
            assert sum(1 for i in pool.live() if i.version == pool.version) <= pool.route.max_replicas
        for host in f.hosts.values():
            assert f.host_used[host.name] == sum(1 for i in f.instances.values() if i.host == host.name) <= host.slots

    @invariant()
    def one_version_once_the_wanted_one_serves(self) -> None:
        for pool in self.fleet.pools.values():
            versions = {self.fleet.instances[i].version for i in pool.balancer.load}
            if pool.version in versions:
                assert versions == {pool.version}, versions

    @invariant()
    def inflight_adds_up(self) -> None:
        for inst in self.fleet.instances.values():
            assert inst.inflight == sum(1 for _, iid, _ in self.inflight if iid == inst.id)


TestRollouts = RolloutMachine.TestCase
TestRollouts.settings = settings(max_examples=80, stateful_step_count=60, deadline=None)
