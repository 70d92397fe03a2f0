"""The decision endpoint's HTTP shell (`[plugin] listen`): what nginx, Caddy and HAProxy call.

    GET /decide   describe the client's request in X-Original-Method, X-Original-URI,
                  X-Original-Host, X-Forwarded-For (and X-Summon-Done: 1 when the host
                  proxy will call /done; X-Summon-Cache: 1 when it caches decisions).
                  204 with X-Summon-Upstream: HOST:PORT, X-Summon-Instance,
                  X-Summon-Lease, X-Summon-Route; or, a decision that may be reused,
                  X-Accel-Expires: SECONDS and Vary instead of the lease. Refused: the
                  native front's status (404, 503 + Retry-After, 400...) with
                  X-Summon-Status; `?deny=403` (or 401) sends every refusal as that
                  status instead, for nginx's auth_request.
    GET /done     ?lease=ID[&status=NNN]: the request is over (204; 404 for a lease not
                  held, e.g. already expired). ?leases=ID:NNN,ID:NNN,...: many at once
                  (HAProxy's queue; always 204, an unknown lease has expired already).

The logic is in `proxy.plugin.decide`; this is the socket side. Keep-alive, one request
at a time per connection (a pipelined one waits for the one before), because host
proxies keep a pool of connections to their auth upstream and each decision is one
small exchange: a new TCP connection per call would cost more than the decision. A
connection that closes while its call waits for a boot takes the request out of the
boot queue, and one that closes just as its lease is granted gives the lease back. Access: loopback, or with `[plugin] token` every call must carry
`X-Summon-Token` (not Authorization: that field is the client's own, and nginx and Caddy
pass it along to the decision).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import urllib.parse
from collections import deque
from typing import cast

import httptools

from ..config import Address
from ..errors import BadRequest, SummonError
from ..http.responses import decision_refused
from .decide import Decider

log = logging.getLogger("summon.plugin")

SWEEP_S = 0.1  # how often expired leases are given back
_MAX_HEAD = 32 * 1024
_NO_CONTENT = b"HTTP/1.1 204 No Content\r\n"


def _ok(status: str) -> bool:
    """A response status the host proxy reports: a 5xx counts against the instance."""
    return not (status.isdigit() and int(status) >= 500)


def _plain(status: int, reason: str, message: str) -> bytes:
    body = message.encode() + b"\n"
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


class _Call:
    __slots__ = ("path", "query", "method", "headers", "keep_alive")

    def __init__(self, method: str, url: bytes, headers: list[tuple[bytes, bytes]], keep_alive: bool) -> None:
        parsed = httptools.parse_url(url)
        self.method = method
        self.path = (parsed.path or b"/").decode("latin-1")
        self.query = urllib.parse.parse_qs((parsed.query or b"").decode("latin-1"))
        self.headers = headers
        self.keep_alive = keep_alive


class _Connection(asyncio.Protocol):
    def __init__(self, endpoint: PluginEndpoint) -> None:
        self.endpoint = endpoint
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.size = 0
        self.calls: deque[_Call] = deque()
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.endpoint.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.endpoint.connections.discard(self)
        self.transport = None
        if self.task is not None:
            self.task.cancel()  # a call waiting for a boot leaves the queue

    def data_received(self, data: bytes) -> None:
        if self.transport is None:
            return  # refused already: the rest is not read
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._fail(400, "Bad Request", "bad request")

    def _fail(self, status: int, reason: str, message: str) -> None:
        if self.transport is not None:
            self.transport.write(_plain(status, reason, message))
            self.transport.close()
            self.transport = None

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url, self.headers, self.size = b"", [], 0

    def on_url(self, url: bytes) -> None:
        self.url += url
        self._count(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))
        self._count(len(name) + len(value))

    def _count(self, n: int) -> None:
        """One request head's bytes (not the connection's: it lives for many calls)."""
        self.size += n
        if self.size > _MAX_HEAD:
            self._fail(431, "Request Header Fields Too Large", "request head too large")
            raise httptools.HttpParserError("request head too large")  # stops the parser

    def on_message_complete(self) -> None:
        if self.transport is None:
            return
        self.calls.append(_Call(self.parser.get_method().decode("latin-1"), self.url, self.headers,
                                self.parser.should_keep_alive()))
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._serve())

    async def _serve(self) -> None:
        try:
            while self.calls and self.transport is not None:
                call = self.calls.popleft()
                answer, lease = await self.endpoint.answer(call)
                if self.transport is None and lease:
                    # The host proxy hung up while the decision was made (its client gave
                    # up, or its own timeout): nobody will call /done for this lease.
                    self.endpoint.decider.done(lease)
                if self.transport is not None:
                    self.transport.write(answer)
                    if not call.keep_alive:  # Connection: close, or HTTP/1.0 without keep-alive
                        self.transport.close()
                        self.transport = None
        finally:
            self.task = None


class PluginEndpoint:
    def __init__(self, address: Address, decider: Decider, token: str | None = None) -> None:
        self.address = address
        self.decider = decider
        self.token = token.encode() if token else None
        self.server: asyncio.AbstractServer | None = None
        self.connections: set[_Connection] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.server = await self.loop.create_server(lambda: _Connection(self), self.address.host, self.address.port)
        self._sweeper = self.loop.call_later(SWEEP_S, self._sweep)

    def _sweep(self) -> None:
        assert self.loop is not None
        try:
            self.decider.expire(self.decider.clock())
        except Exception:  # the sweeper must outlive a bad lease
            log.exception("expiring plugin leases failed")
        self._sweeper = self.loop.call_later(SWEEP_S, self._sweep)

    def close(self) -> None:
        """Stop listening and give back what is still held (the instances stop next)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self.server is not None:
            self.server.close()
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()
        self.decider.release_all()

    def _allowed(self, call: _Call) -> bool:
        if self.token is None:
            return True
        given = [v for k, v in call.headers if k.lower() == b"x-summon-token"]
        return len(given) == 1 and hmac.compare_digest(given[0].strip(), self.token)

    def _done(self, call: _Call) -> bytes:
        batch = call.query.get("leases", [])
        if batch:  # HAProxy's queue: many leases in one call, each with its status
            if len(batch) != 1 or "lease" in call.query:
                return _plain(400, "Bad Request", "give leases=ID:STATUS,... once, without lease=")
            for item in batch[0].split(","):
                lease, _, status = item.partition(":")
                if lease:
                    self.decider.done(lease, _ok(status))  # an unknown one has expired: nothing to do
            return _NO_CONTENT + b"\r\n"
        leases = call.query.get("lease", [])
        if len(leases) != 1:
            return _plain(400, "Bad Request", "give lease=ID once")
        held = self.decider.done(leases[0], _ok(call.query.get("status", [""])[0]))
        return _NO_CONTENT + b"\r\n" if held else _plain(404, "Not Found", "no such lease (expired?)")

    async def answer(self, call: _Call) -> tuple[bytes, str | None]:
        """The answer to one call, and the lease it grants (None when it grants none)."""
        if call.path == "/decide" and self._allowed(call) and call.method == "GET":
            return await self._decide(call)
        return self._other(call), None

    def _other(self, call: _Call) -> bytes:
        if not self._allowed(call):
            return _plain(401, "Unauthorized", "this endpoint needs its token: X-Summon-Token: <[plugin] token>")
        if call.path not in ("/decide", "/done"):
            return _plain(404, "Not Found", "not found: GET /decide or GET /done")
        if call.method != "GET":
            return _plain(405, "Method Not Allowed", "use GET")
        return self._done(call)

    async def _decide(self, call: _Call) -> tuple[bytes, str | None]:
        deny = call.query.get("deny", [""])[0]
        sent_as = int(deny) if deny in ("401", "403") else None
        hooked = any(k.lower() == b"x-summon-done" and v.strip() == b"1" for k, v in call.headers)
        cache = any(k.lower() == b"x-summon-cache" and v.strip() == b"1" for k, v in call.headers)
        try:
            if deny and sent_as is None:
                raise BadRequest("deny= takes 401 or 403")
            grant = await self.decider.decide(call.headers, hooked, cache)
        except SummonError as exc:
            return decision_refused(exc, sent_as), None
        except Exception as exc:  # a bug must answer, not hang the host proxy's request
            log.exception("decision failed")
            return decision_refused(SummonError(f"decision failed: {type(exc).__name__}"), sent_as), None
        if grant.cache_s:  # reusable: no lease id, so no /done (proxy.plugin.decide)
            return (f"HTTP/1.1 204 No Content\r\nX-Summon-Upstream: {grant.upstream}\r\n"
                    f"X-Summon-Instance: {grant.instance}\r\nX-Summon-Route: {grant.route}\r\n"
                    f"X-Accel-Expires: {grant.cache_s}\r\nVary: {grant.vary}\r\n\r\n").encode("latin-1", "replace"), None
        return (f"HTTP/1.1 204 No Content\r\nX-Summon-Upstream: {grant.upstream}\r\n"
                f"X-Summon-Instance: {grant.instance}\r\nX-Summon-Lease: {grant.lease}\r\n"
                f"X-Summon-Route: {grant.route}\r\n\r\n").encode("latin-1", "replace"), grant.lease
