"""Pre-summons yield the CPU where `[prefetch] low_priority = true` says so (by default they
start like any boot), on real processes through the summoner shell: a follower the
page's request pre-summoned runs at nice 19 (every thread, and its session's autogroup),
and is put back to 0 as soon as a request for it queues; the page's own start never is
lowered. (The libvirt driver's QEMUs: tests/e2e/test_vm_boot.py.)"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
import uvloop

from proxy.backends import priority
from proxy.engine.fleet import Foreground
from tests.helpers.runtime import serving, wait_for
from tests.helpers.summon_proc import BUSYBOX, make_image
from tests.integration.test_summoner import get

pytestmark = [pytest.mark.skipif(shutil.which("busybox") is None, reason="busybox not installed"),
              pytest.mark.skipif(not priority.can_raise(), reason="cannot raise a priority back (no CAP_SYS_NICE)")]

CONFIG = """
[proxy]
listen = "127.0.0.1:0"
admin = ""
[images]
dir = "images"
[events]
path = "events.db"
[[host]]
name = "h"
backend = "process"
[[route]]
name = "page"
url = "/"
image = "page"
presummon = true
prefetch = ["/index.html"]
[[route]]
name = "late"
url = "/index.html"
image = "late"
boot_timeout = "30s"
"""
LOW = "[prefetch]\nlow_priority = true\n"

# serves only once the test lets it (a file in its image directory): booting until then
GATED = ["sh", "-c", "while [ ! -e {dir}/go ]; do sleep 0.02; done; exec " + " ".join(BUSYBOX)]


def test_a_pre_summon_runs_at_low_priority_until_a_request_waits_for_it(tmp_path: Path) -> None:
    make_image(tmp_path / "images", "page", BUSYBOX, body="page\n")
    late_dir = make_image(tmp_path / "images", "late", GATED, body="late\n")
    cfg = tmp_path / "summon.toml"
    cfg.write_text(CONFIG + LOW)

    async def scenario() -> None:
        async with serving(cfg, Foreground, 1.0) as run:
            s, port, foregrounds = run.summoner, run.port, run.seen
            assert await get(port, "/") == (200, b"page\n")
            page = next(i for i in s.fleet.instances.values() if i.route == "page")
            late = await wait_for(lambda: next((i for i in s.fleet.instances.values()
                                                if i.route == "late" and i.id in s.handles), None), "the pre-summon")
            assert late.presummoned_by == "page"
            pid = int(s.handles[late.id].detail["pid"])  # type: ignore[call-overload]
            page_pid = int(s.handles[page.id].detail["pid"])  # type: ignore[call-overload]
            assert priority.nice_of(pid) == 19 and priority.autogroup_nice_of(pid) in (None, 19)
            assert priority.nice_of(page_pid) == 0 and priority.autogroup_nice_of(page_pid) in (None, 0)
            assert not foregrounds

            request = asyncio.create_task(get(port, "/index.html"))  # queues behind the booting pre-summon
            await wait_for(lambda: priority.nice_of(pid) == 0, "the pre-summon's priority raised")
            assert priority.autogroup_nice_of(pid) in (None, 0)
            assert [f.instance_id for f in foregrounds] == [late.id] and foregrounds[0].reason == "request"
            assert not request.done()  # still booting: raised because it is waited for, not because ready
            (late_dir / "go").touch()
            assert await asyncio.wait_for(request, 30) == (200, b"late\n")
            assert len(foregrounds) == 1  # once: ready adds nothing
            # what it started inherits the priority: the gated shell exec'd busybox in place
            assert priority.nice_of(pid) == 0

    uvloop.run(scenario())


def test_by_default_a_pre_summon_starts_like_any_boot(tmp_path: Path) -> None:
    make_image(tmp_path / "images", "page", BUSYBOX, body="page\n")
    late_dir = make_image(tmp_path / "images", "late", GATED, body="late\n")
    cfg = tmp_path / "summon.toml"
    cfg.write_text(CONFIG)

    async def scenario() -> None:
        async with serving(cfg, Foreground, 1.0) as run:
            s, port, foregrounds = run.summoner, run.port, run.seen
            assert await get(port, "/") == (200, b"page\n")
            late = await wait_for(lambda: next((i for i in s.fleet.instances.values()
                                                if i.route == "late" and i.id in s.handles), None), "the pre-summon")
            assert late.presummoned_by == "page"  # still pre-summoned by the page's request ...
            pid = int(s.handles[late.id].detail["pid"])  # type: ignore[call-overload]
            assert priority.nice_of(pid) == 0 and priority.autogroup_nice_of(pid) in (None, 0)  # ... not lowered
            request = asyncio.create_task(get(port, "/index.html"))
            (late_dir / "go").touch()
            assert await asyncio.wait_for(request, 30) == (200, b"late\n")
            assert not foregrounds  # nothing was lowered, so nothing to lift

    uvloop.run(scenario())
