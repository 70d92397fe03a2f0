"""The asyncio shell: sockets, workers, signals, drain and reload.

How this works: `serve()` builds everything from one `Config`: the route table, the
dispatcher with a pool per route, the upstream connection pool, the listening sockets
(SO_REUSEPORT, so `workers = N` processes each accept on the same port), and the admin
server. SIGTERM/SIGINT drain (stop accepting, let in-flight requests finish up to
`drain_timeout`, stop instances); a second signal forces the exit. SIGHUP reloads.

Drain, step by step (`drain()`):
1. `state.draining`: every request still read is answered with `Connection: close`.
2. The listeners stop accepting. Connections the kernel had already completed (the
   listen backlog) are accepted one last time and answered `503 + Retry-After` before
   a byte of them is read, with a lingering close, so none of them is reset.
3. Idle keep-alive connections get a short grace (a request already on its way is
   answered, with `Connection: close`), then are closed.
4. In-flight requests, also those waiting for a boot, finish up to `drain_timeout`; a
   second SIGTERM/SIGINT cuts this short (a third exits at once).
5. Whatever is left is aborted; every instance summon started is stopped.

Overload (`OverloadWatch`): a timer every few milliseconds feeds `proxy.engine.overload.Shedder`
with its own lateness, how long the last accepted connection sat in the backlog,
whether the loop slept and how many requests are in flight. While it says summon's CPU is saturated, the listening sockets
stop listening (the kernel refuses new connections, at no cost to summon) and the front
sheds as many requests on open connections as it asks for; when it says the overload is
over, they listen again.

Reload (`reload()`): the file is read and validated off the event loop; if invalid, the
old config keeps serving and the problems are logged, recorded and returned; if valid,
the swap happens in one step on the loop: a request sees the old table or the new one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import functools
import gc
import logging
import math
import os
import resource
import shutil
import signal
import socket
import sqlite3
import struct
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import RedisError

from ..backends.base import Backend
from ..cluster.redis_store import RedisStore, connect, sync_client
from ..cluster.sqlite_store import SqliteStore
from ..cluster.store import Store
from ..config import Address, Config, Route, load
from ..engine.overload import TICK_S, Shedder
from ..errors import ConfigError, SummonError, Unavailable
from ..http.front import ClientConnection
from ..http.responses import error_response
from ..http.state import ServerState
from ..http.upstream import UpstreamPool
from ..observe.admin import AdminServer
from ..observe.events import Event, EventLog, EventReader, json_line
from ..observe.fleetlog import FleetLog, Shipper
from ..observe.metrics import Metrics
from ..plugin.decide import Decider
from ..plugin.endpoint import PluginEndpoint
from ..routing.contracts import Pool
from ..routing.dispatch import Dispatcher, StaticPool
from ..routing.table import RouteTable
from ..runtime.bootstrap import make_backends, start_summoner
from ..runtime.follower import Follower
from ..runtime.summoner import Summoner
from .notify import Notifier
from .preflight import events_error, listen_error
from .workers import PeerServer, ask, die_with_parent, merge_metrics, merge_status, metric_samples, socket_path

log = logging.getLogger("summon.server")
BACKLOG = 4096
FLEET_DB = "fleet.db"  # in the workers' private directory: the fleet they share


def listen_socket(addr: Address, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in addr.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((addr.host, addr.port))
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def bind_listeners(config: Config, reuse_port: bool) -> list[socket.socket]:
    """The `[proxy] listen` sockets; a failure is the `file:line: message` of `summon check`."""
    sockets: list[socket.socket] = []
    for addr in config.proxy.listen:
        try:
            sockets.append(listen_socket(addr, reuse_port))
        except OSError as exc:
            for sock in sockets:
                sock.close()
            raise listen_error(config, "listen", addr, exc) from exc
    return sockets


@dataclass
class Runtime:
    """What one worker runs; kept so that drain and reload can reach every part."""

    config: Config
    state: ServerState
    dispatcher: Dispatcher
    summoner: Summoner | None = None
    events: EventLog | None = None
    metrics: Metrics | None = None
    admin: AdminServer | None = None
    plugin: PluginEndpoint | None = None  # [plugin] listen: the decision endpoint (worker 0)
    servers: list[asyncio.AbstractServer] = field(default_factory=list)
    # A duplicate of each listening socket: after the servers stop accepting it keeps the
    # kernel's backlog alive, so drain can answer those connections instead of resetting them.
    listeners: list[socket.socket] = field(default_factory=list)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    forced: asyncio.Event = field(default_factory=asyncio.Event)  # second signal: stop waiting
    reload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    draining: bool = False
    shedder: Shedder | None = None  # set by OverloadWatch (real workers only)
    peer: PeerServer | None = None  # workers 1..N-1: answers worker 0's admin (proxy.serve.workers)
    shipper: Shipper | None = None  # [cluster], worker 0: the local log goes on to the fleet's stream
    fleet_log: FleetLog | None = None  # [cluster]: /events reads every node's events there
    follower: Follower | None = None  # [images] follow, worker 0: announced versions pulled here


def make_pool_factory(rt_ref: list[Runtime]) -> Callable[[Route], Pool]:
    def pool_for(route: Route) -> Pool:
        if route.upstreams:
            return StaticPool(route)
        summoner = rt_ref[0].summoner
        if summoner is None:
            raise RuntimeError("summoned route without a summoner")
        return summoner.pool(route)

    return pool_for


async def build_runtime(config: Config, sockets: list[socket.socket], admin: bool = True,
                        backends: dict[str, Backend] | None = None, store: Store | None = None) -> Runtime:
    loop = asyncio.get_running_loop()
    p = config.proxy
    rt_ref: list[Runtime] = []
    dispatcher = Dispatcher(RouteTable(config.routes), make_pool_factory(rt_ref))
    upstreams = UpstreamPool(loop, p.upstream_pool_size, p.upstream_idle_s, p.connect_timeout_s)
    state = ServerState(config=p, loop=loop, dispatcher=dispatcher, upstreams=upstreams, via=p.server_name.encode())
    events = EventLog(config.events_path, config.events_retention_s, config.events_max_rows)
    rt = Runtime(config=config, state=state, dispatcher=dispatcher, events=events)
    rt_ref.append(rt)
    if any(r.summoned for r in config.routes):
        rt.summoner = await start_summoner(config, events, backends or make_backends(config), store)
    elif store is not None:
        await store.close()  # static routes only: nothing to share
    rt.metrics = Metrics(rt.summoner.status if rt.summoner else None, overload=lambda: overload_of(rt),
                         clock=loop.time)
    metrics = rt.metrics
    state.observe = metrics.observe
    if rt.summoner is not None:
        rt.summoner.listeners.append(metrics.command)
    state.start_sweeping()
    for sock in sockets:
        rt.listeners.append(sock.dup())
        rt.servers.append(await serve_on(rt, sock))
    if admin and p.admin is not None:
        rt.admin = AdminServer(p.admin, status=lambda: status_of(rt), events=lambda n, r: events_of(rt, n, r),
                               metrics=metrics.render, reload=lambda: reload_all(rt), token=p.admin_token,
                               images_store=config.images_store,
                               images_action=functools.partial(images_action, rt) if rt.summoner else None)
        try:
            await rt.admin.start()
        except OSError as exc:  # taken since `summon serve` checked it: stop what started, say which key
            if rt.summoner is not None:
                await rt.summoner.close()
            raise listen_error(config, "admin", p.admin, exc) from exc
    if admin and config.plugin is not None:
        await start_plugin(rt, config)
    return rt


async def start_plugin(rt: Runtime, config: Config) -> None:
    """The decision endpoint, on worker 0 only: a lease must come back (/done) to the
    engine that gave it, and the listener is not shared with SO_REUSEPORT."""
    assert config.plugin is not None
    decider = Decider(rt.dispatcher, lambda: rt.config, config.plugin, asyncio.get_running_loop().time)
    rt.plugin = PluginEndpoint(config.plugin.listen, decider, config.plugin.token)
    try:
        await rt.plugin.start()
    except OSError as exc:
        if rt.admin is not None:
            rt.admin.close()
        if rt.summoner is not None:
            await rt.summoner.close()
        raise listen_error(config, "listen", config.plugin.listen, exc, "plugin") from exc


async def serve_on(rt: Runtime, sock: socket.socket) -> asyncio.AbstractServer:
    """Accept on a listening socket (which the server closes when it is closed)."""
    state = rt.state
    return await asyncio.get_running_loop().create_server(lambda: ClientConnection(state), sock=sock,
                                                          backlog=BACKLOG)


class OverloadWatch:
    """The asyncio side of `proxy.engine.overload`: samples the loop every TICK_S (IDLE_TICK_S
    while idle) and carries out the verdicts. Started by real workers only: in-process tests share their loop
    with their own clients, whose work would count as summon's."""

    def __init__(self, rt: Runtime, refuse_connections: bool) -> None:
        self.rt = rt
        self.loop = asyncio.get_running_loop()
        # With a port chosen by the kernel (`:0`), listening again would pick another one.
        self.refuse_connections = refuse_connections
        self.shedder = rt.shedder = Shedder()
        self.refusing = False
        self.due = 0.0
        self.handle: asyncio.TimerHandle | None = None
        self.logged_at = -math.inf
        self.switches = _voluntary_switches()
        self.slept = False

    def start(self) -> None:
        self.due = self.loop.time() + TICK_S
        self.handle = self.loop.call_at(self.due, self._tick)

    def stop(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None
        self.rt.state.shed_budget = 0

    def _tick(self) -> None:
        now = self.loop.time()
        try:
            self._sample(now)
        except Exception:  # the watch must outlive a bad tick: it may be refusing connections
            log.exception("overload watch failed")
        self.due = now + self.shedder.next_tick_s(self.slept, self.rt.state.inflight)
        self.handle = self.loop.call_at(self.due, self._tick)

    def _sample(self, now: float) -> None:
        shedder, state = self.shedder, self.rt.state
        was = shedder.shedding
        waited, state.accept_waited_s = state.accept_waited_s, 0.0
        state.probe_accept = True
        switches = _voluntary_switches()
        self.slept = slept = switches != self.switches
        self.switches = switches
        # drops nobody takes lapse, as in CoDel
        answered = self.rt.metrics.answered() if self.rt.metrics is not None else 0
        state.shed_budget = shedder.tick(self.due, now, waited, slept, state.inflight, answered)
        if shedder.shedding and not was and now - self.logged_at >= 10.0:  # episodes come in bursts
            self.logged_at = now
            log.warning("overloaded: requests wait %.0f ms before they are read; shedding (episode %d, "
                        "%.1f s so far)", shedder.wait_s * 1000, shedder.episodes, shedder.seconds_shedding(now))
        refuse = shedder.shedding and self.refuse_connections
        if refuse != self.refusing and not self.rt.draining:
            self.refusing = refuse
            if refuse:
                _stop_accepting(self.rt)
            else:
                self.loop.create_task(_resume_accepting(self.rt, self))


def _voluntary_switches() -> int:
    """How often this thread (the loop's) gave up the CPU by itself: blocked in epoll
    with nothing to do, above all. Unchanged between two ticks = the loop never slept."""
    return resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw


def _stop_accepting(rt: Runtime) -> None:
    """Close the servers and stop the listening sockets listening: the kernel refuses
    new connections, and resets those already in the backlog (counted as refused).

    Why not keep listening and only stop accepting, so the backlog holds connections
    until summon can take them (no resets, no reconnections)? Tried, with the listening
    socket kept open (4,096 deep, or shrunk to 64 while shedding and 4,096 again once
    accepting) in alternating runs of the `overload` bench: summon's goodput fell to 0
    at 1x and 2x after the first overload, in every round. The backlog is a FIFO in front of a CPU that is already
    full: what waits there waits for seconds, its clients give up (close) while it waits,
    and summon then accepts and serves those dead connections one per loop turn, the live
    ones queued behind them. Resetting the backlog is the drop that keeps that queue short."""
    for server in rt.servers:
        server.close()
    rt.servers.clear()
    for ls in rt.listeners:
        rt.state.refused_connections += _backlog_length(ls)
        try:
            ls.shutdown(socket.SHUT_RD)
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:  # not listening already: a resume had not run yet
                log.warning("could not stop listening: %s", exc)


async def _resume_accepting(rt: Runtime, watch: OverloadWatch) -> None:
    if rt.draining or watch.refusing:
        return  # drain took over, or the overload came back before this ran
    try:
        for ls in rt.listeners:
            ls.listen(BACKLOG)
    except OSError as exc:
        log.error("could not listen again (next tick retries): %s", exc)
        watch.refusing = True
        return
    for ls in rt.listeners:
        rt.servers.append(await serve_on(rt, ls.dup()))
    if rt.draining or watch.refusing:  # changed while the servers were being made
        _stop_accepting(rt)


def _backlog_length(ls: socket.socket) -> int:
    """Connections waiting in a listening socket's accept queue (tcpi_unacked)."""
    try:
        return int(struct.unpack_from("I", ls.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 32), 24)[0])
    except (OSError, struct.error):
        return 0


