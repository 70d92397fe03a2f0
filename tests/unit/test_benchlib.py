"""Unit tests of loadtests/benchlib.py: the wrk report parser (on reports captured from
real wrk 4.1 runs on loopback) and the median / ratio / goal helpers."""

from __future__ import annotations

import json
import os
import sys
import time

import pytest

from tests.helpers.loadtests import load

bl = load("benchlib")

# --- reports captured from real runs (wrk debian/4.1.0-3+b2) -----------------------
# nginx `return`/static file, 1 connection: us and ms latencies, k in Req/Sec, MB read.
NGINX_C1 = """\
Running 1s test @ http://127.0.0.1:18081/hello
  1 threads and 1 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    72.73us  237.00us   4.08ms   98.34%
    Req/Sec    20.53k     1.57k   21.40k    90.91%
  Latency Distribution
     50%   44.00us
     75%   45.00us
     90%   53.00us
     99%    1.17ms
  22465 requests in 1.10s, 5.33MB read
Requests/sec:  20379.50
Transfer/sec:      4.84MB
"""

# nginx answering 404 to everything, 32 connections: "Non-2xx or 3xx responses".
NON2XX_C32 = """\
Running 1s test @ http://127.0.0.1:18081/nope
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   544.65us  366.17us   4.68ms   86.39%
    Req/Sec    56.90k    13.40k   86.54k    90.00%
  Latency Distribution
     50%  419.00us
     75%  690.00us
     90%    0.92ms
     99%    2.00ms
  56498 requests in 1.00s, 16.60MB read
  Non-2xx or 3xx responses: 56498
Requests/sec:  56453.74
Transfer/sec:     16.58MB
"""

# mitmdump --mode reverse in front of nginx, 32 connections: ms latencies, KB read.
MITMPROXY_C32 = """\
Running 2s test @ http://127.0.0.1:18182/
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   103.71ms   18.37ms 182.14ms   89.47%
    Req/Sec   313.16     37.12   323.00     94.74%
  Latency Distribution
     50%   97.60ms
     75%   98.77ms
     90%  134.21ms
     99%  178.43ms
  608 requests in 2.00s, 95.59KB read
Requests/sec:    303.87
Transfer/sec:     47.78KB
"""

# nginx `return 444` (closes the connection): read errors, no requests, -nan%.
READ_ERRORS = """\
Running 1s test @ http://127.0.0.1:18081/close
  1 threads and 1 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     0.00us    0.00us   0.00us    -nan%
    Req/Sec     0.00      0.00     0.00      -nan%
  Latency Distribution
     50%    0.00us
     75%    0.00us
     90%    0.00us
     99%    0.00us
  0 requests in 1.10s, 0.00B read
  Socket errors: connect 0, read 11691, write 0, timeout 0
Requests/sec:      0.00
Transfer/sec:       0.00B
"""

# a server answering after 1.2 s, wrk --timeout 1s: timeout errors.
TIMEOUTS = """\
Running 3s test @ http://127.0.0.1:18082/
  1 threads and 2 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     0.00us    0.00us   0.00us    -nan%
    Req/Sec     1.00      0.00     1.00    100.00%
  Latency Distribution
     50%    0.00us
     75%    0.00us
     90%    0.00us
     99%    0.00us
  4 requests in 3.01s, 160.00B read
  Socket errors: connect 0, read 0, write 0, timeout 4
Requests/sec:      1.33
Transfer/sec:      53.23B
"""

# the same server without --timeout: latencies in seconds (wrk pads "1.20s " with a space).
SECONDS = (
    "Running 4s test @ http://127.0.0.1:18082/\n"
    "  1 threads and 2 connections\n"
    "  Thread Stats   Avg      Stdev     Max   +/- Stdev\n"
    "    Latency     1.20s     0.91ms   1.20s    83.33%\n"
    "    Req/Sec     3.00      4.69    10.00     75.00%\n"
    "  Latency Distribution\n"
    "     50%    1.20s \n"
    "     75%    1.20s \n"
    "     90%    1.20s \n"
    "     99%    1.20s \n"
    "  6 requests in 4.01s, 240.00B read\n"
    "Requests/sec:      1.50\n"
    "Transfer/sec:      59.88B\n"
)

