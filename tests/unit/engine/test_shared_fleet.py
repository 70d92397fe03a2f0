"""Two engines, one fleet: the facts a shared store feeds in (`foreign_seen`, `remote_load`,
`boot_refused`), driven with a fake clock. The store itself is tested against SQLite in
tests/integration/test_fleet_store.py."""

from __future__ import annotations

from proxy.engine.fleet import Boot, Fleet, Foreign, Forward, Record, Reject, Stop
from proxy.engine.lifecycle import State
from tests.unit.engine.test_fleet import ROUTE, addr, fleet, of, replace


def foreign_of(f: Fleet, boot: Boot, n: int = 1) -> Foreign:
    """How engine `f`'s ready instance looks to the others, through the registry."""
    inst = f.instances[boot.instance_id]
    return Foreign(inst.id, inst.route, "site", inst.host, inst.region, addr(n), owner=f.node)


def two() -> tuple[Fleet, Fleet]:
    a, b = fleet(), fleet()
    a.node, b.node = "a", "b"
    a.shared = b.shared = True
    return a, b


def test_in_a_shared_fleet_a_boot_is_recorded_only_once_the_store_granted_it() -> None:
    a, b = two()
    out = a.request_arrived("site", 1, "k", None, 0.0)
    boot = of(Boot, out)[0]
    assert "summoned" not in [r.kind for r in of(Record, out)]
    assert [r.kind for r in of(Record, a.boot_claimed(boot.instance_id, 0.01))] == ["summoned"]
    assert a.boot_claimed(boot.instance_id, 0.02) == []  # once
    refused = of(Boot, b.request_arrived("site", 1, "k", None, 0.0))[0]
    b.boot_refused(refused.instance_id, "node a is booting site", 0.01, wait_s=5.0)
    assert b.boot_claimed(refused.instance_id, 0.02) == []  # a refused boot is never recorded as one


def test_a_cold_boot_is_marked_cold_and_a_scale_out_is_not() -> None:
    f = fleet(replace(ROUTE, target_concurrency=1))
    boot = of(Boot, f.request_arrived("site", 1, "k", None, 0.0))[0]
    assert boot.cold
    f.instance_ready(boot.instance_id, addr(1), 0.5)
    for rid in range(2, 40):
        f.request_arrived("site", rid, f"k{rid}", None, 1.0)
    scale = [b for t in range(2, 12) for b in of(Boot, f.tick(float(t)))]
    assert scale and not any(b.cold for b in scale)


def test_the_other_engines_queue_waits_for_the_first_ones_instance_and_boots_nothing() -> None:
    a, b = two()
    boot = of(Boot, a.request_arrived("site", 1, "k", None, 0.0))[0]
    b_boot = of(Boot, b.request_arrived("site", 1, "k", None, 0.0))[0]
    # b's store says: a holds the route's boot lock
    out = b.boot_refused(b_boot.instance_id, "another node is booting site", 0.01, wait_s=10.0)
    assert [r.kind for r in of(Record, out)] == ["boot_deferred"] and not of(Reject, out)
    assert b_boot.instance_id not in b.instances and b.host_used["h1"] == 0
    for rid in range(2, 50):  # more cold requests on b: still no boot of its own
        assert not of(Boot, b.request_arrived("site", rid, f"k{rid}", None, 0.1))
    assert not of(Boot, b.tick(0.2))
    a.instance_ready(boot.instance_id, addr(1), 1.0)
    out = b.foreign_seen([foreign_of(a, boot)], 1.1)
    forwards = of(Forward, out)
    assert len(forwards) == 49 and {fw.address for fw in forwards} == {addr(1)}
    assert not of(Boot, out)


def test_the_waiting_engine_boots_itself_when_the_other_boot_never_arrives() -> None:
    _, b = two()
    boot = of(Boot, b.request_arrived("site", 1, "k", None, 0.0))[0]
    b.boot_refused(boot.instance_id, "another node is booting site", 0.0, wait_s=2.0)
    assert not of(Boot, b.tick(1.0))
    again = of(Boot, b.tick(2.0))
    assert len(again) == 1 and again[0].cold


def test_a_refusal_at_the_fleet_cap_answers_the_queue_with_503() -> None:
    _, b = two()
    boot = of(Boot, b.request_arrived("site", 1, "k", None, 0.0))[0]
    b.request_arrived("site", 2, "k", None, 0.0)
    out = b.boot_refused(boot.instance_id, "fleet at its cap (3)", 0.0)
    rejects = of(Reject, out)
    assert sorted(r.request_id for r in rejects) == [1, 2] and all(r.retry_after_s >= 1 for r in rejects)
    assert "cap_reached" in [r.kind for r in of(Record, out)]
    assert not b.pools["site"].queue and b.live_count() == 0


