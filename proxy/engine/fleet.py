"""The summoning engine: every pool, every host, the global cap. No I/O, no clock.

How this works (h11 style): the shell tells the fleet what happened by calling one of
its fact methods (`request_arrived`, `instance_ready`, `boot_failed`, `tick`, ...) with
the current time, and gets back a list of commands (`Boot`, `Foreground`, `Forward`,
`Reject`, `Stop`, `Record`) to carry out. The fleet never waits, sleeps or reads a clock, so
tests drive it with a fake clock in microseconds and both fronts (the native proxy
and the mitmproxy addon) share it.

Rules kept here, and only here:
- exactly one boot per cold pool, however many requests arrive together; more boots
  only when the scaler asks for them;
- a request waits at most `boot_timeout`, in a queue of at most `queue_size`;
- the fleet never has more live instances than `max_instances`, nor a pool more
  than `max_replicas`, nor a host more than its `slots`;
- a pool whose boots keep failing backs off exponentially;
- an instance idle for `idle_timeout` is drained and stopped (down to `min_replicas`);
  a request in flight (a WebSocket tunnel is one, for its whole life) keeps it busy,
  and idleness counts from the end of the last one;
- a draining instance stops when its last request ends, or at `drain_timeout` after the
  drain began, whatever is still open (long-lived tunnels) is cut then;
- a `start = "resume"` route keeps up to `standbys` booted-then-paused instances
  (PREPARING, then STANDBY), within its host's `standby_memory_mib`: a cold request
  wakes one (`Resume`) instead of booting, and the pool boots a new standby in the
  background once no start of its own is in flight (a standby's boot would only slow
  a cold start down on the same cores). Standbys count against the cap and host slots
  but not `max_replicas`, and are the first thing reclaimed when a real boot needs
  their slot; they never reclaim anything themselves;
- a cold pool's first safe bodiless request is its trial: forwarded as soon as the driver
  has the instance running (`instance_started`), before readiness is known, so the
  request itself is the readiness probe and a cold start costs no extra round trip
  into the guest (the shell retries it until the instance answers);
- a pre-summon (`_presummon`, rules in proxy/engine/prefetch.py) is, with `[prefetch]
  low_priority = true` (off by default: on a CPU-bound host the starved followers cost
  more than the page gains), a background `Boot`: the driver starts it at a low CPU
  priority, so that on shared cores the starts a request waits for come first;
  `Foreground` lifts that, once, as soon as a real request queues for its pool or when it
  is ready.

Rolling deploy (`deploy`, or `set_routes` with another version for a route): a pool
knows the version it should serve (`PoolState.version`, the image's manifest digest as the
shell resolved it) and every instance the version it was booted from; every boot is of
the pool's version. When the version changes:
- the old instances keep serving until an instance of the new version is ready, so a
  request never waits for a cold boot while an old replica is up; meanwhile the pool boots
  as many new instances as it had old ones ready (the surge). The surge counts against the
  fleet's `max_instances` and the hosts' slots, not against the route's `max_replicas` (the
  old replicas are on their way out); at the cap it is smaller, and with no room at all
  one old replica is drained to make room (the others keep serving);
- once one is ready, the old instances take no new requests: they drain (in-flight
  requests finish there) and stop; `deployed` is recorded;
- `rollback_after_failures` failed boots of the new version before one is ready
  (default 3, with the usual back-off between them) switch the pool back to the version
  it served, recorded as `rolled_back` with the reason; the old instances never stopped
  serving meanwhile.
Every switch starts with `deploy_started` (from, to, why: deploy, rollback, reload).

One fleet over several engines (workers, proxies): each engine owns the instances it
booted; the others' ready instances come in as `foreign_seen` (from the shared registry)
and are routed to like its own, but never stopped, drained or idled here. Their owners
learn this engine's use of them through `remote_load`, so an instance idles out only
when no engine uses it. Before the driver starts, the shell asks the shared store for a
permit (the fleet-wide cap) and, for a cold pool, the route's boot lock; a refusal comes
back as `boot_refused`: another engine is booting the route (wait for its instance), or
the fleet is at its cap (503 + Retry-After).
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..config import Address, Host, Limits, PrefetchSettings, Region, Route
from .balancer import BoundedLoadBalancer
from .lifecycle import LIVE, STANDBYS, State, next_state
from .prefetch import Prefetcher
from .scaler import ScalerSettings, ScalerState, desired_replicas

# --- commands (what the shell must do) ---------------------------------------------


@dataclass(frozen=True)
class Boot:
    instance_id: str
    route: str
    host: str
    region: str
    cold: bool = False  # the pool had no instance at all: fleet-wide, only one engine may boot it
    standby: bool = False  # boot it, wait until it answers, pause it, report `standby_parked`
    version: str = ""  # the image version to boot (the pool's, see "Rolling deploy"); "" = the route's image
    background: bool = False  # a pre-summon (a guess): start it at a low CPU priority until `Foreground`


@dataclass(frozen=True)
class Foreground:
    """A background start (`Boot.background`) that a real request now waits for, or that is
    ready: from now on it gets the CPU like any other instance. Sent once per instance."""

    instance_id: str
    reason: str  # "request" (one queued for its pool) or "ready"


@dataclass(frozen=True)
class Resume:
    """Wake a paused standby; from here on it is a boot (`instance_started`, then ready)."""

    instance_id: str
    route: str
    host: str


@dataclass(frozen=True)
class Forward:
    request_id: int
    instance_id: str
    address: Address
    trial: bool = False  # the instance is not known to be ready: this request probes it


@dataclass(frozen=True)
class Reject:
    request_id: int
    retry_after_s: int
    reason: str


@dataclass(frozen=True)
class Stop:
    instance_id: str
    reason: str


@dataclass(frozen=True)
class Record:
    """An event for the log; `proxy.observe.events.Event` fields."""

    kind: str
    route: str = ""
    instance: str = ""
    host: str = ""
    region: str = ""
    duration_s: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)


Command = Boot | Foreground | Resume | Forward | Reject | Stop | Record


@dataclass(frozen=True)
class Refused:
    """Why `Fleet._boot` could not boot (cap, max_replicas, slots, budget): what a cold
    request refused at once is told. Falsy, as a boot that did not happen."""

    reason: str

    def __bool__(self) -> bool:
        return False

BACKOFF_BASE_S = 1.0
BACKOFF_MAX_S = 60.0
DEFAULT_GUEST_MIB = 128  # a standby whose image's memory is unknown counts as the driver's default guest
# A host whose hypervisor did not answer (HostUnavailable) is tried again after 5 s, 10 s,
# 20 s ... at most 5 minutes: long enough not to hammer a dead libvirtd with every cold
# request, short enough that a restarted one is back in use within minutes.
HOST_BACKOFF_BASE_S = 5.0
HOST_BACKOFF_MAX_S = 300.0
# A host its driver reported down stays out of placement until the driver says it is up.
HOST_DOWN_HOLD_S = 24 * 3600.0
# In a shared fleet a draining instance is stopped only this long after it left rotation
# (and once no engine reports a request on it): the others' copies of the registry lag by
# up to a sync or two, and a request they send meanwhile must still find it up.
SHARED_DRAIN_GRACE_S = 0.5
# A foreign instance that failed a request is not routed to for this long (or until the
# registry drops it), whatever the registry still says.
FOREIGN_UNREACHABLE_S = 10.0


@dataclass
class Instance:
    id: str
    route: str
    host: str
    region: str
    state: State
    summoned_at: float
    address: Address | None = None
    ready_at: float | None = None
    last_used: float = 0.0
    inflight: int = 0
    served: int = 0
    first_request_at: float | None = None
    trial: int | None = None  # the request id sent to it while booting (see `instance_started`)
    started_at: float | None = None  # when the driver had it running (`instance_started`)
    owner: str = ""  # another engine's node name: a foreign instance (see `foreign_seen`); "" = ours
    remote_inflight: int = 0  # other engines' requests on this (own) instance, from `remote_load`
    drained_at: float | None = None  # when it left rotation (a shared fleet stops it a grace later)
    stopping: bool = False  # its Stop has been sent (a shared fleet's tick sends it once)
    presummoned_by: str = ""  # the route whose request pre-summoned it (see `_presummon`)
    background: bool = False  # started at a low CPU priority, no `Foreground` sent yet
    woken_at: float | None = None  # a standby woken by a cold request: its start counts from here
    memory_mib: int = 0  # a standby's guest memory, counted against its host's standby budget
    version: str = ""  # the image version it was booted from

    @property
    def start_at(self) -> float:
        """When the start a request waits for began: the summons, or a standby's wake-up."""
        return self.summoned_at if self.woken_at is None else self.woken_at

    def move(self, event: str) -> None:
        self.state = next_state(self.state, event)


