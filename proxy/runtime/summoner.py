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
and scaling, and runs the health probes `proxy.engine.health` says are due (their
outcome goes back to it; a dead instance is reported to the fleet). All engine calls
happen on the event loop thread, so the engine needs no locks.

What is decided here: nothing a fake-clock test could reach. Back-off, probe schedules,
miss counts, regions and which request is a trial are the engine's; the shell holds the
asyncio objects (futures, tasks, leases, driver handles) that carry them out.

In a shared fleet (`workers = N`, or `[cluster]`), a `Coordinator` claims a permit (and
a cold route's boot lock) before each driver start, and keeps the engine's copy of the
other engines' instances current (see `proxy.runtime.coordinator`).

Drivers that watch their host (a remote libvirt host: `LibvirtBackend.watch_health`)
say when it stops answering: the host leaves placement (`host_down`) until it answers
again (`host_up`); its instances come back through their `exited` futures as dead.

Pre-summons (`Boot.background`) are started at a low CPU priority by drivers that can
(`Prioritised`); `Foreground` has the driver raise it again.

Paused standbys (`start = "resume"`): a `Boot` marked `standby` is started and probed
like any boot, then paused by the driver (`Pausable.pause`) and reported as
`standby_parked`; a `Resume` wakes one (`Pausable.resume`), after which it goes the way
of every start: `instance_started`, its trial request or the readiness probe, ready.

Versions (rolling deploys, rules in `proxy.engine.fleet`): the shell resolves which image
version each route serves (`resolve_versions`): its pin, else the version deployed for
its image (`proxy.images.deployed`, written by `deploy`/`rollback` and by an automatic
rollback) or, on an edge, the version it followed last, whichever came later, else the
latest build. The engine boots that version and switches pools when
it changes (a reload, `deploy`, `rollback`); each Boot says which version to start.

Every `reap_interval_s` (and once before the first tick) each driver reaps the
instances whose owning summon process is dead (`proxy.backends.owner`): a restart that
came before the kernel was done with the old process finds them on a later round.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from .. import background
from ..backends.base import Backend, Handle, InstanceSpec, Pausable, Prioritised, image_target
from ..cluster.store import Store
from ..config import Address, Config, Host, Route
from ..engine.fleet import Boot, Command, Fleet, Foreground, Forward, Record, Reject, Resume, Stop
from ..engine.health import HealthChecks, Probe
from ..engine.regions import RegionMap
from ..errors import BackendError, DeployError, HostUnavailable, ImageError, SummonError, Unavailable, UnknownVersion
from ..http.message import RequestHead
from ..images.deployed import Deployed, read_deployed, write_deployed
from ..images.manifest import Image, load_image
from ..observe.events import Event, EventLog
from ..routing.contracts import Lease
from ..routing.dispatch import hash_key
from .coordinator import Coordinator, CoordinatorSettings
from .learning import Learning
from .readiness import probe_once, wait_ready

log = logging.getLogger("summon.summoner")

# Reaping asks every driver for its instances (one libvirt list call, a directory
# listing): cheap at this pace, and a leaked VM lives at most this long past its owner.
REAP_INTERVAL_S = 2.0


class SummonedLease:
    __slots__ = ("address", "instance_id", "pool", "trial", "forwarder", "on_abandon", "on_ready", "request_id")

    def __init__(self, pool: SummonedPool, instance_id: str, address: Address, trial: bool = False,
                 request_id: int = 0, forwarder: bool = False) -> None:
        self.pool = pool
        self.request_id = request_id
        self.instance_id = instance_id
        self.address = address
        self.trial = trial  # the instance is not known to be ready: retry until it answers
        self.forwarder = forwarder  # its driver's address accepts for the guest (`Lease.forwarder`)
        self.on_abandon: Callable[[SummonError], None] | None = None  # set by the exchange
        self.on_ready: Callable[[], None] | None = None  # see `hand_over`

    def release(self, ok: bool) -> None:
        s = self.pool.summoner
        self.trial = False
        s.trial_left(self)
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
            self.pool.summoner.trial_handed_over(self)

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
        commands = s.fleet.request_arrived(self.route.name, rid, key, s.regions.region_of(client_ip, region), s.now(),
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

    def steady(self) -> bool:
        """See `FleetEngine.steady`: whether a decision on this pool may be reused."""
        return self.summoner.fleet.steady(self.route.name)


class _Trial:
    """What the shell holds of one booting instance's trial (the engine's `Instance.trial`
    says which request it is and what became of it): the lease the trial went out on, kept
    after a hand-over until the probe finds the instance ready, and the future the boot
    task waits on before it runs a readiness probe of its own (True: the trial was
    answered, the instance is ready)."""

    __slots__ = ("lease", "answered")

    def __init__(self, answered: asyncio.Future[bool]) -> None:
        self.lease: SummonedLease | None = None
        self.answered = answered

    def settle(self, answered: bool) -> None:
        if not self.answered.done():
            self.answered.set_result(answered)


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
                           placeable=self._placeable, prefetch=config.prefetch, memory_of=self._memory_of)
        self.image_targets: dict[str, frozenset[str]] = {}  # image ref -> its targets, for placement
        self.image_memory: dict[str, int] = {}  # image ref -> its microVM guest memory (MiB), for standbys
        self.resumed_at: dict[str, float] = {}  # woken standby -> when its driver had it running again
        self.hosts: dict[str, Host] = {h.name: h for h in config.hosts}
        self.routes: dict[str, Route] = {r.name: r for r in config.routes if r.summoned}
        self.pools: dict[str, SummonedPool] = {}
        self.waiting: dict[int, tuple[asyncio.Future[Lease], SummonedPool]] = {}
        self.handles: dict[str, Handle] = {}
        self.boot_tasks: dict[str, asyncio.Task[None]] = {}
        self.trials: dict[str, _Trial] = {}  # booting instance id -> its trial's lease and outcome
        self.trials_enabled = True  # only for fronts that retry a trial (the native one)
        self.stop_tasks: set[asyncio.Task[None]] = set()
        self.digests: dict[str, str] = {}
        self.request_seq = 0
        self.tick_s = tick_s
        self.reap_interval_s = reap_interval_s
        self._ticker: asyncio.TimerHandle | None = None
        self._reaper: asyncio.Task[None] | None = None
        self.regions = RegionMap(config.regions, config.default_region)
        self.health = HealthChecks()
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
        self._learn_targets(self.routes.values())
        versions, reasons = self.resolve_versions(self.routes.values())
        self.execute(self.fleet.set_routes(self.routes.values(), self.now(), versions, reasons))
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

    def _learn_targets(self, routes: Iterable[Route]) -> None:
        """Which targets (arches) each route's image has, read once per (re)load so that
        placement (`_placeable`) never touches the disk; a boot refreshes its image's."""
        for route in routes:
            if route.image is not None and route.image not in self.image_targets:
                try:
                    image = load_image(self.config.images_dir, route.image, store=self.config.images_store)
                except SummonError:
                    continue  # unknown: any host; the boot reports the image's problem
                self.image_targets[route.image] = frozenset(image.targets())
                self.image_memory[route.image] = _guest_memory_mib(image)

    def _memory_of(self, route: Route) -> int:
        return self.image_memory.get(route.image or "", 0)

    def _placeable(self, route: Route, host: Host) -> bool:
        targets = self.image_targets.get(route.image or "")
        want = image_target(host)
        return targets is None or want is None or want in targets

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
        self._reaper = background.repeat(self.reap_orphans, self.reap_interval_s, "periodic orphan reap",
                                         pause_first=True)
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
        for host in hosts:
            self.execute(self.fleet.host_reported(host, up, reason, reaped, self.now()))
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
        if reaped and self.events is not None:
            # The driver has already removed the instances' records, so these events are
            # the only trace of the reaping: commit them before anything else happens (a
            # summon killed again right after its start-up reap lost one, seen in CI).
            try:
                await asyncio.to_thread(self.events.flush)
            except TimeoutError as exc:
                log.warning("reaped events not written yet: %s", exc)
        return reaped

    def _tick(self) -> None:
        try:
            self.execute(self.fleet.tick(self.now()))
            self._health_checks()
        except Exception:
            log.exception("engine tick failed")
        self._ticker = self.loop.call_later(self.tick_s, self._tick)

    def _health_checks(self) -> None:
        """Run the probes the engine says are due (`proxy.engine.health`)."""
        for probe in self.health.due(self.fleet, self.now()):
            task = self.loop.create_task(self._health_check(probe))
            task.add_done_callback(functools.partial(self._probed, probe.instance_id))

    def _probed(self, instance_id: str, _task: asyncio.Task[None]) -> None:
        self.health.dropped(instance_id)

    async def _health_check(self, probe: Probe) -> None:
        status = await probe_once(probe.address, probe.path, probe.timeout_s)
        verdict = self.health.finished(probe, status)
        if verdict.misses:
            log.warning("health check of %s failed (%d/%d)", probe.instance_id, verdict.misses,
                        probe.failures_allowed)
        if verdict.dead is not None:
            self.execute(self.fleet.instance_died(probe.instance_id, verdict.dead, self.now()))

    def set_routes(self, routes: tuple[Route, ...]) -> None:
        """Reload: unchanged routes keep their instances, removed ones drain."""
        self.routes = {r.name: r for r in routes if r.summoned}
        self.image_targets.clear()
        self._learn_targets(self.routes.values())
        for name in list(self.pools):
            if self.pools[name].route != self.routes.get(name):
                del self.pools[name]
        versions, reasons = self.resolve_versions(self.routes.values())
        self.execute(self.fleet.set_routes(self.routes.values(), self.now(), versions, reasons))
        self._update_learning()

    # --- versions and rolling deploys ------------------------------------------------------

    def resolve_versions(self, routes: Iterable[Route]) -> tuple[dict[str, str], dict[str, str]]:
        """Route name -> the version it serves (its pin, the deployed version of its image,
        else its latest build), and -> why, for a route whose version came from a deploy
        record (its `how`). A route whose image cannot be loaded is left out: it keeps the
        version it has (its boots report the image's problem)."""
        versions: dict[str, str] = {}
        reasons: dict[str, str] = {}
        by_ref: dict[str, tuple[str, str] | None] = {}
        for route in routes:
            ref = route.image
            if ref is None:
                continue
            if ref not in by_ref:
                by_ref[ref] = self._version_of(ref)
            got = by_ref[ref]
            if got is not None:
                versions[route.name], how = got
                if how:
                    reasons[route.name] = how
        return versions, reasons

    def _version_of(self, ref: str) -> tuple[str, str] | None:
        base, sep, pin = ref.partition("@")
        if sep:
            return pin, ""
        try:
            image = load_image(self.config.images_dir, ref, store=self.config.images_store)
            record = read_deployed(self.config.images_store, image.name)
        except ImageError as exc:
            log.warning("image %s: %s", ref, exc.detail)
            return None
        followed_at = self._followed_at(image.name)
        if record is not None and record.at >= followed_at:
            return record.version, record.how
        return image.digest, "followed" if followed_at else ""

    def _followed_at(self, name: str) -> float:
        """When this node (an edge, `[images] follow`) last followed an announced version of
        `name`, 0 if it follows none: the newer of that and a deploy decides what runs."""
        from ..images.store import Store

        try:
            return (Store(self.config.images_store).followed_dir / name).stat().st_mtime
        except OSError:
            return 0.0

    def _image_name(self, ref: str) -> str:
        base = ref.partition("@")[0]
        if "/" in base or base.startswith("."):
            try:
                return load_image(self.config.images_dir, base, store=self.config.images_store).name
            except ImageError:
                pass
        return base

    def _following(self, name: str) -> tuple[list[Route], list[Route]]:
        """The routes that follow image `name` (no pin), and those that pin a version of it."""
        follow: list[Route] = []
        pinned: list[Route] = []
        for r in self.routes.values():
            if r.image is not None and self._image_name(r.image) == name:
                (pinned if "@" in r.image else follow).append(r)
        return follow, pinned

    def deploy(self, name: str, version: str | None, how: str = "deploy") -> dict[str, Any]:
        """Switch every route that follows image `name` to `version` (None: its latest
        build) by a rolling deploy, and record it so a restart keeps it. Raises
        UnknownVersion (not in the store) or DeployError (no route follows `name`); then
        nothing has changed."""
        follow, pinned = self._following(name)
        if not follow:
            pins = f" (routes pinning a version of it: {', '.join(r.name for r in pinned)}; change their pin and " \
                   "reload)" if pinned else ""
            raise DeployError(f"no route follows image {name!r}{pins}")
        try:
            image = self._load_version(name, version)
        except ImageError as exc:
            raise UnknownVersion(exc.detail) from exc
        pools = [self.fleet.pools[r.name] for r in follow if r.name in self.fleet.pools]
        current = next((p.version for p in pools if p.version.startswith("sha256:")), "")
        record = read_deployed(self.config.images_store, name)
        previous = current if current and current != image.digest else (record.previous if record else "")
        write_deployed(self.config.images_store, Deployed(name, image.digest, previous, how, time.time()))
        now = self.now()
        for r in follow:
            self.execute(self.fleet.deploy(r.name, image.digest, now, how))
        return {"ok": True, "image": name, "from": current or None, "to": image.digest,
                "routes": sorted(r.name for r in follow), "pinned": sorted(r.name for r in pinned)}

    def rollback(self, name: str) -> dict[str, Any]:
        """Deploy the version image `name` served before its last switch."""
        record = read_deployed(self.config.images_store, name)
        target = record.previous if record is not None else ""
        if not target:
            follow, _ = self._following(name)
            target = next((self.fleet.pools[r.name].previous for r in follow
                           if r.name in self.fleet.pools and self.fleet.pools[r.name].previous.startswith("sha256:")), "")
        if not target:
            raise DeployError(f"image {name!r} has no previous version to roll back to")
        return self.deploy(name, target, "rollback")

    def refresh_versions(self) -> None:
        """Another worker deployed (its record is on disk): switch the pools here as well."""
        versions, reasons = self.resolve_versions(self.routes.values())
        now = self.now()
        for route, version in versions.items():
            self.execute(self.fleet.deploy(route, version, now, reasons.get(route, "deploy")))

    def _load_version(self, name: str, version: str | None) -> Image:
        ref = name if version is None else f"{name}@{version}"
        return load_image(self.config.images_dir, ref, store=self.config.images_store)

    def _rolled_back(self, cmd: Record) -> None:
        """The engine gave up on a version: a route that follows its image keeps the old one
        after a restart too."""
        route = self.routes.get(cmd.route)
        if route is None or route.image is None or "@" in route.image:
            return
        name = self._image_name(route.image)
        try:
            write_deployed(self.config.images_store, Deployed(name, str(cmd.detail["to"]), str(cmd.detail["from"]),
                                                              "rolled back", time.time()))
        except ImageError as exc:
            log.error("cannot record the rollback of %s: %s", name, exc.detail)

    def pool(self, route: Route) -> SummonedPool:
        pool = self.pools.get(route.name)
        if pool is None or pool.route != route:
            pool = self.pools[route.name] = SummonedPool(self, route)
        return pool

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
                    trial = self.trials.get(cmd.instance_id) if cmd.trial else None
                    if trial is not None:
                        trial.settle(False)  # no trial after all: the boot task probes
                    continue
                fut, pool = entry
                if cmd.trial:
                    lease = SummonedLease(pool, cmd.instance_id, cmd.address, True, cmd.request_id,
                                          self._forwarder(cmd.instance_id))
                    trial = self.trials.get(cmd.instance_id)
                    if trial is not None:  # (always: the boot task made it before `instance_started`)
                        trial.lease = lease
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
            elif isinstance(cmd, Resume):
                self.boot_tasks[cmd.instance_id] = self.loop.create_task(self._resume(cmd))
            elif isinstance(cmd, Foreground):
                self._foreground(cmd)
            elif isinstance(cmd, Stop):
                task = self.loop.create_task(self._stop(cmd))
                self.stop_tasks.add(task)
                task.add_done_callback(self.stop_tasks.discard)
            elif isinstance(cmd, Record):
                self._record(cmd)
                if cmd.kind == "rolled_back":
                    self._rolled_back(cmd)
            for fn in self.listeners:
                fn(cmd)

    def _reject_trial(self, cmd: Reject) -> None:
        """The engine gave up on a booting instance: its trial request gets the answer."""
        for trial in self.trials.values():
            lease = trial.lease
            if lease is not None and lease.request_id == cmd.request_id:
                trial.lease = None
                trial.settle(False)
                lease.abandon(Unavailable(cmd.reason, retry_after_s=cmd.retry_after_s))
                return

    def _trial(self, lease: SummonedLease) -> _Trial | None:
        trial = self.trials.get(lease.instance_id)
        return trial if trial is not None and trial.lease is lease else None

    def trial_answered(self, lease: SummonedLease) -> None:
        """Ready now, not when the boot task next runs: the trial's client may ask again
        before that, and must find a warm pool."""
        trial = self._trial(lease)
        if trial is not None:
            trial.lease = None
        self.execute(self.fleet.instance_ready(lease.instance_id, lease.address, self.now(), by="request",
                                               marks=self._boot_marks(lease.instance_id)))
        if trial is not None:
            trial.settle(True)

    def trial_handed_over(self, lease: SummonedLease) -> None:
        """The trial got a 5xx: the boot task's readiness probe decides now; the lease
        stays, to be sent again once the instance is ready (`_trials_ready`)."""
        trial = self._trial(lease)
        if trial is not None:
            trial.settle(False)

    def trial_left(self, lease: SummonedLease) -> None:
        """The trial's lease is given back (its client left): the probe decides."""
        trial = self._trial(lease)
        if trial is not None:
            trial.lease = None
            trial.settle(False)

    def _trials_ready(self, instance_id: str) -> None:
        """The health probe found the instance ready: a request handed over goes again."""
        trial = self.trials.get(instance_id)
        lease = trial.lease if trial is not None else None
        if trial is not None and lease is not None:
            trial.lease = None
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
            self.trials.pop(cmd.instance_id, None)

    async def _start_and_probe(self, cmd: Boot, route: Route, host: Host, backend: Backend, deadline: float) -> None:
        loop = self.loop
        try:
            assert route.image is not None
            image = self._image_for(cmd, route)
            self.digests[cmd.instance_id] = image.digest
            self.image_targets[route.image] = frozenset(image.targets())
            spec = InstanceSpec(cmd.instance_id, route, host, image, "boot" if cmd.standby else route.start,
                                background=cmd.background)
            if cmd.standby and not isinstance(backend, Pausable):
                raise BackendError(f"start = \"resume\": the {backend.name} driver cannot pause instances")
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
            # fail fast, place elsewhere, retry this host after a back-off (the engine's)
            self.execute(self.fleet.host_unreachable(host.name, self.now()))
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
        handle.exited.add_done_callback(functools.partial(self._exited, cmd.instance_id))
        if cmd.standby:
            await self._park(cmd.instance_id, route, handle, backend, deadline)
            return
        await self._until_ready(cmd.instance_id, route, handle, deadline)

    async def _park(self, instance_id: str, route: Route, handle: Handle, backend: Backend, deadline: float) -> None:
        """A standby: once it answers, pause it; the fleet keeps it for a cold request."""
        reason = await wait_ready(handle.address, route.health_path, deadline, handle.exited)
        self.boot_tasks.pop(instance_id, None)
        if reason is None:
            self._boot_marks(instance_id)  # (stops reading its console: the boot's phases are not a cold start's)
            try:
                assert isinstance(backend, Pausable)
                await backend.pause(handle)
            except BackendError as exc:
                reason = f"cannot pause: {exc.detail}"
        if reason is None and handle.exited.done():  # died meanwhile: a dead standby would fail its request
            reason = "exited" if handle.exited.cancelled() else handle.exited.result()
        if reason is None:
            self.execute(self.fleet.standby_parked(instance_id, handle.address, self.now()))
        else:
            self.execute(self.fleet.boot_failed(instance_id, reason, self.now()))

    def _foreground(self, cmd: Foreground) -> None:
        """A pre-summon a request now waits for (or that is ready): full CPU priority."""
        inst = self.fleet.instances.get(cmd.instance_id)
        backend = self.backends.get(inst.host) if inst is not None else None
        if isinstance(backend, Prioritised):
            task = self.loop.create_task(self._raise_priority(backend, cmd))
            self.stop_tasks.add(task)  # (awaited on close like a stop)
            task.add_done_callback(self.stop_tasks.discard)

    async def _raise_priority(self, backend: Prioritised, cmd: Foreground) -> None:
        try:
            await backend.foreground(cmd.instance_id)
        except Exception:  # noqa: BLE001 - a priority is worth less than the request
            log.exception("foreground %s", cmd.instance_id)
        else:
            log.debug("foreground %s (%s)", cmd.instance_id, cmd.reason)

    async def _resume(self, cmd: Resume) -> None:
        """A cold request took a paused standby: run it again, then as after any start."""
        route = self.routes.get(cmd.route) or self.fleet.pools[cmd.route].route
        backend, handle = self.backends[cmd.host], self.handles.get(cmd.instance_id)
        deadline = self.loop.time() + route.boot_timeout_s
        try:
            if handle is None or not isinstance(backend, Pausable):
                raise BackendError("no paused instance to resume")
            await asyncio.wait_for(backend.resume(handle), max(0.001, deadline - self.loop.time()))
        except asyncio.CancelledError:
            raise
        except (SummonError, TimeoutError) as exc:
            self.boot_tasks.pop(cmd.instance_id, None)
            why = str(exc.detail) if isinstance(exc, SummonError) else "driver did not resume the instance in time"
            self.execute(self.fleet.boot_failed(cmd.instance_id, f"resume failed: {why}", self.now()))
            return
        self.resumed_at[cmd.instance_id] = self.now()
        try:
            await self._until_ready(cmd.instance_id, route, handle, deadline)
        finally:
            self.trials.pop(cmd.instance_id, None)
            self.resumed_at.pop(cmd.instance_id, None)

    async def _until_ready(self, instance_id: str, route: Route, handle: Handle, deadline: float) -> None:
        """The driver has the instance running: its trial request or the probe makes it ready."""
        loop = self.loop
        outcome: asyncio.Future[bool] = loop.create_future()
        self.trials[instance_id] = _Trial(outcome)
        started = self.fleet.instance_started(instance_id, handle.address, self.now())
        self.execute(started)
        if any(isinstance(c, Forward) and c.trial for c in started):
            # The trial is the probe: a second prober would only compete with it for a
            # guest that has just woken up. The health probe takes over if the trial's
            # client leaves or its answer is a 5xx.
            await asyncio.wait((outcome, handle.exited), return_when=asyncio.FIRST_COMPLETED)
            if outcome.done() and outcome.result():
                self.boot_tasks.pop(instance_id, None)
                return  # made ready by `trial_answered`
        reason = await wait_ready(handle.address, route.health_path, deadline, handle.exited)
        self.boot_tasks.pop(instance_id, None)
        if reason is None:
            self.execute(self.fleet.instance_ready(instance_id, handle.address, self.now(),
                                                   marks=self._boot_marks(instance_id)))
            self._trials_ready(instance_id)
        else:
            self.execute(self.fleet.boot_failed(instance_id, reason, self.now()))

    def _forwarder(self, instance_id: str) -> bool:
        """Does the instance's driver hand out an address that accepts before the guest
        listens (a backend's `forwards_connections`)? Then a trial may wait on a dead line."""
        inst = self.fleet.instances.get(instance_id)
        backend = self.backends.get(inst.host) if inst is not None else None
        return bool(getattr(backend, "forwards_connections", False))

    def _image_for(self, cmd: Boot, route: Route) -> Image:
        """The image version the engine boots (see "Versions"), from the store when it is
        there. A route that follows its image (no pin) whose version is gone (the recipe
        edited in place, never built into the store) boots what the image is now, and the
        engine hears of it (its pool switches)."""
        assert route.image is not None
        if not cmd.version.startswith("sha256:"):
            return load_image(self.config.images_dir, route.image, store=self.config.images_store)
        base = route.image.partition("@")[0]
        try:
            return load_image(self.config.images_dir, f"{base}@{cmd.version}", store=self.config.images_store,
                              prefer_store=True)  # cached by mtime; a stored version from the store
        except ImageError:
            if "@" in route.image:
                raise
            image = load_image(self.config.images_dir, base, store=self.config.images_store)
            log.warning("route %s: version %s of %s is gone; booting %s, what it is now", route.name, cmd.version,
                        base, image.digest)
            self.execute(self.fleet.booted_other_version(cmd.instance_id, image.digest, self.now()))
            return image

    def _boot_marks(self, instance_id: str) -> dict[str, float] | None:
        """The driver's marks of this start (libvirt: its phases and the guest's console),
        for the `ready` event's breakdown; None from drivers that keep none."""
        handle, inst = self.handles.get(instance_id), self.fleet.instances.get(instance_id)
        if instance_id in self.resumed_at:  # a woken standby: the driver's resume, then the first answer
            return {"resume": self.resumed_at[instance_id]}
        marks = getattr(self.backends.get(inst.host), "boot_marks", None) if inst is not None else None
        if handle is None or marks is None:
            return None
        try:
            return dict(marks(handle))
        except Exception:  # noqa: BLE001 - a breakdown is worth less than the boot it describes
            log.exception("boot marks of %s", instance_id)
            return None

    def _exited(self, instance_id: str, fut: asyncio.Future[str]) -> None:
        if fut.cancelled() or instance_id not in self.handles:
            return
        reason = fut.result()
        self.execute(self.fleet.instance_died(instance_id, reason, self.now()))

    async def _stop(self, cmd: Stop) -> None:
        self.health.forget(cmd.instance_id)
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
        await background.stop(self._reaper)
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
                host = self.hosts.get(i["host"])
                if host is not None and host.backend == "libvirt":
                    i["arch"] = host.arch  # which of the image's microVM targets it runs
                if i["state"] == "standby":  # what a paused standby really holds, not its budget
                    backend, handle = self.backends.get(i["host"]), self.handles.get(i["id"])
                    if isinstance(backend, Pausable) and handle is not None:
                        i["rss_mib"] = backend.rss_mib(handle)
        if self.coordinator is not None:
            snap["totals"]["cluster"] = self.coordinator.view()
        return snap


def _guest_memory_mib(image: Any) -> int:
    """The most guest memory any of the image's microVM targets asks for (0: none)."""
    sizes = [int(image.target(t).get("memory_mib", 128)) for t in image.targets() if t != "unix"]
    return max(sizes, default=0)
