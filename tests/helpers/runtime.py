"""A real summoner shell in the test's own event loop: `serving` starts the runtime on a
loopback port from a config file and collects the commands of one kind the engine gives
the shell (the facts a test asserts on, such as `Record` or `Foreground`), and drains it
at the end whatever the test did."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from proxy.config import Address, load
from proxy.runtime.summoner import Summoner
from proxy.serve.server import build_runtime, drain, listen_socket

T = TypeVar("T")


@dataclass
class Serving:
    port: int
    summoner: Summoner
    seen: list[Any] = field(default_factory=list)  # the engine's commands of the kind asked for


@asynccontextmanager
async def serving(config: Path, kind: type, drain_s: float = 2.0) -> AsyncIterator[Serving]:
    sock = listen_socket(Address("127.0.0.1", 0), False)
    port = sock.getsockname()[1]
    rt = await build_runtime(load(config), [sock], admin=False)
    assert rt.summoner is not None
    s = Serving(port, rt.summoner)

    def seen(cmd: object) -> None:
        if isinstance(cmd, kind):
            s.seen.append(cmd)

    rt.summoner.listeners.append(seen)
    try:
        yield s
    finally:
        await drain(rt, drain_s)


async def wait_for(check: Callable[[], T], what: str, timeout_s: float = 15.0) -> T:
    """`check()` once it is truthy (polled every 50 ms), or fail naming `what`."""
    for _ in range(int(timeout_s / 0.05)):
        value = check()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
