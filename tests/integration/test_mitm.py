"""The mitmproxy addon's hooks, driven by mitmproxy's own test helpers (taddons, tflow).

mitmproxy 11.0.2 (the newest for Python 3.11) pins h11<=0.14.0 and other packages the
core venv must not be held to, so it lives in .venv-mitm (scripts/setup-mitmproxy.sh,
which also installs summon and pytest there). In a venv without mitmproxy this module
is skipped as a whole, and `test_hook_tests_pass_under_venv_mitm` in
tests/e2e/test_mitm_e2e.py runs it under .venv-mitm instead.

Instances come from the `fake` driver (in-process HTTP servers with a settable boot
delay and boot failures); the process driver is exercised by tests/e2e/test_mitm_e2e.py.
"""

from __future__ import annotations

import asyncio
import sys
import warnings
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.paths import REPO
from tests.helpers.summon_proc import BUSYBOX, make_image

ROOT = REPO  # the repository

try:
    with warnings.catch_warnings():
        # mitmproxy's pinned dependencies (ldap3 on pyasn1) warn on import; not ours to fix
        warnings.simplefilter("ignore", DeprecationWarning)
        from mitmproxy import exceptions, http
        from mitmproxy.addons import proxyserver
        from mitmproxy.test import taddons, tflow
except ImportError:
    pytest.skip("mitmproxy is not in this venv: tests/e2e/test_mitm_e2e.py runs this module under .venv-mitm",
                allow_module_level=True)


# --- fixtures -------------------------------------------------------------------------


def write_config(tmp: Path, routes: str, *, backend: str = "fake") -> Path:
    images = tmp / "images"
    if not (images / "site").exists():
        make_image(images, "site", BUSYBOX, body="summoned\n")
    cfg = tmp / "summon.toml"
    cfg.write_text(
        f'[images]\ndir = "images"\n[events]\npath = "events.db"\n'
        f'[limits]\nmax_instances = 4\n'
        f'[[host]]\nname = "local"\nbackend = "{backend}"\nslots = 8\n{routes}\n'
    )
    return cfg


SUMMONED = """
[[route]]
name = "site"
host = "site"
path = "/"
image = "site"
boot_timeout = "5s"
queue_size = {queue}
target_concurrency = 100
"""

STATIC = """
[[route]]
name = "static"
host = "static"
path = "/"
upstreams = ["127.0.0.1:9", "127.0.0.1:10"]
"""


def summoned(queue: int = 100) -> str:
    return SUMMONED.format(queue=queue)


def run(fn: Callable[..., Awaitable[None]], *args: Any) -> None:
    asyncio.run(asyncio.wait_for(fn(*args), 30))


def make_flow(host: str = "site", path: str = "/", headers: dict[str, str] | None = None) -> Any:
    """A reverse-mode flow as mitmproxy hands it to `request`: origin-form, Host as sent."""
    req = http.Request.make("GET", f"http://{host}{path}", headers={"Host": host, **(headers or {})})
    req.data.path = path.encode()  # Request.make would normalise the path; keep it raw
    return tflow.tflow(req=req)


def respond(f: Any, status: int = 200) -> None:
    f.response = http.Response.make(status, b"ok")


async def started(tmp: Path, routes: str) -> tuple[Any, Any]:
    """A taddons context with the addon configured and running; the caller closes it."""
    from proxy.mitm import Summon

    addon = Summon()
    tctx = taddons.context(addon)
    tctx.configure(addon, summon_config=str(write_config(tmp, routes)))
    await addon.running()
    return tctx, addon


def instances(addon: Any) -> list[Any]:
    return list(addon.summoner.fleet.instances.values())


# --- options ----------------------------------------------------------------------------


def test_config_option_loads_and_forces_host_keeping_lazy_connections(tmp_path: Path) -> None:
    async def t() -> None:
        from proxy.mitm import Summon

        addon = Summon()
        with taddons.context(proxyserver.Proxyserver(), addon) as tctx:
            assert tctx.options.keep_host_header is False
            assert tctx.options.connection_strategy == "eager"
            tctx.configure(addon, summon_config=str(write_config(tmp_path, summoned())))
            assert addon.config is not None and [r.name for r in addon.config.routes] == ["site"]
            assert tctx.options.keep_host_header is True  # else reverse mode replaces Host first
            assert tctx.options.connection_strategy == "lazy"  # the placeholder is never dialled
            tctx.configure(addon, summon_events=str(tmp_path / "other.db"))
            assert addon.config.events_path == tmp_path / "other.db"

    run(t)


def test_a_bad_config_is_an_options_error_naming_file_and_line(tmp_path: Path) -> None:
    async def t() -> None:
        from proxy.mitm import Summon

        bad = tmp_path / "bad.toml"
        bad.write_text('[[route]]\nname = "x"\npath = "/"\nimage = "site"\nidle_timeout = "soon"\n')
        addon = Summon()
        with taddons.context(addon) as tctx:
            with pytest.raises(exceptions.OptionsError, match=r"bad\.toml:\d+"):
                tctx.configure(addon, summon_config=str(bad))
            assert addon.config is None

    run(t)


