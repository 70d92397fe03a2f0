"""The asyncio side of a shared fleet: claims before boots, and the registry sync.

How this works: the summoner asks `claim` before a driver starts anything (a permit
under the fleet-wide cap, plus the route's boot lock for a cold pool) and feeds a refusal
back to the engine (`Fleet.boot_refused`). A sync loop renews this engine's leases a few
times a second, publishes its instances and its use of everyone's, and turns what comes
back into engine facts: `foreign_seen` (the others' ready instances, routed to from this
local copy, so a warm request never waits on the store) and `remote_load` (the others'
use of ours, so ours idle out only when nobody uses them). The loop runs faster while a
pool waits for another engine's boot, so that instance is used as soon as it is ready.

Degraded mode: when the store does not answer (`StoreUnavailable`), this engine goes on
serving every instance it knows, and may boot while its own live instances stay below
`local_share`. When the store answers again, each sync re-publishes our instances and
permits; while the registry then lists more instances than the cap, every engine computes
the same victims from the same registry (the excess, by instance id) and drains those it
owns once they are idle (`Fleet.give_up`): no engine needs to ask the others. Both
transitions are events (`store_down`, `store_back`) and `/status` shows the mode.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import background
from ..cluster.store import Claim, Entry, Snapshot, Store, StoreUnavailable
from ..config import Route, is_loopback, parse_address
from ..engine.fleet import Boot, Command, Fleet, Foreign, Record
from ..engine.lifecycle import State

log = logging.getLogger("summon.coordinator")


def _machine_id() -> str:
    """This machine (this boot of it): instances on loopback are reachable only from here."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return socket.gethostname()


MACHINE = _machine_id()


def _routable(e: Entry, node: str) -> Foreign | None:
    """Another engine's ready instance that this engine can reach, as an engine fact."""
    if e.node == node or e.state != "ready" or not e.address:
        return None
    try:
        address = parse_address(e.address)
    except ValueError:
        log.warning("registry entry %s has a bad address %r: ignored", e.instance_id, e.address)
        return None
    if is_loopback(address.host) and e.machine != MACHINE:
        return None  # another machine's loopback (a process instance): not ours to dial
    return Foreign(e.instance_id, e.route, e.image, e.host, e.region, address, e.node)


@dataclass(frozen=True)
class CoordinatorSettings:
    cap: int
    sync_s: float = 0.1  # how often leases are renewed and the registry read
    fast_sync_s: float = 0.02  # while a pool waits for another engine's instance
    local_share: int = 1  # instances this engine may run while the store is unreachable


