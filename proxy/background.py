"""The background loops of a running node (fleet sync, event shipping, following
announcements, learning prefetch followers): one step again and again, a pause between.

Why one helper: each loop must survive its step failing (a bug in one round must not end
shipping or syncing for the life of the process, so the failure is logged and the next
round comes), must stop at once when the node shuts down (cancellation is not a failure
to log), and must be awaited after cancelling so no step is left running against a
closed client. Four copies of that had begun to differ.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger("summon.background")


def repeat(step: Callable[[], Awaitable[object]], pause_s: float | Callable[[], float], what: str, *,
           wake: asyncio.Event | None = None, pause_first: bool = False) -> asyncio.Task[None]:
    """Run `step` in a task until cancelled, `pause_s` (or what it returns, asked each round)
    between rounds; a set `wake` ends a pause early (cleared before each step, so a wake-up
    that comes during the step is not lost). `what` names the loop in the log."""

    async def loop() -> None:
        if pause_first:
            await asyncio.sleep(pause_s() if callable(pause_s) else pause_s)
        while True:
            if wake is not None:
                wake.clear()
            try:
                await step()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("%s failed (tried again in the next round)", what)
            pause = pause_s() if callable(pause_s) else pause_s
            if wake is None:
                await asyncio.sleep(pause)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), pause)

    return asyncio.get_running_loop().create_task(loop(), name=what)


async def stop(task: asyncio.Task[None] | None) -> None:
    """Cancel a loop and wait until it has really ended (whatever its last step raised)."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
