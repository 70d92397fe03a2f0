"""Helpers shared by the benchmark scripts in loadtests/.

Processes, ports and wrk: everything here is plain standard library so that the
benchmarks run from any Python 3.11 without the project's dependencies.

- free_port(), wait_port(): pick a loopback port, wait until something listens on it.
- Processes: start commands in their own process group, with stdout/stderr in log
  files, and stop every one of them by PID (SIGTERM, then SIGKILL) when leaving.
- run_wrk() / parse_wrk(): run wrk and turn its text report into numbers
  (latencies in milliseconds, errors counted).
- median(), ratio(), check_goal(), write_json(): small figures helpers.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# ---------------------------------------------------------------------------
# ports


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_port(
    host: str,
    port: int,
    timeout: float = 15.0,
    alive: Callable[[], bool] | None = None,
    interval: float = 0.05,
) -> bool:
    """Wait until (host, port) accepts a connection.

    Returns False on timeout, or as soon as `alive()` says the process that should
    open the port has died.
    """
    deadline = time.monotonic() + timeout
    while True:
        if port_open(host, port):
            return True
        if alive is not None and not alive():
            return False
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


# ---------------------------------------------------------------------------
# processes


def tail(path: Path | str, lines: int = 20) -> str:
    """The last `lines` lines of a text file ('' if it does not exist)."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


@dataclass
class Proc:
    name: str
    argv: list[str]
    popen: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stderr_tail(self, lines: int = 20) -> str:
        return tail(self.stderr_path, lines)

    def output_tail(self, lines: int = 20) -> str:
        """stderr tail, or stdout tail when stderr is empty (some tools log to stdout)."""
        return self.stderr_tail(lines) or tail(self.stdout_path, lines)


