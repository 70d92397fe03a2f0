"""summon as a plugin: real nginx, Caddy and HAProxy, each with its config from plugins/,
in front of a real `summon serve` whose process backend runs busybox httpd instances.

What each host proxy must give the client: the instance's bytes on a cold request (one
boot, also for a burst), summon's 404 for no route and 503 + Retry-After at the cap,
and leases that end (through the proxy's completion hook, or Caddy's estimate) so the
instance idles out.
"""

from __future__ import annotations

import http.server
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.helpers.host_proxies import HostProxy, nginx_lua_installed
from tests.helpers.summon_proc import BUSYBOX, Summon, free_port, http_get, make_image

pytestmark = pytest.mark.slow

KINDS = [pytest.param(k, marks=pytest.mark.skipif(shutil.which(k) is None, reason=f"{k} is not installed"))
         for k in ("nginx", "caddy", "haproxy")]
# nginx with plugins/nginx/summon-lua.conf: the same tests, keep-alive connections to instances
KINDS.insert(1, pytest.param("nginx-lua", marks=pytest.mark.skipif(
    shutil.which("nginx") is None or not nginx_lua_installed(),
    reason="nginx or its Lua module (libnginx-mod-http-lua, lua-resty-core) is not installed")))
BODY = "hello from the instance\n"


def route(name: str, host: str, idle: str = "5m", image: str = "site", extra: str = "") -> str:
    return (f'[[route]]\nname = "{name}"\nhost = "{host}"\npath = "/"\nimage = "{image}"\n'
            f'idle_timeout = "{idle}"\nboot_timeout = "20s"\nhealth_interval = "0"\n{extra}')


class Stack:
    def __init__(self, summon: Summon, proxy: HostProxy, plugin_port: int) -> None:
        self.summon = summon
        self.proxy = proxy
        self.plugin_port = plugin_port

    def get(self, host: str, path: str = "/") -> tuple[int, dict[str, str], bytes]:
        return http_get(self.proxy.port, path, host=host, timeout=30)

    def instances(self, route_name: str) -> list[dict]:
        return [i for r in self.summon.status()["routes"] if r["name"] == route_name for i in r["instances"]]

    def leases(self) -> int:
        return int(self.summon.status()["totals"]["plugin_leases"])

    def hold(self, host: str) -> str:
        """Take a lease straight from /decide (as a hooked host proxy would) and keep it."""
        status, headers, _ = http_get(self.plugin_port, "/decide", host="summon", headers={
            "X-Original-Method": "GET", "X-Original-URI": "/", "X-Original-Host": host,
            "X-Forwarded-For": "127.0.0.1", "X-Summon-Done": "1"})
        assert status == 204, status
        return headers["x-summon-lease"]

    def done(self, lease: str) -> int:
        return http_get(self.plugin_port, f"/done?lease={lease}", host="summon")[0]


def until(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout}s: {what}")


@pytest.fixture
def stack(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Stack]:
    kind, routes, limits = request.param
    make_image(tmp_path / "images", "site", BUSYBOX, BODY)
    make_image(tmp_path / "images", "broken", ["false"])
    plugin_port = free_port()
    summon = Summon(tmp_path, routes, extra=f'[plugin]\nlisten = "127.0.0.1:{plugin_port}"\nlease_estimate = "1s"\n'
                                             f'[limits]\nmax_instances = {limits}\n')
    summon.start()
    proxy = HostProxy(kind, tmp_path, free_port(), f"127.0.0.1:{plugin_port}")
    try:
        proxy.start()
        yield Stack(summon, proxy, plugin_port)
    finally:
        proxy.stop()
        summon.stop()


def stacks(routes: str, limits: int = 8) -> list:
    return [pytest.param((p.values[0], routes, limits), marks=p.marks, id=p.values[0]) for p in KINDS]


@pytest.mark.parametrize("stack", stacks(route("site", "site")), indirect=True)
def test_a_cold_request_boots_one_instance_and_gets_its_page(stack: Stack) -> None:
    assert stack.instances("site") == []
    status, _, body = stack.get("site")
    assert (status, body.decode()) == (200, BODY)
    assert [i["state"] for i in stack.instances("site")] == ["ready"]
    status, _, body = stack.get("site", "/index.html")  # warm now: the same instance
    assert (status, body.decode()) == (200, BODY)
    assert len(stack.instances("site")) == 1


# target_concurrency far above the burst: one instance is what the engine wants, so a second
# would be a second cold boot, not a scale-out.
@pytest.mark.parametrize("stack", stacks(route("site", "site", extra="target_concurrency = 1000\n")), indirect=True)
def test_a_cold_burst_boots_exactly_one(stack: Stack) -> None:
    with ThreadPoolExecutor(100) as pool:
        answers = list(pool.map(lambda _: stack.get("site"), range(100)))
    assert [a[0] for a in answers] == [200] * 100
    assert {a[2].decode() for a in answers} == {BODY}
    assert len(stack.instances("site")) == 1
    # A bound, not a speed: HAProxy's queue retries a failed /done. Every lease comes back
    # (HAProxy's completion hook once lost one in four bursts: a task per request broke its Lua).
    until(lambda: stack.leases() == 0, 15, "every lease given back")
    if stack.proxy.kind == "haproxy":
        assert "Lua" not in stack.proxy.log.read_text()  # no error in the completion hook


