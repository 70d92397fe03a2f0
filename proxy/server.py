"""The asyncio shell: sockets, workers, signals, drain and reload.

How this works: `serve()` builds everything from one `Config`: the route table, the
dispatcher with a pool per route, the upstream connection pool, the listening sockets
(SO_REUSEPORT, so `workers = N` processes each accept on the same port), and the admin
server. SIGTERM/SIGINT drain (stop accepting, let in-flight requests finish up to
`drain_timeout`, stop instances); a second signal forces the exit. SIGHUP reloads.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from .config import Address, Config, Route
from .dispatch import Dispatcher, Pool, StaticPool
from .http.front import ClientConnection, ServerState
from .http.upstream import UpstreamPool
from .routes import RouteTable

log = logging.getLogger("summon.server")


def listen_socket(addr: Address, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in addr.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((addr.host, addr.port))
    sock.listen(4096)
    sock.setblocking(False)
    return sock


@dataclass
class Runtime:
    """What one worker runs; kept so that drain and reload can reach every part."""

    config: Config
    state: ServerState
    dispatcher: Dispatcher
    servers: list[asyncio.AbstractServer] = field(default_factory=list)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    on_close: list[Callable[[], object]] = field(default_factory=list)


def make_pool_factory(config: Config, summoner: object | None) -> Callable[[Route], Pool]:
    def pool_for(route: Route) -> Pool:
        if route.upstreams:
            return StaticPool(route)
        if summoner is None:
            raise RuntimeError("summoned routes need the summoner")
        return summoner.pool(route)  # type: ignore[attr-defined, no-any-return]

    return pool_for


async def build_runtime(config: Config, sockets: list[socket.socket], summoner: object | None = None) -> Runtime:
    loop = asyncio.get_running_loop()
    p = config.proxy
    dispatcher = Dispatcher(RouteTable(config.routes), make_pool_factory(config, summoner))
    upstreams = UpstreamPool(loop, p.upstream_pool_size, p.upstream_idle_s, p.connect_timeout_s)
    state = ServerState(config=p, loop=loop, dispatcher=dispatcher, upstreams=upstreams, via=p.server_name.encode())
    rt = Runtime(config=config, state=state, dispatcher=dispatcher)
    state.start_sweeping()
    for sock in sockets:
        server = await loop.create_server(lambda: ClientConnection(state), sock=sock, backlog=4096)
        rt.servers.append(server)
    return rt


async def drain(rt: Runtime, deadline_s: float) -> None:
    """Stop accepting, finish in-flight requests (bounded), close idle connections."""
    state = rt.state
    state.draining = True
    for server in rt.servers:
        server.close()
    for conn in list(state.connections):
        conn.shutdown_idle()
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    while state.inflight > 0 and loop.time() < end:
        await asyncio.sleep(0.02)
    for conn in list(state.connections):
        conn.abort() if conn.active is not None else conn.close()
    state.upstreams.close_all()
    state.stop_sweeping()


async def run_worker(config: Config, sockets: list[socket.socket], worker: int) -> int:
    loop = asyncio.get_running_loop()
    rt = await build_runtime(config, sockets)
    signals = {"count": 0}

    def on_stop() -> None:
        signals["count"] += 1
        if signals["count"] > 1:
            log.warning("second signal: exiting now")
            os._exit(1)
        rt.stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop)
    addrs = ", ".join(str(a) for a in config.proxy.listen)
    log.info("worker %d listening on %s", worker, addrs)
    await rt.stopping.wait()
    await drain(rt, config.proxy.drain_timeout_s)
    return 0


def serve(config: Config) -> int:
    """Run the proxy until SIGTERM; returns the exit code."""
    import uvloop

    workers = config.proxy.workers
    reuse = workers > 1
    if workers == 1:
        sockets = [listen_socket(a, reuse) for a in config.proxy.listen]
        return uvloop.run(run_worker(config, sockets, 0))
    children: list[int] = []
    for i in range(workers):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                sockets = [listen_socket(a, True) for a in config.proxy.listen]
                code = uvloop.run(run_worker(config, sockets, i))
            finally:
                os._exit(code)
        children.append(pid)

    def forward(signum: int, _frame: object) -> None:
        for pid in children:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
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
    print("summon: all workers stopped", file=sys.stderr)
    return code
