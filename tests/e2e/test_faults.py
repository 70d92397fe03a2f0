"""Fault injection with real processes on loopback (issue #9), each bounded in time.

Every scenario runs a real `summon serve` subprocess (tests/helpers/summon_proc.py) in
front of real upstreams (a tiny asyncio server in a subprocess, busybox httpd instances
started by the process backend), drives it with blocking clients in threads and injects
the fault from outside: SIGTERM, SIGHUP, SIGKILL of an instance, 2,000 slowloris
connections, an invalid config, too many connections or requests, stalled readers, a
summon whose own CPU is saturated (a CPU cgroup, root only).

What counts as lost: a request whose connection was accepted and that got neither a
complete response nor a clean refusal. A connection refused at connect, a 503 with
Retry-After, and the keep-alive race (an idle connection closed just as a request went
out, so the proxy read nothing of it and the client retries: RFC 9112 9.3.1) are not.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers.loadtests import load
from tests.helpers.summon_proc import BUSYBOX, Summon, free_port, http_get, make_image, pids_matching

UPSTREAM = r'''
import asyncio, sys

async def handle(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            target = lines[0].split(b" ")[1]
            length = 0
            for ln in lines[1:]:
                k, _, v = ln.partition(b":")
                if k.strip().lower() == b"content-length":
                    length = int(v)
            if length:
                await reader.readexactly(length)
            delay, size = 0.0, 5
            _, _, query = target.partition(b"?")
            for kv in query.split(b"&"):
                k, _, v = kv.partition(b"=")
                if k == b"delay":
                    delay = float(v) / 1000
                elif k == b"size":
                    size = int(v)
            if delay:
                await asyncio.sleep(delay)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n" % size)
            block = b"x" * 65536
            left = size
            while left > 0:
                writer.write(block[:left])
                left -= 65536
                await writer.drain()
            await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError, IndexError):
        pass
    finally:
        writer.close()

async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1]), backlog=4096)
    async with server:
        await server.serve_forever()

asyncio.run(main())
'''

SLOWLORIS = r'''
import heapq, random, resource, selectors, socket, sys, time

port, n = int(sys.argv[1]), int(sys.argv[2])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
sel = selectors.DefaultSelector()  # one epoll loop: cheap, so the client does not eat the CPU it measures
due = []  # (time, seq, socket or None): None opens a new connection
start = time.monotonic()
for i in range(n):
    heapq.heappush(due, (start + i * 1.5 / n, i, None))  # ramp up over 1.5 s
seq, open_now, closed, last_report = n, 0, 0, 0.0
alive = set()

def connect():
    global open_now
    s = socket.socket()
    s.setblocking(False)
    s.connect_ex(("127.0.0.1", port))
    try:
        sel.register(s, selectors.EVENT_READ)
    except OSError:
        s.close()
        return None
    alive.add(s)
    open_now += 1
    return s

while True:
    now = time.monotonic()
    while due and due[0][0] <= now:
        _, _, s = heapq.heappop(due)
        seq += 1
        if s is None:
            s = connect()
            if s is None:
                heapq.heappush(due, (now + 0.5, seq, None))
                continue
            head = True
        elif s not in alive:
            continue
        else:
            head = False
        try:
            s.send(b"GET /slow HTTP/1.1\r\nHost: site\r\nX-Loris: " if head else b"a")
        except BlockingIOError:
            pass
        except OSError:
            pass
        heapq.heappush(due, (now + (random.random() if head else 1.0), seq, s))  # staggered trickle
    timeout = max(0.0, min(0.05, (due[0][0] - time.monotonic()) if due else 0.05))
    for key, _ in sel.select(timeout):
        s = key.fileobj
        try:
            data = s.recv(4096)
        except BlockingIOError:
            continue
        except OSError:
            data = b""
        if not data:  # the proxy closed it (after its 408): come back
            sel.unregister(s)
            s.close()
            alive.discard(s)
            open_now -= 1
            closed += 1
            seq += 1
            heapq.heappush(due, (time.monotonic() + 0.05, seq, None))
    if time.monotonic() - last_report > 0.5:
        last_report = time.monotonic()
        print(f"open {open_now} closed {closed}", flush=True)
'''


def start_script(tmp: Path, name: str, text: str, *args: str, stdout: int | None = subprocess.DEVNULL
                 ) -> subprocess.Popen[bytes]:
    path = tmp / f"{name}.py"
    path.write_text(text)
    return subprocess.Popen([sys.executable, str(path), *args], stdout=stdout, stderr=subprocess.DEVNULL)


def wait_port(port: int, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise AssertionError(f"nothing listens on {port}")


def stop_proc(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait(5)


class NoResponse(Exception):
    """The connection ended (EOF or reset) before a single byte of a response."""


class Truncated(Exception):
    """The connection ended in the middle of a response."""


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            raise (Truncated(f"EOF in head: {buf[:80]!r}") if buf else NoResponse())
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            raise Truncated(f"EOF after {len(body)} of {length} body bytes")
        body += chunk
    return status, headers, body


@dataclass
class Outcomes:
    statuses: Counter[int] = field(default_factory=Counter)
    refused: int = 0  # connection refused: never accepted
    keepalive_race: int = 0  # idle connection closed as the request went out: retried
    lost: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    retry_after_missing: int = 0
    errors: list[str] = field(default_factory=list)  # answers other than 200/503, for the message

    def merge(self, other: Outcomes) -> None:
        self.statuses.update(other.statuses)
        self.refused += other.refused
        self.keepalive_race += other.keepalive_race
        self.lost += other.lost
        self.latencies += other.latencies
        self.retry_after_missing += other.retry_after_missing
        self.errors += other.errors

    @property
    def answered(self) -> int:
        return sum(self.statuses.values())


class Loader(threading.Thread):
    """GET `path` in a loop until `stop` is set (or, with `until_refused`, until the
    proxy refuses a connection: it is shutting down)."""

    def __init__(self, port: int, path: str, host: str = "site", keep_alive: bool = True,
                 until_refused: bool = False, pause_s: float = 0.0) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.path = path
        self.host = host
        self.keep_alive = keep_alive
        self.until_refused = until_refused
        self.pause_s = pause_s
        self.stop = threading.Event()
        self.out = Outcomes()

    def run(self) -> None:
        sock: socket.socket | None = None
        reused = False
        conn = "keep-alive" if self.keep_alive else "close"
        req = f"GET {self.path} HTTP/1.1\r\nHost: {self.host}\r\nConnection: {conn}\r\n\r\n".encode()
        while not self.stop.is_set():
            if sock is None:
                try:
                    sock = socket.create_connection(("127.0.0.1", self.port), timeout=15)
                except ConnectionRefusedError:
                    self.out.refused += 1
                    if self.until_refused:
                        return
                    time.sleep(0.05)
                    continue
                reused = False
            t0 = time.perf_counter()
            try:
                try:
                    sock.sendall(req)
                except (BrokenPipeError, ConnectionResetError):
                    raise NoResponse() from None
                status, headers, body = read_response(sock)
            except NoResponse:
                sock.close()
                sock = None
                if reused:
                    self.out.keepalive_race += 1  # retried on a fresh connection
                else:
                    self.out.lost.append("fresh connection closed before any response byte")
                continue
            except (Truncated, OSError) as exc:
                sock.close()
                sock = None
                self.out.lost.append(f"{type(exc).__name__}: {exc}")
                continue
            self.out.latencies.append(time.perf_counter() - t0)
            self.out.statuses[status] += 1
            if status not in (200, 503):
                self.out.errors.append(f"{status} {body[:200]!r}")
            if status == 503 and "retry-after" not in headers:
                self.out.retry_after_missing += 1
            if not self.keep_alive or headers.get("connection", "").lower() == "close":
                sock.close()
                sock = None
            else:
                reused = True
            if self.pause_s:
                time.sleep(self.pause_s)
        if sock is not None:
            sock.close()


def run_loaders(loaders: list[Loader]) -> Outcomes:
    total = Outcomes()
    for ld in loaders:
        ld.stop.set()
    for ld in loaders:
        ld.join(20)
        assert not ld.is_alive(), "a load thread hung"
        total.merge(ld.out)
    return total


def p99(values: list[float]) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * 0.99))]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# ---------------------------------------------------------------------------------------
# the scenarios


@pytest.fixture(autouse=True)
def _many_fds() -> None:
    """2,000 slowloris connections need more descriptors; subprocesses inherit the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < min(hard, 16384):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 16384), hard))


