"""The process driver with real processes: an instance's whole process group goes with it."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

from proxy.backends.base import InstanceSpec
from proxy.backends.process import ProcessBackend
from proxy.config import Host, Route
from proxy.images.manifest import load_image
from tests.helpers.summon_proc import make_image

# busybox httpd in the background of a shell survives the SIGTERM its group gets on stop
FORKING = ["sh", "-c", "busybox httpd -f -p 127.0.0.1:{port} -h {dir}/site & wait"]


def running(marker: str) -> list[str]:
    return subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()


def gone(marker: str, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while running(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not running(marker)


def test_stop_and_death_take_the_whole_process_group(tmp_path: Path) -> None:
    d = make_image(tmp_path / "images", "site", FORKING)
    marker = str(d / "site")
    route, host = Route(name="r", path="/", image="site"), Host("h", "local", "process")

    async def main() -> None:
        b = ProcessBackend(owner_dir=tmp_path / "owners")
        image = load_image(tmp_path / "images", "site")
        try:
            for i, delay in enumerate((0.0, 0.5)):  # stopped at once, or once it serves
                h = await b.start(InstanceSpec(f"s{i}", route, host, image))
                await asyncio.sleep(delay)
                await b.stop(h)
                assert await asyncio.to_thread(gone, marker), f"stop left {running(marker)}"
            h = await b.start(InstanceSpec("died", route, host, image))
            await asyncio.sleep(0.5)
            os.kill(int(str(h.detail["pid"])), signal.SIGKILL)  # the shell dies on its own
            assert "exited" in await asyncio.wait_for(h.exited, 10)
            assert await asyncio.to_thread(gone, marker), f"its server outlived it: {running(marker)}"
        finally:
            await b.close()
            for pid in running(marker):
                os.kill(int(pid), signal.SIGKILL)

    asyncio.run(main())


def test_a_paused_instance_stops_its_whole_group_and_a_stop_still_ends_it(tmp_path: Path) -> None:
    """`start = "resume"` standbys on the process driver: SIGSTOP of the group (the shell
    and its server both), SIGCONT back; a paused one is still stopped within the grace."""
    d = make_image(tmp_path / "images", "site", FORKING)
    marker = str(d / "site")
    route, host = Route(name="r", path="/", image="site"), Host("h", "local", "process")

    def states() -> set[str]:
        return {Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] for pid in running(marker)}

    async def main() -> None:
        b = ProcessBackend(owner_dir=tmp_path / "owners", stop_grace_s=30.0)
        image = load_image(tmp_path / "images", "site")
        try:
            h = await b.start(InstanceSpec("p", route, host, image))
            await asyncio.sleep(0.3)
            await b.pause(h)
            assert states() == {"T"}, states()
            assert b.rss_mib(h) is not None
            await b.resume(h)
            assert "T" not in states()
            await b.pause(h)
            child = b.children["p"]
            await b.stop(h)
            assert child.returncode == -signal.SIGTERM, "a paused instance acts on its SIGTERM (no SIGKILL needed)"
            assert await asyncio.to_thread(gone, marker), f"stop left {running(marker)}"
        finally:
            await b.close()
            for pid in running(marker):
                os.kill(int(pid), signal.SIGKILL)

    asyncio.run(main())