def status_of(rt: Runtime) -> dict[str, Any]:
    if rt.summoner is not None:
        snap = rt.summoner.status()
    else:
        snap = {"routes": [], "totals": {"instances": 0, "cap": rt.config.limits.max_instances}}
    static = [{"name": r.name, "static": True, "instances": [
        {"id": str(a), "state": "ready", "host": "static", "region": "", "address": str(a)} for a in r.upstreams]}
        for r in rt.config.routes if r.upstreams]
    snap["routes"].extend(static)
    snap["totals"]["connections"] = len(rt.state.connections)
    snap["totals"]["inflight"] = rt.state.inflight
    snap["totals"]["routes"] = len(rt.config.routes)
    snap["totals"]["draining"] = rt.draining
    snap["totals"]["refused_connections"] = rt.state.refused_connections
    snap["totals"]["shed_requests"] = rt.state.shed_requests
    if rt.plugin is not None:
        snap["totals"]["plugin_leases"] = len(rt.plugin.decider.held)  # requests the host proxy carries now
        snap["totals"]["plugin_decisions"] = rt.plugin.decider.decisions  # grants made since start
    snap["overload"] = {k: v for k, v in overload_of(rt).items() if k not in snap["totals"]}
    return snap


def overload_of(rt: Runtime) -> dict[str, Any]:
    """What the front refused or shed, and the overload watch's state (`watched` is false in
    an in-process runtime, which has no overload watch)."""
    out: dict[str, Any] = {"refused_connections": rt.state.refused_connections,
                           "shed_requests": rt.state.shed_requests, "watched": rt.shedder is not None}
    shedder = rt.shedder
    if shedder is not None:
        out |= {"shedding": shedder.shedding, "episodes": shedder.episodes,
                "seconds": round(shedder.seconds_shedding(rt.state.loop.time()), 3),
                "wait_ms": round(shedder.wait_s * 1000, 1)}
    return out


