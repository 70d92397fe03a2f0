"""Per-route summaries of the event log: pure functions, no database, no clock.

`compute` answers the questions an operator asks after a day of traffic: how often did
each route boot, how long did boots take, how many requests had to wait for one, how many
instances ran at once, and what did it cost in instance-seconds.

Definitions (the tests pin them down with hand-computed answers):

* **boots**: "summoned" events inside the window.
* **ready p50/p95/max**: over ``duration_s`` of "ready" events inside the window
  (boot-to-ready time).  Percentiles are *nearest-rank*: the smallest value with at
  least p% of the samples at or below it, i.e. ``sorted[ceil(p/100 * n) - 1]``.  It is
  always a value that really occurred, which is what one wants to quote for latency.
* **cold requests**: the sum of ``detail["cold_requests"]`` on "ready" events: the number
  of requests that were waiting for that boot.  One counter per boot rather than one row
  per request keeps the log small under load.
* **peak**: replay "summoned" (+1) and "stopped"/"failed" (-1, only for an instance
  that was running) in time order; the highest count reached inside the window,
  including the count already running when the window opens.  Events without an
  instance id count as boots but cannot be followed, so they do not count here.
* **instance-seconds**: for each instance, from its "summoned" to its "stopped"/"failed",
  or to ``now`` while it still runs, clipped to ``[since, now]``.
* **failures** / **rejected**: "failed" and "rejected" events inside the window.
* **pre-summons used / wasted**: instances of the route booted by "presummoned" events
  inside the window (predictive summoning: another route's request woke them) that then
  served a request ("first_request"), or that ended ("stopped"/"failed") without one.
  Those still waiting for their first request are neither.
* **boot phases** (`phase_stats`): per image and start kind ("boot" or "restore"), the
  nearest-rank p50 of each phase in ``detail["phases"]`` of "ready" events inside the
  window (where a driver's start went: libvirt create, QEMU up, firmware, the kernel,
  PID 1, network, server, first response; see `proxy.engine.fleet.boot_phases`). The
  p50s of the phases need not add up to the p50 of the whole.

To be right about instances that started before ``since``, pass their "summoned" events
too (`proxy.observe.events.EventReader.running_at` finds them); events before ``since`` are used
only for this replay, never counted.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

from ..backends.console import PHASES
from .events import END_KINDS, RESET_KINDS, START_KINDS, Event

TOTAL = "(all)"


@dataclass(frozen=True)
class RouteStats:
    route: str
    boots: int = 0
    ready_p50_s: float | None = None
    ready_p95_s: float | None = None
    ready_max_s: float | None = None
    cold_requests: int = 0
    peak_instances: int = 0
    instance_seconds: float = 0.0
    failures: int = 0
    rejected: int = 0
    presummons_used: int = 0
    presummons_wasted: int = 0


def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile of ``values`` (``None`` when there are none)."""
    if not values:
        return None
    if not 0 < p <= 100:
        raise ValueError("percentile must be in (0, 100]")
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def _cold(event: Event) -> int:
    value = event.detail.get("cold_requests", 0)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0  # a malformed detail must not break the whole report
    return int(value)


class _Acc:
    """Running totals for one route (or for all of them)."""

    def __init__(self) -> None:
        self.boots = 0
        self.ready: list[float] = []
        self.cold = 0
        self.failures = 0
        self.rejected = 0
        self.running: dict[str, float] = {}  # instance -> summoned ts
        self.node_of: dict[str, str] = {}  # instance -> the node that summoned it (a fleet's log)
        self.peak = 0
        self.instance_seconds = 0.0
        self.seen = False
        self.presummoned: set[str] = set()  # instances a pre-summon booted, not yet used or ended
        self.pre_used = 0
        self.pre_wasted = 0

    def result(self, route: str) -> RouteStats:
        return RouteStats(
            route=route,
            boots=self.boots,
            ready_p50_s=percentile(self.ready, 50),
            ready_p95_s=percentile(self.ready, 95),
            ready_max_s=max(self.ready) if self.ready else None,
            cold_requests=self.cold,
            peak_instances=self.peak,
            instance_seconds=self.instance_seconds,
            failures=self.failures,
            rejected=self.rejected,
            presummons_used=self.pre_used,
            presummons_wasted=self.pre_wasted,
        )


