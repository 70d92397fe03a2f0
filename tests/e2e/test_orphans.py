"""Orphans: instances whose summon process died are reaped, even when that process is a
zombie (killed, not yet waited for) and summon was started again at once.

Real processes throughout: owner locks held by other processes, process instances whose
server outlives pdeathsig (a shell's background child), a real `summon serve` killed
with SIGKILL and restarted 20 times without reaping the killed one first.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from proxy.backends.owner import proc_start
from tests.helpers.summon_proc import Summon, http_get, make_image, pids_matching

# The server is a background child of the instance's shell: pdeathsig kills the shell
# only, so the server is left over for the reaper (as any forking server would be).
FORKING = ["sh", "-c", "busybox httpd -f -p 127.0.0.1:{port} -h {dir}/site & wait"]

ROUTE = """
[[route]]
name = "site"
path = "/"
image = "site"
idle_timeout = "10m"
boot_timeout = "20s"
"""


def reaped_events(db: Path) -> list[dict[str, object]]:
    with sqlite3.connect(db) as c:
        rows = c.execute("select instance, detail from events where kind = 'reaped' order by id").fetchall()
    return [{"instance": i, **json.loads(d)} for i, d in rows]


def get_through_outside_destroys(port: int, attempts: int = 4) -> tuple[int, bytes]:
    """GET /, again after a 503: on a shared libvirtd another test's cleanup may destroy
    a VM mid-boot (seen: `virsh destroy` of every summon domain new since it started);
    the boot backoff that follows is waited out."""
    for attempt in range(attempts):
        status, _, body = http_get(port, "/", timeout=150)
        if status != 503 or attempt == attempts - 1:
            break
        print(f"503 ({body[:100]!r}): again")
        time.sleep(2.0 * (attempt + 1))
    return status, body


def restart_storm(rounds: int, up: Callable[[], Summon], started: Callable[[], set[str]],
                  mid_boot: Callable[[int], bool]) -> tuple[Summon, set[str], set[str], list[subprocess.Popen[bytes]]]:
    """SIGKILL summon and start it again at once, `rounds` times, each time with an
    instance up (or, in the rounds `mid_boot` picks, still booting). The killed processes
    are not waited for: they stay zombies until the caller waits for them. Returns the
    running summon, the instances (as `started` names them) killed while serving, all
    instances the killed summons started, and the zombies."""
    zombies: list[subprocess.Popen[bytes]] = []
    served: set[str] = set()
    left: set[str] = set()
    try:
        for i in range(rounds):
            s = up()
            assert s.proc is not None
            if zombies:  # the new summon is started; make sure it, not the dying one, answered
                settled(zombies[-1].pid, s)
            zombies.append(s.proc)
            before = started()
            if mid_boot(i):
                with socket.create_connection(("127.0.0.1", s.port), timeout=5) as sock:
                    sock.sendall(b"GET / HTTP/1.1\r\nHost: site\r\n\r\n")
                    deadline = time.monotonic() + 60
                    while not (new := started() - before) and time.monotonic() < deadline:
                        time.sleep(0.02)
                    s.proc.send_signal(signal.SIGKILL)
                    left |= new
            else:
                status, body = get_through_outside_destroys(s.port)
                assert status == 200, body[:200]
                served |= started() - before
                s.proc.send_signal(signal.SIGKILL)
                left |= served
        s = up()
        settled(zombies[-1].pid, s)
        return s, served, left, zombies
    except BaseException:
        for z in zombies:
            z.kill()
            z.wait(10)
        raise


def settled(old_pid: int, s: Summon) -> None:
    """The killed summon has closed its sockets (a zombie now, or gone), and `s` answers
    on the admin port: what answered `start` was not the old one still exiting."""
    deadline = time.monotonic() + 10
    while proc_start(old_pid)[1] not in ("Z", "") and time.monotonic() < deadline:
        time.sleep(0.01)
    while time.monotonic() < deadline:
        try:
            s.status()
            return
        except OSError:
            time.sleep(0.05)
    s.status()


def start_at_once(s: Summon) -> Summon:
    """Start `s`; the killed summon may hold the ports for a moment more (it is exiting)."""
    for _attempt in range(20):
        try:
            return s.start()
        except RuntimeError:
            if "in use" not in s.log.read_text():
                raise
            time.sleep(0.1)
    return s.start()


def test_twenty_sigkill_restarts_leave_no_process_behind(tmp_path: Path) -> None:
    """The process driver under the issue's race: summon killed while its instance serves
    (or boots) and started again before the killed one is reaped, 20 times."""
    images = tmp_path / "images"
    make_image(images, "site", FORKING)
    marker = str(images / "site")
    owners = tmp_path / "summon-owners"

    def recorded() -> set[str]:
        out = set()
        for p in owners.glob("proc-*.json"):
            try:
                out.add(str(json.loads(p.read_text())["instance"]))
            except (OSError, ValueError):
                pass  # being reaped
        return out

    summon = Summon(tmp_path, ROUTE)  # one config, restarted as is: the same ports
    s, served, _left, zombies = restart_storm(20, lambda: start_at_once(summon), recorded, lambda i: i % 4 == 3)
    try:
        assert http_get(s.port, "/")[0] == 200
        own = {i["id"] for i in s.instances()}
        deadline = time.monotonic() + 30
        while recorded() != own and time.monotonic() < deadline:
            time.sleep(0.2)
        assert recorded() == own, "only the running summon's instances are left recorded"
        # its instance's shell and server; nothing of the 20 killed summons
        assert len(pids_matching(marker)) == 2 * len(own), subprocess.run(
            ["pgrep", "-af", marker], capture_output=True, text=True).stdout
    finally:
        assert s.stop() == 0
        for z in zombies:
            z.wait(10)
    assert not pids_matching(marker)
    reaped = reaped_events(s.events)
    assert len(served) == 15
    # each server a killed summon left (its shell died by pdeathsig) was reaped, once
    assert served <= {str(r["instance"]) for r in reaped}, reaped
    assert len(reaped) == len({r["instance"] for r in reaped}), reaped
    assert {r["when"] for r in reaped} <= {"startup", "periodic"}


@pytest.mark.slow
def test_a_killed_worker_is_reaped_by_its_sibling_and_a_killed_parent_takes_its_workers(tmp_path: Path) -> None:
    """workers = 2: each worker owns what it starts; SIGKILL of that worker leaves its
    instance to the other's periodic reaping; SIGKILL of the parent ends the workers."""
    images = tmp_path / "images"
    make_image(images, "site", FORKING)
    marker = str(images / "site")
    s = Summon(tmp_path, ROUTE, extra="workers = 2\n").start()
    assert s.proc is not None
    try:
        assert http_get(s.port, "/")[0] == 200
        records = [json.loads(p.read_text()) for p in (tmp_path / "summon-owners").glob("proc-*.json")]
        assert records, "the instance is recorded beside its owner's lock"
        victim = int(records[0]["owner_pid"])
        assert victim != s.proc.pid, "a worker owns it, not the parent"
        doomed = {r["instance"] for r in records if r["owner_pid"] == victim}
        os.kill(victim, signal.SIGKILL)  # its parent (summon) does not restart it
        deadline = time.monotonic() + 20
        while not {r["instance"] for r in reaped_events(s.events)} >= doomed and time.monotonic() < deadline:
            time.sleep(0.2)
        assert {r["instance"] for r in reaped_events(s.events)} >= doomed, "the sibling worker reaps it"
        assert all(r["when"] == "periodic" for r in reaped_events(s.events))
        # the other worker serves on, once the dead one's lease in the fleet store lapses
        # (a request may wait up to boot_timeout meanwhile)
        t0 = deadline = time.monotonic()
        deadline += 30
        while http_get(s.port, "/")[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert http_get(s.port, "/")[0] == 200, "the other worker still serves (a new instance)"
        print(f"served again {time.monotonic() - t0:.1f}s after the reaping")
    finally:
        s.proc.send_signal(signal.SIGKILL)
        s.proc.wait(10)
    deadline = time.monotonic() + 30  # the workers get SIGTERM and drain (drain_timeout 5s)
    while (pids_matching(marker) or pids_matching(str(s.config))) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not pids_matching(str(s.config)), "a worker outlived its parent"
    assert not pids_matching(marker), "an instance outlived its workers"
