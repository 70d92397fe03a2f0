"""A cold pool's first safe request (GET, HEAD, OPTIONS without a body) is the new
instance's readiness probe, its "trial": in-process, fake driver. See
`Fleet.instance_started` and the trial section of `proxy/http/exchange.py`."""

from __future__ import annotations

import asyncio
from pathlib import Path

import uvloop

from proxy.backends.fake import FakeBackend, FakeBehaviour
from proxy.observe.events import EventLog
from proxy.serve.server import drain
from tests.helpers.summon_proc import make_image
from tests.integration.test_summoner import CONFIG, exchange, get, start

ROUTE = """
[[route]]
name = "site"
path = "/"
image = "site"
health_path = "/health"
boot_timeout = "{boot_timeout}"
"""


def config(tmp: Path, boot_timeout: str = "3s") -> Path:
    make_image(tmp / "images", "site", ["true"])
    cfg = tmp / "summon.toml"
    cfg.write_text(CONFIG.format(routes=ROUTE.format(boot_timeout=boot_timeout)))
    return cfg


def test_the_cold_get_itself_makes_the_instance_ready(tmp_path: Path) -> None:
    # the health path never answers below 500, so only the client's own GET can show
    # that the instance is up: without trials this boot would time out
    backend = FakeBackend(FakeBehaviour(failing_paths=(b"/health",)))

    async def scenario() -> tuple[int, int, list[bytes], dict]:
        rt, port = await start(config(tmp_path), backend)
        try:
            status, _ = await get(port, "/page")
            second, _ = await get(port, "/page")  # warm: the pool is ready already
            run = next(iter(backend.running.values()))
            return status, second, list(run.paths), rt.summoner.status()
        finally:
            await drain(rt, 1.0)

    status, second, paths, snap = uvloop.run(scenario())
    assert (status, second) == (200, 200)
    assert paths.count(b"/page") == 2  # no retry was needed: the first attempt was answered
    inst = snap["routes"][0]["instances"][0]
    assert inst["state"] == "ready" and inst["inflight"] == 0
    assert len(backend.started) == 1
    ready = [e for e in EventLog(tmp_path / "events.db").query() if e.kind == "ready"]
    assert [e.detail["ready_by"] for e in ready] == ["request"]
    assert 0 <= ready[0].detail["driver_s"] <= ready[0].duration_s  # the driver's share of the boot


def test_a_post_is_never_a_trial(tmp_path: Path) -> None:
    # same instance, but a POST cannot be retried: it waits for the probe, which never
    # succeeds, and the client gets a 503 with Retry-After when the boot times out
    backend = FakeBackend(FakeBehaviour(failing_paths=(b"/health",)))

    async def scenario() -> tuple[int, bytes, list[bytes]]:
        rt, port = await start(config(tmp_path, boot_timeout="1s"), backend)
        try:
            status, head, _ = await exchange(port, "POST", "/form", "Content-Length: 0\r\n")
            paths = [p for run in backend.running.values() for p in run.paths]
            return status, head, paths
        finally:
            await drain(rt, 1.0)

    status, head, paths = uvloop.run(scenario())
    assert status == 503 and b"retry-after:" in head.lower()
    assert b"/form" not in paths


def test_a_warming_instance_5xx_is_not_forwarded(tmp_path: Path) -> None:
    # the application answers 503 while it warms up (to the trial, then to the health
    # probe that takes over): the client must see its real answer
    backend = FakeBackend(FakeBehaviour(warming_answers=3))

    async def scenario() -> tuple[int, bytes, list[bytes]]:
        rt, port = await start(config(tmp_path), backend)
        try:
            status, body = await get(port, "/page")
            run = next(iter(backend.running.values()))
            return status, body, list(run.paths)
        finally:
            await drain(rt, 1.0)

    status, body, paths = uvloop.run(scenario())
    assert status == 200 and body.startswith(b"fake instance")
    assert paths.count(b"/page") == 2  # the warming 503, then again once the probe said ready
    assert paths == [b"/page", b"/health", b"/health", b"/health", b"/page"]  # 503 x3 (warming), then 200s