def events_of(rt: Runtime, n: int, route: str | None) -> list[str] | Awaitable[list[str]]:
    if rt.events is None:
        return []
    rt.events.flush(timeout=2.0)
    limit = max(1, min(n, 10_000))
    if rt.fleet_log is not None:
        return _fleet_events(rt, rt.fleet_log, limit, route)
    events = rt.events.query(route=route, limit=limit, newest=True)
    return [json_line(e) for e in events]


async def _fleet_events(rt: Runtime, fleet_log: FleetLog, limit: int, route: str | None) -> list[str]:
    """Every node's events from the fleet's stream; this node's own while Redis is away."""
    loop = asyncio.get_running_loop()
    try:
        events = await loop.run_in_executor(None, functools.partial(fleet_log.query, route=route, limit=limit,
                                                                     newest=True))
    except (RedisError, OSError):
        assert rt.events is not None
        events = rt.events.query(route=route, limit=limit, newest=True)
    return [json_line(e) for e in events]


# Settings read once at start: a reload that changes them says so instead of ignoring it.
_RESTART_ONLY_PROXY = ("listen", "admin", "admin_token", "workers", "upstream_pool_size", "upstream_idle_s",
                       "connect_timeout_s", "shed_overload")


async def reload(rt: Runtime) -> tuple[bool, list[str]]:
    """Validate the config file again and swap atomically; on error keep the old one.

    Returns (ok, messages): the problems when refused; when applied, notes about
    settings that only take effect after a restart (empty when there are none)."""
    async with rt.reload_lock:  # two SIGHUPs in a row: one reload after the other
        if rt.draining:
            return False, ["summon is draining: reload refused"]
        try:
            # Off the loop: a large route table takes a while to parse, and requests keep flowing.
            new = await asyncio.to_thread(load, rt.config.path)
        except ConfigError as exc:
            return _refused(rt, [str(p) for p in exc.problems])
        except Exception as exc:  # noqa: BLE001 - a loader bug must not take the proxy down
            log.exception("reload: the config loader failed")
            return _refused(rt, [f"{rt.config.path}: the config could not be loaded: {type(exc).__name__}: {exc}"])
        if rt.summoner is None and any(r.summoned for r in new.routes):
            return _refused(rt, [f"{new.path}: reload cannot add the first summoned route: restart summon"])
        return True, _swap(rt, new)


