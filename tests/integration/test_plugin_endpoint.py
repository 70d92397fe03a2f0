"""The decision endpoint's HTTP side (proxy.plugin.endpoint) on 127.0.0.1, in-process:
the token, keep-alive, the status mapping for nginx, /done, and a caller that hangs up."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable

import pytest

from proxy.config import Address, PluginSettings
from proxy.plugin.decide import Decider
from proxy.plugin.endpoint import PluginEndpoint
from proxy.routing.dispatch import Dispatcher, StaticPool
from proxy.routing.table import RouteTable
from tests.unit.plugin.test_decide import STATIC, SUMMONED, Clock, FakeLease, FakePool, config

TOKEN = "a-long-enough-plugin-token"
ASK = ("X-Original-Method: GET\r\nX-Original-URI: /\r\nX-Original-Host: {host}\r\n"
       "X-Forwarded-For: 10.0.0.7\r\nX-Summon-Done: 1\r\n")


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(lines[0].split()[1]), headers, body


def run(test: Callable[[PluginEndpoint, FakePool], Awaitable[None]], token: str | None = None) -> None:
    async def go() -> None:
        cfg = config(STATIC, SUMMONED)
        fake = FakePool(SUMMONED)
        dispatcher = Dispatcher(RouteTable(cfg.routes), lambda r: StaticPool(r) if r.upstreams else fake)
        settings = PluginSettings(listen=Address("127.0.0.1", 0), token=token)
        endpoint = PluginEndpoint(settings.listen, Decider(dispatcher, lambda: cfg, settings, Clock()), token)
        await endpoint.start()
        assert endpoint.server is not None
        endpoint.address = Address("127.0.0.1", endpoint.server.sockets[0].getsockname()[1])
        try:
            await test(endpoint, fake)
        finally:
            endpoint.close()

    asyncio.run(go())


async def call(endpoint: PluginEndpoint, target: str, extra: str = "") -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection(endpoint.address.host, endpoint.address.port)
    writer.write(f"GET {target} HTTP/1.1\r\nHost: summon\r\n{extra}Connection: close\r\n\r\n".encode())
    try:
        return await read_response(reader)
    finally:
        writer.close()


def test_decisions_share_one_kept_alive_connection_until_close() -> None:
    async def test(endpoint: PluginEndpoint, _fake: FakePool) -> None:
        reader, writer = await asyncio.open_connection(endpoint.address.host, endpoint.address.port)
        ask = ASK.format(host="static")
        writer.write(f"GET /decide HTTP/1.1\r\nHost: summon\r\n{ask}\r\n".encode() * 2)  # pipelined
        for _ in range(2):
            status, headers, _ = await read_response(reader)
            assert status == 204 and headers["x-summon-upstream"] in ("127.0.0.1:9001", "127.0.0.1:9002")
            assert headers["x-summon-route"] == "static" and headers["x-summon-lease"]
        writer.write(f"GET /decide HTTP/1.1\r\nHost: summon\r\n{ask}Connection: close\r\n\r\n".encode())
        assert (await read_response(reader))[0] == 204
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed, as asked
        writer.close()
        assert len(endpoint.decider.held) == 3

    run(test)


def test_refusals_carry_the_clients_status_and_nginx_gets_them_as_403() -> None:
    async def test(endpoint: PluginEndpoint, _fake: FakePool) -> None:
        status, headers, body = await call(endpoint, "/decide", ASK.format(host="nowhere"))
        assert (status, headers["x-summon-status"]) == (404, "404") and b"no route" in body
        status, headers, _ = await call(endpoint, "/decide?deny=403", ASK.format(host="nowhere"))
        assert (status, headers["x-summon-status"]) == (403, "404")
        endpoint.decider.draining = True
        status, headers, _ = await call(endpoint, "/decide?deny=403", ASK.format(host="static"))
        assert (status, headers["x-summon-status"], headers["retry-after"]) == (403, "503", "1")
        assert (await call(endpoint, "/decide?deny=500", ASK.format(host="static")))[0] == 400

    run(test)


def test_done_gives_the_lease_back_once() -> None:
    async def test(endpoint: PluginEndpoint, _fake: FakePool) -> None:
        lease = (await call(endpoint, "/decide", ASK.format(host="static")))[1]["x-summon-lease"]
        assert (await call(endpoint, f"/done?lease={lease}&status=200"))[0] == 204
        assert (await call(endpoint, f"/done?lease={lease}"))[0] == 404
        assert (await call(endpoint, "/done"))[0] == 400
        assert (await call(endpoint, "/elsewhere"))[0] == 404
        assert not endpoint.decider.held

    run(test)


def test_a_batch_of_done_gives_back_every_lease_named_and_marks_a_5xx() -> None:
    """HAProxy's queue gives leases back many at once; an unknown one has expired already."""
    async def test(endpoint: PluginEndpoint, fake: FakePool) -> None:
        grants = []
        for _ in range(2):
            answer = asyncio.ensure_future(call(endpoint, "/decide", ASK.format(host="cold")))
            for _ in range(200):
                if len(fake.futures) > len(grants):
                    break
                await asyncio.sleep(0.01)
            listening = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
            grants.append((FakeLease(Address("127.0.0.1", listening.sockets[0].getsockname()[1])), listening))
            fake.futures[-1].set_result(grants[-1][0])
            assert (await answer)[0] == 204
        a, b = list(endpoint.decider.held)
        assert (await call(endpoint, f"/done?leases={a}:200,{b}:502,gone:200"))[0] == 204
        assert not endpoint.decider.held
        assert sorted(g[0].released for g in grants) == [[False], [True]]
        assert (await call(endpoint, f"/done?leases={a}:200&lease={b}"))[0] == 400
        for _, listening in grants:
            listening.close()

    run(test)


