"""Owner locks and process records with real processes: a zombie owner is dead, a live
one alive; what a dead owner's process instance left is killed with its whole group."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from proxy.backends.owner import claim, owner_alive, pid_alive, proc_start, sweep
from proxy.backends.process import reap_records
from tests.helpers.owners import holder, wait_state


def test_a_zombie_owner_is_dead_and_a_live_one_alive(tmp_path: Path) -> None:
    live, live_lock = holder(tmp_path)
    dead, dead_lock = holder(tmp_path)
    try:
        dead.kill()  # no wait(): a zombie, with its pid and start time still in /proc
        wait_state(dead.pid, "Z")
        assert pid_alive(dead.pid, "") is False, "the pid check knows a zombie too"
        assert owner_alive(live_lock) is True and owner_alive(dead_lock) is False
        assert owner_alive(live_lock) is True, "checking must not take the lock from its owner"
        assert owner_alive(tmp_path / "nothing.lock") is None
        mine = claim(tmp_path)
        assert owner_alive(mine.path) is True, "our own lock is held (flock is per open file description)"
        assert sweep(tmp_path, set()) == [Path(dead_lock)]
        assert Path(live_lock).exists() and mine.path.exists()
    finally:
        for proc in (live, dead):
            proc.kill()
            proc.communicate()


def test_process_records_of_a_dead_owner_are_reaped_with_their_whole_group(tmp_path: Path) -> None:
    """What pdeathsig leaves (the shell's server child) is killed by the reaper; the records
    of a live owner are left alone."""
    owners = tmp_path / "owners"
    live, live_lock = holder(owners)
    dead, dead_lock = holder(owners)
    servers = []
    try:
        for name, lock, owner in (("orphan", dead_lock, dead), ("kept", live_lock, live)):
            server = subprocess.Popen(["sh", "-c", "sleep 300 & wait"], start_new_session=True)
            servers.append(server)
            (owners / f"proc-x-{name}.json").write_text(json.dumps(
                {"owner": lock, "owner_pid": owner.pid, "owner_start": proc_start(owner.pid)[0], "pid": server.pid,
                 "start": proc_start(server.pid)[0], "instance": name, "route": "r"}))
        dead.kill()
        wait_state(dead.pid, "Z")
        assert reap_records(owners) == ["orphan"]
        servers[0].wait(10)  # the leader and its `sleep` child: one process group
        deadline = time.monotonic() + 10
        while subprocess.run(["pgrep", "-g", str(servers[0].pid)], capture_output=True).returncode == 0:
            assert time.monotonic() < deadline, "the group's other member outlived the reaping"
            time.sleep(0.05)
        assert servers[1].poll() is None and (owners / "proc-x-kept.json").exists()
        assert not (owners / "proc-x-orphan.json").exists()
        assert reap_records(owners) == []  # reported once
        assert not Path(dead_lock).exists(), "the dead owner's lock file is swept once nothing names it"
    finally:
        for proc in (live, dead, *servers):
            proc.kill()
            proc.communicate()
        for server in servers:
            subprocess.run(["pkill", "-KILL", "-g", str(server.pid)], capture_output=True)