@pytest.fixture
def upstream_port(tmp_path: Path) -> Iterator[int]:
    port = free_port()
    proc = start_script(tmp_path, "upstream", UPSTREAM, str(port))
    try:
        wait_port(port)
        yield port
    finally:
        stop_proc(proc)


@pytest.fixture
def summons() -> Iterator[list[Summon]]:
    started: list[Summon] = []
    yield started
    for s in started:
        s.stop(signal.SIGKILL, timeout=5)


def with_drain(s: Summon, drain: str) -> Summon:
    """Summon writes drain_timeout = "5s"; a test may want another."""
    s.config.write_text(s.config.read_text().replace('drain_timeout = "5s"', f'drain_timeout = "{drain}"'))
    return s


def static_route(port: int, path: str = "/", name: str | None = None) -> str:
    named = f'name = "{name}"\n' if name else ""
    return f'[[route]]\n{named}host = "site"\npath = "{path}"\nupstreams = ["127.0.0.1:{port}"]\n'


def image_route(image: str, path: str, name: str, extra: str = "", host: str = "site") -> str:
    return (f'[[route]]\nname = "{name}"\nhost = "{host}"\npath = "{path}"\nimage = "{image}"\n'
            f'boot_timeout = "10s"\n{extra}')


def busybox(tmp: Path, name: str, delay_s: float = 0.0) -> Path:
    if delay_s:
        cmd = ["sh", "-c", f"sleep {delay_s}; exec busybox httpd -f -p 127.0.0.1:{{port}} -h {{dir}}/site"]
        return make_image(tmp / "images", name, cmd)
    return make_image(tmp / "images", name, BUSYBOX)


