"""The `fake` driver: in-process HTTP servers with a controllable boot.

For tests of the engine's shell: boot delay, boot failures, instances that never get
ready or die later are all set on the driver, and every instance really listens on
loopback so the proxy's data path is exercised unchanged. Never the thing a feature
is claimed on: that is the process and libvirt drivers.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

from ..config import Address
from ..errors import BackendError
from .base import Handle, InstanceSpec


@dataclass
class FakeBehaviour:
    boot_delay_s: float = 0.0
    fail_boots: int = 0  # the next N starts raise BackendError
    never_ready: bool = False  # answers 503 to everything
    warming_answers: int = 0  # each instance answers its first N requests with 503 (still warming up)
    failing_paths: tuple[bytes, ...] = ()  # always answered with 503 (e.g. a health path)
    body: bytes = b"fake instance\n"
    answer_delay_s: float = 0.0  # every answer takes this long (a slow page)
    forwarder: bool = False  # behaves as QEMU's user networking: see `silent_connections`
    silent_connections: int = 0  # the first N connections are accepted and never answered (a guest not up)
    closed_connections: int = 0  # then N are closed at once unread (the guest's stack refusing)


@dataclass
class _Running:
    server: asyncio.AbstractServer
    exited: asyncio.Future[str]
    requests: int = 0
    paths: list[bytes] = field(default_factory=list)  # request targets, in order of arrival
    writers: set[asyncio.StreamWriter] = field(default_factory=set)


class FakeBackend:
    name = "fake"

    def __init__(self, behaviour: FakeBehaviour | None = None) -> None:
        self.behaviour = behaviour or FakeBehaviour()
        self.forwards_connections = self.behaviour.forwarder
        self.connections = 0
        self.running: dict[str, _Running] = {}
        self.started: list[str] = []
        self.stopped: list[str] = []
        self.paused: set[str] = set()  # standbys (an in-process server keeps answering: a flag only)
        self.resumed: list[str] = []

    async def start(self, spec: InstanceSpec) -> Handle:
        b = self.behaviour
        if b.fail_boots > 0:
            b.fail_boots -= 1
            raise BackendError("fake boot failure")
        if b.boot_delay_s:
            await asyncio.sleep(b.boot_delay_s)
        iid = spec.instance_id
        loop = asyncio.get_running_loop()
        exited: asyncio.Future[str] = loop.create_future()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            run = self.running.get(iid)
            if run is not None:
                run.writers.add(writer)
            self.connections += 1
            n = self.connections
            if n <= b.silent_connections:
                with contextlib.suppress(ConnectionError):
                    await reader.read()  # until the proxy gives up on it: nothing reaches the "guest"
            if n <= b.silent_connections + b.closed_connections:
                writer.close()
                return
            try:
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    target = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b""
                    if run is not None:
                        run.requests += 1
                        run.paths.append(target)
                    warming = run is not None and run.requests <= b.warming_answers
                    length = 0
                    for line in head.split(b"\r\n"):
                        if line.lower().startswith(b"content-length:"):
                            length = int(line.split(b":", 1)[1])
                    if length:
                        await reader.readexactly(length)
                    if b.answer_delay_s:
                        await asyncio.sleep(b.answer_delay_s)
                    failing = b.never_ready or warming or target in b.failing_paths
                    status = b"503 Service Unavailable" if failing else b"200 OK"
                    body = b.body + iid.encode() + b"\n"
                    writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: " + str(len(body)).encode()
                                 + b"\r\nContent-Type: text/plain\r\n\r\n" + body)
                    await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        self.running[iid] = _Running(server, exited)
        self.started.append(iid)
        return Handle(iid, Address("127.0.0.1", port), exited)

    def kill(self, instance_id: str) -> None:
        """Simulate a crash: the instance stops listening and the driver notices."""
        run = self.running.pop(instance_id, None)
        if run is None:
            return
        run.server.close()
        for w in run.writers:
            w.close()
        if not run.exited.done():
            run.exited.set_result("killed by test")

    async def stop(self, handle: Handle) -> None:
        run = self.running.pop(handle.instance_id, None)
        if run is None:
            return
        run.server.close()
        for w in run.writers:
            w.close()
        self.stopped.append(handle.instance_id)

    async def pause(self, handle: Handle) -> None:
        if handle.instance_id not in self.running:
            raise BackendError(f"{handle.instance_id} is not running")
        self.paused.add(handle.instance_id)

    async def resume(self, handle: Handle) -> None:
        if handle.instance_id not in self.running:
            raise BackendError(f"{handle.instance_id} is not running")
        self.paused.discard(handle.instance_id)
        self.resumed.append(handle.instance_id)

    def rss_mib(self, handle: Handle) -> float | None:
        return None

    async def reap_orphans(self) -> list[str]:
        return []

    async def close(self) -> None:
        for iid in list(self.running):
            run = self.running.pop(iid)
            run.server.close()
