"""Typed errors, each knowing the HTTP status it becomes.

The tree (one place turns any of these into a response: `proxy.http.responses`):

    SummonError
    ├── ClientError            the client misbehaved: 4xx, connection closed after
    │   ├── BadRequest             400  framing, syntax, smuggling attempts
    │   ├── NotFound               404  no route for host/path
    │   ├── MethodNotAllowed       405  CONNECT
    │   ├── PayloadTooLarge        413
    │   ├── HeadersTooLarge        431
    │   ├── RequestTimeout         408
    │   ├── NotImplementedEncoding 501  Transfer-Encoding other than chunked
    │   └── VersionNotSupported    505  HTTP/2.0, HTTP/0.9 ... in an HTTP/1.1 request line
    ├── UpstreamError          the instance misbehaved: 5xx
    │   ├── BadGateway             502  refused, reset, bad framing
    │   └── GatewayTimeout         504  no response head in time
    ├── Unavailable            503 + Retry-After: boot failed, queue full, cap reached
    ├── BackendError           503  a driver failed to start or stop an instance
    │   ├── ImageError             image missing, malformed, or a digest mismatch
    │   │   └── BuildSetupError        a build's recipe key or machine is wrong (CLI: exit 2)
    │   └── HostUnavailable        libvirtd / the hypervisor cannot be reached
    ├── DeployError            409  a deploy or rollback that cannot be done (admin API)
    │   └── UnknownVersion         404  the version is not in the image store
    └── ConfigError            not HTTP: `summon check` exit 2, one line per problem

Foreign exceptions (OSError, httptools.HttpParserError, libvirt.libvirtError) are
translated at the boundary where they are caught, with ``raise ... from exc``.
"""

from __future__ import annotations

from dataclasses import dataclass


class SummonError(Exception):
    status = 500
    reason = "Internal Server Error"

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail or self.reason)
        self.detail = detail or self.reason


class ClientError(SummonError):
    """The peer sent something we will not pass on. The connection is closed after."""

    status = 400
    reason = "Bad Request"


class BadRequest(ClientError):
    pass


class NotFound(ClientError):
    status = 404
    reason = "Not Found"


class MethodNotAllowed(ClientError):
    status = 405
    reason = "Method Not Allowed"


class PayloadTooLarge(ClientError):
    status = 413
    reason = "Payload Too Large"


class HeadersTooLarge(ClientError):
    status = 431
    reason = "Request Header Fields Too Large"


class RequestTimeout(ClientError):
    status = 408
    reason = "Request Timeout"


class NotImplementedEncoding(ClientError):
    status = 501
    reason = "Not Implemented"


class VersionNotSupported(ClientError):
    """A well-formed request line with a version we do not speak (RFC 9110 15.6.6): the
    client's fault, so it closes like any other client error, but 505, not 400."""

    status = 505
    reason = "HTTP Version Not Supported"


class UpstreamError(SummonError):
    status = 502
    reason = "Bad Gateway"


class BadGateway(UpstreamError):
    pass


class ClosedAtOnce(BadGateway):
    """The upstream accepted a connection and closed it before any request was sent. Behind
    a forwarder (QEMU's user networking) that is the guest's stack refusing: it is up."""


class GatewayTimeout(UpstreamError):
    status = 504
    reason = "Gateway Timeout"


class Unavailable(SummonError):
    """No instance can serve now; the client may try again after `retry_after_s`."""

    status = 503
    reason = "Service Unavailable"

    def __init__(self, detail: str = "", retry_after_s: int = 1) -> None:
        super().__init__(detail)
        self.retry_after_s = max(1, int(retry_after_s))


class BackendError(SummonError):
    """Starting or stopping an instance failed. Becomes 503 for waiting requests."""

    status = 503
    reason = "Service Unavailable"


class ImageError(BackendError):
    """The image is missing, malformed, or an artefact does not match its digest."""


class BuildSetupError(ImageError):
    """A build cannot start: a recipe key has a bad value (the message is ``file:line:
    ...``) or the machine lacks a package (the message names it). Not the build failing:
    the user must fix something first, so `summon images build` exits 2, not 1."""


class HostUnavailable(BackendError):
    """The host (libvirtd, the hypervisor) cannot be reached: fail fast, place elsewhere."""


class DeployError(SummonError):
    """`summon images deploy|rollback` asked for what cannot be done: no route follows the
    image, nothing to roll back to. Nothing changed."""

    status = 409
    reason = "Conflict"


class UnknownVersion(DeployError):
    """The version to deploy is not in the image store (build or pull it first)."""

    status = 404
    reason = "Not Found"


@dataclass(frozen=True)
class Problem:
    """One config problem, printed as ``file:line: message``."""

    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


class ConfigError(SummonError):
    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))
