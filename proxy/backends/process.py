"""The `process` driver: an image's `unix` target as a child process on loopback.

Why it exists: it is MirageOS's "unix target", the embedded default that works on any
machine with no hypervisor, and the fastest way to exercise the whole summoning path.

Children never outlive the proxy: each one is started through `setpriv --pdeathsig
KILL` (util-linux), so the kernel kills it when the proxy dies, even by SIGKILL. It
also gets its own process group so a Ctrl-C at the terminal reaches only the proxy,
which then stops its children in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
from pathlib import Path

from ..config import Address
from ..errors import BackendError, ImageError
from .base import Handle, InstanceSpec


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
        if self.returncode is not None:
            return True
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

    def __init__(self, log_dir: Path | None = None, stop_grace_s: float = 2.0) -> None:
        self.log_dir = log_dir
        self.stop_grace_s = stop_grace_s
        self.children: dict[str, _Child] = {}
        self._setpriv = shutil.which("setpriv")
        self._which: dict[str, str | None] = {}

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
        try:
            child.pidfd = os.pidfd_open(pid)
            loop.add_reader(child.pidfd, self._on_exit, spec.instance_id)
        except OSError:  # no pidfd (old kernel): poll instead
            loop.create_task(self._poll_exit(spec.instance_id))
        if child.reap():
            self._on_exit(spec.instance_id)
        return Handle(spec.instance_id, Address("127.0.0.1", port), exited, {"pid": pid})

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

    async def stop(self, handle: Handle) -> None:
        child = self.children.pop(handle.instance_id, None)
        if child is None:
            return
        if not child.reap():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGTERM)
            end = asyncio.get_running_loop().time() + self.stop_grace_s
            while not child.reap() and asyncio.get_running_loop().time() < end:
                await asyncio.sleep(0.01)
            if not child.reap():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGKILL)
                while not child.reap():
                    await asyncio.sleep(0.01)
        self._close_pidfd(child)
        if not child.exited.done():
            child.exited.set_result("stopped")

    async def reap_orphans(self) -> list[str]:
        return []  # pdeathsig: the kernel already killed them with their parent

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        for iid in list(self.children):
            await self.stop(Handle(iid, Address("127.0.0.1", 0), loop.create_future()))
