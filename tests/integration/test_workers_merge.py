"""Merging several workers' /status and /metrics (proxy.serve.workers), and the peer sockets."""

from __future__ import annotations

import asyncio
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.parser import text_string_to_metric_families

from proxy.serve.workers import PeerServer, ask, merge_metrics, merge_status, metric_samples, socket_path


def worker_registry(requests: int, live: int, latencies: list[float]) -> CollectorRegistry:
    r = CollectorRegistry()
    Counter("summon_boots_total", "boots", ["route"], registry=r).labels("site").inc(requests)
    Gauge("summon_instances_live", "live", registry=r).set(live)
    h = Histogram("summon_boot_duration_seconds", "d", ["route"], buckets=(0.1, 1.0), registry=r)
    for s in latencies:
        h.labels("site").observe(s)
    return r


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text.decode()) for s in fam.samples}


def test_metrics_are_summed_across_workers_and_created_is_the_earliest():
    a, b = worker_registry(3, 1, [0.05, 2.0]), worker_registry(4, 2, [0.5])
    text, ctype = merge_metrics([metric_samples(a), metric_samples(b)])
    assert ctype.startswith("text/plain")
    got = samples(text)
    assert got[("summon_boots_total", (("route", "site"),))] == 7
    assert got[("summon_instances_live", ())] == 3
    buckets = {dict(k[1])["le"]: v for k, v in got.items() if k[0] == "summon_boot_duration_seconds_bucket"}
    assert buckets == {"0.1": 1, "1.0": 2, "+Inf": 3}
    assert got[("summon_boot_duration_seconds_sum", (("route", "site"),))] == 2.55
    created = [s for s in metric_samples(a) + metric_samples(b) if s["name"] == "summon_boots"]
    earliest = min(smp[2] for fam in created for smp in fam["samples"] if smp[0].endswith("_created"))
    assert got[("summon_boots_created", (("route", "site"),))] == earliest


def test_status_lists_every_workers_instances_once_and_sums_totals():
    def snap(worker: int, n: int, queued: int) -> dict:
        return {"routes": [
            {"name": "site", "image": "site", "queued": queued, "backoff_until": None,
             "instances": [{"id": f"w{worker}-{i}", "state": "ready"} for i in range(n)]},
            {"name": "fixed", "static": True, "instances": [{"id": "127.0.0.1:9", "state": "ready"}]}],
            "totals": {"instances": n, "cap": 4, "routes": 2, "draining": False, "inflight": 1},
            "overload": {"shedding": worker == 1, "episodes": 1, "wait_ms": 5.0 * (worker + 1)}}

    merged = merge_status([(0, snap(0, 1, 2)), (1, snap(1, 2, 3))], unreachable=[2])
    site, fixed = merged["routes"]
    assert [(i["id"], i["worker"]) for i in site["instances"]] == [("w0-0", 0), ("w1-0", 1), ("w1-1", 1)]
    assert site["queued"] == 5
    assert fixed["instances"] == [{"id": "127.0.0.1:9", "state": "ready"}], "static upstreams listed once"
    t = merged["totals"]
    # one fleet, one cap: every worker reports the same cap (it is no longer split between them)
    assert (t["instances"], t["cap"], t["routes"], t["inflight"], t["draining"]) == (3, 4, 2, 2, False)
    assert (t["workers"], t["unreachable_workers"]) == (3, [2])
    assert merged["overload"] == {"shedding": True, "episodes": 2, "wait_ms": 10.0}


def test_status_lists_an_instance_every_worker_routes_to_once_as_its_owner_reports_it():
    def snap(worker: int, instances: list[dict]) -> dict:
        return {"routes": [{"name": "site", "image": "site", "queued": 0, "backoff_until": None,
                            "instances": instances}],
                "totals": {"instances": len(instances), "cap": 3, "cluster": {"node": f"w{worker}"}}}

    owned = {"id": "a-1", "node": "w1", "state": "ready", "inflight": 2}
    seen_by_w0 = {"id": "a-1", "node": "w1", "state": "ready", "inflight": 5}
    mine = {"id": "b-1", "node": "w0", "state": "booting", "inflight": 0}
    merged = merge_status([(0, snap(0, [seen_by_w0, mine])), (1, snap(1, [owned]))], unreachable=[])
    site = merged["routes"][0]
    assert sorted((i["id"], i["worker"], i["inflight"]) for i in site["instances"]) == [("a-1", 1, 2), ("b-1", 0, 0)]
    assert merged["totals"]["instances"] == 2 and merged["totals"]["cap"] == 3


def test_the_cap_gauge_is_not_summed_across_workers():
    regs = []
    for live in (1, 2):
        r = CollectorRegistry()
        Gauge("summon_instance_cap", "cap", registry=r).set(3)
        Gauge("summon_instances_live", "live", registry=r).set(live)
        regs.append(r)
    got = samples(merge_metrics([metric_samples(r) for r in regs])[0])
    assert got[("summon_instance_cap", ())] == 3 and got[("summon_instances_live", ())] == 3


def test_ask_gets_each_workers_answer_and_names_the_silent_ones(tmp_path: Path):
    async def t() -> None:
        peer = PeerServer(socket_path(str(tmp_path), 1), lambda: {"routes": [], "totals": {"instances": 5}},
                          worker_registry(2, 0, []))
        await peer.start()
        try:
            answers, unreachable = await ask(str(tmp_path), 3, "status")  # worker 2 never started
            assert answers == [(1, {"routes": [], "totals": {"instances": 5}})] and unreachable == [2]
            answers, _ = await ask(str(tmp_path), 2, "metrics")
            assert any(fam["name"] == "summon_boots" for fam in answers[0][1])
            answers, unreachable = await ask(str(tmp_path), 2, "bogus")
            assert answers == [] and unreachable == [1]
        finally:
            peer.close()
        assert not Path(socket_path(str(tmp_path), 1)).exists()

    asyncio.run(t())