def test_a_url_that_always_fails_gets_its_answer_once_the_probe_says_ready(tmp_path: Path) -> None:
    # a 5xx to the trial is not retried until the boot deadline: the health probe decides
    backend = FakeBackend(FakeBehaviour(failing_paths=(b"/broken",)))

    async def scenario() -> tuple[int, bytes, float]:
        rt, port = await start(config(tmp_path, boot_timeout="60s"), backend)
        loop = asyncio.get_running_loop()
        try:
            t0 = loop.time()
            status, body = await get(port, "/broken")
            return status, body, loop.time() - t0
        finally:
            await drain(rt, 1.0)

    status, body, took = uvloop.run(scenario())
    assert status == 503 and body.startswith(b"fake instance")  # the application's own answer
    assert took < 20  # answered once the probe said ready, not at the 60 s boot deadline (a bound noise cannot cross)
    ready = [e for e in EventLog(tmp_path / "events.db").query() if e.kind == "ready"]
    assert [e.detail["ready_by"] for e in ready] == ["probe"]


def test_a_trial_on_an_instance_that_never_answers_gets_503_at_the_boot_timeout(tmp_path: Path) -> None:
    backend = FakeBackend(FakeBehaviour(never_ready=True))

    async def scenario() -> tuple[int, float, dict]:
        rt, port = await start(config(tmp_path, boot_timeout="1s"), backend)
        loop = asyncio.get_running_loop()
        try:
            t0 = loop.time()
            status, _ = await get(port, "/page")
            took = loop.time() - t0
            await asyncio.sleep(0.3)  # the tick that stops the failed instance
            return status, took, rt.summoner.status()
        finally:
            await drain(rt, 1.0)

    status, took, snap = uvloop.run(scenario())
    assert status == 503
    assert 0.9 <= took < 10  # not before the 1 s boot timeout; the upper bound is one noise cannot cross
    assert all(i["state"] != "ready" for r in snap["routes"] for i in r["instances"])


def _cold_get(tmp_path: Path, backend: FakeBackend, boot_timeout: str = "10s") -> tuple[int, list[bytes]]:
    async def scenario() -> tuple[int, list[bytes]]:
        rt, port = await start(config(tmp_path, boot_timeout=boot_timeout), backend)
        try:
            status, _ = await get(port, "/page")
            return status, list(next(iter(backend.running.values())).paths)
        finally:
            await drain(rt, 1.0)

    return uvloop.run(scenario())


def test_a_slow_first_answer_is_waited_for_not_sent_again(tmp_path: Path) -> None:
    # 0.3 s, three times the attempt timeout a forwarder gets: a process's own socket
    # accepted the connection, so silence is the page rendering, not a guest still down
    status, paths = _cold_get(tmp_path, FakeBackend(FakeBehaviour(answer_delay_s=0.3)))
    assert status == 200
    assert paths.count(b"/page") == 1, paths


def test_behind_a_forwarder_a_silent_connection_is_given_up_and_the_request_sent_again(tmp_path: Path) -> None:
    backend = FakeBackend(FakeBehaviour(forwarder=True, silent_connections=2))
    status, paths = _cold_get(tmp_path, backend)
    assert status == 200
    assert backend.connections == 3 and paths == [b"/page"]  # two hung lines given up, the third answered


def test_behind_a_forwarder_once_the_guest_refused_a_slow_answer_is_waited_for(tmp_path: Path) -> None:
    # a connection closed from the far side says the guest's network is up: the next
    # attempt's silence is the application's, and it is not cut at 100 ms
    backend = FakeBackend(FakeBehaviour(forwarder=True, closed_connections=1, answer_delay_s=0.3))
    status, paths = _cold_get(tmp_path, backend)
    assert status == 200
    assert paths.count(b"/page") == 1, paths
