"""The asyncio shell around the engine: carries out Boot/Forward/Reject/Stop/Record.

How this works: each summoned route gets a `SummonedPool` (what the dispatcher asks
for a lease). It feeds facts to the `Fleet` and executes the commands that come back:
Forward resolves a waiting request's future with a lease, Reject fails it with 503 +
Retry-After, Boot starts a driver task (start -> readiness probe -> ready/failed), Stop
destroys, Record writes the event log. Once the driver has started an instance, a cold
pool's first safe bodiless request goes to it as a trial (see `Fleet.instance_started`):
the exchange retries it until the instance answers and then `confirm`s the lease, which
makes the instance ready without a probe's own round trip. The health probe runs only
when there is no trial (the first requests cannot be retried), or once the trial's
client left or its answer was a 5xx (`hand_over`: the probe decides, and the request
is sent again when the instance is ready). A tick every 100 ms drives timeouts, idling
and scaling. All engine calls happen on the event loop thread, so the engine needs no
locks.

In a shared fleet (`workers = N`, or `[cluster]`), a `Coordinator` claims a permit (and
a cold route's boot lock) before each driver start, and keeps the engine's copy of the
other engines' instances current (see `proxy.runtime.coordinator`).

Drivers that watch their host (a remote libvirt host: `LibvirtBackend.watch_health`)
say when it stops answering: the host leaves placement (`host_down`) until it answers
again (`host_up`); its instances come back through their `exited` futures as dead.

Every `reap_interval_s` (and once before the first tick) each driver reaps the
instances whose owning summon process is dead (`proxy.backends.owner`): a restart that
came before the kernel was done with the old process finds them on a later round.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
from collections.abc import Callable
from typing import Any

from ..backends.base import Backend, Handle, InstanceSpec
from ..cluster.store import Store
from ..config import Address, Config, Host, Route
from ..engine.fleet import Boot, Command, Fleet, Forward, Record, Reject, Stop
from ..engine.lifecycle import State
from ..errors import BackendError, HostUnavailable, SummonError, Unavailable
from ..http.message import RequestHead
from ..images.manifest import load_image
from ..observe.events import Event, EventLog
from ..routing.contracts import Lease
from ..routing.dispatch import hash_key
from .coordinator import Coordinator, CoordinatorSettings
from .learning import Learning
from .readiness import probe_once, wait_ready

log = logging.getLogger("summon.summoner")
# a host its driver reported down stays out of placement until the driver says it is up
HOST_DOWN_HOLD_S = 24 * 3600.0

# Reaping asks every driver for its instances (one libvirt list call, a directory
# listing): cheap at this pace, and a leaked VM lives at most this long past its owner.
REAP_INTERVAL_S = 2.0


class SummonedLease:
    __slots__ = ("address", "instance_id", "pool", "trial", "on_abandon", "on_ready", "request_id")

    def __init__(self, pool: SummonedPool, instance_id: str, address: Address, trial: bool = False,
                 request_id: int = 0) -> None:
        self.pool = pool
        self.request_id = request_id
        self.instance_id = instance_id
        self.address = address
        self.trial = trial  # the instance is not known to be ready: retry until it answers
        self.on_abandon: Callable[[SummonError], None] | None = None  # set by the exchange
        self.on_ready: Callable[[], None] | None = None  # see `hand_over`

    def release(self, ok: bool) -> None:
        s = self.pool.summoner
        self.trial = False
        if s.trials.pop(self.request_id, None) is self:
            s.trial_ended(self, answered=False)
        s.execute(s.fleet.request_finished(self.pool.route.name, self.instance_id, ok, s.now()))

    def confirm(self) -> None:
        """The instance answered this trial request: it is ready."""
        if self.trial:
            self.trial = False
            self.pool.summoner.trial_answered(self)

    def hand_over(self, on_ready: Callable[[], None]) -> None:
        """The trial got a 5xx: maybe still warming up, maybe that URL fails anyway. The
        health probe decides; `on_ready` is called once it finds the instance ready."""
        if self.trial:
            self.trial = False
            self.on_ready = on_ready
            self.pool.summoner.trial_ended(self, answered=False)

    def abandon(self, error: SummonError) -> None:
        """The instance will never answer (boot failed, route removed)."""
        self.trial = False
        self.on_ready = None
        if self.on_abandon is not None:
            self.on_abandon(error)


class SummonedPool:
    def __init__(self, summoner: Summoner, route: Route) -> None:
        self.summoner = summoner
        self.route = route

    def acquire(self, head: RequestHead, client_ip: str, region: str | None,
                avoid: Lease | None = None) -> Lease | asyncio.Future[Lease]:
        s = self.summoner
        s.request_seq += 1
        rid = s.request_seq
        if self.route.name in s.learn_routes:  # predictive summoning learns what follows (learning.py)
            s.learning.observe(self.route.name, client_ip)  # type: ignore[union-attr]
        key = hash_key(self.route, head, client_ip)
        commands = s.fleet.request_arrived(self.route.name, rid, key, s.region_of(client_ip, region), s.now(),
                                           getattr(avoid, "instance_id", None),
                                           trial_ok=s.trials_enabled and head.safe and not head.has_body
                                           and head.upgrade is None)
        if len(commands) == 1:
            cmd = commands[0]
            if isinstance(cmd, Forward) and cmd.request_id == rid:
                return SummonedLease(self, cmd.instance_id, cmd.address)  # warm: no future, no task
        fut: asyncio.Future[Lease] = s.loop.create_future()
        s.waiting[rid] = (fut, self)
        fut.add_done_callback(functools.partial(s.request_done_waiting, rid))
        s.execute(commands)
        return fut


class Summoner:
    def __init__(
        self,
        config: Config,
        events: EventLog | None,
        backends: dict[str, Backend],
        tick_s: float = 0.1,
        store: Store | None = None,
        local_share: int = 1,
        reap_interval_s: float = REAP_INTERVAL_S,
    ) -> None:
        self.config = config
        self.events = events
        self.backends = backends
        self.loop = asyncio.get_running_loop()
        self.fleet = Fleet(config.limits, config.hosts, config.regions, config.default_region,
                           new_id=self._new_id, node=store.node if store is not None else "",
                           shared=store is not None, drain_timeout_s=config.proxy.drain_timeout_s,
                           prefetch=config.prefetch)
        self.hosts: dict[str, Host] = {h.name: h for h in config.hosts}
        self.routes: dict[str, Route] = {r.name: r for r in config.routes if r.summoned}
        self.pools: dict[str, SummonedPool] = {}
        self.waiting: dict[int, tuple[asyncio.Future[Lease], SummonedPool]] = {}
        self.handles: dict[str, Handle] = {}
        self.boot_tasks: dict[str, asyncio.Task[None]] = {}
        self.trials: dict[int, SummonedLease] = {}  # request id -> lease of a trial, until ready or released
        self.trial_outcome: dict[str, asyncio.Future[bool]] = {}  # instance id -> did its trial get an answer
        self.trials_enabled = True  # only for fronts that retry a trial (the native one)
        self.stop_tasks: set[asyncio.Task[None]] = set()
        self.digests: dict[str, str] = {}
        self.request_seq = 0
        self.tick_s = tick_s
        self.reap_interval_s = reap_interval_s
        self._ticker: asyncio.TimerHandle | None = None
        self._reaper: asyncio.Task[None] | None = None
        self._region_cache: dict[str, str] = {}
        self.probing: set[str] = set()
        self.last_probe: dict[str, float] = {}
        self.health_misses: dict[str, int] = {}
        self.host_failures: dict[str, int] = {}
        self._ids = 0
        import os
        import secrets

        self._id_prefix = f"{os.getpid():x}{secrets.token_hex(2)}"
        self.listeners: list[Callable[[Command], None]] = []
        self.coordinator: Coordinator | None = None
        if store is not None:
            settings = CoordinatorSettings(cap=config.limits.max_instances, local_share=local_share)
            self.coordinator = Coordinator(store, self.fleet, settings, self.execute, self.now, self._image_of)
            self.listeners.append(self.coordinator.observe)
        self.execute(self.fleet.set_routes(self.routes.values(), self.now()))
        self.learning: Learning | None = None
        self.learn_routes: frozenset[str] = frozenset()  # routes whose requests `learning` records
        self._update_learning()

    def _update_learning(self) -> None:
        """Learning runs once some route pre-summons (and `[prefetch].learn`), with an event log."""
        if self.learning is None and self.events is not None and self.config.prefetch.learn and self.fleet.prefetch.on:
            self.learning = Learning(self.config, self.events, self.fleet, self.loop)
            if self._ticker is not None:
                self.learning.start()
        if self.learning is not None:
            self.learning.set_routes()
            self.learn_routes = self.learning.routes

    def _image_of(self, route: str) -> str:
        r = self.routes.get(route)
        return (r.image or "") if r is not None else ""

    def _new_id(self, route: str) -> str:
        self._ids += 1
        return f"{self._id_prefix}-{self._ids}"

    def now(self) -> float:
        return self.loop.time()

    def start(self) -> None:
        self._ticker = self.loop.call_later(self.tick_s, self._tick)
        self._reaper = self.loop.create_task(self._reap_periodically(), name="summon reaper")
        if self.learning is not None:
            self.learning.start()
        self._watch_hosts()
        if self.coordinator is not None:
            self.coordinator.start()

    def _watch_hosts(self) -> None:
        by_backend: dict[int, tuple[Backend, list[str]]] = {}
        for name, backend in self.backends.items():
            by_backend.setdefault(id(backend), (backend, []))[1].append(name)
        for backend, names in by_backend.values():
            watch = getattr(backend, "watch_health", None)
            if watch is not None:
                watch(functools.partial(self._host_health, tuple(names)))

    def _host_health(self, hosts: tuple[str, ...], up: bool, reason: str, reaped: list[str]) -> None:
        """A driver's word on its host. Down: out of placement (the fleet's own back-off,
        held until the word "up"). Up: placeable at once; what it reaped is logged."""
        now = self.now()
        for host in hosts:
            self.host_failures.pop(host, None)
            held = self.fleet.host_failed(host, now, 0.0 if up else HOST_DOWN_HOLD_S)
            self.execute([c for c in held if not isinstance(c, Record)])  # our own event instead:
            kind, detail = ("host_up", {"reaped": reaped}) if up else ("host_down", {"reason": reason})
            self.execute([Record(kind, host=host, region=self.hosts[host].region if host in self.hosts else "",
                                 detail=detail)])
        for name in reaped:
            if self.events is not None:
                self.events.record(Event(kind="reaped", instance=name, host=",".join(hosts),
                                         detail={"when": "host returned"}))
            log.warning("reaped orphan instance %s on %s, which answers again", name, ",".join(hosts))

    async def reap_orphans(self, when: str = "periodic") -> list[str]:
        """Ask every driver to destroy what dead summon processes left running; one
        `reaped` event per instance. A driver that fails (libvirtd down) is retried
        on the next round and never stops the proxy."""
        reaped: list[str] = []
        for backend in set(self.backends.values()):
            try:
                names = await backend.reap_orphans()
            except Exception as exc:  # noqa: BLE001 - a host that is down must not stop the proxy
                log.warning("could not reap orphans on %s: %s", backend.name, exc)
                continue
            for name in names:
                if self.events is not None:
                    self.events.record(Event(kind="reaped", instance=name,
                                             detail={"backend": backend.name, "when": when}))
                log.warning("reaped orphan instance %s left by a summon process that is gone", name)
            reaped += names
        return reaped

    async def _reap_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.reap_interval_s)
            await self.reap_orphans()

    def _tick(self) -> None:
        try:
            self.execute(self.fleet.tick(self.now()))
            self._health_checks()
        except Exception:
            log.exception("engine tick failed")
        self._ticker = self.loop.call_later(self.tick_s, self._tick)

    def _health_checks(self) -> None:
        """Probe ready instances every `health_interval`; `health_failures` misses in a
        row and the instance is treated as dead (replaced on demand)."""
        now = self.now()
        for inst in list(self.fleet.instances.values()):
            if inst.state is not State.READY or inst.address is None or inst.id in self.probing or inst.owner:
                continue  # (another engine's instance: its owner probes it)
            route = self.routes.get(inst.route)
            if route is None or route.health_interval_s <= 0:
                continue
            if now - self.last_probe.get(inst.id, inst.ready_at or now) < route.health_interval_s:
                continue
            self.probing.add(inst.id)
            self.last_probe[inst.id] = now
            task = self.loop.create_task(self._health_check(inst.id, inst.address, route))
            task.add_done_callback(functools.partial(self._probed, inst.id))

    def _probed(self, instance_id: str, _task: asyncio.Task[None]) -> None:
        self.probing.discard(instance_id)

    async def _health_check(self, instance_id: str, address: Address, route: Route) -> None:
        status = await probe_once(address, route.health_path, min(2.0, route.health_interval_s))
        if status is not None and status < 500:
            self.health_misses.pop(instance_id, None)
            return
        misses = self.health_misses.get(instance_id, 0) + 1
        self.health_misses[instance_id] = misses
        log.warning("health check of %s failed (%d/%d)", instance_id, misses, route.health_failures)
        if misses >= route.health_failures:
            self.health_misses.pop(instance_id, None)
            self.execute(self.fleet.instance_died(instance_id, f"failed {misses} health checks", self.now()))

    def set_routes(self, routes: tuple[Route, ...]) -> None:
        """Reload: unchanged routes keep their instances, removed ones drain."""
        self.routes = {r.name: r for r in routes if r.summoned}
        for name in list(self.pools):
            if self.pools[name].route != self.routes.get(name):
                del self.pools[name]
        self.execute(self.fleet.set_routes(self.routes.values(), self.now()))
        self._update_learning()

    def pool(self, route: Route) -> SummonedPool:
        pool = self.pools.get(route.name)
        if pool is None or pool.route != route:
            pool = self.pools[route.name] = SummonedPool(self, route)
        return pool

    def region_of(self, client_ip: str, header_region: str | None) -> str:
        if header_region and header_region in self.fleet.regions:
            return header_region
        cached = self._region_cache.get(client_ip)
        if cached is not None:
            return cached
        region = self.config.default_region
        try:
            addr = ipaddress.ip_address(client_ip)
        except ValueError:
            addr = None
        if addr is not None:
            for r in self.config.regions:
                if any(addr in net for net in r.cidrs):
                    region = r.name
                    break
        if len(self._region_cache) > 65536:
            self._region_cache.clear()
        self._region_cache[client_ip] = region
        return region

    def request_done_waiting(self, rid: int, fut: asyncio.Future[Lease]) -> None:
        entry = self.waiting.pop(rid, None)
        if entry is not None and fut.cancelled():
            # the client hung up while waiting: drop it from the boot queue
            self.execute(self.fleet.request_cancelled(entry[1].route.name, rid, self.now()))

    # --- carrying out commands -----------------------------------------------------------

    def execute(self, commands: list[Command]) -> None:
        for cmd in commands:
            if isinstance(cmd, Forward):
                entry = self.waiting.pop(cmd.request_id, None)
                if entry is None or entry[0].done():
                    # the request went away in the meantime: give the slot back
                    route = self.fleet.instances[cmd.instance_id].route if cmd.instance_id in self.fleet.instances else ""
                    self.execute(self.fleet.request_finished(route, cmd.instance_id, True, self.now()))
                    continue
                fut, pool = entry
                if cmd.trial:
                    lease = SummonedLease(pool, cmd.instance_id, cmd.address, True, cmd.request_id)
                    self.trials[cmd.request_id] = lease
                    fut.set_result(lease)
                else:
                    fut.set_result(SummonedLease(pool, cmd.instance_id, cmd.address))
            elif isinstance(cmd, Reject):
                entry = self.waiting.pop(cmd.request_id, None)
                if entry is not None and not entry[0].done():
                    entry[0].set_exception(Unavailable(cmd.reason, retry_after_s=cmd.retry_after_s))
                else:
                    self._reject_trial(cmd)
            elif isinstance(cmd, Boot):
                self.boot_tasks[cmd.instance_id] = self.loop.create_task(self._boot(cmd))
            elif isinstance(cmd, Stop):
                task = self.loop.create_task(self._stop(cmd))
                self.stop_tasks.add(task)
                task.add_done_callback(self.stop_tasks.discard)
            elif isinstance(cmd, Record):
                self._record(cmd)
            for fn in self.listeners:
                fn(cmd)

    def _reject_trial(self, cmd: Reject) -> None:
        lease = self.trials.pop(cmd.request_id, None)
        if lease is not None:
            self.trial_ended(lease, answered=False)
            lease.abandon(Unavailable(cmd.reason, retry_after_s=cmd.retry_after_s))

    def trial_answered(self, lease: SummonedLease) -> None:
        """Ready now, not when the boot task next runs: the trial's client may ask again
        before that, and must find a warm pool."""
        self.trials.pop(lease.request_id, None)
        self.execute(self.fleet.instance_ready(lease.instance_id, lease.address, self.now(), by="request"))
        self.trial_ended(lease, answered=True)

    def trial_ended(self, lease: SummonedLease, answered: bool) -> None:
        """The boot task waits on this before it runs its own health probe."""
        fut = self.trial_outcome.get(lease.instance_id)
        if fut is not None and not fut.done():
            fut.set_result(answered)

    def _trials_ready(self, instance_id: str) -> None:
        """The health probe found the instance ready: requests handed over go again."""
        for rid, lease in list(self.trials.items()):
            if lease.instance_id == instance_id:
                del self.trials[rid]
                on_ready, lease.on_ready = lease.on_ready, None
                if on_ready is not None:
                    on_ready()

    def _record(self, cmd: Record) -> None:
        level = logging.WARNING if cmd.kind in ("failed", "rejected", "cap_reached", "host_down", "host_up") else logging.INFO
        if cmd.kind != "rejected" or log.isEnabledFor(logging.DEBUG):
            log.log(level, "%s route=%s instance=%s host=%s %s", cmd.kind, cmd.route, cmd.instance, cmd.host,
                    cmd.detail or "", extra={"event": cmd.kind, "route": cmd.route, "instance": cmd.instance,
                                             "host": cmd.host, "region": cmd.region, "duration_s": cmd.duration_s,
                                             "detail": cmd.detail})
        if self.events is None:
            return
        self.events.record(Event(
            kind=cmd.kind, route=cmd.route, instance=cmd.instance,
            image_digest=self.digests.get(cmd.instance, ""), host=cmd.host, region=cmd.region,
            duration_s=cmd.duration_s, detail=dict(cmd.detail),
        ))

    async def _boot(self, cmd: Boot) -> None:
        route = self.routes.get(cmd.route) or self.fleet.pools[cmd.route].route
        host = self.hosts[cmd.host]
        backend = self.backends[host.name]
        deadline = self.loop.time() + route.boot_timeout_s
        try:
            await self._start_and_probe(cmd, route, host, backend, deadline)
        finally:
            self.trial_outcome.pop(cmd.instance_id, None)

    async def _start_and_probe(self, cmd: Boot, route: Route, host: Host, backend: Backend, deadline: float) -> None:
        loop = self.loop
        try:
            assert route.image is not None
            image = load_image(self.config.images_dir, route.image, store=self.config.images_store)  # cached by mtime
            self.digests[cmd.instance_id] = image.digest
            spec = InstanceSpec(cmd.instance_id, route, host, image, route.start)
            if self.coordinator is not None:
                verdict = await self.coordinator.claim(cmd, route)
                if not verdict.granted:
                    self.boot_tasks.pop(cmd.instance_id, None)
                    self.execute(self.fleet.boot_refused(cmd.instance_id, verdict.reason, self.now(), verdict.wait_s))
                    return
                self.execute(self.fleet.boot_claimed(cmd.instance_id, self.now()))
            handle = await asyncio.wait_for(backend.start(spec), max(0.001, deadline - loop.time()))
        except asyncio.CancelledError:
            raise
        except HostUnavailable as exc:
            # fail fast, place elsewhere, retry this host with exponential back-off
            n = self.host_failures[host.name] = self.host_failures.get(host.name, 0) + 1
            self.execute(self.fleet.host_failed(host.name, self.now(), min(300.0, 5.0 * 2 ** (n - 1))))
            self.execute(self.fleet.boot_failed(cmd.instance_id, str(exc.detail), self.now()))
            return
        except SummonError as exc:
            self.execute(self.fleet.boot_failed(cmd.instance_id, str(exc.detail), self.now()))
            return
        except TimeoutError:
            self.execute(self.fleet.boot_failed(cmd.instance_id, "driver did not start the instance in time",
                                                self.now()))
            return
        except Exception as exc:  # a driver bug must not hang the waiting requests
            log.exception("driver %s failed to start %s", backend.name, cmd.instance_id)
            self.execute(self.fleet.boot_failed(cmd.instance_id, f"driver error: {exc}", self.now()))
            return
        self.handles[cmd.instance_id] = handle
        self.host_failures.pop(host.name, None)
        handle.exited.add_done_callback(functools.partial(self._exited, cmd.instance_id))
        outcome = self.trial_outcome[cmd.instance_id] = loop.create_future()
        started = self.fleet.instance_started(cmd.instance_id, handle.address, self.now())
        self.execute(started)
        if any(isinstance(c, Forward) and c.trial for c in started):
            # The trial is the probe: a second prober would only compete with it for a
            # guest that has just woken up. The health probe takes over if the trial's
            # client leaves or its answer is a 5xx.
            await asyncio.wait((outcome, handle.exited), return_when=asyncio.FIRST_COMPLETED)
            if outcome.done() and outcome.result():
                self.boot_tasks.pop(cmd.instance_id, None)
                return  # made ready by `trial_answered`
        reason = await wait_ready(handle.address, route.health_path, deadline, handle.exited)
        self.boot_tasks.pop(cmd.instance_id, None)
        if reason is None:
            self.execute(self.fleet.instance_ready(cmd.instance_id, handle.address, self.now()))
            self._trials_ready(cmd.instance_id)
        else:
            self.execute(self.fleet.boot_failed(cmd.instance_id, reason, self.now()))

    def _exited(self, instance_id: str, fut: asyncio.Future[str]) -> None:
        if fut.cancelled() or instance_id not in self.handles:
            return
        reason = fut.result()
        self.execute(self.fleet.instance_died(instance_id, reason, self.now()))

    async def _stop(self, cmd: Stop) -> None:
        self.last_probe.pop(cmd.instance_id, None)
        task = self.boot_tasks.pop(cmd.instance_id, None)
        if task is not None and not task.done():
            task.cancel()
        handle = self.handles.pop(cmd.instance_id, None)
        inst = self.fleet.instances.get(cmd.instance_id)
        if handle is not None and inst is not None:
            try:
                await self.backends[inst.host].stop(handle)
            except BackendError as exc:
                log.warning("stopping %s failed: %s", cmd.instance_id, exc)
        self.execute(self.fleet.instance_stopped(cmd.instance_id, self.now()))

    async def close(self) -> None:
        """Stop every instance (drain has already let requests finish)."""
        if self._ticker is not None:
            self._ticker.cancel()
        if self._reaper is not None:
            self._reaper.cancel()
            await asyncio.gather(self._reaper, return_exceptions=True)
        if self.learning is not None:
            await self.learning.close()
        for fut, _pool in list(self.waiting.values()):
            if not fut.done():
                fut.set_exception(Unavailable("shutting down", retry_after_s=5))
        for task in list(self.boot_tasks.values()):
            task.cancel()
        stops = [self._stop(Stop(i.id, "shutdown")) for i in list(self.fleet.instances.values()) if not i.owner]
        await asyncio.gather(*stops, return_exceptions=True)
        if self.stop_tasks:
            await asyncio.gather(*self.stop_tasks, return_exceptions=True)
        if self.coordinator is not None:
            await self.coordinator.close()  # after the stops: their permits go back first
        for backend in set(self.backends.values()):
            try:
                await backend.close()
            except Exception:
                log.exception("closing backend %s", backend.name)

    def status(self) -> dict[str, Any]:
        snap = self.fleet.snapshot()
        for r in snap["routes"]:
            for i in r["instances"]:
                i["image_digest"] = self.digests.get(i["id"], "")
        if self.coordinator is not None:
            snap["totals"]["cluster"] = self.coordinator.view()
        return snap
