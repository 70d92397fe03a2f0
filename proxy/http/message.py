"""Request heads: validation against the edge rules, and the outbound rewrite.

How this works: the parser (httptools/llhttp, strict by default) already rejects bare
LF, obs-fold, whitespace before a colon, CL+TE, duplicate or non-numeric
Content-Length and bad chunk framing. What llhttp lets through and an edge proxy must
not, we check here on the complete head: `_` in names, HTTP/1.0 with
Transfer-Encoding, any coding but `chunked` (one rule for both directions:
`transfer_coding`), missing or repeated Host, absolute-form targets that disagree with
Host, `%00` anywhere in the target.

Upgrades: `Upgrade: h2c` is never honoured (RFC 9113 3.1 retired it, and a proxy that
passes it on lets a client tunnel HTTP/2 around the routing: "h2c smuggling"); the token
is dropped, and a request that asked only for h2c is forwarded as a plain request (its
Upgrade and HTTP2-Settings removed, no `Connection: upgrade`). Other upgrades (websocket)
are tunnelled.

`OPTIONS *` (asterisk-form, RFC 9112 3.2.4) keeps its target: it is forwarded as
`OPTIONS *` and routed on the path `*`, which no exact `url` or deeper prefix matches, so
it reaches the route that takes the Host's `/` (its catch-all; else the wildcard and
`*` hosts' catch-alls, as any path falls back).

The inbound `RequestHead` is never mutated; `outbound_head()` builds new bytes.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import NamedTuple

from ..errors import BadRequest, HeadersTooLarge, MethodNotAllowed, NotImplementedEncoding
from ..routing.table import host_without_port, normalise_path

# RFC 9110 7.6.1: Connection, and the fields it names, are for one hop only; so are
# Keep-Alive, TE, Transfer-Encoding (we re-frame), Upgrade (unless tunnelling) and
# the non-standard Proxy-Connection. Trailer describes a framing we do not forward.
# HTTP2-Settings belongs to an h2c upgrade, which we never pass on (RFC 9113 3.1).
HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"te", b"transfer-encoding", b"upgrade", b"proxy-connection", b"trailer",
     b"http2-settings"}
)
# Headers we (re)write ourselves, dropped from the inbound set when the client is not trusted.
FORWARDING = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded", b"x-client-region"})
_TOKEN = frozenset(b"!#$%&'*+-.^`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
SAFE = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})  # RFC 9110 9.2.1: may be sent twice without harm


class RequestHead(NamedTuple):
    """An immutable, validated request head (a NamedTuple: built once per request, so
    cheaper to create than a frozen dataclass; `_replace` makes a changed copy)."""

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
    # Derived by parse_head so the outbound rewrite need not lower-case names again:
    names: tuple[bytes, ...] = ()  # lower-cased header names, parallel to `headers`
    connection: frozenset[bytes] = frozenset()  # lower-cased tokens of Connection headers

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)

    @property
    def idempotent(self) -> bool:
        return self.method in IDEMPOTENT

    @property
    def safe(self) -> bool:
        return self.method in SAFE

    def header(self, name: bytes) -> bytes | None:
        names = self.names
        if names:
            for i, lk in enumerate(names):
                if lk == name:
                    return self.headers[i][1]
            return None
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None


# Names parse_head must look at; every other header is only lower-cased and kept.
_SPECIAL = frozenset({b"host", b"transfer-encoding", b"content-length", b"connection", b"expect", b"upgrade"})
# Memos of pure functions of a few request bytes that repeat a lot (the Host values of
# a site, its hot paths). Only successful results are stored; a full memo starts over.
_HOSTS: dict[bytes, str] = {}  # Host header value -> host_without_port()
_PATHS: dict[bytes, str] = {}  # raw path -> normalise_path()
_MEMO_MAX = 4096
_NO_TOKENS: frozenset[bytes] = frozenset()
_VALID_NAMES: set[bytes] = set()  # header names already checked against _TOKEN


def transfer_coding(value: bytes) -> str:
    """The one Transfer-Encoding rule, for requests and responses alike: "chunked" when
    the value is the token `chunked` (any case), "whitespace" when it is `chunked` with
    whitespace after it, "other" for anything else.

    Why refuse trailing whitespace when RFC 9110 5.5 allows OWS there: llhttp (which
    frames both sides) strips the OWS before a value but not after it, and treats what
    follows differently per side: `chunked<TAB>` is refused in a request but, in a
    response, read as "not chunked" (the body then runs to the close), while
    `chunked<SP>` is chunked on both. A value the two parsers may frame differently is a
    desync waiting to happen; no real client or server sends one, so both sides refuse
    it (400 from a client, 502 from an upstream)."""
    if len(value) == 7 and value.lower() == b"chunked":
        return "chunked"
    if value.rstrip(b" \t").lower() == b"chunked":
        return "whitespace"
    return "other"


def _memo(table: dict[bytes, str], key: bytes, compute: Callable[[bytes], str]) -> str:
    """`compute(key)`, remembered in a bounded table; what raises is never stored."""
    value = table.get(key)
    if value is None:
        value = compute(key)
        if len(table) >= _MEMO_MAX:
            table.clear()
        table[key] = value
    return value


def _host_of(host_header: bytes) -> str:
    return _memo(_HOSTS, host_header, host_without_port)


# A NUL that percent-decoding would produce: C backends cut strings at it.
_NUL = "%00 (an encoded NUL) in the request target"


def _checked_path(raw_path: bytes) -> str:
    if b"%00" in raw_path:
        raise BadRequest(_NUL)
    return normalise_path(raw_path)


def _path_of(raw_path: bytes) -> str:
    return _memo(_PATHS, raw_path, _checked_path)


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
    names: list[bytes] = []
    for name, value in headers:
        if name not in _VALID_NAMES:  # a set lookup instead of a per-character check
            if not name or not _TOKEN.issuperset(name):
                # llhttp allows "_" in names; nginx and Envoy refuse them because backends
                # (CGI, WSGI) fold "_" and "-" together: X_Forwarded_For would pass for X-Forwarded-For.
                raise BadRequest("invalid character in header name")
            if len(_VALID_NAMES) >= _MEMO_MAX:
                _VALID_NAMES.clear()
            _VALID_NAMES.add(name)
        lname = name.lower()
        names.append(lname)
        if lname not in _SPECIAL:
            continue
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
        coding = transfer_coding(te_values[0])
        if coding != "chunked":
            if coding == "whitespace":
                raise BadRequest("whitespace after the Transfer-Encoding value")
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
    host = _host_of(host_header)
    raw_path, sep, query = target.partition(b"?")
    if sep and b"%00" in query:
        raise BadRequest(_NUL)  # (in the path: `_checked_path`, remembered)
    if b"#" in target:
        raise BadRequest("fragment in request target")
    if raw_path.startswith(b"/"):
        path = _path_of(raw_path)
    elif raw_path.startswith((b"http://", b"https://")):
        path = _path_of(_absolute_form_path(raw_path, host))
    elif target == b"*" and method == "OPTIONS":
        path = "*"  # asterisk-form: kept, see the module docstring
    else:
        raise BadRequest("invalid request target")
    upgrade: bytes | None = None
    if upgrade_value and b"upgrade" in connection_tokens:
        # llhttp stops reading at the end of such a head and leaves any body unread (it is
        # the new protocol's); one we do not tunnel must have no body to lose track of.
        upgrade = _tunnelled(upgrade_value) if version == "1.1" else None
        if upgrade is None and (chunked or content_length):
            raise BadRequest("a request body with an Upgrade that summon does not perform")
    return RequestHead(
        method,
        target,
        path,
        (b"?" + query) if sep else b"",
        version,
        tuple(headers),
        host,
        host_header,
        chunked,
        content_length,
        keep_alive,
        expect,
        upgrade,
        tuple(names),
        frozenset(connection_tokens) if connection_tokens else _NO_TOKENS,
    )


def _tunnelled(value: bytes) -> bytes | None:
    """The Upgrade value we pass on: the client's list without h2c (the only protocol
    we refuse to tunnel), or None when nothing is left."""
    if b"h2c" not in value.lower():
        return value
    kept = [t.strip() for t in value.split(b",") if t.strip() and t.strip().lower().split(b"/")[0] != b"h2c"]
    return b", ".join(kept) if kept else None


def _absolute_form_path(raw_path: bytes, host: str) -> bytes:
    """The origin-form path of an absolute-form target (RFC 9112 3.2.2), accepted only
    when its authority is the Host: summon routes on Host, so the two may never name
    different places (the error says which two disagree)."""
    rest = raw_path.split(b"://", 1)[1]
    authority, _, tail = rest.partition(b"/")
    try:
        named = host_without_port(authority)
    except BadRequest as exc:
        raise BadRequest(f"absolute-form target with a malformed authority ({exc.detail}); "
                         "send the path alone, with the host in Host") from None
    if named != host:
        raise BadRequest(f"absolute-form target names {named} but Host names {host}: "
                         "summon routes on Host and refuses a request whose two hosts disagree")
    return b"/" + tail


def _connection_named(headers: tuple[tuple[bytes, bytes], ...]) -> frozenset[bytes]:
    named: set[bytes] = set()
    for k, v in headers:
        if k.lower() == b"connection":
            named.update(t.strip().lower() for t in v.split(b","))
    return _droppable(named)


def _droppable(named: set[bytes] | frozenset[bytes]) -> frozenset[bytes]:
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


# What outbound_head never copies from the client: hop-by-hop fields, the client's own
# framing and Expect (re-declared by us), and for untrusted clients the forwarding fields.
_SKIP_TRUSTED = HOP_BY_HOP | {b"content-length", b"expect"}
_SKIP_UNTRUSTED = _SKIP_TRUSTED | FORWARDING


_BLOCKS: dict[tuple[str, bytes, str, bytes], bytes] = {}  # see _forwarding_block


def _forwarding_block(client_ip: str, host_header: bytes, version: str, via: bytes) -> bytes:
    """The X-Forwarded-*, Forwarded and Via lines for an untrusted client: they depend on
    nothing else, and a keep-alive connection asks for the same ones every request."""
    key = (client_ip, host_header, version, via)
    block = _BLOCKS.get(key)
    if block is None:
        ip = client_ip.encode()
        node = b'"[' + ip + b']"' if b":" in ip else ip
        block = (b"X-Forwarded-For: " + ip + b"\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: " + host_header
                 + b"\r\nForwarded: for=" + node + b";proto=http;host=\"" + host_header.replace(b'"', b"")
                 + b"\"\r\nVia: " + version.encode() + b" " + via + b"\r\n")
        if len(_BLOCKS) >= _MEMO_MAX:
            _BLOCKS.clear()
        _BLOCKS[key] = block
    return block


def outbound_head(req: RequestHead, client_ip: str, trusted: bool, via: bytes) -> bytes:
    """The request head sent upstream: hop-by-hop removed, forwarding headers set,
    framing re-declared (Content-Length or chunked, never the client's raw framing)."""
    names = req.names if req.names or not req.headers else tuple(k.lower() for k, _ in req.headers)
    connection = req.connection if req.names or not req.headers else _connection_named(req.headers)
    skip = _SKIP_UNTRUSTED if not trusted else _SKIP_TRUSTED
    if connection:
        skip = skip | _droppable(connection)
    lines = [f"{req.method} {req.path}".encode() + req.query + b" HTTP/1.1\r\n"]
    xff: bytes | None = None
    fwd: bytes | None = None
    for (k, v), lk in zip(req.headers, names, strict=True):
        if lk in skip:
            continue
        if trusted and lk in FORWARDING:
            if lk == b"x-forwarded-for":
                xff = v if xff is None else xff + b", " + v
                continue
            if lk == b"forwarded":
                fwd = v if fwd is None else fwd + b", " + v
                continue
        lines.append(k + b": " + v + b"\r\n")
    if not trusted:
        lines.append(_forwarding_block(client_ip, req.host_header, req.version, via))
    else:
        _trusted_forwarding(lines, req, client_ip, xff, fwd, via)
    if req.upgrade is not None:
        lines.append(b"Connection: upgrade\r\nUpgrade: " + req.upgrade + b"\r\n")
    elif req.chunked:
        lines.append(b"Transfer-Encoding: chunked\r\n")
    elif req.content_length is not None:
        lines.append(b"Content-Length: %d\r\n" % req.content_length)
    lines.append(b"\r\n")
    return b"".join(lines)


def _trusted_forwarding(lines: list[bytes], req: RequestHead, client_ip: str, xff: bytes | None, fwd: bytes | None,
                        via: bytes) -> None:
    """Forwarding lines for a trusted proxy: its X-Forwarded-* and Forwarded extended."""
    ip = client_ip.encode()
    lines.append(b"X-Forwarded-For: " + (xff + b", " + ip if xff else ip) + b"\r\n")
    if not req.header(b"x-forwarded-proto"):
        lines.append(b"X-Forwarded-Proto: http\r\n")
    if not req.header(b"x-forwarded-host"):
        lines.append(b"X-Forwarded-Host: " + req.host_header + b"\r\n")
    node = b'"[' + ip + b']"' if b":" in ip else ip
    this_hop = b"for=" + node + b";proto=http;host=\"" + req.host_header.replace(b'"', b"") + b"\""
    lines.append(b"Forwarded: " + (fwd + b", " + this_hop if fwd else this_hop) + b"\r\n")
    lines.append(b"Via: " + (req.version.encode()) + b" " + via + b"\r\n")


def response_head(
    status: int,
    reason: bytes,
    headers: list[tuple[bytes, bytes]],
    via: bytes,
    framing: bytes,
    keep_alive: bool,
    tunnel: bool = False,
    http10: bool = False,
    copy_length: bool = False,
) -> bytes:
    """The response head sent to the client. `framing` is the header line (with CRLF)
    that declares the body as we will send it, or b"" for bodiless responses.
    `copy_length`: when `framing` is b"", declare the upstream's first Content-Length
    (stripped) instead (length-framed bodies, and HEAD/304 answers)."""
    lines = [b"HTTP/1.1 %d " % status + reason + b"\r\n"]
    length: bytes | None = None
    named: set[bytes] | None = None
    for k, v in headers:
        lk = k.lower()
        if lk == b"content-length":
            if length is None:
                length = v
            continue
        if lk in HOP_BY_HOP:
            if lk == b"connection":
                for t in v.split(b","):
                    t = t.strip().lower()
                    if t not in HOP_BY_HOP:  # "keep-alive", "close": already dropped
                        if named is None:
                            named = set()
                        named.add(t)
            if not (tunnel and lk == b"upgrade"):
                continue
        lines.append(k + b": " + v + b"\r\n")
    if named:
        # Other fields named by Connection are hop-by-hop too: drop them (a rare second pass).
        drop = _droppable(named)
        if drop:
            kept = [lines[0]]
            for k, v in headers:
                lk = k.lower()
                if lk == b"content-length" or (lk in HOP_BY_HOP and not (tunnel and lk == b"upgrade")) or lk in drop:
                    continue
                kept.append(k + b": " + v + b"\r\n")
            lines = kept
    lines.append(b"Via: 1.1 " + via + b"\r\n")
    if framing:
        lines.append(framing)
    elif copy_length and length is not None:
        lines.append(b"Content-Length: " + length.strip() + b"\r\n")
    if tunnel:
        lines.append(b"Connection: upgrade\r\n")
    elif not keep_alive:
        lines.append(b"Connection: close\r\n")
    elif http10:
        lines.append(b"Connection: keep-alive\r\n")  # HTTP/1.0 persists only when told (RFC 9112 9.3)
    lines.append(b"\r\n")
    return b"".join(lines)