async def reload_all(rt: Runtime) -> tuple[bool, list[str]]:
    """The admin API's reload: this worker validates and swaps; with several workers the
    parent is then sent SIGHUP, which it passes to every worker (this one included: a
    second reload of the same file changes nothing)."""
    ok, messages = await reload(rt)
    if ok and rt.config.proxy.workers > 1:
        os.kill(os.getppid(), signal.SIGHUP)
    return ok, messages


async def images_action(rt: Runtime, action: str, name: str, version: str | None) -> tuple[int, dict[str, Any]]:
    """The admin API's deploy and rollback: this worker switches its pools and records the
    version (`proxy.images.deployed`); with several workers the parent is then sent
    SIGUSR1, which it passes to every worker, and each switches to the recorded version."""
    assert rt.summoner is not None
    async with rt.reload_lock:  # not halfway through a reload
        if rt.draining:
            return 409, {"ok": False, "error": "summon is draining: deploy refused"}
        try:
            result = rt.summoner.deploy(name, version) if action == "deploy" else rt.summoner.rollback(name)
        except SummonError as exc:
            return exc.status, {"ok": False, "error": exc.detail}
    log.info("%s of %s: %s -> %s on %s", action, name, result["from"], result["to"], ", ".join(result["routes"]))
    if rt.config.proxy.workers > 1:
        os.kill(os.getppid(), signal.SIGUSR1)
    return 200, result


