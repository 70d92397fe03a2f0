"""proxy.background: a loop outlives a failing step, a wake-up ends a pause, stop ends it."""

from __future__ import annotations

import asyncio

import pytest

from proxy import background


def test_a_failing_step_is_logged_and_the_loop_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[int] = []

    async def step() -> None:
        calls.append(len(calls))
        if len(calls) == 1:
            raise RuntimeError("first round breaks")

    async def main() -> None:
        task = background.repeat(step, 0.001, "the test loop")
        for _ in range(2000):  # bounded: 2 s at most
            if len(calls) >= 3:
                break
            await asyncio.sleep(0.001)
        await background.stop(task)
        assert task.done()

    asyncio.run(main())
    assert len(calls) >= 3
    assert "the test loop failed" in caplog.text and "first round breaks" in caplog.text


def test_a_wake_ends_the_pause_and_pause_first_waits_before_the_first_step() -> None:
    calls: list[float] = []

    async def step() -> None:
        calls.append(asyncio.get_running_loop().time())

    async def main() -> None:
        wake = asyncio.Event()
        task = background.repeat(step, 3600.0, "woken", wake=wake)
        await asyncio.sleep(0.01)
        assert len(calls) == 1  # ran at once, then pauses for an hour
        wake.set()
        for _ in range(500):
            if len(calls) == 2:
                break
            await asyncio.sleep(0.002)
        assert len(calls) == 2, "the wake-up should have ended the hour's pause"
        await background.stop(task)
        late = background.repeat(step, 3600.0, "later", pause_first=True)
        await asyncio.sleep(0.01)
        assert len(calls) == 2, "pause_first: no step before the first pause"
        await background.stop(late)
        await background.stop(None)

    asyncio.run(main())
