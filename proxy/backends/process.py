"""The `process` driver: an image's `unix` target as a child process on loopback.

Why it exists: it is MirageOS's "unix target", the embedded default that works on any
machine with no hypervisor, and the fastest way to exercise the whole summoning path.

Children should not outlive the proxy: each one is started through `setpriv --pdeathsig
KILL` (util-linux), so the kernel kills it when the proxy dies, even by SIGKILL. It
also gets its own process group so a Ctrl-C at the terminal reaches only the proxy,
which then stops its children in order. A background start (a pre-summon) runs at the
lowest CPU priority until `foreground` (`proxy.backends.priority`). pdeathsig reaches only the child itself, not
what it started (a shell's server, say), and nothing at all without setpriv; so each
child is also recorded beside the proxy's owner lock (`proxy.backends.owner`), and
`reap_orphans` kills the process group of every record whose owner is dead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
from pathlib import Path

from ..config import Address
from ..errors import BackendError, ImageError
from . import priority
from .base import Handle, InstanceSpec
from .owner import RECORD_PREFIX, claim, default_dir, owner_alive, pid_alive, proc_start, sweep, write_record

log = logging.getLogger("summon.process")


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the child binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class _Child:
    """A spawned child and a pidfd that becomes readable when it exits."""

    def __init__(self, pid: int, exited: asyncio.Future[str]) -> None:
        self.pid = pid
        self.exited = exited
        self.returncode: int | None = None
        self.pidfd: int | None = None

    def reap(self) -> bool:
        """True once the child has exited; then what is left of its process group (what
        it started and did not take down with it: a shell's server) is killed too. That
        happens before the child is waited for: an unreaped zombie keeps its pid, so the
        group id cannot have been reused by another process."""
        if self.returncode is not None:
            return True
        try:
            if os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
                return False
        except ChildProcessError:
            self.returncode = -1
            return True
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            self.returncode = -1
            return True
        if pid == 0:
            return False
        self.returncode = os.waitstatus_to_exitcode(status)
        return True


class ProcessBackend:
    name = "process"

    def __init__(self, log_dir: Path | None = None, stop_grace_s: float = 2.0, owner_dir: Path | None = None) -> None:
        self.log_dir = log_dir
        self.owner_dir = owner_dir or default_dir()
        self.stop_grace_s = stop_grace_s
        self.children: dict[str, _Child] = {}
        self.records: dict[str, Path] = {}  # instance id -> its record beside the owner lock
        self._setpriv = shutil.which("setpriv")
        self._which: dict[str, str | None] = {}
        self._background: set[str] = set()  # started at a low priority, not brought to the foreground yet
        self._may_lower = priority.can_raise()

    def _resolve(self, program: str, image_name: str) -> str:
        if "/" in program:
            if not Path(program).exists():
                raise ImageError(f"image {image_name!r}: command {program!r} not found")
            return program
        if program not in self._which:
            self._which[program] = shutil.which(program)
        found = self._which[program]
        if found is None:
            raise ImageError(f"image {image_name!r}: command {program!r} not found (is it installed?)")
        return found

    async def start(self, spec: InstanceSpec) -> Handle:
        image = spec.image
        image.verify("unix")  # ImageError on a tampered site
        owner = claim(self.owner_dir)  # before the child exists: its record names this lock
        port = free_port()
        argv = image.unix_command(port)
        argv[0] = self._resolve(argv[0], image.name)
        if self._setpriv:
            argv = [self._setpriv, "--pdeathsig", "KILL", "--", *argv]
        # posix_spawn (vfork+exec) costs a fraction of asyncio's subprocess machinery,
        # which matters on the cold path: this is time a waiting request sees.
        actions: list[tuple[int, ...] | tuple[int, int, str, int, int]] = [(os.POSIX_SPAWN_CLOSE, 0)]
        devnull = os.devnull
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = str(self.log_dir / f"{spec.instance_id}.log")
            actions += [(os.POSIX_SPAWN_OPEN, 1, out, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644),
                        (os.POSIX_SPAWN_DUP2, 1, 2)]
        else:
            actions += [(os.POSIX_SPAWN_OPEN, 1, devnull, os.O_WRONLY, 0), (os.POSIX_SPAWN_DUP2, 1, 2)]
        actions.append((os.POSIX_SPAWN_OPEN, 0, devnull, os.O_RDONLY, 0))
        try:
            pid = os.posix_spawn(argv[0], argv, os.environ, file_actions=actions, setsid=True)  # type: ignore[arg-type]
        except OSError as exc:
            raise BackendError(f"cannot start {argv[0]}: {exc.strerror or exc}") from exc
        loop = asyncio.get_running_loop()
        exited: asyncio.Future[str] = loop.create_future()
        child = _Child(pid, exited)
        self.children[spec.instance_id] = child
        if spec.background and self._may_lower:  # a few ms after exec: a negligible share of its start
            with contextlib.suppress(OSError):
                if priority.set_nice(pid, priority.BACKGROUND_NICE):
                    self._background.add(spec.instance_id)
        self._record(owner.path, spec, pid)
        try:
            child.pidfd = os.pidfd_open(pid)
            loop.add_reader(child.pidfd, self._on_exit, spec.instance_id)
        except OSError:  # no pidfd (old kernel): poll instead
            loop.create_task(self._poll_exit(spec.instance_id))
        if child.reap():
            self._on_exit(spec.instance_id)
        return Handle(spec.instance_id, Address("127.0.0.1", port), exited, {"pid": pid})

    def _record(self, owner: Path, spec: InstanceSpec, pid: int) -> None:
        record = owner.parent / f"{RECORD_PREFIX}{owner.stem}-{spec.instance_id}.json"
        try:
            write_record(record, {"owner": str(owner), "owner_pid": os.getpid(),
                                  "owner_start": proc_start(os.getpid())[0], "pid": pid,
                                  "start": proc_start(pid)[0], "instance": spec.instance_id,
                                  "route": spec.route.name})
        except OSError as exc:  # pdeathsig still covers the child itself
            log.warning("cannot record instance %s in %s: %s", spec.instance_id, record.parent, exc)
            return
        self.records[spec.instance_id] = record

    def _on_exit(self, instance_id: str) -> None:
        child = self.children.get(instance_id)
        if child is None or not child.reap():
            return
        self._close_pidfd(child)
        if not child.exited.done():
            child.exited.set_result(f"process exited with status {child.returncode}")

    async def _poll_exit(self, instance_id: str) -> None:
        while (child := self.children.get(instance_id)) is not None and not child.exited.done():
            self._on_exit(instance_id)
            await asyncio.sleep(0.1)

    def _close_pidfd(self, child: _Child) -> None:
        if child.pidfd is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(child.pidfd)
            os.close(child.pidfd)
            child.pidfd = None

    async def foreground(self, instance_id: str) -> None:
        child = self.children.get(instance_id)
        if instance_id not in self._background or child is None:
            return
        self._background.discard(instance_id)
        try:
            priority.set_nice(child.pid, 0)
        except OSError as exc:
            log.warning("cannot raise the priority of %s: %s", instance_id, exc)

    async def stop(self, handle: Handle) -> None:
        self._background.discard(handle.instance_id)
        child = self.children.pop(handle.instance_id, None)
        if child is None:
            return
        if not child.reap():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGTERM)
                os.killpg(child.pid, signal.SIGCONT)  # a paused standby acts on its SIGTERM only once running
            end = asyncio.get_running_loop().time() + self.stop_grace_s
            while not child.reap() and asyncio.get_running_loop().time() < end:
                await asyncio.sleep(0.01)
            if not child.reap():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGKILL)
                while not child.reap():
                    await asyncio.sleep(0.01)
        self._close_pidfd(child)
        record = self.records.pop(handle.instance_id, None)
        if record is not None:
            record.unlink(missing_ok=True)
        if not child.exited.done():
            child.exited.set_result("stopped")

    # --- paused standbys (`start = "resume"`): SIGSTOP / SIGCONT of the process group ------

    async def pause(self, handle: Handle) -> None:
        self._signal(handle, signal.SIGSTOP)

    async def resume(self, handle: Handle) -> None:
        self._signal(handle, signal.SIGCONT)

    def _signal(self, handle: Handle, sig: signal.Signals) -> None:
        child = self.children.get(handle.instance_id)
        if child is None or child.reap():
            raise BackendError(f"{handle.instance_id} is not running")
        try:
            os.killpg(child.pid, sig)
        except OSError as exc:
            raise BackendError(f"cannot {sig.name} {handle.instance_id}: {exc.strerror or exc}") from exc

    def rss_mib(self, handle: Handle) -> float | None:
        child = self.children.get(handle.instance_id)
        return None if child is None else vm_rss_mib(child.pid)

    async def reap_orphans(self) -> list[str]:
        """Kill the process groups of recorded instances whose owner is dead; return their
        ids. Runs at start-up and then periodically (`Summoner.reap_orphans`)."""
        claim(self.owner_dir)  # our own records must look owned
        return await asyncio.to_thread(reap_records, self.owner_dir)

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        for iid in list(self.children):
            await self.stop(Handle(iid, Address("127.0.0.1", 0), loop.create_future()))


def reap_records(directory: Path) -> list[str]:
    """Reap every record in `directory` whose owner is dead: SIGKILL its process group,
    remove the record. An instance is reported only by the reaper that removed its
    record (several may run at once) and only if something of it was still running."""
    reaped: list[str] = []
    for path in sorted(directory.glob(f"{RECORD_PREFIX}*.json")):
        try:
            rec = json.loads(path.read_text())
            owner, pid, start = str(rec["owner"]), int(rec["pid"]), str(rec.get("start", ""))
            owner_pid, owner_start = int(rec.get("owner_pid", 0)), str(rec.get("owner_start", ""))
        except FileNotFoundError:
            continue  # stopped, or reaped by another summon, meanwhile
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("ignoring unreadable instance record %s", path)
            continue
        alive = owner_alive(owner)
        if alive is None:  # the lock file is gone: the pid is all there is
            alive = pid_alive(owner_pid, owner_start)
        if alive:
            continue
        killed = _kill_group(pid, start)
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        if killed:
            reaped.append(str(rec.get("instance", path.stem)))
    sweep(directory, set())
    return reaped


def _kill_group(pid: int, start: str) -> bool:
    """SIGKILL the process group an instance leads (it was started with setsid). Not if
    its pid now belongs to another process (a pgid in use is never reused as a pid, so a
    group whose leader is gone is still the instance's)."""
    now_start, _state = proc_start(pid)
    if now_start and start and now_start != start:
        return False
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def vm_rss_mib(pid: int) -> float | None:
    """VmRSS of a process from /proc, in MiB (None if it is gone or unreadable)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        return None
    return None
