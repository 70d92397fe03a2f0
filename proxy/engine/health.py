"""Health checks of ready instances: which one is due a probe, and when misses make it dead.

How this works: on every tick the shell asks `due(fleet, now)` and runs one HTTP probe
per `Probe` it gets back (GET `path`, at most `timeout_s`), then reports each outcome
with `finished`. An instance is due `health_interval` after it became ready or after
its last probe began, never while a probe of it is still out; another engine's
instance is its owner's to probe. `health_failures` misses in a row make it dead: the
verdict says so, and the shell tells the fleet (`Fleet.instance_died`), which replaces
it on demand. An answer below 500 resets the count.

No I/O and no clock: the time comes in with each call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from ..config import Address
from .fleet import Fleet
from .lifecycle import State

PROBE_TIMEOUT_MAX_S = 2.0  # a probe never waits longer than this (nor than the interval)


@dataclass(frozen=True)
class Probe:
    """Probe `instance_id` at `address` now."""

    instance_id: str
    address: Address
    path: str
    timeout_s: float
    failures_allowed: int  # the route's health_failures when the probe began


class Verdict(NamedTuple):
    misses: int  # misses in a row so far (0: healthy)
    dead: str | None  # why the instance is to be treated as dead, or None


class HealthChecks:
    def __init__(self) -> None:
        self.probing: set[str] = set()  # instances with a probe out
        self.last_probe: dict[str, float] = {}  # instance id -> when its last probe began
        self.misses: dict[str, int] = {}

    def due(self, fleet: Fleet, now: float) -> list[Probe]:
        """The probes to run now; each one is counted as out until `finished` or `dropped`."""
        out: list[Probe] = []
        for inst in fleet.instances.values():
            if inst.state is not State.READY or inst.address is None or inst.id in self.probing or inst.owner:
                continue
            pool = fleet.pools.get(inst.route)
            if pool is None or pool.removed:
                continue
            route = pool.route
            if route.health_interval_s <= 0:
                continue
            if now - self.last_probe.get(inst.id, inst.ready_at or now) < route.health_interval_s:
                continue
            self.probing.add(inst.id)
            self.last_probe[inst.id] = now
            out.append(Probe(inst.id, inst.address, route.health_path,
                             min(PROBE_TIMEOUT_MAX_S, route.health_interval_s), route.health_failures))
        return out

    def finished(self, probe: Probe, status: int | None) -> Verdict:
        """The probe got `status` (None: no answer in time, refused, reset)."""
        self.probing.discard(probe.instance_id)
        if status is not None and status < 500:
            self.misses.pop(probe.instance_id, None)
            return Verdict(0, None)
        misses = self.misses[probe.instance_id] = self.misses.get(probe.instance_id, 0) + 1
        if misses >= probe.failures_allowed:
            del self.misses[probe.instance_id]
            return Verdict(misses, f"failed {misses} health checks")
        return Verdict(misses, None)

    def dropped(self, instance_id: str) -> None:
        """The probe ended without an outcome (cancelled at shutdown)."""
        self.probing.discard(instance_id)

    def forget(self, instance_id: str) -> None:
        """The instance is being stopped: a later instance never inherits its schedule."""
        self.last_probe.pop(instance_id, None)
        self.misses.pop(instance_id, None)