def test_without_a_config_the_addon_leaves_flows_alone(tmp_path: Path) -> None:
    async def t() -> None:
        from proxy.mitm import Summon

        addon = Summon()
        with taddons.context(addon):
            await addon.running()
            f = make_flow()
            await addon.request(f)
            assert f.response is None and f.request.host == "site" and "summon" not in f.metadata

    run(t)


def test_mitmdump_script_loader_finds_the_addon() -> None:
    async def t() -> None:
        with taddons.context() as tctx:
            module = tctx.script(str(ROOT / "proxy" / "mitm.py"))  # what `mitmdump -s` loads
            assert [type(a).__name__ for a in module.addons] == ["Summon"]
            assert str(ROOT / "proxy") not in sys.path  # our modules must not shadow top-level ones

    run(t)


# --- routing ----------------------------------------------------------------------------


def test_unknown_route_is_404_like_the_native_front(tmp_path: Path) -> None:
    async def t() -> None:
        tctx, addon = await started(tmp_path, summoned())
        try:
            f = make_flow(host="elsewhere", path="/x")
            await addon.request(f)
            assert f.response.status_code == 404
            assert f.response.content == b"404 Not Found: no route for elsewhere/x\n"
            assert f.response.headers["Server"] == "summon"
            assert instances(addon) == []  # nothing summoned for a miss
        finally:
            await addon.done()

    run(t)


def test_a_malformed_request_gets_the_fronts_400(tmp_path: Path) -> None:
    async def t() -> None:
        tctx, addon = await started(tmp_path, summoned())
        try:
            f = make_flow(headers={"X_Forwarded_For": "1.2.3.4"})  # "_" in a name: smuggling vector
            await addon.request(f)
            assert f.response.status_code == 400 and f.response.headers["Connection"] == "close"
            f = make_flow(path="/../etc/passwd")
            await addon.request(f)
            assert f.response.status_code == 400
        finally:
            await addon.done()

    run(t)


def test_static_route_rewrites_upstream_keeps_host_and_releases_on_response(tmp_path: Path) -> None:
    async def t() -> None:
        tctx, addon = await started(tmp_path, STATIC)
        try:
            f = make_flow(host="static", path="/a/./b/../c?q=1")
            await addon.request(f)
            assert f.response is None
            assert (f.request.scheme, f.request.host) == ("http", "127.0.0.1")
            assert f.request.port in (9, 10)
            assert f.request.headers["Host"] == "static"  # as the client sent it
            assert f.request.path == "/a/c?q=1"  # the normalised path we routed on
            assert f.metadata["summon"] == {"route": "static", "instance": f"127.0.0.1:{f.request.port}"}
            pool = addon.dispatcher.pools["static"]
            assert pool.balancer.total == 1
            respond(f)
            addon.response(f)
            addon.error(f)  # a late error hook must not release twice
            assert pool.balancer.total == 0
        finally:
            await addon.done()

    run(t)


def test_headers_rewritten_like_the_native_front(tmp_path: Path) -> None:
    """Hop-by-hop fields dropped, X-Forwarded-*/Forwarded/Via set, and a forwarding
    header from an untrusted client (tflow's is 127.0.0.1) replaced, not trusted."""

    async def t() -> None:
        tctx, addon = await started(tmp_path, STATIC)
        try:
            f = make_flow(host="static", path="/p", headers={
                "X-Forwarded-For": "6.6.6.6", "Connection": "keep-alive, X-Secret", "X-Secret": "1",
                "Keep-Alive": "timeout=5", "Accept": "text/html", "Content-Length": "0"})
            await addon.request(f)
            h = f.request.headers
            assert h["X-Forwarded-For"] == "127.0.0.1"
            assert h["X-Forwarded-Proto"] == "http" and h["X-Forwarded-Host"] == "static"
            assert h["Forwarded"] == 'for=127.0.0.1;proto=http;host="static"'
            assert h["Via"] == "1.1 summon"
            assert "X-Secret" not in h and "Keep-Alive" not in h and "Connection" not in h
            assert h["Accept"] == "text/html" and h["Content-Length"] == "0"
            assert h.fields[0][0].lower() == b"host" and h["Host"] == "static"
            assert h.get_all("X-Forwarded-For") == ["127.0.0.1"]
        finally:
            await addon.done()

    run(t)


# --- summoning ---------------------------------------------------------------------------


def test_cold_route_boots_one_instance_for_concurrent_flows(tmp_path: Path) -> None:
    async def t() -> None:
        tctx, addon = await started(tmp_path, summoned())
        try:
            addon.summoner.backends["local"].behaviour.boot_delay_s = 0.3
            flows = [make_flow(path=f"/p{i}") for i in range(20)]
            await asyncio.gather(*(addon.request(f) for f in flows))
            (inst,) = instances(addon)
            assert inst.state.name == "READY" and inst.inflight == 20
            assert {(f.request.host, f.request.port) for f in flows} == {(inst.address.host, inst.address.port)}
            assert all(f.response is None and f.request.headers["Host"] == "site" for f in flows)
            for f in flows:
                respond(f)
                addon.response(f)
            assert inst.inflight == 0 and addon.leases == {}
            warm = make_flow()
            await addon.request(warm)  # warm: answered without waiting
            assert warm.request.port == inst.address.port
            addon.error(warm)
            assert inst.inflight == 0
        finally:
            await addon.done()

    run(t)


