"""Remote libvirt hosts, the pure parts: URI endpoints, guest address, port choice, up/down."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from proxy.backends.libvirt_host import RECONNECT_MAX_S, HostHealth, guest_address, pick_port, remote_endpoint
from proxy.backends.libvirt_xml import DomainParams, domain_xml, retarget_xml


def test_remote_endpoint_per_transport() -> None:
    assert remote_endpoint("qemu+tcp://198.18.0.2/system") == ("198.18.0.2", 16509)
    assert remote_endpoint("qemu+tls://hv1.example/system") == ("hv1.example", 16514)
    assert remote_endpoint("qemu+ssh://root@hv1:2222/system?keyfile=/k") == ("hv1", 2222)
    assert remote_endpoint("qemu+tcp://198.18.0.2:16600/system") == ("198.18.0.2", 16600)
    for local in ("qemu:///system", "qemu+unix:///system?socket=/x", "test:///default"):
        assert remote_endpoint(local) is None


def test_guest_address() -> None:
    assert guest_address("qemu:///system") == "127.0.0.1"
    assert guest_address("qemu+tcp://198.18.0.2/system") == "198.18.0.2"
    assert guest_address("qemu+tcp://198.18.0.2/system", "198.19.1.1") == "198.19.1.1"  # `address` wins
    assert guest_address("qemu+ssh://root@localhost/system") == "127.0.0.1"  # a name is resolved
    with pytest.raises(OSError):
        guest_address("qemu+tcp://no-such-host.invalid/system")


def test_pick_port_avoids_taken_ports_and_says_when_none_is_left() -> None:
    rng = random.Random(7)
    taken = {24000, 24001, 24003}
    picks = {pick_port(24000, 24004, taken, rng) for _ in range(50)}
    assert picks == {24002, 24004}
    with pytest.raises(ValueError, match="no free port"):
        pick_port(24000, 24001, {24000, 24001})
    assert pick_port(24000, 24000, {1, 2}) == 24000


def test_host_health_two_misses_then_backoff_then_up() -> None:
    h = HostHealth()
    assert h.probed(True) == (None, 1.0)
    assert h.probed(False) == (None, 1.0)  # one miss: a hiccup
    assert h.probed(True) == (None, 1.0)
    assert h.probed(False)[0] is None
    change, wait = h.probed(False)
    assert change == "down" and not h.up
    waits = [h.probed(False) for _ in range(6)]
    assert all(c is None for c, _ in waits)
    assert [w for _, w in waits] == sorted(w for _, w in waits) and waits[-1][1] == RECONNECT_MAX_S
    assert h.probed(True) == ("up", 1.0) and h.up
    assert h.probed(True) == (None, 1.0)


def test_forward_binds_at_the_host_address_and_restore_retargets_it() -> None:
    p = DomainParams("summon-a-1", "qemu", Path("/k"), Path("/i"), "console=ttyS0", 128, 80, 24007,
                     "a", "1", "sha256:" + "0" * 64, 123, "456", "proxy1", None, "198.18.0.2")
    xml = domain_xml(p)
    assert "hostfwd=tcp:198.18.0.2:24007-:80" in xml and "127.0.0.1" not in xml
    assert "<serial type='null'>" in xml  # no console file: its path would be the remote host's
    local = DomainParams(**{**p.__dict__, "host_address": "127.0.0.1", "host_port": 40001})
    moved = retarget_xml(domain_xml(local), p)  # a snapshot saved elsewhere, restored on this host
    assert "hostfwd=tcp:198.18.0.2:24007-:80" in moved and "40001" not in moved
