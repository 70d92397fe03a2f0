"""`proxy.observe.stats` against a hand-built history with answers worked out on paper, and the
``summon log`` / ``summon stats`` commands on a real database."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pytest

from proxy.cli.events import add_parsers, format_events, parse_since
from proxy.observe import stats
from proxy.observe.events import Event, EventLog
from proxy.observe.stats import TOTAL, RouteStats, compute, percentile


def history(base: float = 0.0) -> list[Event]:
    """Two routes.  Timeline (seconds after ``base``):

    api: i1 summoned 0, ready 2 (2.0 s, 3 waiting), stopped 20
         i2 summoned 10, ready 11 (1.0 s, 1 waiting), failed 35
         i3 summoned 30, ready 34 (4.0 s), still running
    web: w1 summoned 5, failed 8 (never ready); rejected 12 and 15
         w2 summoned 40, ready 40.5 (0.5 s, 5 waiting), stopped 60
    """
    rows: list[tuple[float, str, str, str, float | None, dict[str, int]]] = [
        (0, "summoned", "api", "i1", None, {}),
        (2, "ready", "api", "i1", 2.0, {"cold_requests": 3}),
        (5, "summoned", "web", "w1", None, {}),
        (8, "failed", "web", "w1", None, {}),
        (10, "summoned", "api", "i2", None, {}),
        (11, "ready", "api", "i2", 1.0, {"cold_requests": 1}),
        (12, "rejected", "web", "", None, {}),
        (15, "rejected", "web", "", None, {}),
        (20, "stopped", "api", "i1", 20.0, {}),
        (30, "summoned", "api", "i3", None, {}),
        (34, "ready", "api", "i3", 4.0, {}),
        (35, "failed", "api", "i2", None, {}),
        (40, "summoned", "web", "w2", None, {}),
        (40.5, "ready", "web", "w2", 0.5, {"cold_requests": 5}),
        (60, "stopped", "web", "w2", 20.0, {}),
    ]
    return [Event(kind, route=route, instance=inst, duration_s=d, detail=detail, ts=base + ts)
            for ts, kind, route, inst, d, detail in rows]


def by_route(rows: list[RouteStats]) -> dict[str, RouteStats]:
    return {r.route: r for r in rows}


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(20, 0, -1)]  # unsorted on purpose
    assert percentile(values, 50) == 10
    assert percentile(values, 95) == 19
    assert percentile(values, 100) == 20
    assert percentile(values, 1) == 1
    assert percentile([1.0, 2.0, 4.0], 50) == 2
    assert percentile([7.0], 95) == 7
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile([1.0], 0)


def test_whole_history() -> None:
    rows = compute(history(), now=100)
    assert [r.route for r in rows] == ["api", "web", TOTAL]
    got = by_route(rows)
    assert got["api"] == RouteStats("api", boots=3, ready_p50_s=2.0, ready_p95_s=4.0, ready_max_s=4.0,
                                    cold_requests=4, peak_instances=2,
                                    instance_seconds=20 + 25 + 70,  # i3 runs until now
                                    failures=1, rejected=0)
    assert got["web"] == RouteStats("web", boots=2, ready_p50_s=0.5, ready_p95_s=0.5, ready_max_s=0.5,
                                    cold_requests=5, peak_instances=1, instance_seconds=3 + 20,
                                    failures=1, rejected=2)
    # Ready times over all routes: [0.5, 1, 2, 4]. The global peak is 2, not 2 + 1:
    # web's instances never overlapped api's busiest moment.
    assert got[TOTAL] == RouteStats(TOTAL, boots=5, ready_p50_s=1.0, ready_p95_s=4.0, ready_max_s=4.0,
                                    cold_requests=9, peak_instances=2, instance_seconds=138,
                                    failures=2, rejected=2)


def test_since_window_clips_and_counts_only_inside() -> None:
    got = by_route(compute(history(), now=100, since=25))
    # api: i1 ended before the window (0 s); i2 runs 25..35; i3 30..100. i2 was already
    # running when the window opened, so the peak is 2 at t=30.
    assert got["api"] == RouteStats("api", boots=1, ready_p50_s=4.0, ready_p95_s=4.0, ready_max_s=4.0,
                                    cold_requests=0, peak_instances=2, instance_seconds=10 + 70,
                                    failures=1, rejected=0)
    assert got["web"] == RouteStats("web", boots=1, ready_p50_s=0.5, ready_p95_s=0.5, ready_max_s=0.5,
                                    cold_requests=5, peak_instances=1, instance_seconds=20,
                                    failures=0, rejected=0)
    assert got[TOTAL].boots == 2
    assert got[TOTAL].ready_p50_s == 0.5 and got[TOTAL].ready_p95_s == 4.0
    assert got[TOTAL].peak_instances == 2
    assert got[TOTAL].instance_seconds == 100


def test_window_after_all_events_still_charges_running_instances() -> None:
    rows = compute(history(), now=300, since=200)
    assert [r.route for r in rows] == ["api", TOTAL]  # web has nothing running and no events
    api = rows[0]
    assert (api.boots, api.peak_instances, api.instance_seconds, api.ready_p50_s) == (0, 1, 100, None)
    assert rows[1].peak_instances == 1


def test_events_after_now_are_ignored_and_empty_input() -> None:
    rows = compute(history(), now=10.5)
    api = by_route(rows)["api"]
    assert api.boots == 2 and api.instance_seconds == 10.5 + 0.5
    assert compute([], now=1) == [RouteStats(TOTAL)]


def test_malformed_cold_requests_do_not_break_the_report() -> None:
    events = [Event("ready", route="a", duration_s=1, detail={"cold_requests": "many"}, ts=1),
              Event("ready", route="a", duration_s=1, detail={"cold_requests": True}, ts=2)]
    assert compute(events, now=3)[0].cold_requests == 0


def test_format_table_and_json() -> None:
    rows = compute(history(), now=100)
    table = stats.format_table(rows)
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["route", "boots", "ready"]
    assert lines[1].split() == ["api", "3", "2.00s", "4.00s", "4.00s", "4", "2", "115.0", "1", "0", "0", "0"]
    assert lines[2].split() == ["web", "2", "500ms", "500ms", "500ms", "5", "1", "23.0", "1", "2", "0", "0"]
    assert set(lines[3]) == {"-"}
    assert lines[4].startswith(TOTAL)
    assert len({len(x) for x in lines}) == 1  # aligned: every line as wide as the header

    obj = json.loads(stats.to_json(rows))
    assert [r["route"] for r in obj["routes"]] == ["api", "web"]
    assert obj["totals"]["instance_seconds"] == 138
    assert obj["routes"][0]["ready_p95_s"] == 4.0


# --- the CLI ----------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="summon")
    add_parsers(p.add_subparsers(dest="command", required=True))
    return p


def run(*argv: str) -> int:
    args = parser().parse_args(list(argv))
    code: int = args.func(args)
    return code


@pytest.fixture
def live_db(tmp_path: Path) -> tuple[Path, float]:
    """The hand-built history with t=0 placed 100 s ago, so "now" is about t=100 as in
    `test_whole_history`, and ``--since 75s`` is about ``since=25``."""
    base = time.time() - 100
    db = tmp_path / "ev.db"
    with EventLog(db) as log:
        for e in history(base):
            log.record(e)
    return db, base


def test_log_human(live_db: tuple[Path, float], capsys: pytest.CaptureFixture[str]) -> None:
    db, _ = live_db
    assert run("log", "--db", str(db)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(history())
    first = lines[1].split()
    assert first[1:6] == ["ready", "api", "i1", "-", "2.00s"] and first[6] == "cold_requests=3"
    assert lines[1].index("ready") == lines[0].index("summoned")  # columns line up
    assert "500ms" in lines[13]


def test_log_filters_and_json(live_db: tuple[Path, float], capsys: pytest.CaptureFixture[str]) -> None:
    db, base = live_db
    assert run("log", "--db", str(db), "--json", "--route", "web", "-n", "2") == 0
    objs = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [(o["kind"], o["route"]) for o in objs] == [("ready", "web"), ("stopped", "web")]
    assert objs[0]["time"].endswith("Z") and objs[0]["detail"] == {"cold_requests": 5}

    assert run("log", "--db", str(db), "--json", "--since", "45s") == 0  # base + 55 onwards
    assert [json.loads(x)["kind"] for x in capsys.readouterr().out.splitlines()] == ["stopped"]


def test_stats_since_matches_compute(live_db: tuple[Path, float], capsys: pytest.CaptureFixture[str]) -> None:
    db, base = live_db
    assert run("stats", "--db", str(db), "--json", "--since", "75s") == 0  # window opens near base + 25
    obj = json.loads(capsys.readouterr().out)
    api = obj["routes"][0]
    # i2 started before the window: the CLI must still charge it and count it in the peak.
    assert api["route"] == "api" and api["boots"] == 1 and api["peak_instances"] == 2
    assert api["instance_seconds"] == pytest.approx(80, abs=1.0)
    assert obj["totals"]["instance_seconds"] == pytest.approx(100, abs=1.0)

    assert run("stats", "--db", str(db)) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("route") and TOTAL in out


def test_config_path_and_errors(tmp_path: Path, live_db: tuple[Path, float],
                                capsys: pytest.CaptureFixture[str]) -> None:
    db, _ = live_db
    cfg = tmp_path / "summon.toml"
    cfg.write_text(f'[events]\npath = "{db.name}"\n')
    assert run("log", "-c", str(cfg), "-n", "1") == 0
    assert "stopped" in capsys.readouterr().out

    missing = tmp_path / "none.db"
    assert run("stats", "--db", str(missing)) == 1
    err = capsys.readouterr().err
    assert "no event database" in err and str(missing) in err
    assert not missing.exists()

    assert run("log", "-c", str(tmp_path / "nope.toml")) == 2
    assert "nope.toml" in capsys.readouterr().err

    not_db = tmp_path / "junk.db"
    not_db.write_text("this is not sqlite")
    assert run("log", "--db", str(not_db)) == 1
    assert "cannot read" in capsys.readouterr().err

    with pytest.raises(SystemExit) as exc:
        parser().parse_args(["log", "--since", "yesterday-ish"])
    assert exc.value.code == 2
    assert "neither a duration" in capsys.readouterr().err


def test_parse_since() -> None:
    assert parse_since("10m", now=1000.0) == 400.0
    assert parse_since("500ms", now=1000.0) == 999.5
    assert parse_since("1970-01-01T00:01:00Z") == 60.0
    assert parse_since("1970-01-01T00:01:00") == 60.0  # naive means UTC
    assert parse_since("1970-01-01T01:01:00+01:00") == 60.0
    with pytest.raises(ValueError):
        parse_since("soon")


def test_format_events_empty() -> None:
    assert format_events([]) == ""


def test_a_restart_ends_the_instances_a_killed_run_left_open() -> None:
    from proxy.observe.events import Event
    from proxy.observe.stats import compute

    events = [
        Event(kind="summoned", route="r", instance="a", ts=100.0),
        Event(kind="startup", ts=130.0),  # the proxy was SIGKILLed; a new one starts
        Event(kind="summoned", route="r", instance="b", ts=140.0),
        Event(kind="stopped", route="r", instance="b", ts=150.0),
    ]
    (row, _total) = compute(events, now=1000.0)
    assert row.route == "r"
    assert row.instance_seconds == 30.0 + 10.0  # not 900 s for "a" still running
    assert row.peak_instances == 1


def test_pre_summons_used_and_wasted_per_route() -> None:
    """css: p1 pre-summoned and then asked for (used), p2 pre-summoned and idled out unused
    (wasted), p3 pre-summoned and not asked for yet (neither); c1 an ordinary boot."""
    rows = [
        (0, "summoned", "css", "p1", {}), (0, "presummoned", "css", "p1", {"by": "page"}),
        (1, "first_request", "css", "p1", {}),
        (2, "summoned", "css", "p2", {}), (2, "presummoned", "css", "p2", {"by": "page"}),
        (17, "stopped", "css", "p2", {}),
        (20, "summoned", "css", "c1", {}), (21, "first_request", "css", "c1", {}), (30, "stopped", "css", "c1", {}),
        (40, "summoned", "css", "p3", {}), (40, "presummoned", "css", "p3", {"by": "page"}),
    ]
    events = [Event(kind=k, route=r, instance=i, detail=d, ts=t) for t, k, r, i, d in rows]
    got = {s.route: s for s in compute(events, now=50)}
    assert (got["css"].presummons_used, got["css"].presummons_wasted, got["css"].boots) == (1, 1, 4)
    assert (got[TOTAL].presummons_used, got[TOTAL].presummons_wasted) == (1, 1)
    table = stats.format_table(list(got.values()))
    assert table.splitlines()[0].endswith("pre used  wasted")
# --- boot phases ------------------------------------------------------------------------


def phased(ts: float, image: str, duration: float, **phases: float) -> Event:
    return Event("ready", route="r", instance=f"i{ts}", duration_s=duration, ts=ts,
                 detail={"cold_requests": 1, "image": image, "phases": phases})


def test_phase_p50_per_image_and_start_kind() -> None:
    events = [
        phased(1, "decks", 2.0, prepare=0.01, qemu_up=0.2, firmware=0.5, network=0.3, first_response=0.09),
        phased(2, "decks", 3.0, prepare=0.03, qemu_up=0.4, firmware=0.7, network=0.2, first_response=0.08),
        phased(3, "decks", 2.5, prepare=0.02, qemu_up=0.3, firmware=0.6, network=0.1, first_response=0.07),
        phased(4, "decks", 0.6, prepare=0.01, restore=0.5, first_response=0.09),
        Event("ready", route="r", instance="old", duration_s=1.0, ts=5, detail={"cold_requests": 1}),  # no phases
        Event("failed", route="r", instance="x", ts=6, detail={"phases": {"prepare": 9.0}}),  # not a ready
    ]
    rows = stats.phase_stats(events)
    assert [(r.image, r.start, r.boots) for r in rows] == [("decks", "boot", 3), ("decks", "restore", 1)]
    boot = rows[0]
    assert boot.p50_s == {"prepare": 0.02, "qemu_up": 0.3, "firmware": 0.6, "network": 0.2, "first_response": 0.08}
    assert boot.ready_p50_s == 2.5
    assert [r.image for r in stats.phase_stats(events, since=3.5)] == ["decks"]  # the restore only

    table = stats.format_phases(rows).splitlines()
    assert table[0] == "boot phases, p50 in ms"
    head = table[1].split()
    # the phases in the order they happen, the first response last, then the whole
    assert head == ["image", "start", "boots", "prepare", "qemu_up", "restore", "firmware", "network",
                    "first_response", "ready"]
    assert table[2].split() == ["decks", "boot", "3", "20", "300", "-", "600", "200", "80", "2500"]
    assert table[3].split() == ["decks", "restore", "1", "10", "-", "500", "-", "-", "90", "600"]

    obj = json.loads(stats.to_json(compute(events, now=10), rows))
    assert obj["phases"][0]["p50_s"]["firmware"] == 0.6


def test_malformed_phases_are_skipped() -> None:
    ev = Event("ready", route="r", instance="i", duration_s=1.0, ts=1,
               detail={"phases": {"prepare": "soon", "qemu_up": True, "firmware": 0.5}})
    (row,) = stats.phase_stats([ev])
    assert row.p50_s == {"firmware": 0.5} and row.image == "r"
