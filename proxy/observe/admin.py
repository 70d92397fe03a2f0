"""The admin API on its own address (loopback by default).

    GET  /status    JSON: routes, their instances, totals (the README's Admin API section)
    GET  /events    JSON lines, newest last (?n=100, ?route=NAME)
    GET  /metrics   Prometheus text
    GET  /          the dashboard page
    POST /reload    validate and swap the config (token, or loopback only)

One request per connection (Connection: close): the admin side is for people and
scrapers, not for throughput, so it favours plain code over speed.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import json
import logging
import urllib.parse
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

from ..config import Address

log = logging.getLogger("summon.admin")

_MAX_HEAD = 16 * 1024


class AdminServer:
    def __init__(
        self,
        address: Address,
        status: Callable[[], dict[str, Any] | Awaitable[dict[str, Any]]],
        events: Callable[[int, str | None], list[str]],
        metrics: Callable[[], tuple[bytes, str] | Awaitable[tuple[bytes, str]]],
        reload: Callable[[], Awaitable[tuple[bool, list[str]]]] | None = None,
        token: str | None = None,
    ) -> None:
        self.address = address
        self.status = status
        self.events = events
        self.metrics = metrics
        self.reload = reload
        self.token = token
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, self.address.host, self.address.port)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10.0)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            writer.close()
            return
        try:
            status, ctype, body = await self._route(head, writer)
        except Exception as exc:  # the admin API must never take the proxy down
            log.exception("admin request failed")
            status, ctype, body = 500, "text/plain", f"error: {exc}\n".encode()
        reason = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
                  409: "Conflict", 500: "Internal Server Error"}.get(status, "OK")
        writer.write(
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            f"Cache-Control: no-store\r\nConnection: close\r\n\r\n".encode() + body
        )
        try:
            await writer.drain()
        except ConnectionError:
            pass
        writer.close()

    async def _route(self, head: bytes, writer: asyncio.StreamWriter) -> tuple[int, str, bytes]:
        if len(head) > _MAX_HEAD:
            return 400, "text/plain", b"request head too large\n"
        line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = line.split(" ")
        if len(parts) != 3:
            return 400, "text/plain", b"bad request line\n"
        method, target, _ = parts
        url = urllib.parse.urlsplit(target)
        query = urllib.parse.parse_qs(url.query)
        path = url.path
        if path == "/status" and method == "GET":
            status = self.status()  # several workers: an awaitable that asks the others (proxy.serve.workers)
            if inspect.isawaitable(status):
                status = await status
            return 200, "application/json", json.dumps(status, indent=1).encode() + b"\n"
        if path == "/events" and method == "GET":
            n = int(query.get("n", ["200"])[0])
            route = query.get("route", [None])[0]
            return 200, "application/x-ndjson", "".join(x + "\n" for x in self.events(n, route)).encode()
        if path == "/metrics" and method == "GET":
            metrics = self.metrics()
            if inspect.isawaitable(metrics):
                metrics = await metrics
            body, ctype = metrics
            return 200, ctype, body
        if path in ("/", "/index.html") and method == "GET":
            page = resources.files("proxy.observe").joinpath("dashboard.html")
            try:
                return 200, "text/html; charset=utf-8", page.read_bytes()
            except FileNotFoundError:
                return 200, "text/html; charset=utf-8", b"<h1>summon</h1><p><a href=/status>status</a></p>"
        if path == "/reload":
            if method != "POST":
                return 405, "text/plain", b"use POST\n"
            if not self._authorised(head, writer):
                return 403, "text/plain", b"reload needs the admin token (Authorization: Bearer ...) or loopback\n"
            if self.reload is None:
                return 409, "text/plain", b"reload not available\n"
            ok, messages = await self.reload()
            body = json.dumps({"ok": ok, "errors": messages}).encode() + b"\n"
            return (200 if ok else 400), "application/json", body
        return 404, "text/plain", b"not found\n"

    def _authorised(self, head: bytes, writer: asyncio.StreamWriter) -> bool:
        """With `[proxy] admin_token`: the token, from anywhere. Without: loopback only."""
        if self.token:
            values = [raw.partition(b":")[2].strip() for raw in head.split(b"\r\n")[1:]
                      if raw.partition(b":")[0].strip().lower() == b"authorization"]
            if len(values) != 1:
                return False
            scheme, _, given = values[0].partition(b" ")
            # constant time: the comparison must not tell how much of a guess was right
            return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.token.encode())
        peer = writer.get_extra_info("peername")
        host = peer[0] if isinstance(peer, tuple) else ""
        return host.startswith("127.") or host == "::1"
