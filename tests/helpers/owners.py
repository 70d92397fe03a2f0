"""Processes that hold an owner lock (`proxy.backends.owner`), for tests of orphan reaping."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from proxy.backends.owner import proc_start
from tests.helpers.paths import REPO


def holder(directory: Path) -> tuple[subprocess.Popen[str], str]:
    """Another process holding an owner lock in `directory`; returns it and the lock path."""
    code = ("import sys, time; from pathlib import Path; from proxy.backends.owner import claim; "
            "print(claim(Path(sys.argv[1])).path, flush=True); time.sleep(300)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(directory)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


def wait_state(pid: int, state: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while proc_start(pid)[1] != state and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc_start(pid)[1] == state