def versions_changed(rt: Runtime) -> None:
    """The follower followed a new version: the routes switch to it here, and with several
    workers in every worker (SIGUSR1 through the parent, as for a deploy)."""
    if rt.summoner is not None and not rt.draining:
        rt.summoner.refresh_versions()
    if rt.config.proxy.workers > 1:
        os.kill(os.getppid(), signal.SIGUSR1)


def _refused(rt: Runtime, messages: list[str]) -> tuple[bool, list[str]]:
    for m in messages:
        log.error("reload refused: %s", m)
    if rt.events is not None:
        rt.events.record(Event(kind="reload", detail={"ok": False, "errors": messages[:20]}))
    return False, messages


def _swap(rt: Runtime, new: Config) -> list[str]:
    """Install a validated config. Synchronous, so no request runs halfway through it."""
    old = rt.config
    notes = [f"{new.path}: [proxy] {name} changed: takes effect after a restart"
             for name in _RESTART_ONLY_PROXY if getattr(old.proxy, name) != getattr(new.proxy, name)]
    if old.plugin != new.plugin:
        notes.append(f"{new.path}: [plugin] changed: takes effect after a restart")
    if old.follow != new.follow:
        notes.append(f"{new.path}: [images] follow changed: takes effect after a restart")
    if rt.summoner is not None and (old.hosts != new.hosts or old.regions != new.regions
                                    or old.limits != new.limits or old.images_dir != new.images_dir):
        notes.append(f"{new.path}: [[host]], [[region]], [limits] or [images] changed: take effect after a restart")
    old_routes = {r.name: r for r in old.routes}
    table = RouteTable(new.routes)
    if rt.summoner is not None:
        rt.summoner.set_routes(new.routes)  # removed routes drain; unchanged ones keep their instances
    # pools of unchanged routes keep their state; changed or removed ones are rebuilt lazily
    for name in list(rt.dispatcher.pools):
        if old_routes.get(name) != table.by_name.get(name):
            del rt.dispatcher.pools[name]
    rt.dispatcher.table = table  # one reference swap: a request sees the old or the new table
    # Limits and timeouts apply to connections accepted from now on.
    live = {name: getattr(old.proxy, name) for name in _RESTART_ONLY_PROXY}
    rt.state.config = dataclasses.replace(new.proxy, **live)
    rt.config = new
    changed = sum(1 for r in new.routes if old_routes.get(r.name) != r)
    removed = sum(1 for name in old_routes if name not in table.by_name)
    log.info("reloaded %s: %d routes, %d new or changed, %d removed", new.path, len(new.routes), changed, removed)
    for note in notes:
        log.warning("reload: %s", note)
    if rt.events is not None:
        rt.events.record(Event(kind="reload", detail={"ok": True, "routes": len(new.routes), "changed": changed,
                                                      "removed": removed, "notes": notes}))
    return notes


