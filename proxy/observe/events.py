"""The event log: everything that happens to routes and instances, remembered in SQLite.

Why it is shaped like this:

* The proxy records events from its event loop and from backend threads.  A slow disk
  must never stall a request, so `EventLog.record` only puts the event on a bounded
  in-memory queue; one writer thread drains the queue and inserts in batches (one
  transaction per batch, WAL mode, ``synchronous=NORMAL``: a power cut may lose the last
  batch, never corrupt the file).
* When the queue is full the event is *dropped and counted* (`EventLog.dropped`, plus one
  warning in the log).  Blocking the proxy would be worse than losing history, and
  silently losing it would be worse than both.
* Readers (`summon log`, `summon stats`, the admin API) open their own connections; WAL
  lets them read while the proxy writes.  `open_readonly` is for the CLI, which must not
  create or modify the database of a running proxy.
* Retention runs inside the writer thread, so there is only ever one writer.

This module also holds `setup_json_logging`, because log lines and events share the same
audience (an operator piping JSON into a log shipper) and the same JSON conventions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import queue
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    kind TEXT NOT NULL,
    route TEXT NOT NULL DEFAULT '',
    instance TEXT NOT NULL DEFAULT '',
    image_digest TEXT NOT NULL DEFAULT '',
    host TEXT NOT NULL DEFAULT '',
    region TEXT NOT NULL DEFAULT '',
    duration_s REAL,
    detail TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS events_ts ON events (ts);
CREATE INDEX IF NOT EXISTS events_route_ts ON events (route, ts);
"""

_COLUMNS = "ts, kind, route, instance, image_digest, host, region, duration_s, detail"

#: Kinds that begin and end an instance's life; `EventReader.running_at` and
#: `proxy.observe.stats` replay these.
START_KINDS = frozenset({"summoned"})
END_KINDS = frozenset({"stopped", "failed"})
# `summon serve` starting: whatever an earlier run left "running" in the log is gone by
# then (children die with their parent, orphan domains are reaped), so it ends here.
RESET_KINDS = frozenset({"startup"})


@dataclass(frozen=True)
class Event:
    """One thing that happened.  Frozen so listeners cannot alter what others see."""

    kind: str
    route: str = ""
    instance: str = ""
    image_digest: str = ""
    host: str = ""
    region: str = ""
    duration_s: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    ts: float = 0.0
    node: str = ""  # the proxy it happened on, in a fleet's merged log (proxy.observe.fleetlog); "" locally


