"""The CPU priority of a child process: how the process driver's background starts (pre-summons) yield.

Why two knobs: Linux weighs a thread's nice value only against the threads of its own
scheduling group, and with autogroups on (`kernel.sched_autogroup_enabled`, the default
where no cgroup manager places processes) every session is a group of its own. The
process driver's children lead their own sessions (setsid), so nicing their threads alone
would change nothing against the other instances: a background start sets its session's
autogroup nice (`/proc/PID/autogroup`) as well as the nice of every thread of its process
group, and the foreground puts both back to 0. (libvirt's QEMUs each sit in a cpu cgroup
of their own, where no nice reaches: that driver sets the cgroup's CPU share instead.)

Lowering a priority is allowed to anyone, raising it back is not (CAP_SYS_NICE, or an
RLIMIT_NICE of 20): where it could not be put back nothing is lowered (`can_raise`), since
an instance left at the lowest priority for its whole life would be worse than the
contention it was meant to avoid.
"""

from __future__ import annotations

import contextlib
import os
import resource
from pathlib import Path

BACKGROUND_NICE = 19  # the lowest: a start nobody waits for takes only what is left
CAP_SYS_NICE = 23
PROC = Path("/proc")


def can_raise() -> bool:
    """May this process set a nice value back to 0 once it lowered it?"""
    try:
        for line in (PROC / "self" / "status").read_text().splitlines():
            if line.startswith("CapEff:") and int(line.split()[1], 16) >> CAP_SYS_NICE & 1:
                return True
    except (OSError, ValueError, IndexError):
        pass
    soft, _hard = resource.getrlimit(resource.RLIMIT_NICE)
    return soft == resource.RLIM_INFINITY or soft >= 20  # nice 0 needs 20 - 0 <= RLIMIT_NICE


def set_nice(pid: int, nice: int) -> bool:
    """Every thread of `pid`'s process group (of `pid` alone if it leads none) and its
    session's autogroup to `nice`. False if the process is gone; PermissionError if we
    may not (raised: a caller that checked `can_raise` does not expect it)."""
    try:
        leader = os.getpgid(pid) == pid
    except ProcessLookupError:
        return False
    try:
        if leader:  # one call: all threads of all processes of the group (kernel: PRIO_PGRP)
            os.setpriority(os.PRIO_PGRP, pid, nice)
        else:
            for _pass in range(2):  # a thread created meanwhile by one not reniced yet: the second pass
                for tid in os.listdir(PROC / str(pid) / "task"):
                    with contextlib.suppress(ProcessLookupError):
                        os.setpriority(os.PRIO_PROCESS, int(tid), nice)
    except (ProcessLookupError, FileNotFoundError):
        return False
    with contextlib.suppress(OSError):  # no autogroups (off, or not built in): the nice above is all
        (PROC / str(pid) / "autogroup").write_text(str(nice))
    return True


def nice_of(pid: int) -> int | None:
    """A process's (main thread's) nice value, from /proc; None if it is gone."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
        return int(stat.rpartition(")")[2].split()[16])  # field 19; fields after the name from 3
    except (OSError, ValueError, IndexError):
        return None


def autogroup_nice_of(pid: int) -> int | None:
    """The nice of `pid`'s autogroup ("/autogroup-N nice K"), or None without autogroups."""
    try:
        return int((PROC / str(pid) / "autogroup").read_text().split()[-1])
    except (OSError, ValueError, IndexError):
        return None
