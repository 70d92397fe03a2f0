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
from typing import IO

from ..config import Address
from .base import BackendError, Handle, ImageError, InstanceSpec


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the child binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ProcessBackend:
    name = "process"

    def __init__(self, log_dir: Path | None = None, stop_grace_s: float = 2.0) -> None:
        self.log_dir = log_dir
        self.stop_grace_s = stop_grace_s
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        self._setpriv = shutil.which("setpriv")

    async def start(self, spec: InstanceSpec) -> Handle:
        image = spec.image
        image.verify("unix")  # ImageError on a tampered site
        port = free_port()
        argv = image.unix_command(port)
        if shutil.which(argv[0]) is None and not Path(argv[0]).exists():
            raise ImageError(f"image {image.name!r}: command {argv[0]!r} not found (is it installed?)")
        if self._setpriv:
            argv = [self._setpriv, "--pdeathsig", "KILL", "--", *argv]
        out: int | IO[bytes] = asyncio.subprocess.DEVNULL
        log_file: IO[bytes] | None = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            log_file = open(self.log_dir / f"{spec.instance_id}.log", "ab")  # noqa: SIM115
            out = log_file
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, cwd=str(image.dir), stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
                start_new_session=True,
            )
        except OSError as exc:
            raise BackendError(f"cannot start {argv[0]}: {exc.strerror or exc}") from exc
        finally:
            if log_file is not None:
                log_file.close()
        self.procs[spec.instance_id] = proc
        loop = asyncio.get_running_loop()
        exited: asyncio.Future[str] = loop.create_future()

        async def watch() -> None:
            rc = await proc.wait()
            if not exited.done():
                exited.set_result(f"process exited with status {rc}")

        task = loop.create_task(watch())
        return Handle(spec.instance_id, Address("127.0.0.1", port), exited, {"pid": proc.pid, "watch": task})

    async def stop(self, handle: Handle) -> None:
        proc = self.procs.pop(handle.instance_id, None)
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), self.stop_grace_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()

    async def reap_orphans(self) -> list[str]:
        return []  # pdeathsig: the kernel already killed them with their parent

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        for iid in list(self.procs):
            await self.stop(Handle(iid, Address("127.0.0.1", 0), loop.create_future()))
