"""The admin API on its own address (loopback by default). Described in docs/admin-api.yaml.

    GET  /status    JSON: routes, their instances, totals (the README's Admin API section)
    GET  /events    JSON lines, newest last (?n=1..10000, default 200; ?route=NAME)
    GET  /metrics   Prometheus text
    GET  /images/sha256/<hex>   an object of the image store, Range requests too (proxy.images.distribute)
    GET  /          the dashboard page (also /index.html)
    POST /reload    validate and swap the config
    POST /images/deploy     {"image": NAME, "version": "sha256:..."}: a rolling deploy (`summon images deploy`)
    POST /images/rollback   {"image": NAME}: back to the version served before (`summon images rollback`)
    POST /login     the dashboard's sign-in (only with a token): a cookie for the reads

Access. Without `[proxy] admin_token` the admin address is loopback (the config loader
refuses anything else, `config.token_rule`): reads answer anyone on this machine, and
`POST /reload` and the deploys only a loopback peer. With a token, every request asks for
`Authorization: Bearer <token>` (what Prometheus's `authorization` setting and curl send),
compared in constant time; without it the answer is 401 with `WWW-Authenticate`. A browser
cannot send that header when it opens a page, so `GET /` without it answers 401 with a
small sign-in form; `POST /login` with the right token sets an HttpOnly, SameSite=Strict
cookie that stands for the token on reads (GET) only, so the dashboard's own fetches of
status, metrics and events work, and no other site can make a signed-in browser reload.
The cookie holds an HMAC of the token, not the token itself.

One request per connection (Connection: close): the admin side is for people and
scrapers, not for throughput, so it favours plain code over speed.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import http
import inspect
import json
import logging
import re
import urllib.parse
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

from ..config import Address

log = logging.getLogger("summon.admin")

_MAX_HEAD = 16 * 1024
_MAX_BODY = 8 * 1024  # /login's form and the deploys' JSON; /reload takes none
MAX_EVENTS = 10_000
COOKIE = "summon_admin"
REALM = 'Bearer realm="summon admin"'
# path -> the one method it answers (anything else: 405 with Allow)
ENDPOINTS = {"/status": "GET", "/events": "GET", "/metrics": "GET", "/": "GET", "/index.html": "GET",
             "/reload": "POST", "/login": "POST", "/images/deploy": "POST", "/images/rollback": "POST"}
_IMAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_VERSION = re.compile(r"^sha256:[0-9a-f]{64}$")
# what the deploy endpoints call: (action, image name, version or None) -> (status, JSON body)
ImagesAction = Callable[[str, str, "str | None"], Awaitable[tuple[int, dict[str, Any]]]]


class Response(NamedTuple):
    status: int
    ctype: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


def _text(status: int, message: str, *headers: tuple[str, str]) -> Response:
    return Response(status, "text/plain; charset=utf-8", message.encode() + b"\n", headers)


class Request(NamedTuple):
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[bytes, list[bytes]]
    body: bytes


def session_value(token: str) -> str:
    """The dashboard cookie: proves the token was given, without being it."""
    return hmac.new(token.encode(), b"summon admin dashboard session", hashlib.sha256).hexdigest()


_LOGIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>summon: sign in</title>
<style>body{font:15px system-ui,sans-serif;margin:15vh auto;max-width:22em}input{font:inherit;width:100%;margin:.4em 0}
.err{color:#c33}</style></head>
<body><h1>summon admin</h1>{message}
<form method="post" action="login"><label>Admin token <input type="password" name="token" autofocus
 autocomplete="current-password"></label><input type="submit" value="Sign in"></form></body></html>
"""


def _login_page(message: str = "") -> bytes:
    text = f'<p class="err">{message}</p>' if message else "<p>This admin API asks for its token.</p>"
    return _LOGIN_PAGE.replace("{message}", text).encode()


