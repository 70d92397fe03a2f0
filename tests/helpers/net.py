"""Real-socket peers for testing the front proxy in-process.

- `LoopThread`: a uvloop event loop in a background thread. The proxy and the recording
  upstream run on it; tests talk to them with ordinary blocking sockets from the test
  thread, so tests are plain sync functions (no pytest-asyncio).
- `RecordingUpstream`: an asyncio server that keeps, per accepted connection, exactly the
  bytes it received plus the requests h11 (strict) parsed out of them, and answers each
  request with a pluggable async handler (fixed, chunked, slow, truncated, 101+echo, ...).
- `RawClient`: a blocking socket that sends arbitrary bytes and parses responses by hand,
  noticing truncation, so malformed input and aborted output can both be tested.
- `ProxyUnderTest`: writes a TOML config, loads it with `proxy.config.load`, and runs
  `build_runtime` on a port-0 listen socket.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import h11
import uvloop

from proxy.config import Address, load
from proxy.serve.server import Runtime, build_runtime, drain, listen_socket

from .ws_echo import (
    KEY,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    accept_key,
    client_frame,
    echo_frames,
    parse_frame,
    switching_protocols,
    upgrade_request,
)

T = TypeVar("T")


class LoopThread:
    def __init__(self) -> None:
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-loop", daemon=True)
        self.thread.start()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def run(self, fn: Callable[[], T], timeout: float = 10.0) -> T:
        """Run a plain function on the loop thread (to read proxy state safely)."""

        async def wrapper() -> T:
            return fn()

        return self.call(wrapper(), timeout)

    def close(self) -> None:
        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.loop.shutdown_asyncgens()

        try:
            self.call(cancel_all(), timeout=5)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            self.loop.close()


# --- the recording upstream ---------------------------------------------------------


@dataclass
class UpRequest:
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]  # names as sent (h11 raw_items)
    body: bytes = b""
    version: bytes = b"1.1"

    def header(self, name: str) -> bytes | None:
        for k, v in self.headers:
            if k.lower() == name.lower().encode():
                return v
        return None

    def header_all(self, name: str) -> list[bytes]:
        return [v for k, v in self.headers if k.lower() == name.lower().encode()]

    def names(self) -> set[bytes]:
        return {k.lower() for k, _ in self.headers}


@dataclass
class UpConn:
    raw: bytearray = field(default_factory=bytearray)
    requests: list[UpRequest] = field(default_factory=list)
    error: str | None = None
    closed: bool = False
    reset: bool = False  # the proxy ended it with a TCP RST (an aborted request)
    writer: asyncio.StreamWriter | None = None
    sent: int = 0  # response bytes the handler has written


Handler = Callable[[UpRequest, "UpConn"], Awaitable[str | None]]


def http_response(status: int = 200, body: bytes = b"ok", headers: list[tuple[str, str]] | None = None,
                  reason: str = "OK", length: bool = True) -> bytes:
    lines = [f"HTTP/1.1 {status} {reason}\r\n"]
    for k, v in headers or []:
        lines.append(f"{k}: {v}\r\n")
    if length:
        lines.append(f"Content-Length: {len(body)}\r\n")
    lines.append("\r\n")
    return "".join(lines).encode() + body


def fixed(data: bytes, then: str | None = None) -> Handler:
    """Answer every request with these exact bytes; then optionally 'close'."""

    async def handler(req: UpRequest, conn: UpConn) -> str | None:
        assert conn.writer is not None
        conn.writer.write(data)
        conn.sent += len(data)
        await conn.writer.drain()
        return then

    return handler


async def websocket_echo(req: UpRequest, conn: UpConn) -> str | None:
    """A real WebSocket upgrade: 101 with the Sec-WebSocket-Accept computed from the
    client's key (RFC 6455 4.2.2), then echo frames; other requests as `default_handler`."""
    assert conn.writer is not None
    key = req.header("sec-websocket-key")
    if (req.header("upgrade") or b"").lower() != b"websocket" or not key:
        return await default_handler(req, conn)
    conn.writer.write(switching_protocols(key))
    return "websocket"


async def default_handler(req: UpRequest, conn: UpConn) -> str | None:
    """200 with a body naming the request (path and body length)."""
    body = b"path=" + req.target + b" body=" + str(len(req.body)).encode()
    assert conn.writer is not None
    conn.writer.write(http_response(200, body, [("Content-Type", "text/plain")]))
    return None


