"""Connections to instances: one response parsed at a time, kept alive in a pool.

How this works: an `UpstreamConnection` carries one exchange at a time (no upstream
pipelining, so a slow response can never hold up someone else's). A fresh strict
`HttpResponseParser` per response means a HEAD or 1xx can never confuse the framing of
the next one. When a response ends cleanly, both sides agree to keep-alive and the
request went out whole, the connection returns to the idle list of its address;
otherwise it is closed, never reused after anything ambiguous.

Callbacks go to the attached `sink` (an Exchange): response_head, response_body,
response_complete, upstream_failed, tunnel_data, upstream_paused/resumed.
"""

from __future__ import annotations

import asyncio
import collections
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, cast

import httptools

from ..config import Address
from ..errors import BadGateway

if TYPE_CHECKING:
    pass


class Sink(Protocol):
    method: str

    def response_head(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]], framing: str) -> None: ...
    def response_body(self, data: bytes) -> None: ...
    def response_complete(self, reusable: bool) -> None: ...
    def upstream_failed(self, exc: Exception, got_bytes: bool) -> None: ...
    def tunnel_data(self, data: bytes) -> None: ...
    def upstream_write_paused(self, paused: bool) -> None: ...


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "address", "pool", "transport", "sink", "parser", "status", "reason", "headers",
        "head_done", "until_close", "got_bytes", "done", "tunnel", "idle_timer", "reused",
        "write_paused", "lost", "checked_out",
    )

    def __init__(self, address: Address, pool: UpstreamPool) -> None:
        self.address = address
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.sink: Sink | None = None
        self.parser: httptools.HttpResponseParser | None = None
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_done = False
        self.until_close = False
        self.got_bytes = False
        self.done = False
        self.tunnel = False
        self.idle_timer: asyncio.TimerHandle | None = None
        self.reused = False
        self.write_paused = False
        self.lost = False
        self.checked_out = False

    # --- asyncio.Protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._cancel_idle()
        self.pool.forget(self)
        sink, self.sink = self.sink, None
        if sink is None:
            return
        if self.tunnel:
            sink.response_complete(False)
        elif self.until_close and self.head_done and not self.done:
            self.done = True
            sink.response_complete(False)
        elif not self.done:
            sink.upstream_failed(BadGateway("upstream closed the connection"), self.got_bytes)

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.sink is not None:
            self.sink.upstream_write_paused(True)

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.sink is not None:
            self.sink.upstream_write_paused(False)

    def data_received(self, data: bytes) -> None:
        sink = self.sink
        if sink is None:
            # bytes on an idle connection: the upstream is confused; never reuse it
            self.close()
            return
        if self.tunnel:
            sink.tunnel_data(data)
            return
        self.got_bytes = True
        assert self.parser is not None
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            offset = exc.args[0] if exc.args and isinstance(exc.args[0], int) else len(data)
            if self.tunnel and self.sink is not None and offset < len(data):
                self.sink.tunnel_data(data[offset:])
        except httptools.HttpParserError as exc:
            self._fail(BadGateway(f"bad response framing from upstream: {exc}"))
        except BadGateway as exc:
            self._fail(exc)

    # --- parser callbacks ---------------------------------------------------------

    def on_status(self, status: bytes) -> None:
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.head_done:
            self.headers.append((name, value))
        # else: a trailer field; never merged into the head, dropped (RFC 9110 6.5.1)

    def on_headers_complete(self) -> None:
        assert self.parser is not None and self.sink is not None
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            # 100 Continue / 103 Early Hints: we answer Expect ourselves; drop these.
            self.headers = []
            self.reason = b""
            return
        self.head_done = True
        self.status = status
        cl = te = 0
        for k, v in self.headers:
            lk = k.lower()
            if lk == b"content-length":
                cl += 1
            elif lk == b"transfer-encoding":
                te += 1
                if v.strip().lower() != b"chunked":
                    raise BadGateway("upstream used a transfer coding other than chunked")
        if cl and te:
            raise BadGateway("upstream sent both Content-Length and Transfer-Encoding")
        if status == 101:
            self.tunnel = True
            framing = "tunnel"
        elif self.sink.method == "HEAD" or status in (204, 304):
            framing = "none"
        elif te:
            framing = "chunked"
        elif cl:
            framing = "length"
        else:
            framing = "close"
            self.until_close = True
        self.sink.response_head(status, self.reason or b"OK", self.headers, framing)
        if framing == "none" and not self.done:
            self._complete()

    def on_body(self, body: bytes) -> None:
        if self.sink is not None and not self.done:
            self.sink.response_body(body)

    def on_message_complete(self) -> None:
        if not self.head_done:
            return  # end of an informational response
        if self.tunnel:
            return  # a 101 "ends" at its head; the tunnel lasts until one side closes
        if not self.done:
            self._complete()

    # --- driving ------------------------------------------------------------------

    def start(self, sink: Sink, head: bytes) -> None:
        """Attach an exchange and send its request head."""
        self._cancel_idle()
        self.sink = sink
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.reason = b""
        self.headers = []
        self.head_done = self.until_close = self.got_bytes = self.done = False
        assert self.transport is not None
        self.transport.write(head)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.lost:
            self.transport.write(data)

    def _complete(self) -> None:
        self.done = True
        assert self.parser is not None
        keep = (not self.until_close) and self.parser.should_keep_alive()
        sink, self.sink = self.sink, None
        if sink is not None:
            sink.response_complete(keep)

    def _fail(self, exc: Exception) -> None:
        sink, self.sink = self.sink, None
        self.close()
        if sink is not None:
            sink.upstream_failed(exc, self.got_bytes)

    def release(self) -> None:
        """The exchange is over and the connection is clean: park it for reuse."""
        self.sink = None
        self.parser = None
        if self.lost or self.transport is None or self.transport.is_closing():
            return
        self.pool.park(self)

    def close(self) -> None:
        self._cancel_idle()
        self.sink = None
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        self.pool.forget(self)

    def abort(self) -> None:
        self._cancel_idle()
        self.sink = None
        if self.transport is not None:
            self.transport.abort()
        self.pool.forget(self)

    def _cancel_idle(self) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None

    def set_reading(self, on: bool) -> None:
        if self.transport is None or self.lost:
            return
        try:
            if on:
                self.transport.resume_reading()
            else:
                self.transport.pause_reading()
        except (RuntimeError, AttributeError):
            pass