class Coordinator:
    def __init__(self, store: Store, fleet: Fleet, settings: CoordinatorSettings,
                 execute: Callable[[list[Command]], None], clock: Callable[[], float],
                 image_of: Callable[[str], str]) -> None:
        self.store = store
        self.fleet = fleet
        self.settings = settings
        self.execute = execute
        self.clock = clock
        self.image_of = image_of  # route name -> the image its instances run
        self.degraded_since: float | None = None
        self.last: Snapshot | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._pending: set[asyncio.Task[None]] = set()
        # One store call at a time, in order: a sync that read the engine before an
        # instance stopped must not reach the store after that instance's release (it
        # would bring its permit and entry back for a lease).
        self._serial = asyncio.Lock()
        self.claimed: set[str] = set()  # our instances whose permit the store granted

    @property
    def node(self) -> str:
        return self.store.node

    # --- what the summoner asks ------------------------------------------------------------

    async def claim(self, boot: Boot, route: Route) -> Claim:
        try:
            async with self._serial:
                verdict = await self.store.claim(route.name, boot.instance_id, boot.cold, self.settings.cap,
                                                 lock_s=route.boot_timeout_s + 1.0)
        except StoreUnavailable as exc:
            self._down(exc)
            mine = sum(1 for i in self.fleet.own_live() if i.id in self.claimed)
            if mine < self.settings.local_share:
                self.claimed.add(boot.instance_id)  # published with a permit once the store is back
                return Claim(True)
            return Claim(False, f"shared store unreachable; local share ({self.settings.local_share}) in use")
        if verdict.granted:
            self.claimed.add(boot.instance_id)
        elif verdict.wait_s is not None:
            self._wake.set()  # its instance may already be in the store: read it now
        return verdict

    def observe(self, cmd: Command) -> None:
        """A summoner listener: an instance of ours became ready or went away."""
        if not isinstance(cmd, Record) or cmd.kind not in ("ready", "stopped", "draining"):
            return
        if cmd.kind == "draining":  # out of rotation: tell the others now, within its drain grace
            self._wake.set()
            return
        inst = self.fleet.instances.get(cmd.instance)
        if cmd.kind == "ready" and inst is not None and not inst.owner and inst.address is not None:
            entry = Entry(inst.id, self.node, inst.route, inst.version or self.image_of(inst.route), inst.host, inst.region,
                          str(inst.address), State.READY.value, MACHINE)
            self._spawn(self._store_call(lambda: self.store.ready(entry)))
        elif cmd.kind == "stopped":
            self.claimed.discard(cmd.instance)
            route, instance = cmd.route, cmd.instance
            self._spawn(self._store_call(lambda: self.store.release(route, instance)))

    # --- the sync loop ----------------------------------------------------------------------

    def start(self) -> None:
        self._task = background.repeat(self.sync_once, self._sync_pause, "fleet sync", wake=self._wake)

    def _sync_pause(self) -> float:
        """Soon again while a pool waits for the store's word on a boot, else the usual pace."""
        waiting = any(p.awaiting_until for p in self.fleet.pools.values())
        return self.settings.fast_sync_s if waiting else self.settings.sync_s

    async def sync_once(self) -> None:
        fleet = self.fleet
        try:
            async with self._serial:  # read the engine only once earlier calls are done
                now = self.clock()
                # only what the store granted: a boot not yet claimed (or refused) holds no permit
                mine = [Entry(i.id, self.node, i.route, i.version or self.image_of(i.route), i.host, i.region,
                              str(i.address) if i.address and i.state is not State.BOOTING else "", i.state.value,
                              MACHINE)
                        for i in fleet.own_live() if i.id in self.claimed]
                usage = {i.id: (i.inflight, max(0.0, now - i.last_used))
                         for i in fleet.instances.values() if i.owner}
                snap = await self.store.sync(mine, usage, fleet.local_demand())
        except StoreUnavailable as exc:
            self._down(exc)
            return
        now = self.clock()
        self.last = snap
        foreign = [f for e in snap.entries if (f := _routable(e, self.node)) is not None]
        self.execute(fleet.foreign_seen(foreign, now))
        fleet.remote_load(snap.usage, now)
        fleet.remote_demand(snap.demand, now)
        if self.degraded_since is not None:
            self._back(snap.permits, now)
        live = sorted(e.instance_id for e in snap.entries if e.state in ("booting", "ready"))
        if len(live) > self.settings.cap:  # only after a degraded episode: claims never pass the cap
            self.execute(fleet.give_up(live[self.settings.cap:], now))

    # --- degraded mode ----------------------------------------------------------------------

    def _down(self, exc: StoreUnavailable) -> None:
        if self.degraded_since is None:
            self.degraded_since = self.clock()
            log.warning("shared store unreachable: serving known instances, booting within a local share of %d",
                        self.settings.local_share)
            self.execute([Record("store_down", detail={"error": str(exc.detail), "node": self.node,
                                                       "local_share": self.settings.local_share})])

    def _back(self, permits: int, now: float) -> None:
        assert self.degraded_since is not None
        away = now - self.degraded_since
        self.degraded_since = None
        self.execute([Record("store_back", duration_s=away,
                             detail={"node": self.node, "permits": permits, "cap": self.settings.cap})])

    # --- plumbing -----------------------------------------------------------------------------

    async def _store_call(self, call: Callable[[], Any]) -> None:
        try:
            async with self._serial:
                await call()
        except StoreUnavailable as exc:
            self._down(exc)  # the lease expires on its own; the next sync re-publishes what is ours
        self._wake.set()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def view(self) -> dict[str, Any]:
        snap = self.last
        return {
            "node": self.node,
            "store": type(self.store).__name__,
            "degraded": self.degraded_since is not None,
            "permits": snap.permits if snap is not None else None,
            "cap": self.settings.cap,
        }

    async def close(self) -> None:
        await background.stop(self._task)
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        await self.store.close()