class RecordingUpstream:
    def __init__(self, lt: LoopThread) -> None:
        self.lt = lt
        self.conns: list[UpConn] = []
        self.handler: Handler = default_handler
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    def start(self) -> RecordingUpstream:
        async def go() -> None:
            self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
            self.port = self.server.sockets[0].getsockname()[1]

        self.lt.call(go())
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    # what it saw
    @property
    def accepts(self) -> int:
        return len(self.conns)

    @property
    def requests(self) -> list[UpRequest]:
        return [r for c in list(self.conns) for r in c.requests]

    @property
    def raw(self) -> bytes:
        return b"".join(bytes(c.raw) for c in list(self.conns))

    def wait_requests(self, n: int, timeout: float = 3.0) -> list[UpRequest]:
        wait_until(lambda: len(self.requests) >= n, timeout, f"upstream to see {n} request(s)")
        return self.requests

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        rec = UpConn(writer=writer)
        self.conns.append(rec)
        buf = b""
        try:
            while True:
                p = h11.Connection(h11.SERVER)
                if buf:
                    p.receive_data(buf)
                req: UpRequest | None = None
                body: list[bytes] = []
                while True:
                    try:
                        ev = p.next_event()
                    except h11.RemoteProtocolError as exc:
                        rec.error = f"h11: {exc}"
                        return
                    if ev is h11.NEED_DATA:
                        data = await reader.read(65536)
                        rec.raw += data
                        p.receive_data(data)
                        continue
                    if isinstance(ev, h11.Request):
                        req = UpRequest(ev.method, ev.target, list(ev.headers.raw_items()), version=ev.http_version)
                    elif isinstance(ev, h11.Data):
                        body.append(ev.data)
                    elif isinstance(ev, h11.EndOfMessage):
                        break
                    elif isinstance(ev, h11.ConnectionClosed):
                        return
                    else:  # PAUSED without a request: should not happen
                        rec.error = f"h11 event {ev!r}"
                        return
                assert req is not None
                req.body = b"".join(body)
                rec.requests.append(req)
                buf = p.trailing_data[0]
                action = await self.handler(req, rec)
                if action == "close":
                    return
                if action == "echo":
                    if buf:
                        writer.write(buf)
                    while True:
                        data = await reader.read(65536)
                        if not data:
                            return
                        rec.raw += data
                        writer.write(data)
                if action == "websocket":
                    await echo_frames(_recording_take(reader, buf, rec), writer)
                    return
                if action == "hold":  # keep the connection open, read (and record) nothing more
                    await asyncio.sleep(3600)
        except ConnectionResetError:
            rec.reset = True
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            rec.closed = True
            writer.close()

    def close(self) -> None:
        async def go() -> None:
            if self.server is not None:
                self.server.close()
            for c in self.conns:
                if c.writer is not None:
                    c.writer.close()
            await asyncio.sleep(0)

        self.lt.call(go())


