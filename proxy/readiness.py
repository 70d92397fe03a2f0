"""Is a freshly started instance ready? Ask it over HTTP, the same way for every driver.

How this works: connect, send ``GET <health_path>``, and parse the status line with
h11 (clarity over speed: this runs once per boot). Any status below 500 means the
application answers. Until then retry with a short back-off that starts at 2 ms (so
the proxy adds little to a fast boot) and grows to 100 ms (so a slow VM boot does not
cost a busy loop). A port forwarded by QEMU accepts connections before the guest is
up, so each attempt also has its own timeout.
"""

from __future__ import annotations

import asyncio

import h11

from .config import Address


async def probe_once(address: Address, path: str, timeout_s: float) -> int | None:
    """Status code of one health request, or None if there was no HTTP answer."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(address.host, address.port), timeout_s)
    except (OSError, TimeoutError):
        return None
    conn = h11.Connection(h11.CLIENT)
    try:
        writer.write(conn.send(h11.Request(method="GET", target=path, headers=[
            ("Host", str(address)), ("User-Agent", "summon-readiness"), ("Connection", "close")])))
        writer.write(conn.send(h11.EndOfMessage()))
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout_s
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await asyncio.wait_for(reader.read(4096), max(0.001, end - loop.time()))
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Response):
                return int(event.status_code)
            if isinstance(event, h11.ConnectionClosed):
                return None
    except (OSError, TimeoutError, h11.RemoteProtocolError):
        return None
    finally:
        writer.close()


async def wait_ready(
    address: Address,
    path: str,
    deadline: float,
    exited: asyncio.Future[str] | None = None,
    attempt_timeout_s: float = 1.0,
) -> str | None:
    """Return None once the instance answers below 500, else the reason it never did."""
    loop = asyncio.get_running_loop()
    delay = 0.002
    last = "no answer"
    while True:
        if exited is not None and exited.done():
            return exited.result() if not exited.cancelled() else "instance stopped"
        remaining = deadline - loop.time()
        if remaining <= 0:
            return f"not ready in time ({last})"
        status = await probe_once(address, path, min(attempt_timeout_s, remaining))
        if status is not None and status < 500:
            return None
        last = f"health check answered {status}" if status is not None else "no answer"
        await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
        delay = min(delay * 1.5, 0.1)
