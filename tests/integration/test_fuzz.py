"""Fuzzing the edge (issue #9): the request parser and validator, and the config loader.

Properties:
- `parse_head` (the validator behind llhttp): any head either becomes a `RequestHead`
  that keeps the edge rules, or raises a `ClientError`; nothing else escapes.
- The front, over real sockets: any byte string a client sends (grammar-built requests
  with smuggling variants, then mutated) gets well-formed answers or a close; every
  message that reaches the upstream parses strictly (h11) with exactly one Host and
  unambiguous framing; nothing is logged as an internal error; the proxy keeps serving.
- `config.load`: any document either loads or raises `ConfigError` (file:line lines).

Short runs are part of `make test`; `SUMMON_FUZZ=deep` (`make fuzz`) runs many more
examples. tests/fuzz_targets.py runs the same properties under atheris (coverage-guided).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import rtoml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from proxy.config import _LIMIT_KEYS, _PROXY_KEYS, _ROUTE_KEYS, ConfigError, load
from proxy.errors import ClientError
from proxy.http.message import parse_head
from tests.helpers.net import LoopThread, RecordingUpstream, UpRequest, get

DEEP = os.environ.get("SUMMON_FUZZ") == "deep"


def fuzz_settings(ci: int, deep: int) -> settings:
    return settings(max_examples=deep if DEEP else ci, deadline=None, derandomize=not DEEP,
                    suppress_health_check=list(HealthCheck))


# --- grammar of requests, with the variants smuggling corpora use ------------------------

METHODS = ["GET", "POST", "PUT", "HEAD", "OPTIONS", "DELETE", "CONNECT", "PATCH", "get", "G ET", "GET\x00", ""]
TARGETS = ["/", "/a/b?x=1", "/%2e%2e/", "/../etc", "http://example.com/x", "https://other/x", "*", "//x", "",
           "/\x7f", "/ /", "/a#frag", "example.com:80"]
VERSIONS = ["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/0.9", "http/1.1", "HTTP/1.1 ", "HTTP/1.10", ""]
NAMES = ["Host", "host", "HOST", "Content-Length", "content-length", "Transfer-Encoding", "Connection", "Expect",
         "Upgrade", "TE", "Trailer", "Keep-Alive", "Proxy-Connection", "X-Forwarded-For", "X_Forwarded_For",
         "Forwarded", "X-Client-Region", "Transfer-Encoding ", " Transfer-Encoding", "Content-Length\t", "X-A"]
VALUES = ["example.com", "example.com:8080", "", "chunked", "Chunked", " chunked", "chunked ", "gzip, chunked",
          "chunked, gzip", "chunked, chunked", "identity", "\x0bchunked", "0", "5", "10", "-1", "+5", "0x5", "1_0",
          "5, 5", "99999999999999999999", "close", "keep-alive", "Upgrade", "100-continue", "websocket",
          "h2c", "1.2.3.4", "a\x00b", "\xff"]
SEPARATORS = [": ", ":", " : ", ":\t", ": \t "]
EOLS = ["\r\n", "\r\n", "\r\n", "\n", "\r", "\r\n "]


@st.composite
def header_lines(draw: st.DrawFn) -> str:
    name = draw(st.sampled_from(NAMES) | st.text(st.characters(min_codepoint=1, max_codepoint=127), max_size=8))
    value = draw(st.sampled_from(VALUES) | st.text(st.characters(min_codepoint=1, max_codepoint=255), max_size=12))
    return name + draw(st.sampled_from(SEPARATORS)) + value + draw(st.sampled_from(EOLS))


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["none", "raw", "chunked"]))
    if kind == "none":
        return b""
    if kind == "raw":
        return draw(st.binary(max_size=40))
    out = b""
    for _ in range(draw(st.integers(0, 3))):
        data = draw(st.binary(max_size=12))
        size = draw(st.sampled_from([f"{len(data):x}", f"{len(data):x};ext=1", f"{len(data) + 1:x}",
                                     f" {len(data):x}", f"{len(data):X}", "ffffffffffffffffff"]))
        out += size.encode("latin-1") + b"\r\n" + data + b"\r\n"
    out += draw(st.sampled_from([b"0\r\n\r\n", b"0\r\nTrailer-X: 1\r\n\r\n", b"0\r\n", b"", b"0\n\n"]))
    return out


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    line = " ".join([draw(st.sampled_from(METHODS)), draw(st.sampled_from(TARGETS)), draw(st.sampled_from(VERSIONS))])
    heads = [draw(header_lines()) for _ in range(draw(st.integers(0, 6)))]
    if draw(st.booleans()):
        heads.insert(0, "Host: example.com\r\n")
    raw = (line + draw(st.sampled_from(EOLS)) + "".join(heads) + draw(st.sampled_from(["\r\n", "\n", ""])))
    return raw.encode("latin-1", "replace") + draw(bodies())


@st.composite
def client_bytes(draw: st.DrawFn) -> bytes:
    """One or two requests (pipelined), perhaps mutated; or plain random bytes."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(min_size=1, max_size=200))
    data = bytearray(draw(requests()))
    if draw(st.booleans()):
        data += draw(requests())
    for _ in range(draw(st.integers(0, 3))):
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["flip", "insert", "delete"]))
        if op == "flip":
            data[i] = draw(st.integers(0, 255))
        elif op == "insert":
            data[i:i] = draw(st.sampled_from([b"\r\n", b"\n", b" ", b"\x00", b":", b"0", b"\r\n\r\n"]))
        else:
            del data[i]
    return bytes(data) or b"\r\n"


