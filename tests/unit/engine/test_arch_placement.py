"""Placement by arch: a host is a candidate only if the route's image has an artefact for
its arch; a route whose image has both spills from a full arm64 edge to the nearest
x86_64 host. The arches come from the shell (`placeable`), as the summoner passes them."""

from __future__ import annotations

from proxy.backends.base import image_target
from proxy.config import Address, Host, Limits, Region, Route
from proxy.engine.fleet import Boot, Fleet, Reject, Stop
from proxy.engine.scaler import ScalerSettings

REGIONS = (Region("edge", ("eu", "us")), Region("eu", ("us",)), Region("us", ("eu",)))
HOSTS = (
    Host("board", "edge", backend="libvirt", slots=1, arch="aarch64"),
    Host("us1", "us", backend="libvirt", slots=4),
    Host("eu1", "eu", backend="libvirt", slots=4),
)
TARGETS = {"both": frozenset({"unix", "x86_64", "aarch64"}), "x86": frozenset({"unix", "x86_64"}),
           "arm": frozenset({"unix", "aarch64"})}


def placeable(route: Route, host: Host) -> bool:
    return image_target(host) in TARGETS[route.image or ""]


def fleet(image: str, hosts: tuple[Host, ...] = HOSTS, **route: object) -> Fleet:
    f = Fleet(Limits(max_instances=8), hosts, REGIONS, default_region="edge", placeable=placeable,
              scaler=ScalerSettings(stable_window_s=10.0, panic_window_s=1.0, scale_in_delay_s=5.0))
    f.set_routes((Route(name="site", image=image, idle_timeout_s=20.0, boot_timeout_s=10.0, queue_size=100,
                        max_replicas=4, target_concurrency=2, **route),), 0.0)  # type: ignore[arg-type]
    return f


def boots(out: list) -> list[Boot]:
    return [c for c in out if isinstance(c, Boot)]


def test_an_x86_only_image_skips_the_arm64_edge_for_the_nearest_x86_host() -> None:
    f = fleet("x86")
    (b,) = boots(f.request_arrived("site", 1, "k", "edge", 0.0))
    assert (b.host, b.region) == ("eu1", "eu")  # edge has a free slot, but no artefact for aarch64


def test_an_arm_only_image_boots_on_the_board_and_nowhere_else() -> None:
    f = fleet("arm")
    (b,) = boots(f.request_arrived("site", 1, "k", "us", 0.0))
    assert b.host == "board"  # the client is in us, but only the board can run it
    f.instance_ready(b.instance_id, Address("127.0.0.1", 9000), 0.1)
    g = fleet("arm", hosts=HOSTS[1:])  # no arm64 host at all
    out = g.request_arrived("site", 1, "k", "edge", 0.0)
    assert boots(out) == []  # two free x86 hosts, but not for this image: refused at once
    assert [(r.request_id, r.reason) for r in out if isinstance(r, Reject)] == [(1, "no host has a free slot")]


def test_a_spike_on_the_edge_spills_to_the_nearest_x86_region_and_back_to_zero() -> None:
    f = fleet("both")
    (first,) = boots(f.request_arrived("site", 0, "k0", "edge", 0.0))
    assert first.host == "board"
    f.instance_ready(first.instance_id, Address("127.0.0.1", 9000), 0.5)
    for rid in range(1, 8):  # 8 in flight, target 2 each: the scaler wants 4 replicas
        f.request_arrived("site", rid, f"k{rid}", "edge", 1.0)
    placed: list[Boot] = []
    t = 1.0
    for _ in range(40):
        t += 0.1
        out = f.tick(t)
        for i, b in enumerate(boots(out)):
            placed.append(b)
            f.instance_ready(b.instance_id, Address("127.0.0.1", 9001 + len(placed) + i), t + 0.05)
    assert len(placed) == 3
    assert {b.host for b in placed} == {"eu1"}  # the board is full (slots = 1); eu is edge's nearest
    # the spike ends: every replica idles out, the edge's too
    for inst in list(f.pools["site"].instances.values()):
        for _ in range(inst.inflight):
            f.request_finished("site", inst.id, True, t)
    for _ in range(400):
        t += 0.1
        for s in (c for c in f.tick(t) if isinstance(c, Stop)):
            f.instance_stopped(s.instance_id, t)
    assert f.live_count() == 0 and f.host_used == {"board": 0, "us1": 0, "eu1": 0}


def test_without_placeable_every_host_is_a_candidate() -> None:
    f = Fleet(Limits(max_instances=8), HOSTS, REGIONS, default_region="edge")
    f.set_routes((Route(name="site", image="x86"),), 0.0)
    (b,) = boots(f.request_arrived("site", 1, "k", "edge", 0.0))
    assert b.host == "board"  # the engine alone knows nothing of images: the shell must say
