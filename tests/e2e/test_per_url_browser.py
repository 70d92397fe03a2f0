"""`make demo-per-url` in a real browser: a cold page load summons one instance per fetched resource.

scripts/demo-per-url.sh splits the demo site (images/decks/site) into one image per URL and
serves it. Headless Chromium loads `/` once; then the event log must hold exactly one
"summoned" event per resource the page makes a browser fetch (the page itself, its
stylesheet, its images, its scripts) and none for anything else: not the other pages it
links to, not the feed. A browser's own guess at /favicon.ico has no route (the site has
no such file), so it is a 404 that summons nothing.
"""

from __future__ import annotations

import collections
import os
import signal
import socket
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

from proxy.observe.events import open_readonly
from tests.helpers.paths import REPO
from tests.helpers.summon_proc import free_port

ROOT = REPO  # the repository
CHROMIUM = Path("/usr/bin/chromium")
SITE = ROOT / "images" / "decks" / "site"
NAME = "decks"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.browser,
    pytest.mark.timeout(180),
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is not installed"),
]


class _Subresources(HTMLParser):
    """URLs a browser fetches to render a page: required (stylesheets, images, scripts) and
    optional (icons: a browser may or may not ask for them, depending on its mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.required: set[str] = set()
        self.optional: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        rel = set(a.get("rel", "").lower().split())
        if tag == "link" and "stylesheet" in rel and a.get("href"):
            self.required.add(a["href"])
        elif tag == "link" and "icon" in rel and a.get("href"):
            self.optional.add(a["href"])
        elif tag in ("img", "script", "iframe", "video", "audio", "source") and a.get("src"):
            self.required.add(a["src"])


def wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"demo-per-url exited {proc.returncode}:\n{log.read_text()}") from None
            time.sleep(0.05)
    raise RuntimeError(f"demo-per-url did not listen on {port}:\n{log.read_text()}")


def chromium_dump_dom(url: str, profile: Path) -> str:
    argv = [
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-proxy-server",
        "--disable-extensions", f"--user-data-dir={profile}", "--virtual-time-budget=5000", "--dump-dom", url,
    ]
    r = subprocess.run(argv, capture_output=True, timeout=90)
    assert r.returncode == 0, r.stderr.decode(errors="replace")[-2000:]
    return r.stdout.decode(errors="replace")


def test_cold_page_load_summons_exactly_the_fetched_resources(tmp_path: Path) -> None:
    port, admin = free_port(), free_port()
    work = tmp_path / "per-url"
    log = tmp_path / "demo.log"
    env = dict(os.environ, PY=sys.executable, PYTHONPATH=str(ROOT), PER_URL_DIR=str(work),
               SUMMON_LISTEN=f"127.0.0.1:{port}", SUMMON_ADMIN=f"127.0.0.1:{admin}")
    with log.open("wb") as out:
        proc = subprocess.Popen(["bash", str(ROOT / "scripts" / "demo-per-url.sh")], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_port(port, proc, log)
        dom = chromium_dump_dom(f"http://127.0.0.1:{port}/", tmp_path / "profile")
        assert "<h1>decks</h1>" in dom and "Summoning on demand" in dom
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # the script exec'd summon: it drains and flushes its events
        assert proc.wait(30) == 0, log.read_text()

    parser = _Subresources()
    parser.feed((SITE / "index.html").read_text())
    required = {"/"} | parser.required
    optional = parser.optional - required
    assert required == {"/", "/style.css", "/logo.svg", "/rss.svg", "/chart.png"}  # what the page references

    events = open_readonly(work / "events.db").query(kinds=["summoned"])
    per_route = collections.Counter(e.route for e in events)
    summoned = {route.removeprefix(f"{NAME}:") for route in per_route}
    print(f"summoned on a cold load of /: {sorted(per_route.items())}")
    assert all(r.startswith(f"{NAME}:") for r in per_route), per_route
    assert required <= summoned <= required | optional, (summoned, required, optional)
    assert set(per_route.values()) == {1}, per_route  # one instance per fetched resource
    # Everything else the site has stayed cold: the other pages, the feed.
    routes_file = (work / "routes" / f"{NAME}.toml").read_text()
    for cold in ("/about.html", "/feed.xml", "/posts/first.html", "/posts/cold-starts.html", "/index.html"):
        assert f'url = "{cold}"' in routes_file and cold not in summoned
