"""Is a freshly started instance ready? Ask it over HTTP, the same way for every driver.

How this works: connect (a plain non-blocking socket: cheaper than streams), send
``GET <health_path>`` and parse the status line with h11 (clarity over speed: this runs
once per boot). Any status below 500 means the application answers. Until then retry:
every 0.5 ms for the first 50 ms (so the proxy adds little to a fast process boot), then
backing off to at most 5 ms (a VM boot takes seconds; a probe costs microseconds). A port
forwarded by QEMU accepts connections before the guest is up, so each attempt also has
its own short timeout (see `wait_ready`).
"""

from __future__ import annotations

import asyncio
import socket

import h11

from ..config import Address


async def probe_once(address: Address, path: str, timeout_s: float) -> int | None:
    """Status code of one health request, or None if there was no HTTP answer."""
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    conn = h11.Connection(h11.CLIENT)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, (address.host, address.port)), timeout_s)
        request = conn.send(h11.Request(method="GET", target=path, headers=[
            ("Host", str(address)), ("User-Agent", "summon-readiness"), ("Connection", "close")]))
        await loop.sock_sendall(sock, request + conn.send(h11.EndOfMessage()))
        end = loop.time() + timeout_s
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await asyncio.wait_for(loop.sock_recv(sock, 4096), max(0.001, end - loop.time()))
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Response):
                return int(event.status_code)
            if isinstance(event, h11.ConnectionClosed):
                return None
    except (OSError, TimeoutError, h11.RemoteProtocolError):
        return None
    finally:
        sock.close()


async def wait_ready(
    address: Address,
    path: str,
    deadline: float,
    exited: asyncio.Future[str] | None = None,
    attempt_timeout_s: float = 2.0,
) -> str | None:
    """Return None once the instance answers below 500, else the reason it never did.

    Each attempt's own timeout stays short (100 ms) for the first 10 s: a connection QEMU
    accepted for a guest that is not up yet can hang, and a long wait on it would be
    charged to the cold request. After that it doubles on every timed-out attempt, up to
    `attempt_timeout_s`, so a health endpoint that is merely slow still gets its time."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    delay = 0.0005
    attempt_s = min(0.1, attempt_timeout_s)
    last = "no answer"
    while True:
        if exited is not None and exited.done():
            return exited.result() if not exited.cancelled() else "instance stopped"
        remaining = deadline - loop.time()
        if remaining <= 0:
            return f"not ready in time ({last})"
        t0 = loop.time()
        status = await probe_once(address, path, min(attempt_s, remaining))
        if status is not None and status < 500:
            return None
        if status is None and loop.time() - t0 >= attempt_s * 0.9 and loop.time() - started > 10.0:
            attempt_s = min(attempt_s * 2, attempt_timeout_s)  # it timed out rather than being refused
        last = f"health check answered {status}" if status is not None else "no answer"
        await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
        if loop.time() - started > 0.05:
            delay = min(delay * 1.5, 0.005)  # slow boots (VMs): back off a little, no busy loop