# wrk's whole output when nothing listens (on stderr; stdout is empty).
REFUSED = "unable to connect to 127.0.0.1:18099 Connection refused\n"


# --- parser ---------------------------------------------------------------------------


def test_parse_nginx_c1():
    r = bl.parse_wrk(NGINX_C1)
    assert r["requests_per_s"] == pytest.approx(20379.50)
    assert r["requests"] == 22465
    assert r["duration_s"] == pytest.approx(1.10)
    assert r["bytes_read"] == round(5.33 * 1024 * 1024)
    assert r["latency_avg_ms"] == pytest.approx(0.07273)
    assert r["latency_ms"] == pytest.approx({"50": 0.044, "75": 0.045, "90": 0.053, "99": 1.17})
    assert r["non2xx"] == 0
    assert r["socket_errors"] == {"connect": 0, "read": 0, "write": 0, "timeout": 0}
    assert r["errors"] == 0


def test_parse_non2xx_counts_as_errors():
    r = bl.parse_wrk(NON2XX_C32)
    assert r["requests_per_s"] == pytest.approx(56453.74)
    assert r["non2xx"] == 56498
    assert r["errors"] == 56498
    # "0.92ms" follows "690.00us" in the same distribution: both normalised to ms.
    assert r["latency_ms"] == pytest.approx({"50": 0.419, "75": 0.690, "90": 0.92, "99": 2.00})


def test_parse_mitmproxy_ms_and_kb():
    r = bl.parse_wrk(MITMPROXY_C32)
    assert r["requests_per_s"] == pytest.approx(303.87)
    assert r["requests"] == 608
    assert r["bytes_read"] == round(95.59 * 1024)
    assert r["latency_avg_ms"] == pytest.approx(103.71)
    assert r["latency_ms"]["50"] == pytest.approx(97.60)
    assert r["latency_ms"]["99"] == pytest.approx(178.43)
    assert r["errors"] == 0


def test_parse_read_errors():
    r = bl.parse_wrk(READ_ERRORS)
    assert r["requests_per_s"] == 0.0
    assert r["requests"] == 0
    assert r["socket_errors"] == {"connect": 0, "read": 11691, "write": 0, "timeout": 0}
    assert r["errors"] == 11691
    assert r["latency_ms"]["50"] == 0.0


def test_parse_timeouts():
    r = bl.parse_wrk(TIMEOUTS)
    assert r["requests"] == 4
    assert r["requests_per_s"] == pytest.approx(1.33)
    assert r["socket_errors"]["timeout"] == 4
    assert r["errors"] == 4
    assert r["bytes_read"] == 160


def test_parse_seconds_with_trailing_space():
    r = bl.parse_wrk(SECONDS)
    assert r["latency_avg_ms"] == pytest.approx(1200.0)
    assert r["latency_ms"] == pytest.approx({"50": 1200.0, "75": 1200.0, "90": 1200.0, "99": 1200.0})
    assert r["duration_s"] == pytest.approx(4.01)
    assert r["requests_per_s"] == pytest.approx(1.50)


@pytest.mark.parametrize("text", [REFUSED, "", "Usage: wrk <options> <url>\n"])
def test_parse_rejects_non_reports(text):
    with pytest.raises(bl.WrkParseError):
        bl.parse_wrk(text)


@pytest.mark.parametrize(
    ("value", "unit", "ms"),
    [("44.00", "us", 0.044), ("1.17", "ms", 1.17), ("1.20", "s", 1200.0), ("2.00", "m", 120_000.0), ("1", "h", 3.6e6)],
)
def test_to_ms(value, unit, ms):
    assert bl.to_ms(value, unit) == pytest.approx(ms)


def test_to_ms_unknown_unit():
    with pytest.raises(bl.WrkParseError):
        bl.to_ms("1", "ns")


def test_wrk_argv_rounds_durations_up_to_whole_seconds():
    argv = bl.wrk_argv("http://127.0.0.1:1/", 2.5, 32, timeout_s=0.5)
    assert argv == ["wrk", "-t1", "-c32", "-d3s", "--latency", "--timeout=1s", "http://127.0.0.1:1/"]
    assert bl.wrk_argv("http://x/", 5, 1)[3] == "-d5s"


