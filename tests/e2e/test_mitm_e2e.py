"""summon inside mitmdump, end to end: real mitmdump, the addon, the process driver.
Also the runner that executes the taddons/tflow tests (tests/integration/test_mitm.py) under
.venv-mitm, since mitmproxy is not installed in the core venv.

`mitmdump --mode reverse:http://127.0.0.1:1 -s proxy/mitm.py --set summon_config=...`
(the reverse target is a placeholder the addon never dials). The demo site (the `decks`
image's content, served by busybox httpd) starts one second after it is summoned, so
every one of the concurrent requests arrives during the boot.

mitmdump comes from .venv-mitm (scripts/setup-mitmproxy.sh; see tests/integration/test_mitm.py for
why it has its own venv); these tests skip only when that venv cannot be set up.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from proxy.images.manifest import content_digest
from proxy.observe.events import Event, open_readonly
from tests.helpers.paths import REPO
from tests.helpers.summon_proc import free_port, http_get

ROOT = REPO  # the repository
MITM_VENV = ROOT / ".venv-mitm"
DECKS = ROOT / "images" / "decks" / "site"
CONCURRENT = 50


def ensure_mitm_venv() -> Path:
    """.venv-mitm/bin/mitmdump, installed by scripts/setup-mitmproxy.sh when missing
    (idempotent, about 15 s the first time); skips the test when it cannot be set up."""
    cp = subprocess.run(["bash", str(ROOT / "scripts" / "setup-mitmproxy.sh")], cwd=ROOT, capture_output=True,
                        text=True, timeout=900, check=False)
    mitmdump = MITM_VENV / "bin" / "mitmdump"
    if cp.returncode != 0 or not mitmdump.exists():
        pytest.skip(f"cannot set up .venv-mitm (scripts/setup-mitmproxy.sh exit {cp.returncode}):\n"
                    + (cp.stderr or cp.stdout)[-2000:])
    return mitmdump


def test_hook_tests_pass_under_venv_mitm() -> None:
    """tests/integration/test_mitm.py (taddons/tflow) under .venv-mitm's python, as part of this run."""
    try:
        import mitmproxy  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("this venv has mitmproxy: pytest collects tests/integration/test_mitm.py directly")
    ensure_mitm_venv()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "VIRTUAL_ENV"))}
    cp = subprocess.run(
        [str(MITM_VENV / "bin" / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider",
         str(ROOT / "tests" / "integration" / "test_mitm.py")],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False, env=env,
    )
    assert cp.returncode == 0, cp.stdout[-6000:] + cp.stderr[-2000:]
    summary = cp.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "failed" not in summary and "skipped" not in summary, summary


def make_slow_decks(images: Path, boot_delay_s: float) -> Path:
    """The demo site as an image whose httpd starts `boot_delay_s` after it is summoned."""
    d = images / "decks"
    shutil.copytree(DECKS, d / "site")
    cmd = ["sh", "-c", f"sleep {boot_delay_s}; exec busybox httpd -f -p 127.0.0.1:{{port}} -h {{dir}}/site"]
    (d / "image.toml").write_text(
        f'name = "decks"\n[targets.unix]\ncommand = {json.dumps(cmd)}\nhealth_path = "/"\n'
        f'content = "site"\ncontent_sha256 = "{content_digest(d / "site")}"\n'
    )
    return d


def wait_for(cond: Callable[[], Any], timeout_s: float) -> Any:
    end = time.monotonic() + timeout_s
    while True:
        value = cond()
        if value or time.monotonic() > end:
            return value
        time.sleep(0.1)


class Mitmdump:
    def __init__(self, tmp: Path, config: Path) -> None:
        self.port = free_port()
        self.log = tmp / "mitmdump.log"
        (tmp / "mitm").mkdir()
        self.argv = [
            str(ensure_mitm_venv()), "--mode", "reverse:http://127.0.0.1:1",
            "--listen-host", "127.0.0.1", "--listen-port", str(self.port),
            "-s", str(ROOT / "proxy" / "mitm.py"),
            "--set", f"summon_config={config}",
            "--set", f"confdir={tmp / 'mitm'}",  # its CA in tmp, not ~/.mitmproxy
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Mitmdump:
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        end = time.monotonic() + 30
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"mitmdump exited {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                http_get(self.port, "/", host="probe.invalid", timeout=1)  # 404: no such route
                return self
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"mitmdump did not listen:\n{self.log.read_text()}")

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Mitmdump, Path, Path]]:
    images = tmp_path / "images"
    site = make_slow_decks(images, boot_delay_s=1.0)
    events = tmp_path / "events.db"
    config = tmp_path / "summon.toml"
    config.write_text(
        f'[proxy]\nlisten = "127.0.0.1:{free_port()}"\nadmin = "127.0.0.1:{free_port()}"\n'
        f'[images]\ndir = "{images}"\n[events]\npath = "{events}"\n'
        f'[[host]]\nname = "local"\nbackend = "process"\nslots = 8\n'
        f'[[route]]\nname = "decks"\nhost = "site"\npath = "/"\nimage = "decks"\n'
        f'idle_timeout = "2s"\nboot_timeout = "20s"\nqueue_size = 1000\ntarget_concurrency = 1000\n'
    )
    m = Mitmdump(tmp_path, config)
    try:
        yield m.start(), events, site
    finally:
        m.stop()


