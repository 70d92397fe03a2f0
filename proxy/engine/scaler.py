"""How many replicas a pool wants: Knative's KPA, per route, as a pure function.

How this works: every tick records the pool's concurrency (requests in flight plus
requests queued for a boot). Two moving averages over those samples: a *stable* window
(60 s) and a short *panic* window (6 s). The wanted replica count is
``ceil(average / target_concurrency)`` over the stable window, except in panic mode:
when the panic window asks for at least twice the ready replicas (a spike), the
panic figure is used and the pool never shrinks until the spike has been gone for a
whole stable window. Scale-in happens only after `scale_in_delay_s` of the stable
figure being below the ready count, one replica at a time (the fleet drains it).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ScalerSettings:
    stable_window_s: float = 60.0
    panic_window_s: float = 6.0
    panic_threshold: float = 2.0  # Knative: 200% of current capacity
    scale_in_delay_s: float = 30.0


@dataclass
class _Window:
    span_s: float
    samples: deque[tuple[float, int]] = field(default_factory=deque)
    total: int = 0

    def add(self, now: float, value: int) -> None:
        self.samples.append((now, value))
        self.total += value
        horizon = now - self.span_s
        while self.samples and self.samples[0][0] <= horizon:
            self.total -= self.samples.popleft()[1]

    def average(self) -> float:
        return self.total / len(self.samples) if self.samples else 0.0

    def peak(self) -> int:
        return max((v for _, v in self.samples), default=0)


@dataclass
class ScalerState:
    stable: _Window | None = None
    panic: _Window | None = None
    panic_until: float = 0.0
    below_since: float | None = None
    region_demand: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Decision:
    replicas: int
    panic: bool
    scale_in_ok: bool
    reason: str


def desired_replicas(
    state: ScalerState, settings: ScalerSettings, now: float, concurrency: int, ready: int, target: int
) -> Decision:
    if state.stable is None or state.panic is None:
        state.stable = _Window(settings.stable_window_s)
        state.panic = _Window(settings.panic_window_s)
    state.stable.add(now, concurrency)
    state.panic.add(now, concurrency)
    target = max(1, target)
    stable_avg = state.stable.average()
    panic_avg = state.panic.average()
    want_stable = math.ceil(stable_avg / target) if stable_avg > 0 else 0
    want_panic = math.ceil(panic_avg / target) if panic_avg > 0 else 0
    if ready > 0 and want_panic >= settings.panic_threshold * ready:
        state.panic_until = now + settings.stable_window_s
    panic = now < state.panic_until
    if panic:
        want = max(want_panic, ready)
        reason = f"panic: {panic_avg:.1f} concurrent over {settings.panic_window_s:g}s, target {target}/replica"
    else:
        # the instantaneous figure as well, so a burst is met before the average catches up
        want_now = math.ceil(concurrency / target) if concurrency else 0
        want = max(want_stable, want_now)
        if want_now > want_stable:
            reason = f"burst: {concurrency} concurrent now, target {target}/replica"
        else:
            reason = f"stable: {stable_avg:.1f} concurrent over {settings.stable_window_s:g}s, target {target}/replica"
    if want < ready:
        if state.below_since is None:
            state.below_since = now
    else:
        state.below_since = None
    scale_in_ok = state.below_since is not None and now - state.below_since >= settings.scale_in_delay_s
    if scale_in_ok:
        state.below_since = now  # one replica per delay period
    return Decision(want, panic, scale_in_ok, reason)