class AdminServer:
    def __init__(
        self,
        address: Address,
        status: Callable[[], dict[str, Any] | Awaitable[dict[str, Any]]],
        events: Callable[[int, str | None], list[str] | Awaitable[list[str]]],
        metrics: Callable[[], tuple[bytes, str] | Awaitable[tuple[bytes, str]]],
        reload: Callable[[], Awaitable[tuple[bool, list[str]]]] | None = None,
        token: str | None = None,
        images_store: Path | None = None,
        images_action: ImagesAction | None = None,
    ) -> None:
        self.address = address
        self.images_action = images_action
        self.images_store = images_store
        self.status = status
        self.events = events
        self.metrics = metrics
        self.reload = reload
        self.token = token
        self._session = session_value(token) if token else None
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
            parsed = _parse_head(head)
            if isinstance(parsed, Response):
                response = parsed
            else:
                response = await self._read_body_and_route(parsed, reader, writer)
        except Exception as exc:  # the admin API must never take the proxy down
            log.exception("admin request failed")
            response = _text(500, f"error: {exc}")
        status, ctype, body, headers = response
        reason = http.HTTPStatus(status).phrase if status in http.HTTPStatus._value2member_map_ else "Unknown"
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers)
        writer.write(
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            f"Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\nX-Frame-Options: DENY\r\n"
            f"{extra}Connection: close\r\n\r\n".encode() + body
        )
        try:
            await writer.drain()
        except ConnectionError:
            pass
        writer.close()

    async def _read_body_and_route(self, req: Request, reader: asyncio.StreamReader,
                                   writer: asyncio.StreamWriter) -> Response:
        if b"transfer-encoding" in req.headers:
            if req.headers[b"transfer-encoding"] != [b"chunked"] or b"content-length" in req.headers:
                return _text(400, "Transfer-Encoding: only chunked, and not with Content-Length")
            try:
                body = await asyncio.wait_for(_read_chunked(reader), 10.0)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError, ValueError):
                return _text(400, "bad chunked body")
            if body is None:
                return _text(413, f"request body over {_MAX_BODY} bytes")
            return await self._route(req._replace(body=body), writer)
        lengths = req.headers.get(b"content-length", [])
        if len(lengths) > 1 or (lengths and not lengths[0].isdigit()):
            return _text(400, "bad Content-Length")
        length = int(lengths[0]) if lengths else 0
        if length > _MAX_BODY:
            return _text(413, f"request body over {_MAX_BODY} bytes")
        if length:
            try:
                body = await asyncio.wait_for(reader.readexactly(length), 10.0)
            except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
                return _text(400, "request body cut short")
            req = req._replace(body=body)
        return await self._route(req, writer)

    async def _route(self, req: Request, writer: asyncio.StreamWriter) -> Response:
        path, method = req.path, req.method
        if self.token and path != "/login":
            denied = self._denied(req)
            if denied is not None:
                return denied
        if path.startswith("/images/sha256/") and self.images_store is not None:
            if method != "GET":
                return _text(405, "use GET", ("Allow", "GET"))
            from ..images.distribute import serve_object
            from ..images.store import Store

            ranges = req.headers.get(b"range", [])
            if len(ranges) > 1:
                return _text(416, "give Range once")
            served = await asyncio.to_thread(serve_object, Store(self.images_store), path,
                                             ranges[0].decode("latin-1") if ranges else None)
            return Response(served.status, served.ctype, served.body, served.headers)
        allowed = ENDPOINTS.get(path)
        if allowed is None or (path == "/login" and not self.token):
            return _text(404, "not found")
        if method != allowed:
            return _text(405, f"use {allowed}", ("Allow", allowed))
        if path == "/status":
            status = self.status()  # several workers: an awaitable that asks the others (proxy.serve.workers)
            if inspect.isawaitable(status):
                status = await status
            return Response(200, "application/json", json.dumps(status, indent=1).encode() + b"\n")
        if path == "/events":
            n_values = req.query.get("n", ["200"])
            if len(n_values) != 1 or not n_values[0].isdigit() or not 1 <= int(n_values[0]) <= MAX_EVENTS:
                return _text(400, f"n must be a whole number from 1 to {MAX_EVENTS}")
            routes = req.query.get("route", [])
            if len(routes) > 1:
                return _text(400, "give route once")
            lines = self.events(int(n_values[0]), routes[0] if routes else None)
            if inspect.isawaitable(lines):  # a fleet: read from the shared stream (proxy.observe.fleetlog)
                lines = await lines
            return Response(200, "application/x-ndjson", "".join(x + "\n" for x in lines).encode())
        if path == "/metrics":
            metrics = self.metrics()
            if inspect.isawaitable(metrics):
                metrics = await metrics
            body, ctype = metrics
            return Response(200, ctype, body)
        if path in ("/", "/index.html"):
            page = resources.files("proxy.observe").joinpath("dashboard.html")
            try:
                return Response(200, "text/html; charset=utf-8", page.read_bytes())
            except FileNotFoundError:
                return Response(200, "text/html; charset=utf-8", b"<h1>summon</h1><p><a href=/status>status</a></p>")
        if path == "/login":
            return self._login(req)
        if not self.token and not _loopback_peer(writer):
            if path.startswith("/images/"):
                return _text(403, "deploys need the admin token (Authorization: Bearer ...) or loopback")
            return _text(403, "reload needs the admin token (Authorization: Bearer ...) or loopback")
        if path.startswith("/images/"):
            return await self._images(path.rsplit("/", 1)[1], req)
        if self.reload is None:
            return _text(409, "reload not available")
        ok, messages = await self.reload()
        body = json.dumps({"ok": ok, "errors": messages}).encode() + b"\n"
        return Response(200 if ok else 400, "application/json", body)

    async def _images(self, action: str, req: Request) -> Response:
        """POST /images/deploy and /images/rollback: a JSON object in, a JSON object out."""
        if self.images_action is None:
            return _json(409, {"ok": False, "error": "this summon serves no summoned route: nothing to deploy"})
        try:
            body = json.loads(req.body or b"{}")
        except ValueError:
            return _json(400, {"ok": False, "error": "the body must be a JSON object"})
        if not isinstance(body, dict):
            return _json(400, {"ok": False, "error": "the body must be a JSON object"})
        name, version = body.get("image"), body.get("version")
        if not isinstance(name, str) or not _IMAGE_NAME.match(name):
            return _json(400, {"ok": False, "error": "\"image\" must be an image name"})
        if action == "deploy" and version is not None and (not isinstance(version, str) or not _VERSION.match(version)):
            return _json(400, {"ok": False, "error": "\"version\" must be sha256:<64 hex digits>"})
        status, answer = await self.images_action(action, name, version if action == "deploy" else None)
        return _json(status, answer)

    def _denied(self, req: Request) -> Response | None:
        """None if `req` carries the token (or, for a read, the dashboard's cookie), else
        the 401 to send. Every comparison is constant time: it must not tell how much of
        a guess was right."""
        assert self.token is not None and self._session is not None
        values = req.headers.get(b"authorization", [])
        given = False
        if len(values) == 1:
            scheme, _, credentials = values[0].partition(b" ")
            if scheme.lower() == b"bearer":
                given = True
                if hmac.compare_digest(credentials.strip(), self.token.encode()):
                    return None
        if not values and req.method == "GET":
            for cookie in _cookies(req.headers).get(COOKIE, []):
                if hmac.compare_digest(cookie.encode(), self._session.encode()):
                    return None
        challenge = REALM + (', error="invalid_token"' if given else "")
        if req.method == "GET" and req.path in ("/", "/index.html"):
            return Response(401, "text/html; charset=utf-8", _login_page(), (("WWW-Authenticate", challenge),))
        return _text(401, "this admin API needs its token: Authorization: Bearer <admin_token>",
                     ("WWW-Authenticate", challenge))

    def _login(self, req: Request) -> Response:
        assert self.token is not None and self._session is not None
        form = urllib.parse.parse_qs(req.body.decode("utf-8", "replace"))
        given = form.get("token", [""])[0]
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            return Response(401, "text/html; charset=utf-8", _login_page("That is not the admin token."),
                            (("WWW-Authenticate", REALM),))
        cookie = f"{COOKIE}={self._session}; Path=/; HttpOnly; SameSite=Strict"
        return Response(303, "text/plain; charset=utf-8", b"signed in\n", (("Location", "./"), ("Set-Cookie", cookie)))