_DRAINING_503 = error_response(Unavailable("shutting down", retry_after_s=1), close=True)


async def _refuse(loop: asyncio.AbstractEventLoop, conn: socket.socket, linger_s: float = 1.0) -> None:
    """Answer a connection accepted during drain with 503, before reading any of it,
    then close without a reset: stop sending, read (and drop) until the client closes."""
    try:
        conn.setblocking(False)
        await asyncio.wait_for(loop.sock_sendall(conn, _DRAINING_503), linger_s)
        conn.shutdown(socket.SHUT_WR)
        end = loop.time() + linger_s
        while loop.time() < end:
            if not await asyncio.wait_for(loop.sock_recv(conn, 65536), end - loop.time()):
                break
    except (OSError, TimeoutError):
        pass
    finally:
        conn.close()


def _refuse_backlog(rt: Runtime) -> list[asyncio.Task[None]]:
    """The servers stopped accepting: take what the kernel already queued, answer it
    503, and close the listening sockets (new connections are refused from here)."""
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task[None]] = []
    for ls in rt.listeners:
        ls.setblocking(False)
        while True:
            try:
                conn, _ = ls.accept()
            except OSError:  # BlockingIOError: the backlog is empty
                break
            rt.state.refused_connections += 1
            tasks.append(loop.create_task(_refuse(loop, conn)))
        ls.close()
    rt.listeners.clear()
    return tasks


async def _until(loop: asyncio.AbstractEventLoop, done: Callable[[], bool], end: float, forced: asyncio.Event) -> None:
    while not done() and not forced.is_set() and loop.time() < end:
        await asyncio.sleep(0.02)


async def drain(rt: Runtime, deadline_s: float) -> None:
    """Stop accepting, finish in-flight requests (bounded), close idle connections,
    then stop every instance summon started. See the module docstring for the steps."""
    loop = asyncio.get_running_loop()
    state = rt.state
    rt.draining = True
    state.draining = True
    end = loop.time() + deadline_s
    for server in rt.servers:
        server.close()
    refusals = _refuse_backlog(rt)

    def idle(conn: ClientConnection) -> bool:
        return conn.active is None and conn.incoming is None and not conn.pending

    # A keep-alive client may be sending its next request right now: give idle connections
    # a moment, so that request is answered (with Connection: close) rather than cut off.
    grace_end = min(end, loop.time() + min(1.0, deadline_s / 4))
    await _until(loop, lambda: not any(idle(c) for c in state.connections), grace_end, rt.forced)
    for conn in list(state.connections):
        if idle(conn):
            conn.close()
    plugin = rt.plugin
    if plugin is not None:
        plugin.decider.draining = True  # new decisions get 503; /done still gives leases back
    await _until(loop, lambda: state.inflight <= 0 and not state.connections
                 and (plugin is None or not plugin.decider.held), end, rt.forced)
    left = state.inflight + (len(plugin.decider.held) if plugin is not None else 0)
    if left > 0:
        log.warning("drain: %d request(s) still in flight at the deadline: cutting them off", left)
    for conn in list(state.connections):
        conn.abort() if conn.active is not None else conn.close()
    state.upstreams.close_all()
    state.stop_sweeping()
    if plugin is not None:
        plugin.close()
    if rt.summoner is not None:
        await rt.summoner.close()
    if rt.follower is not None:
        await rt.follower.close()
    if rt.shipper is not None:
        if rt.events is not None:
            rt.events.flush(timeout=2.0)
        await rt.shipper.close()  # after the summoner: the shutdown's own events go too
    if refusals:
        await asyncio.gather(*refusals, return_exceptions=True)
    if rt.admin is not None:
        rt.admin.close()
    if rt.peer is not None:
        rt.peer.close()
    if rt.events is not None:
        rt.events.record(Event(kind="shutdown", detail={"requests_left": left, "forced": rt.forced.is_set()}))
        rt.events.close()


