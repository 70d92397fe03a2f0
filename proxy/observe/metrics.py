"""Prometheus metrics, one registry per worker.

Request metrics are updated from `ServerState.observe` (once per finished request) as
plain ints in dicts, turned into Prometheus families only at scrape time (a child's
inc/observe takes a lock and several calls: too much for once per request). Instance
gauges are computed at scrape time from the engine, so they can never drift; so are the
front's overload counters (refused connections, shed requests, overload episodes).
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from ..engine.fleet import Boot, Command, Record
from ..engine.lifecycle import LIVE_STATES
from ..http.exchange import Exchange

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BOOT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 20, 30, 60)


class Metrics:
    def __init__(self, status: Callable[[], dict[str, Any]] | None = None,
                 overload: Callable[[], dict[str, Any]] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock  # the clock Exchange.started_at was read from (the event loop's)
        self.registry = CollectorRegistry()
        self.requests = _RequestCollector()
        self.registry.register(self.requests)
        self.boots = Counter("summon_boots_total", "Instances summoned", ["route"], registry=self.registry)
        self.boot_failures = Counter("summon_boot_failures_total", "Boots that failed", ["route"],
                                     registry=self.registry)
        self.rejected = Counter("summon_rejected_total", "Requests refused with 503", ["route"],
                                registry=self.registry)
        self.boot_duration = Histogram("summon_boot_duration_seconds", "Summoned to ready", ["route"],
                                       buckets=BOOT_BUCKETS, registry=self.registry)
        if status is not None:
            self.registry.register(_FleetCollector(status))
        if overload is not None:
            self.registry.register(_OverloadCollector(overload))

    def observe(self, ex: Exchange) -> None:
        now = self.clock()
        route = ex.route.name if ex.route is not None else ""
        req = self.requests
        key = (route, ex.status)
        counts = req.counts
        counts[key] = counts.get(key, 0) + 1
        lkey = (route, "cold" if ex.cold else "warm")
        hist = req.latency.get(lkey)
        if hist is None:
            hist = req.latency[lkey] = _Hist()
        seconds = now - ex.started_at
        hist.buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1  # first bucket with bound >= value
        hist.sum += seconds

    def answered(self) -> int:
        """Requests answered so far, all routes and statuses: the overload watch's rate
        (summed per tick from the counts `observe` keeps anyway, so the data path pays
        nothing more)."""
        return sum(self.requests.counts.values())

    def command(self, cmd: Command) -> None:
        if isinstance(cmd, Boot):
            self.boots.labels(cmd.route).inc()
        elif isinstance(cmd, Record):
            if cmd.kind == "ready" and cmd.duration_s is not None:
                self.boot_duration.labels(cmd.route).observe(cmd.duration_s)
            elif cmd.kind == "failed" and cmd.detail.get("phase") == "boot":
                self.boot_failures.labels(cmd.route).inc()
            elif cmd.kind == "rejected":
                self.rejected.labels(cmd.route).inc(int(cmd.detail.get("requests", 1)))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _Hist:
    __slots__ = ("buckets", "sum")

    def __init__(self) -> None:
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)  # the last one is +Inf
        self.sum = 0.0


class _RequestCollector(Collector):
    """summon_requests_total and summon_request_duration_seconds, from plain counts."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, int], int] = {}
        self.latency: dict[tuple[str, str], _Hist] = {}

    def collect(self):  # type: ignore[no-untyped-def]
        requests = CounterMetricFamily("summon_requests", "Requests answered, by route and status",
                                       labels=["route", "status"])
        for (route, status), n in list(self.counts.items()):
            requests.add_metric([route, str(status)], n)
        latency = HistogramMetricFamily("summon_request_duration_seconds", "Time from request head to response end",
                                        labels=["route", "kind"])
        bounds = [floatToGoString(b) for b in LATENCY_BUCKETS] + ["+Inf"]
        for (route, kind), hist in list(self.latency.items()):
            cumulative, total = [], 0
            for bound, n in zip(bounds, hist.buckets, strict=True):
                total += n
                cumulative.append((bound, total))
            latency.add_metric([route, kind], cumulative, hist.sum)
        yield requests
        yield latency


class _FleetCollector(Collector):
    def __init__(self, status: Callable[[], dict[str, Any]]) -> None:
        self.status = status

    def collect(self):  # type: ignore[no-untyped-def]
        snap = self.status()
        totals = snap.get("totals", {})
        node = totals.get("cluster", {}).get("node")  # in a shared fleet, count only our own instances
        inst = GaugeMetricFamily("summon_instances", "Instances by route, state and region",
                                 labels=["route", "state", "region"])
        queue = GaugeMetricFamily("summon_queue_depth", "Requests waiting for a boot", labels=["route"])
        counts: dict[tuple[str, str, str], int] = {}
        for r in snap.get("routes", []):
            queue.add_metric([r["name"]], r.get("queued", 0))
            for i in r["instances"]:
                if node is not None and i.get("node") != node:
                    continue
                k = (r["name"], i["state"], i["region"])
                counts[k] = counts.get(k, 0) + 1
        for k, n in counts.items():
            inst.add_metric(list(k), n)
        cap = GaugeMetricFamily("summon_instance_cap", "Global max_instances")
        cap.add_metric([], totals.get("cap", 0))
        used = GaugeMetricFamily("summon_instances_live", "Live instances counted against the cap (this node's own)")
        used.add_metric([], sum(n for (_, state, _), n in counts.items() if state in LIVE_STATES))
        yield inst
        yield queue
        yield cap
        yield used


class _OverloadCollector(Collector):
    """From `proxy.serve.server.overload_of`: what the front refused or shed, and why."""

    def __init__(self, overload: Callable[[], dict[str, Any]]) -> None:
        self.overload = overload

    def collect(self):  # type: ignore[no-untyped-def]
        o = self.overload()
        for name, doc, key in (
            ("summon_refused_connections", "Connections refused at accept (max_connections, drain, overload)",
             "refused_connections"),
            ("summon_shed_requests", "Requests answered 503 by max_inflight or overload", "shed_requests"),
            ("summon_overload_episodes", "Times summon found its own CPU saturated (proxy.engine.overload)", "episodes"),
            ("summon_overload_seconds", "Time spent shedding because summon's own CPU was saturated", "seconds"),
        ):
            family = CounterMetricFamily(name, doc)
            family.add_metric([], o.get(key, 0))
            yield family
        shedding = GaugeMetricFamily("summon_overloaded", "1 while summon sheds load because its CPU is saturated")
        shedding.add_metric([], 1 if o.get("shedding") else 0)
        yield shedding