@dataclass(frozen=True)
class Foreign:
    """Another engine's ready instance, as the shared registry describes it."""

    instance_id: str
    route: str
    image: str  # the image version its owner booted it from: another one than our pool's is not ours to use
    host: str
    region: str
    address: Address
    owner: str


@dataclass
class Rollout:
    """A switch of a pool's version under way (see "Rolling deploy")."""

    from_version: str
    to_version: str
    started_at: float
    reason: str  # "deploy", "rollback", "reload"
    surge: int  # new instances to boot before the old ones leave: the old ones that were ready
    failed_boots: int = 0
    making_room: str = ""  # an old instance drained because the cap left no room for the surge


@dataclass
class Waiting:
    key: str
    region: str
    deadline: float
    trial_ok: bool = False  # a safe method, no body: may be sent to an instance before it is ready


@dataclass
class PoolState:
    route: Route
    balancer: BoundedLoadBalancer
    instances: dict[str, Instance] = field(default_factory=dict)
    queue: OrderedDict[int, Waiting] = field(default_factory=OrderedDict)
    failures: int = 0
    backoff_until: float = 0.0
    scaler: ScalerState = field(default_factory=ScalerState)
    removed: bool = False  # route gone after a reload: drain and forget
    reclaim_pending: bool = False  # at the cap, another route's idle instance is being stopped for us
    awaiting_until: float = 0.0  # another engine is booting this cold route: wait for its instance
    remote_demand: dict[str, float] = field(default_factory=dict)  # other engines' recent demand by client region
    version: str = ""  # the image version new instances are booted from
    previous: str = ""  # the version served before the last switch (what a rollback goes back to)
    rollout: Rollout | None = None

    def live(self) -> list[Instance]:
        return [i for i in self.instances.values() if i.state in LIVE]

    def replicas(self, version: str | None = None) -> int:
        """Live instances that serve or are about to (standbys are not replicas yet); of
        `version` only, if given (a rolling deploy's surge)."""
        return sum(1 for i in self.instances.values() if i.state in LIVE and i.state not in STANDBYS
                   and (version is None or i.version == version))

    def count(self, state: State) -> int:
        return sum(1 for i in self.instances.values() if i.state is state)

    def concurrency(self) -> int:
        return sum(i.inflight for i in self.instances.values()) + len(self.queue)


def boot_phases(summoned_at: float, marks: Mapping[str, float], ready_at: float) -> dict[str, float]:
    """Seconds spent in each phase of a start: from the summons to the first mark, from
    each mark to the next, and ``first_response`` from the last to ready. A mark earlier
    than the one before it (clocks read at different resolutions) counts as that one, so
    no phase is negative and the phases add up to the whole boot."""
    out: dict[str, float] = {}
    prev = summoned_at
    for name, at in marks.items():
        at = min(max(at, prev), ready_at)
        out[name] = round(at - prev, 4)
        prev = at
    out["first_response"] = round(ready_at - prev, 4)
    return out


