"""Instance lifecycle: every legal transition lives in this file.

    BOOTING --ready--> READY --drain--> DRAINING --stop--> STOPPED
       |                 |                 |
       +--fail--> FAILED <--fail-----------+   (FAILED --stop--> STOPPED once destroyed)
       +--stop--> STOPPED                      (a boot cancelled: timeout, shutdown)

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


class LifecycleError(RuntimeError):
    pass


TRANSITIONS: dict[State, dict[str, State]] = {
    State.BOOTING: {"ready": State.READY, "fail": State.FAILED, "stop": State.STOPPED},
    State.READY: {"drain": State.DRAINING, "fail": State.FAILED, "stop": State.STOPPED},
    State.DRAINING: {"stop": State.STOPPED, "fail": State.FAILED},
    State.FAILED: {"stop": State.STOPPED},
    State.STOPPED: {},
}

LIVE = frozenset({State.BOOTING, State.READY, State.DRAINING})  # count against caps


def next_state(state: State, event: str) -> State:
    try:
        return TRANSITIONS[state][event]
    except KeyError:
        raise LifecycleError(f"cannot {event} an instance that is {state.value}") from None
