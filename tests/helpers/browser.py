"""Helpers for the browser tests: headless Chromium, and the processes they drive.

Two ways to drive Chromium, both without extra Python packages:

- one-shot command lines (`dump_dom`, `screenshot`): `chromium --headless --dump-dom URL` prints
  the DOM after the load event; `virtual_time_ms` lets timers and polls run first (virtual time
  runs faster than the wall clock, so rates measured by the page are meaningless there);
- `Browser`, a live page driven by the Chrome DevTools Protocol over `--remote-debugging-pipe`
  (NUL-terminated JSON on fds 3 and 4, no websocket): navigate, evaluate, wait for a condition
  in real time, capture screenshots. The dashboard test uses it to watch one page while
  instances come and go.

Plus small process helpers (free ports, `summon serve`, busybox httpd) shared by
tests/e2e/test_browser.py and tests/e2e/test_dashboard.py. Every process started here runs in its own
session and is stopped by PID (SIGTERM, then SIGKILL to its process group).
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.paths import REPO
from tests.helpers.summon_proc import free_port

CHROMIUM = os.environ.get("SUMMON_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
HAVE_CHROMIUM = os.access(CHROMIUM, os.X_OK)
# Chromium's headless shell (Debian's chromium-headless-shell): the same engine without the
# browser's UI layers. The page bench drives it because a full Chromium spends 2-3 CPU-s of
# its own during a cold page load, which a 2-core bench machine takes from the VMs it times.
HEADLESS_SHELL = shutil.which("chromium-headless-shell")
# Skip (with the reason) only where Chromium is not installed; CI installs it (scripts/setup.sh).
needs_chromium = pytest.mark.skipif(not HAVE_CHROMIUM, reason=f"headless Chromium not installed ({CHROMIUM})")

SUMMON = REPO / ".venv" / "bin" / "summon"
IMAGES = REPO / "images"
SITE = IMAGES / "decks" / "site"
ARTIFACTS = Path(os.environ.get("SUMMON_TEST_ARTIFACTS", REPO / "tests" / "artifacts"))

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--hide-scrollbars",
    "--mute-audio",
    # everything is on loopback; never let a proxy setting of the machine get in between
    "--no-proxy-server",
]


# --- one-shot command lines -------------------------------------------------------------------

def _run_chromium(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="summon-chromium-") as profile:
        proc = subprocess.Popen(
            [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        )
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            out, err = proc.communicate()
            raise AssertionError(f"chromium timed out after {timeout}s: {args}\n{err[-2000:]}") from None
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def dump_dom(url: str, *, virtual_time_ms: int | None = None, timeout: float = 30.0) -> str:
    """The serialized DOM of `url` after the load event (and `virtual_time_ms` of timers)."""
    args = ["--dump-dom", url]
    if virtual_time_ms is not None:
        args.insert(0, f"--virtual-time-budget={virtual_time_ms}")
    res = _run_chromium(args, timeout)
    assert res.returncode == 0 and "<html" in res.stdout, f"chromium failed ({res.returncode}):\n{res.stderr[-2000:]}"
    return res.stdout


def screenshot(url: str, path: Path, *, size: tuple[int, int] = (1200, 900), virtual_time_ms: int | None = None,
               timeout: float = 30.0) -> Path:
    """A PNG of `url` rendered at `size`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    args = [f"--screenshot={path}", f"--window-size={size[0]},{size[1]}", url]
    if virtual_time_ms is not None:
        args.insert(0, f"--virtual-time-budget={virtual_time_ms}")
    res = _run_chromium(args, timeout)
    assert res.returncode == 0 and path.exists(), f"chromium screenshot failed:\n{res.stderr[-2000:]}"
    return path


# --- a live page over the DevTools protocol ---------------------------------------------------

_EXEC_SHIM = (
    "import os, sys\n"
    "r, w = int(sys.argv[1]), int(sys.argv[2])\n"
    "os.dup2(r, 3); os.dup2(w, 4); os.close(r); os.close(w)\n"
    "os.execv(sys.argv[3], sys.argv[3:])\n"
)

class BrowserError(AssertionError):
    pass


START_TIMEOUT_S = 60.0  # until a launched Chromium first answers (see `Browser`)


