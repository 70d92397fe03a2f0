"""The one place where errors become HTTP responses."""

from __future__ import annotations

from ..errors import SummonError, Unavailable

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def continue_response() -> bytes:
    return _CONTINUE


def error_response(exc: SummonError, server: bytes = b"summon", close: bool = True, http10: bool = False) -> bytes:
    """A short text/plain response for a typed error.

    Client errors always close: after a framing problem we cannot know where the next
    request would start. 503s carry Retry-After so well-behaved clients back off. An
    HTTP/1.0 client keeps its connection only when told so (RFC 9112 9.3).
    """
    body = f"{exc.status} {exc.reason}: {exc.detail}\n".encode("utf-8", "replace")
    lines = [
        f"HTTP/1.1 {exc.status} {exc.reason}\r\n".encode(),
        b"Server: " + server + b"\r\n",
        b"Content-Type: text/plain; charset=utf-8\r\n",
        b"Content-Length: " + str(len(body)).encode() + b"\r\n",
        b"Cache-Control: no-store\r\n",
    ]
    if isinstance(exc, Unavailable):
        lines.append(b"Retry-After: " + str(exc.retry_after_s).encode() + b"\r\n")
    if close:
        lines.append(b"Connection: close\r\n")
    elif http10:
        lines.append(b"Connection: keep-alive\r\n")
    lines.append(b"\r\n")
    return b"".join(lines) + body


def decision_refused(exc: SummonError, sent_as: int | None = None) -> bytes:
    """The decision endpoint's answer when the client must not be forwarded (proxy.plugin):
    the status the client must get, in `X-Summon-Status` (and Retry-After for a 503), sent
    as `sent_as` when the host proxy passes only some statuses through (nginx's
    `auth_request` turns anything but 2xx, 401 and 403 into a 500), else as itself. The
    connection stays open: the host proxy's framing is trusted, the client's is not ours."""
    status = sent_as or exc.status
    body = f"{exc.status} {exc.reason}: {exc.detail}\n".encode("utf-8", "replace")
    lines = [
        f"HTTP/1.1 {status} {'Refused' if sent_as else exc.reason}\r\n".encode(),
        b"X-Summon-Status: " + str(exc.status).encode() + b"\r\n",
        b"Content-Type: text/plain; charset=utf-8\r\n",
        b"Content-Length: " + str(len(body)).encode() + b"\r\n",
        b"Cache-Control: no-store\r\n",
    ]
    if isinstance(exc, Unavailable):
        lines.append(b"Retry-After: " + str(exc.retry_after_s).encode() + b"\r\n")
    lines.append(b"\r\n")
    return b"".join(lines) + body