def rewrite_routes(s: Summon, routes: str) -> None:
    text = s.config.read_text()
    base = text[: text.index("[[route]]")] if "[[route]]" in text else text
    s.config.write_text(base + routes)


def post_reload(s: Summon, token: str | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{s.admin_port}/reload", method="POST", data=b"")
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as exc:
        body = exc.read()
        try:
            return exc.code, json.loads(body)
        except ValueError:
            return exc.code, {"text": body.decode()}


def instance_ids(s: Summon, route: str) -> set[str]:
    return {i["id"] for r in s.status()["routes"] if r["name"] == route for i in r["instances"]
            if i["state"] == "ready"}


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_sigterm_under_load_loses_no_accepted_request(tmp_path: Path, upstream_port: int,
                                                      summons: list[Summon]) -> None:
    """SIGTERM while keep-alive and connection-per-request clients hammer a static route
    (100 ms answers, so requests are in flight) and while one request waits for a boot:
    every request is answered (200, or 503 + Retry-After before it was read) or its
    connection refused; none is reset or cut short. Then every instance is stopped."""
    image = busybox(tmp_path, "slowboot", delay_s=1.5)
    routes = static_route(upstream_port) + image_route("slowboot", "/", "cold", host="cold")
    # drain_timeout 60 s: the drain must end when the work does (a 1.5 s boot, 100 ms
    # answers), not at its timeout. Bound, not a speed figure: < 30 s, which scheduling
    # noise cannot reach and a drain that waits for its timeout cannot meet.
    s = with_drain(Summon(tmp_path, routes), "60s").start()
    summons.append(s)
    loaders = ([Loader(s.port, "/?delay=100", until_refused=True) for _ in range(8)]
               + [Loader(s.port, "/?delay=20", keep_alive=False, until_refused=True) for _ in range(4)])
    for ld in loaders:
        ld.start()
    time.sleep(1.0)
    cold: dict[str, object] = {}

    def cold_request() -> None:
        try:
            cold["answer"] = http_get(s.port, "/", host="cold", timeout=20)
        except OSError as exc:
            cold["answer"] = exc

    waiter = threading.Thread(target=cold_request)
    waiter.start()
    wait_for(lambda: any(i["state"] == "booting" for i in s.instances()), 5, "a boot to start")
    assert s.proc is not None
    t0 = time.monotonic()
    s.proc.send_signal(signal.SIGTERM)
    code = s.proc.wait(45)
    took = time.monotonic() - t0
    waiter.join(5)
    total = run_loaders(loaders)
    assert code == 0, s.log.read_text()[-2000:]
    assert took < 30, f"drain took {took:.1f}s: it waited for drain_timeout (60 s) instead of the work"
    assert not total.lost, f"lost requests: {Counter(total.lost)}; outcomes {total}"
    assert total.retry_after_missing == 0
    assert set(total.statuses) <= {200, 503}, total.statuses
    assert total.statuses[200] > 50, total
    assert all(ld.out.refused for ld in loaders), "every client ends refused: summon stopped accepting"
    answer = cold["answer"]
    assert isinstance(answer, tuple) and answer[0] == 200, f"the request waiting for a boot: {answer!r}"
    assert not pids_matching(str(image)), "an instance outlived summon"
    log_text = s.log.read_text()
    assert "draining" in log_text


@pytest.mark.timeout(60)
def test_second_sigterm_forces_exit_and_still_stops_instances(tmp_path: Path, upstream_port: int,
                                                              summons: list[Summon]) -> None:
    image = busybox(tmp_path, "site")
    routes = static_route(upstream_port) + image_route("site", "/", "app", host="app")
    # Bound, not a speed figure: the forced exit comes within 20 s, where the drain would
    # hold for 120 s (drain_timeout) and the request for 300 s; noise cannot span that gap.
    s = with_drain(Summon(tmp_path, routes), "120s").start()
    summons.append(s)
    assert http_get(s.port, "/", host="app")[0] == 200
    assert pids_matching(str(image))
    hung = Loader(s.port, "/?delay=300000", until_refused=True)  # would hold the drain for 120 s
    hung.start()
    wait_for(lambda: s.status()["totals"]["inflight"] >= 1, 5, "the slow request to be in flight")
    assert s.proc is not None
    s.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert s.proc.poll() is None, "the first SIGTERM waits for the request in flight"
    t0 = time.monotonic()
    s.proc.send_signal(signal.SIGINT)
    code = s.proc.wait(30)
    assert time.monotonic() - t0 < 20
    assert code == 1
    assert not pids_matching(str(image)), "forced exit must still stop the instances"
    run_loaders([hung])


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_sighup_reload_under_load(tmp_path: Path, upstream_port: int, summons: list[Summon]) -> None:
    """Reload five times (SIGHUP, and POST /reload) while clients load a summoned and a
    static route: no request fails; the unchanged summoned route keeps its instance;
    an added route answers; a removed summoned route drains and its process stops."""
    busybox(tmp_path, "app")
    gone = busybox(tmp_path, "gone")
    keep = static_route(upstream_port, "/", "static") + image_route("app", "/", "app", "min_replicas = 1\n", host="app")
    s = Summon(tmp_path, keep + image_route("gone", "/", "gone", host="gone")).start()
    summons.append(s)
    assert http_get(s.port, "/", host="gone")[0] == 200
    wait_for(lambda: bool(instance_ids(s, "app")), 10, "the app instance")
    app_ids = instance_ids(s, "app")
    loaders = [Loader(s.port, "/", host="app") for _ in range(3)] + [Loader(s.port, "/?delay=5") for _ in range(3)]
    for ld in loaders:
        ld.start()
    assert s.proc is not None
    for i in range(5):
        extra = static_route(upstream_port, f"/added{i}", f"added{i}")
        rewrite_routes(s, keep + extra)
        if i % 2:
            status, body = post_reload(s)
            assert status == 200 and body["ok"], body
        else:
            s.proc.send_signal(signal.SIGHUP)
        wait_for(lambda i=i: http_get(s.port, f"/added{i}")[0] == 200, 5, f"route added{i}")
        time.sleep(0.3)
    total = run_loaders(loaders)
    assert not total.lost, Counter(total.lost)
    assert total.keepalive_race == 0
    assert set(total.statuses) == {200}, total.statuses
    assert total.statuses[200] > 200
    assert instance_ids(s, "app") == app_ids, "an unchanged route lost its instance on reload"
    assert http_get(s.port, "/", host="gone")[0] == 404
    wait_for(lambda: not pids_matching(str(gone)), 10, "the removed route's instance to stop")
    assert "reloaded" in s.log.read_text()


@pytest.mark.timeout(40)
def test_invalid_reload_keeps_the_old_config(tmp_path: Path, upstream_port: int, summons: list[Summon]) -> None:
    s = Summon(tmp_path, static_route(upstream_port)).start()
    summons.append(s)
    good = s.config.read_text()
    loader = Loader(s.port, "/?delay=2")
    loader.start()
    assert s.proc is not None
    # a semantic error (file:line) by SIGHUP, then a syntax error by the admin API
    s.config.write_text(good.replace('path = "/"', 'path = "no-slash"\nmax_replicas = "many"'))
    s.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload refused" in s.log.read_text(), 5, "the refusal to be logged")
    assert "summon.toml:" in s.log.read_text()
    s.config.write_text(good + "\n[[route]\nbroken")
    status, body = post_reload(s)
    assert status == 400 and body["ok"] is False
    assert body["errors"] and all("summon.toml:" in e for e in body["errors"]), body
    # a loader crash (not a ConfigError) is refused the same way
    s.config.write_text(good + '\ninclude = ["bad\\u0000name.toml"]\n')
    status, body = post_reload(s)
    assert status == 400 and body["ok"] is False, body
    assert http_get(s.port, "/?delay=1")[0] == 200, "the old config keeps serving"
    assert s.proc.poll() is None
    total = run_loaders([loader])
    assert not total.lost and set(total.statuses) == {200}, total


@pytest.mark.timeout(30)
def test_admin_reload_needs_the_token(tmp_path: Path, upstream_port: int, summons: list[Summon]) -> None:
    s = Summon(tmp_path, static_route(upstream_port), 'admin_token = "s3cret-s3cret-s3cret"').start()
    summons.append(s)
    assert post_reload(s)[0] == 401
    assert post_reload(s, "wrong")[0] == 401
    status, body = post_reload(s, "s3cret-s3cret-s3cret")
    assert status == 200 and body["ok"], body


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_killing_instances_under_get_load_fails_no_get(tmp_path: Path, summons: list[Summon]) -> None:
    """Real `summon serve`, process backend: SIGKILL a busybox instance (found by its
    image directory) three times while clients GET: every GET is answered 200."""
    image = busybox(tmp_path, "site")
    s = Summon(tmp_path, image_route("site", "/", "site", "min_replicas = 2\nmax_replicas = 3\n")).start()
    summons.append(s)
    wait_for(lambda: len(instance_ids(s, "site")) >= 2, 10, "two ready replicas")
    loaders = [Loader(s.port, "/", pause_s=0.002) for _ in range(4)] + \
              [Loader(s.port, "/", keep_alive=False, pause_s=0.002) for _ in range(2)]
    for ld in loaders:
        ld.start()
    killed = 0
    for _ in range(3):
        time.sleep(1.0)
        pids = pids_matching(str(image))
        assert pids, "no instance to kill"
        os.kill(pids[0], signal.SIGKILL)
        killed += 1
    time.sleep(1.0)
    total = run_loaders(loaders)
    assert killed == 3
    assert not total.lost, Counter(total.lost)
    assert set(total.statuses) == {200}, (total.statuses, total.errors)
    assert total.statuses[200] > 300


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_2000_slowloris_connections_do_not_hurt_a_normal_client(tmp_path: Path, upstream_port: int,
                                                                summons: list[Summon]) -> None:
    """2,000 connections each trickling a header byte a second (header_timeout 5 s, so
    they are cut off and come back) while a normal keep-alive client keeps asking: every
    one of its requests is answered, each within 10 s.

    Bound, not a speed figure: it used to assert a p99 within 2x of an unloaded one, which
    a neighbour's burst on a shared 2-core machine crossed at random. A starved client
    waits for ever (or for a header_timeout per request at best); noise does not reach
    10 s. The p99s are printed for a human to read."""
    s = Summon(tmp_path, static_route(upstream_port),
               'header_timeout = "5s"\nmax_connections = 5000\nmax_inflight = 5000').start()
    summons.append(s)

    def measure(n: int) -> list[float]:
        out: list[float] = []
        with socket.create_connection(("127.0.0.1", s.port), timeout=10) as sock:  # each answer within 10 s
            req = b"GET / HTTP/1.1\r\nHost: site\r\n\r\n"
            for _ in range(n):
                t0 = time.perf_counter()
                sock.sendall(req)
                status, _, _ = read_response(sock)
                out.append(time.perf_counter() - t0)
                assert status == 200
                time.sleep(0.002)
        return out

    measure(300)  # warm up
    unloaded = measure(1500)
    loris = start_script(tmp_path, "slowloris", SLOWLORIS, str(s.port), "2000", stdout=subprocess.PIPE)
    last = {"open": 0, "closed": 0}

    def follow() -> None:  # keep the newest "open N closed M" line
        assert loris.stdout is not None
        for raw in loris.stdout:
            parts = raw.split()
            if len(parts) == 4 and parts[0] == b"open":
                last["open"], last["closed"] = int(parts[1]), int(parts[3])

    threading.Thread(target=follow, daemon=True).start()
    try:
        wait_for(lambda: last["open"] >= 1990, 15, "2,000 slowloris connections")
        conns = s.status()["totals"]["connections"]
        assert conns >= 1990, f"summon holds {conns} connections"
        loaded = measure(1500)  # ~5 s: reaches the 5 s header timeout, so connections churn
        wait_for(lambda: last["closed"] > 0, 10, "header_timeout to cut slowloris connections")
        still_open = last["open"]  # open right now (they reconnect once cut)
        closed = last["closed"]
        assert s.proc is not None and s.proc.poll() is None
    finally:
        stop_proc(loris)
        if loris.stdout is not None:
            loris.stdout.close()
    base, under = p99(unloaded), p99(loaded)
    print(f"normal client p99: unloaded {base * 1000:.3f} ms, with 2000 slowloris {under * 1000:.3f} ms")
    assert closed > 0, "header_timeout never cut a slowloris connection"
    assert len(loaded) == 1500 and max(loaded) < 10, f"slowest answer {max(loaded):.1f} s"
    assert still_open >= 1000, f"only {still_open} slowloris connections open while the client was measured"


@pytest.mark.timeout(30)
def test_max_connections_sheds_with_a_clean_503(tmp_path: Path, upstream_port: int, summons: list[Summon]) -> None:
    """Past max_connections a new connection is answered 503 + Retry-After at once,
    even when the client already sent its request (no reset eats the answer)."""
    s = Summon(tmp_path, static_route(upstream_port), "max_connections = 20").start()
    summons.append(s)
    held = [socket.create_connection(("127.0.0.1", s.port)) for _ in range(20)]
    try:
        time.sleep(0.2)
        for _ in range(20):
            with socket.create_connection(("127.0.0.1", s.port), timeout=5) as c:
                c.sendall(b"GET / HTTP/1.1\r\nHost: site\r\n\r\n")
                # "at once" needs no clock: the 20 held connections stay open until the end,
                # so an answer that waited for room would never come (socket timeout 5 s).
                status, headers, _ = read_response(c)
                assert status == 503 and headers.get("retry-after"), (status, headers)
    finally:
        for c in held:
            c.close()
    def room() -> bool:
        try:
            return http_get(s.port, "/")[0] == 200
        except OSError:  # summon may not have seen the held connections close yet: refused at the door
            return False

    wait_for(room, 5, "room again")


@pytest.mark.timeout(45)
def test_max_inflight_sheds_early_and_serves_the_rest(tmp_path: Path, upstream_port: int,
                                                      summons: list[Summon]) -> None:
    """Thirty requests to a 10 s upstream with max_inflight 10: ten are served, twenty
    get 503 early. "Early" is an order, not a duration: every 503 arrives before the first
    200, which cannot come before 10 s; noise would have to delay a 503 by that much."""
    s = Summon(tmp_path, static_route(upstream_port), "max_inflight = 10").start()
    summons.append(s)
    results: list[tuple[int, float]] = []
    lock = threading.Lock()

    def one() -> None:
        status = http_get(s.port, "/?delay=10000", timeout=30)[0]
        with lock:
            results.append((status, time.monotonic()))

    threads = [threading.Thread(target=one) for _ in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(35)
    ok = [at for st, at in results if st == 200]
    shed = [at for st, at in results if st == 503]
    assert len(results) == 30
    assert len(ok) == 10 and len(shed) == 20, results
    assert max(shed) < min(ok), "shedding must be early, not after the slow requests"


@pytest.mark.timeout(40)
def test_a_slow_reader_of_a_large_response_is_bounded(tmp_path: Path, upstream_port: int,
                                                     summons: list[Summon]) -> None:
    """Ten clients ask for 64 MB each and do not read: summon's memory stays bounded
    (flow control, not buffering) and a normal client is still served fast."""
    s = Summon(tmp_path, static_route(upstream_port)).start()
    summons.append(s)
    assert s.proc is not None
    before = rss_kib(s.proc.pid)
    stalled = []
    for _ in range(10):
        c = socket.socket()
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        c.connect(("127.0.0.1", s.port))
        c.sendall(b"GET /?size=67108864 HTTP/1.1\r\nHost: site\r\n\r\n")
        stalled.append(c)
    try:
        time.sleep(2.0)
        grown = rss_kib(s.proc.pid) - before
        # Bound, not a speed figure: answered within 10 s (a loop stuck on the stalled
        # readers never answers); the memory bound below is the real check.
        assert http_get(s.port, "/", timeout=10)[0] == 200
        assert grown < 64 * 1024, f"summon grew by {grown} KiB for 10 stalled readers"
    finally:
        for c in stalled:
            c.close()


@pytest.mark.timeout(30)
def test_a_reader_that_never_reads_is_cut_off(tmp_path: Path, upstream_port: int, summons: list[Summon]) -> None:
    s = Summon(tmp_path, static_route(upstream_port), 'send_timeout = "2s"').start()
    summons.append(s)
    c = socket.socket()
    c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    c.connect(("127.0.0.1", s.port))
    c.sendall(b"GET /?size=67108864 HTTP/1.1\r\nHost: site\r\n\r\n")
    time.sleep(4.0)
    wait_for(lambda: s.status()["totals"]["connections"] == 0, 10, "the stalled reader to be cut off")
    c.close()


@pytest.mark.timeout(40)
def test_slow_bodies_cannot_starve_a_route(tmp_path: Path, summons: list[Summon]) -> None:
    script = tmp_path / "upstream.py"
    script.write_text(UPSTREAM)
    make_image(tmp_path / "images", "py", [sys.executable, str(script), "{port}"])
    s = Summon(tmp_path, image_route("py", "/", "py", "max_replicas = 1\nmax_conns = 2\n"),
               'body_timeout = "2s"').start()
    summons.append(s)
    assert http_get(s.port, "/")[0] == 200
    slow = []
    for _ in range(4):
        c = socket.create_connection(("127.0.0.1", s.port))
        c.sendall(b"POST /upload HTTP/1.1\r\nHost: site\r\nContent-Length: 100000\r\n\r\n")
        slow.append(c)
    try:
        end = time.monotonic() + 12
        got: int | None = None
        result: list[int] = []

        def normal_get() -> None:
            try:
                result.append(http_get(s.port, "/", timeout=12)[0])
            except OSError:
                result.append(0)

        t = threading.Thread(target=normal_get, daemon=True)
        t.start()
        while time.monotonic() < end and t.is_alive():
            for c in slow:
                try:
                    c.send(b"a")
                except OSError:
                    pass
            time.sleep(0.5)
        t.join(1)
        got = result[0] if result else None
        assert got == 200, "a normal GET was starved by slow request bodies"
    finally:
        for c in slow:
            c.close()


def _bench_overload():  # type: ignore[no-untyped-def]
    """loadtests/bench_overload.py: its open-loop generator and CPU cgroup cap."""
    return load("bench_overload")


def _answers(port: int) -> bool:
    """A 200 now; a refused connection (summon still shedding) is a no, not an error."""
    try:
        return http_get(port, "/")[0] == 200
    except ConnectionRefusedError:
        return False


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_a_cpu_saturated_summon_sheds_early_and_only_then(tmp_path: Path, upstream_port: int,
                                                          summons: list[Summon]) -> None:
    """Requests waiting for a slow upstream are not overload. Capped at 5% of a core and
    offered about 3x what it can serve, summon refuses connections early (the kernel
    answers them) instead of queueing them: nothing hangs, the p99 of what it serves stays
    under a second (without shedding it grows to several: the backlog is the queue), and
    it accepts again once the load has passed.

    The p99 claim is a speed figure and lives in `make bench` (loadtests/bench_overload.py,
    summon's 2xx p99 at 2x over 1x, goal <= 10): here it is printed, not asserted."""
    bo = _bench_overload()
    route = f'[[route]]\nhost = "*"\npath = "/"\nupstreams = ["127.0.0.1:{upstream_port}"]\nmax_conns = 1024\n'
    s = Summon(tmp_path, route, "max_inflight = 5000").start()
    summons.append(s)
    assert s.proc is not None

    slow: list[int] = []
    threads = [threading.Thread(target=lambda: slow.append(http_get(s.port, "/?delay=1500", timeout=10)[0]))
               for _ in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    assert slow == [200] * 100
    assert s.status()["overload"]["episodes"] == 0, "waiting for an upstream is not overload"

    cgroup = bo.cap_cpu(s.proc.pid, 0.05)
    if cgroup is None:
        pytest.skip("no writable CPU cgroup (needs root): summon cannot be made the bottleneck")
    try:
        script = tmp_path / "openloop.py"
        script.write_text(bo.GENERATOR)
        cp = subprocess.run([sys.executable, str(script), "127.0.0.1", str(s.port), "1500", "3", "2048"],
                            capture_output=True, text=True, timeout=30, check=True)
        r = json.loads(cp.stdout.strip().splitlines()[-1])
        print({k: r[k] for k in ("offered_per_s", "goodput_per_s", "shed_503", "refused", "reset", "unanswered",
                                 "errors", "p50_ms", "p99_ms")})
        overload = s.status()["overload"]
        assert overload["episodes"] >= 1 and overload["seconds"] > 0, overload
        assert r["refused"] + r["reset"] > 0, "no connection was refused early"
        assert r["ok"] > 0 and r["other"] == 0 and r["errors"] == 0
        assert r["unanswered"] <= 0.01 * r["sent"], f"{r['unanswered']} requests still queued after the run"
        wait_for(lambda: _answers(s.port), 5, "summon to accept again")  # an episode lasts up to 1.6 s
        assert not s.status()["overload"]["shedding"]
    finally:
        s.stop(signal.SIGKILL)
        bo.uncap(cgroup)