class Browser:
    """One headless Chromium with one page, driven over `--remote-debugging-pipe`.

        with Browser() as b:
            b.navigate("http://127.0.0.1:8081/")
            b.wait_for("document.querySelector('.instance') !== null")
            b.screenshot(Path("x.png"))
    """

    def __init__(self, size: tuple[int, int] = (1200, 900), timeout: float = 15.0, binary: str | None = None) -> None:
        self.timeout = timeout
        self.size = size
        self.events: list[dict[str, Any]] = []
        self._profile = tempfile.TemporaryDirectory(prefix="summon-chromium-")
        self._next_id = 0
        self._buf = b""
        # Chromium reads commands on fd 3 and writes replies on fd 4. Move the child's pipe ends
        # to fds >= 10 (so nothing clobbers them), then a tiny exec shim puts them on 3 and 4
        # (no preexec_fn: it is unsafe with threads).
        cmd_r, cmd_w = os.pipe()
        res_r, res_w = os.pipe()
        child_r = fcntl.fcntl(cmd_r, fcntl.F_DUPFD, 10)
        child_w = fcntl.fcntl(res_w, fcntl.F_DUPFD, 10)
        for fd in (cmd_r, res_w):
            os.close(fd)
        self._w = cmd_w
        self._r = res_r
        argv = [binary or CHROMIUM, *FLAGS, f"--user-data-dir={self._profile.name}", "--remote-debugging-pipe",
                f"--window-size={size[0]},{size[1]}", "about:blank"]
        self.log = Path(self._profile.name) / "chromium.log"
        try:
            with open(self.log, "wb") as log:
                self.proc = subprocess.Popen(
                    [sys.executable, "-c", _EXEC_SHIM, str(child_r), str(child_w), *argv],
                    pass_fds=(child_r, child_w), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                    start_new_session=True,
                )
        except BaseException:
            self.close()
            raise
        finally:
            os.close(child_r)
            os.close(child_w)
        try:
            # Chromium's start (its first answer): a cold start on a busy 2-core machine can
            # take well past a page operation's timeout (CI saw one past 15 s), never a minute
            target = self.call("Target.createTarget", {"url": "about:blank"},
                               timeout=max(self.timeout, START_TIMEOUT_S))["targetId"]
            self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            self.call("Page.enable", session=True)
            self.call("Runtime.enable", session=True)
            self.call("Emulation.setDeviceMetricsOverride",
                      {"width": size[0], "height": size[1], "deviceScaleFactor": 1, "mobile": False}, session=True)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # protocol plumbing
    def call(self, method: str, params: dict[str, Any] | None = None, *, session: bool = False,
             timeout: float | None = None) -> dict[str, Any]:
        self._next_id += 1
        msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = self.session
        data = json.dumps(msg).encode() + b"\0"
        while data:
            data = data[os.write(self._w, data):]
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            reply = self._read(deadline, method)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def _read(self, deadline: float, what: str) -> dict[str, Any]:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError(f"chromium did not answer {what} in time")
            ready, _, _ = select.select([self._r], [], [], left)
            if ready:
                chunk = os.read(self._r, 1 << 20)
                if not chunk:
                    raise BrowserError(f"chromium closed the pipe (exit {self.proc.poll()}) during {what}:\n"
                                       + self.log.read_text(errors="replace")[-2000:])
                self._buf += chunk
        raw, _, self._buf = self._buf.partition(b"\0")
        return json.loads(raw)

    # page operations
    def navigate(self, url: str) -> None:
        result = self.call("Page.navigate", {"url": url}, session=True)
        if result.get("errorText"):
            raise BrowserError(f"navigating to {url}: {result['errorText']}")
        self.wait_for("document.readyState === 'complete'")

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True}, session=True)
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression}: {result['exceptionDetails'].get('exception', result['exceptionDetails'])}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 10.0, interval: float = 0.1) -> Any:
        """Evaluate `expression` until it is truthy; return its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"timed out after {timeout}s waiting for: {expression}")
            time.sleep(interval)

    def wait_event(self, method: str, timeout: float = 10.0, session: bool = True) -> dict[str, Any]:
        """Block until Chromium sends the event `method` (of this page's session unless
        `session` is False), and return it. Unlike `wait_for` nothing is asked meanwhile: a
        benchmark's wait costs Chromium no work (a poll every 50 ms is a CDP round trip and
        a script run in the page each time). Events that came in before are looked at first."""
        def mine(msg: dict[str, Any]) -> bool:
            return msg.get("method") == method and (not session or msg.get("sessionId") == self.session)

        for i, msg in enumerate(self.events):
            if mine(msg):
                return self.events.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            msg = self._read(deadline, method)
            if mine(msg):
                return msg
            if "method" in msg:
                self.events.append(msg)

    def dom(self) -> str:
        return str(self.evaluate("document.documentElement.outerHTML"))

    def screenshot(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = self.call("Page.captureScreenshot", {"format": "png"}, session=True)["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        if getattr(self, "proc", None) is not None and self.proc.poll() is None:
            try:
                self.call("Browser.close", timeout=3.0)
            except (BrowserError, OSError):
                pass
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                _kill_group(self.proc)
        for fd in ("_w", "_r"):
            if hasattr(self, fd):
                try:
                    os.close(getattr(self, fd))
                except OSError:
                    pass
                delattr(self, fd)
        self._profile.cleanup()


# --- processes --------------------------------------------------------------------------------

def wait_port(port: int, proc: subprocess.Popen[Any] | None = None, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{proc.args!r} exited with {proc.returncode} before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise AssertionError(f"nothing listening on 127.0.0.1:{port} after {timeout}s") from None
            time.sleep(0.05)


def start(argv: list[str | os.PathLike[str]], log: Path, **kw: Any) -> subprocess.Popen[bytes]:
    """Start a process in its own session with stdout+stderr going to `log`."""
    with open(log, "wb") as out:
        return subprocess.Popen([str(a) for a in argv], stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, **kw)


def stop(proc: subprocess.Popen[Any], timeout: float = 15.0) -> None:
    """SIGTERM by PID (summon drains and stops its instances), then SIGKILL its process group."""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    _kill_group(proc)


def _kill_group(proc: subprocess.Popen[Any]) -> None:
    # The group id is the PID we started (start_new_session); it also holds the children
    # (busybox instances, chromium helpers) if the parent could not stop them.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Connection": "close"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.status, resp.read()


def admin_json(admin_port: int, path: str = "/status") -> Any:
    return json.loads(http_get(f"http://127.0.0.1:{admin_port}{path}")[1])


def metric_sum(admin_port: int, name: str, **labels: str) -> float:
    """The sum of all samples of `name` whose labels include `labels` in /metrics."""
    text = http_get(f"http://127.0.0.1:{admin_port}/metrics")[1].decode()
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


def write_config(tmp: Path, routes: str, *, listen: int, admin: int) -> Path:
    """A summon config in `tmp`: loopback ports, events in `tmp`, the repo's images, one local
    process-backend host. `routes` is appended verbatim ([[route]] tables)."""
    cfg = tmp / "summon.toml"
    cfg.write_text(f"""
[proxy]
listen = "127.0.0.1:{listen}"
admin = "127.0.0.1:{admin}"
workers = 1

[limits]
max_instances = 4

[images]
dir = "{IMAGES}"

[events]
path = "{tmp / 'events.db'}"

[[region]]
name = "local"
cidrs = ["127.0.0.0/8", "::1/128"]

[[host]]
name = "local"
region = "local"
backend = "process"
slots = 4
{routes}
""")
    return cfg


class Summon:
    """`summon serve -c CFG` as a subprocess; use as a context manager."""

    def __init__(self, tmp: Path, routes: str) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.admin = free_port()
        self.config = write_config(tmp, routes, listen=self.port, admin=self.admin)
        self.log = tmp / "summon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin}"

    def __enter__(self) -> Summon:
        check = subprocess.run([str(SUMMON), "check", "-c", str(self.config)], capture_output=True, text=True,
                               timeout=30)
        assert check.returncode == 0, f"summon check failed:\n{check.stdout}{check.stderr}"
        self.proc = start([SUMMON, "serve", "-c", self.config], self.log, cwd=self.tmp)
        try:
            wait_port(self.port, self.proc)
            wait_port(self.admin, self.proc)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop(self.proc)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""