def test_a_foreign_instance_is_routed_to_but_never_stopped_or_idled_here() -> None:
    a, b = two()
    boot = of(Boot, a.request_arrived("site", 1, "k", None, 0.0))[0]
    a.instance_ready(boot.instance_id, addr(1), 1.0)
    b.foreign_seen([foreign_of(a, boot)], 1.0)
    out = b.request_arrived("site", 7, "k", None, 2.0)
    assert of(Forward, out) and of(Forward, out)[0].address == addr(1)
    b.request_finished("site", boot.instance_id, True, 2.1)
    for t in range(3, 200, 10):  # far past idle_timeout: b never stops what it does not own
        assert not of(Stop, b.tick(float(t)))
    assert b.instances[boot.instance_id].state is State.READY
    assert b.snapshot()["routes"][0]["instances"][0]["node"] == "a"


def test_an_instance_used_elsewhere_does_not_idle_out_and_does_once_nobody_uses_it() -> None:
    a, _ = two()
    boot = of(Boot, a.request_arrived("site", 1, "k", None, 0.0))[0]
    a.instance_ready(boot.instance_id, addr(1), 1.0)
    a.request_finished("site", boot.instance_id, True, 1.0)
    for t in range(2, 120, 5):  # b keeps a request on it, and keeps using it
        a.remote_load({boot.instance_id: (1, 0.5)}, float(t))
        assert not of(Stop, a.tick(float(t)))
    a.remote_load({boot.instance_id: (0, 0.0)}, 120.0)  # b's last request just ended
    assert not of(Stop, a.tick(150.0))
    a.remote_load({}, 181.0)
    assert "draining" in [r.kind for r in of(Record, a.tick(181.0))]
    assert of(Stop, a.tick(182.0))  # stopped once the grace is over (the others drop it meanwhile)


def test_a_foreign_instance_gone_from_the_registry_leaves_the_balancer() -> None:
    a, b = two()
    boot = of(Boot, a.request_arrived("site", 1, "k", None, 0.0))[0]
    a.instance_ready(boot.instance_id, addr(1), 1.0)
    b.foreign_seen([foreign_of(a, boot)], 1.0)
    assert b.pools["site"].balancer.load
    b.foreign_seen([], 2.0)
    assert not b.pools["site"].balancer.load and boot.instance_id not in b.instances
    out = b.request_arrived("site", 9, "k", None, 2.1)  # cold again for b: it boots
    assert of(Boot, out)


def test_foreign_instances_count_against_the_cap_and_host_slots_but_are_not_reclaimed() -> None:
    other = replace(ROUTE, name="other", image="other")
    a = fleet(ROUTE, other, cap=1)
    a.node = "a"
    a.foreign_seen([Foreign("b-1", "other", "other", "h1", "local", addr(5), owner="b")], 0.0)
    assert a.live_count() == 1 and a.host_used["h1"] == 1
    out = a.request_arrived("site", 1, "k", None, 100.0)
    assert not of(Boot, out) and not of(Stop, out) and of(Reject, out)


def test_a_foreign_instance_of_another_image_is_not_used() -> None:
    a, b = two()
    b.foreign_seen([Foreign("a-1", "site", "site-v2", "h1", "local", addr(1), owner="a")], 0.0)
    assert not b.pools["site"].balancer.load


def test_give_up_drains_only_our_own_idle_instances_among_those_chosen() -> None:
    other = replace(ROUTE, name="other", image="other")
    third = replace(ROUTE, name="third", image="third")
    f = fleet(ROUTE, other, third)
    ids = []
    for n, name in enumerate(("site", "other", "third")):
        boot = of(Boot, f.request_arrived(name, n + 1, "k", None, float(n)))[0]
        f.instance_ready(boot.instance_id, addr(n), float(n))
        ids.append(boot.instance_id)
    f.request_finished("site", ids[0], True, 5.0)  # site: idle
    # other: chosen but busy (its request still in flight); third: not chosen
    f.foreign_seen([Foreign("x-1", "site", "site", "h1", "local", addr(9), owner="x")], 6.0)
    out = f.give_up([ids[0], ids[1], "x-1"], 10.0)
    drained = {r.instance for r in of(Record, out) if r.kind == "draining"}
    assert drained == {ids[0]}
    assert f.instances[ids[1]].state is State.READY and f.instances[ids[2]].state is State.READY
    assert f.instances["x-1"].state is State.READY, "never another engine's"