def _signal_group(pid: int, sig: int) -> None:
    """Signal the process group led by `pid` (our child), falling back to the PID alone."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


@dataclass
class Processes:
    """Every process a benchmark starts; `stop_all()` (or leaving the `with`) stops them.

    Each child gets its own session (so a Ctrl-C on the terminal reaches only the
    benchmark, which then stops the children in order) and so its own process group,
    whose id is the child's PID: stopping signals that group, which also catches
    any workers the child forked.
    """

    log_dir: Path
    procs: list[Proc] = field(default_factory=list)

    def start(
        self,
        name: str,
        argv: Sequence[str],
        env: dict[str, str] | None = None,
        cwd: Path | str | None = None,
    ) -> Proc:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        out = self.log_dir / f"{name}.stdout.log"
        err = self.log_dir / f"{name}.stderr.log"
        with open(out, "wb") as fo, open(err, "wb") as fe:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=fo,
                stderr=fe,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
        proc = Proc(name, list(argv), popen, out, err)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc, grace: float = 5.0) -> int | None:
        """SIGTERM the process (group), SIGKILL it after `grace` seconds. Returns its exit code."""
        if proc.popen.poll() is None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                try:
                    proc.popen.wait(timeout=5.0)
                except subprocess.TimeoutExpired:
                    pass
        else:
            # The leader is gone; make sure nothing it forked survives it.
            _signal_group(proc.pid, signal.SIGKILL)
        if proc in self.procs:
            self.procs.remove(proc)
        return proc.popen.returncode

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            self.stop(proc)

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


# ---------------------------------------------------------------------------
# wrk

_TIME_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_SIZE_UNITS = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}
_NUM = r"(\d+(?:\.\d+)?)"
_TIME = _NUM + r"(us|ms|s|m|h)\b"

_RE_RPS = re.compile(r"^Requests/sec:\s+" + _NUM, re.M)
_RE_TOTAL = re.compile(r"^\s*(\d+) requests in " + _TIME + r", " + _NUM + r"([KMGT]?B) read", re.M)
_RE_AVG = re.compile(r"^\s*Latency\s+" + _TIME, re.M)
_RE_PCT = re.compile(r"^\s*(\d+(?:\.\d+)?)%\s+" + _TIME, re.M)
_RE_NON2XX = re.compile(r"^\s*Non-2xx or 3xx responses:\s+(\d+)", re.M)
_RE_SOCKET = re.compile(
    r"^\s*Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
    re.M,
)


class WrkParseError(ValueError):
    pass


def to_ms(value: float | str, unit: str) -> float:
    """A wrk duration (value + unit us/ms/s/m/h) in milliseconds."""
    try:
        return float(value) * _TIME_UNITS_MS[unit]
    except KeyError:
        raise WrkParseError(f"unknown time unit {unit!r}") from None


def parse_wrk(text: str) -> dict:
    """Numbers from a wrk 4.x report (run with --latency).

    Returns requests_per_s, requests, duration_s, bytes_read, latency_avg_ms,
    latency_ms (a dict "50"/"75"/"90"/"99" -> ms), non2xx (wrk counts status >= 400),
    socket_errors (connect/read/write/timeout) and errors (their sum).
    Raises WrkParseError when the text is not a wrk report.
    """
    m = _RE_RPS.search(text)
    if m is None:
        first = text.strip().splitlines()[:1]
        raise WrkParseError("no 'Requests/sec:' line in wrk output" + (f": {first[0]}" if first else ""))
    out: dict = {"requests_per_s": float(m.group(1))}

    m = _RE_TOTAL.search(text)
    if m:
        out["requests"] = int(m.group(1))
        out["duration_s"] = round(to_ms(m.group(2), m.group(3)) / 1000.0, 6)
        out["bytes_read"] = int(round(float(m.group(4)) * _SIZE_UNITS[m.group(5)]))
    else:
        out["requests"] = None
        out["duration_s"] = None
        out["bytes_read"] = None

    m = _RE_AVG.search(text)
    out["latency_avg_ms"] = to_ms(m.group(1), m.group(2)) if m else None

    latency: dict[str, float] = {}
    for pm in _RE_PCT.finditer(text):
        pct = pm.group(1)
        if pct.endswith(".0"):
            pct = pct[:-2]
        latency[pct] = to_ms(pm.group(2), pm.group(3))
    out["latency_ms"] = latency

    m = _RE_NON2XX.search(text)
    non2xx = int(m.group(1)) if m else 0
    m = _RE_SOCKET.search(text)
    sock = (
        dict(zip(("connect", "read", "write", "timeout"), (int(g) for g in m.groups()), strict=True))
        if m
        else {
            "connect": 0,
            "read": 0,
            "write": 0,
            "timeout": 0,
        }
    )
    out["non2xx"] = non2xx
    out["socket_errors"] = sock
    out["errors"] = non2xx + sum(sock.values())
    return out


def wrk_argv(
    url: str,
    duration_s: float,
    connections: int,
    threads: int = 1,
    timeout_s: float | None = None,
    wrk: str = "wrk",
) -> list[str]:
    argv = [wrk, f"-t{threads}", f"-c{connections}", f"-d{_wrk_seconds(duration_s)}", "--latency"]
    if timeout_s is not None:
        argv.append(f"--timeout={_wrk_seconds(timeout_s)}")
    argv.append(url)
    return argv


def _wrk_seconds(seconds: float) -> str:
    # wrk's time arguments take whole numbers with units s/m/h only (no "ms"):
    # round up to whole seconds.
    return f"{max(1, math.ceil(seconds))}s"


def run_wrk(
    url: str,
    duration_s: float,
    connections: int,
    threads: int = 1,
    timeout_s: float | None = None,
    wrk: str = "wrk",
) -> dict:
    """Run wrk once and return parse_wrk()'s figures plus the command and raw output.

    Raises WrkParseError (with wrk's own message) when wrk produced no report,
    e.g. 'unable to connect'.
    """
    argv = wrk_argv(url, duration_s, connections, threads, timeout_s, wrk)
    limit = max(1, math.ceil(duration_s)) + (timeout_s or 2) + 30
    try:
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=limit, check=False)
    except subprocess.TimeoutExpired as e:
        raise WrkParseError(f"wrk did not finish within {limit:.0f}s") from e
    text = cp.stdout
    try:
        figures = parse_wrk(text)
    except WrkParseError as e:
        msg = (cp.stderr.strip() or cp.stdout.strip() or f"exit code {cp.returncode}").splitlines()[0]
        raise WrkParseError(f"wrk failed: {msg}") from e
    figures["command"] = " ".join(argv)
    figures["raw"] = text
    return figures


def wrk_version(wrk: str = "wrk") -> str | None:
    if shutil.which(wrk) is None:
        return None
    cp = subprocess.run([wrk, "--version"], capture_output=True, text=True, check=False)
    first = (cp.stdout or cp.stderr).strip().splitlines()
    return first[0].split(" Copyright")[0].strip() if first else None


# ---------------------------------------------------------------------------
# figures


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU time of a process so far (/proc/PID/stat; None without it): a
    target's own cost, which other processes on a shared machine hardly change."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def loadavg() -> str:
    """The machine's 1, 5 and 15 minute load averages, for a run's report ("?" without /proc)."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def median(values: Iterable[float | None]) -> float | None:
    """Median of the values that are not None (None if there are none)."""
    xs = sorted(v for v in values if v is not None)
    if not xs:
        return None
    n = len(xs)
    mid = n // 2
    if n % 2:
        return float(xs[mid])
    return (xs[mid - 1] + xs[mid]) / 2.0


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def paired_ratios(numerators: Sequence[float | None], denominators: Sequence[float | None]) -> list[float]:
    """numerators[i] / denominators[i] for each i where both were measured (runs made side
    by side, so a drift of the machine cancels out in each ratio)."""
    return [n / d for n, d in zip(numerators, denominators, strict=False) if n is not None and d]


def difference(a: float | None, b: float | None) -> float | None:
    """a - b, or None when either is missing."""
    if a is None or b is None:
        return None
    return a - b


_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": lambda v, g: v >= g,
    ">": lambda v, g: v > g,
    "<=": lambda v, g: v <= g,
    "<": lambda v, g: v < g,
}


def check_goal(value: float | None, op: str, goal: float) -> str:
    """'PASS' or 'FAIL' for `value op goal`; 'N/A' when the value could not be measured."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "N/A"
    try:
        test = _OPS[op]
    except KeyError:
        raise ValueError(f"unknown comparison {op!r}") from None
    return "PASS" if test(value, goal) else "FAIL"


def write_json(path: Path | str, data: dict, merge: bool = True) -> None:
    """Write `data` as JSON, atomically. With merge, top-level keys already in the file
    and not in `data` are kept (so `--only X` refreshes section X only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc: dict = {}
    if merge and path.exists():
        try:
            old = json.loads(path.read_text())
            if isinstance(old, dict):
                doc = old
        except (OSError, ValueError):
            doc = {}
    doc.update(data)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
