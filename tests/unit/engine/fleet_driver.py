"""The moves a random run of the fleet engine is made of, shared by the engine's
state-machine tests: a subclass sets up its fleet and adds the requests (and whatever
else it varies); this base keeps track of what the engine commanded (boots, forwards,
stops) and lets Hypothesis finish requests, end boots either way, stop instances and
move the clock in any order."""

from __future__ import annotations

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule

from proxy.config import Address
from proxy.engine.fleet import Boot, Fleet, Forward, Reject, Stop


def addr(n: int) -> Address:
    return Address("127.0.0.1", 10000 + n)


class FleetDriver(RuleBasedStateMachine):
    fleet: Fleet
    STOP_ENDS_BOOT = False  # True: a Stop of a booting instance means its boot never reports

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.rid = 0
        self.inflight: list[tuple[str, str, int]] = []  # (route, instance, request id)
        self.booting: list[str] = []
        self.stopping: list[str] = []

    def seen(self, command: object) -> None:
        """A subclass's own check of each command, before it is tracked."""

    def _apply(self, out: list) -> None:  # type: ignore[type-arg]
        for c in out:
            self.seen(c)
            if isinstance(c, Boot):
                self.booting.append(c.instance_id)
            elif isinstance(c, Forward):
                self.inflight.append((self.fleet.instances[c.instance_id].route, c.instance_id, c.request_id))
            elif isinstance(c, Reject):  # a trial given up with its instance
                self.inflight = [x for x in self.inflight if x[2] != c.request_id]
            elif isinstance(c, Stop):
                self.stopping.append(c.instance_id)
                if self.STOP_ENDS_BOOT and c.instance_id in self.booting:
                    self.booting.remove(c.instance_id)

    @precondition(lambda self: self.inflight)
    @rule(i=st.integers(0, 1000))
    def finish(self, i: int) -> None:
        route, iid, _ = self.inflight.pop(i % len(self.inflight))
        self._apply(self.fleet.request_finished(route, iid, True, self.now))

    @precondition(lambda self: self.booting)
    @rule(i=st.integers(0, 1000), ok=st.booleans())
    def boot_done(self, i: int, ok: bool) -> None:
        iid = self.booting.pop(i % len(self.booting))
        if ok:
            self._apply(self.fleet.instance_ready(iid, addr(i), self.now))
        else:
            self._apply(self.fleet.boot_failed(iid, "panic", self.now))

    @precondition(lambda self: self.stopping)
    @rule(i=st.integers(0, 1000))
    def stopped(self, i: int) -> None:
        iid = self.stopping.pop(i % len(self.stopping))
        self._apply(self.fleet.instance_stopped(iid, self.now))

    @rule(dt=st.floats(0.01, 3.0))
    def tick(self, dt: float) -> None:
        self.now += dt
        self._apply(self.fleet.tick(self.now))