class UpstreamPool:
    """Keep-alive connections per upstream address, with a cap on how many are in use.

    Why the cap: a single-purpose instance is small; busybox httpd listens with a
    backlog of 9. Opening 500 connections at once (a burst released by a boot) makes
    the kernel drop handshakes, and those requests then crawl through TCP
    retransmission back-off for tens of seconds. Like HAProxy's per-server `maxconn`,
    requests beyond the cap wait here, in order, for a connection to come free.

    Accounting: `busy[address]` counts connections being opened or carrying an
    exchange. A connection is counted from checkout until it is parked, closed or lost
    (`_checkin` is idempotent, and `connection_lost` always calls it, so a forgotten
    close can never leak a slot).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, max_idle_per_address: int, idle_timeout_s: float,
                 connect_timeout_s: float) -> None:
        self.loop = loop
        self.max_idle = max_idle_per_address
        self.idle_timeout_s = idle_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.idle: dict[Address, collections.deque[UpstreamConnection]] = {}
        self.busy: dict[Address, int] = {}
        self.limits: dict[Address, int] = {}
        self.waiters: dict[Address, collections.deque[Callable[[UpstreamConnection | Exception], None]]] = {}

    def request(self, address: Address, limit: int, deliver: Callable[[UpstreamConnection | Exception], None]) -> None:
        """Get a connection to `address` for one exchange: `deliver` is called with it
        (maybe at once), or with an exception if connecting failed. `limit` 0 = no cap."""
        self.limits[address] = limit
        if limit and self.busy.get(address, 0) >= limit:
            self.waiters.setdefault(address, collections.deque()).append(deliver)
            return
        self._serve(address, deliver)

    def _serve(self, address: Address, deliver: Callable[[UpstreamConnection | Exception], None]) -> None:
        conn = self._take_idle(address)
        if conn is not None:
            deliver(conn)
            return
        self.busy[address] = self.busy.get(address, 0) + 1
        task = self.loop.create_task(self.connect(address))
        task.add_done_callback(functools.partial(self._connected, address, deliver))

    def _connected(self, address: Address, deliver: Callable[[UpstreamConnection | Exception], None],
                   task: asyncio.Task[UpstreamConnection]) -> None:
        if task.cancelled():
            self._uncount(address)
            deliver(BadGateway("connect cancelled"))
            return
        exc = task.exception()
        if exc is not None:
            self._uncount(address)
            deliver(exc if isinstance(exc, Exception) else BadGateway(str(exc)))
            return
        conn = task.result()
        conn.checked_out = True  # counted in busy since the connect began
        if conn.lost:
            self._checkin(conn)
            deliver(BadGateway(f"{address} closed the connection at once"))
            return
        deliver(conn)

    def _take_idle(self, address: Address) -> UpstreamConnection | None:
        idle = self.idle.get(address)
        while idle:
            conn = idle.pop()  # most recently used: warmest, least likely to be timed out
            conn._cancel_idle()
            if not conn.lost and conn.transport is not None and not conn.transport.is_closing():
                conn.reused = True
                conn.checked_out = True
                self.busy[address] = self.busy.get(address, 0) + 1
                return conn
        return None

    def _uncount(self, address: Address) -> None:
        n = self.busy.get(address, 0) - 1
        if n > 0:
            self.busy[address] = n
        else:
            self.busy.pop(address, None)
        self._wake(address)

    def _checkin(self, conn: UpstreamConnection) -> None:
        if conn.checked_out:
            conn.checked_out = False
            self._uncount(conn.address)

    def _wake(self, address: Address) -> None:
        waiters = self.waiters.get(address)
        if not waiters:
            return
        limit = self.limits.get(address, 0)
        while waiters and (not limit or self.busy.get(address, 0) < limit):
            self._serve(address, waiters.popleft())
        if not waiters:
            self.waiters.pop(address, None)

    async def connect(self, address: Address) -> UpstreamConnection:
        """Open a new connection; raise BadGateway when refused or too slow."""
        try:
            _, proto = await asyncio.wait_for(
                self.loop.create_connection(lambda: UpstreamConnection(address, self), address.host, address.port),
                self.connect_timeout_s,
            )
        except TimeoutError as exc:
            raise BadGateway(f"connect to {address} timed out") from exc
        except OSError as exc:
            raise BadGateway(f"cannot connect to {address}: {exc.strerror or exc}") from exc
        assert isinstance(proto, UpstreamConnection)
        return proto

    def park(self, conn: UpstreamConnection) -> None:
        waiters = self.waiters.get(conn.address)
        if waiters:
            # Hand it to the next request in line (it stays checked out), on the next
            # loop turn: we may still be inside the previous response's parser callback.
            deliver = waiters.popleft()
            conn.reused = True
            self.loop.call_soon(self._hand_over, conn, deliver)
            return
        self._checkin(conn)
        idle = self.idle.setdefault(conn.address, collections.deque())
        if len(idle) >= self.max_idle:
            conn.close()
            return
        idle.append(conn)
        conn.idle_timer = self.loop.call_later(self.idle_timeout_s, conn.close)

    def _hand_over(self, conn: UpstreamConnection, deliver: Callable[[UpstreamConnection | Exception], None]) -> None:
        if conn.lost or conn.transport is None or conn.transport.is_closing():
            self._checkin(conn)  # it died in between: this waiter gets a fresh connection
            self._serve(conn.address, deliver)
            return
        deliver(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        idle = self.idle.get(conn.address)
        if idle:
            try:
                idle.remove(conn)
            except ValueError:
                pass
        self._checkin(conn)

    def close_address(self, address: Address) -> None:
        """An instance went away: drop its idle connections and fail its waiters."""
        for conn in list(self.idle.pop(address, ())):
            conn.close()
        for deliver in self.waiters.pop(address, ()):
            deliver(BadGateway(f"{address} went away"))

    def close_all(self) -> None:
        for address in list(self.idle):
            self.close_address(address)
