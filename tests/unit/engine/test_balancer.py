"""Consistent hashing with bounded loads: key movement, the load bound, preferences."""

from __future__ import annotations

import math

import pytest

from proxy.engine.balancer import BoundedLoadBalancer

KEYS = [f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}" for i in range(20_000)]


def balancer(*nodes: str, balance_factor: float = 1.25) -> BoundedLoadBalancer:
    b = BoundedLoadBalancer(balance_factor)
    for n in nodes:
        b.add(n)
    return b


def test_adding_a_replica_moves_about_one_nth_of_the_keys() -> None:
    b = balancer("a", "b", "c", "d")
    before = {k: b.owner(k) for k in KEYS}
    b.add("e")
    after = {k: b.owner(k) for k in KEYS}
    moved = [k for k in KEYS if before[k] != after[k]]
    assert abs(len(moved) / len(KEYS) - 1 / 5) < 0.05  # about 1/N with N = 5
    assert all(after[k] == "e" for k in moved)  # keys only move to the newcomer


def test_removing_a_replica_moves_only_its_keys() -> None:
    b = balancer("a", "b", "c", "d")
    before = {k: b.owner(k) for k in KEYS}
    b.remove("c")
    after = {k: b.owner(k) for k in KEYS}
    assert all(after[k] == before[k] for k in KEYS if before[k] != "c")


def test_a_hot_key_spills_over_instead_of_overloading_one_replica() -> None:
    b = balancer("a", "b", "c", "d", balance_factor=1.25)
    picks = []
    for _ in range(100):  # 100 concurrent requests, all with the same key
        node = b.pick("the-same-client")
        assert node is not None
        b.acquire(node)
        picks.append(node)
    assert b.total == 100
    assert max(b.load.values()) <= math.ceil(1.25 * 100 / 4)
    assert picks[0] == b.owner("the-same-client")  # the key's own replica first
    for node in picks:
        b.release(node)
    assert b.total == 0 and set(b.load.values()) == {0}


def test_preferred_replicas_first_then_spill_over_and_exclude() -> None:
    b = balancer("eu1", "us1", "us2", balance_factor=1.0)
    assert b.pick("k", preferred=lambda n: n == "eu1") == "eu1"
    b.acquire("eu1")  # eu1 is now at the bound: the next eu request spills over
    assert b.pick("k2", preferred=lambda n: n == "eu1") in ("us1", "us2")
    b.release("eu1")
    assert b.pick("k", preferred=lambda n: n == "eu1", exclude="eu1") != "eu1"


def test_balance_factor_below_one_is_refused() -> None:
    with pytest.raises(ValueError):
        BoundedLoadBalancer(0.9)