def compute(events: Iterable[Event], *, now: float, since: float | None = None) -> list[RouteStats]:
    """One `RouteStats` per route (sorted by name), then a totals row named `TOTAL`.

    The totals row's peak is the peak of all instances together (not the sum of the
    routes' peaks, which may have happened at different times); its percentiles are over
    all boots.
    """
    start = -math.inf if since is None else since
    routes: dict[str, _Acc] = {}
    total = _Acc()
    ordered = sorted((e for e in events if e.ts <= now), key=lambda e: e.ts)

    def charge(acc: _Acc, began: float, ended: float) -> None:
        acc.instance_seconds += max(0.0, min(ended, now) - max(began, start))

    # Instances already running when the window opens count towards its peak.
    window_open = False
    for ev in ordered:
        if not window_open and ev.ts >= start:
            window_open = True
            for acc in (*routes.values(), total):
                acc.peak = max(acc.peak, len(acc.running))
        if ev.kind in RESET_KINDS:  # a new `summon serve`: the previous run's instances are gone
            for a in (*routes.values(), total):  # (that node's: in a fleet's log, the others run on)
                for key in [k for k in a.running if a.node_of.get(k, "") == ev.node]:
                    charge(a, a.running.pop(key), ev.ts)
                    a.node_of.pop(key, None)
            continue
        acc = routes.setdefault(ev.route, _Acc())
        inside = ev.ts >= start
        if inside:
            acc.seen = True
        for a in (acc, total):
            if ev.kind in START_KINDS:
                key = f"{ev.route}\0{ev.instance}" if a is total else ev.instance
                if ev.instance:
                    a.running[key] = ev.ts
                    a.node_of[key] = ev.node
                if inside:
                    a.boots += 1
            elif ev.kind in END_KINDS and ev.instance:
                key = f"{ev.route}\0{ev.instance}" if a is total else ev.instance
                if key in a.presummoned:
                    a.presummoned.discard(key)
                    a.pre_wasted += 1
                began = a.running.pop(key, None)
                a.node_of.pop(key, None)
                if began is not None:
                    charge(a, began, ev.ts)
            if ev.kind == "first_request" and ev.instance:
                key = f"{ev.route}\0{ev.instance}" if a is total else ev.instance
                if key in a.presummoned:
                    a.presummoned.discard(key)
                    a.pre_used += 1
            if not inside:
                continue
            if ev.kind == "presummoned" and ev.instance:
                a.presummoned.add(f"{ev.route}\0{ev.instance}" if a is total else ev.instance)
            elif ev.kind == "ready":
                if ev.duration_s is not None:
                    a.ready.append(ev.duration_s)
                a.cold += _cold(ev)
            elif ev.kind == "failed":
                a.failures += 1
            elif ev.kind == "rejected":
                a.rejected += 1
            a.peak = max(a.peak, len(a.running))
    if not window_open:  # every event is older than the window: what still runs is the peak
        for a in (*routes.values(), total):
            a.peak = len(a.running)
    for acc in (*routes.values(), total):
        for began in acc.running.values():
            charge(acc, began, now)
        if acc.running:
            acc.seen = True  # still running in the window: it costs, so it is shown
    rows = [acc.result(name) for name, acc in sorted(routes.items()) if acc.seen]
    rows.append(total.result(TOTAL))
    return rows


@dataclass(frozen=True)
class PhaseStats:
    image: str
    start: str  # "boot" or "restore"
    boots: int
    p50_s: dict[str, float]  # phase -> p50, in the order of the phases
    ready_p50_s: float | None


