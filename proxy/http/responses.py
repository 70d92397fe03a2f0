"""The one place where errors become HTTP responses."""

from __future__ import annotations

from ..errors import SummonError, Unavailable

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def continue_response() -> bytes:
    return _CONTINUE


def error_parts(exc: SummonError, server: bytes = b"summon") -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """The body and headers of the answer to a typed error, without framing: the native
    front serialises them (`error_response`), the mitmproxy addon hands them to mitmproxy,
    the decision endpoint sends them on (`decision_refused`). 503s carry Retry-After so
    well-behaved clients back off."""
    body = f"{exc.status} {exc.reason}: {exc.detail}\n".encode("utf-8", "replace")
    headers = [(b"Server", server), (b"Content-Type", b"text/plain; charset=utf-8"), (b"Cache-Control", b"no-store")]
    if isinstance(exc, Unavailable):
        headers.append((b"Retry-After", str(exc.retry_after_s).encode()))
    return body, headers


def _serialise(status: int, reason: str, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
    lines = [f"HTTP/1.1 {status} {reason}\r\n".encode()]
    lines += [name + b": " + value + b"\r\n" for name, value in headers]
    lines.append(b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
    return b"".join(lines) + body


def error_response(exc: SummonError, server: bytes = b"summon", close: bool = True, http10: bool = False) -> bytes:
    """A short text/plain response for a typed error.

    Client errors always close: after a framing problem we cannot know where the next
    request would start. An HTTP/1.0 client keeps its connection only when told so
    (RFC 9112 9.3).
    """
    body, headers = error_parts(exc, server)
    if close:
        headers.append((b"Connection", b"close"))
    elif http10:
        headers.append((b"Connection", b"keep-alive"))
    return _serialise(exc.status, exc.reason, headers, body)


def decision_refused(exc: SummonError, sent_as: int | None = None) -> bytes:
    """The decision endpoint's answer when the client must not be forwarded (proxy.plugin):
    the status the client must get, in `X-Summon-Status` (and Retry-After for a 503), sent
    as `sent_as` when the host proxy passes only some statuses through (nginx's
    `auth_request` turns anything but 2xx, 401 and 403 into a 500), else as itself. The
    connection stays open: the host proxy's framing is trusted, the client's is not ours."""
    body, headers = error_parts(exc)
    headers = [(b"X-Summon-Status", str(exc.status).encode())] + [h for h in headers if h[0] != b"Server"]
    return _serialise(sent_as or exc.status, "Refused" if sent_as else exc.reason, headers, body)
