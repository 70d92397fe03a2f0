"""Who owns an instance, in a way a dead owner cannot fake: a lock the live process holds.

Why a lock and not a PID: a summon process killed with SIGKILL stays a zombie until its
parent reaps it, and its PID (with the same start time) stays in /proc all that while,
so "is the PID alive?" says yes for a process that will never stop its VMs again. The
kernel releases a process's `flock` locks when its last file descriptor on the lock
closes, and it closes them in `exit_files()`, before the process becomes a zombie.

How it works:
- Each summon process that starts instances (each worker, with ``workers = N``) holds an
  exclusive `flock` on its own lock file, ``<state dir>/summon-owners/<token>.lock``, for its
  whole life (`claim`). The file is made under a temporary name and renamed into place
  only once locked, so no one can ever find it unlocked while its owner lives.
- Every instance records that path: libvirt in the domain's `<metadata>`, the process
  driver in ``proc-<token>-<instance>.json`` beside the lock.
- `owner_alive(path)` tries ``LOCK_EX | LOCK_NB`` on a new open file description: it
  fails only while another description holds the lock, i.e. while the owner lives (flock
  locks belong to open file descriptions, so a check from the owner's own process also
  sees "alive", and closing the checking descriptor never drops the owner's lock, as it
  would with POSIX `fcntl` record locks). The descriptor is close-on-exec, so children
  (instances included) never inherit it and never keep a dead owner "alive".
- A lock file that is gone (its directory was removed, say) proves nothing: callers fall
  back to the PID check (`pid_alive`), which at least knows a zombie is dead.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..errors import BackendError

OWNERS_DIR = "summon-owners"
RECORD_PREFIX = "proc-"  # process instance records: proc-<owner token>-<instance id>.json


def default_dir() -> Path:
    """Where drivers made outside `summon serve` (tests, scripts) keep their lock."""
    return Path(tempfile.gettempdir()) / f"{OWNERS_DIR}-{os.getuid()}"


def owners_dir(events_path: Path) -> Path:
    """The lock directory of a config: next to its event log, the rest of its state."""
    return events_path.parent / OWNERS_DIR


@dataclass
class Owner:
    """This process's lock: held from `claim` until the process ends. Its file stays
    behind a clean exit too, unlocked, until the next reaping sweeps it."""

    directory: Path
    token: str
    fd: int
    pid: int

    @property
    def path(self) -> Path:
        return self.directory / f"{self.token}.lock"


_claims: dict[Path, Owner] = {}


def claim(directory: Path) -> Owner:
    """This process's lock in `directory`, taken once per process.

    After a fork the child gets its own lock: the inherited descriptor shares the
    parent's open file description, so it would say "alive" as long as the parent lives.
    Raises BackendError if the directory cannot be made or written.
    """
    directory = directory.absolute()
    held = _claims.get(directory)
    if held is not None and held.pid == os.getpid():
        return held
    if held is not None:  # inherited through fork: not ours to hold
        with contextlib.suppress(OSError):
            os.close(held.fd)
    token = uuid.uuid4().hex[:16]
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = directory / f".{token}.tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.rename(tmp, directory / f"{token}.lock")
    except OSError as exc:
        raise BackendError(f"cannot take the owner lock in {directory}: {exc.strerror or exc}") from exc
    owner = _claims[directory] = Owner(directory, token, fd, os.getpid())
    return owner


def owner_alive(path: str | Path) -> bool | None:
    """True while the process holding lock file `path` lives, False once it is dead,
    None if there is no such lock file (nothing can be concluded from it)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError:
        return True  # cannot look: never reap on a guess
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True  # EWOULDBLOCK: held by the live owner (anything else: cannot tell, so alive)
    finally:
        os.close(fd)  # also releases the lock if we just took it
    return False


def proc_start(pid: int) -> tuple[str, str]:
    """(start time in clock ticks since boot, state letter) of a process, or ("", "")."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "", ""
    fields = stat.rsplit(")", 1)[1].split()
    return fields[19], fields[0]


def pid_alive(pid: int, start: str) -> bool:
    """The fallback when no lock can tell: the process exists, started when recorded,
    and is not a zombie (state Z) or dead (X)."""
    if pid <= 0:
        return False
    now_start, state = proc_start(pid)
    return now_start != "" and (not start or now_start == start) and state not in ("Z", "X")


def sweep(directory: Path, keep: set[str]) -> list[Path]:
    """Remove the lock files of dead owners that nothing names any more: not `keep`
    (paths the caller's instances name) nor a process record in `directory`.

    Another driver's instance may still name a removed lock; it then falls back to the
    pid check, which knows a dead (or zombie) owner too."""
    removed: list[Path] = []
    try:
        locks = list(directory.glob("*.lock"))
        for record in directory.glob(f"{RECORD_PREFIX}*.json"):
            with contextlib.suppress(OSError, ValueError, AttributeError):
                keep = keep | {str(json.loads(record.read_text()).get("owner", ""))}
    except OSError:
        return removed
    for path in locks:
        if str(path) not in keep and owner_alive(path) is False:
            with contextlib.suppress(OSError):
                path.unlink()
                removed.append(path)
    return removed


def write_record(path: Path, record: dict[str, object]) -> None:
    """Write a small JSON record atomically (a reaper never reads half of one)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)
