"""Several workers, one admin API: worker 0 asks the others for their figures.

With `workers = N` each worker process runs its own engine (sharing one fleet with the
others through `proxy.cluster.sqlite_store`) and counts its own requests, so one worker's
/status and /metrics would be a fraction of the truth. Workers 1..N-1 answer on unix
sockets in a directory the parent makes (mode 0700, removed when it exits): one line in
(`status` or `metrics`), one JSON document out. Worker 0's admin merges their answers
with its own:

- /status: each route's instances, each listed once (every worker also lists the others'
  ready instances, which it routes to) and marked with the `worker` that owns it; queue
  depths summed, the cap the same for all; static routes, the same in every worker, once.
- /metrics: every sample summed by name and labels (counters, histogram buckets, gauges
  alike: each worker reports only its own instances, connections and requests), except
  `*_created`, the earliest, and the cap, the same in every worker.

A worker that does not answer within `ASK_TIMEOUT_S` (stuck, or gone) is named in
`totals.unreachable_workers` and left out rather than holding the admin API up.

Workers end with their parent (`die_with_parent`): a parent killed with SIGKILL would
otherwise leave them serving the port beside the next summon, their instances owned by
processes nobody runs any more. They get SIGTERM and drain like on any other stop.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import os
import signal
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from ..engine.lifecycle import LIVE_STATES

log = logging.getLogger("summon.workers")

ASK_TIMEOUT_S = 1.0
_SAME_IN_EVERY_WORKER = frozenset({"summon_instance_cap"})  # one fleet, one cap: not a sum
_MAX_ANSWER = 64 * 1024 * 1024


_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int, sig: int = signal.SIGTERM) -> None:
    """Have the kernel send `sig` to this (forked) process when `parent` dies; if it
    died already, before the request was made, act on it now."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    except (OSError, AttributeError) as exc:
        log.warning("cannot ask to die with the parent: %s", exc)
    if os.getppid() != parent:
        os.kill(os.getpid(), sig)


def socket_path(directory: str, worker: int) -> str:
    return os.path.join(directory, f"worker-{worker}.sock")


class PeerServer:
    """What a worker other than 0 serves to worker 0."""

    def __init__(self, path: str, status: Callable[[], dict[str, Any]], registry: CollectorRegistry) -> None:
        self.path = path
        self.status = status
        self.registry = registry
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._handle, self.path)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            what = (await asyncio.wait_for(reader.readline(), ASK_TIMEOUT_S)).strip()
            if what == b"status":
                answer: Any = self.status()
            elif what == b"metrics":
                answer = metric_samples(self.registry)
            else:
                answer = {"error": f"unknown question {what[:40]!r}"}
            writer.write(json.dumps(answer).encode())
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        except Exception:  # the peer endpoint must never take the worker down
            log.exception("peer request failed")
        finally:
            writer.close()


async def ask(directory: str, workers: int, what: str) -> tuple[list[Any], list[int]]:
    """Ask workers 1..workers-1 at once; returns (answers in worker order, unreachable ids)."""

    async def one(worker: int) -> Any:
        reader, writer = await asyncio.open_unix_connection(socket_path(directory, worker), limit=_MAX_ANSWER)
        try:
            writer.write(what.encode() + b"\n")
            return json.loads(await reader.read())
        finally:
            writer.close()

    ids = list(range(1, workers))
    results = await asyncio.gather(*(asyncio.wait_for(one(i), ASK_TIMEOUT_S) for i in ids), return_exceptions=True)
    answers, unreachable = [], []
    for worker, result in zip(ids, results, strict=True):
        if isinstance(result, BaseException) or not isinstance(result, (dict, list)) or (
                isinstance(result, dict) and "error" in result):
            log.warning("worker %d did not answer %s: %s", worker, what, result)
            unreachable.append(worker)
        else:
            answers.append((worker, result))
    return answers, unreachable


def metric_samples(registry: CollectorRegistry) -> list[dict[str, Any]]:
    """A registry's families, as JSON: name, type, documentation and samples."""
    return [{"name": m.name, "type": m.type, "documentation": m.documentation,
             "samples": [[s.name, s.labels, s.value] for s in m.samples]}
            for m in registry.collect()]