# --- parse_head ----------------------------------------------------------------------------

TOKEN = set(b"!#$%&'*+-.^`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


@fuzz_settings(ci=800, deep=20_000)
@given(
    method=st.sampled_from(METHODS) | st.text(max_size=8),
    target=st.sampled_from([t.encode("latin-1") for t in TARGETS]) | st.binary(max_size=30),
    version=st.sampled_from(["1.1", "1.0", "2.0", "0.9"]),
    headers=st.lists(st.tuples(st.sampled_from([n.strip().encode() for n in NAMES]) | st.binary(max_size=8),
                               st.sampled_from([v.encode("latin-1") for v in VALUES]) | st.binary(max_size=12)),
                     max_size=8),
    keep_alive=st.booleans(),
)
def test_fuzz_parse_head_accepts_or_raises_a_client_error(method: str, target: bytes, version: str,
                                                          headers: list[tuple[bytes, bytes]], keep_alive: bool) -> None:
    try:
        head = parse_head(method, target, version, headers, keep_alive, 100)
    except ClientError:
        return
    names = [k.lower() for k, _ in head.headers]
    assert names.count(b"host") == 1
    assert all(k and set(k) <= TOKEN for k, _ in head.headers)
    assert not (head.chunked and head.content_length is not None)
    assert not (head.chunked and head.version == "1.0")
    assert head.content_length is None or head.content_length >= 0
    assert head.path.startswith("/")
    assert method != "CONNECT"
    if b"transfer-encoding" in names:
        assert head.chunked


# --- the front over sockets ---------------------------------------------------------------


class ErrorLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def exchange(port: int, data: bytes, timeout: float = 1.0) -> bytes:
    """Send `data`, half-close, and read until the proxy closes (or `timeout`)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        out = b""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        return out


def check_forwarded(req: UpRequest) -> None:
    names = [k.lower() for k, _ in req.headers]
    assert names.count(b"host") == 1, req
    te = req.header_all("transfer-encoding")
    assert not (te and req.header("content-length") is not None), req
    assert all(v.lower() == b"chunked" for v in te), req
    assert len(req.header_all("content-length")) <= 1, req
    assert all(k and set(k) <= TOKEN for k, _ in req.headers), req
    assert b"proxy-connection" not in names and b"keep-alive" not in names and b"te" not in names, req


@pytest.mark.timeout(600 if DEEP else 120)
def test_fuzz_front_never_forwards_a_malformed_message(make_proxy: Any, upstream: RecordingUpstream,
                                                       loop_thread: LoopThread) -> None:
    proxy = make_proxy(keepalive_timeout="50ms", header_timeout="500ms", body_timeout="500ms")
    errors = ErrorLog()
    watched = [logging.getLogger("summon"), logging.getLogger("asyncio")]
    for lg in watched:
        lg.addHandler(errors)
    try:
        @fuzz_settings(ci=150, deep=5_000)
        @given(data=client_bytes())
        def one(data: bytes) -> None:
            before = len(upstream.conns)
            out = exchange(proxy.port, data)
            if out:
                assert out.startswith(b"HTTP/1.1 ") and out[9:12].isdigit(), out[:80]
                assert b"\r\n\r\n" in out, out[:200]
            for conn in list(upstream.conns)[before:]:
                assert conn.error is None, (conn.error, bytes(conn.raw)[:300], data)
                for req in conn.requests:
                    check_forwarded(req)
            assert not errors.records, [r.getMessage() for r in errors.records]

        one()
        # still alive, still correct
        with proxy.client() as c:
            assert c.request(get("/after")).status == 200
    finally:
        for lg in watched:
            lg.removeHandler(errors)


# --- the config loader ------------------------------------------------------------------------

SCALARS = (st.integers(-5, 100_000) | st.booleans() | st.floats(allow_nan=True, allow_infinity=True)
           | st.sampled_from(["30s", "500ms", "5m", "1h", "16k", "64MiB", "127.0.0.1:0", "[::1]:0", "*", "/",
                              "/a", "a", "", "header:X-User", "cookie:s", "client", "path", "process", "fake",
                              "10.0.0.0/8", "nope/33", "-1s", "1e3s", " 5 s "])
           | st.text(max_size=10))
VALUES_ANY = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=5), inner, max_size=3), max_leaves=6)


def keyed(keys: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(st.sampled_from(keys) | st.text(max_size=6), VALUES_ANY, max_size=6)


DOCUMENTS = st.fixed_dictionaries({}, optional={
    "proxy": keyed([*_PROXY_KEYS]),
    "limits": keyed([*_LIMIT_KEYS]),
    "route": st.lists(keyed([*_ROUTE_KEYS]), max_size=3) | VALUES_ANY,
    "host": st.lists(keyed(["name", "region", "backend", "slots", "uri", "arch", "kvm_probe"]), max_size=2),
    "region": st.lists(keyed(["name", "nearest", "cidrs"]), max_size=2),
    "images": keyed(["dir"]),
    "events": keyed(["path", "retention", "max_rows"]),
    "include": st.lists(st.sampled_from(["routes/*.toml", "missing.toml", "r.toml", "", "*", "[", "sub/**"])
                        | st.text(max_size=8), max_size=2),
})


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cfg")
    (d / "routes").mkdir()
    (d / "routes" / "a.toml").write_text('[[route]]\npath = "/inc"\nupstreams = ["127.0.0.1:9"]\n')
    (d / "r.toml").write_text("[proxy]\nlisten = 1\n")
    return d


def load_or_config_error(path: Path) -> None:
    try:
        load(path)
    except ConfigError as exc:
        assert exc.problems
        for p in exc.problems:
            assert isinstance(p.line, int) and p.line >= 1 and p.message, p


@fuzz_settings(ci=250, deep=5_000)
@given(doc=DOCUMENTS)
def test_fuzz_config_loads_or_raises_config_error(config_dir: Path, doc: dict[str, Any]) -> None:
    try:
        text = rtoml.dumps(doc)
    except Exception:  # noqa: BLE001 - a document TOML cannot express
        assume(False)
        return
    path = config_dir / "summon.toml"
    path.write_text(text)
    load_or_config_error(path)


@fuzz_settings(ci=300, deep=10_000)
@given(text=st.text(max_size=300) | st.sampled_from(["[proxy]\n", "[[route]]\n", "x = ", "a.b.c = 1\n"]).flatmap(
    lambda prefix: st.text(max_size=100).map(lambda t: prefix + t)))
def test_fuzz_config_text_loads_or_raises_config_error(config_dir: Path, text: str) -> None:
    path = config_dir / "raw.toml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    load_or_config_error(path)


# Found by the fuzzers above; each once broke "loads or raises ConfigError" (proxy/config.py).

CONFIG_CRASHES = {
    "nul_in_include": 'include = ["a\\u0000b"]\n',  # ValueError: embedded null byte (Path.read_text)
    "absolute_glob_include": 'include = ["/etc/*.toml"]\n',  # NotImplementedError from Path.glob
    "huge_duration": "[proxy]\nheader_timeout = 1" + "0" * 400 + "\n",  # OverflowError: float(int)
}


@pytest.mark.parametrize("name", sorted(CONFIG_CRASHES))
def test_config_loader_crashes_found_by_fuzzing(tmp_path: Path, name: str) -> None:
    path = tmp_path / "summon.toml"
    path.write_text(CONFIG_CRASHES[name])
    load_or_config_error(path)


@pytest.mark.parametrize("value", ["inf", "nan"])
def test_config_rejects_non_finite_durations(tmp_path: Path, value: str) -> None:
    path = tmp_path / "summon.toml"
    path.write_text(f"[proxy]\nheader_timeout = {value}\n")
    with pytest.raises(ConfigError):
        load(path)
