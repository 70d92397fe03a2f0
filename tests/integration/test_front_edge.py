"""Edge rules of the front (docs/architecture.md, "Edge rules"): smuggling and framing.

Every case goes through real sockets: a raw client sends the bytes to the proxy, which
routes to a recording upstream. Each malformed request must get a 4xx, the proxy must
close the connection, and -- what matters for smuggling -- the upstream must have
received none of it (checked on the bytes the upstream saw, not only on the status).

Cases were written from the classes in public corpora (http-garden, smuggler's TE
variants, http-desync-guardian, llhttp fixtures); the bytes are our own.
"""

from __future__ import annotations

import time

import pytest

from tests.helpers import ws_echo as ws
from tests.helpers.net import RecordingUpstream, fixed, get, wait_until, websocket_echo

H = b"Host: example.com\r\n"


def post(headers: bytes, body: bytes = b"", version: bytes = b"1.1") -> bytes:
    return b"POST /upload HTTP/" + version + b"\r\n" + H + headers + b"\r\n" + body


CHUNKED_BODY = b"5\r\nhello\r\n0\r\n\r\n"

# (id, raw request, acceptable statuses)
REJECTED: list[tuple[str, bytes, set[int]]] = [
    # --- Content-Length together with Transfer-Encoding, and TE obfuscations -------
    ("cl-te", post(b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n", CHUNKED_BODY), {400}),
    ("te-cl", post(b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n", CHUNKED_BODY), {400}),
    ("cl-te-classic-prefix", post(b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\nG"), {400}),
    ("te-tab", post(b"Transfer-Encoding:\tchunked\r\nContent-Length: 4\r\n", CHUNKED_BODY), {400}),
    ("te-leading-space-name", post(b" Transfer-Encoding: chunked\r\nContent-Length: 4\r\n", CHUNKED_BODY), {400}),
    ("te-first-header-folded", b"POST / HTTP/1.1\r\n Transfer-Encoding: chunked\r\n" + H + b"\r\n" + CHUNKED_BODY, {400}),
    ("te-chunked-identity", post(b"Transfer-Encoding: chunked, identity\r\n", CHUNKED_BODY), {400, 501}),
    ("te-identity-chunked", post(b"Transfer-Encoding: identity, chunked\r\n", CHUNKED_BODY), {400, 501}),
    ("te-xchunked", post(b"Transfer-Encoding: xchunked\r\n", CHUNKED_BODY), {400, 501}),
    ("te-chunkedx", post(b"Transfer-Encoding: chunkedx\r\n", CHUNKED_BODY), {400, 501}),
    ("te-gzip", post(b"Transfer-Encoding: gzip\r\n", CHUNKED_BODY), {501}),
    ("te-trailing-space-cl", post(b"Transfer-Encoding: chunked \r\nContent-Length: 4\r\n", CHUNKED_BODY), {400}),
    ("te-uppercase-cl", post(b"TRANSFER-ENCODING: CHUNKED\r\nContent-Length: 4\r\n", CHUNKED_BODY), {400}),
    ("te-quoted", post(b'Transfer-Encoding: "chunked"\r\n', CHUNKED_BODY), {400, 501}),
    ("te-vertical-tab", post(b"Transfer-Encoding: \x0bchunked\r\n", CHUNKED_BODY), {400, 501}),
    ("te-http10", post(b"Transfer-Encoding: chunked\r\n", CHUNKED_BODY, version=b"1.0"), {400}),
    ("te-duplicate", post(b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", CHUNKED_BODY), {400}),
    ("te-duplicate-identity", post(b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n", CHUNKED_BODY),
     {400, 501}),
    ("te-space-before-colon", post(b"Transfer-Encoding : chunked\r\nContent-Length: 4\r\n", CHUNKED_BODY), {400}),
    ("te-obs-fold", post(b"Transfer-Encoding:\r\n chunked\r\nContent-Length: 4\r\n", CHUNKED_BODY), {400}),
    ("te-underscore", post(b"Transfer_Encoding: chunked\r\nContent-Length: 4\r\n", b"ab"), {400}),
    # --- Content-Length oddities --------------------------------------------------
    ("cl-duplicate-same", post(b"Content-Length: 5\r\nContent-Length: 5\r\n", b"hello"), {400}),
    ("cl-duplicate-different", post(b"Content-Length: 5\r\nContent-Length: 6\r\n", b"hello!"), {400}),
    ("cl-list", post(b"Content-Length: 5,5\r\n", b"hello"), {400}),
    ("cl-list-space", post(b"Content-Length: 5, 5\r\n", b"hello"), {400}),
    ("cl-plus", post(b"Content-Length: +5\r\n", b"hello"), {400}),
    ("cl-negative", post(b"Content-Length: -1\r\n", b"hello"), {400}),
    ("cl-hex", post(b"Content-Length: 0x10\r\n", b"hello"), {400}),
    ("cl-two-numbers", post(b"Content-Length: 5 5\r\n", b"hello"), {400}),
    ("cl-huge", post(b"Content-Length: " + b"9" * 30 + b"\r\n", b"hello"), {400, 413}),
    ("cl-empty", post(b"Content-Length: \r\n", b"hello"), {400}),
    ("cl-letters", post(b"Content-Length: 5a\r\n", b"hello"), {400}),
    ("cl-underscore-name", post(b"Content_Length: 5\r\n", b"hello"), {400}),
    # --- chunk framing -------------------------------------------------------------
    ("chunk-bad-hex", post(b"Transfer-Encoding: chunked\r\n", b"zz\r\nhello\r\n0\r\n\r\n"), {400}),
    ("chunk-negative", post(b"Transfer-Encoding: chunked\r\n", b"-5\r\nhello\r\n0\r\n\r\n"), {400}),
    ("chunk-size-overflow", post(b"Transfer-Encoding: chunked\r\n", b"f" * 20 + b"\r\nhello\r\n0\r\n\r\n"), {400}),
    ("chunk-missing-crlf", post(b"Transfer-Encoding: chunked\r\n", b"5\r\nhelloXX0\r\n\r\n"), {400}),
    ("chunk-size-bare-lf", post(b"Transfer-Encoding: chunked\r\n", b"5\nhello\r\n0\r\n\r\n"), {400}),
    ("chunk-data-bare-lf", post(b"Transfer-Encoding: chunked\r\n", b"5\r\nhello\n0\r\n\r\n"), {400}),
    ("chunk-trailer-content-length", post(b"Transfer-Encoding: chunked\r\n", b"0\r\nContent-Length: 5\r\n\r\nhello"),
     {400}),
    ("chunk-size-space", post(b"Transfer-Encoding: chunked\r\n", b"5 5\r\nhello\r\n0\r\n\r\n"), {400}),
    # --- line endings, folding, names, values --------------------------------------
    ("bare-lf-everywhere", b"GET / HTTP/1.1\nHost: example.com\n\n", {400}),
    ("bare-lf-one-header", b"GET / HTTP/1.1\r\nHost: example.com\nX-A: b\r\n\r\n", {400}),
    ("bare-lf-end-of-head", b"GET / HTTP/1.1\r\nHost: example.com\r\n\n", {400}),
    ("bare-cr-in-header", b"GET / HTTP/1.1\r\nHost: example.com\rX-A: b\r\n\r\n", {400}),
    ("bare-cr-request-line", b"GET / HTTP/1.1\rHost: example.com\r\n\r\n", {400}),
    ("obs-fold", b"GET / HTTP/1.1\r\nHost: example.com\r\nX-A: a\r\n b\r\n\r\n", {400}),
    ("obs-fold-tab", b"GET / HTTP/1.1\r\nHost: example.com\r\nX-A: a\r\n\tb\r\n\r\n", {400}),
    ("space-before-colon", b"GET / HTTP/1.1\r\nHost : example.com\r\n\r\n", {400}),
    ("tab-before-colon", b"GET / HTTP/1.1\r\nHost: example.com\r\nX-A\t: b\r\n\r\n", {400}),
    ("underscore-name", b"GET / HTTP/1.1\r\nHost: example.com\r\nX_Forwarded_For: 10.0.0.1\r\n\r\n", {400}),
    ("empty-name", b"GET / HTTP/1.1\r\nHost: example.com\r\n: b\r\n\r\n", {400}),
    ("nul-in-value", b"GET / HTTP/1.1\r\nHost: example.com\r\nX-A: a\x00b\r\n\r\n", {400}),
    ("ctl-in-value", b"GET / HTTP/1.1\r\nHost: example.com\r\nX-A: a\x01b\r\n\r\n", {400}),
    ("del-in-value", b"GET / HTTP/1.1\r\nHost: example.com\r\nX-A: a\x7fb\r\n\r\n", {400}),
    ("nul-in-name", b"GET / HTTP/1.1\r\nHost: example.com\r\nX\x00A: b\r\n\r\n", {400}),
    ("nul-in-target", b"GET /a\x00b HTTP/1.1\r\nHost: example.com\r\n\r\n", {400}),
    # --- Host ---------------------------------------------------------------------------
    ("missing-host", b"GET / HTTP/1.1\r\nX-A: b\r\n\r\n", {400}),
    ("duplicate-host", b"GET / HTTP/1.1\r\nHost: example.com\r\nHost: evil.com\r\n\r\n", {400}),
    ("duplicate-host-same", b"GET / HTTP/1.1\r\nHost: example.com\r\nHost: example.com\r\n\r\n", {400}),
    ("host-empty", b"GET / HTTP/1.1\r\nHost: \r\n\r\n", {400}),
    ("host-list", b"GET / HTTP/1.1\r\nHost: example.com, evil.com\r\n\r\n", {400}),
    ("host-with-path", b"GET / HTTP/1.1\r\nHost: example.com/evil\r\n\r\n", {400}),
    ("host-with-userinfo", b"GET / HTTP/1.1\r\nHost: user@evil.com\r\n\r\n", {400}),
    ("host-bad-port", b"GET / HTTP/1.1\r\nHost: example.com:80x\r\n\r\n", {400}),
    ("absolute-form-other-host", b"GET http://evil.com/secret HTTP/1.1\r\nHost: example.com\r\n\r\n", {400}),
    ("absolute-form-userinfo", b"GET http://example.com@evil.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n", {400}),
    # --- request target ----------------------------------------------------------------
    ("dotdot-escapes-root", get("/../etc/passwd"), {400}),
    ("dotdot-deep-escape", get("/a/../../etc/passwd"), {400}),
    ("dotdot-encoded", get("/%2e%2e/etc/passwd"), {400}),
    ("dotdot-mixed-encoded", get("/a/.%2E/%2e./x"), {400}),
    ("target-not-absolute", b"GET foo HTTP/1.1\r\n" + H + b"\r\n", {400}),
    ("target-star-get", b"GET * HTTP/1.1\r\n" + H + b"\r\n", {400}),
    ("target-space", b"GET /a b HTTP/1.1\r\n" + H + b"\r\n", {400}),
    ("target-bad-char", b"GET /a<b> HTTP/1.1\r\n" + H + b"\r\n", {400}),
    ("target-bad-percent", get("/a%zz"), {400}),
    ("target-fragment", get("/a#frag"), {400}),
    ("target-backslash", b"GET /a\\..\\secret HTTP/1.1\r\n" + H + b"\r\n", {400}),
    ("connect", b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", {405}),
    ("unknown-version", b"GET / HTTP/1.2\r\n" + H + b"\r\n", {505}),
    ("http2-version", b"GET / HTTP/2.0\r\n" + H + b"\r\n", {505}),
    ("http3-version", b"GET / HTTP/3.0\r\n" + H + b"\r\n", {505}),
    ("http09-version", b"GET / HTTP/0.9\r\n" + H + b"\r\n", {505}),
    ("h2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", {505}),
    ("version-no-minor", b"GET / HTTP/2\r\n" + H + b"\r\n", {400}),
    ("nul-encoded-path", get("/a%00b"), {400}),
    ("nul-encoded-query", get("/a?x=%00"), {400}),
    ("nul-encoded-absolute-form", b"GET http://example.com/%00 HTTP/1.1\r\n" + H + b"\r\n", {400}),
    ("te-trailing-space", post(b"Transfer-Encoding: chunked \r\n", CHUNKED_BODY), {400}),
    ("te-trailing-tab", post(b"Transfer-Encoding: chunked\t\r\n", CHUNKED_BODY), {400}),
    ("h2c-upgrade-with-body", post(b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AA\r\n"
                                   b"Content-Length: 5\r\n", b"hello"), {400}),
    ("http09-style", b"GET /\r\n\r\n", {400, 505}),  # llhttp reads it as HTTP/0.9
    ("garbage-method", b"G\x01T / HTTP/1.1\r\n" + H + b"\r\n", {400}),
    ("non-ascii-header-name", b"GET / HTTP/1.1\r\n" + H + b"X-\xc3\x84: b\r\n\r\n", {400}),
    ("lowercase-version", b"GET / http/1.1\r\n" + H + b"\r\n", {400}),
    ("unsupported-expect", b"GET / HTTP/1.1\r\n" + H + b"Expect: 200-ok\r\n\r\n", {400, 417}),
    # --- limits ----------------------------------------------------------------------------
    ("too-many-headers", b"GET / HTTP/1.1\r\n" + H + b"".join(b"X-H%d: v\r\n" % i for i in range(150)) + b"\r\n",
     {431}),
    ("too-large-head", b"GET / HTTP/1.1\r\n" + H + b"X-Big: " + b"a" * 20_000 + b"\r\n\r\n", {431}),
    ("very-long-url", b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\n" + H + b"\r\n", {414, 431}),
]


def assert_refused_and_unseen(proxy, upstream, raw: bytes, statuses: set[int]) -> None:
    with proxy.client() as c:
        try:
            c.send(raw)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the proxy may close while a big request is still being written
        r = c.response()
        assert r.status in statuses, (r.status, r.body)
        assert r.closes, "a rejected request must be answered with Connection: close"
        assert c.is_closed(), "the proxy must close the connection after a rejected request"
    time.sleep(0.05)  # let any connect the proxy might have started land
    assert upstream.raw == b"", f"the upstream saw bytes of a rejected request: {upstream.raw[:200]!r}"
    assert upstream.requests == []


@pytest.mark.parametrize("raw,statuses", [pytest.param(raw, st, id=name) for name, raw, st in REJECTED])
def test_rejected_and_never_forwarded(proxy, upstream, raw, statuses):
    assert_refused_and_unseen(proxy, upstream, raw, statuses)


# A case that is split over writes must be as dead as one sent at once: a small chunked
# body is read whole before a replica is taken, so the upstream sees nothing of it at all.
@pytest.mark.parametrize("head,rest", [
    pytest.param(post(b"Transfer-Encoding: chunked\r\n"), b"zz\r\nhello\r\n0\r\n\r\n", id="bad-hex"),
    pytest.param(post(b"Transfer-Encoding: chunked\r\n"), b"5\r\nhelloXX0\r\n\r\n", id="missing-crlf"),
    pytest.param(post(b"Transfer-Encoding: chunked\r\n"), b"5\nhello\r\n0\r\n\r\n", id="bare-lf"),
])
def test_bad_chunk_after_head_never_completes_upstream(proxy, upstream, head, rest):
    with proxy.client() as warm:  # a pooled upstream connection: the head goes out at once
        assert warm.request(get("/warm")).status == 200
    with proxy.client() as c:
        c.send(head)
        time.sleep(0.1)
        c.send(rest)
        r = c.response()
        assert r.status == 400
        assert c.is_closed()
    time.sleep(0.05)  # let anything the proxy might have sent land
    assert [r.target for r in upstream.requests] == [b"/warm"], "a request with bad framing reached the upstream"
    assert b"POST" not in upstream.raw and b"hello" not in upstream.raw, "part of it was forwarded"


def test_pipelined_smuggling_second_request_never_forwarded(proxy, upstream):
    """A valid request followed by a malformed one in the same write."""
    bad = b"GET /smuggled HTTP/1.1\r\nHost: example.com\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"
    with proxy.client() as c:
        c.send(get("/first") + bad)
        first = c.response()
        assert first.status == 200 and first.body == b"path=/first body=0"
        second = c.response()
        assert second.status == 400
        assert c.is_closed()
    time.sleep(0.05)
    assert [r.target for r in upstream.requests] == [b"/first"]
    assert b"smuggled" not in upstream.raw


@pytest.mark.parametrize("bad", [
    pytest.param(b"GET /x HTTP/1.1\nHost: example.com\n\n", id="bare-lf"),
    pytest.param(post(b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n"), id="cl-te"),
    pytest.param(b"GET /x HTTP/1.1\r\nHost: example.com\r\nX-A: a\r\n b\r\n\r\n", id="obs-fold"),
    pytest.param(b"GARBAGE\r\n\r\n", id="garbage"),
])
def test_pipelined_after_body_request(proxy, upstream, bad):
    """CL.TE-style desync: the first request's body is exactly its Content-Length, and what
    follows must be parsed as a new (bad) request, never forwarded as body or request."""
    first = post(b"Content-Length: 5\r\n", b"hello")
    with proxy.client() as c:
        c.send(first + bad)
        r1 = c.response()
        assert r1.status == 200 and r1.body == b"path=/upload body=5"
        r2 = c.response()
        assert r2.status in (400, 501)
        assert c.is_closed()
    time.sleep(0.05)
    assert len(upstream.requests) == 1 and upstream.requests[0].body == b"hello"
    assert bad not in upstream.raw


def test_three_pipelined_then_bad_all_answered_in_order(proxy, upstream):
    with proxy.client() as c:
        c.send(get("/1") + get("/2") + get("/3") + b"GET /4 HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
        bodies = [c.response().body for _ in range(3)]
        assert bodies == [b"path=/1 body=0", b"path=/2 body=0", b"path=/3 body=0"]
        assert c.response().status == 400
        assert c.is_closed()
    assert [r.target for r in upstream.requests] == [b"/1", b"/2", b"/3"]


def test_chunk_extensions_accepted_but_not_forwarded(proxy, upstream):
    body = b"5;ext=1\r\nhello\r\n6;name=\"quoted\";x\r\n world\r\n0;last\r\n\r\n"
    with proxy.client() as c:
        r = c.request(post(b"Transfer-Encoding: chunked\r\n", body))
        assert r.status == 200 and r.body == b"path=/upload body=11"
    (req,) = upstream.requests
    assert req.body == b"hello world"
    assert b"ext" not in upstream.raw and b"quoted" not in upstream.raw and b"last" not in upstream.raw
    assert req.header("transfer-encoding") == b"chunked"


def test_trailers_never_merged_into_headers(proxy, upstream):
    body = b"5\r\nhello\r\n0\r\nX-Trailer: evil\r\nHost: evil.com\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n"
    with proxy.client() as c:
        r = c.request(post(b"Transfer-Encoding: chunked\r\nTrailer: X-Trailer\r\n", body))
        assert r.status == 200
        # the connection is still in sync: a second request is answered normally
        assert c.request(get("/after")).body == b"path=/after body=0"
    first = upstream.requests[0]
    assert first.body == b"hello"
    assert b"evil" not in upstream.raw and b"X-Trailer" not in upstream.raw
    assert first.header_all("host") == [b"example.com"]
    assert first.header("trailer") is None


def test_http10_request_with_content_length_is_fine(proxy, upstream):
    with proxy.client() as c:
        c.send(b"POST /p HTTP/1.0\r\nHost: example.com\r\nContent-Length: 3\r\n\r\nabc")
        r = c.response()
        assert r.status == 200 and r.body == b"path=/p body=3"
    assert upstream.requests[0].body == b"abc"


def test_lenient_but_valid_forms_accepted(proxy, upstream):
    """The strictness must not throw out valid requests: OWS around values, mixed-case
    names and `chunked` in any case, a Host with a port, absolute-form that agrees."""
    with proxy.client() as c:
        assert c.request(b"GET /a HTTP/1.1\r\nhOsT:   example.com:8080  \r\n\r\n").status == 200
        assert c.request(post(b"transfer-encoding: CHUNKED\r\n", CHUNKED_BODY)).status == 200
        assert c.request(post(b"Content-Length:  5 \r\n", b"hello")).status == 200
        assert c.request(b"GET http://example.com/abs?q=1 HTTP/1.1\r\nHost: example.com\r\n\r\n").status == 200
        assert c.request(b"OPTIONS * HTTP/1.1\r\nHost: example.com\r\n\r\n").status == 200
    targets = [r.target for r in upstream.requests]
    assert targets == [b"/a", b"/upload", b"/upload", b"/abs?q=1", b"*"]


def test_alternating_good_and_bad_requests_never_leak(proxy, upstream):
    """With warm pooled upstream connections a valid head is forwarded at once; a bad
    chunk in the same read must still stop the request before any byte goes out."""
    bad = post(b"Transfer-Encoding: chunked\r\n", b"5\r\nhelloXX0\r\n\r\n")
    for i in range(15):
        with proxy.client() as c:
            assert c.request(get(f"/good{i}")).status == 200
            c.send(bad)
            assert c.response().status == 400
            assert c.is_closed()
    time.sleep(0.05)
    assert b"POST" not in upstream.raw and b"hello" not in upstream.raw
    assert len(upstream.requests) == 15


def test_head_growing_over_many_reads_is_431(proxy, upstream):
    with proxy.client() as c:
        c.send(b"GET / HTTP/1.1\r\nHost: example.com\r\n")
        try:
            for i in range(200):  # 200 x 110 bytes: over the 16 KiB default, in small reads
                c.send(b"X-H%03d: " % i + b"a" * 100 + b"\r\n")
                time.sleep(0.001)
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert c.response().status == 431
        assert c.is_closed()
    assert upstream.raw == b""


# --- edge policies (issue 14): what the upstream sees ---------------------------------

H2C = b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n"


def test_h2c_upgrade_is_stripped_and_served_as_http11(proxy, upstream):
    """h2c smuggling: a proxy that passes `Upgrade: h2c` with `Connection: upgrade` lets the
    client switch the upstream connection to HTTP/2 and send requests past the routing."""
    with proxy.client() as c:
        # the next request in the same write: the parser must read on after the dropped upgrade
        c.send(b"GET /h2 HTTP/1.1\r\n" + H + H2C + b"\r\n" + get("/next"))
        first, second = c.response(), c.response()
        assert first.status == 200 and first.body == b"path=/h2 body=0"
        assert second.status == 200 and second.body == b"path=/next body=0"
        assert first.header("upgrade") is None
    h2, nxt = upstream.wait_requests(2)
    assert h2.target == b"/h2" and nxt.target == b"/next"
    assert not h2.names() & {b"upgrade", b"http2-settings", b"connection"}, h2.headers
    assert b"h2c" not in upstream.raw.lower() and b"upgrade" not in upstream.raw.lower()


@pytest.mark.parametrize("headers", [
    pytest.param(b"Upgrade: h2c\r\n", id="no-connection-token"),
    pytest.param(b"Connection: upgrade\r\nUpgrade: H2C\r\n", id="upper-case"),
    pytest.param(b"Connection: keep-alive, Upgrade\r\nUpgrade: h2c\r\nHTTP2-Settings: AA\r\n", id="settings-unnamed"),
])
def test_h2c_never_forwarded_in_any_spelling(proxy, upstream, headers):
    with proxy.client() as c:
        r = c.request(b"GET /x HTTP/1.1\r\n" + H + headers + b"\r\n")
        assert r.status == 200
        assert c.request(get("/after")).status == 200, "the connection stays a plain HTTP/1.1 one"
    req = upstream.requests[0]
    assert not req.names() & {b"upgrade", b"http2-settings", b"connection"}, req.headers
    assert b"h2c" not in upstream.raw.lower()


def test_websocket_still_tunnels_when_h2c_is_offered_too(proxy, upstream):
    upstream.handler = websocket_echo
    with proxy.client() as c:
        c.send(b"GET /ws HTTP/1.1\r\n" + H + b"Connection: Upgrade\r\nUpgrade: h2c, websocket\r\n"
               b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + ws.KEY + b"\r\n\r\n")
        r = c.response()
        assert r.status == 101 and r.header("sec-websocket-accept") == ws.accept_key(ws.KEY)
        c.send(ws.client_frame(b"over the tunnel"))
        assert c.ws_frame() == (ws.OP_TEXT, b"over the tunnel")
    (req,) = upstream.requests
    assert req.header("upgrade") == b"websocket"
    assert (req.header("connection") or b"").lower() == b"upgrade"


def test_options_asterisk_keeps_its_form_and_goes_to_the_hosts_catch_all(make_proxy, upstream, loop_thread):
    """`OPTIONS *` asks about the server, not a resource: it is forwarded as `OPTIONS *`,
    to the route holding the Host's `/` prefix, never to an exact `url = "/"` route."""
    home = RecordingUpstream(loop_thread).start()
    try:
        proxy = make_proxy(routes=[
            {"name": "home", "host": "example.com", "url": "/", "upstreams": [home.address]},
            {"name": "site", "host": "example.com", "path": "/", "upstreams": [upstream.address]},
            {"host": "api.example.com", "path": "/v1", "upstreams": [home.address]},
        ])
        with proxy.client() as c:
            r = c.request(b"OPTIONS * HTTP/1.1\r\n" + H + b"\r\n")
            assert r.status == 200 and r.body == b"path=* body=0"
        with proxy.client() as c:
            r = c.request(b"OPTIONS * HTTP/1.1\r\nHost: api.example.com\r\n\r\n")
            assert r.status == 404, "a host without a catch-all route has nobody to ask"
        (req,) = upstream.requests
        assert req.method == b"OPTIONS" and req.target == b"*"
        assert upstream.raw.startswith(b"OPTIONS * HTTP/1.1\r\n")
        assert home.raw == b""
    finally:
        home.close()


@pytest.mark.parametrize("raw,why", [
    pytest.param(b"GET / HTTP/2.0\r\n" + H + b"\r\n", b"HTTP/2.0 is not supported", id="http2"),
    pytest.param(get("/a%00b"), b"%00", id="nul"),
    pytest.param(b"GET http://evil.com/secret HTTP/1.1\r\n" + H + b"\r\n",
                 b"names evil.com but Host names example.com", id="absolute-form-other-host"),
    pytest.param(b"GET http://example.com@evil.com/ HTTP/1.1\r\n" + H + b"\r\n",
                 b"absolute-form target with a malformed authority", id="absolute-form-userinfo"),
    pytest.param(post(b"Transfer-Encoding: chunked \r\n", CHUNKED_BODY), b"whitespace after the Transfer-Encoding",
                 id="te-whitespace"),
])
def test_refusals_say_why(proxy, upstream, raw, why):
    with proxy.client() as c:
        r = c.request(raw)
        assert r.status in (400, 505) and why in r.body, r.body
    assert upstream.raw == b""


@pytest.mark.parametrize("value", [b"\tchunked", b"  chunked", b"Chunked"])
def test_transfer_encoding_ows_before_the_value_is_fine_on_both_sides(proxy, upstream, value):
    """The one rule (message.transfer_coding): whitespace before the value is OWS and
    fine; after it, refused on both sides (see the next test)."""
    upstream.handler = fixed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding:" + value + b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    with proxy.client() as c:
        r = c.request(post(b"Transfer-Encoding:" + value + b"\r\n", CHUNKED_BODY))
        assert r.status == 200 and r.body == b"hello"
    (req,) = upstream.requests
    assert req.body == b"hello" and req.header("transfer-encoding") == b"chunked"


@pytest.mark.parametrize("value", [b"chunked ", b"chunked\t", b"chunked \t"])
def test_transfer_encoding_whitespace_after_the_value_is_refused_on_both_sides(proxy, upstream, value):
    """llhttp reads `chunked<TAB>` in a response as "not chunked" (body to the close) and
    refuses it in a request; summon refuses trailing whitespace on both sides alike."""
    with proxy.client() as c:
        assert c.request(post(b"Transfer-Encoding: " + value + b"\r\n", CHUNKED_BODY)).status == 400
    assert upstream.raw == b""
    upstream.handler = fixed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: " + value + b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    with proxy.client() as c:
        r = c.request(get("/resp"))
        assert r.status == 502 and b"hello" not in r.body
    wait_until(lambda: all(conn.closed for conn in upstream.conns), 3, "the upstream connection to be dropped")


def test_small_chunked_body_bad_after_good_chunks_forwards_nothing(proxy, upstream):
    """Good chunks first, bad framing later: the body was being buffered (it is small), so
    the 400 comes with nothing of the request on the upstream's side, not even the head."""
    with proxy.client() as warm:  # a pooled upstream connection, ready to take a head at once
        assert warm.request(get("/warm")).status == 200
    with proxy.client() as c:
        c.send(post(b"Transfer-Encoding: chunked\r\n") + b"5\r\nhello\r\n6\r\n world\r\n")
        time.sleep(0.1)  # the good part is read (and, before, would have been forwarded)
        c.send(b"3\r\nabcXX")
        assert c.response().status == 400
        assert c.is_closed()
    time.sleep(0.05)
    assert [r.target for r in upstream.requests] == [b"/warm"]
    assert b"POST" not in upstream.raw and b"hello" not in upstream.raw


def test_small_chunked_body_is_forwarded_whole(proxy, upstream):
    with proxy.client() as c:
        c.send(post(b"Transfer-Encoding: chunked\r\n") + b"5\r\nhello\r\n")
        time.sleep(0.1)
        assert upstream.raw == b"", "a small chunked body is read whole before a replica is taken"
        c.send(b"6\r\n world\r\n0\r\n\r\n")
        assert c.response().body == b"path=/upload body=11"
    assert upstream.requests[0].body == b"hello world"


def _large_chunked_started(make_proxy, upstream):  # type: ignore[no-untyped-def]
    proxy = make_proxy(request_buffer_bytes="1k")
    c = proxy.client()
    c.send(post(b"Transfer-Encoding: chunked\r\n") + b"1000\r\n" + b"a" * 4096 + b"\r\n")
    wait_until(lambda: upstream.conns and upstream.conns[0].raw.count(b"a") >= 4096, 3,
               "the large body to stream to the upstream")
    return c


def _assert_aborted_upstream(upstream) -> None:  # type: ignore[no-untyped-def]
    wait_until(lambda: upstream.conns[0].closed, 3, "the upstream connection to end")
    conn = upstream.conns[0]
    assert conn.reset, f"the upstream must see a reset, not an end it could take for a request's end ({conn.error})"
    assert upstream.requests == [], "the upstream took an aborted request for a complete one"
    assert b"0\r\n\r\n" not in conn.raw.partition(b"\r\n\r\n")[2], "the chunked terminator was sent"


def test_large_chunked_body_with_bad_framing_midway_reaches_upstream_as_aborted(make_proxy, upstream):
    c = _large_chunked_started(make_proxy, upstream)
    with c:
        c.send(b"5\r\nhelloXX")
        assert c.response().status == 400
        assert c.is_closed()
    _assert_aborted_upstream(upstream)


def test_large_chunked_body_client_gone_midway_reaches_upstream_as_aborted(make_proxy, upstream):
    c = _large_chunked_started(make_proxy, upstream)
    c.close()
    _assert_aborted_upstream(upstream)


def test_large_content_length_body_client_gone_midway_reaches_upstream_as_aborted(make_proxy, upstream):
    proxy = make_proxy(request_buffer_bytes="1k")
    c = proxy.client()
    c.send(post(b"Content-Length: 10000\r\n") + b"a" * 4096)
    wait_until(lambda: upstream.conns and upstream.conns[0].raw.count(b"a") >= 4096, 3, "the body to stream")
    c.close()
    _assert_aborted_upstream(upstream)