def test_in_a_shared_fleet_a_drained_instance_stops_only_after_the_grace_and_when_nobody_uses_it() -> None:
    from proxy.engine.fleet import SHARED_DRAIN_GRACE_S

    a, _ = two()
    boot = of(Boot, a.request_arrived("site", 1, "k", None, 0.0))[0]
    a.boot_claimed(boot.instance_id, 0.0)
    a.instance_ready(boot.instance_id, addr(1), 1.0)
    a.request_finished("site", boot.instance_id, True, 1.0)
    out = a.give_up([boot.instance_id], 70.0)
    assert a.instances[boot.instance_id].state is State.DRAINING and not of(Stop, out), "not before the grace"
    a.remote_load({boot.instance_id: (1, 0.0)}, 70.1)  # b sent one before its copy showed the drain
    assert not of(Stop, a.tick(70.0 + SHARED_DRAIN_GRACE_S + 0.1)), "b's request is still in flight"
    a.remote_load({}, 71.0)
    stops = of(Stop, a.tick(71.0))
    assert len(stops) == 1 and not of(Stop, a.tick(71.1)), "one Stop, not one per tick"


def test_alone_a_drained_idle_instance_stops_at_once() -> None:
    f = fleet()
    boot = of(Boot, f.request_arrived("site", 1, "k", None, 0.0))[0]
    f.instance_ready(boot.instance_id, addr(1), 1.0)
    f.request_finished("site", boot.instance_id, True, 1.0)
    assert of(Stop, f.give_up([boot.instance_id], 5.0))


def test_a_foreign_instance_that_failed_a_request_leaves_rotation_though_the_registry_still_lists_it() -> None:
    from proxy.engine.fleet import FOREIGN_UNREACHABLE_S

    a, b = two()
    boot = of(Boot, a.request_arrived("site", 1, "k", None, 0.0))[0]
    a.instance_ready(boot.instance_id, addr(1), 1.0)
    seen = [foreign_of(a, boot)]
    b.foreign_seen(seen, 1.0)
    fw = of(Forward, b.request_arrived("site", 7, "k", None, 2.0))[0]
    b.request_finished("site", fw.instance_id, False, 2.1)  # refused: a died with it
    assert not b.pools["site"].balancer.load
    b.foreign_seen(seen, 2.2)  # a's lease has not run out: the registry still lists it
    assert not b.pools["site"].balancer.load
    assert of(Boot, b.request_arrived("site", 8, "k", None, 2.3)), "b boots its own instead"
    b.foreign_seen(seen, 2.2 + FOREIGN_UNREACHABLE_S)
    assert boot.instance_id in b.instances  # listed again after the back-off: taken back


def test_a_scale_out_is_placed_where_the_fleets_clients_are_not_where_this_engines_are() -> None:
    from proxy.config import Host, Region

    regions = (Region("eu", ("us",)), Region("us", ("eu",)))
    hosts = (Host("h-eu", "eu", slots=4), Host("h-us", "us", slots=4))
    f = fleet(replace(ROUTE, target_concurrency=1), regions=regions, hosts=hosts)
    f.node, f.shared = "eu-1", True
    boot = of(Boot, f.request_arrived("site", 1, "k", "eu", 0.0))[0]
    f.instance_ready(boot.instance_id, addr(1), 0.1)
    for rid in range(2, 6):  # a few of our own clients, in eu
        f.request_arrived("site", rid, f"k{rid}", "eu", 0.2)
    assert f.local_demand()["site"]["eu"] >= 4
    f.remote_demand({"site": {"us": 40.0}}, 0.3)  # the other proxies' clients: many, in us
    scale = [b for t in range(1, 8) for b in of(Boot, f.tick(float(t)))]
    assert scale and scale[0].region == "us"


def test_without_remote_demand_placement_is_unchanged() -> None:
    from proxy.config import Host, Region

    regions = (Region("eu", ("us",)), Region("us", ("eu",)))
    hosts = (Host("h-eu", "eu", slots=4), Host("h-us", "us", slots=4))
    f = fleet(replace(ROUTE, target_concurrency=1), regions=regions, hosts=hosts)
    boot = of(Boot, f.request_arrived("site", 1, "k", "eu", 0.0))[0]
    f.instance_ready(boot.instance_id, addr(1), 0.1)
    for rid in range(2, 6):
        f.request_arrived("site", rid, f"k{rid}", "eu", 0.2)
    scale = [b for t in range(1, 8) for b in of(Boot, f.tick(float(t)))]
    assert scale and scale[0].region == "eu"
