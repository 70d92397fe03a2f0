"""Learned followers end to end: after a few visits in headless Chromium to /a.html, whose
script fetches /b.json (which split-site cannot see), a cold /a.html also summons /b.json,
and what was learned survives a restart (the table beside the event log)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from proxy.observe.events import open_readonly
from tests.helpers.browser import SUMMON, Browser, http_get, needs_chromium, start, stop, wait_port
from tests.helpers.summon_proc import free_port

pytestmark = [pytest.mark.slow, pytest.mark.browser, pytest.mark.timeout(240), needs_chromium]

PAGE = ("<!doctype html><title>a</title><p>a</p>\n<script>fetch('/b' + '.json').then(r => r.json())"
        ".then(j => { document.body.dataset.b = j.b })</script>\n")


def serve(work: Path, run: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    cfg = work / f"{run}.toml"
    cfg.write_text(f"""
include = ["routes/s.toml"]
[proxy]
listen = "127.0.0.1:{port}"
workers = 1
drain_timeout = "2s"
[limits]
max_instances = 8
[images]
dir = "images"
[events]
path = "events.db"
[prefetch]
learn_interval = "1s"
learn_window = "3s"
learn_min_count = 3
[[host]]
name = "local"
backend = "process"
slots = 8
""")
    proc = start([SUMMON, "serve", "-c", cfg], work / f"{run}.log", cwd=work)
    wait_port(port, proc, timeout=30)
    return proc, port


def test_a_learned_follower_is_summoned_with_its_page_after_a_restart(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "a.html").write_text(PAGE)
    (site / "b.json").write_text('{"b": 1}\n')
    (site / "c.txt").write_text("never asked for\n")
    r = subprocess.run([str(SUMMON), "routes", "split-site", str(site), "--name", "s"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "prefetch" not in (tmp_path / "routes" / "s.toml").read_text()  # nothing static to go on

    proc, port = serve(tmp_path, "first")
    table = tmp_path / "events.db.prefetch.json"
    try:
        for _ in range(4):  # a browser (a fresh profile: no cache) loads the page; its script fetches /b.json
            with Browser(timeout=60) as b:
                b.call("Page.navigate", {"url": f"http://127.0.0.1:{port}/a.html"}, session=True)
                assert b.wait_for("document.body && document.body.dataset.b", timeout=60) == "1"
            time.sleep(3.5)  # past the window: the visits are separate
        deadline = time.monotonic() + 30
        learned: dict[str, list[str]] = {}
        while time.monotonic() < deadline and not learned.get("s:/a.html"):
            time.sleep(0.5)
            if table.exists():
                learned = json.loads(table.read_text())["followers"]
        assert learned.get("s:/a.html") == ["s:/b.json"], learned
    finally:
        stop(proc)

    proc, port = serve(tmp_path, "second")  # every pool cold; the table is read back
    try:
        t0 = time.time()
        assert http_get(f"http://127.0.0.1:{port}/a.html", timeout=30)[0] == 200
    finally:
        stop(proc)
    events = open_readonly(tmp_path / "events.db").query(since=t0, kinds=["summoned", "presummoned"])
    assert {e.route for e in events if e.kind == "summoned"} == {"s:/a.html", "s:/b.json"}, events
    pres = [e for e in events if e.kind == "presummoned"]
    assert [(e.route, e.detail.get("by")) for e in pres] == [("s:/b.json", "s:/a.html")]
