"""The client side: one asyncio.Protocol per connection, httptools underneath.

How this works: bytes are fed to a strict llhttp request parser. Its callbacks build a
head; on headers-complete the head is validated (`message.parse_head`), routed, and an
`Exchange` created. Requests are answered strictly in order: a pipelined request waits
(with reading paused) until the one before it has been answered. Any client error is
answered once and the connection closed, since after a framing problem nobody can know
where the next request starts.

Timers (one handle, re-armed): header_timeout from the first byte of a head (slowloris),
body_timeout between reads of a body, keepalive_timeout while idle between requests.

Reading goes IDLE -> HEAD -> BODY -> IDLE per request (`Reading`): IDLE until the first
byte of a head, HEAD until the head is complete, BODY until the message is (a bodiless
request passes through it at once). Reads are paused for any of a few reasons at once
(`Pause`) and resumed when none is left. Three flags stay apart because they cross
those phases: `closing` (a connection may close in any of them, while the parser is
still running callbacks for the rest of a read), `write_paused` (the client's side of
flow control) and `feeding` (inside a parser feed: starts wait until it returns).
"""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import httptools

from ..config import Route
from ..errors import (
    BadRequest,
    ClientError,
    HeadersTooLarge,
    NotFound,
    PayloadTooLarge,
    RequestTimeout,
    SummonError,
    Unavailable,
    VersionNotSupported,
)
from ..routing.contracts import Lease
from ..routing.table import RouteTable
from .exchange import Exchange
from .message import RequestHead, client_trusted, parse_head
from .responses import error_response
from .state import ResponseMemo, ServerState

log = logging.getLogger("summon.front")


class Reading(enum.Enum):
    """Where the request parser is (see the module docstring)."""

    IDLE = "idle"  # between requests: nothing of the next head yet
    HEAD = "head"  # inside a head: header_timeout runs, head bytes are counted
    BODY = "body"  # the head is complete: its body (if any) until the message ends


class Pause(enum.Enum):
    """Why reading from the client is paused; it resumes once no reason is left."""

    PIPELINE = "pipeline"  # a pipelined request waits behind the one being answered
    BODY = "body"  # the upstream (or the body buffer) is full
    UPGRADE = "upgrade"  # bytes after an Upgrade request wait for the upstream's answer
    ERROR = "error"  # a bad request waits until the ones before it are answered


@dataclass(slots=True, eq=False)
class HeadMemo:
    """The previous request head on this connection and what it came to (see
    `on_headers_complete`): a keep-alive client repeating it skips validation and routing."""

    url: bytes
    headers: list[tuple[bytes, bytes]]
    method: str
    version: str
    keep_alive: bool
    head: RequestHead
    route: Route | None
    table: RouteTable  # the route table it was routed with: a reload makes the memo stale
    out_head: bytes


_IDLE, _HEAD, _BODY = Reading.IDLE, Reading.HEAD, Reading.BODY  # globals: cheaper than attribute lookups


