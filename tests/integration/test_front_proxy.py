"""The front proxy's data path, end to end over real sockets.

A raw client talks to the proxy (built in-process with `build_runtime`), which forwards to
a recording upstream: keep-alive and pipelining, request and response streaming with flow
control, bodiless responses, Expect: 100-continue, Upgrade tunnels, header rewriting,
errors (404/502/504/413/503), truncation, path normalisation and every timeout.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import time

import pytest

from proxy.serve.server import status_of
from tests.helpers.net import (
    RawClient,
    Truncated,
    UpConn,
    UpRequest,
    closed_port,
    fixed,
    get,
    http_response,
    wait_until,
)


def post(path: str, headers: bytes, body: bytes = b"") -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: example.com\r\n".encode() + headers + b"\r\n" + body


# --- keep-alive and pipelining -----------------------------------------------------


def test_keepalive_many_requests_one_upstream_connection(proxy, upstream):
    with proxy.client() as c:
        for i in range(25):
            r = c.request(get(f"/k{i}"))
            assert r.status == 200 and r.body == f"path=/k{i} body=0".encode()
            assert not r.closes
    assert upstream.accepts == 1, "the upstream connection must be reused"
    assert len(upstream.requests) == 25


def test_upstream_connection_shared_across_client_connections(proxy, upstream):
    for i in range(5):
        with proxy.client() as c:
            assert c.request(get(f"/c{i}")).status == 200
    assert upstream.accepts == 1


def test_pipelined_requests_answered_in_order(proxy, upstream):
    async def slow_first(req: UpRequest, conn: UpConn) -> None:
        if req.target == b"/1":
            await asyncio.sleep(0.2)
        assert conn.writer is not None
        conn.writer.write(http_response(200, b"answer " + req.target))

    upstream.handler = slow_first
    with proxy.client() as c:
        c.send(get("/1") + get("/2") + post("/3", b"Content-Length: 3\r\n", b"abc"))
        assert [c.response().body for _ in range(3)] == [b"answer /1", b"answer /2", b"answer /3"]
        assert c.request(get("/4")).body == b"answer /4"
    assert [r.target for r in upstream.requests] == [b"/1", b"/2", b"/3", b"/4"]
    assert upstream.requests[2].body == b"abc"


# --- request bodies -----------------------------------------------------------------


def test_content_length_body_forwarded_exactly(proxy, upstream):
    body = os.urandom(100_000)
    with proxy.client() as c:
        r = c.request(post("/up", b"Content-Length: 100000\r\n", body))
        assert r.status == 200 and r.body == b"path=/up body=100000"
    (req,) = upstream.requests
    assert req.body == body
    assert req.header("content-length") == b"100000"
    assert req.header("transfer-encoding") is None


def test_chunked_body_streams_and_is_reframed(make_proxy, upstream):
    proxy = make_proxy(request_buffer_bytes=3)  # so a 4-byte chunk is already "large"
    with proxy.client() as c:
        c.send(post("/stream", b"Transfer-Encoding: chunked\r\n"))
        c.send(b"4;note=first\r\nabcd\r\n")
        # streaming: the first chunk reaches the upstream before the client sends more
        wait_until(lambda: upstream.conns and b"abcd" in upstream.conns[0].raw, 3, "first chunk upstream")
        c.send(b"3\r\nefg\r\n")
        c.send(b"0\r\n\r\n")
        r = c.response()
        assert r.status == 200 and r.body == b"path=/stream body=7"
    (req,) = upstream.requests
    assert req.body == b"abcdefg"
    assert req.header("transfer-encoding") == b"chunked"
    assert b"note" not in upstream.raw, "chunk extensions must not be forwarded"


def test_chunked_response_reframed_for_client(proxy, upstream):
    upstream.handler = fixed(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=x\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    with proxy.client() as c:
        r = c.request(get("/chunked"))
        assert r.status == 200 and r.body == b"hello world"
        assert r.header("transfer-encoding") == b"chunked"
        assert b"ext=x" not in r.raw_head and b"X-Trailer" not in r.raw_head
        assert c.request(get("/again")).body == b"hello world"  # still in sync


def test_response_read_until_close_reframed_chunked(proxy, upstream):
    upstream.handler = fixed(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end", then="close")
    with proxy.client() as c:
        r = c.request(get("/eof"))
        assert r.status == 200 and r.body == b"until the end"
        assert r.header("transfer-encoding") == b"chunked"  # an HTTP/1.1 client keeps its connection
        assert c.request(get("/eof2")).body == b"until the end"
    assert upstream.accepts == 2


def test_large_response_streams_with_bounded_buffering(proxy, upstream):
    """32 MiB through a client that stops reading: the proxy must push back on the
    upstream (pause reading it) instead of buffering the response."""
    total = 32 * 1024 * 1024
    piece = bytes(range(256)) * 256  # 64 KiB
    digest = hashlib.sha256(piece * (total // len(piece))).hexdigest()

    async def big(req: UpRequest, conn: UpConn) -> None:
        assert conn.writer is not None
        conn.writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: {total}\r\n\r\n".encode())
        for _ in range(total // len(piece)):
            conn.writer.write(piece)
            conn.sent += len(piece)
            await conn.writer.drain()

    upstream.handler = big
    with proxy.client(rcvbuf=64 * 1024, timeout=10) as c:
        c.send(get("/big"))
        time.sleep(1.0)  # read nothing for a while
        buffered = proxy.state(lambda rt: [conn.transport.get_write_buffer_size()
                                           for conn in rt.state.connections if conn.transport is not None])
        sent = upstream.conns[0].sent
        assert max(buffered) < 2 * 1024 * 1024, f"proxy buffered {buffered} bytes for a stalled client"
        assert sent < total // 2, f"upstream could write {sent} of {total} bytes: no back-pressure"
        status, _, headers, _ = c.read_head()
        assert status == 200
        h = hashlib.sha256()
        got = len(c.buf)
        h.update(c.buf)
        c.buf = b""
        while got < total:
            data = c.sock.recv(1 << 20)
            assert data, f"EOF after {got} bytes"
            h.update(data)
            got += len(data)
        assert got == total and h.hexdigest() == digest


def test_large_request_body_streams(proxy, upstream):
    body = os.urandom(8 * 1024 * 1024)
    with proxy.client(timeout=10) as c:
        r = c.request(post("/bigup", f"Content-Length: {len(body)}\r\n".encode(), body))
        assert r.status == 200 and r.body == f"path=/bigup body={len(body)}".encode()
    assert upstream.requests[0].body == body


# --- bodiless responses --------------------------------------------------------------


@pytest.mark.parametrize("kind", ["head", "204", "304"])
def test_bodiless_responses_keep_connection_usable(proxy, upstream, kind):
    async def handler(req: UpRequest, conn: UpConn) -> None:
        assert conn.writer is not None
        if req.target == b"/next":
            conn.writer.write(http_response(200, b"next"))
        elif kind == "head":
            conn.writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nETag: \"x\"\r\n\r\n")
        elif kind == "204":
            conn.writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        else:
            conn.writer.write(b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\nContent-Length: 1000\r\n\r\n")

    upstream.handler = handler
    method = "HEAD" if kind == "head" else "GET"
    with proxy.client() as c:
        c.send(f"{method} /thing HTTP/1.1\r\nHost: example.com\r\n\r\n".encode())
        r = c.response(head_request=kind == "head")
        assert r.status == {"head": 200, "204": 204, "304": 304}[kind]
        if kind == "head" or kind == "304":
            assert r.header("content-length") == b"1000"
        if kind == "204":
            assert r.header("content-length") is None and r.header("transfer-encoding") is None
        assert c.buf == b"", "no body bytes may follow a bodiless response"
        r2 = c.request(get("/next"))
        assert r2.status == 200 and r2.body == b"next"
    assert upstream.accepts == 1


def test_upstream_sending_body_to_head_does_not_desync_client(proxy, upstream):
    async def handler(req: UpRequest, conn: UpConn) -> str | None:
        assert conn.writer is not None
        if req.method == b"HEAD":  # a broken upstream: a body after a HEAD response
            conn.writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nHTTP/1.1 200 OK\r\n\r\n")
            return None
        conn.writer.write(http_response(200, b"real"))
        return None

    upstream.handler = handler
    with proxy.client() as c:
        c.send(b"HEAD / HTTP/1.1\r\nHost: example.com\r\n\r\n")
        assert c.response(head_request=True).status == 200
        time.sleep(0.1)
        r = c.request(get("/after"))
        assert r.status == 200 and r.body == b"real"


def test_repeated_response_head_framed_per_request(proxy, upstream):
    """An upstream connection remembers the framing of the last response head; the same
    header lines must still be framed anew for a HEAD, or a 304, on that connection."""

    async def handler(req: UpRequest, conn: UpConn) -> None:
        assert conn.writer is not None
        status = b"304 Not Modified" if req.target == b"/cached" else b"200 OK"
        body = b"" if req.method == b"HEAD" or req.target == b"/cached" else b"body"
        conn.writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 4\r\nX-Same: 1\r\n\r\n" + body)

    upstream.handler = handler
    with proxy.client() as c:
        for method, target in [("GET", "/a"), ("HEAD", "/a"), ("GET", "/b"), ("GET", "/cached"), ("GET", "/c")]:
            c.send(f"{method} {target} HTTP/1.1\r\nHost: example.com\r\n\r\n".encode())
            r = c.response(head_request=method == "HEAD")
            if target == "/cached":
                assert r.status == 304 and r.body == b""
            elif method == "HEAD":
                assert r.status == 200 and r.body == b"" and r.header("content-length") == b"4"
            else:
                assert r.status == 200 and r.body == b"body"
            assert not r.closes
    assert upstream.accepts == 1, "every response came over the one kept-alive connection"


# --- Expect: 100-continue -----------------------------------------------------------


def test_expect_100_continue(proxy, upstream):
    with proxy.client() as c:
        c.send(post("/upload", b"Content-Length: 5\r\nExpect: 100-continue\r\n"))
        interim = c.response(skip_1xx=False)
        assert interim.status == 100
        c.send(b"hello")
        r = c.response()
        assert r.status == 200 and r.body == b"path=/upload body=5"
        assert c.request(get("/next")).status == 200
    req = upstream.requests[0]
    assert req.header("expect") is None and req.body == b"hello"


def test_expect_100_continue_client_sends_body_anyway(proxy, upstream):
    with proxy.client() as c:
        c.send(post("/upload", b"Content-Length: 5\r\nExpect: 100-continue\r\n", b"hello"))
        r = c.response()  # a 100 may or may not come first; the final answer is what counts
        assert r.status == 200 and r.body == b"path=/upload body=5"
    assert upstream.requests[0].header("expect") is None


def test_expect_100_continue_refused_without_reading_body(make_proxy, upstream):
    p = make_proxy(routes=[{"host": "known.example", "path": "/", "upstreams": [upstream.address]}])
    with p.client() as c:
        c.send(post("/upload", b"Content-Length: 5\r\nExpect: 100-continue\r\n"))
        r = c.response(skip_1xx=False)
        assert r.status == 404 and r.closes
        assert c.is_closed()


# --- Upgrade tunnels ---------------------------------------------------------------


async def upgrade_then_echo(req: UpRequest, conn: UpConn) -> str | None:
    assert conn.writer is not None
    if req.header("upgrade") == b"websocket":
        conn.writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                          b"Sec-WebSocket-Accept: abc\r\n\r\n")
        return "echo"
    conn.writer.write(http_response(200, b"plain"))
    return None


def test_websocket_upgrade_tunnels_bytes_both_ways(proxy, upstream):
    upstream.handler = upgrade_then_echo
    with proxy.client() as c:
        c.send(b"GET /ws HTTP/1.1\r\nHost: example.com\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
               b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        r = c.response()
        assert r.status == 101
        assert r.header("upgrade") == b"websocket"
        assert (r.header("connection") or b"").lower() == b"upgrade"
        payload = os.urandom(200_000) + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"  # HTTP-looking bytes too
        c.send(payload)
        echoed = c.buf
        c.buf = b""
        while len(echoed) < len(payload):
            data = c.sock.recv(65536)
            assert data
            echoed += data
        assert echoed == payload
    req = upstream.requests[0]
    assert req.header("upgrade") == b"websocket"
    assert req.header("sec-websocket-key") == b"dGhlIHNhbXBsZSBub25jZQ=="
    assert len(upstream.requests) == 1


def test_upgrade_bytes_sent_early_are_held_until_switch(proxy, upstream):
    upstream.handler = upgrade_then_echo
    with proxy.client() as c:
        c.send(b"GET /ws HTTP/1.1\r\nHost: example.com\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\nearly")
        r = c.response()
        assert r.status == 101
        while len(c.buf) < 5:
            assert c._fill()
        assert c.buf == b"early"


def test_tunnel_closed_by_upstream_closes_client(proxy, upstream):
    async def switch_then_close(req: UpRequest, conn: UpConn) -> str | None:
        assert conn.writer is not None
        conn.writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nbye")
        await conn.writer.drain()
        return "close"

    upstream.handler = switch_then_close
    with proxy.client() as c:
        c.send(b"GET /ws HTTP/1.1\r\nHost: example.com\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n")
        assert c.response().status == 101
        assert c.read_until_close() == b"bye"
    wait_until(lambda: proxy.state(lambda rt: len(rt.state.connections)) == 0, 3, "the client side to be closed")


def test_tunnel_closed_by_client_closes_upstream(proxy, upstream):
    upstream.handler = upgrade_then_echo
    with proxy.client() as c:
        c.send(b"GET /ws HTTP/1.1\r\nHost: example.com\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n")
        assert c.response().status == 101
        c.send(b"ping")
        while len(c.buf) < 4:
            assert c._fill()
    wait_until(lambda: upstream.conns[0].closed, 3, "the upstream side of the tunnel to be closed")
    with proxy.client() as c:  # and it is never reused for plain HTTP
        assert c.request(get("/plain")).body == b"plain"
    assert upstream.accepts == 2


def test_upgrade_declined_is_plain_response_and_close(proxy, upstream):
    upstream.handler = fixed(http_response(200, b"no switch"))
    with proxy.client() as c:
        c.send(b"GET /ws HTTP/1.1\r\nHost: example.com\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        r = c.response()
        assert r.status == 200 and r.body == b"no switch"
        assert r.closes and c.is_closed()


def test_upstream_101_without_being_asked_is_502(proxy, upstream):
    upstream.handler = fixed(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
    with proxy.client() as c:
        r = c.request(get("/"))
        assert r.status == 502


# --- header rewriting ----------------------------------------------------------------


def test_hop_by_hop_headers_removed_both_ways(proxy, upstream):
    upstream.handler = fixed(
        b"HTTP/1.1 200 OK\r\nConnection: X-Up-Hop\r\nX-Up-Hop: secret\r\nKeep-Alive: timeout=99\r\n"
        b"Proxy-Connection: keep-alive\r\nUpgrade: h2c\r\nX-End: kept\r\nContent-Length: 2\r\n\r\nok"
    )
    with proxy.client() as c:
        r = c.request(
            b"GET /hop HTTP/1.1\r\nHost: example.com\r\nConnection: keep-alive, X-Secret-Hop\r\nX-Secret-Hop: 1\r\n"
            b"Keep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Connection: keep-alive\r\nUpgrade: h2c\r\n"
            b"X-End-To-End: kept\r\n\r\n"
        )
        assert r.status == 200 and r.body == b"ok"
        names = {k.lower() for k, _ in r.headers}
        assert not names & {b"x-up-hop", b"keep-alive", b"proxy-connection", b"upgrade"}
        assert r.header("x-end") == b"kept"
        assert r.header("connection") is None
    req = upstream.requests[0]
    assert not req.names() & {b"connection", b"x-secret-hop", b"keep-alive", b"te", b"proxy-connection", b"upgrade"}
    assert req.header("x-end-to-end") == b"kept"


def test_connection_header_cannot_strip_host_or_length(proxy, upstream):
    with proxy.client() as c:
        r = c.request(post("/h", b"Connection: host, content-length\r\nContent-Length: 3\r\n", b"abc"))
        assert r.status == 200 and r.body == b"path=/h body=3"
    req = upstream.requests[0]
    assert req.header_all("host") == [b"example.com"]
    assert req.body == b"abc"


def test_via_and_forwarding_headers_set(proxy, upstream):
    with proxy.client() as c:
        r = c.request(get("/fwd", host="Example.com:8080"))
        assert r.header("via") == b"1.1 summon"
    req = upstream.requests[0]
    assert req.header("via") == b"1.1 summon"
    assert req.header("x-forwarded-for") == b"127.0.0.1"
    assert req.header("x-forwarded-proto") == b"http"
    assert req.header("x-forwarded-host") == b"Example.com:8080"
    assert req.header("forwarded") == b'for=127.0.0.1;proto=http;host="Example.com:8080"'


def test_http10_client_gets_via_10(proxy, upstream):
    with proxy.client() as c:
        c.send(b"GET /old HTTP/1.0\r\nHost: example.com\r\n\r\n")
        r = c.response()
        assert r.status == 200
        assert c.is_closed()
    assert upstream.requests[0].header("via") == b"1.0 summon"


SPOOF = (b"X-Forwarded-For: 6.6.6.6\r\nForwarded: for=6.6.6.6\r\nX-Forwarded-Proto: https\r\n"
         b"X-Forwarded-Host: evil.com\r\nX-Client-Region: mars\r\n")


def test_forwarding_headers_from_untrusted_client_dropped(proxy, upstream):
    with proxy.client() as c:
        assert c.request(get("/spoof", extra=SPOOF.decode())).status == 200
    req = upstream.requests[0]
    assert req.header_all("x-forwarded-for") == [b"127.0.0.1"]
    assert req.header_all("forwarded") == [b'for=127.0.0.1;proto=http;host="example.com"']
    assert req.header_all("x-forwarded-proto") == [b"http"]
    assert req.header_all("x-forwarded-host") == [b"example.com"]
    assert req.header("x-client-region") is None
    assert b"6.6.6.6" not in upstream.raw and b"evil.com" not in upstream.raw


def test_forwarding_headers_from_trusted_proxy_appended(make_proxy, upstream):
    p = make_proxy(trusted_proxies=["127.0.0.1/32"])
    with p.client() as c:
        assert c.request(get("/trusted", extra=SPOOF.decode())).status == 200
    req = upstream.requests[0]
    assert req.header_all("x-forwarded-for") == [b"6.6.6.6, 127.0.0.1"]
    assert req.header_all("forwarded") == [b'for=6.6.6.6, for=127.0.0.1;proto=http;host="example.com"']
    assert req.header_all("x-forwarded-proto") == [b"https"]
    assert req.header_all("x-forwarded-host") == [b"evil.com"]


# --- routing, normalisation and errors -------------------------------------------------


def test_unknown_host_or_path_is_404_and_connection_usable(make_proxy, upstream):
    p = make_proxy(routes=[{"host": "app.example", "path": "/api", "upstreams": [upstream.address]}])
    with p.client() as c:
        for req in (get("/other", host="app.example"), get("/api", host="other.example"), get("/apix", host="app.example")):
            r = c.request(req)
            assert r.status == 404
            assert len(r.body) < 200 and not r.closes
        r = c.request(get("/api/v1", host="app.example:8080"))
        assert r.status == 200 and r.body == b"path=/api/v1 body=0"
    assert [r.target for r in upstream.requests] == [b"/api/v1"]


def test_404_with_body_reads_body_and_stays_in_sync(make_proxy, upstream):
    p = make_proxy(routes=[{"path": "/api", "upstreams": [upstream.address]}])
    with p.client() as c:
        c.send(post("/nope", b"Content-Length: 28\r\n", b"GET /api/smuggle HTTP/1.1\r\n\r\n") + get("/api/ok"))
        assert c.response().status == 404
        r = c.response()
        assert r.status == 200 and r.body == b"path=/api/ok body=0"
    assert [r.target for r in upstream.requests] == [b"/api/ok"]


def test_path_normalised_before_routing_and_forwarding(make_proxy, upstream):
    dead = f"127.0.0.1:{closed_port()}"
    p = make_proxy(routes=[
        {"path": "/", "upstreams": [dead]},
        {"path": "/secret", "upstreams": [upstream.address]},
    ])
    with p.client() as c:
        assert c.request(get("/public/../secret/x")).status == 200
        assert c.request(get("/%73ecret/./%7Euser/%41b%2Fc?q=/../%2e&x=%41")).status == 200
        assert c.request(get("/secret//double/.")).status == 200
    targets = [r.target for r in upstream.requests]
    assert targets == [b"/secret/x", b"/secret/~user/Ab%2Fc?q=/../%2e&x=%41", b"/secret//double/"]


def test_unreachable_upstream_is_502(make_proxy):
    p = make_proxy(routes=[{"path": "/", "upstreams": [f"127.0.0.1:{closed_port()}"]}])
    with p.client(timeout=15) as c:
        t0 = time.monotonic()
        r = c.request(get("/"))
        assert r.status == 502
        assert time.monotonic() - t0 < 10  # a bound noise cannot cross: a refused connect fails at once
        assert c.request(get("/again")).status == 502  # the client connection survives a 5xx


def test_slow_upstream_is_504(make_proxy, upstream):
    upstream.handler = fixed(b"", then="hold")
    p = make_proxy(upstream_timeout="500ms")
    with p.client(timeout=15) as c:
        t0 = time.monotonic()
        r = c.request(get("/slow"))
        elapsed = time.monotonic() - t0
        assert r.status == 504
        # not before the timeout (noise only adds time); the upper bound is one noise cannot
        # cross: the upstream holds for ever, so without the timeout there is no answer
        assert 0.4 < elapsed < 10


@pytest.mark.parametrize("response", [
    pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", id="cl-te"),
    pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", id="cl-cl"),
    pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\nhello", id="cl-alpha"),
    pytest.param(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nhello", id="te-gzip"),
    pytest.param(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", id="te-gzip-chunked"),
    pytest.param(b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok", id="bare-lf"),
    pytest.param(b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 2\r\n\r\nok", id="obs-fold"),
    pytest.param(b"HTTP/1.1 2000 OK\r\nContent-Length: 2\r\n\r\nok", id="bad-status"),
    pytest.param(b"HTTZ/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", id="bad-protocol"),
    pytest.param(b"garbage\r\n\r\n", id="garbage"),
    pytest.param(b"HTTP/1.1 200 OK\r\nX-A : b\r\nContent-Length: 2\r\n\r\nok", id="space-before-colon"),
])
def test_upstream_bad_framing_is_502_and_connection_dropped(proxy, upstream, response):
    upstream.handler = fixed(response)
    with proxy.client() as c:
        r = c.request(get("/bad"))
        assert r.status == 502
    wait_until(lambda: all(conn.closed for conn in upstream.conns), 3, "the bad upstream connection to be closed")
    upstream.handler = fixed(http_response(200, b"good"))
    with proxy.client() as c:
        assert c.request(get("/good")).body == b"good"
    assert upstream.accepts >= 2, "an upstream connection with bad framing must never be reused"


@pytest.mark.parametrize("response", [
    pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789", id="content-length"),
    pytest.param(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n", id="chunked"),
    pytest.param(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel", id="mid-chunk"),
])
def test_upstream_closing_mid_response_truncates_client_response(proxy, upstream, response):
    upstream.handler = fixed(response, then="close")
    with proxy.client() as c:
        c.send(get("/trunc"))
        with pytest.raises(Truncated):
            c.response()
        assert c.eof


def test_upstream_bad_chunk_mid_response_truncates(proxy, upstream):
    upstream.handler = fixed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n", then="hold")
    with proxy.client() as c:
        c.send(get("/trunc"))
        with pytest.raises(Truncated):
            c.response()


def test_upstream_closing_before_response_is_502(proxy, upstream):
    upstream.handler = fixed(b"", then="close")
    with proxy.client() as c:
        r = c.request(get("/gone"))
        assert r.status == 502


def test_http10_client_response_framed_by_close(proxy, upstream):
    upstream.handler = fixed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    with proxy.client() as c:
        c.send(b"GET / HTTP/1.0\r\nHost: example.com\r\n\r\n")
        r = c.response()
        assert r.status == 200 and r.body == b"abc"
        assert r.header("transfer-encoding") is None


# --- limits and timeouts --------------------------------------------------------------


def test_header_timeout_slowloris(make_proxy, upstream):
    # Bounds, not speed figures: header_timeout is 1 s; the trickle has 10 s of bytes to
    # send and must be cut off before it runs out (a deadline reset by each byte never
    # cuts it), and the slow head is answered 408 within 10 s; noise cannot span 9 s.
    p = make_proxy(header_timeout="1s")
    with (p.client(timeout=15) as slow, p.client(timeout=15) as trickle, p.client() as silent,
          p.client() as good):
        t0 = time.monotonic()
        slow.send(b"GET / HTTP/1.1\r\nHost: exa")
        trickle.send(b"G")
        # a well-behaved client is served meanwhile
        for i in range(3):
            assert good.request(get(f"/ok{i}")).status == 200
        cut = False
        for ch in b"ET / HTTP/1.1\r\nHost: e" + b"x" * 78:  # a byte every 0.1 s for 10 s, never a whole head
            try:
                trickle.send(bytes([ch]))
            except (BrokenPipeError, ConnectionResetError):
                cut = True
                break
            time.sleep(0.1)
        assert cut, "a client sending a header byte every 0.1 s was never cut off"
        r = slow.response()
        assert r.status == 408
        assert slow.is_closed()
        assert time.monotonic() - t0 < 10
        data = trickle.read_until_close()
        assert data == b"" or data.startswith(b"HTTP/1.1 408")
        assert silent.is_closed(timeout=10), "a connection that sends nothing is closed too"
        assert good.request(get("/still")).status == 200
    assert all(r.target.startswith((b"/ok", b"/still")) for r in upstream.requests)


def test_keepalive_idle_timeout_closes_connection(make_proxy, upstream):
    p = make_proxy(keepalive_timeout="1s")
    with p.client() as c:
        assert c.request(get("/")).status == 200
        t0 = time.monotonic()
        assert c.is_closed(timeout=15)
        # not before the timeout (noise only adds time), and within a bound noise cannot cross
        assert 0.5 < time.monotonic() - t0 < 10


def test_body_timeout(make_proxy, upstream):
    p = make_proxy(body_timeout="1s")
    with p.client() as c:
        c.send(post("/stall", b"Content-Length: 10\r\n", b"12345"))
        r = c.response()
        assert r.status == 408
        assert c.is_closed()
    assert all(len(r.body) != 10 for r in upstream.requests)


def test_body_too_large_content_length_is_413_and_not_forwarded(make_proxy, upstream):
    p = make_proxy(max_body_bytes=1000)
    with p.client() as c:
        c.send(post("/big", b"Content-Length: 5000\r\n", b"x" * 5000))
        r = c.response()
        assert r.status == 413 and r.closes
        assert c.is_closed()
    time.sleep(0.05)
    assert upstream.raw == b""
    with p.client() as c:
        assert c.request(post("/small", b"Content-Length: 1000\r\n", b"x" * 1000)).status == 200


def test_body_too_large_chunked_is_413_and_never_complete_upstream(make_proxy, upstream):
    p = make_proxy(max_body_bytes=1000)
    with p.client() as c:
        c.send(post("/big", b"Transfer-Encoding: chunked\r\n"))
        for _ in range(3):
            try:
                c.send(b"200\r\n" + b"y" * 0x200 + b"\r\n")
            except (BrokenPipeError, ConnectionResetError):
                break
            time.sleep(0.05)
        r = c.response()
        assert r.status == 413
        assert c.is_closed()
    time.sleep(0.1)
    assert upstream.requests == []


def test_max_connections_sheds_extra_with_503(make_proxy, upstream):
    p = make_proxy(max_connections=2)
    with p.client() as a, p.client() as b:
        assert a.request(get("/a")).status == 200
        assert b.request(get("/b")).status == 200
        with p.client() as extra:
            r = extra.response()
            assert r.status == 503 and r.header("retry-after") is not None
            assert extra.is_closed()
        assert a.request(get("/a2")).status == 200
    wait_until(lambda: p.state(lambda rt: len(rt.state.connections)) == 0, 3, "connections to be released")
    with p.client() as c:
        assert c.request(get("/after")).status == 200


def test_overload_drops_are_503_close_and_counted(proxy, upstream):
    """The overload watch hands the front a budget of requests to drop (proxy.engine.overload):
    each is answered 503 + Retry-After + Connection: close without reaching an upstream,
    and counted in /status and /metrics."""
    with proxy.client() as a, proxy.client() as b:
        assert a.request(get("/a")).status == 200
        proxy.state(lambda rt: setattr(rt.state, "shed_budget", 1))
        r = a.request(get("/dropped"))
        assert r.status == 503 and r.header("retry-after") == b"1" and r.header("connection") == b"close"
        assert a.is_closed()
        assert b.request(get("/b")).status == 200  # a budget of one
    assert [r.target for r in upstream.requests] == [b"/a", b"/b"]
    assert proxy.state(lambda rt: (rt.state.shed_budget, status_of(rt)["totals"]["shed_requests"])) == (0, 1)
    metrics = proxy.state(lambda rt: rt.metrics.render()[0].decode())
    assert "summon_shed_requests_total 1.0" in metrics
    assert "summon_overloaded 0.0" in metrics


def test_many_concurrent_clients(proxy, upstream):
    clients = [RawClient(proxy.port) for _ in range(20)]
    try:
        for i, c in enumerate(clients):
            c.send(get(f"/m{i}"))
        for i, c in enumerate(clients):
            assert c.response().body == f"path=/m{i} body=0".encode()
    finally:
        for c in clients:
            c.close()


def test_client_half_close_still_answered(proxy, upstream):
    with proxy.client() as c:
        c.send(get("/1") + get("/2"))
        c.sock.shutdown(socket.SHUT_WR)
        assert c.response().body == b"path=/1 body=0"
        assert c.response().body == b"path=/2 body=0"


def test_pipelined_after_connection_close_not_forwarded(proxy, upstream):
    with proxy.client() as c:
        c.send(get("/1", extra="Connection: close\r\n") + get("/2"))
        r = c.response()
        assert r.status == 200 and r.closes
        assert c.read_until_close() == b""
    time.sleep(0.05)
    assert [r.target for r in upstream.requests] == [b"/1"]


def test_many_pipelined_requests_in_order(proxy, upstream):
    n = 100
    with proxy.client() as c:
        c.send(b"".join(get(f"/p{i}") for i in range(n)))
        for i in range(n):
            assert c.response().body == f"path=/p{i} body=0".encode()
    assert upstream.accepts == 1


def test_upstream_interim_responses_are_not_passed_on(proxy, upstream):
    upstream.handler = fixed(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
                             + http_response(200, b"final"))
    with proxy.client() as c:
        c.send(get("/"))
        r = c.response(skip_1xx=False)
        assert r.status == 200 and r.body == b"final"
        assert c.request(get("/again")).body == b"final"


def test_http10_upstream_read_until_close(proxy, upstream):
    upstream.handler = fixed(b"HTTP/1.0 200 OK\r\nX-Old: yes\r\n\r\nold body", then="close")
    with proxy.client() as c:
        r = c.request(get("/"))
        assert r.status == 200 and r.body == b"old body" and r.header("x-old") == b"yes"
        assert c.request(get("/")).body == b"old body"


def test_upstream_stalling_mid_body_is_cut_off_and_the_client_sees_it(make_proxy, upstream):
    # head and half the body, then nothing: the client must not wait for ever, and must
    # not mistake the half for the whole (the connection is cut, not closed cleanly)
    upstream.handler = fixed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello", then="hold")
    p = make_proxy(upstream_timeout="300ms")
    with p.client(timeout=15) as c:
        t0 = time.monotonic()
        with pytest.raises(Truncated, match="EOF after 5 of 10 body bytes"):
            c.request(get("/stall"))
        elapsed = time.monotonic() - t0
    assert 0.25 < elapsed < 10, elapsed  # not early; and a bound noise cannot cross (the upstream holds for ever)


def test_a_slow_but_moving_body_is_not_a_stall(make_proxy, upstream):
    async def trickle(req: UpRequest, conn: UpConn) -> str | None:
        assert conn.writer is not None
        conn.writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\n")
        for _ in range(8):  # 1.2 s in all, four times upstream_timeout, never 300 ms silent
            await asyncio.sleep(0.15)
            conn.writer.write(b"x")
        return None

    upstream.handler = trickle
    p = make_proxy(upstream_timeout="300ms")
    with p.client() as c:
        r = c.request(get("/trickle"))
    assert r.status == 200 and r.body == b"x" * 8


def test_504_drops_upstream_connection_keeps_client(make_proxy, upstream):
    async def first_slow(req: UpRequest, conn: UpConn) -> str | None:
        if req.target == b"/slow":
            await asyncio.sleep(3600)
        assert conn.writer is not None
        conn.writer.write(http_response(200, b"fast"))
        return None

    upstream.handler = first_slow
    p = make_proxy(upstream_timeout="300ms")
    with p.client() as c:
        assert c.request(get("/slow")).status == 504
        assert c.request(get("/fast")).body == b"fast"
    assert upstream.accepts == 2, "the timed-out upstream connection must not be reused"


def close_on_second_request() -> tuple[object, list[int]]:
    """Answers the first request on a connection, then closes without answering: what a
    replica whose keep-alive timer fired at the wrong moment looks like."""
    seen: list[int] = []

    async def handler(req: UpRequest, conn: UpConn) -> str | None:
        seen.append(len(conn.requests))
        assert conn.writer is not None
        if len(conn.requests) >= 2:
            return "close"
        conn.writer.write(http_response(200, b"answer"))
        return None

    return handler, seen


def test_idempotent_request_retried_after_keepalive_race(proxy, upstream):
    upstream.handler, _ = close_on_second_request()
    with proxy.client() as c:
        assert c.request(get("/1")).status == 200
        r = c.request(get("/2"))
        assert r.status == 200 and r.body == b"answer"
    assert upstream.accepts == 2


@pytest.mark.parametrize("body", [b"", b"payload"])
def test_non_idempotent_request_not_retried(proxy, upstream, body):
    upstream.handler, _ = close_on_second_request()
    with proxy.client() as c:
        assert c.request(get("/1")).status == 200
        r = c.request(post("/order", f"Content-Length: {len(body)}\r\n".encode(), body))
        assert r.status == 502
    time.sleep(0.1)
    assert [r.target for r in upstream.requests].count(b"/order") == 1, "a POST that reached a replica was replayed"


def dies_between_head_and_body(framing: str) -> object:
    """The first connection sends a response head alone, waits (so the proxy reads it on
    its own) and closes before any body byte: a replica killed between its two writes.
    Later connections answer whole."""

    first: list[UpConn] = []

    async def handler(req: UpRequest, conn: UpConn) -> str | None:
        assert conn.writer is not None
        if not first or first[0] is conn:
            first.append(conn)
            head = "Content-Length: 6" if framing == "length" else "Transfer-Encoding: chunked"
            conn.writer.write(f"HTTP/1.1 200 OK\r\n{head}\r\n\r\n".encode())
            await conn.writer.drain()
            await asyncio.sleep(0.2)
            return "close"
        conn.writer.write(http_response(200, b"second"))
        return None

    return handler


def test_a_replica_dying_between_its_head_and_body_is_retried_for_a_get(proxy, upstream):
    upstream.handler = dies_between_head_and_body("length")
    with proxy.client() as c:
        r = c.request(get("/page"))
        assert r.status == 200 and r.body == b"second", "the head was kept back: nothing reached the client"
    assert upstream.accepts == 2


@pytest.mark.parametrize("body", [b"", b"payload"])
def test_a_replica_dying_between_its_head_and_body_cuts_a_post(proxy, upstream, body):
    upstream.handler = dies_between_head_and_body("length")
    with proxy.client() as c:
        with pytest.raises(Truncated):
            c.request(post("/order", f"Content-Length: {len(body)}\r\n".encode(), body))
    time.sleep(0.1)
    assert [r.target for r in upstream.requests].count(b"/order") == 1, "a POST that reached a replica was replayed"


def test_a_chunked_head_goes_to_the_client_at_once(proxy, upstream):
    """A chunked body may stream (server-sent events): its head is not kept back, so the
    same death after it is a cut, not a retry."""
    upstream.handler = dies_between_head_and_body("chunked")
    with proxy.client() as c:
        with pytest.raises(Truncated):
            c.request(get("/events"))
    assert upstream.accepts == 1


def test_http10_keepalive_client_is_told_and_kept(proxy, upstream):
    req = b"GET /old HTTP/1.0\r\nHost: example.com\r\nConnection: keep-alive\r\n\r\n"
    with proxy.client() as c:
        r = c.request(req)
        assert r.status == 200
        # an HTTP/1.0 client only keeps the connection when told so explicitly
        assert (r.header("connection") or b"").lower() == b"keep-alive"
        assert c.request(req).status == 200


def test_http10_keepalive_client_is_kept_after_an_error(make_proxy, upstream):
    p = make_proxy(routes=[{"path": "/api", "upstreams": [upstream.address]}])
    with p.client() as c:
        r = c.request(b"GET /nowhere HTTP/1.0\r\nHost: example.com\r\nConnection: keep-alive\r\n\r\n")
        assert r.status == 404 and (r.header("connection") or b"").lower() == b"keep-alive"
        r = c.request(b"GET /api HTTP/1.0\r\nHost: example.com\r\nConnection: keep-alive\r\n\r\n")
        assert r.status == 200 and r.body == b"path=/api body=0"


def test_declined_upgrade_never_forwards_following_bytes(proxy, upstream):
    """Bytes after an Upgrade request belong to the new protocol; when the upstream does
    not switch, they must not be parsed or forwarded as a request (upgrade smuggling)."""
    upstream.handler = fixed(http_response(200, b"no switch"))
    with proxy.client() as c:
        c.send(b"GET /ws HTTP/1.1\r\nHost: example.com\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
               + get("/internal/admin"))
        r = c.response()
        assert r.status == 200 and r.closes
        assert c.read_until_close() == b""
    time.sleep(0.05)
    assert [r.target for r in upstream.requests] == [b"/ws"]
    assert b"/internal/admin" not in upstream.raw
