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
import enum
import functools
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, cast

import httptools

from ..config import Address
from ..errors import BadGateway, ClosedAtOnce
from .message import transfer_coding


class Framing(enum.Enum):
    """How a response body is delimited (RFC 9112 6.3): the upstream's, as parsed here,
    and the one the exchange uses towards its client (CHUNKED or CLOSE where the
    upstream's own cannot be passed on)."""

    NONE = "none"  # no body: HEAD, 204, 304
    LENGTH = "length"  # Content-Length
    CHUNKED = "chunked"
    CLOSE = "close"  # the end of the body is the end of the connection
    TUNNEL = "tunnel"  # 101 Switching Protocols: bytes both ways from here on


@dataclass(slots=True, eq=False)
class FramingMemo:
    """The last response head's framing on a connection (see `on_headers_complete`)."""

    status: int
    is_head: bool
    headers: list[tuple[bytes, bytes]]
    framing: Framing


# module globals: a global load is cheaper than Framing.X's attribute lookup on the hot path
_NONE, _CLOSE, _TUNNEL = Framing.NONE, Framing.CLOSE, Framing.TUNNEL


class Writer(Protocol):
    def hold_writes(self) -> None: ...
    def flush_writes(self) -> None: ...


class Sink(Protocol):
    method: str

    @property
    def client(self) -> Writer:
        """Where the response goes: its writes are held around each upstream read."""
        ...

    def response_head(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]],
                      framing: Framing) -> None: ...
    def response_body(self, data: bytes) -> None: ...
    def response_complete(self, reusable: bool) -> None: ...
    def upstream_failed(self, exc: Exception, got_bytes: bool) -> None: ...
    def tunnel_data(self, data: bytes) -> None: ...
    def upstream_write_paused(self, paused: bool) -> None: ...


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "address", "pool", "transport", "sink", "parser", "status", "reason", "headers",
        "head_done", "until_close", "got_bytes", "done", "tunnel", "idle_since",
        "write_paused", "lost", "checked_out", "slot", "last_framing",
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
        self.idle_since = 0.0  # loop time it was parked; UpstreamPool._sweep closes it after idle_timeout_s
        self.write_paused = False
        self.lost = False
        self.checked_out = False
        self.slot = pool.slot(address)  # the pool's state for `address`: no lookup per request
        # (status, HEAD?, headers, framing) of the last response: an upstream repeats its
        # head (only Date changes, once a second), and then the framing checks are done
        self.last_framing: FramingMemo | None = None

    # --- asyncio.Protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
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
        # Everything this read makes us send the client (head, body, end) goes out as
        # one write: one syscall instead of two or three for a small response.
        writer = sink.client
        writer.hold_writes()
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
        finally:
            writer.flush_writes()

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
        sink = self.sink
        headers = self.headers
        is_head = sink.method == "HEAD"
        last = self.last_framing
        if last is not None and last.status == status and last.is_head is is_head and last.headers == headers:
            framing = last.framing
        else:
            framing = self._framing(status, is_head, headers)
            self.last_framing = FramingMemo(status, is_head, headers, framing)
        if framing is _TUNNEL:
            self.tunnel = True
        elif framing is _CLOSE:
            self.until_close = True
        sink.response_head(status, self.reason or b"OK", headers, framing)
        if framing is _NONE and not self.done:
            self._complete()

    @staticmethod
    def _framing(status: int, is_head: bool, headers: list[tuple[bytes, bytes]]) -> Framing:
        """How the response body is delimited; BadGateway for framings we refuse."""
        cl = te = 0
        for k, v in headers:
            lk = k.lower()
            if lk == b"content-length":
                cl += 1
            elif lk == b"transfer-encoding":
                te += 1
                coding = transfer_coding(v)  # the same rule as for requests
                if coding != "chunked":
                    if coding == "whitespace":
                        raise BadGateway("upstream sent whitespace after its Transfer-Encoding value")
                    raise BadGateway("upstream used a transfer coding other than chunked")
        if cl and te:
            raise BadGateway("upstream sent both Content-Length and Transfer-Encoding")
        if status == 101:
            return Framing.TUNNEL
        if is_head or status in (204, 304):
            return Framing.NONE
        if te:
            return Framing.CHUNKED
        return Framing.LENGTH if cl else Framing.CLOSE

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
        self.sink = None
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        self.pool.forget(self)

    def abort(self) -> None:
        self.sink = None
        if self.transport is not None:
            self.transport.abort()
        self.pool.forget(self)

    def reset(self) -> None:
        """Close with a TCP RST (SO_LINGER 0): for a request cut off mid-body, which the
        upstream must see as aborted (a FIN could pass for its end). Unsent bytes go too."""
        if self.transport is not None:
            sock = self.transport.get_extra_info("socket")
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except (AttributeError, OSError):
                pass
        self.abort()

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


class _Slot:
    """Per-address pool state, reached through one dict lookup per request (and none
    when a connection comes back: it keeps a reference to its slot)."""

    __slots__ = ("address", "idle", "busy", "limit", "waiters")

    def __init__(self, address: Address) -> None:
        self.address = address
        self.idle: collections.deque[UpstreamConnection] = collections.deque()  # oldest on the left
        self.busy = 0
        self.limit = 0
        self.waiters: collections.deque[Callable[[UpstreamConnection | Exception], None]] = collections.deque()