class ClientConnection(asyncio.Protocol):
    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.cfg = state.config
        self.transport: asyncio.Transport | None = None
        self.peer_ip = ""
        self.trusted = False
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_bytes = 0
        self.head_size = 0  # parsed bytes of the current head (a whole head can come in one read)
        self.reading = _IDLE
        self.incoming: Exchange | None = None  # the exchange whose body is being read
        self.active: Exchange | None = None  # the exchange being answered
        self.pending: collections.deque[Exchange] = collections.deque()
        # One deadline instead of a timer per request: `ServerState.sweep` checks every
        # connection a few times a second (cheaper than call_later/cancel per request).
        self.deadline: float | None = None
        self.on_deadline: Callable[[], None] | None = None
        self.closing = False
        self.tunnel: Exchange | None = None
        self.read_paused_by: set[Pause] = set()
        self.write_paused = False
        self.write_paused_at = 0.0
        self.waiting: set[asyncio.Future[Lease]] = set()
        self.deferred_error: ClientError | None = None
        self.last_head: HeadMemo | None = None  # see on_headers_complete
        self.last_response: ResponseMemo | None = None  # see Exchange.response_head
        # Exchanges made active while the parser was being fed; started once the whole
        # read has been parsed (see `start_soon`).
        self.feeding = False
        self.to_start: list[Exchange] = []
        # While an upstream read is being handled, writes to the client are collected
        # here and sent as one write (head and body of a small response: one syscall).
        self.held: list[bytes] | None = None

    # --- asyncio.Protocol -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        if self.state.probe_accept:
            self.state.probe_accept = False
            self.state.accept_waited_s = backlog_wait(transport)
        peer = transport.get_extra_info("peername")
        self.peer_ip = peer[0] if isinstance(peer, tuple) else "127.0.0.1"
        self.trusted = client_trusted(self.peer_ip, self.cfg.trusted_proxies)
        if len(self.state.connections) >= self.cfg.max_connections or self.state.draining:
            # Shed at the door: one cheap 503 instead of slowing everyone down.
            self.state.refused_connections += 1
            self.transport.write(error_response(Unavailable("too many connections", retry_after_s=1)))
            transport.close()
            self.closing = True
            return
        self.state.connections.add(self)
        self._arm(self.cfg.header_timeout_s, self._on_header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.state.connections.discard(self)
        self._disarm()
        for fut in list(self.waiting):
            fut.cancel()
        self.waiting.clear()
        for ex in [self.active, self.incoming, *self.pending]:
            if ex is not None:
                ex.client_closed()
                self._done_counting(ex)
        self.active = self.incoming = None
        self.pending.clear()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        if self.tunnel is not None:
            self.tunnel.client_tunnel_data(data)
            return
        reading = self.reading
        if reading is not _BODY:
            if reading is _IDLE:
                self.reading = _HEAD
                self._arm(self.cfg.header_timeout_s, self._on_header_timeout)
            self.head_bytes += len(data)
        elif self.incoming is not None:
            self._arm(self.cfg.body_timeout_s, self._on_body_timeout)
        self.feeding = True
        try:
            self._feed(data)
        finally:
            self.feeding = False
        if self.to_start:
            starts, self.to_start = self.to_start, []
            for ex in starts:
                self._start_now(ex)

    def _feed(self, data: bytes) -> None:
        while True:
            try:
                self.parser.feed_data(data)
                break
            except httptools.HttpParserUpgrade as exc:
                offset = exc.args[0] if exc.args and isinstance(exc.args[0], int) else len(data)
                # the request llhttp stopped after: the last one parsed
                ex = self.incoming or (self.pending[-1] if self.pending else self.active)
                if ex is None:
                    self._client_error(BadRequest("unexpected protocol upgrade"))
                    return
                if ex.head.upgrade is not None:
                    self.tunnel_wait(ex, data[offset:])
                    return
                # An upgrade we do not perform (h2c): the request goes as a plain one, and
                # the parser (httptools resumed it) reads on, for the next request may follow.
                data = data[offset:]
                if not data:
                    return
                continue
            except ClientError as exc:
                self._client_error(exc)
                return
            except httptools.HttpParserCallbackError as exc:
                # httptools wraps what our callbacks raised; unwrap it
                inner = exc.__context__ or exc.__cause__
                if isinstance(inner, ClientError):
                    self._client_error(inner)
                else:
                    log.error("request handling failed", exc_info=inner or exc)
                    self._client_error(BadRequest("request could not be handled"))
                return
            except httptools.HttpParserError as exc:
                self._client_error(_parser_error(exc))
                return
        if self.reading is not _BODY and self.head_bytes > self.cfg.max_header_bytes:
            self._client_error(HeadersTooLarge(f"request head over {self.cfg.max_header_bytes} bytes"))

    def pause_writing(self) -> None:
        self.write_paused = True
        self.write_paused_at = self.state.loop.time()
        ex = self.active
        if ex is not None and ex.upstream is not None:
            ex.upstream.set_reading(False)

    def resume_writing(self) -> None:
        self.write_paused = False
        ex = self.active
        if ex is not None and ex.upstream is not None:
            ex.upstream.set_reading(True)

    def eof_received(self) -> bool | None:
        # Half-close from the client: keep answering what it sent (RFC 9112 9.6 allows
        # closing, but pipelining clients such as wrk expect their answers).
        if self.tunnel is not None:
            return False  # a tunnel ends with the client: close, and connection_lost closes the upstream
        if self.active is None and not self.pending and self.incoming is None:
            return False
        return True

    # --- parser callbacks -----------------------------------------------------------

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []
        self.head_size = 0
        self.reading = _HEAD

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.head_size += len(url)
        if len(self.url) > self.cfg.max_header_bytes:
            raise HeadersTooLarge("request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.reading is _BODY:
            return  # trailer fields: dropped, never merged into the head
        self.headers.append((name, value))
        if len(self.headers) > self.cfg.max_header_count:
            raise HeadersTooLarge(f"more than {self.cfg.max_header_count} header fields")
        self.head_size += len(name) + len(value) + 4
        if self.head_size > self.cfg.max_header_bytes:
            # data_received only sees heads that span reads; one read can hold a whole head
            raise HeadersTooLarge(f"request head over {self.cfg.max_header_bytes} bytes")

    def on_headers_complete(self) -> None:
        self.reading = _BODY
        self.head_bytes = 0
        p = self.parser
        raw_method = p.get_method()
        method = _METHODS.get(raw_method) or raw_method.decode("ascii", "replace")
        version = p.get_http_version()
        keep_alive = p.should_keep_alive()
        last = self.last_head
        dispatcher = self.state.dispatcher
        if (last is not None and last.url == self.url and last.headers == self.headers and last.method is method
                and last.version == version and last.keep_alive == keep_alive and last.table is dispatcher.table
                and not self.state.draining):
            # The same head as the previous request on this connection (keep-alive clients
            # repeat themselves): same validation result, route and outbound bytes.
            self._open_exchange(last.head, last.route, None, last.out_head)
            return
        if version not in ("1.1", "1.0"):
            raise VersionNotSupported(f"HTTP/{version} is not supported: summon speaks HTTP/1.1 and HTTP/1.0")
        head = parse_head(method, self.url, version, self.headers, keep_alive, self.cfg.max_header_count)
        if head.content_length is not None and head.content_length > self.cfg.max_body_bytes:
            # known from the head: refuse before anything is forwarded (chunked bodies
            # are counted as they stream, in Exchange.client_body)
            raise PayloadTooLarge(f"body over {self.cfg.max_body_bytes} bytes")
        if self.state.draining:
            head = head._replace(keep_alive=False)
        route: Route | None
        error: SummonError | None = None
        try:
            route = dispatcher.lookup(head)
        except NotFound as exc:
            route, error = None, exc  # answered in order, like any other request
        ex = self._open_exchange(head, route, error, None)
        if error is None and not self.state.draining:
            self.last_head = HeadMemo(self.url, self.headers, method, version, keep_alive, head, route,
                                      dispatcher.table, ex.out_head)

    def _open_exchange(self, head: RequestHead, route: Route | None, error: SummonError | None,
                       out_head: bytes | None) -> Exchange:
        ex = Exchange(self, head, route, error, out_head)
        self.incoming = ex
        state = self.state
        state.inflight += 1
        if head.has_body:
            self._arm(self.cfg.body_timeout_s, self._on_body_timeout)
        else:
            self._disarm()
        if state.inflight > self.cfg.max_inflight or state.shed_budget:
            if state.inflight <= self.cfg.max_inflight:
                state.shed_budget -= 1  # one of the drops the overload watch asked for
            state.shed_requests += 1
            ex.error = Unavailable("proxy overloaded", retry_after_s=1)
            ex.keep_alive = False
        if self.active is None:
            self.active = ex
            self.start_soon(ex)
        else:
            self.pending.append(ex)
            self._set_reading(Pause.PIPELINE, False)
        return ex

    def on_body(self, body: bytes) -> None:
        ex = self.incoming
        if ex is not None and not ex.finished:
            ex.client_body(body)

    def on_message_complete(self) -> None:
        ex, self.incoming = self.incoming, None
        self.reading = _IDLE
        if ex is not None:
            ex.client_body_done()
            if ex.finished and ex is self.active:
                self._advance()
        if self.active is not None or self.pending:
            self._disarm()

    # --- request ordering ------------------------------------------------------------

    def exchange_finished(self, ex: Exchange) -> None:
        """Called by the exchange when its response is complete (or failed cleanly)."""
        self._done_counting(ex)
        if ex is not self.active:
            return
        if not ex.keep_alive:
            self.active = None
            self.close()
            return
        if ex is self.incoming:
            # Answered before its body was read: the parser must still consume the body
            # to find the next request; on_message_complete advances.
            return
        self._advance()

    def _advance(self) -> None:
        self.active = None
        if self.pending:
            # Well-formed requests parsed before a bad one are answered first, in order.
            nxt = self.pending.popleft()
            self.active = nxt
            if not self.pending:
                self._set_reading(Pause.PIPELINE, True)
            self.start_soon(nxt)
            return
        if self.deferred_error is not None:
            self._client_error(self.deferred_error)
            return
        if self.closing:
            return
        if self.state.draining:
            self.close()
            return
        if self.incoming is None:
            self._arm(self.cfg.keepalive_timeout_s, self._on_idle)

    def start_soon(self, ex: Exchange) -> None:
        """Start forwarding once the parser has consumed everything already read: a
        framing error later in the same read (a bad chunk after a valid head) then
        kills the request before a single byte of it reaches the upstream. Inside
        data_received that is right after the feed (no loop turn needed); elsewhere
        (an upstream callback finishing the previous exchange) on the next loop turn,
        since we may be inside that upstream connection's parser."""
        if self.feeding:
            self.to_start.append(ex)
        else:
            self.state.loop.call_soon(self._start_now, ex)

    def _start_now(self, ex: Exchange) -> None:
        if not ex.finished and not self.closing and ex is self.active:
            ex.start()

    def _done_counting(self, ex: Exchange) -> None:
        if ex.counted:
            return
        ex.counted = True
        self.state.inflight -= 1
        try:
            self.state.observe(ex)
        except Exception:  # metrics must never break the data path
            log.exception("observe failed")

    # --- tunnels (Upgrade) -----------------------------------------------------------

    def tunnel_wait(self, ex: Exchange, rest: bytes) -> None:
        """The client asked to upgrade: hold its next bytes until the upstream answers."""
        if rest:
            ex.client_tunnel_data(rest)
        self._set_reading(Pause.UPGRADE, False)

    def start_tunnel(self, ex: Exchange) -> None:
        self.tunnel = ex
        self._disarm()
        ex.flush_tunnel()
        self._set_reading(Pause.UPGRADE, True)

    # --- output ------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.held is not None:
            self.held.append(data)
        elif self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def hold_writes(self) -> None:
        """Collect writes until `flush_writes` (called around one upstream read)."""
        if self.held is None:
            self.held = []

    def flush_writes(self) -> None:
        held, self.held = self.held, None
        if held and self.transport is not None and not self.transport.is_closing():
            self.transport.write(held[0] if len(held) == 1 else b"".join(held))

    def send_error(self, ex: Exchange, exc: SummonError) -> None:
        """Answer `ex` with an error. Keeps the connection only when that is safe: the
        request was well-framed (404, 5xx) and its body will still be read in full."""
        if ex is not self.active:
            self.abort()  # cannot answer out of order
            return
        keep = ex.keep_alive and (not isinstance(exc, ClientError) or isinstance(exc, NotFound))
        if ex is self.incoming and ex.head.expect_continue and not ex.continue_sent:
            keep = False  # the client holds its body back; do not wait for it
        ex.keep_alive = keep
        self.write(error_response(exc, self.state.via, close=not keep, http10=ex.head.version == "1.0"))
        self.exchange_finished(ex)

    def _client_error(self, exc: ClientError) -> None:
        """A framing or syntax error: answer once, then close."""
        if self.closing:
            return
        active = self.active
        if active is not None and not active.finished and active is not self.incoming:
            # An earlier request is still being answered: finish it first.
            self.deferred_error = exc
            self._set_reading(Pause.ERROR, False)
            return
        if active is not None and active.response_started and not active.finished:
            self.abort()
            return
        self.closing = True
        self._disarm()
        # Drop the request now, not at connection_lost: a connect to the upstream that
        # completes in between must find the exchange finished and send nothing.
        for ex in (self.active, self.incoming, *self.pending):
            if ex is not None:
                ex.client_closed()
                self._done_counting(ex)
        self.write(error_response(exc))
        self.flush_writes()
        if self.transport is not None:
            self.transport.close()

    def close(self) -> None:
        self.closing = True
        self._disarm()
        self.flush_writes()  # what was answered goes out before the FIN
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        self.closing = True
        self._disarm()
        self.flush_writes()  # like an unheld write, what was written goes out before the reset
        if self.transport is not None:
            self.transport.abort()

    # --- flow control and timers ---------------------------------------------------------

    def set_reading_for_body(self, on: bool) -> None:
        self._set_reading(Pause.BODY, on)

    def _set_reading(self, reason: Pause, on: bool) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        was_paused = bool(self.read_paused_by)
        if on:
            self.read_paused_by.discard(reason)
        else:
            self.read_paused_by.add(reason)
        now_paused = bool(self.read_paused_by)
        if now_paused != was_paused:
            if now_paused:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    def _arm(self, delay: float, cb: Callable[[], None]) -> None:
        self.deadline = self.state.loop.time() + delay
        self.on_deadline = cb

    def _disarm(self) -> None:
        self.deadline = None

    def check_deadlines(self, now: float) -> None:
        if self.deadline is not None and now >= self.deadline and self.on_deadline is not None:
            self.deadline = None
            self.on_deadline()
        ex = self.active
        if ex is not None and ex.response_deadline is not None and now >= ex.response_deadline:
            ex.response_deadline = None
            ex.response_timeout()
        if self.write_paused and now - self.write_paused_at >= self.cfg.send_timeout_s:
            # a client that stopped reading: it would hold this connection and an
            # upstream connection (a replica slot) for ever
            self.abort()

    def _on_header_timeout(self) -> None:
        if self.active is None and self.reading is not _HEAD:
            self.close()  # nothing was asked: just close
            return
        self._client_error(RequestTimeout("request head not received in time"))

    def _on_body_timeout(self) -> None:
        if self.incoming is not None:
            if self.incoming is self.active and self.incoming.response_started:
                self.abort()
            else:
                self._client_error(RequestTimeout("request body stalled"))

    def _on_idle(self) -> None:
        if self.active is None and not self.pending:
            self.close()

    def region(self, head: RequestHead) -> str | None:
        if self.trusted:
            value = head.header(b"x-client-region")
            if value:
                return value.decode("ascii", "replace").strip()
        return None



def backlog_wait(transport: asyncio.BaseTransport) -> float:
    """Seconds since a just-accepted connection last received data (tcpi_last_data_recv;
    its handshake when it sent nothing yet): how long it waited to be accepted."""
    sock = transport.get_extra_info("socket")
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 56)
        return float(struct.unpack_from("I", info, 52)[0]) / 1000
    except (AttributeError, OSError, struct.error):
        return 0.0


_METHODS = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE")}


# llhttp's words for a well-formed request line with a version it does not know (HTTP/1.2,
# HTTP/3.0), and for the HTTP/2 connection preface ("PRI * HTTP/2.0"): 505, not 400.
_VERSION_ERRORS = ("Invalid HTTP version", "Pause on PRI/Upgrade")


def _parser_error(exc: Exception) -> ClientError:
    text = str(exc) or type(exc).__name__
    if text in _VERSION_ERRORS:
        return VersionNotSupported(f"unsupported HTTP version ({text}): summon speaks HTTP/1.1 and HTTP/1.0")
    return BadRequest(f"malformed request: {text}")