class Fleet:
    def __init__(
        self,
        limits: Limits,
        hosts: Iterable[Host],
        regions: Iterable[Region] = (),
        default_region: str = "local",
        new_id: Callable[[str], str] | None = None,
        scaler: ScalerSettings | None = None,
        balance_factor: float = 1.25,
        node: str = "",
        shared: bool = False,
        drain_timeout_s: float = math.inf,
        placeable: Callable[[Route, Host], bool] | None = None,
        prefetch: PrefetchSettings | None = None,
        memory_of: Callable[[Route], int] | None = None,
    ) -> None:
        # Can `host` boot `route`'s image (has the image an artefact for the host's arch)? The
        # shell answers from images it has already loaded, so placement stays free of I/O.
        self.placeable = placeable
        # The guest memory (MiB) one instance of the route takes, for standby budgets; the
        # shell answers from the images it has loaded (None: every guest counts 128 MiB).
        self.memory_of = memory_of
        self.node = node  # this engine's name in a shared fleet ("" alone)
        # in a shared fleet a boot is only real once the store granted it (`boot_claimed`):
        # "summoned" is recorded then, so the log never counts a boot that did not happen
        self.shared = shared
        self._unclaimed: dict[str, Record] = {}
        self._unreachable: dict[str, float] = {}  # foreign instance -> until when it is not taken back
        self.limits = limits
        self.hosts = {h.name: h for h in hosts}
        self.regions = {r.name: r for r in regions}
        self.default_region = default_region
        self.scaler = scaler or ScalerSettings()
        self.balance_factor = balance_factor
        self.drain_timeout_s = drain_timeout_s
        self.pools: dict[str, PoolState] = {}
        self.instances: dict[str, Instance] = {}
        self.host_used: dict[str, int] = {h: 0 for h in self.hosts}
        self.host_down_until: dict[str, float] = {}
        self.host_failures: dict[str, int] = {}  # HostUnavailable in a row, per host (`host_unreachable`)
        self._cap_recorded = False  # "cap_reached" is in the log for this episode at the cap
        self._counter = 0
        self._new_id = new_id or self._default_id
        self.instance_seconds: dict[str, float] = {}  # per route, closed instances only
        self.budget_spent: deque[tuple[float, float]] = deque()  # (end time, instance-seconds)
        self.prefetch = Prefetcher(prefetch)
        self._unclaimed_presummons: dict[str, Record] = {}  # shared fleet: logged once the boot is granted

    def _default_id(self, route: str) -> str:
        self._counter += 1
        return f"{route}-{self._counter}"

    # --- configuration -------------------------------------------------------------

    def set_routes(self, routes: Iterable[Route], now: float, versions: Mapping[str, str] | None = None,
                   reasons: Mapping[str, str] | None = None) -> list[Command]:
        """Install the summoned routes (first start or reload). Pools of unchanged
        routes keep their instances; pools of removed routes drain. `versions`: route name
        -> the image version it should serve (the shell resolves pins, deployed versions
        and latest builds; a route left out serves its `image` string as its version); a
        pool whose version changes switches by a rolling deploy (`reasons[name]` says why,
        default "reload")."""
        out: list[Command] = []
        wanted = {r.name: r for r in routes if r.summoned}
        versions = versions or {}
        for name, pool in list(self.pools.items()):
            new = wanted.get(name)
            if new is None:
                pool.removed = True
                for inst in list(pool.instances.values()):
                    if inst.owner:
                        self._drop_foreign(inst)
                    elif inst.state is State.READY:
                        self._drain(pool, inst, now, "route removed", out)
                    elif inst.state is State.BOOTING:
                        self._end_trial(inst, 1, "route removed", out)
                        self._stop(inst, "route removed", out)
                    elif inst.state in STANDBYS and not inst.stopping:
                        inst.stopping = True
                        self._stop(inst, "route removed", out)
                for rid in list(pool.queue):
                    out.append(Reject(rid, 1, "route removed"))
                pool.queue.clear()
            elif new != pool.route:
                if new.image != pool.route.image:
                    for inst in list(pool.instances.values()):
                        if inst.owner:  # another engine's, of the image as it was
                            self._drop_foreign(inst)
                pool.route = new
        self.prefetch.set_routes(wanted.values())
        for name, route in wanted.items():
            version = versions.get(name) or route.image or ""
            if name not in self.pools:
                self.pools[name] = PoolState(route=route, balancer=BoundedLoadBalancer(self.balance_factor),
                                             version=version)
                continue
            pool = self.pools[name]
            pool.removed = False
            if version != pool.version:
                self._deploy(pool, version, now, (reasons or {}).get(name, "reload"), out)
        out.extend(self.tick(now))
        return out

    # --- rolling deploys (rules in the module docstring) -------------------------------

    def deploy(self, route: str, version: str, now: float, reason: str = "deploy") -> list[Command]:
        """Switch `route`'s pool to `version` (a rolling deploy); nothing if it serves it already."""
        out: list[Command] = []
        pool = self.pools.get(route)
        if pool is not None and not pool.removed and version and version != pool.version:
            self._deploy(pool, version, now, reason, out)
        return out

    def rollback(self, route: str, now: float) -> list[Command]:
        """Switch `route` back to the version it served before its last switch."""
        pool = self.pools.get(route)
        if pool is None or not pool.previous:
            return []
        return self.deploy(route, pool.previous, now, "rollback")

    def booted_other_version(self, instance_id: str, version: str, now: float) -> list[Command]:
        """The shell could not boot the version asked for (a route following an image whose
        recipe was edited in place: that version is gone) and booted `version`, what is
        there now: the instance is of that version, and its pool switches to it."""
        inst = self.instances.get(instance_id)
        out: list[Command] = []
        if inst is None or inst.owner or inst.version == version:
            return out
        inst.version = version
        pool = self.pools.get(inst.route)
        if pool is not None and not pool.removed and pool.version != version:
            self._deploy(pool, version, now, "the version it served is gone: now the image's current one", out)
        return out

    def _deploy(self, pool: PoolState, version: str, now: float, reason: str, out: list[Command]) -> None:
        old = pool.version
        ready = [i for i in pool.instances.values() if not i.owner and i.state is State.READY and i.version != version]
        pool.previous, pool.version = old, version
        pool.failures, pool.backoff_until = 0, 0.0  # back-off was the old version's
        pool.rollout = Rollout(old, version, now, reason, surge=len(ready))
        for inst in list(pool.instances.values()):
            if inst.state in STANDBYS and not inst.owner and not inst.stopping and inst.version != version:
                inst.stopping = True  # a paused standby of the old version is never woken: stopped now
                self._stop(inst, "image changed", out)
        room = self.limits.max_instances - self.live_count()
        out.append(Record("deploy_started", pool.route.name, detail={
            "from": old, "to": version, "reason": reason, "surge": len(ready), "cap_room": max(0, room)}))
        self._roll(pool, now, out)

    def _roll(self, pool: PoolState, now: float, out: list[Command]) -> None:
        """One step of a pool's switch: the old instances leave rotation as soon as one of
        the new version is ready; until then the surge boots (see the module docstring)."""
        stale = [i for i in pool.instances.values() if i.version != pool.version and i.state in LIVE]
        fresh = [i for i in pool.instances.values() if i.version == pool.version]
        ro = pool.rollout
        if any(i.state is State.READY for i in fresh):
            drained = 0
            for inst in stale:
                if inst.owner:
                    self._drop_foreign(inst)  # another engine's old one: out of our rotation, its owner drains it
                elif inst.state is State.READY:
                    self._drain(pool, inst, now, f"replaced by {pool.version}", out)
                    drained += 1
                elif inst.state is State.BOOTING and inst.trial is None:
                    self._stop(inst, f"replaced by {pool.version}", out)
            if ro is not None:
                pool.rollout = None
                out.append(Record("deployed", pool.route.name, detail={
                    "from": ro.from_version, "to": ro.to_version, "reason": ro.reason,
                    "took_s": round(now - ro.started_at, 3), "drained": drained}))
            return
        if ro is None or pool.removed or now < pool.backoff_until:
            return
        serving = [i for i in stale if i.state is State.READY]
        if not serving:
            return  # nothing of the old version serves: the new one boots on demand, as any cold pool
        booting = sum(1 for i in fresh if i.state is State.BOOTING and not i.owner)
        for _ in range(max(1, ro.surge) - booting):
            booted = self._boot(pool, self._busiest_region(pool), now, f"deploy of {pool.version}", out, surge=True)
            if booted:
                continue
            if (booting == 0 and not ro.making_room and not pool.reclaim_pending
                    and self.live_count() >= self.limits.max_instances):
                # no room at all under the cap: one old replica makes way (the others serve on)
                own = [i for i in serving if not i.owner]
                if not own:
                    break
                victim = min(own, key=lambda i: (i.inflight, i.last_used))
                ro.making_room = victim.id
                self._drain(pool, victim, now, f"making room for {pool.version} (instance cap)", out)
            break

    # --- facts ------------------------------------------------------------------------

    def request_arrived(self, route: str, request_id: int, key: str, region: str | None, now: float,
                        avoid: str | None = None, trial_ok: bool = False) -> list[Command]:
        """`avoid`: an instance this request just failed on (a retry goes elsewhere if it can).
        `trial_ok`: the request may be retried freely (a safe method, no body), so it can be
        a booting instance's readiness probe."""
        pool = self.pools[route]
        region = region or self.default_region
        if pool.balancer.load:
            inst_id = self._pick(pool, key, region, avoid)
            inst = self.instances[inst_id]
            self._assign(pool, inst, now, region)
            warm: list[Command] = [Forward(request_id, inst.id, inst.address)]  # type: ignore[arg-type]
            if inst.first_request_at is None:
                warm.append(self._first(inst, now))
            if route in self.prefetch.on:
                self._presummon(route, region, now, warm)
            return warm
        out: list[Command] = []
        if len(pool.queue) >= pool.route.queue_size:
            out.append(Reject(request_id, self._retry_after(pool, now), "boot queue full"))
            out.append(Record("rejected", route, detail={"reason": "boot queue full"}))
            return out
        if now < pool.backoff_until and not pool.count(State.BOOTING):
            wait = pool.backoff_until - now
            out.append(Reject(request_id, max(1, math.ceil(wait)), "boots failing: backing off"))
            out.append(Record("rejected", route, detail={"reason": "backoff"}))
            return out
        pool.queue[request_id] = Waiting(key, region, now + pool.route.boot_timeout_s, trial_ok)
        self._foreground(pool, "request", out)
        if now < pool.awaiting_until:
            return out  # another engine is booting this route: its instance will serve the queue
        if not pool.count(State.BOOTING) and not pool.reclaim_pending:
            booted = self._summon(pool, region, now, "cold request", out)
            if isinstance(booted, Refused) and not pool.reclaim_pending:
                # could not boot (cap, slots, budget): tell the client now, not later
                del pool.queue[request_id]
                out.append(Reject(request_id, 2, booted.reason))
                out.append(Record("rejected", route, detail={"reason": booted.reason}))
        if route in self.prefetch.on:
            self._presummon(route, region, now, out)
        return out

    def request_finished(self, route: str, instance_id: str, ok: bool, now: float) -> list[Command]:
        inst = self.instances.get(instance_id)
        if inst is None:
            return []
        inst.inflight -= 1
        inst.served += 1
        inst.last_used = now
        if not ok and inst.owner:
            # Another engine's instance failed us (refused, reset): its owner may be dead and
            # the registry not know it for a lease yet. Out of our rotation until then.
            self._unreachable[inst.id] = now + FOREIGN_UNREACHABLE_S
            self._drop_foreign(inst)
            return []
        if inst.state is State.BOOTING:
            inst.trial = None  # the trial's client went away before the instance answered
            return []
        pool = self.pools.get(inst.route)
        if pool is not None:
            pool.balancer.release(inst.id)
            if inst.state is State.DRAINING and self._drained(inst, now):
                out: list[Command] = []
                self._stop(inst, "drained", out)
                return out
        return []

    def _drained(self, inst: Instance, now: float) -> bool:
        if inst.inflight:
            return False
        if not self.shared:
            return True
        return inst.remote_inflight == 0 and now - (inst.drained_at or now) >= SHARED_DRAIN_GRACE_S

    def request_cancelled(self, route: str, request_id: int, now: float) -> list[Command]:
        pool = self.pools.get(route)
        if pool is not None:
            pool.queue.pop(request_id, None)
        return []

    def instance_started(self, instance_id: str, address: Address, now: float) -> list[Command]:
        """The driver has the instance running at `address`; whether the application
        answers yet is unknown. A cold pool sends it its first queued `trial_ok` request
        now: that request is the readiness probe (the shell retries it until the
        instance answers, and reports `instance_ready` on its first answer)."""
        inst = self.instances.get(instance_id)
        out: list[Command] = []
        if inst is not None:
            self.host_failures.pop(inst.host, None)  # its hypervisor answers again: no back-off left
        if inst is None or inst.state is not State.BOOTING or inst.trial is not None:
            return out
        pool = self.pools[inst.route]
        inst.address = address
        inst.started_at = now
        if pool.balancer.load or pool.removed:
            return out  # a warm pool scaling up: its queue is served by the ready replicas
        for rid, w in pool.queue.items():
            if w.trial_ok:
                del pool.queue[rid]
                inst.trial = rid
                inst.inflight += 1
                inst.last_used = now
                out.append(Forward(rid, inst.id, address, trial=True))
                break
        return out

    def standby_parked(self, instance_id: str, address: Address, now: float) -> list[Command]:
        """A standby's boot answered and the driver paused it: it waits for a cold request."""
        inst = self.instances.get(instance_id)
        if inst is None or inst.state is not State.PREPARING:
            return []
        pool = self.pools[inst.route]
        inst.move("park")
        inst.address = address
        pool.failures = 0
        pool.backoff_until = 0.0
        return [Record("standby", inst.route, inst.id, inst.host, inst.region, now - inst.summoned_at,
                       {"memory_mib": inst.memory_mib})]

    def instance_ready(self, instance_id: str, address: Address, now: float, by: str = "probe",
                       marks: Mapping[str, float] | None = None) -> list[Command]:
        """`by`: what showed it ready, the readiness probe or a trial "request" (for the log).
        `marks`: when each phase of the start ended, as the driver saw it (same clock as
        `now`, in order; see `boot_phases`)."""
        inst = self.instances.get(instance_id)
        out: list[Command] = []
        if inst is None or inst.state is not State.BOOTING:
            return out
        pool = self.pools[inst.route]
        inst.move("ready")
        if inst.background:  # a guess that came true or not: ready, it runs like any instance
            inst.background = False
            out.append(Foreground(inst.id, "ready"))
        inst.address = address
        inst.ready_at = now
        inst.last_used = now
        inst.trial = None  # from now on an ordinary request
        pool.failures = 0
        pool.backoff_until = 0.0
        if pool.removed:
            self._drain(pool, inst, now, "route removed", out)
            return out
        if inst.version != pool.version and any(
                i.state is State.READY and i.version == pool.version for i in pool.instances.values()):
            self._drain(pool, inst, now, f"replaced by {pool.version}", out)  # booted before a switch that is done
            return out
        pool.balancer.add(inst.id)
        for _ in range(inst.inflight):
            pool.balancer.acquire(inst.id)  # the trial, already on its way
        waited = len(pool.queue) + inst.inflight
        detail: dict[str, Any] = {"cold_requests": waited, "ready_by": by}
        if inst.started_at is not None:  # how the boot divides: the driver, then the application
            # rounded down to 0.1 ms: the driver's share can never read as more than the whole
            detail["driver_s"] = math.floor((inst.started_at - inst.start_at) * 10_000) / 10_000
        if inst.woken_at is not None:
            detail["start"] = "resume"  # a paused standby, woken: duration_s is resume to first answer
        if marks:
            detail["phases"] = boot_phases(inst.start_at, marks, now)
            detail["image"] = pool.route.image or ""  # the breakdown is per image (`summon stats`)
        out.append(Record("ready", inst.route, inst.id, inst.host, inst.region, now - inst.start_at, detail))
        if inst.inflight and inst.first_request_at is None:
            out.append(self._first(inst, now))
        self._flush_queue(pool, now, out)
        if pool.rollout is not None or inst.version == pool.version:
            self._roll(pool, now, out)  # the new version is ready: the old one leaves rotation now
        return out

    def boot_failed(self, instance_id: str, reason: str, now: float) -> list[Command]:
        inst = self.instances.get(instance_id)
        out: list[Command] = []
        if inst is None or inst.state not in (State.BOOTING, State.PREPARING):
            return out
        pool = self.pools[inst.route]
        phase = "standby" if inst.state is State.PREPARING else "boot"
        inst.move("fail")
        pool.failures += 1
        backoff = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** (pool.failures - 1))
        pool.backoff_until = now + backoff
        out.append(Record("failed", inst.route, inst.id, inst.host, inst.region, now - inst.start_at,
                          {"reason": reason, "phase": phase, "backoff_s": backoff}))
        self._end_trial(inst, max(1, math.ceil(backoff)), f"instance failed to boot: {reason}", out)
        out.append(Stop(inst.id, f"boot failed: {reason}"))
        if not pool.count(State.BOOTING) and not pool.balancer.load:
            for rid in list(pool.queue):
                out.append(Reject(rid, max(1, math.ceil(backoff)), f"instance failed to boot: {reason}"))
            if pool.queue:
                out.append(Record("rejected", inst.route, detail={"reason": "boot failed", "requests": len(pool.queue)}))
            pool.queue.clear()
        ro = pool.rollout
        if ro is not None and inst.version == pool.version:
            ro.failed_boots += 1
            if ro.failed_boots >= pool.route.rollback_after_failures and ro.from_version:
                self._roll_back(pool, ro, reason, now, out)
        return out

    def _roll_back(self, pool: PoolState, ro: Rollout, last: str, now: float, out: list[Command]) -> None:
        """The new version failed to boot `rollback_after_failures` times: serve the old one again."""
        bad, good = pool.version, ro.from_version
        pool.version, pool.previous = good, bad
        pool.rollout = None
        pool.failures, pool.backoff_until = 0, 0.0  # the old version boots fine: no back-off for it
        why = f"{ro.failed_boots} boot(s) of {bad} failed (last: {last})"
        for inst in list(pool.instances.values()):
            if not inst.owner and inst.version == bad and inst.state is State.BOOTING:
                self._end_trial(inst, 1, f"version {bad} rolled back", out)
                self._stop(inst, "version rolled back", out)
        out.append(Record("rolled_back", pool.route.name, detail={
            "from": bad, "to": good, "reason": why, "failed_boots": ro.failed_boots, "automatic": True,
            "took_s": round(now - ro.started_at, 3)}))
        self._roll(pool, now, out)  # an instance of a third version that served meanwhile leaves rotation

    def instance_died(self, instance_id: str, reason: str, now: float) -> list[Command]:
        """A ready (or draining) instance stopped on its own: out of rotation, replaced on demand."""
        inst = self.instances.get(instance_id)
        out: list[Command] = []
        if inst is None or inst.state not in (State.READY, State.DRAINING, State.STANDBY):
            return out
        pool = self.pools[inst.route]
        pool.balancer.remove(inst.id)
        inst.move("fail")
        out.append(Record("failed", inst.route, inst.id, inst.host, inst.region, now - inst.summoned_at,
                          {"reason": reason, "phase": "running"}))
        out.append(Stop(inst.id, f"died: {reason}"))
        return out

    def instance_stopped(self, instance_id: str, now: float) -> list[Command]:
        inst = self.instances.get(instance_id)
        out: list[Command] = []
        if inst is None:
            return out
        if inst.state is not State.STOPPED:
            inst.move("stop")
        self._forget(inst, now, out)
        self._cap_recorded = False
        out.extend(self._serve_waiting(now))
        pool = self.pools.get(inst.route)
        if pool is not None and pool.rollout is not None:
            if pool.rollout.making_room == inst.id:
                pool.rollout.making_room = ""
            self._roll(pool, now, out)  # a slot freed up: the surge may boot now
        return out

    def host_unreachable(self, host: str, now: float) -> list[Command]:
        """A boot on `host` failed with HostUnavailable: place elsewhere, and try this host
        again after an exponential back-off (`HOST_BACKOFF_BASE_S` doubling up to
        `HOST_BACKOFF_MAX_S`), reset when it next starts an instance. The boot itself is
        reported apart, as `boot_failed`."""
        n = self.host_failures[host] = self.host_failures.get(host, 0) + 1
        return self.host_failed(host, now, min(HOST_BACKOFF_MAX_S, HOST_BACKOFF_BASE_S * 2 ** (n - 1)))

    def host_reported(self, host: str, up: bool, reason: str, reaped: list[str], now: float) -> list[Command]:
        """A driver that watches its host (a remote libvirt host) says it stopped or started
        answering. Down: out of placement until the word "up" (`HOST_DOWN_HOLD_S` at most).
        Up: placeable at once, with no back-off left; `reaped`: the instances its driver
        destroyed on the host's return (for the log)."""
        self.host_failures.pop(host, None)
        self.host_down_until[host] = now + (0.0 if up else HOST_DOWN_HOLD_S)
        h = self.hosts.get(host)
        region = h.region if h is not None else ""
        if up:
            return [Record("host_up", host=host, region=region, detail={"reaped": reaped})]
        return [Record("host_down", host=host, region=region, detail={"reason": reason})]

    def host_failed(self, host: str, now: float, retry_after_s: float) -> list[Command]:
        """The host's hypervisor is unreachable: place elsewhere until `retry_after_s`."""
        self.host_down_until[host] = now + retry_after_s
        return [Record("host_down", host=host, detail={"retry_in_s": retry_after_s})]

    def boot_claimed(self, instance_id: str, now: float) -> list[Command]:
        """The shared store granted the boot's permit: now it is a boot."""
        record = self._unclaimed.pop(instance_id, None)
        presummoned = self._unclaimed_presummons.pop(instance_id, None)
        return [r for r in (record, presummoned) if r is not None]

    def boot_refused(self, instance_id: str, reason: str, now: float, wait_s: float | None = None) -> list[Command]:
        """The shared store refused the boot before the driver started anything.
        `wait_s`: another engine holds the route's boot lock, so its instance will come (as
        `foreign_seen`): the queue waits for it, up to `wait_s` or each request's deadline.
        Otherwise the fleet is at its cap: the queue is answered 503 now."""
        inst = self.instances.get(instance_id)
        out: list[Command] = []
        if inst is None or inst.state is not State.BOOTING:
            return out
        pool = self.pools[inst.route]
        inst.move("stop")  # never started: nothing to stop, nothing to charge
        self._unclaimed.pop(inst.id, None)
        self._unclaimed_presummons.pop(inst.id, None)
        self.instances.pop(inst.id, None)
        pool.instances.pop(inst.id, None)
        self.host_used[inst.host] = max(0, self.host_used.get(inst.host, 1) - 1)
        self._end_trial(inst, 1, reason, out)
        if wait_s is not None:
            pool.awaiting_until = now + wait_s
            out.append(Record("boot_deferred", inst.route, inst.id, detail={"reason": reason}))
            return out
        out.append(Record("cap_reached", inst.route, detail={"cap": self.limits.max_instances, "reason": reason}))
        if not pool.count(State.BOOTING) and not pool.balancer.load:
            for rid in list(pool.queue):
                out.append(Reject(rid, 2, reason))
            if pool.queue:
                out.append(Record("rejected", inst.route, detail={"reason": reason, "requests": len(pool.queue)}))
            pool.queue.clear()
        return out

    def foreign_seen(self, seen: Iterable[Foreign], now: float) -> list[Command]:
        """The other engines' ready instances: the whole set each time, so that one that
        is gone from it (stopped, or its owner's lease expired) leaves the balancer."""
        out: list[Command] = []
        for iid in [i for i, until in self._unreachable.items() if until <= now]:
            del self._unreachable[iid]
        current = {f.instance_id: f for f in seen if f.owner != self.node and f.instance_id not in self._unreachable}
        for inst in [i for i in self.instances.values() if i.owner]:
            if inst.id not in current:
                self._drop_foreign(inst)
        for f in current.values():
            pool = self.pools.get(f.route)
            if pool is None or pool.removed:
                continue
            known = self.instances.get(f.instance_id)
            if known is not None:  # (of an old version: routed to until the switch, like ours; see `_roll`)
                known.address = f.address
                continue
            if f.image != pool.version:
                continue  # another version than ours: not ours to use
            inst = Instance(f.instance_id, f.route, f.host, f.region, State.READY, now, address=f.address,
                            ready_at=now, last_used=now, first_request_at=now, owner=f.owner, version=f.image)
            self.instances[inst.id] = inst
            pool.instances[inst.id] = inst
            pool.balancer.add(inst.id)
            if f.host in self.host_used:  # the same host serves several engines: its slots are shared
                self.host_used[f.host] += 1
            pool.awaiting_until = 0.0
            self._flush_queue(pool, now, out)
        return out

    def remote_load(self, loads: dict[str, tuple[int, float]], now: float) -> None:
        """Other engines' use of our instances: instance id -> (requests in flight there,
        seconds since one of them last used it). An instance idles out only when nobody
        uses it."""
        for inst in self.instances.values():
            if inst.owner:
                continue
            load = loads.get(inst.id)
            if load is None:
                inst.remote_inflight = 0
                continue
            inst.remote_inflight = load[0]
            inst.last_used = max(inst.last_used, now - load[1])

    def give_up(self, instance_ids: Iterable[str], now: float) -> list[Command]:
        """The fleet holds more instances than its cap (engines booted on their local shares
        while the store was away) and these were chosen to go: drain ours among them that
        are idle; busy ones are left to idle out."""
        out: list[Command] = []
        for iid in instance_ids:
            inst = self.instances.get(iid)
            if (inst is not None and not inst.owner and inst.state is State.READY and inst.inflight == 0
                    and inst.remote_inflight == 0):
                self._drain(self.pools[inst.route], inst, now, "over the fleet cap", out)
        return out

    def local_demand(self) -> dict[str, dict[str, float]]:
        """This engine's recent demand per route and client region, for the other engines."""
        return {name: dict(p.scaler.region_demand) for name, p in self.pools.items() if p.scaler.region_demand}

    def remote_demand(self, demand: dict[str, dict[str, float]], now: float) -> None:
        """The other engines' recent demand per route and client region: whichever engine
        decides to scale out, it places the replica where the fleet's clients are."""
        for name, pool in self.pools.items():
            pool.remote_demand = dict(demand.get(name, {}))

    def _drop_foreign(self, inst: Instance) -> None:
        self.instances.pop(inst.id, None)
        pool = self.pools.get(inst.route)
        if pool is not None:
            pool.instances.pop(inst.id, None)
            pool.balancer.remove(inst.id)
        if inst.host in self.host_used:
            self.host_used[inst.host] = max(0, self.host_used[inst.host] - 1)

    def tick(self, now: float) -> list[Command]:
        out: list[Command] = []
        if self.shared:  # draining instances whose grace is over (`_drained`)
            for inst in list(self.instances.values()):
                if inst.state is State.DRAINING and not inst.owner and not inst.stopping and self._drained(inst, now):
                    inst.stopping = True
                    self._stop(inst, "drained", out)
        for name, pool in list(self.pools.items()):
            # requests that waited too long
            for rid, w in list(pool.queue.items()):
                if now >= w.deadline:
                    del pool.queue[rid]
                    out.append(Reject(rid, self._retry_after(pool, now), "timed out waiting for an instance"))
                    out.append(Record("rejected", name, detail={"reason": "boot timeout"}))
            for inst in list(pool.instances.values()):
                if (inst.state in (State.BOOTING, State.PREPARING)
                        and now - inst.start_at > pool.route.boot_timeout_s):
                    out.extend(self.boot_failed(inst.id, f"not ready after {pool.route.boot_timeout_s:g}s", now))
                elif (inst.state is State.DRAINING and not inst.owner and not inst.stopping
                      and now - (inst.drained_at or now) >= self.drain_timeout_s):
                    inst.stopping = True  # one Stop; instance_stopped follows
                    self._stop(inst, f"drain_timeout ({self.drain_timeout_s:g}s) with {inst.inflight} request(s) "
                               "still open", out)
            if pool.reclaim_pending and not pool.queue:
                pool.reclaim_pending = False
            if pool.awaiting_until and now >= pool.awaiting_until:
                pool.awaiting_until = 0.0  # the other engine's boot never showed up: try ourselves
                if pool.queue and not pool.count(State.BOOTING) and not pool.balancer.load and not pool.removed:
                    first = next(iter(pool.queue.values()))
                    self._summon(pool, first.region, now, "cold request (other node's boot did not arrive)", out)
            if pool.removed:
                if not pool.live() and not pool.instances:
                    del self.pools[name]
                continue
            if pool.rollout is not None:
                self._roll(pool, now, out)
            self._scale(pool, now, out)
            self._keep_standbys(pool, now, out)
            demand = pool.scaler.region_demand
            for region in list(demand):
                demand[region] *= 0.8  # recent demand by client region, for placement
                if demand[region] < 0.01:
                    del demand[region]
        return out

    # --- decisions -------------------------------------------------------------------

    def _scale(self, pool: PoolState, now: float, out: list[Command]) -> None:
        route = pool.route
        ready = [i for i in pool.instances.values() if i.state is State.READY]
        booting = pool.count(State.BOOTING)
        # scale to zero / down to min: idle instances (our own; another engine idles its own)
        for inst in list(ready):
            idle_s = self._idle_timeout(route, inst)
            if (not inst.owner and inst.inflight == 0 and inst.remote_inflight == 0
                    and now - inst.last_used >= idle_s and len(ready) > route.min_replicas):
                self._drain(pool, inst, now, f"idle for {idle_s:g}s", out)
                ready.remove(inst)
        decision = desired_replicas(pool.scaler, self.scaler, now, pool.concurrency(), len(ready),
                                    route.target_concurrency)
        want = max(route.min_replicas, min(route.max_replicas, decision.replicas))
        live = len(ready) + booting
        demand_now = pool.concurrency() > 0
        if now < pool.awaiting_until:
            pass  # another engine is booting this route: its instance comes first
        elif want > live and (demand_now or live < route.min_replicas) and (booting == 0 or booting < len(ready)):
            # (no demand right now: the averages still remember the spike, but a new
            # replica would only idle out; pools shrink through idle_timeout instead)
            # never faster than the backend boots: at most as many boots in flight as ready replicas
            n = min(want - live, max(1, len(ready)) - booting) if ready else max(0, min(want - live, 1 - booting))
            if live == 0 and route.min_replicas == 0 and not pool.queue:
                n = 0  # pools start cold; the first request boots
            for _ in range(max(0, n)):
                region = self._busiest_region(pool)
                if not self._summon(pool, region, now, decision.reason, out):
                    break
                out.append(Record("scale", route.name, detail={"from": live, "to": want, "reason": decision.reason,
                                                                "panic": decision.panic}))
        elif len(ready) > max(want, route.min_replicas, 1) and not decision.panic and decision.scale_in_ok:
            # the last replica goes only through idle_timeout (scale to zero)
            own = [i for i in ready if not i.owner]
            if own:
                victim = min(own, key=lambda i: (i.inflight + i.remote_inflight, i.last_used))
                self._drain(pool, victim, now, decision.reason, out)
                out.append(Record("scale", route.name, detail={"from": len(ready), "to": want,
                                                                "reason": decision.reason}))

    def _busiest_region(self, pool: PoolState) -> str:
        counts: dict[str, float] = {}
        for w in pool.queue.values():
            counts[w.region] = counts.get(w.region, 0) + 1
        for demand in (pool.scaler.region_demand, pool.remote_demand):  # ours, and the fleet's others'
            for region, n in demand.items():
                counts[region] = counts.get(region, 0) + n
        if not counts:
            return self.default_region
        return max(counts.items(), key=lambda kv: kv[1])[0]

    # --- paused standbys (`start = "resume"`) -----------------------------------------------

    def _summon(self, pool: PoolState, region: str, now: float, reason: str,
                out: list[Command]) -> Boot | Resume | Refused:
        """One more instance for `pool`: a paused standby woken if it has one, else a boot."""
        return self._wake(pool, now, reason, out) or self._boot(pool, region, now, reason, out)

    def _wake(self, pool: PoolState, now: float, reason: str, out: list[Command]) -> Resume | None:
        parked = [i for i in pool.instances.values() if i.state is State.STANDBY and not i.owner and not i.stopping
                  and i.version == pool.version]
        if not parked or pool.replicas() >= pool.route.max_replicas:
            return None
        inst = min(parked, key=lambda i: i.summoned_at)
        inst.move("wake")
        inst.woken_at = now
        inst.last_used = now
        inst.started_at = None
        inst.memory_mib = 0  # no longer a standby: its memory leaves the standby budget
        resume = Resume(inst.id, inst.route, inst.host)
        out.append(resume)
        out.append(Record("summoned", inst.route, inst.id, inst.host, inst.region,
                          detail={"reason": reason, "start": "resume"}))
        return resume

    def standby_memory_mib(self, host: str) -> int:
        """Guest memory held by this host's standbys (paused or being prepared)."""
        return sum(i.memory_mib for i in self.instances.values() if i.host == host and i.state in STANDBYS)

    def _keep_standbys(self, pool: PoolState, now: float, out: list[Command]) -> None:
        """Top a resume route's standbys up to `standbys`, one boot at a time, into free
        capacity only; stop any beyond it (the route changed)."""
        route = pool.route
        want = route.standbys if route.start == "resume" and route.image is not None else 0
        mine = [i for i in pool.instances.values() if i.state in STANDBYS and not i.owner and not i.stopping]
        if len(mine) > want:
            extra = sorted(mine, key=lambda i: (i.state is State.STANDBY, -i.summoned_at))[:len(mine) - want]
            for inst in extra:
                inst.stopping = True  # one Stop; its memory counts until `instance_stopped`
                self._stop(inst, f"standbys = {want}", out)
            return
        if (len(mine) >= want or any(i.state is State.PREPARING for i in mine) or pool.count(State.BOOTING)
                or now < pool.backoff_until or pool.queue or self._someone_waits()):
            return
        if self.live_count() >= self.limits.max_instances or self._over_budget(now):
            return
        self._boot(pool, self._busiest_region(pool), now, "standby", out, standby=True)

    def _boot(self, pool: PoolState, region: str, now: float, reason: str, out: list[Command],
              standby: bool = False, surge: bool = False, background: bool = False) -> Boot | Refused:
        """Boot one instance of the pool's version for `pool`: the Boot (also appended to
        `out`), or why not. A standby's boot (`standby`) goes only into free capacity and
        within its host's standby memory; it reclaims nothing. `surge`: a rolling deploy's,
        beside the old replicas: `max_replicas` counts only the new version's. `background`:
        a pre-summon's, at a low CPU priority until `_foreground`."""
        route = pool.route
        replicas = pool.replicas(pool.version if surge else None)
        if not standby and replicas >= route.max_replicas:
            return Refused(f"route at max_replicas ({route.max_replicas})")
        if standby and self.live_count() >= self.limits.max_instances:
            return Refused("no free capacity for a standby")
        if self.live_count() >= self.limits.max_instances:
            if not self._reclaim(pool, now, out):
                if not self._cap_recorded:  # recorded once per episode, not every tick
                    self._cap_recorded = True
                    out.append(Record("cap_reached", route.name, detail={"cap": self.limits.max_instances}))
                return Refused(f"instance cap reached ({self.limits.max_instances})")
            if self.live_count() >= self.limits.max_instances:
                # the boot happens when the reclaimed instance has stopped (_serve_waiting)
                pool.reclaim_pending = True
                return Refused("waiting for a reclaimed instance to stop")
        if self._over_budget(now):
            out.append(Record("budget_spent", route.name))
            return Refused("instance-seconds budget spent")
        memory = (self.memory_of(route) if self.memory_of is not None else 0) or DEFAULT_GUEST_MIB
        host = self._place(region, now, route, memory if standby else None)
        if host is None:
            return Refused("no host has a free slot" + (" and standby memory" if standby else ""))
        if not standby:
            pool.reclaim_pending = False
        if self.live_count() + 1 < self.limits.max_instances:
            self._cap_recorded = False
        cold = not standby and not any(i.state not in STANDBYS for i in pool.instances.values())
        inst = Instance(self._new_id(route.name), route.name, host.name, host.region,
                        State.PREPARING if standby else State.BOOTING, now, last_used=now,
                        memory_mib=memory if standby else 0, version=pool.version, background=background)
        self.instances[inst.id] = inst
        pool.instances[inst.id] = inst
        self.host_used[host.name] += 1
        boot = Boot(inst.id, route.name, host.name, host.region, cold, standby, pool.version, background)
        out.append(boot)
        summoned = Record("summoned", route.name, inst.id, host.name, host.region,
                          detail={"reason": reason, "client_region": region})
        if self.shared:
            self._unclaimed[inst.id] = summoned
        else:
            out.append(summoned)
        return boot

    def _place(self, region: str, now: float, route: Route | None = None,
               standby_mib: int | None = None) -> Host | None:
        """Client's region first, then its nearest-first fallbacks, then anywhere; only hosts
        that can boot the route's image (an arm64 edge full: the nearest x86_64 host), and
        for a standby (`standby_mib`) only hosts whose standby memory has room for it."""
        order = [region]
        r = self.regions.get(region)
        if r is not None:
            order.extend(n for n in r.nearest if n not in order)
        order.extend(n for n in self.regions if n not in order)
        order.extend(h.region for h in self.hosts.values() if h.region not in order)
        for name in order:
            candidates = [h for h in self.hosts.values()
                          if h.region == name and self.host_used[h.name] < h.slots
                          and self.host_down_until.get(h.name, 0.0) <= now
                          and (route is None or self.placeable is None or self.placeable(route, h))
                          and (standby_mib is None
                               or self.standby_memory_mib(h.name) + standby_mib <= h.standby_memory_mib)]
            if candidates:
                return min(candidates, key=lambda h: (self.host_used[h.name] / max(1, h.slots), h.name))
        return None

    def _reclaim(self, cold: PoolState, now: float, out: list[Command]) -> bool:
        """At the cap, stop the least recently used idle instance of another route
        (a standby goes first, then a pre-summoned instance that no request has used,
        booted or not)."""
        standbys = [i for i in self.instances.values() if i.state in STANDBYS and not i.owner and not i.stopping]
        if standbys:
            # one still being prepared has cost least so far; then the oldest paused one
            victim = min(standbys, key=lambda i: (i.state is State.STANDBY, i.summoned_at))
            victim.stopping = True
            self._stop(victim, f"reclaimed for {cold.route.name} (standby)", out)
            return True
        if self._reclaim_presummoned(cold, now, out):
            return True
        best: Instance | None = None
        for pool in self.pools.values():
            if pool is cold:
                continue
            ready = [i for i in pool.instances.values() if i.state is State.READY]
            if len(ready) <= pool.route.min_replicas:
                continue
            for inst in ready:
                if (not inst.owner and inst.inflight == 0 and inst.remote_inflight == 0
                        and (best is None or inst.last_used < best.last_used)):
                    best = inst
        if best is None:
            return False
        self._drain(self.pools[best.route], best, now, f"reclaimed for {cold.route.name}", out)
        return True

    # --- predictive summoning (rules in proxy/engine/prefetch.py) ----------------------

    def _presummon(self, route: str, region: str, now: float, out: list[Command]) -> None:
        """A request on `route` arrived: boot its cold followers now, beside its own boot.
        Only into free capacity: never past the cap or budget (nothing is reclaimed for a
        guess), never while a real request waits for a slot, and always leaving one slot
        free under the cap, so that the next real request boots at once instead of
        waiting for a pre-summon to be reclaimed."""
        chosen = self.prefetch.choose(route, lambda name: self._cold(name, now))
        if not chosen or self._someone_waits():
            return
        for name in chosen:
            if self.live_count() + 1 >= self.limits.max_instances or self._over_budget(now):
                return
            pool = self.pools[name]
            booted = self._boot(pool, region, now, f"pre-summoned by {route}", out,
                                background=self.prefetch.settings.low_priority)
            if isinstance(booted, Refused):
                return  # (a guess refused is nobody's refusal: nothing to tell anyone)
            inst = self.instances[booted.instance_id]
            inst.presummoned_by = route
            record = Record("presummoned", name, inst.id, inst.host, inst.region, detail={"by": route})
            if self.shared:
                self._unclaimed_presummons[inst.id] = record
            else:
                out.append(record)

    def _foreground(self, pool: PoolState, reason: str, out: list[Command]) -> None:
        """A real request queued for `pool`: its background start (a pre-summon) is what the
        request waits for now, so it stops yielding the CPU. Once per instance."""
        for inst in pool.instances.values():
            if inst.background and inst.state is State.BOOTING:
                inst.background = False
                out.append(Foreground(inst.id, reason))

    def _cold(self, name: str, now: float) -> bool:
        pool = self.pools.get(name)
        return (pool is not None and not pool.instances and not pool.queue and not pool.removed
                and now >= pool.backoff_until and now >= pool.awaiting_until and not pool.reclaim_pending)

    def _someone_waits(self) -> bool:
        """A real request waits for capacity: a slot that frees up is its, not a guess's."""
        return any(p.reclaim_pending or (p.queue and not p.balancer.load and not p.count(State.BOOTING))
                   for p in self.pools.values())

    def _idle_timeout(self, route: Route, inst: Instance) -> float:
        if inst.presummoned_by and inst.first_request_at is None:
            return min(route.idle_timeout_s, self.prefetch.settings.unused_idle_timeout_s)
        return route.idle_timeout_s

    def _reclaim_presummoned(self, cold: PoolState, now: float, out: list[Command]) -> bool:
        """Stop a pre-summoned instance nobody has used or waits for (oldest first)."""
        unused = [i for i in self.instances.values()
                  if i.presummoned_by and i.first_request_at is None and not i.owner and i.inflight == 0
                  and i.route != cold.route.name and i.state in (State.BOOTING, State.READY)
                  and not self.pools[i.route].queue]
        if not unused:
            return False
        victim = min(unused, key=lambda i: i.summoned_at)
        reason = f"reclaimed for {cold.route.name} (pre-summoned, unused)"
        if victim.state is State.READY:
            self._drain(self.pools[victim.route], victim, now, reason, out)
        else:
            self._stop(victim, reason, out)
        return True

    def _over_budget(self, now: float) -> bool:
        budget = self.limits.budget_instance_seconds_per_hour
        if budget is None:
            return False
        return self.spent_last_hour(now) >= budget

    def spent_last_hour(self, now: float) -> float:
        horizon = now - 3600.0
        while self.budget_spent and self.budget_spent[0][0] < horizon:
            self.budget_spent.popleft()
        closed = sum(s for _, s in self.budget_spent)
        running = sum(now - max(i.summoned_at, horizon) for i in self.instances.values() if i.state in LIVE)
        return closed + running

    def _pick(self, pool: PoolState, key: str, region: str, avoid: str | None = None) -> str:
        if len(pool.balancer.load) == 1:
            return next(iter(pool.balancer.load))
        instances = self.instances
        node = pool.balancer.pick(key, lambda n: instances[n].region == region, exclude=avoid)
        assert node is not None
        return node

    def _assign(self, pool: PoolState, inst: Instance, now: float, region: str) -> None:
        inst.inflight += 1
        inst.last_used = now
        pool.balancer.acquire(inst.id)
        demand = pool.scaler.region_demand
        demand[region] = demand.get(region, 0.0) + 1.0

    def _flush_queue(self, pool: PoolState, now: float, out: list[Command]) -> None:
        while pool.queue and pool.balancer.load:
            rid, w = pool.queue.popitem(last=False)
            inst = self.instances[self._pick(pool, w.key, w.region)]
            self._assign(pool, inst, now, w.region)
            out.append(Forward(rid, inst.id, inst.address))  # type: ignore[arg-type]
            if inst.first_request_at is None:
                out.append(self._first(inst, now))

    def _first(self, inst: Instance, now: float) -> Record:
        inst.first_request_at = now
        return Record("first_request", inst.route, inst.id, inst.host, inst.region, now - inst.start_at)

    def _serve_waiting(self, now: float) -> list[Command]:
        """A slot freed up: cold pools that are waiting get their boot."""
        out: list[Command] = []
        for pool in self.pools.values():
            if pool.queue and not pool.count(State.BOOTING) and not pool.balancer.load and not pool.removed:
                first = next(iter(pool.queue.values()))
                pool.reclaim_pending = False
                self._summon(pool, first.region, now, "cold request (after reclaim)", out)
        return out

    def _drain(self, pool: PoolState, inst: Instance, now: float, reason: str, out: list[Command]) -> None:
        if inst.state is not State.READY:
            return
        pool.balancer.remove(inst.id)
        inst.move("drain")
        inst.drained_at = now
        out.append(Record("draining", inst.route, inst.id, inst.host, inst.region, detail={"reason": reason}))
        if self._drained(inst, now):
            self._stop(inst, reason, out)

    def _end_trial(self, inst: Instance, retry_after_s: int, reason: str, out: list[Command]) -> None:
        """A booting instance is given up: its trial request gets the same answer as the queue."""
        if inst.trial is not None:
            out.append(Reject(inst.trial, retry_after_s, reason))
            inst.trial = None
            inst.inflight -= 1

    def _stop(self, inst: Instance, reason: str, out: list[Command]) -> None:
        out.append(Stop(inst.id, reason))

    def _forget(self, inst: Instance, now: float, out: list[Command]) -> None:
        self.instances.pop(inst.id, None)
        pool = self.pools.get(inst.route)
        if pool is not None:
            pool.instances.pop(inst.id, None)
            pool.balancer.remove(inst.id)
        self.host_used[inst.host] = max(0, self.host_used.get(inst.host, 1) - 1)
        lifetime = now - inst.summoned_at
        self.instance_seconds[inst.route] = self.instance_seconds.get(inst.route, 0.0) + lifetime
        self.budget_spent.append((now, lifetime))
        out.append(Record("stopped", inst.route, inst.id, inst.host, inst.region, lifetime,
                          {"served": inst.served}))

    def _retry_after(self, pool: PoolState, now: float) -> int:
        if now < pool.backoff_until:
            return max(1, math.ceil(pool.backoff_until - now))
        return 1

    # --- views -------------------------------------------------------------------------

    def steady(self, route: str) -> bool:
        """Whether this pool's next decisions would all go the same way as the last: nothing
        booting, draining or queued, and as many ready replicas as `max_replicas`, so no
        scale-out can follow. A host proxy may then reuse a decision for a while (the
        plugin's decision cache), although the engine no longer sees each request."""
        pool = self.pools.get(route)
        if pool is None or pool.removed or pool.queue:
            return False
        live = pool.live()
        return bool(live) and all(i.state is State.READY for i in live) and len(live) >= pool.route.max_replicas

    def live_count(self) -> int:
        return sum(1 for i in self.instances.values() if i.state in LIVE)

    def own_live(self) -> list[Instance]:
        """The instances this engine booted and still answers for (in a shared fleet, its permits)."""
        return [i for i in self.instances.values() if not i.owner and i.state in LIVE]

    def snapshot(self) -> dict[str, Any]:
        """What GET /status shows."""
        routes = []
        for name, pool in sorted(self.pools.items()):
            routes.append({
                "name": name,
                "image": pool.route.image,
                "version": pool.version,
                "previous_version": pool.previous or None,
                "rollout": None if pool.rollout is None else {
                    "from": pool.rollout.from_version, "to": pool.rollout.to_version, "reason": pool.rollout.reason,
                    "started_at": pool.rollout.started_at, "surge": pool.rollout.surge,
                    "failed_boots": pool.rollout.failed_boots},
                "queued": len(pool.queue),
                "backoff_until": pool.backoff_until or None,
                "instances": [
                    {
                        "id": i.id,
                        "node": i.owner or self.node,
                        "state": i.state.value,
                        "host": i.host,
                        "region": i.region,
                        "address": str(i.address) if i.address else None,
                        "inflight": i.inflight,
                        "summoned_at": i.summoned_at,
                        "ready_at": i.ready_at,
                        "woken_at": i.woken_at,  # a standby woken by a cold request: its start
                        "version": i.version,
                    }
                    for i in pool.instances.values()
                ],
            })
        standbys = [i for i in self.instances.values() if i.state in STANDBYS and not i.owner]
        return {"routes": routes, "totals": {
            "instances": self.live_count(), "cap": self.limits.max_instances,
            # paused standbys hold memory, not CPU: what each host keeps of its budget
            "standby": {"instances": len(standbys), "memory_mib": sum(i.memory_mib for i in standbys),
                        "hosts": {h: {"memory_mib": self.standby_memory_mib(h), "budget_mib": host.standby_memory_mib}
                                  for h, host in sorted(self.hosts.items()) if self.standby_memory_mib(h)}},
        }}
