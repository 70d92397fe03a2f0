"""What the connections of one worker share, and what an exchange needs of its client.

`ServerState` is built once per worker by `proxy.serve.server`; `Client` is the part of
`proxy.http.front.ClientConnection` that `proxy.http.exchange.Exchange` uses, written down
as a Protocol (as `proxy.http.upstream` does with `Sink`/`Writer`) so that the exchange
does not import the front that creates it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from ..config import ProxySettings
from ..errors import SummonError
from ..routing.contracts import Lease
from ..routing.dispatch import Dispatcher
from .message import RequestHead
from .upstream import UpstreamPool, Writer

if TYPE_CHECKING:
    from .exchange import Exchange
    from .front import ClientConnection

log = logging.getLogger("summon.front")


@dataclass(slots=True, eq=False)
class ResponseMemo:
    """The previous response head a connection sent, reused when the next one repeats it
    (see `Exchange.response_head`)."""

    key: tuple[int, bytes, bytes, bool, bool, bool, bool]  # what else goes into the bytes
    headers: list[tuple[bytes, bytes]]  # the upstream's header lines
    out: bytes  # the head as sent


class Client(Writer, Protocol):
    """One client connection, as its exchanges see it."""

    state: ServerState
    peer_ip: str
    trusted: bool  # a configured proxy: its X-Forwarded-For and X-Client-Region count
    write_paused: bool  # the client stopped reading: pause the upstream
    waiting: set[asyncio.Future[Lease]]  # leases still being summoned, cancelled on close
    last_response: ResponseMemo | None  # the previous response head, reused when repeated

    def region(self, head: RequestHead) -> str | None: ...

    def write(self, data: bytes) -> None: ...

    def send_error(self, ex: Exchange, exc: SummonError) -> None: ...

    def set_reading_for_body(self, on: bool) -> None: ...

    def start_soon(self, ex: Exchange) -> None:
        """Start `ex` once the read being parsed is done (a large chunked body that
        outgrew the request buffer)."""
        ...

    def start_tunnel(self, ex: Exchange) -> None: ...

    def exchange_finished(self, ex: Exchange) -> None: ...

    def abort(self) -> None: ...


@dataclass
class ServerState:
    """Everything the connections of one worker share."""

    config: ProxySettings
    loop: asyncio.AbstractEventLoop
    dispatcher: Dispatcher
    upstreams: UpstreamPool
    via: bytes = b"summon"
    observe: Callable[[Exchange], None] = field(default=lambda ex: None)  # once per finished request (metrics)
    connections: set[ClientConnection] = field(default_factory=set)
    inflight: int = 0
    draining: bool = False
    refused_connections: int = 0
    # For the overload watch (proxy.serve.server, proxy.engine.overload): when `probe_accept` is set, the
    # next connection accepted reports how long it sat in the backlog; `shed_budget`
    # requests on open connections are to be shed now. `shed_requests` counts every
    # request shed with a 503 (this and max_inflight).
    probe_accept: bool = False
    accept_waited_s: float = 0.0
    shed_budget: int = 0
    shed_requests: int = 0
    sweeper: asyncio.TimerHandle | None = None

    def start_sweeping(self, interval_s: float = 0.25) -> None:
        """Fire connection deadlines (header, body, keep-alive, upstream response)."""

        def sweep() -> None:
            now = self.loop.time()
            for conn in list(self.connections):
                try:
                    conn.check_deadlines(now)
                except Exception:
                    log.exception("deadline handling failed")
            self.sweeper = self.loop.call_later(interval_s, sweep)

        self.sweeper = self.loop.call_later(interval_s, sweep)

    def stop_sweeping(self) -> None:
        if self.sweeper is not None:
            self.sweeper.cancel()
            self.sweeper = None