def iso_time(ts: float) -> str:
    """ISO 8601 in UTC with milliseconds and a ``Z``: sorts as text, unambiguous across hosts."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def event_dict(event: Event) -> dict[str, Any]:
    """The JSON shape of an event, shared by `json_line`, the admin API and `proxy.observe.stats`."""
    return {
        "ts": event.ts,
        "time": iso_time(event.ts),
        "kind": event.kind,
        "route": event.route,
        "instance": event.instance,
        "image_digest": event.image_digest,
        "host": event.host,
        "region": event.region,
        "duration_s": event.duration_s,
        "detail": event.detail,
        **({"node": event.node} if event.node else {}),
    }


def json_line(event: Event) -> str:
    """One JSON object, no newline inside, for ``summon log --json`` and ``GET /events``."""
    return json.dumps(event_dict(event), default=str, separators=(",", ":"))


def _detail_text(detail: dict[str, Any]) -> str:
    # default=str: a detail must never make an event unrecordable (a Path, an exception...).
    return json.dumps(detail, default=str, separators=(",", ":"), sort_keys=True)


def _row(event: Event) -> tuple[Any, ...]:
    return (event.ts, event.kind, event.route, event.instance, event.image_digest, event.host,
            event.region, event.duration_s, _detail_text(event.detail))


def _event(row: sqlite3.Row | tuple[Any, ...]) -> Event:
    ts, kind, route, instance, digest, host, region, duration, detail_text = row
    try:
        detail = json.loads(detail_text) if detail_text else {}
    except ValueError:
        detail = {"_raw": detail_text}  # written by something else; show, do not crash
    if not isinstance(detail, dict):
        detail = {"_value": detail}
    return Event(kind=kind, route=route or "", instance=instance or "", image_digest=digest or "",
                 host=host or "", region=region or "", duration_s=duration, detail=detail, ts=ts)


class EventReader:
    """Queries over an events database.  Each call opens and closes its own connection,
    so a reader holds no lock and no file handle between calls (the proxy may be
    checkpointing the WAL meanwhile)."""

    def __init__(self, path: Path | str, *, readonly: bool = False) -> None:
        self.path = Path(path)
        self._readonly = readonly

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        if self._readonly:
            conn = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, timeout=5.0)
        else:
            conn = sqlite3.connect(self.path, timeout=5.0)
        try:
            yield conn
        finally:
            conn.close()

    def query(
        self,
        since: float | None = None,
        route: str | None = None,
        kinds: Iterable[str] | None = None,
        limit: int | None = None,
        *,
        until: float | None = None,
        newest: bool = False,
    ) -> list[Event]:
        """Events with ``since <= ts < until``, oldest first.

        ``limit`` keeps the *oldest* N matches (so ``since`` + ``limit`` pages forward),
        or the *newest* N with ``newest=True`` (what ``summon log -n`` shows).
        """
        where: list[str] = []
        params: list[Any] = []
        if since is not None:
            where.append("ts >= ?")
            params.append(since)
        if until is not None:
            where.append("ts < ?")
            params.append(until)
        if route is not None:
            where.append("route = ?")
            params.append(route)
        if kinds is not None:
            kind_list = list(kinds)
            if not kind_list:
                return []
            where.append(f"kind IN ({', '.join('?' * len(kind_list))})")
            params.extend(kind_list)
        sql = f"SELECT {_COLUMNS} FROM events"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY ts DESC, id DESC" if newest else " ORDER BY ts, id"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(max(0, limit))
        with self._connect() as conn:
            rows = conn.execute(sql, params).fetchall()
        if newest:
            rows.reverse()
        return [_event(r) for r in rows]

    def tail(self, n: int) -> list[Event]:
        """The newest ``n`` events, oldest first."""
        return self.query(limit=n, newest=True)

    def running_at(self, t: float) -> list[Event]:
        """The "summoned" events of instances started before ``t`` and not yet ended at ``t``.

        `proxy.observe.stats` needs these to charge instance-seconds and count the running
        instances inside a ``--since`` window without loading the whole history: this
        streams the lifecycle rows and keeps only the open instances in memory.
        """
        kinds = sorted(START_KINDS | END_KINDS)
        resets = sorted(RESET_KINDS)
        sql = (f"SELECT {_COLUMNS} FROM events WHERE ts < ? AND ((instance != '' "
               f"AND kind IN ({', '.join('?' * len(kinds))})) OR kind IN ({', '.join('?' * len(resets))})) "
               "ORDER BY ts, id")
        running: dict[tuple[str, str], Event] = {}
        with self._connect() as conn:
            for row in conn.execute(sql, [t, *kinds, *resets]):
                ev = _event(row)
                key = (ev.route, ev.instance)
                if ev.kind in RESET_KINDS:
                    running.clear()
                elif ev.kind in START_KINDS:
                    running[key] = ev
                else:
                    running.pop(key, None)
        return sorted(running.values(), key=lambda e: e.ts)

    def after(self, last_id: int, limit: int) -> tuple[list[tuple[int, Event]], int]:
        """Up to ``limit`` events stored after row ``last_id``, oldest first, with their row
        ids, and the highest row id there is (for `proxy.observe.fleetlog`, which ships the
        log onward and remembers how far it got)."""
        with self._connect() as conn:
            rows = conn.execute(f"SELECT id, {_COLUMNS} FROM events WHERE id > ? ORDER BY id LIMIT ?",
                                (last_id, limit)).fetchall()
            (top,) = conn.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()
        return [(int(r[0]), _event(r[1:])) for r in rows], int(top)

    def count(self) -> int:
        """Number of stored events (for tests and the dashboard)."""
        with self._connect() as conn:
            (n,) = conn.execute("SELECT count(*) FROM events").fetchone()
        return int(n)


def open_readonly(path: Path | str) -> EventReader:
    """A reader for the CLI that can never create or change the database.

    Raises `FileNotFoundError` when there is no database, so the CLI can say so instead
    of letting SQLite create an empty file next to a typo.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no event database at {p}")
    return EventReader(p, readonly=True)


@dataclass
class _Prune:
    done: threading.Event = field(default_factory=threading.Event)


_STOP = object()


