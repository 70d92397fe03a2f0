"""Issue 8: the dashboard, watched by headless Chromium while instances come and go.

One live page (DevTools protocol over a pipe) stays on the admin dashboard for the whole
test: cold (no instance), a small load (an instance of the decks image appears, ready, and
requests/s goes up), then idle (after idle_timeout = 2s the instance is stopped and
disappears). Screenshots go to tests/artifacts/ (override with SUMMON_TEST_ARTIFACTS).
"""

from __future__ import annotations

import http.client
import re
import threading
import time
from pathlib import Path

import pytest

from tests.helpers.browser import ARTIFACTS, Browser, Summon, admin_json, dump_dom, http_get, needs_chromium

pytestmark = [pytest.mark.browser, pytest.mark.slow, needs_chromium]

ROUTE = """
[[route]]
name = "decks"
host = "*"
path = "/"
image = "decks"
min_replicas = 0
max_replicas = 2
target_concurrency = 32
idle_timeout = "2s"
boot_timeout = "15s"
health_path = "/"
"""

PAGES = ["/", "/style.css", "/logo.svg", "/about.html", "/posts/first.html", "/chart.png"]


class Load(threading.Thread):
    """Small steady load: one keep-alive client doing GETs (~50/s) until stopped."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.halt = threading.Event()
        self.ok = 0
        self.errors: list[str] = []

    def run(self) -> None:
        conn: http.client.HTTPConnection | None = None
        i = 0
        while not self.halt.is_set():
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                conn.request("GET", PAGES[i % len(PAGES)])
                resp = conn.getresponse()
                resp.read()
                if resp.status == 200:
                    self.ok += 1
                else:
                    self.errors.append(f"{PAGES[i % len(PAGES)]}: HTTP {resp.status}")
                if resp.will_close:
                    conn.close()
                    conn = None
            except Exception as exc:  # recorded, asserted on by the test
                self.errors.append(repr(exc))
                if conn is not None:
                    conn.close()
                conn = None
            i += 1
            self.halt.wait(0.02)
        if conn is not None:
            conn.close()

    def stop(self) -> None:
        self.halt.set()
        self.join(10)


INSTANCES = "[...document.querySelectorAll('.instance')].map(e => [e.dataset.instanceId, e.dataset.state])"


def test_dashboard_shows_instances_appear_and_disappear(tmp_path: Path) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with Summon(tmp_path, ROUTE) as summon, Browser(size=(1280, 1000)) as page:
        page.navigate(summon.admin_url + "/?window=30")  # a 30 s chart: readable in the screenshots
        # cold: the page polled the admin API and shows the pool at zero
        page.wait_for("document.body.dataset.state === 'ok' && document.getElementById('no-instances') !== null")
        assert page.evaluate("document.querySelector('.pool[data-route=\"decks\"]') !== null")
        assert page.evaluate(INSTANCES) == []
        assert page.evaluate("document.getElementById('totals').dataset.cap") == "4"

        load = Load(summon.port)
        started = time.monotonic()
        load.start()
        try:
            # the first request summons an instance; the dashboard shows it as ready
            page.wait_for("document.querySelector('.instance[data-state=\"ready\"]') !== null", timeout=10)
            # requests/s comes from successive /metrics scrapes: wait for a non-zero rate
            page.wait_for("Number(document.getElementById('totals').dataset.rps) > 0", timeout=5)
            dom = page.dom()
            time.sleep(max(0.0, started + 3.0 - time.monotonic()))  # ~3 s of load: a few polls of chart
            page.screenshot(ARTIFACTS / "dashboard-load.png")
            during = page.evaluate(INSTANCES)
            status = admin_json(summon.admin)
        finally:
            load.stop()
        assert load.ok > 20, f"load generator got only {load.ok} responses"
        assert not load.errors, load.errors[:5]

        ids = re.findall(r'data-instance-id="([^"]+)"[^>]*data-state="ready"', dom)
        assert ids, "no ready instance in the dashboard DOM during the load"
        live = {i["id"] for r in status["routes"] for i in r["instances"]}
        assert set(ids) <= live, f"dashboard shows {ids}, /status has {live}"
        assert all(r == "local" for r in re.findall(r'class="region" data-region="([^"]*)"', dom))
        assert during and all(state == "ready" for _, state in during), during
        assert 'data-kind="ready"' in dom and 'data-kind="summoned"' in dom, "events panel lacks summoned/ready"
        assert page.evaluate("document.querySelectorAll('#chart svg path.series-instances').length") == 1

        # idle: after idle_timeout (2 s) the instance drains and stops; the page follows
        page.wait_for("document.getElementById('no-instances') !== null "
                      "&& document.querySelectorAll('.instance').length === 0", timeout=2 + 6)
        page.wait_for("document.querySelector('.event[data-kind=\"stopped\"]') !== null", timeout=3)
        assert admin_json(summon.admin)["totals"]["instances"] == 0
        assert page.evaluate("document.getElementById('totals').dataset.instances") == "0"
        time.sleep(1.2)  # one more poll so the chart shows the drop to zero
        shot = page.screenshot(ARTIFACTS / "dashboard.png")
        print(f"dashboard screenshots: {shot} and {ARTIFACTS / 'dashboard-load.png'}")
        assert shot.stat().st_size > 10_000


def test_dashboard_one_shot_dump_dom(tmp_path: Path) -> None:
    """The plain `chromium --dump-dom` path: the page renders the status after its first polls."""
    # a long idle timeout: chromium's start-up must not race the instance's idle stop
    with Summon(tmp_path, ROUTE.replace('idle_timeout = "2s"', 'idle_timeout = "60s"')) as summon:
        assert http_get(summon.url + "/")[0] == 200  # summon one instance
        # a VM's boot breakdown, as the libvirt driver's ready events carry it (the process driver keeps none)
        from proxy.observe.events import Event, EventLog

        with EventLog(tmp_path / "events.db") as log:
            for n, firmware in enumerate((0.4, 0.5, 0.9)):
                log.record(Event("ready", route="decks", instance=f"vm{n}", duration_s=2.0, detail={
                    "cold_requests": 1, "image": "decks",
                    "phases": {"prepare": 0.01, "qemu_up": 0.3, "firmware": firmware, "kernel_init": 1.1,
                               "first_response": 0.05}}))
        dom = dump_dom(summon.admin_url + "/", virtual_time_ms=1500)
        assert re.search(r'class="phase-row" data-image="decks" data-start="boot" data-boots="3"', dom), dom[:3000]
        assert re.search(r'data-phase="firmware" data-ms="500"', dom)  # the p50 of 0.4, 0.5, 0.9 s
        assert re.search(r'<body[^>]*data-state="ok"', dom), dom[:2000]
        assert re.search(r'class="instance"[^>]*data-state="ready"', dom)
        assert 'class="pool" data-route="decks"' in dom
