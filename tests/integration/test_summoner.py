"""The summoner shell in-process, on the fake driver: health checks, retries, reload."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import uvloop

from proxy.backends.fake import FakeBackend, FakeBehaviour
from proxy.config import Address, load
from proxy.serve.server import build_runtime, drain, listen_socket, reload
from tests.helpers.summon_proc import make_image

CONFIG = """
[proxy]
listen = "127.0.0.1:0"
admin = ""
[images]
dir = "images"
[events]
path = "events.db"
[[host]]
name = "h"
backend = "fake"
{routes}
"""

ROUTE = """
[[route]]
name = "{name}"
path = "{path}"
image = "site"
idle_timeout = "60s"
health_interval = "{interval}"
health_failures = 2
"""


def write_config(tmp: Path, routes: str) -> Path:
    make_image(tmp / "images", "site", ["true"])
    cfg = tmp / "summon.toml"
    cfg.write_text(CONFIG.format(routes=routes))
    return cfg


async def exchange(port: int, method: str, path: str, fields: str = "") -> tuple[int, bytes, bytes]:
    """One request on its own connection: status, head and body of the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\n{fields}Connection: close\r\n\r\n".encode())
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), head, body


async def get(port: int, path: str = "/") -> tuple[int, bytes]:
    status, _, body = await exchange(port, "GET", path)
    return status, body


async def start(cfg: Path, backend: FakeBackend):  # type: ignore[no-untyped-def]
    sock = listen_socket(Address("127.0.0.1", 0), False)
    port = sock.getsockname()[1]
    rt = await build_runtime(load(cfg), [sock], admin=False, backends={"h": backend})
    return rt, port


def test_failing_health_checks_replace_an_instance(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, ROUTE.format(name="site", path="/", interval="200ms"))
    behaviour = FakeBehaviour()
    backend = FakeBackend(behaviour)

    async def scenario() -> None:
        rt, port = await start(cfg, backend)
        try:
            status, body = await get(port)
            assert status == 200
            first = backend.started[0]
            assert first.encode() in body
            behaviour.never_ready = True  # the instance now answers 503 to everything
            for _ in range(50):
                await asyncio.sleep(0.1)
                if first in backend.stopped:
                    break
            assert first in backend.stopped, "an unhealthy instance was not evicted"
            behaviour.never_ready = False
            status, body = await get(port)
            assert status == 200 and backend.started[-1] != first
        finally:
            await drain(rt, 1.0)

    uvloop.run(scenario())


def test_killed_instance_under_get_load_loses_no_request(tmp_path: Path) -> None:
    routes = ROUTE.format(name="site", path="/", interval="0") + 'min_replicas = 2\n'
    cfg = write_config(tmp_path, routes)
    backend = FakeBackend()

    async def scenario() -> None:
        rt, port = await start(cfg, backend)
        try:
            for _ in range(50):
                if len(backend.running) >= 2:
                    break
                await asyncio.sleep(0.1)
            statuses: list[int] = []

            async def client() -> None:
                for _ in range(40):
                    statuses.append((await get(port))[0])

            load = [asyncio.create_task(client()) for _ in range(8)]
            await asyncio.sleep(0.2)
            backend.kill(next(iter(backend.running)))
            await asyncio.gather(*load)
            assert statuses.count(200) == len(statuses) == 320, sorted(set(statuses))
        finally:
            await drain(rt, 1.0)

    uvloop.run(scenario())


def test_invalid_reload_keeps_the_old_config_serving(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, ROUTE.format(name="site", path="/", interval="0"))
    backend = FakeBackend()

    async def scenario() -> None:
        rt, port = await start(cfg, backend)
        try:
            assert (await get(port))[0] == 200
            good = cfg.read_text()
            cfg.write_text(good + "\n[[route]]\nname = 3\n")
            ok, errors = await reload(rt)
            assert not ok and errors and "summon.toml" in errors[0]
            assert (await get(port))[0] == 200
            # a valid reload adding a route: the running instance of the unchanged route stays
            cfg.write_text(good + ROUTE.format(name="other", path="/other", interval="0"))
            running = set(backend.running)
            ok, errors = await reload(rt)
            assert ok, errors
            assert (await get(port, "/other"))[0] == 200
            assert running <= set(backend.running)
        finally:
            await drain(rt, 1.0)

    uvloop.run(scenario())


def test_orphans_are_reaped_at_start_up_and_then_periodically(tmp_path: Path) -> None:
    """Each instance a driver reaps is one `reaped` event, saying when; a driver that
    fails to reap (its host down) is asked again on the next round."""
    from proxy.errors import HostUnavailable
    from proxy.observe.events import EventLog
    from proxy.runtime.summoner import Summoner

    answers: list[list[str] | Exception] = [["a"], HostUnavailable("libvirtd is restarting"), ["b", "c"]]

    class Reaping(FakeBackend):
        async def reap_orphans(self) -> list[str]:
            answer = answers.pop(0) if answers else []
            if isinstance(answer, Exception):
                raise answer
            return answer

    config = load(write_config(tmp_path, ROUTE.format(name="r", path="/", interval="1h")))

    async def main() -> list[tuple[str, str]]:
        events = EventLog(tmp_path / "events.db")
        summoner = Summoner(config, events, {"h": Reaping()}, reap_interval_s=0.01)
        assert await summoner.reap_orphans("startup") == ["a"]
        summoner.start()
        for _ in range(500):  # bounded: the periodic rounds come every 10 ms
            if not answers:
                break
            await asyncio.sleep(0.01)
        await summoner.close()
        events.flush(timeout=5)
        got = [(e.instance, e.detail["when"]) for e in events.query(kinds=["reaped"])]
        events.close()
        return got

    assert uvloop.run(main()) == [("a", "startup"), ("b", "periodic"), ("c", "periodic")]


def test_reaped_events_are_on_disk_when_the_reap_returns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The driver removes an instance's record before the summoner records its event,
    so the event is all that is left of the reaping: a summon killed right after its
    start-up reap must not lose it. The writer thread is slowed down to show it."""
    import time

    from proxy.observe.events import EventLog, EventReader
    from proxy.runtime.summoner import Summoner

    write = EventLog._write

    def slow_write(self: EventLog, conn: object, events: list[object]) -> None:
        time.sleep(0.3)
        write(self, conn, events)  # type: ignore[arg-type]

    monkeypatch.setattr(EventLog, "_write", slow_write)

    class Reaping(FakeBackend):
        async def reap_orphans(self) -> list[str]:
            return ["a", "b"]

    config = load(write_config(tmp_path, ROUTE.format(name="r", path="/", interval="1h")))

    async def main() -> list[str]:
        events = EventLog(tmp_path / "events.db")
        summoner = Summoner(config, events, {"h": Reaping()})
        try:
            assert await summoner.reap_orphans("startup") == ["a", "b"]
            # read as another process would, not through the writer
            return [e.instance for e in EventReader(tmp_path / "events.db").query(kinds=["reaped"])]
        finally:
            await summoner.close()
            events.close()

    assert uvloop.run(main()) == ["a", "b"]
