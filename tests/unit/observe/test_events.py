"""The event log: recording from threads, flushing, filters, retention, never blocking."""

from __future__ import annotations

import io
import json
import logging
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.observe.events import Event, EventLog, json_line, open_readonly, setup_json_logging


class FakeClock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "events.db"


@pytest.fixture
def elog(db: Path, clock: FakeClock) -> Iterator[EventLog]:
    log = EventLog(db, clock=clock)
    yield log
    log.close()


def test_record_fills_ts_and_roundtrips_every_field(elog: EventLog, clock: FakeClock) -> None:
    ev = Event("ready", route="api", instance="i-1", image_digest="sha256:ab", host="h1", region="eu",
               duration_s=0.25, detail={"cold_requests": 3, "why": "first"})
    elog.record(ev)
    elog.record(Event("stopped", ts=5.0))
    elog.flush()
    got = elog.query()
    assert got[0] == Event("stopped", ts=5.0)
    assert got[1] == Event("ready", route="api", instance="i-1", image_digest="sha256:ab", host="h1", region="eu",
                           duration_s=0.25, detail={"cold_requests": 3, "why": "first"}, ts=clock.t)


def test_unserialisable_detail_is_stored_as_text(elog: EventLog) -> None:
    elog.record(Event("failed", detail={"path": Path("/x"), "err": ValueError("boom")}))
    elog.flush()
    assert elog.query()[0].detail == {"path": "/x", "err": "boom"}


def test_many_threads_nothing_lost(db: Path) -> None:
    with EventLog(db) as log:
        def worker(n: int) -> None:
            for i in range(500):
                log.record(Event("scale", route=f"r{n}", instance=str(i)))

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        log.flush()
        assert log.dropped == 0
        assert log.count() == 4000
        for n in range(8):
            # Per-thread order survives batching.
            assert [e.instance for e in log.query(route=f"r{n}")] == [str(i) for i in range(500)]


def test_flush_sees_everything_recorded_before_it(elog: EventLog) -> None:
    for round_ in range(5):
        for i in range(100):
            elog.record(Event("scale", instance=str(i)))
        elog.flush()
        assert elog.count() == 100 * (round_ + 1)


def test_query_filters(elog: EventLog) -> None:
    for ts, kind, route in [(10, "summoned", "a"), (20, "ready", "a"), (30, "summoned", "b"),
                            (40, "stopped", "a"), (50, "rejected", "b")]:
        elog.record(Event(kind, route=route, ts=float(ts)))
    elog.flush()

    def kinds(events: list[Event]) -> list[str]:
        return [e.kind for e in events]

    assert kinds(elog.query()) == ["summoned", "ready", "summoned", "stopped", "rejected"]
    assert kinds(elog.query(since=30)) == ["summoned", "stopped", "rejected"]
    assert kinds(elog.query(route="a")) == ["summoned", "ready", "stopped"]
    assert kinds(elog.query(kinds=["summoned", "stopped"])) == ["summoned", "summoned", "stopped"]
    assert elog.query(kinds=[]) == []
    assert kinds(elog.query(limit=2)) == ["summoned", "ready"]
    assert kinds(elog.query(limit=2, newest=True)) == ["stopped", "rejected"]
    assert kinds(elog.query(since=15, until=40, route="a")) == ["ready"]
    assert [e.ts for e in elog.tail(2)] == [40.0, 50.0]
    assert elog.tail(0) == []


def test_running_at(elog: EventLog) -> None:
    for ts, kind, inst in [(1, "summoned", "x"), (2, "summoned", "y"), (3, "stopped", "x"),
                           (4, "summoned", "z"), (6, "failed", "z")]:
        elog.record(Event(kind, route="a", instance=inst, ts=float(ts)))
    elog.flush()
    assert [e.instance for e in elog.running_at(5)] == ["y", "z"]
    assert [e.instance for e in elog.running_at(3.5)] == ["y"]
    assert [e.instance for e in elog.running_at(3)] == ["x", "y"]  # only events strictly before t count
    assert elog.running_at(1) == []


def test_retention_by_age(db: Path, clock: FakeClock) -> None:
    with EventLog(db, retention_s=100, clock=clock) as log:
        log.record(Event("old"))
        clock.t += 50
        log.record(Event("middle"))
        clock.t += 60  # "old" is now 110 s old, "middle" 60 s
        log.record(Event("new"))
        log.flush()
        log.prune()
        assert [e.kind for e in log.query()] == ["middle", "new"]


def test_retention_runs_by_itself_when_the_interval_passes(db: Path, clock: FakeClock) -> None:
    with EventLog(db, retention_s=100, clock=clock, prune_interval_s=60) as log:
        log.record(Event("old"))
        log.flush()
        clock.t += 200
        log.record(Event("new"))
        log.flush()  # the writer prunes before it reports the batch committed
        assert [e.kind for e in log.query()] == ["new"]