class EventLog(EventReader):
    """The writing side: `record` from anywhere, one writer thread owns the database.

    ``listeners`` are called synchronously by `record` with every event, including ones
    the queue had to drop, so metrics stay right even when the disk falls behind.
    """

    def __init__(
        self,
        path: Path | str,
        retention_s: float = 7 * 86400,
        max_rows: int = 1_000_000,
        clock: Callable[[], float] = time.time,
        *,
        queue_size: int = 10_000,
        batch_size: int = 500,
        prune_interval_s: float = 60.0,
        prune_every: int = 10_000,
    ) -> None:
        super().__init__(path)
        self.retention_s = retention_s
        self.max_rows = max_rows
        self.clock = clock
        self.listeners: list[Callable[[Event], None]] = []
        self.dropped = 0
        self.written = 0
        self._batch_size = batch_size
        self._prune_interval_s = prune_interval_s
        # A small max_rows (tests, tiny devices) must not overshoot by 10k rows.
        self._prune_every = max(1, min(prune_every, max_rows // 10 or 1))
        self._queue: queue.Queue[object] = queue.Queue(maxsize=queue_size)
        self._lock = threading.Lock()  # closed flag + enqueued counter + drop warning
        self._done = threading.Condition()  # committed counter
        self._enqueued = 0
        self._committed = 0
        self._closed = False
        self._warned_full = False
        self._listener_failed: set[int] = set()
        self._init_db()  # in the caller: a bad path fails here, loudly, not in a thread
        self._thread = threading.Thread(target=self._run, name="summon-events", daemon=True)
        self._thread.start()

    def _init_db(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(_SCHEMA)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            conn.commit()

    # --- the caller's side -------------------------------------------------------------

    def record(self, event: Event) -> None:
        """Queue ``event`` for writing and tell the listeners.  Never waits for the disk."""
        if event.ts == 0.0:
            event = dataclasses.replace(event, ts=self.clock())
        with self._lock:
            if self._closed:
                accepted = False
            else:
                try:
                    self._queue.put_nowait(event)
                    self._enqueued += 1
                    accepted = True
                except queue.Full:
                    accepted = False
            if not accepted:
                self.dropped += 1
                warn = not self._warned_full
                self._warned_full = True
        if not accepted and warn:
            log.warning("event log %s: %s; dropping events (counted in EventLog.dropped)", self.path,
                        "closed" if self._closed else "writer queue full")
        for listener in list(self.listeners):
            try:
                listener(event)
            except Exception:
                # Log once per listener: a broken dashboard must not flood the log.
                if id(listener) not in self._listener_failed:
                    self._listener_failed.add(id(listener))
                    log.exception("event listener %r failed (further failures not logged)", listener)

    @property
    def pending(self) -> int:
        """Events queued but not yet written (a gauge for /metrics)."""
        return self._queue.qsize()

    def flush(self, timeout: float = 5.0) -> None:
        """Block until every event recorded before this call is committed.

        Raises `TimeoutError` rather than returning quietly: a caller that flushes wants
        to know the data is on disk.
        """
        with self._lock:
            target = self._enqueued
        with self._done:
            if not self._done.wait_for(lambda: self._committed >= target, timeout):
                raise TimeoutError(f"event log: {target - self._committed} events not written after {timeout}s")

    def prune(self, timeout: float = 5.0) -> None:
        """Apply retention now (it also runs periodically by itself)."""
        req = _Prune()
        self._queue.put(req, timeout=timeout)
        if not req.done.wait(timeout):
            raise TimeoutError("event log: prune did not finish")

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued, stop the writer and close its connection.  Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            log.warning("event log %s: writer stuck, %d events lost at close", self.path, self.pending)
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("event log %s: writer did not stop within %.1fs", self.path, timeout)

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the writer thread -------------------------------------------------------------

    def _run(self) -> None:
        conn = sqlite3.connect(self.path, timeout=10.0)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            last_prune = self.clock()
            since_prune = 0
            while True:
                try:
                    first = self._queue.get(timeout=1.0)
                except queue.Empty:
                    first = None
                items = [] if first is None else [first]
                while len(items) < self._batch_size:
                    try:
                        items.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                events = [i for i in items if isinstance(i, Event)]
                controls = [i for i in items if not isinstance(i, Event)]
                if events:
                    self._write(conn, events)
                    since_prune += len(events)
                wants_prune = any(isinstance(c, _Prune) for c in controls)
                now = self.clock()
                if wants_prune or since_prune >= self._prune_every or now - last_prune >= self._prune_interval_s:
                    self._prune(conn, now)
                    last_prune, since_prune = now, 0
                with self._done:
                    self._committed += len(events)
                    self._done.notify_all()
                for c in controls:
                    if isinstance(c, _Prune):
                        c.done.set()
                if _STOP in controls:
                    return
        except Exception:
            log.exception("event log %s: writer thread died", self.path)
        finally:
            conn.close()

    def _write(self, conn: sqlite3.Connection, events: list[Event]) -> None:
        try:
            with conn:
                conn.executemany(f"INSERT INTO events ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                 [_row(e) for e in events])
            self.written += len(events)
        except sqlite3.Error:
            with self._lock:
                self.dropped += len(events)
            log.exception("event log %s: could not write %d events (counted as dropped)", self.path, len(events))

    def _prune(self, conn: sqlite3.Connection, now: float) -> None:
        """Delete rows older than the retention, then the oldest beyond ``max_rows``."""
        try:
            with conn:
                if math.isfinite(self.retention_s):
                    conn.execute("DELETE FROM events WHERE ts < ?", (now - self.retention_s,))
                conn.execute(
                    "DELETE FROM events WHERE id IN "
                    "(SELECT id FROM events ORDER BY ts DESC, id DESC LIMIT -1 OFFSET ?)",
                    (self.max_rows,),
                )
        except sqlite3.Error:
            log.exception("event log %s: retention failed", self.path)


# --- structured logging ---------------------------------------------------------------

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``msg`` and every ``extra``
    field, so ``log.info("booted", extra={"route": r})`` is queryable downstream."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRS and key not in out:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, separators=(",", ":"))


def setup_json_logging(level: str = "info", stream: TextIO | None = None) -> logging.Handler:
    """Point the root logger at ``stream`` (stderr) in JSON lines.

    Calling it again replaces the handler it installed before instead of doubling every
    line (``summon serve`` may call it again on reload).  Returns the handler.
    """
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r} (use debug, info, warning, error)")
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_summon_json", False)]:
        root.removeHandler(old)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler._summon_json = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(numeric)
    return handler