def _recording_take(reader: asyncio.StreamReader, first: bytes, rec: UpConn) -> Callable[[int], Awaitable[bytes]]:
    """`take(n)`: exactly n bytes, `first` (what h11 read past the request) before the
    reader's, recording what is read."""
    pending = bytearray(first)

    async def take(n: int) -> bytes:
        while len(pending) < n:
            data = await reader.read(65536)
            if not data:
                raise asyncio.IncompleteReadError(bytes(pending), n)
            rec.raw += data
            pending.extend(data)
        out = bytes(pending[:n])
        del pending[:n]
        return out

    return take


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_until(cond: Callable[[], bool], timeout: float = 3.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


# --- the raw client ----------------------------------------------------------------


class Truncated(Exception):
    """The connection ended before the response was complete."""


@dataclass
class Response:
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    raw_head: bytes

    def header(self, name: str) -> bytes | None:
        for k, v in self.headers:
            if k.lower() == name.lower().encode():
                return v
        return None

    def header_all(self, name: str) -> list[bytes]:
        return [v for k, v in self.headers if k.lower() == name.lower().encode()]

    @property
    def closes(self) -> bool:
        return (self.header("connection") or b"").lower() == b"close"


class RawClient:
    def __init__(self, port: int, timeout: float = 5.0, rcvbuf: int | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", port))
        self.buf = b""
        self.eof = False

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        """Read more; False at EOF or reset."""
        if self.eof:
            return False
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def _take_line(self) -> bytes:
        while b"\r\n" not in self.buf:
            if not self._fill():
                raise Truncated("EOF in chunk framing")
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _take(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise Truncated(f"EOF after {len(self.buf)} of {n} body bytes")
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def read_head(self) -> tuple[int, bytes, list[tuple[bytes, bytes]], bytes]:
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                raise Truncated(f"EOF before a complete response head: {self.buf!r}")
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.split(b"\r\n")
        version, status, *reason = lines[0].split(b" ", 2)
        assert version == b"HTTP/1.1", lines[0]
        headers = []
        for line in lines[1:]:
            k, _, v = line.partition(b":")
            assert k and k == k.strip(), f"bad response header line {line!r}"
            headers.append((k, v.strip()))
        return int(status), (reason[0] if reason else b""), headers, head + b"\r\n\r\n"

    def response(self, head_request: bool = False, skip_1xx: bool = True) -> Response:
        while True:
            status, reason, headers, raw = self.read_head()
            resp = Response(status, reason, headers, b"", raw)
            if 100 <= status < 200 and status != 101 and skip_1xx:
                continue
            break
        if head_request or status in (204, 304) or 100 <= status < 200:
            return resp
        te = resp.header("transfer-encoding")
        cl = resp.header("content-length")
        if te is not None:
            assert te.lower() == b"chunked" and cl is None, headers
            parts = []
            while True:
                size_line = self._take_line()
                size = int(size_line, 16)
                if size == 0:
                    while self._take_line():  # trailers
                        pass
                    break
                parts.append(self._take(size))
                if self._take(2) != b"\r\n":
                    raise AssertionError("bad chunk end from proxy")
            resp.body = b"".join(parts)
        elif cl is not None:
            resp.body = self._take(int(cl))
        else:
            while self._fill():
                pass
            resp.body, self.buf = self.buf, b""
        return resp

    def request(self, data: bytes, head_request: bool = False) -> Response:
        self.send(data)
        return self.response(head_request=head_request)

    def ws_frame(self) -> tuple[int, bytes]:
        """(opcode, payload) of the next WebSocket frame; a server's frames are unmasked."""
        opcode, payload, masked = parse_frame(self._take)
        assert not masked, "a server must not mask its frames (RFC 6455 5.1)"
        return opcode, payload

    def read_until_close(self) -> bytes:
        while self._fill():
            pass
        data, self.buf = self.buf, b""
        return data

    def is_closed(self, timeout: float = 3.0) -> bool:
        """True when the proxy closed the connection (EOF or reset) within `timeout`."""
        self.sock.settimeout(timeout)
        try:
            while self._fill():
                pass
            return True
        except TimeoutError:
            return False


def open_tunnel(c: RawClient, host: str = "example.com") -> None:
    c.send(upgrade_request(host=host))
    r = c.response()
    assert r.status == 101, (r.status, r.body)
    assert r.header("sec-websocket-accept") == accept_key(KEY), "not a real WebSocket upgrade"
    assert (r.header("connection") or b"").lower() == b"upgrade"


def echo(c: RawClient, payload: bytes, opcode: int = OP_TEXT) -> None:
    c.send(client_frame(payload, opcode))
    expected = OP_PONG if opcode == OP_PING else opcode
    assert c.ws_frame() == (expected, payload)


def get(path: str = "/", host: str = "example.com", extra: str = "", version: str = "1.1") -> bytes:
    return f"GET {path} HTTP/{version}\r\nHost: {host}\r\n{extra}\r\n".encode()


# --- the proxy under test ----------------------------------------------------------

TEST_PROXY_DEFAULTS: dict[str, Any] = {
    "header_timeout": "2s",
    "keepalive_timeout": "5s",
    "body_timeout": "2s",
    "upstream_timeout": "3s",
    "connect_timeout": "1s",
    "admin": "",
}


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(v)


def config_text(proxy: dict[str, Any], routes: list[dict[str, Any]]) -> str:
    lines = ["[proxy]"]
    lines += [f"{k} = {toml_value(v)}" for k, v in proxy.items()]
    lines += ["", "[events]", 'path = "events.db"', ""]
    for r in routes:
        lines.append("[[route]]")
        lines += [f"{k} = {toml_value(v)}" for k, v in r.items()]
        lines.append("")
    return "\n".join(lines)


class ProxyUnderTest:
    def __init__(self, lt: LoopThread, directory: Path, proxy: dict[str, Any], routes: list[dict[str, Any]]) -> None:
        self.lt = lt
        path = directory / "summon.toml"
        path.write_text(config_text({**TEST_PROXY_DEFAULTS, **proxy}, routes))
        self.config = load(path)
        self.rt: Runtime | None = None

        async def go() -> tuple[Runtime, int]:
            sock = listen_socket(Address("127.0.0.1", 0), False)
            port = sock.getsockname()[1]
            return await build_runtime(self.config, [sock], admin=False), port

        self.rt, self.port = lt.call(go())

    def client(self, **kw: Any) -> RawClient:
        return RawClient(self.port, **kw)

    def state(self, fn: Callable[[Runtime], T]) -> T:
        rt = self.rt
        assert rt is not None
        return self.lt.run(lambda: fn(rt))

    def stop(self) -> None:
        if self.rt is not None:
            self.lt.call(drain(self.rt, 0.2))
            self.rt = None
