"""Paused standbys through the summoner shell, on real processes (SIGSTOP / SIGCONT): the
standby is really stopped, a cold request is answered by it, and the pool refills."""

from __future__ import annotations

from pathlib import Path

import pytest
import uvloop

from proxy.backends.owner import proc_start
from proxy.engine.fleet import Record
from proxy.engine.lifecycle import State
from tests.helpers.runtime import serving, wait_for
from tests.helpers.summon_proc import BUSYBOX, make_image
from tests.integration.test_summoner import get

pytestmark = pytest.mark.skipif(__import__("shutil").which("busybox") is None, reason="busybox not installed")

CONFIG = """
[proxy]
listen = "127.0.0.1:0"
admin = ""
[images]
dir = "images"
[events]
path = "events.db"
[[host]]
name = "h"
backend = "process"
standby_memory = "1GiB"
[[route]]
name = "site"
path = "/"
image = "site"
start = "resume"
standbys = 1
idle_timeout = "60s"
"""


def test_a_cold_request_is_answered_by_the_resumed_standby_and_the_pool_refills(tmp_path: Path) -> None:
    make_image(tmp_path / "images", "site", BUSYBOX, body="standby here\n")
    cfg = tmp_path / "summon.toml"
    cfg.write_text(CONFIG)

    async def scenario() -> None:
        async with serving(cfg, Record, 2.0) as run:
            s, port, records = run.summoner, run.port, run.seen

            def parked() -> list[str]:
                return [i.id for i in s.fleet.instances.values() if i.state is State.STANDBY]

            (standby,) = await wait_for(parked, "a paused standby")
            pid = int(s.handles[standby].detail["pid"])  # type: ignore[call-overload]
            assert proc_start(pid)[1] == "T", "the standby's process is stopped (SIGSTOP)"
            status = s.status()
            (inst,) = status["routes"][0]["instances"]
            assert inst["state"] == "standby" and inst["rss_mib"] > 0
            assert status["totals"]["standby"]["instances"] == 1

            code, body = await get(port)
            assert code == 200 and b"standby here" in body
            assert s.fleet.instances[standby].state is State.READY, "the standby served it, nothing booted"
            assert proc_start(pid)[1] != "T"
            (ready,) = [r for r in records if r.kind == "ready"]
            assert ready.instance == standby and ready.detail["start"] == "resume"
            assert set(ready.detail["phases"]) == {"resume", "first_response"}
            assert ready.duration_s is not None and ready.duration_s < 5.0

            refill = await wait_for(lambda: [i for i in parked() if i != standby], "the standby refilled")
            assert refill and s.fleet.instances[standby].state is State.READY

    uvloop.run(scenario())