class UpstreamPool:
    """Keep-alive connections per upstream address, with a cap on how many are in use.

    Why the cap: a single-purpose instance is small; busybox httpd listens with a
    backlog of 9. Opening 500 connections at once (a burst released by a boot) makes
    the kernel drop handshakes, and those requests then crawl through TCP
    retransmission back-off for tens of seconds. Like HAProxy's per-server `maxconn`,
    requests beyond the cap wait here, in order, for a connection to come free.

    Accounting: a slot's `busy` counts connections being opened or carrying an
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
        self.slots: dict[Address, _Slot] = {}
        # One timer for all idle connections (not a call_later per parked connection,
        # which would cost a timer per request): armed for the oldest idle deadline.
        self.sweeper: asyncio.TimerHandle | None = None

    def slot(self, address: Address) -> _Slot:
        slot = self.slots.get(address)
        if slot is None:
            slot = self.slots[address] = _Slot(address)
        return slot

    def busy(self, address: Address) -> int:
        """Connections to `address` being opened or in use."""
        slot = self.slots.get(address)
        return slot.busy if slot is not None else 0

    def request(self, address: Address, limit: int,
                deliver: Callable[[UpstreamConnection | Exception], None]) -> UpstreamConnection | None:
        """Get a connection to `address` for one exchange. An idle one is returned at
        once (the common case, kept free of callbacks); otherwise None, and `deliver` is
        called later with a new connection, or with an exception if connecting failed.
        `limit` 0 = no cap."""
        slot = self.slot(address)
        slot.limit = limit
        if limit and slot.busy >= limit:
            slot.waiters.append(deliver)
            return None
        conn = self._take_idle(slot)
        if conn is None:
            self._open(slot, deliver)
        return conn

    def _serve(self, slot: _Slot, deliver: Callable[[UpstreamConnection | Exception], None]) -> None:
        conn = self._take_idle(slot)
        if conn is not None:
            deliver(conn)
            return
        self._open(slot, deliver)

    def _open(self, slot: _Slot, deliver: Callable[[UpstreamConnection | Exception], None]) -> None:
        slot.busy += 1
        task = self.loop.create_task(self.connect(slot.address))
        task.add_done_callback(functools.partial(self._connected, slot, deliver))

    def _connected(self, slot: _Slot, deliver: Callable[[UpstreamConnection | Exception], None],
                   task: asyncio.Task[UpstreamConnection]) -> None:
        if task.cancelled():
            self._uncount(slot)
            deliver(BadGateway("connect cancelled"))
            return
        exc = task.exception()
        if exc is not None:
            self._uncount(slot)
            deliver(exc if isinstance(exc, Exception) else BadGateway(str(exc)))
            return
        conn = task.result()
        conn.checked_out = True  # counted in busy since the connect began
        if conn.lost:
            self._checkin(conn)
            deliver(ClosedAtOnce(f"{slot.address} closed the connection at once"))
            return
        deliver(conn)

    def _take_idle(self, slot: _Slot) -> UpstreamConnection | None:
        idle = slot.idle
        while idle:
            conn = idle.pop()  # most recently used: warmest, least likely to be timed out
            if not conn.lost and conn.transport is not None and not conn.transport.is_closing():
                conn.checked_out = True
                slot.busy += 1
                return conn
        return None

    def _uncount(self, slot: _Slot) -> None:
        if slot.busy > 0:
            slot.busy -= 1
        if slot.waiters:
            self._wake(slot)

    def _checkin(self, conn: UpstreamConnection) -> None:
        if conn.checked_out:
            conn.checked_out = False
            self._uncount(conn.slot)

    def _wake(self, slot: _Slot) -> None:
        waiters = slot.waiters
        while waiters and (not slot.limit or slot.busy < slot.limit):
            self._serve(slot, waiters.popleft())

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
        slot = conn.slot
        if slot.waiters:
            # Hand it to the next request in line (it stays checked out), on the next
            # loop turn: we may still be inside the previous response's parser callback.
            deliver = slot.waiters.popleft()
            self.loop.call_soon(self._hand_over, conn, deliver)
            return
        self._checkin(conn)
        idle = slot.idle
        if len(idle) >= self.max_idle:
            conn.close()
            return
        conn.idle_since = self.loop.time()
        idle.append(conn)  # oldest on the left, as _sweep expects
        if self.sweeper is None:
            self.sweeper = self.loop.call_at(conn.idle_since + self.idle_timeout_s, self._sweep)

    def _sweep(self) -> None:
        """Close connections idle for idle_timeout_s; re-arm for the next deadline."""
        self.sweeper = None
        now = self.loop.time()
        timeout = self.idle_timeout_s
        next_due: float | None = None
        for slot in list(self.slots.values()):
            idle = slot.idle
            while idle and idle[0].idle_since + timeout <= now:
                idle.popleft().close()
            if idle:
                due = idle[0].idle_since + timeout
                next_due = due if next_due is None else min(next_due, due)
        if next_due is not None:
            self.sweeper = self.loop.call_at(next_due, self._sweep)

    def _hand_over(self, conn: UpstreamConnection, deliver: Callable[[UpstreamConnection | Exception], None]) -> None:
        if conn.lost or conn.transport is None or conn.transport.is_closing():
            self._checkin(conn)  # it died in between: this waiter gets a fresh connection
            self._serve(conn.slot, deliver)
            return
        deliver(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        slot = conn.slot
        if slot.idle:
            try:
                slot.idle.remove(conn)
            except ValueError:
                pass
        self._checkin(conn)

    def close_address(self, address: Address) -> None:
        """An instance went away: drop its idle connections and fail its waiters."""
        slot = self.slots.get(address)
        if slot is None:
            return
        idle, slot.idle = list(slot.idle), collections.deque()
        for conn in idle:
            conn.close()
        waiters, slot.waiters = list(slot.waiters), collections.deque()
        for deliver in waiters:
            deliver(BadGateway(f"{address} went away"))

    def close_all(self) -> None:
        for address in list(self.slots):
            self.close_address(address)
        if self.sweeper is not None:
            self.sweeper.cancel()
            self.sweeper = None
