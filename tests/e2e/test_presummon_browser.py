"""Predictive summoning in a real browser: a cold page load boots the page and its resources
in one wave (the per-URL demo site, the process backend).

The demo site is split into one image per URL (`summon routes split-site`, which writes each
page's `prefetch` list and `presummon = true`); a copy of the route table says
`presummon = false`. Headless Chromium loads `/` cold, alternately with pre-summoning off and
on, each time from a fresh `summon serve` (every pool cold) and a fresh browser profile (no
cache). The load times are printed, never asserted (two shared cores). Asserted, from the
event log of each "on" run: every resource the page fetched was booted by the page's own
request (a `presummoned` event naming `decks:/`), before the page was even answered (its
`summoned` event precedes the page's `first_request`, so the browser cannot have asked for
it yet), once, and nothing else was booted, and `summon stats` counts each as used; an
"off" run pre-summons nothing.
"""

from __future__ import annotations

import collections
import json
import statistics
import subprocess
from pathlib import Path

import pytest

from proxy.observe.events import open_readonly
from tests.helpers.browser import SITE, SUMMON, Browser, needs_chromium, start, stop, wait_port
from tests.helpers.summon_proc import free_port

pytestmark = [pytest.mark.slow, pytest.mark.browser, pytest.mark.timeout(300), needs_chromium]

NAME = "decks"
PAGE = f"{NAME}:/"
RESOURCES = {"/style.css", "/logo.svg", "/rss.svg", "/chart.png"}  # what / makes a browser fetch
ROUNDS = 2


def split(work: Path) -> None:
    r = subprocess.run([str(SUMMON), "routes", "split-site", str(SITE), "--name", NAME, "--images-dir",
                        str(work / "images"), "--routes-dir", str(work / "routes")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    table = (work / "routes" / f"{NAME}.toml").read_text()
    assert 'prefetch = ["/style.css", "/logo.svg", "/rss.svg", "/chart.png"]' in table
    (work / "routes-off").mkdir()
    (work / "routes-off" / f"{NAME}.toml").write_text(table.replace("presummon = true", "presummon = false"))


def config(work: Path, run: Path, routes: str, port: int, admin: int) -> Path:
    cfg = run / "summon.toml"
    cfg.write_text(f"""
include = ["{work / routes / (NAME + '.toml')}"]

[proxy]
listen = "127.0.0.1:{port}"
admin = "127.0.0.1:{admin}"
workers = 1
drain_timeout = "2s"

[limits]
max_instances = 32

[images]
dir = "{work / 'images'}"

[events]
path = "{run / 'events.db'}"

[[region]]
name = "local"
cidrs = ["127.0.0.0/8", "::1/128"]

[[host]]
name = "local"
region = "local"
backend = "process"
slots = 32
""")
    return cfg


def cold_load(work: Path, run: Path, routes: str) -> float:
    """One cold load of / from a fresh proxy: seconds from navigation start to the load event."""
    run.mkdir()
    port, admin = free_port(), free_port()
    cfg = config(work, run, routes, port, admin)
    proc = start([SUMMON, "serve", "-c", cfg], run / "summon.log", cwd=run)
    try:
        wait_port(port, proc, timeout=30)
        with Browser(timeout=60) as b:
            # (not b.navigate: its 10 s wait is shorter than a cold page on microVMs under TCG)
            b.call("Page.navigate", {"url": f"http://127.0.0.1:{port}/"}, session=True, timeout=120)
            b.wait_for("document.readyState === 'complete' && document.querySelector('h1') !== null", timeout=120)
            ms = b.evaluate("performance.getEntriesByType('navigation')[0].loadEventEnd")
            assert "decks" in b.dom()
    finally:
        stop(proc)  # drains and flushes its event log
    return float(ms) / 1000.0


def test_cold_page_load_boots_page_and_resources_in_one_wave(tmp_path: Path) -> None:
    work = tmp_path / "site"
    work.mkdir()
    split(work)
    times: dict[str, list[float]] = {"off": [], "on": []}
    for n in range(ROUNDS):
        for mode in ("off", "on"):  # alternating: the machine's load drifts
            run = tmp_path / f"{mode}-{n}"
            times[mode].append(cold_load(work, run, "routes" if mode == "on" else "routes-off"))
            check(run, mode)
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    print(f"\ncold page load of / (process backend, median of {ROUNDS}): pre-summoning off {off:.3f}s, "
          f"on {on:.3f}s ({on / off:.2f}x); off {times['off']}, on {times['on']}")


def check(run: Path, mode: str) -> None:
    events = open_readonly(run / "events.db").query(kinds=["summoned", "presummoned", "first_request"])
    summoned = collections.Counter(e.route for e in events if e.kind == "summoned")
    pres = [e for e in events if e.kind == "presummoned"]
    fetched = {f"{NAME}:{u}" for u in RESOURCES}
    assert set(summoned) <= {PAGE, *fetched}, summoned  # nothing the page does not fetch
    assert set(summoned.values()) == {1}, summoned  # one boot per route, never a second
    if mode == "off":
        assert not pres, pres
        return
    assert {e.route for e in pres} == fetched and all(e.detail.get("by") == PAGE for e in pres), pres
    page_first = min(e.ts for e in events if e.kind == "first_request" and e.route == PAGE)
    for e in pres:
        boot = next(s for s in events if s.kind == "summoned" and s.instance == e.instance)
        assert boot.ts <= page_first, (e.route, boot.ts, page_first)  # booting before the browser had the HTML
        firsts = [f.ts for f in events if f.kind == "first_request" and f.instance == e.instance]
        assert firsts and boot.ts <= min(firsts), e.route  # ... and then used by the browser
    # `summon stats` counts them as used: the browser asked for every one
    r = subprocess.run([str(SUMMON), "stats", "--db", str(run / "events.db"), "--json"], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    rows = {row["route"]: row for row in json.loads(r.stdout)["routes"]}
    assert {name: (rows[name]["presummons_used"], rows[name]["presummons_wasted"]) for name in fetched} == {
        name: (1, 0) for name in fetched}, rows