def test_retention_by_max_rows_keeps_the_newest(db: Path, clock: FakeClock) -> None:
    with EventLog(db, max_rows=10, clock=clock) as log:
        for i in range(25):
            clock.t += 1
            log.record(Event("scale", instance=str(i)))
        log.flush()
        assert log.count() <= 10 + 1  # pruning runs every max_rows//10 inserts
        log.prune()
        assert [e.instance for e in log.query()] == [str(i) for i in range(15, 25)]


def test_record_never_blocks_on_a_stuck_disk(db: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Another connection holds the write lock: the writer stalls, record() does not."""
    caplog.set_level(logging.WARNING, logger="proxy.observe.events")
    log = EventLog(db, queue_size=50, batch_size=10)
    blocker = sqlite3.connect(db)
    try:
        blocker.execute("BEGIN EXCLUSIVE")
        seen: list[Event] = []
        log.listeners.append(seen.append)
        # No clock needed for "does not block": the lock is held until after this loop, so
        # a record() that waited for the writer would never return. The loop runs in a
        # thread so that such a hang fails here (30 s, a bound noise cannot reach for
        # 5000 puts of a few microseconds) instead of at the test's timeout.
        puts = threading.Thread(target=lambda: [log.record(Event("scale", instance=str(i))) for i in range(5000)])
        puts.start()
        puts.join(30)
        assert not puts.is_alive(), "record() blocked while the writer was stuck"
        assert log.dropped >= 5000 - 50 - 10
        assert len(seen) == 5000  # listeners (metrics) still see every event
        assert sum("dropping events" in r.getMessage() for r in caplog.records) == 1  # warned once
        blocker.rollback()
        log.flush(timeout=15)
        assert log.count() == 5000 - log.dropped
    finally:
        blocker.close()
        log.close()


def test_listener_errors_are_swallowed(elog: EventLog) -> None:
    def broken(event: Event) -> None:
        raise RuntimeError("dashboard gone")

    seen: list[str] = []
    elog.listeners += [broken, lambda e: seen.append(e.kind)]
    elog.record(Event("ready"))
    elog.record(Event("stopped"))
    assert seen == ["ready", "stopped"]
    elog.flush()
    assert elog.count() == 2


def test_close_is_idempotent_and_later_records_are_counted_as_dropped(db: Path) -> None:
    log = EventLog(db)
    log.record(Event("ready"))
    log.close()
    log.close()
    log.record(Event("late"))
    assert log.dropped == 1
    assert [e.kind for e in open_readonly(db).query()] == ["ready"]  # close wrote the queue


def test_open_readonly(db: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        open_readonly(tmp_path / "missing.db")
    assert not (tmp_path / "missing.db").exists()
    with EventLog(db) as log:
        log.record(Event("ready", ts=1.0))
        log.flush()
        reader = open_readonly(db)  # while the writer is running
        assert [e.kind for e in reader.tail(5)] == ["ready"]
        with pytest.raises(sqlite3.OperationalError):
            with reader._connect() as conn:
                conn.execute("DELETE FROM events")


def test_schema(db: Path) -> None:
    EventLog(db).close()
    conn = sqlite3.connect(db)
    try:
        cols = [r[1] for r in conn.execute("PRAGMA table_info(events)")]
        indexes = {r[1] for r in conn.execute("PRAGMA index_list(events)")}
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    finally:
        conn.close()
    assert cols == ["id", "ts", "kind", "route", "instance", "image_digest", "host", "region", "duration_s", "detail"]
    assert {"events_ts", "events_route_ts"} <= indexes
    assert mode == "wal"


def test_json_line() -> None:
    line = json_line(Event("ready", route="api", duration_s=1.5, detail={"cold_requests": 2}, ts=0.5))
    assert "\n" not in line
    obj = json.loads(line)
    assert list(obj) == ["ts", "time", "kind", "route", "instance", "image_digest", "host", "region",
                         "duration_s", "detail"]
    assert obj["time"] == "1970-01-01T00:00:00.500Z"
    assert obj["detail"] == {"cold_requests": 2}


def test_setup_json_logging() -> None:
    root = logging.getLogger()
    saved_level, saved_handlers = root.level, list(root.handlers)
    buf = io.StringIO()
    try:
        setup_json_logging("debug", stream=io.StringIO())
        setup_json_logging("info", stream=buf)  # replaces, does not add
        assert sum(getattr(h, "_summon_json", False) for h in root.handlers) == 1
        logging.getLogger("proxy.test").info("booted %s", "i-1", extra={"route": "api", "ms": 12})
        logging.getLogger("proxy.test").debug("hidden")
        try:
            raise ValueError("bad")
        except ValueError:
            logging.getLogger("proxy.test").exception("failed")
        lines = [json.loads(x) for x in buf.getvalue().splitlines()]
        assert lines[0]["msg"] == "booted i-1"
        assert lines[0]["level"] == "info" and lines[0]["logger"] == "proxy.test"
        assert lines[0]["route"] == "api" and lines[0]["ms"] == 12
        assert isinstance(lines[0]["ts"], float)
        assert len(lines) == 2 and "ValueError: bad" in lines[1]["exc"]
        with pytest.raises(ValueError):
            setup_json_logging("loud")
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved_handlers:
            root.addHandler(h)
        root.setLevel(saved_level)
