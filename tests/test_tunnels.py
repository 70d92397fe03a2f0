"""Long-lived connections: WebSocket tunnels through the front, drain, and idle instances.

The upstreams here answer the upgrade for real (a 101 whose Sec-WebSocket-Accept is
computed from the client's key, then RFC 6455 frames echoed): `helpers.ws_echo`, in the
recording upstream and, for the idle test, as a process-backend instance.

What a tunnel must do to the rest of summon:
- it holds its lease for its whole life, so the instance counts it as in flight and is
  not drained for idleness while it is open; `idle_timeout` counts from its end;
- drain (SIGTERM) lets it run until `drain_timeout` and cuts it then, while idle
  keep-alive connections are closed at once.
"""

from __future__ import annotations

import asyncio
import sqlite3
import sys
import time
from pathlib import Path

import pytest
from helpers import ws_echo as ws
from helpers.net import RawClient, wait_until, websocket_echo

from proxy.server import drain
from tests.helpers.summon_proc import Summon, make_image


def open_tunnel(c: RawClient, host: str = "example.com") -> None:
    c.send(ws.upgrade_request(host=host))
    r = c.response()
    assert r.status == 101, (r.status, r.body)
    assert r.header("sec-websocket-accept") == ws.accept_key(ws.KEY), "not a real WebSocket upgrade"
    assert (r.header("connection") or b"").lower() == b"upgrade"


def echo(c: RawClient, payload: bytes, opcode: int = ws.OP_TEXT) -> None:
    c.send(ws.client_frame(payload, opcode))
    expected = ws.OP_PONG if opcode == ws.OP_PING else opcode
    assert c.ws_frame() == (expected, payload)


def test_websocket_frames_of_every_length_form_cross_the_tunnel(proxy, upstream):
    upstream.handler = websocket_echo
    with proxy.client() as c:
        open_tunnel(c)
        echo(c, b"short")
        echo(c, b"x" * 300, ws.OP_BINARY)  # 16-bit length
        echo(c, bytes(range(256)) * 300, ws.OP_BINARY)  # 64-bit length (76800 bytes)
        echo(c, b"are you there", ws.OP_PING)
        c.send(ws.client_frame(b"\x03\xe8", ws.OP_CLOSE))
        assert c.ws_frame() == (ws.OP_CLOSE, b"\x03\xe8")
        assert c.is_closed(), "the tunnel ends with the upstream's close"
    (req,) = upstream.requests
    assert req.header("sec-websocket-key") == ws.KEY and req.header("upgrade") == b"websocket"


def test_drain_keeps_tunnels_until_drain_timeout_then_cuts_them(make_proxy, upstream, loop_thread):
    upstream.handler = websocket_echo
    proxy = make_proxy()
    tunnel = proxy.client(timeout=10)
    idle = proxy.client(timeout=10)
    try:
        open_tunnel(tunnel)
        assert idle.request(b"GET /idle HTTP/1.1\r\nHost: example.com\r\n\r\n").status == 200
        rt = proxy.rt
        assert rt is not None
        proxy.rt = None  # this test drains it
        draining = asyncio.run_coroutine_threadsafe(drain(rt, 5.0), loop_thread.loop)
        # idle keep-alive connections go after a short grace...
        assert idle.is_closed(timeout=5), "an idle connection must be closed by drain"
        # ...while the tunnel still carries data, and drain waits for it
        echo(tunnel, b"still here while draining")
        assert not draining.done(), "drain finished while a tunnel was still open"
        echo(tunnel, b"x" * 1000, ws.OP_BINARY)
        draining.result(timeout=15)  # at drain_timeout the tunnel is cut
        assert tunnel.is_closed(timeout=3), "drain must close the tunnel at its deadline"
        wait_until(lambda: all(c.closed for c in upstream.conns), 3, "the upstream side of the tunnel to close")
    finally:
        tunnel.close()
        idle.close()


# --- a tunnel keeps its instance up (process backend, a real summon serve) ---------------

ECHO_INSTANCE = [sys.executable, str(Path(__file__).parent / "helpers" / "ws_echo.py"), "{port}"]
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
