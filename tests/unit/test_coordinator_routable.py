"""Which registry entries become engine facts (proxy.runtime.coordinator._routable)."""

from __future__ import annotations

from proxy.cluster.store import Entry
from proxy.config import Address
from proxy.runtime.coordinator import MACHINE, _routable


def entry(address: str, machine: str = MACHINE, node: str = "b", state: str = "ready") -> Entry:
    return Entry("b-1", node, "site", "site", "h", "eu", address, state, machine)


def test_another_engines_ready_instance_is_routable() -> None:
    f = _routable(entry("10.0.0.7:4000", machine="elsewhere"), "a")
    assert f is not None and f.address == Address("10.0.0.7", 4000) and f.owner == "b"


def test_a_loopback_instance_is_routable_from_its_own_machine_only() -> None:
    assert _routable(entry("127.0.0.1:4000"), "a") is not None
    assert _routable(entry("127.0.0.1:4000", machine="another-boot-id"), "a") is None


def test_our_own_booting_and_malformed_entries_are_not() -> None:
    assert _routable(entry("10.0.0.7:4000", node="a"), "a") is None
    assert _routable(entry("", state="booting"), "a") is None
    assert _routable(entry("not-an-address"), "a") is None