def kinds(db: Path) -> list[Event]:
    try:
        return open_readonly(db).query()
    except FileNotFoundError:
        return []


def busybox_children(site: Path) -> list[int]:
    """PIDs of the instance's processes (the command line names this test's image dir)."""
    out = subprocess.run(["pgrep", "-f", "--", f"httpd .* -h {site}/site"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


@pytest.mark.slow
def test_cold_route_through_mitmdump_concurrent_flows_then_idle_stop(setup: tuple[Mitmdump, Path, Path]) -> None:
    mitm, db, site = setup
    assert [e.kind for e in kinds(db) if e.kind == "summoned"] == []  # cold: nothing booted yet
    assert busybox_children(site) == []
    want = (DECKS / "index.html").read_bytes()

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=CONCURRENT) as pool:
        answers = list(pool.map(lambda i: http_get(mitm.port, f"/?n={i}", host="site"), range(CONCURRENT)))
    elapsed = time.monotonic() - started
    assert [a[0] for a in answers] == [200] * CONCURRENT
    assert all(a[2] == want for a in answers)
    assert elapsed >= 1.0  # held during the one-second boot, not refused (a lower bound: noise only adds time)
    summoned = wait_for(lambda: [e for e in kinds(db) if e.kind == "summoned"], 5)
    assert len(summoned) == 1, summoned  # one instance for all fifty flows
    assert len(busybox_children(site)) == 1

    # the same error answers as the native front
    status, headers, body = http_get(mitm.port, "/", host="unknown.test")
    assert status == 404 and body.startswith(b"404 Not Found: no route for unknown.test/")

    # idle for 2 s: the engine stops the instance and the child process is gone
    stopped = wait_for(lambda: [e for e in kinds(db) if e.kind == "stopped"], 15)
    assert len(stopped) == 1 and stopped[0].instance == summoned[0].instance
    assert wait_for(lambda: busybox_children(site) == [], 5)

    # summoned again, then mitmproxy shuts down: instances are stopped with it
    assert http_get(mitm.port, "/", host="site")[0] == 200
    assert len(busybox_children(site)) == 1
    assert mitm.stop() == 0
    assert wait_for(lambda: busybox_children(site) == [], 5)
    events = kinds(db)
    assert [e.kind for e in events].count("summoned") == 2
    assert [e.kind for e in events].count("stopped") == 2
    assert events[-1].kind == "shutdown"
    assert os.path.getsize(mitm.log) < 1_000_000