def _json(status: int, body: dict[str, Any]) -> Response:
    return Response(status, "application/json", json.dumps(body).encode() + b"\n")


def _parse_head(head: bytes) -> Request | Response:
    if len(head) > _MAX_HEAD:
        return _text(431, "request head too large")
    lines = head[:-4].split(b"\r\n")
    parts = lines[0].decode("latin-1").split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return _text(400, "bad request line")
    method, target, _ = parts
    if not target.startswith("/"):
        return _text(400, "the target must be a path")
    headers: dict[bytes, list[bytes]] = {}
    for raw in lines[1:]:
        name, sep, value = raw.partition(b":")
        if not sep or not name or name != name.strip():
            return _text(400, "bad header line")
        headers.setdefault(name.lower(), []).append(value.strip())
    url = urllib.parse.urlsplit(target)
    query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
    return Request(method, url.path, query, headers, b"")


async def _read_chunked(reader: asyncio.StreamReader) -> bytes | None:
    """A chunked body (what a client streaming a body sends), or None when over _MAX_BODY.
    ValueError on bad framing. Extensions and trailers are read and dropped."""
    body = b""
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";", 1)[0].strip(), 16)  # ValueError: not hex
        if size < 0:
            raise ValueError("negative chunk size")
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                pass
            return body
        if len(body) + size > _MAX_BODY:
            return None
        body += await reader.readexactly(size)
        if await reader.readexactly(2) != b"\r\n":
            raise ValueError("chunk not followed by CRLF")


def _cookies(headers: dict[bytes, list[bytes]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for raw in headers.get(b"cookie", []):
        for pair in raw.decode("latin-1").split(";"):
            name, sep, value = pair.strip().partition("=")
            if sep:
                out.setdefault(name, []).append(value)
    return out


def _loopback_peer(writer: asyncio.StreamWriter) -> bool:
    peer = writer.get_extra_info("peername")
    host = peer[0] if isinstance(peer, tuple) else ""
    return host.startswith("127.") or host == "::1" or host.startswith("::ffff:127.")