def fleet_store(config: Config, worker: int, peer_dir: str | None, redis_password: str | None) -> Store | None:
    """The shared state of the fleet this worker belongs to, or None when it is alone."""
    c = config.cluster
    if c is not None:
        node = c.node if config.proxy.workers == 1 else f"{c.node}-w{worker}"
        return RedisStore(connect(c.redis, redis_password), node, lease_s=c.lease_s)
    if peer_dir is not None:
        return SqliteStore(os.path.join(peer_dir, FLEET_DB), node=f"w{worker}")
    return None


async def run_worker(config: Config, sockets: list[socket.socket], worker: int, peer_dir: str | None = None,
                     redis_password: str | None = None, pull_token: str | None = None,
                     notifier: Notifier | None = None) -> int:
    """One worker. Its engine shares one fleet with other engines when there are any:
    with `[cluster]`, through Redis (`proxy.cluster.redis_store`), as node `[cluster].node`
    (or `NODE-wN` with several workers); otherwise, with `peer_dir` (workers = N), through
    `peer_dir/fleet.db` (`proxy.cluster.sqlite_store`): one cold boot per route, one cap,
    and every engine routes to every engine's instances. `notifier`: systemd's readiness
    protocol (`proxy.serve.notify`), spoken by worker 0 only."""
    loop = asyncio.get_running_loop()
    notify = notifier if notifier is not None and worker == 0 else Notifier(None)
    # The admin port and the listeners open before start-up is over: a SIGHUP or SIGTERM
    # sent as soon as they answer must not meet the default action (which ends the
    # process). Signals that come while starting are kept and acted on once running.
    early: list[signal.Signals] = []
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
        loop.add_signal_handler(sig, early.append, sig)
    rt = await build_runtime(config, sockets, admin=(worker == 0),
                             store=fleet_store(config, worker, peer_dir, redis_password))
    if config.cluster is not None and worker == 0:  # the workers share one local log: one shipper
        assert rt.events is not None
        rt.shipper = Shipper(EventReader(config.events_path), connect(config.cluster.redis, redis_password),
                             config.cluster.node)
        rt.shipper.start()
        rt.fleet_log = FleetLog(sync_client(config.cluster.redis, redis_password))
        if config.follow is not None:  # an edge: new versions come by announcement (one follower)
            events = rt.events
            rt.follower = Follower(config.follow, config.images_store, connect(config.cluster.redis, redis_password),
                                   events.record, token=pull_token, on_followed=lambda: versions_changed(rt))
            rt.follower.start()
    if peer_dir is not None:
        await join_workers(rt, worker, peer_dir)
    watch = (OverloadWatch(rt, refuse_connections=all(a.port != 0 for a in config.proxy.listen))
             if config.proxy.shed_overload else None)
    if watch is not None:
        watch.start()
    # Start-up objects (config, route table, modules) live for ever: keep the collector
    # from rescanning them, and collect young objects less often (requests allocate many
    # short-lived ones; reference counting frees nearly all of them anyway).
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)
    signals = {"count": 0}

    def on_stop() -> None:
        signals["count"] += 1
        if signals["count"] == 1:
            notify.stopping()
            log.info("draining (up to %.0fs); signal again to force", rt.config.proxy.drain_timeout_s)
            rt.stopping.set()
        elif signals["count"] == 2:
            # Stop waiting for requests, but still stop the instances (bounded); a third exits now.
            log.warning("second signal: cutting off in-flight requests and stopping instances; again to exit now")
            rt.stopping.set()
            rt.forced.set()
            loop.call_later(10.0, os._exit, 1)
        else:
            log.warning("third signal: exiting now")
            os._exit(1)

    def on_hup() -> None:
        async def go() -> None:
            notify.reloading()
            try:
                ok, messages = await reload(rt)
            finally:
                notify.ready("reloaded")  # applied or refused: the old config serves on
            if ok:
                log.info("SIGHUP: reloaded %s", rt.config.path)

        loop.create_task(go())

    def on_usr1() -> None:  # another worker deployed (see `images_action`)
        if rt.summoner is not None and not rt.draining:
            rt.summoner.refresh_versions()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    loop.add_signal_handler(signal.SIGUSR1, on_usr1)
    for sig in early:
        {signal.SIGHUP: on_hup, signal.SIGUSR1: on_usr1}.get(sig, on_stop)()
    addrs = ", ".join(str(a) for a in config.proxy.listen)
    admin = f", admin on {config.proxy.admin}" if rt.admin else ""
    log.info("worker %d listening on %s%s", worker, addrs, admin)
    notify.ready(f"listening on {addrs}")
    await rt.stopping.wait()
    if watch is not None:
        watch.stop()
    await drain(rt, rt.config.proxy.drain_timeout_s)
    log.info("worker %d stopped%s", worker, " (forced)" if rt.forced.is_set() else "")
    return 1 if rt.forced.is_set() else 0


