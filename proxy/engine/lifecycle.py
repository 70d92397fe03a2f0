"""Instance lifecycle: every legal transition lives in this file.

    BOOTING --ready--> READY --drain--> DRAINING --stop--> STOPPED
       |                 |                 |
       +--fail--> FAILED <--fail-----------+   (FAILED --stop--> STOPPED once destroyed)
       +--stop--> STOPPED                      (a boot cancelled: timeout, shutdown)

    PREPARING --park--> STANDBY --wake--> BOOTING   (paused standbys, `start = "resume"`)
       |                   |
       +--fail/stop--------+--fail/stop--> FAILED / STOPPED   (reclaimed, route gone)

A standby is booted like any instance (PREPARING), paused once it answers (STANDBY),
and woken by a cold request: from then on it is an ordinary boot whose driver step is
a resume, made ready by the request itself.

An illegal transition is a bug in the engine, raised as `LifecycleError`, never
silently ignored.
"""

from __future__ import annotations

import enum


class State(enum.Enum):
    BOOTING = "booting"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"
    PREPARING = "preparing"  # booting to become a paused standby
    STANDBY = "standby"  # booted, then paused: memory, no CPU; woken by a cold request


class LifecycleError(RuntimeError):
    pass


TRANSITIONS: dict[State, dict[str, State]] = {
    State.BOOTING: {"ready": State.READY, "fail": State.FAILED, "stop": State.STOPPED},
    State.READY: {"drain": State.DRAINING, "fail": State.FAILED, "stop": State.STOPPED},
    State.DRAINING: {"stop": State.STOPPED, "fail": State.FAILED},
    State.FAILED: {"stop": State.STOPPED},
    State.STOPPED: {},
    State.PREPARING: {"park": State.STANDBY, "fail": State.FAILED, "stop": State.STOPPED},
    State.STANDBY: {"wake": State.BOOTING, "fail": State.FAILED, "stop": State.STOPPED},
}

# count against caps (a standby holds its slot until it is reclaimed; see `Fleet._reclaim`)
LIVE = frozenset({State.BOOTING, State.READY, State.DRAINING, State.PREPARING, State.STANDBY})
STANDBYS = frozenset({State.PREPARING, State.STANDBY})
LIVE_STATES = frozenset(s.value for s in LIVE)  # the same, as /status spells them


def next_state(state: State, event: str) -> State:
    try:
        return TRANSITIONS[state][event]
    except KeyError:
        raise LifecycleError(f"cannot {event} an instance that is {state.value}") from None
