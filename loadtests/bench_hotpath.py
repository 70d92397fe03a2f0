"""The Python cost of one proxied keep-alive GET, without sockets: a diagnostic figure.

The `proxy` section measures what users get (wrk over loopback), but there the kernel's
loopback writes and wake-ups are most of the CPU, and the machine's noise moves every
figure by 10-30%. This section isolates the part a change to `proxy/http` can move: in a
fresh interpreter it drives a real `ClientConnection` and `UpstreamConnection` (stand-in
transports that only count writes) through request head -> route -> lease -> upstream
head -> response head -> body -> end, for the same 13-byte response the proxy section
uses. The reference, timed in the same process: llhttp alone parsing that request and
that response with empty callbacks (what any httptools-based proxy must pay). Reported:
microseconds per request for both (best of 5 batches) and their ratio.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

_CHILD = r'''
import json, os, sys, tempfile, time
sys.path.insert(0, sys.argv[2])
import httptools, uvloop
from proxy.config import load
from proxy.routing.dispatch import Dispatcher
from proxy.http.front import ClientConnection
from proxy.http.state import ServerState
from proxy.http.upstream import UpstreamConnection, UpstreamPool
from proxy.observe.metrics import Metrics
from proxy.routing.table import RouteTable
from proxy.serve.server import make_pool_factory

class CountingTransport:
    def __init__(self, peer): self.peer, self.writes = peer, 0
    def write(self, data): self.writes += 1
    def get_extra_info(self, key, default=None): return self.peer if key == "peername" else default
    def is_closing(self): return False
    def pause_reading(self): pass
    def resume_reading(self): pass
    def close(self): pass
    def abort(self): pass

n = int(sys.argv[1])
tmp = tempfile.mkdtemp()
with open(os.path.join(tmp, "summon.toml"), "w") as f:
    f.write('[proxy]\nadmin = ""\n[[route]]\nname = "r"\npath = "/"\nupstreams = ["127.0.0.1:9"]\n')
config = load(os.path.join(tmp, "summon.toml"))
p = config.proxy
loop = uvloop.new_event_loop()
pool = UpstreamPool(loop, p.upstream_pool_size, p.upstream_idle_s, p.connect_timeout_s)
state = ServerState(config=p, loop=loop, dispatcher=Dispatcher(RouteTable(config.routes), make_pool_factory([])),
                    upstreams=pool, via=p.server_name.encode())
state.observe = Metrics(clock=loop.time).observe
address = config.routes[0].upstreams[0]
upstream = UpstreamConnection(address, pool)
upstream.connection_made(CountingTransport(("127.0.0.1", 9)))
upstream.checked_out = True
pool.slot(address).busy = 1
pool.park(upstream)  # idle and ready, as after the first request of a run
client = ClientConnection(state)
client.connection_made(CountingTransport(("127.0.0.1", 40000)))
REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Wed, 25 Nov 2026 08:14:57 GMT\r\n"
            b"Content-Type: text/plain\r\nContent-Length: 13\r\nConnection: keep-alive\r\n\r\nhello, world\n")

def proxied():
    client.data_received(REQUEST)
    upstream.data_received(RESPONSE)

class Empty:
    def on_message_begin(self): pass
    def on_url(self, url): pass
    def on_status(self, status): pass
    def on_header(self, name, value): pass
    def on_headers_complete(self): pass
    def on_body(self, body): pass
    def on_message_complete(self): pass

empty = Empty()
request_parser = httptools.HttpRequestParser(empty)

def parse_only():
    request_parser.feed_data(REQUEST)
    httptools.HttpResponseParser(empty).feed_data(RESPONSE)  # a fresh one per response, as summon does

def best_us(fn):
    for _ in range(2000):
        fn()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t) / n * 1e6)
    return best

before = (client.transport.writes, upstream.transport.writes)
proxied_us = best_us(proxied)
done = client.transport.writes - before[0], upstream.transport.writes - before[1]
if done != (2000 + 5 * n,) * 2:  # one write each way per request: the requests really went through
    raise SystemExit(f"expected {2000 + 5 * n} writes each way, got {done}")
print(json.dumps({"proxied_us": proxied_us, "parse_only_us": best_us(parse_only)}))
'''


def section_hotpath(bench: Any, n: int | None = None) -> dict[str, Any]:
    n = n or (20_000 if bench.args.quick else 100_000)
    bench.log(f"hot path: {n} requests in-process, best of 5")
    out = subprocess.run([sys.executable, "-c", _CHILD, str(n), str(ROOT)], capture_output=True, text=True,
                         check=False, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"hot path child failed: {out.stderr.strip()[-2000:] or out.stdout.strip()}")
    r = json.loads(out.stdout)
    result = {
        "requests_per_batch": n,
        "python": sys.version.split()[0],
        "proxied_us": round(r["proxied_us"], 2),
        "parse_only_us": round(r["parse_only_us"], 2),
        "proxied_over_parse_only": round(r["proxied_us"] / r["parse_only_us"], 2),
    }
    print(f"  proxied in-process {result['proxied_us']:.2f} us/request, llhttp alone {result['parse_only_us']:.2f} us:"
          f" {result['proxied_over_parse_only']:.1f}x")
    return result