async def join_workers(rt: Runtime, worker: int, peer_dir: str) -> None:
    """Several workers: worker 0's admin API speaks for all of them (see proxy.serve.workers)."""
    workers = rt.config.proxy.workers
    assert rt.metrics is not None
    registry = rt.metrics.registry
    if worker > 0:
        rt.peer = PeerServer(socket_path(peer_dir, worker), lambda: status_of(rt), registry)
        await rt.peer.start()
        return
    if rt.admin is None:
        return

    async def status_all() -> dict[str, Any]:
        answers, unreachable = await ask(peer_dir, workers, "status")
        return merge_status([(0, status_of(rt)), *answers], unreachable)

    async def metrics_all() -> tuple[bytes, str]:
        answers, _ = await ask(peer_dir, workers, "metrics")
        return merge_metrics([metric_samples(registry), *(a for _, a in answers)])

    rt.admin.status = status_all
    rt.admin.metrics = metrics_all


def serve(config: Config, redis_password: str | None = None, pull_token: str | None = None) -> int:
    """Run the proxy until SIGTERM; returns the exit code. `redis_password`: for
    `[cluster]`, `pull_token`: for `[images] follow`, read from the environment by the caller."""
    import uvloop

    notifier = Notifier.from_environ()  # taken out of the environment: instances do not inherit it
    # Mark the start in the event log before any worker summons anything: instances an
    # earlier run left "running" there (it was killed) end here, for `summon stats`.
    try:
        with EventLog(config.events_path, config.events_retention_s, config.events_max_rows) as events:
            events.record(Event(kind="startup", detail={"pid": os.getpid(), "workers": config.proxy.workers}))
    except (OSError, sqlite3.Error) as exc:
        raise events_error(config, exc) from exc
    workers = config.proxy.workers
    reuse = workers > 1
    if workers == 1:
        sockets = bind_listeners(config, reuse)
        return uvloop.run(run_worker(config, sockets, 0, redis_password=redis_password,
                                     pull_token=pull_token, notifier=notifier))
    children: list[int] = []
    peer_dir = tempfile.mkdtemp(prefix="summon-workers-")  # 0700: worker 0 asks the others here
    parent = os.getpid()
    for i in range(workers):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                die_with_parent(parent)  # a SIGKILLed parent must not leave workers behind
                sockets = bind_listeners(config, True)
                code = uvloop.run(run_worker(config, sockets, i, peer_dir, redis_password, pull_token, notifier))
            except ConfigError as exc:
                print(exc, file=sys.stderr)
                code = 2
            finally:
                os._exit(code)
        children.append(pid)

    def forward(signum: int, _frame: object) -> None:
        for pid in children:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(sig, forward)
    code = 0
    for pid in children:
        while True:
            try:
                _, status = os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue
        code = code or (os.waitstatus_to_exitcode(status) if status else 0)
    shutil.rmtree(peer_dir, ignore_errors=True)
    print("summon: all workers stopped", file=sys.stderr)
    return code
