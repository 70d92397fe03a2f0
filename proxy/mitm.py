"""summon as a mitmproxy addon: the same route table and engine, behind mitmproxy.

    mitmdump --mode reverse:http://127.0.0.1:1 -s proxy/mitm.py --set summon_config=summon.toml

How this works: the addon is thin on purpose (all logic lives in the shared
engine). `configure` loads summon's config (a bad file is an `OptionsError`, so mitmdump
refuses to start) and makes mitmproxy keep the client's Host header and connect lazily,
since the reverse-mode target is only a placeholder that is never dialled. `running`
builds what the native front builds: the event log, one driver per host, the
`Summoner` (the engine's asyncio shell) and a `Dispatcher` over the `RouteTable`.

Per flow, the `request` hook turns the request into a `RequestHead` (the same
validation as the native front), looks its route up (404 when none), and asks the
route's pool for a lease: a static pool or a warm summoned pool answers at once; a cold
one answers with a future that the hook awaits while the instance boots, without
blocking other flows. It then points the flow at the lease's address (scheme, host,
port; the Host header stays as the client sent it), forwards the normalised path that
was routed on, and rewrites the other header fields as the native front does. Boot failure, a full boot queue or the instance cap become 503 with
Retry-After. The lease is released exactly once: in `response`, `error`, or
`websocket_end` for an upgraded flow. A client that hangs up while its instance boots
leaves the boot queue (`client_disconnected`). `done` stops every instance.

Leases are kept in a dict keyed by flow id, not in `flow.metadata`: metadata is
serialised when flows are saved (`-w`), a lease is not. `flow.metadata["summon"]`
carries what is useful to see: the route and the instance's address.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Any

# mitmproxy's script loader puts this file's directory first on sys.path, where our
# modules (`events`, `config`, the `http` package...) would shadow top-level ones; the
# package is imported by its absolute name instead (pip install -e . in that venv).
_HERE = os.path.dirname(os.path.abspath(__file__))
if __name__ != "proxy.mitm":
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
    try:
        import proxy as _proxy  # noqa: F401
    except ImportError:  # a checkout that is not installed: import it from its root
        sys.path.append(os.path.dirname(_HERE))

from mitmproxy import ctx, exceptions, http  # noqa: E402

from proxy.config import Config, Route  # noqa: E402
from proxy.config import load as load_config  # not `load`: module names are mitmproxy hooks  # noqa: E402
from proxy.errors import (  # noqa: E402
    BadRequest,
    ClientError,
    ConfigError,
    NotFound,
    SummonError,
    Unavailable,
)
from proxy.http.message import RequestHead, client_trusted, outbound_head, parse_head  # noqa: E402
from proxy.http.responses import error_parts  # noqa: E402
from proxy.observe.events import Event, EventLog  # noqa: E402
from proxy.routing.contracts import Lease, Pool  # noqa: E402
from proxy.routing.dispatch import Dispatcher, StaticPool  # noqa: E402
from proxy.routing.table import RouteTable  # noqa: E402
from proxy.runtime.bootstrap import make_backends, start_summoner  # noqa: E402
from proxy.runtime.summoner import Summoner  # noqa: E402

log = logging.getLogger("summon.mitm")

# Framing that mitmproxy has already read and re-frames itself; what is left of the head
# is validated exactly as the native front does (underscores in names, Host, path).
_FRAMING = frozenset({b"host", b"content-length", b"transfer-encoding", b"expect"})


def request_head(req: http.Request, max_header_count: int) -> RequestHead:
    """The engine's view of a mitmproxy request; raises a `ClientError` like the front.

    The Host comes from `host_header` (the Host field, or :authority for HTTP/2)."""
    host = req.host_header
    if not host:
        raise BadRequest("missing Host header")
    headers = [(b"host", host.encode("utf-8", "surrogateescape"))]
    headers.extend((k, v) for k, v in req.headers.fields if k.lower() not in _FRAMING)
    return parse_head(req.method, req.data.path, "1.1", headers, keep_alive=True,
                      max_header_count=max_header_count)


def upstream_fields(req: http.Request, head: RequestHead, client_ip: str, trusted: bool,
                    via: bytes) -> list[tuple[bytes, bytes]]:
    """The header fields to send upstream: the native front's rewrite (`outbound_head`:
    hop-by-hop fields dropped, X-Forwarded-*, Forwarded and Via set, inbound forwarding
    fields kept only from trusted proxies), with the client's own Host field (absent for
    HTTP/2, where :authority stands in) and body framing, which mitmproxy does itself."""
    rewritten = []
    for line in outbound_head(head, client_ip, trusted, via).split(b"\r\n")[1:]:  # [0]: request line
        name, _, value = line.partition(b": ")
        if line and name.lower() != b"host":
            rewritten.append((name, value))
    own = req.headers.fields
    return ([f for f in own if f[0].lower() == b"host"] + rewritten
            + [f for f in own if f[0].lower() in (b"content-length", b"transfer-encoding")])


def error_response(exc: SummonError, server: str = "summon", http2: bool = False) -> http.Response:
    """The native front's error answer (`proxy.http.responses`), as a mitmproxy Response."""
    body, headers = error_parts(exc, server.encode())
    if isinstance(exc, ClientError) and not isinstance(exc, NotFound) and not http2:
        headers.append((b"Connection", b"close"))  # as the front: after a client error, close
    return http.Response.make(exc.status, body, headers)