def test_a_caller_that_hangs_up_as_its_lease_is_granted_gives_it_back() -> None:
    """The lease is granted while the connection is already gone: no /done will come."""
    async def test(endpoint: PluginEndpoint, fake: FakePool) -> None:
        listening = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        lease = FakeLease(Address("127.0.0.1", listening.sockets[0].getsockname()[1]))
        reader, writer = await asyncio.open_connection(endpoint.address.host, endpoint.address.port)
        writer.write(f"GET /decide HTTP/1.1\r\nHost: summon\r\n{ASK.format(host='cold')}\r\n".encode())
        for _ in range(200):
            if fake.futures:
                break
            await asyncio.sleep(0.01)
        fake.futures[0].set_result(lease)  # granted, and in the same moment the caller goes
        writer.transport.abort()
        for _ in range(200):
            if lease.released:
                break
            await asyncio.sleep(0.01)
        assert lease.released == [True] and not endpoint.decider.held
        listening.close()

    run(test)


@pytest.mark.parametrize("given,status", [(None, 401), ("wrong-token-wrong-token", 401), (TOKEN, 204)])
def test_with_a_token_every_call_carries_it(given: str | None, status: int) -> None:
    async def test(endpoint: PluginEndpoint, _fake: FakePool) -> None:
        extra = ASK.format(host="static") + (f"X-Summon-Token: {given}\r\n" if given else "")
        assert (await call(endpoint, "/decide", extra))[0] == status

    run(test, token=TOKEN)


def test_a_caller_that_hangs_up_while_a_pool_boots_leaves_the_queue() -> None:
    async def test(endpoint: PluginEndpoint, fake: FakePool) -> None:
        reader, writer = await asyncio.open_connection(endpoint.address.host, endpoint.address.port)
        writer.write(f"GET /decide HTTP/1.1\r\nHost: summon\r\n{ASK.format(host='cold')}\r\n".encode())
        for _ in range(200):
            if fake.futures:
                break
            await asyncio.sleep(0.01)
        assert len(fake.futures) == 1 and not fake.futures[0].done()
        writer.close()
        for _ in range(200):
            if fake.futures[0].cancelled():
                break
            await asyncio.sleep(0.01)
        assert fake.futures[0].cancelled()

    run(test)


def test_an_oversized_head_is_refused_and_small_ones_keep_coming() -> None:
    async def test(endpoint: PluginEndpoint, _fake: FakePool) -> None:
        reader, writer = await asyncio.open_connection(endpoint.address.host, endpoint.address.port)
        ask = f"GET /decide HTTP/1.1\r\nHost: summon\r\n{ASK.format(host='static')}\r\n".encode()
        writer.write(ask * 200)  # many small heads on one connection: far more than one head's limit in all
        for _ in range(200):
            assert (await read_response(reader))[0] == 204
        writer.write(b"GET /decide HTTP/1.1\r\nHost: summon\r\nX-Big: " + b"x" * 40_000 + b"\r\n\r\n")
        assert (await read_response(reader))[0] == 431
        writer.close()

    run(test)


def test_a_cold_lease_on_an_instance_that_is_gone_is_a_503_not_a_dead_address() -> None:
    """A trial abandoned before the decision could watch it looks like a plain lease: the
    endpoint checks that the instance takes a connection before it hands the address out."""
    async def test(endpoint: PluginEndpoint, fake: FakePool) -> None:
        listening = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        alive = Address("127.0.0.1", listening.sockets[0].getsockname()[1])
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            gone = Address("127.0.0.1", s.getsockname()[1])  # bound, never listening: refused
            leases = []
            for address in (gone, alive):
                answer = asyncio.ensure_future(call(endpoint, "/decide", ASK.format(host="cold")))
                for _ in range(200):
                    if len(fake.futures) > len(leases):
                        break
                    await asyncio.sleep(0.01)
                leases.append(FakeLease(address))
                fake.futures[-1].set_result(leases[-1])
                status, headers, _ = await answer
                assert (status, headers.get("x-summon-upstream")) == ((503, None) if address is gone else (204, str(alive)))
            assert leases[0].released == [False] and leases[1].released == []
        listening.close()

    run(test)
