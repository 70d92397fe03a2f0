"""Request heads: validation against the edge rules, and the outbound rewrite.

How this works: the parser (httptools/llhttp, strict by default) already rejects bare
LF, obs-fold, whitespace before a colon, CL+TE, duplicate or non-numeric
Content-Length and bad chunk framing. What llhttp lets through and an edge proxy must
not, we check here on the complete head: `_` in names, HTTP/1.0 with
Transfer-Encoding, any coding but `chunked`, missing or repeated Host, absolute-form
targets that disagree with Host.

The inbound `RequestHead` is never mutated; `outbound_head()` builds new bytes.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from ..errors import BadRequest, HeadersTooLarge, MethodNotAllowed, NotImplementedEncoding
from ..routes import host_without_port, normalise_path

# RFC 9110 7.6.1: Connection, and the fields it names, are for one hop only; so are
# Keep-Alive, TE, Transfer-Encoding (we re-frame), Upgrade (unless tunnelling) and
# the non-standard Proxy-Connection. Trailer describes a framing we do not forward.
HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"te", b"transfer-encoding", b"upgrade", b"proxy-connection", b"trailer"}
)
# Headers we (re)write ourselves, dropped from the inbound set when the client is not trusted.
FORWARDING = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded", b"x-client-region"})
_TOKEN = frozenset(b"!#$%&'*+-.^`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


@dataclass(frozen=True)
class RequestHead:
    method: str
    target: bytes  # raw request-target as received
    path: str  # normalised path, routed on and forwarded
    query: bytes  # b"" or b"?..."
    version: str  # "1.0" or "1.1"
    headers: tuple[tuple[bytes, bytes], ...]  # as received, names in original case
    host: str  # lower-case, no port
    host_header: bytes
    chunked: bool
    content_length: int | None
    keep_alive: bool
    expect_continue: bool
    upgrade: bytes | None  # the Upgrade value when the client asks to switch protocols

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)

    @property
    def idempotent(self) -> bool:
        return self.method in IDEMPOTENT

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None


def parse_head(
    method: str,
    target: bytes,
    version: str,
    headers: list[tuple[bytes, bytes]],
    keep_alive: bool,
    max_header_count: int,
) -> RequestHead:
    """Validate a complete request head; raise a `ClientError` subclass on any violation."""
    if len(headers) > max_header_count:
        raise HeadersTooLarge(f"more than {max_header_count} header fields")
    if method == "CONNECT":
        raise MethodNotAllowed("CONNECT is not supported by a reverse proxy")
    host_values: list[bytes] = []
    te_values: list[bytes] = []
    cl_values: list[bytes] = []
    connection_tokens: set[bytes] = set()
    expect = False
    upgrade_value: bytes | None = None
    for name, value in headers:
        if not name or not _TOKEN.issuperset(name):
            # llhttp allows "_" in names; nginx and Envoy refuse them because backends
            # (CGI, WSGI) fold "_" and "-" together: X_Forwarded_For would pass for X-Forwarded-For.
            raise BadRequest("invalid character in header name")
        lname = name.lower()
        if lname == b"host":
            host_values.append(value)
        elif lname == b"transfer-encoding":
            te_values.append(value)
        elif lname == b"content-length":
            cl_values.append(value)
        elif lname == b"connection":
            connection_tokens.update(t.strip().lower() for t in value.split(b","))
        elif lname == b"expect":
            if value.strip().lower() != b"100-continue":
                raise BadRequest("unsupported Expect")  # RFC 9110 10.1.1 allows 417; 400 is as clear
            expect = True
        elif lname == b"upgrade":
            upgrade_value = value
    if len(host_values) != 1:
        raise BadRequest("missing Host header" if not host_values else "duplicate Host header")
    chunked = False
    if te_values:
        if version == "1.0":
            raise BadRequest("Transfer-Encoding in an HTTP/1.0 request")  # RFC 9112 6.1
        if len(te_values) > 1:
            raise BadRequest("repeated Transfer-Encoding")
        if cl_values:
            raise BadRequest("both Content-Length and Transfer-Encoding")  # RFC 9112 6.3 (3)
        if te_values[0].strip().lower() != b"chunked":
            raise NotImplementedEncoding("only Transfer-Encoding: chunked is supported")
        chunked = True
    content_length: int | None = None
    if cl_values:
        if len(cl_values) > 1:
            raise BadRequest("repeated Content-Length")
        raw = cl_values[0].strip()
        if not raw.isdigit() or len(raw) > 18:
            raise BadRequest("invalid Content-Length")
        content_length = int(raw)

    host_header = host_values[0].strip()
    host = host_without_port(host_header)
    raw_path, sep, query = target.partition(b"?")
    if not raw_path.startswith(b"/"):
        if raw_path.startswith((b"http://", b"https://")):
            # absolute-form (RFC 9112 3.2.2): accept only when it agrees with Host,
            # so the two can never route to different places.
            rest = raw_path.split(b"://", 1)[1]
            authority, slash, tail = rest.partition(b"/")
            if host_without_port(authority) != host:
                raise BadRequest("absolute-form target disagrees with Host")
            raw_path = b"/" + tail
        elif raw_path == b"*" and method == "OPTIONS":
            raw_path = b"/"
        else:
            raise BadRequest("invalid request target")
    if b"#" in target:
        raise BadRequest("fragment in request target")
    path = normalise_path(raw_path)
    upgrade = upgrade_value if (upgrade_value and b"upgrade" in connection_tokens and version == "1.1") else None
    return RequestHead(
        method=method,
        target=target,
        path=path,
        query=(b"?" + query) if sep else b"",
        version=version,
        headers=tuple(headers),
        host=host,
        host_header=host_header,
        chunked=chunked,
        content_length=content_length,
        keep_alive=keep_alive,
        expect_continue=expect,
        upgrade=upgrade,
    )


def _connection_named(headers: tuple[tuple[bytes, bytes], ...]) -> frozenset[bytes]:
    named: set[bytes] = set()
    for k, v in headers:
        if k.lower() == b"connection":
            named.update(t.strip().lower() for t in v.split(b","))
    # "Connection: host" or "Connection: content-length" must not strip what routing
    # and framing depend on (a known way to desync proxies and backends).
    return frozenset(named - {b"host", b"content-length"})


def client_trusted(client_ip: str, trusted: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> bool:
    if not trusted or not client_ip:
        return False
    try:
        addr = ipaddress.ip_address(client_ip)
    except ValueError:
        return False
    return any(addr in net for net in trusted)


def outbound_head(req: RequestHead, client_ip: str, trusted: bool, via: bytes) -> bytes:
    """The request head sent upstream: hop-by-hop removed, forwarding headers set,
    framing re-declared (Content-Length or chunked, never the client's raw framing)."""
    drop = HOP_BY_HOP | _connection_named(req.headers) if any(k.lower() == b"connection" for k, _ in req.headers) else HOP_BY_HOP
    lines = [f"{req.method} {req.path}".encode() + req.query + b" HTTP/1.1\r\n"]
    xff: bytes | None = None
    fwd: bytes | None = None
    for k, v in req.headers:
        lk = k.lower()
        if lk in drop or lk == b"content-length" or lk == b"expect":
            continue
        if lk in FORWARDING:
            if not trusted:
                continue  # spoofed by an untrusted client: drop (RFC 7239 8.1)
            if lk == b"x-forwarded-for":
                xff = v if xff is None else xff + b", " + v
                continue
            if lk == b"forwarded":
                fwd = v if fwd is None else fwd + b", " + v
                continue
        lines.append(k + b": " + v + b"\r\n")
    ip = client_ip.encode()
    lines.append(b"X-Forwarded-For: " + (xff + b", " + ip if xff else ip) + b"\r\n")
    if not trusted or not req.header(b"x-forwarded-proto"):
        lines.append(b"X-Forwarded-Proto: http\r\n")
    if not trusted or not req.header(b"x-forwarded-host"):
        lines.append(b"X-Forwarded-Host: " + req.host_header + b"\r\n")
    node = b'"[' + ip + b']"' if b":" in ip else ip
    this_hop = b"for=" + node + b";proto=http;host=\"" + req.host_header.replace(b'"', b"") + b"\""
    lines.append(b"Forwarded: " + (fwd + b", " + this_hop if fwd else this_hop) + b"\r\n")
    lines.append(b"Via: " + (req.version.encode()) + b" " + via + b"\r\n")
    if req.upgrade is not None:
        lines.append(b"Connection: upgrade\r\nUpgrade: " + req.upgrade + b"\r\n")
    elif req.chunked:
        lines.append(b"Transfer-Encoding: chunked\r\n")
    elif req.content_length is not None:
        lines.append(b"Content-Length: " + str(req.content_length).encode() + b"\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


def response_head(
    status: int,
    reason: bytes,
    headers: list[tuple[bytes, bytes]],
    via: bytes,
    framing: bytes,
    keep_alive: bool,
    tunnel: bool = False,
    http10: bool = False,
) -> bytes:
    """The response head sent to the client. `framing` is the header line (with CRLF)
    that declares the body as we will send it, or b"" for bodiless responses."""
    drop = HOP_BY_HOP | _connection_named(tuple(headers))
    lines = [b"HTTP/1.1 " + str(status).encode() + b" " + reason + b"\r\n"]
    for k, v in headers:
        lk = k.lower()
        if lk == b"content-length" or (lk in drop and not (tunnel and lk == b"upgrade")):
            continue
        lines.append(k + b": " + v + b"\r\n")
    lines.append(b"Via: 1.1 " + via + b"\r\n")
    lines.append(framing)
    if tunnel:
        lines.append(b"Connection: upgrade\r\n")
    elif not keep_alive:
        lines.append(b"Connection: close\r\n")
    elif http10:
        lines.append(b"Connection: keep-alive\r\n")  # HTTP/1.0 persists only when told (RFC 9112 9.3)
    lines.append(b"\r\n")
    return b"".join(lines)