def phase_stats(events: Iterable[Event], *, since: float | None = None) -> list[PhaseStats]:
    """p50 of each boot phase per (image, start kind), from "ready" events that carry them."""
    groups: dict[tuple[str, str], tuple[dict[str, list[float]], list[float]]] = {}
    for ev in events:
        phases = ev.detail.get("phases")
        if ev.kind != "ready" or not isinstance(phases, dict) or (since is not None and ev.ts < since):
            continue
        image = str(ev.detail.get("image") or ev.image_digest[:19] or ev.route)
        start = "restore" if "restore" in phases else "boot"
        by_phase, ready = groups.setdefault((image, start), ({}, []))
        for name, seconds in phases.items():
            if isinstance(seconds, int | float) and not isinstance(seconds, bool):
                by_phase.setdefault(str(name), []).append(float(seconds))
        if ev.duration_s is not None:
            ready.append(ev.duration_s)
    out = []
    for (image, start), (by_phase, ready) in sorted(groups.items()):
        p50 = {name: percentile(by_phase[name], 50) for name in sorted(by_phase, key=phase_rank)}
        out.append(PhaseStats(image, start, len(ready), {k: v for k, v in p50.items() if v is not None},
                              percentile(ready, 50)))
    return out


# --- output ---------------------------------------------------------------------------


def _dur(seconds: float | None) -> str:
    """Milliseconds below one second (boots from a snapshot), seconds above."""
    if seconds is None:
        return "-"
    if seconds < 1.0:
        return f"{seconds * 1000:.0f}ms"
    return f"{seconds:.2f}s"


_HEADERS = ("route", "boots", "ready p50", "p95", "max", "cold reqs", "peak", "inst-s", "failed", "rejected",
            "pre used", "wasted")


def format_table(rows: Sequence[RouteStats]) -> str:
    """An aligned text table, the totals row separated by a rule."""
    cells = [
        (r.route, str(r.boots), _dur(r.ready_p50_s), _dur(r.ready_p95_s), _dur(r.ready_max_s),
         str(r.cold_requests), str(r.peak_instances), f"{r.instance_seconds:.1f}", str(r.failures),
         str(r.rejected), str(r.presummons_used), str(r.presummons_wasted))
        for r in rows
    ]
    widths = [max(len(c[i]) for c in [_HEADERS, *cells]) for i in range(len(_HEADERS))]

    def line(values: Sequence[str]) -> str:
        first = values[0].ljust(widths[0])  # names left, numbers right
        rest = (v.rjust(w) for v, w in zip(values[1:], widths[1:], strict=True))
        return "  ".join((first, *rest)).rstrip()

    out = [line(_HEADERS)]
    for row, c in zip(rows, cells, strict=True):
        if row.route == TOTAL:
            out.append("-" * len(out[0]))
        out.append(line(c))
    return "\n".join(out)


def phase_rank(name: str) -> tuple[int, str]:
    """Known phases in the order they happen, others before the first response."""
    if name in PHASES:
        return (PHASES.index(name), "")
    return (PHASES.index("first_response") - 1, name)


def format_phases(rows: Sequence[PhaseStats]) -> str:
    """Per image, the p50 of each phase in ms (a phase a start kind lacks: "-")."""
    names: list[str] = []
    for r in rows:
        names += [n for n in r.p50_s if n not in names]
    names.sort(key=phase_rank)
    headers = ("image", "start", "boots", *names, "ready")
    cells = [(r.image, r.start, str(r.boots), *(f"{r.p50_s[n] * 1000:.0f}" if n in r.p50_s else "-" for n in names),
              f"{r.ready_p50_s * 1000:.0f}" if r.ready_p50_s is not None else "-") for r in rows]
    widths = [max(len(c[i]) for c in [headers, *cells]) for i in range(len(headers))]
    lines = ["boot phases, p50 in ms"]
    for values in (headers, *cells):
        lines.append("  ".join((values[0].ljust(widths[0]), values[1].ljust(widths[1]),
                                *(v.rjust(w) for v, w in zip(values[2:], widths[2:], strict=True)))).rstrip())
    return "\n".join(lines)


def to_json(rows: Sequence[RouteStats], phases: Sequence[PhaseStats] = ()) -> str:
    """``{"routes": [...], "totals": {...}, "phases": [...]}`` with durations in seconds."""
    routes = [asdict(r) for r in rows if r.route != TOTAL]
    totals = next((asdict(r) for r in rows if r.route == TOTAL), None)
    return json.dumps({"routes": routes, "totals": totals, "phases": [asdict(p) for p in phases]}, indent=2)