NGINX = [p for p in stacks(route("site", "site", extra="max_replicas = 1\n")) if p.id in ("nginx", "nginx-lua")]


@pytest.mark.parametrize("stack", NGINX, indirect=True)
def test_nginx_reuses_a_steady_pools_decision_and_the_lease_still_ends(stack: Stack) -> None:
    """max_replicas 1: once ready, the pool cannot scale out, so summon lets nginx cache the
    decision ([plugin] cache, 1 s) instead of being asked for every request."""
    assert stack.get("site")[0] == 200  # cold: asked, never cached
    for _ in range(30):
        status, _, body = stack.get("site")
        assert (status, body.decode()) == (200, BODY)
    decisions = int(stack.summon.status()["totals"]["plugin_decisions"])
    assert decisions < 10, decisions  # 31 requests: the cold one, then about one per second
    until(lambda: stack.leases() == 0, 10, "the cached decision's lease ended")  # 1 s + lease_estimate
    assert [i["state"] for i in stack.instances("site")] == ["ready"]


@pytest.mark.parametrize("stack", stacks(route("site", "site")), indirect=True)
def test_no_route_is_a_404_at_the_client(stack: Stack) -> None:
    status, _, _ = stack.get("nowhere.example")
    assert status == 404
    assert stack.instances("site") == []


@pytest.mark.parametrize("stack", stacks(route("site", "site") + route("other", "other"), limits=1), indirect=True)
def test_at_the_cap_the_client_gets_503_with_retry_after(stack: Stack) -> None:
    assert stack.get("site")[0] == 200
    lease = stack.hold("site")  # the one instance allowed is busy: nothing to reclaim
    status, headers, _ = stack.get("other")
    assert status == 503
    assert int(headers["retry-after"]) >= 1
    assert stack.instances("other") == []
    assert stack.done(lease) == 204


@pytest.mark.parametrize("stack", stacks(route("broken", "broken", image="broken")), indirect=True)
def test_a_boot_failure_is_a_503_with_retry_after(stack: Stack) -> None:
    status, headers, _ = stack.get("broken")
    assert status == 503
    assert int(headers["retry-after"]) >= 1


@pytest.mark.parametrize("stack", stacks(route("site", "site", idle="2s")), indirect=True)
def test_the_lease_ends_and_the_instance_idles_out(stack: Stack) -> None:
    for _ in range(3):
        assert stack.get("site")[0] == 200
    # nginx and HAProxy call /done; Caddy's leases end after lease_estimate (1s)
    until(lambda: stack.leases() == 0, 5, "every lease given back")
    until(lambda: not any(i["state"] in ("ready", "booting") for i in stack.instances("site")), 15,
          "the idle instance stopped")


@pytest.mark.parametrize("stack", stacks(route("site", "site")), indirect=True)
def test_summon_down_is_the_host_proxys_own_error_not_a_hang(stack: Stack) -> None:
    stack.summon.stop()
    started = time.monotonic()
    status, _, _ = http_get(stack.proxy.port, "/", host="site", timeout=20)
    assert status in (500, 502, 503), status  # nginx (both configs): 500 (auth_request), Caddy: 502, HAProxy: 503
    assert time.monotonic() - started < 15


class _Counted(http.server.BaseHTTPRequestHandler):
    """A keep-alive upstream that counts the connections it accepts."""

    protocol_version = "HTTP/1.1"
    connections = 0

    def setup(self) -> None:
        type(self).connections += 1
        super().setup()

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY.encode())

    def log_message(self, *_: object) -> None:
        pass


@pytest.mark.parametrize("kind", [p for p in KINDS if p.values[0] == "nginx-lua"])
def test_nginx_lua_reuses_connections_to_the_instance(tmp_path: Path, kind: str) -> None:
    """summon-lua.conf's reason to be: nginx keeps connections to the decided instance open
    (summon.conf's proxy_pass to a variable opens one per request)."""
    _Counted.connections = 0
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Counted)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    plugin_port = free_port()
    routes = f'[[route]]\nname = "static"\nhost = "site"\npath = "/"\nupstreams = ["127.0.0.1:{upstream.server_port}"]\n'
    summon = Summon(tmp_path, routes, extra=f'[plugin]\nlisten = "127.0.0.1:{plugin_port}"\n')
    summon.start()
    proxy = HostProxy(kind, tmp_path, free_port(), f"127.0.0.1:{plugin_port}")
    try:
        proxy.start()
        for _ in range(20):
            status, _, body = http_get(proxy.port, "/", host="site")
            assert (status, body.decode()) == (200, BODY)
        assert _Counted.connections <= 2, _Counted.connections
    finally:
        proxy.stop()
        summon.stop()
        upstream.shutdown()
        upstream.server_close()