def test_boot_failure_is_503_with_retry_after(tmp_path: Path) -> None:
    async def t() -> None:
        tctx, addon = await started(tmp_path, summoned())
        try:
            addon.summoner.backends["local"].behaviour.fail_boots = 100
            f = make_flow()
            await addon.request(f)
            assert f.response.status_code == 503
            assert int(f.response.headers["Retry-After"]) >= 1
            assert f.response.content.startswith(b"503 Service Unavailable: instance failed to boot")
            assert addon.leases == {}
        finally:
            await addon.done()

    run(t)


def test_overload_full_boot_queue_is_503_at_once(tmp_path: Path) -> None:
    async def t() -> None:
        tctx, addon = await started(tmp_path, summoned(queue=2))
        try:
            addon.summoner.backends["local"].behaviour.boot_delay_s = 0.5
            flows = [make_flow() for _ in range(5)]
            tasks = [asyncio.ensure_future(addon.request(f)) for f in flows]
            await asyncio.sleep(0.1)
            shed = [f for f in flows if f.response is not None]
            assert len(shed) == 3  # answered during the boot, not after it
            assert all(f.response.status_code == 503 and int(f.response.headers["Retry-After"]) >= 1 for f in shed)
            await asyncio.gather(*tasks)
            assert sum(1 for f in flows if f.response is None) == 2
        finally:
            await addon.done()

    run(t)


def test_client_hanging_up_during_boot_leaves_the_queue(tmp_path: Path) -> None:
    async def t() -> None:
        tctx, addon = await started(tmp_path, summoned())
        try:
            addon.summoner.backends["local"].behaviour.boot_delay_s = 0.5
            f = make_flow()
            task = asyncio.ensure_future(addon.request(f))
            await asyncio.sleep(0.05)
            pool = addon.summoner.fleet.pools["site"]
            assert len(pool.queue) == 1 and addon.waiting
            addon.client_disconnected(f.client_conn)
            await task
            assert len(pool.queue) == 0 and addon.waiting == {} and addon.leases == {}
            assert f.response.status_code == 503
            await asyncio.sleep(0.6)
            (inst,) = instances(addon)
            assert inst.inflight == 0  # the boot finished; nobody holds a slot
        finally:
            await addon.done()

    run(t)


def test_done_stops_every_instance_and_fails_waiting_flows(tmp_path: Path) -> None:
    async def t() -> None:
        tctx, addon = await started(tmp_path, summoned())
        backend = addon.summoner.backends["local"]
        f = make_flow()
        await addon.request(f)
        (inst,) = instances(addon)
        await addon.done()
        assert backend.stopped == [inst.id] and backend.running == {}
        assert addon.leases == {} and addon.summoner is None
        from proxy.observe.events import open_readonly

        kinds = [e.kind for e in open_readonly(tmp_path / "events.db").query()]
        assert kinds.count("summoned") == 1 and "stopped" in kinds and kinds[-1] == "shutdown"

    run(t)


def test_an_upgraded_flow_keeps_its_lease_until_the_websocket_ends(tmp_path: Path) -> None:
    async def t() -> None:
        tctx, addon = await started(tmp_path, summoned())
        try:
            f = make_flow(headers={"Connection": "Upgrade", "Upgrade": "websocket"})
            await addon.request(f)
            (inst,) = instances(addon)
            f.response = http.Response.make(101, b"", {"Upgrade": "websocket", "Connection": "Upgrade"})
            f.websocket = tflow.twebsocket()
            addon.response(f)
            assert inst.inflight == 1  # idle scaling must not stop an instance with an open socket
            addon.websocket_end(f)
            assert inst.inflight == 0
        finally:
            await addon.done()

    run(t)


def test_a_streamed_request_is_routed_at_requestheaders_once(tmp_path: Path) -> None:
    async def t() -> None:
        tctx, addon = await started(tmp_path, STATIC)
        try:
            f = make_flow(host="static")
            f.request.stream = True  # mitmproxy sends it upstream before the request hook
            await addon.requestheaders(f)
            assert f.request.host == "127.0.0.1" and f.request.port in (9, 10)
            pool = addon.dispatcher.pools["static"]
            await addon.request(f)  # already routed: no second lease
            assert pool.balancer.total == 1
            addon.response(f)
            assert pool.balancer.total == 0
            miss = make_flow(host="nowhere")
            miss.request.stream = True
            await addon.requestheaders(miss)
            assert miss.response.status_code == 404 and miss.request.stream is False
        finally:
            await addon.done()

    run(t)