# --- figures ----------------------------------------------------------------------


def test_median():
    assert bl.median([3.0, 1.0, 2.0]) == 2.0
    assert bl.median([4, 1, 3, 2]) == 2.5
    assert bl.median([5]) == 5.0
    assert bl.median([]) is None
    assert bl.median([None, 1.0, None, 3.0]) == 2.0
    assert bl.median([None]) is None
    assert bl.median(x for x in (1, 2, 3)) == 2.0


def test_ratio_and_difference():
    assert bl.ratio(30_000, 120_000) == pytest.approx(0.25)
    assert bl.ratio(1, 0) is None
    assert bl.ratio(None, 2) is None
    assert bl.ratio(2, None) is None
    assert bl.difference(0.25, 0.05) == pytest.approx(0.2)
    assert bl.difference(None, 0.05) is None


@pytest.mark.parametrize(
    ("value", "op", "goal", "status"),
    [
        (0.25, ">=", 0.25, "PASS"),
        (0.24, ">=", 0.25, "FAIL"),
        (12.0, ">=", 10, "PASS"),
        (0.29, "<", 0.3, "PASS"),
        (0.3, "<", 0.3, "FAIL"),
        (None, "<", 0.3, "N/A"),
        (float("nan"), ">=", 1, "N/A"),
    ],
)
def test_check_goal(value, op, goal, status):
    assert bl.check_goal(value, op, goal) == status


def test_paired_ratios_skip_rounds_missing_either_side():
    assert bl.paired_ratios([10.0, None, 30.0, 8.0], [20.0, 5.0, 0.0, 4.0]) == [0.5, 2.0]
    assert bl.median(bl.paired_ratios([1.0, 3.0, 2.0], [4.0, 4.0, 4.0])) == 0.5


def test_check_goal_unknown_op():
    with pytest.raises(ValueError):
        bl.check_goal(1.0, "==", 1.0)


def test_write_json_merges_sections(tmp_path):
    out = tmp_path / "results" / "bench.json"
    bl.write_json(out, {"proxy": {"a": 1}, "meta": {"n": 1}})
    bl.write_json(out, {"cold_start": {"b": 2}, "meta": {"n": 2}})
    assert json.loads(out.read_text()) == {"proxy": {"a": 1}, "cold_start": {"b": 2}, "meta": {"n": 2}}
    bl.write_json(out, {"x": 1}, merge=False)
    assert json.loads(out.read_text()) == {"x": 1}
    assert not list(out.parent.glob("*.tmp"))


def test_free_port_and_wait_port():
    import socket

    port = bl.free_port()
    assert not bl.wait_port("127.0.0.1", port, timeout=0.2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen(1)
        assert bl.wait_port("127.0.0.1", port, timeout=2)
    assert not bl.wait_port("127.0.0.1", bl.free_port(), timeout=5, alive=lambda: False)


def test_processes_stop_by_pid(tmp_path):
    with bl.Processes(tmp_path) as procs:
        p = procs.start(
            "sleeper", [sys.executable, "-c", "import sys, time; print('hi', file=sys.stderr); time.sleep(60)"]
        )
        assert p.alive()
    assert not p.alive()
    assert procs.procs == []
    assert p.popen.returncode is not None


def test_hotpath_section_drives_real_connections():
    """The in-process bench must keep working as proxy/http changes: it fails unless every
    request really went through (one write to each side)."""
    hotpath = load("bench_hotpath")

    class Args:
        quick = True

    class Bench:
        args = Args()

        def log(self, msg: str) -> None:
            pass

    r = hotpath.section_hotpath(Bench(), n=500)
    assert r["proxied_us"] > r["parse_only_us"] > 0
    assert r["proxied_over_parse_only"] > 1


def test_cpu_seconds_counts_this_process_and_none_for_a_missing_one() -> None:
    before = bl.cpu_seconds(os.getpid())
    assert before is not None
    end = time.process_time() + 0.05
    while time.process_time() < end:  # burn some CPU: the count must grow
        pass
    after = bl.cpu_seconds(os.getpid())
    assert after is not None and after > before
    assert bl.cpu_seconds(None) is None
    assert bl.cpu_seconds(2**22 + 12345) is None  # above pid_max's default: no such process
