"""An open WebSocket tunnel keeps its instance up: a real `summon serve`, a process-backend
instance that answers the upgrade for real (tests/helpers/ws_echo.py run as a script).

A tunnel holds its lease (one request in flight) for its whole life, so the instance is
not drained for idleness while it is open, and `idle_timeout` counts from its end.
"""

from __future__ import annotations

import sqlite3
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.net import RawClient, echo, open_tunnel
from tests.helpers.summon_proc import Summon, make_image

# --- a tunnel keeps its instance up (process backend, a real summon serve) ---------------

ECHO_INSTANCE = [sys.executable, str(Path(__file__).parents[1] / "helpers" / "ws_echo.py"), "{port}"]
IDLE_S = 1.0
ROUTE = f"""
[[route]]
name = "ws"
path = "/"
image = "ws"
idle_timeout = "{IDLE_S}s"
boot_timeout = "20s"
"""


def drained_at(db: Path) -> list[float]:
    deadline = time.time() + 5
    while True:
        try:
            with sqlite3.connect(db) as c:
                return [ts for (ts,) in c.execute("select ts from events where kind = 'draining' order by id")]
        except sqlite3.OperationalError:
            if time.time() > deadline:
                raise
            time.sleep(0.1)


@pytest.mark.slow
def test_open_tunnel_keeps_its_instance_past_idle_timeout(tmp_path: Path) -> None:
    images = tmp_path / "images"
    make_image(images, "ws", ECHO_INSTANCE)
    s = Summon(tmp_path, ROUTE).start()
    try:
        with RawClient(s.port, timeout=30) as c:
            open_tunnel(c, host="site")  # the cold request: summons the instance
            (inst,) = s.instances()
            assert inst["state"] == "ready"
            held_until = time.monotonic() + 3 * IDLE_S
            rounds = 0
            while time.monotonic() < held_until or rounds < 3:  # past idle_timeout, three times over
                echo(c, b"tick %d" % rounds)
                assert [i["id"] for i in s.instances() if i["state"] == "ready"] == [inst["id"]]
                rounds += 1
                time.sleep(IDLE_S / 2)
            assert drained_at(s.events) == [], "the instance was drained while its tunnel was open"
            echo(c, b"still carrying data after %d idle timeouts" % 3)
            closed_at = time.time()  # the tunnel ends as the `with` closes the socket
        # from the tunnel's end, the instance idles out as usual: not before idle_timeout
        assert wait_until_true(lambda: drained_at(s.events), 20), "the instance never idled out after the tunnel"
        (ts,) = drained_at(s.events)[:1]
        assert ts >= closed_at + IDLE_S - 0.05, "idle_timeout must count from the tunnel's end"
    finally:
        s.stop()


def wait_until_true(cond, timeout: float) -> bool:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.1)
    return bool(cond())
