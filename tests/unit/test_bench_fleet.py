"""Unit tests of the pure parts of the bench's `fleet` section (loadtests/bench_fleet.py)
and of the region -> proxy map its Locust users follow (loadtests/regions.py)."""

from __future__ import annotations

import pytest

from tests.helpers.loadtests import load

fleet = load("bench_fleet")
regions = load("regions")

SUMMON_A, SUMMON_B = 100, 200


def test_instance_pids_are_the_proxies_own_children_not_busyboxs_per_connection_ones() -> None:
    procs = {
        SUMMON_A: (1, "python summon serve -c a.toml"),
        SUMMON_B: (1, "python summon serve -c b.toml"),
        101: (SUMMON_A, "busybox httpd -f -p 127.0.0.1:1 -h site"),  # an instance
        102: (101, "busybox httpd -f -p 127.0.0.1:1 -h site"),  # its per-connection child
        201: (SUMMON_B, "busybox httpd -f -p 127.0.0.1:2 -h site"),
        202: (SUMMON_B, "sh -c something else"),  # a child that is no instance
        301: (1, "busybox httpd -f -p 127.0.0.1:3 -h site"),  # someone else's, reparented to init
    }
    assert fleet.instance_pids(procs, {SUMMON_A, SUMMON_B}) == [101, 201]
    assert fleet.instance_pids(procs, {SUMMON_A}) == [101]
    assert fleet.instance_pids(procs, set()) == []


def _summoned(ts: float, region: str, client: str, reason: str) -> dict:
    return {"ts": ts, "kind": "summoned", "region": region, "detail": {"client_region": client, "reason": reason}}


def test_first_replicas_merges_the_logs_by_time_and_tells_a_scale_out_from_a_cold_boot() -> None:
    events = [
        _summoned(5.0, "eu", "eu", "burst: 3 concurrent now, target 1/replica"),
        {"ts": 0.5, "kind": "boot_deferred", "region": "eu", "detail": {}},
        _summoned(1.0, "us-east", "us-east", "cold request"),
        _summoned(3.0, "us-east", "us-east", "burst: 2 concurrent now, target 1/replica"),
        _summoned(2.0, "us-west", "us-west", "cold request (other node's boot did not arrive)"),
    ]
    out = fleet.first_replicas(events)
    assert out["first_boot"] is not None and out["first_boot"]["ts"] == 1.0
    assert out["first_scale_out"] is not None and out["first_scale_out"]["ts"] == 3.0
    assert fleet.placed_in(out["first_boot"], "us-east") is True
    assert fleet.placed_in(out["first_boot"], "eu") is False


def test_first_replicas_of_a_log_without_boots_or_scale_outs() -> None:
    assert fleet.first_replicas([]) == {"first_boot": None, "first_scale_out": None}
    only_cold = fleet.first_replicas([_summoned(1.0, "eu", "eu", "cold request")])
    assert only_cold["first_scale_out"] is None
    assert fleet.placed_in(None, "eu") is None


def test_placed_in_needs_both_the_placement_and_the_client_in_the_region() -> None:
    # placed in us-east for a client from eu (e.g. eu had no free slot): not "placed for its clients"
    assert fleet.placed_in(_summoned(1.0, "us-east", "eu", "cold request"), "us-east") is False


def test_parse_hosts() -> None:
    assert regions.parse_hosts("eu=http://127.0.0.1:1/, us-east = http://127.0.0.1:2") == {
        "eu": "http://127.0.0.1:1", "us-east": "http://127.0.0.1:2"}
    assert regions.parse_hosts("") == {}
    for bad in ("eu", "eu=127.0.0.1:1", "=http://x", "eu=http://a,eu=http://b"):
        with pytest.raises(ValueError):
            regions.parse_hosts(bad)
