"""WebSocket tunnels through the front, and drain (in-process proxy, real sockets).

The recording upstream answers the upgrade for real (a 101 whose Sec-WebSocket-Accept is
computed from the client's key, then RFC 6455 frames echoed: `tests.helpers.ws_echo`).
A tunnel is one request in flight for its whole life: drain (SIGTERM) lets it run until
`drain_timeout` and cuts it then, while idle keep-alive connections are closed at once.
The instance side (a tunnel keeps its instance from idling out) is in
tests/e2e/test_tunnels_e2e.py.
"""

from __future__ import annotations

import asyncio

from proxy.serve.server import drain
from tests.helpers import ws_echo as ws
from tests.helpers.net import echo, open_tunnel, wait_until, websocket_echo


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