class Summon:
    """The addon; `addons = [Summon()]` below is what `mitmdump -s` picks up."""

    def __init__(self) -> None:
        self.config: Config | None = None
        self.events: EventLog | None = None
        self.summoner: Summoner | None = None
        self.dispatcher: Dispatcher | None = None
        self.leases: dict[str, Lease] = {}  # flow id -> lease, released exactly once
        self.waiting: dict[str, set[asyncio.Future[Lease]]] = {}  # client id -> futures
        self._starting: asyncio.Task[None] | None = None

    # --- options ----------------------------------------------------------------------

    def load(self, loader: Any) -> None:
        loader.add_option(
            "summon_config", str, "",
            "summon's TOML config (routes, hosts, images, limits, events). Empty: the addon is off.",
        )
        loader.add_option(
            "summon_events", str, "",
            "Event log (SQLite) to write instead of the config's [events] path, e.g. to run "
            "next to a native `summon serve` with the same config.",
        )

    def configure(self, updated: set[str]) -> None:
        opts = ctx.options
        if updated & {"summon_config", "summon_events"}:
            if self.dispatcher is not None:
                raise exceptions.OptionsError("summon_config and summon_events cannot change while running: "
                                              "restart mitmproxy")
            self.config = None
            if opts.summon_config:
                try:
                    config = load_config(opts.summon_config)
                except ConfigError as exc:
                    raise exceptions.OptionsError("summon_config: " + "; ".join(str(p) for p in exc.problems)) from exc
                except OSError as exc:
                    raise exceptions.OptionsError(f"summon_config: cannot read {opts.summon_config}: {exc}") from exc
                if opts.summon_events:
                    config = dataclasses.replace(config, events_path=Path(opts.summon_events))
                self.config = config
        if self.config is not None:
            # Reverse mode would replace Host by the placeholder before any hook runs, and
            # the default "eager" strategy dials the placeholder for every client.
            # (Both options belong to mitmproxy's proxyserver addon: absent in bare test contexts.)
            if getattr(opts, "keep_host_header", True) is False:
                log.info("summon: setting keep_host_header=true (routing is by the client's Host)")
                opts.keep_host_header = True
            if getattr(opts, "connection_strategy", "lazy") != "lazy":
                log.info("summon: setting connection_strategy=lazy (the upstream is chosen per request)")
                opts.connection_strategy = "lazy"

    # --- lifecycle --------------------------------------------------------------------

    async def running(self) -> None:
        await self._ensure_started()

    async def _ensure_started(self) -> None:
        if self.dispatcher is not None or self.config is None:
            return
        if self._starting is None:
            self._starting = asyncio.get_running_loop().create_task(self._start(self.config))
        await asyncio.shield(self._starting)

    async def _start(self, config: Config) -> None:
        events = EventLog(config.events_path, config.events_retention_s, config.events_max_rows)
        summoner: Summoner | None = None
        if any(r.summoned for r in config.routes):
            summoner = await start_summoner(config, events, make_backends(config))
            summoner.trials_enabled = False  # mitmproxy forwards the flow once: it cannot be a booting instance's trial

        def pool_for(route: Route) -> Pool:
            if route.upstreams:
                return StaticPool(route)
            assert summoner is not None  # a summoned route implies a summoner
            return summoner.pool(route)

        self.events, self.summoner = events, summoner
        self.dispatcher = Dispatcher(RouteTable(config.routes), pool_for)
        log.info("summon: %d routes from %s", len(config.routes), config.path)

    async def done(self) -> None:
        """mitmproxy is shutting down: fail the waiting flows, stop every instance."""
        if self._starting is not None and not self._starting.done():
            await asyncio.gather(self._starting, return_exceptions=True)
        for lease in self.leases.values():
            lease.release(False)  # flows still in flight end with mitmproxy
        self.leases.clear()
        if self.summoner is not None:
            await self.summoner.close()
        if self.events is not None:
            self.events.record(Event(kind="shutdown", detail={"front": "mitmproxy"}))
            self.events.close()
        self.summoner = self.events = self.dispatcher = None

    # --- per flow ---------------------------------------------------------------------

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        # A streamed request body goes upstream before `request` runs: route it now.
        if flow.request.stream:
            await self._route(flow)
            if flow.response is not None:
                flow.request.stream = False  # mitmproxy cannot stream and answer at once

    async def request(self, flow: http.HTTPFlow) -> None:
        await self._route(flow)

    async def _route(self, flow: http.HTTPFlow) -> None:
        if self.config is None or flow.response is not None or "summon" in flow.metadata:
            return
        await self._ensure_started()
        dispatcher, config = self.dispatcher, self.config
        if dispatcher is None:
            return
        flow.metadata["summon"] = {}
        req = flow.request
        client_ip = flow.client_conn.peername[0] if flow.client_conn.peername else ""
        try:
            head = request_head(req, config.proxy.max_header_count)
            route = dispatcher.lookup(head)
            flow.metadata["summon"]["route"] = route.name
            got = dispatcher.acquire(route, head, client_ip, self._region(head, client_ip))
            lease = got if not isinstance(got, asyncio.Future) else await self._wait(flow, got)
        except SummonError as exc:
            flow.metadata["summon"]["error"] = exc.status
            flow.response = error_response(exc, config.proxy.server_name, req.is_http2 or req.is_http3)
            return
        self.leases[flow.id] = lease
        trusted = client_trusted(client_ip, config.proxy.trusted_proxies)
        req.headers = http.Headers(upstream_fields(req, head, client_ip, trusted, config.proxy.server_name.encode()))
        addr = lease.address
        flow.metadata["summon"]["instance"] = str(addr)
        # Through .data: the Request.host/port setters would also rewrite the Host header.
        req.scheme = "http"
        req.data.host = addr.host
        req.data.port = addr.port
        target = head.path.encode() + head.query
        if req.data.path != b"*" and req.data.path != target:
            req.data.path = target  # forward what we routed on (see proxy.routing.table)
        if not (req.is_http2 or req.is_http3):
            req.data.authority = b""  # origin-form upstream, as the native front sends

    def _region(self, head: RequestHead, client_ip: str) -> str | None:
        assert self.config is not None
        if client_trusted(client_ip, self.config.proxy.trusted_proxies):
            value = head.header(b"x-client-region")
            if value:
                return value.decode("ascii", "replace").strip()
        return None

    async def _wait(self, flow: http.HTTPFlow, fut: asyncio.Future[Lease]) -> Lease:
        """Await a lease while the instance boots; `client_disconnected` may cancel it."""
        cid = flow.client_conn.id
        self.waiting.setdefault(cid, set()).add(fut)
        try:
            return await fut
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # mitmproxy itself is cancelling the hook
            raise Unavailable("the client went away while its instance was summoned") from None
        finally:
            futs = self.waiting.get(cid)
            if futs is not None:
                futs.discard(fut)
                if not futs:
                    del self.waiting[cid]

    def client_disconnected(self, client: Any) -> None:
        # Cancelling the future takes the request out of the engine's boot queue.
        for fut in self.waiting.pop(client.id, ()):
            fut.cancel()

    def response(self, flow: http.HTTPFlow) -> None:
        if flow.websocket is not None:
            return  # an upgraded connection still uses the instance: see websocket_end
        self._release(flow, True)

    def error(self, flow: http.HTTPFlow) -> None:
        self._release(flow, False)

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        self._release(flow, True)

    def _release(self, flow: http.HTTPFlow, ok: bool) -> None:
        lease = self.leases.pop(flow.id, None)
        if lease is not None:
            lease.release(ok)


addons = [Summon()]