def merge_metrics(snapshots: list[list[dict[str, Any]]]) -> tuple[bytes, str]:
    """Prometheus text (and its content type) for the sum of several workers' `metric_samples`."""
    families: dict[str, tuple[str, str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]] = {}
    for snapshot in snapshots:
        for fam in snapshot:
            _, _, samples = families.setdefault(fam["name"], (fam["type"], fam["documentation"], {}))
            for name, labels, value in fam["samples"]:
                key = (name, tuple(sorted(labels.items())))
                if key not in samples:
                    samples[key] = value
                elif name.endswith("_created"):
                    samples[key] = min(samples[key], value)
                elif name in _SAME_IN_EVERY_WORKER:
                    samples[key] = max(samples[key], value)
                else:
                    samples[key] += value

    class Merged(Collector):
        def collect(self):  # type: ignore[no-untyped-def]
            for name, (typ, doc, samples) in families.items():
                metric = Metric(name, doc, typ)
                for (sample, labels), value in samples.items():
                    metric.add_sample(sample, dict(labels), value)
                yield metric

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Merged())
    return generate_latest(registry), CONTENT_TYPE_LATEST


def merge_status(snapshots: list[tuple[int, dict[str, Any]]], unreachable: list[int]) -> dict[str, Any]:
    """One /status from several workers' `status_of` snapshots, worker 0's first."""
    routes: dict[str, dict[str, Any]] = {}
    totals: dict[str, Any] = {}
    overload: dict[str, Any] = {}
    for worker, snap in snapshots:
        for r in snap.get("routes", []):
            merged = routes.get(r["name"])
            if r.get("static"):
                routes.setdefault(r["name"], r)  # the same fixed upstreams in every worker
                continue
            if merged is None:
                merged = routes[r["name"]] = {**r, "instances": [], "queued": 0}
            # every worker lists the others' ready instances too (it routes to them): keep each
            # instance once, as its owner (the node its own snapshot names) reports it
            seen = {i["id"]: n for n, i in enumerate(merged["instances"])}
            me = snap.get("totals", {}).get("cluster", {}).get("node")
            for i in r.get("instances", []):
                own = me is None or i.get("node") == me
                if i["id"] not in seen:
                    seen[i["id"]] = len(merged["instances"])
                    merged["instances"].append({**i, "worker": worker})
                elif own:
                    merged["instances"][seen[i["id"]]] = {**i, "worker": worker}
            merged["queued"] += r.get("queued", 0)
            if r.get("backoff_until"):
                merged["backoff_until"] = max(merged.get("backoff_until") or 0, r["backoff_until"])
        _add(totals, snap.get("totals", {}), first=("routes", "cap", "cluster"))
        _add(overload, snap.get("overload", {}), largest=("wait_ms", "seconds"))
    if any("cluster" in snap.get("totals", {}) for _, snap in snapshots):  # one fleet: count each instance once
        totals["instances"] = sum(1 for r in routes.values() for i in r.get("instances", [])
                                  if i.get("state") in LIVE_STATES)
    totals["workers"] = len(snapshots) + len(unreachable)
    totals["unreachable_workers"] = unreachable
    return {"routes": list(routes.values()), "totals": totals, "overload": overload}


def _add(into: dict[str, Any], more: dict[str, Any], first: tuple[str, ...] = (),
         largest: tuple[str, ...] = ()) -> None:
    """Sum numbers and `or` flags into `into`; keys in `first` keep the first value (the
    same in every worker), keys in `largest` the largest (a per-worker level, not a count)."""
    for key, value in more.items():
        old = into.get(key)
        if key not in into:
            into[key] = value
        elif key in first:
            continue
        elif isinstance(value, dict) and isinstance(old, dict):  # totals.standby: per worker, summed
            merged = dict(old)
            _add(merged, value, first=(*first, "budget_mib"), largest=largest)
            into[key] = merged
        elif isinstance(value, bool):
            into[key] = bool(old) or value
        elif isinstance(value, (int, float)) and isinstance(old, (int, float)):
            into[key] = max(old, value) if key in largest else old + value
