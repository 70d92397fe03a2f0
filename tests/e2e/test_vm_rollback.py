"""A deploy whose microVM kernel panics is rolled back by itself, and the route keeps
serving on the old VM throughout. Real libvirt + QEMU (TCG): three boots in all, one
good and two that panic (`rollback_after_failures = 2`).

The bad version differs from the good one only in its recipe's kernel command line:
`rdinit=` names a binary the initramfs does not have, so the kernel finds no init, tries
to mount a root device there is none of, and panics; `panic=-1` reboots and libvirt's
`on_reboot=destroy` ends the domain, which the driver reports as a failed boot.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.paths import REPO
from tests.helpers.summon_proc import SUMMON, Summon, http_get, wait_for
from tests.helpers.vm_images import URI, copy_decks, libvirt_up, on_host, vm_marks

pytestmark = vm_marks(400)

HOST = f"""
[[host]]
name = "vm"
backend = "libvirt"
uri = "{URI}"
slots = 3
kvm_probe = false
"""

ROUTE = """
[[route]]
name = "decks"
path = "/"
image = "decks"
min_replicas = 1
boot_timeout = "120s"
idle_timeout = "10m"
rollback_after_failures = 2
"""


@pytest.fixture(scope="module")
def images() -> Iterator[Path]:
    libvirt_up()
    root = copy_decks("summon-vm-rollback-")
    yield root
    shutil.rmtree(root, ignore_errors=True)


def build(images: Path, cmdline_extra: str = "") -> str:
    from proxy.images.build import CMDLINE, build_image
    from proxy.images.manifest import read_manifest, write_manifest

    if cmdline_extra:
        manifest = read_manifest(images / "decks")
        manifest.setdefault("targets", {}).setdefault("x86_64", {})["cmdline"] = f"{CMDLINE} {cmdline_extra}"
        write_manifest(images / "decks", manifest)
    return build_image(images / "decks", print)


def kinds_detail(db: Path, kind: str) -> list[dict]:  # type: ignore[type-arg]
    with sqlite3.connect(db) as c:
        return [json.loads(r[0]) for r in c.execute("select detail from events where kind = ? order by id", (kind,))]


def test_a_version_whose_kernel_panics_is_rolled_back_while_the_route_serves(tmp_path: Path, images: Path) -> None:
    good = build(images)
    s = on_host(Summon(tmp_path, ROUTE), images, HOST).start()
    answers: list[int] = []
    stop = threading.Event()

    def client() -> None:  # a request every 100 ms, all through the switch and the rollback
        while not stop.is_set() and len(answers) < 5000:
            try:
                answers.append(http_get(s.port, "/", timeout=30)[0])
            except OSError:
                answers.append(0)
            stop.wait(0.1)

    thread = threading.Thread(target=client)
    try:
        def ready() -> list[str]:
            return [i["id"] for i in s.instances() if i["state"] == "ready"]

        (old,) = wait_for(ready, 150, 0.5)
        t0 = time.time()
        thread.start()
        bad = build(images, "rdinit=/no-such-init")
        assert bad != good
        env = dict(os.environ, PYTHONPATH=str(REPO))
        r = subprocess.run([*SUMMON, "images", "deploy", "decks", "--wait", "200", "-c", str(s.config)],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=260)
        took = time.time() - t0
        assert r.returncode == 1 and "rolled back" in r.stderr, r.stdout + r.stderr
        assert f"{good} -> {bad}" in r.stdout, r.stdout
        (rolled,) = kinds_detail(s.events, "rolled_back")
        assert rolled["from"] == bad and rolled["to"] == good and rolled["automatic"] is True
        assert rolled["failed_boots"] == 2 and f"2 boot(s) of {bad} failed" in rolled["reason"], rolled
        failed = kinds_detail(s.events, "failed")
        assert len(failed) == 2 and all(f["phase"] == "boot" for f in failed), failed
        assert not kinds_detail(s.events, "deployed")
        (route,) = s.status()["routes"]
        assert route["version"] == good and route["rollout"] is None
        assert [i["id"] for i in route["instances"] if i["state"] == "ready"] == [old], "the old VM never stopped"
        record = json.loads((images / ".store/deployed/decks.json").read_text())
        assert record["version"] == good and record["how"] == "rolled back"
        time.sleep(0.5)
        stop.set()
        thread.join(60)
        assert answers and set(answers) == {200}, answers
        print(f"build + deploy of a panicking version, rolled back after {took:.1f}s; {len(answers)} requests meanwhile, all 200; {rolled['reason']}")
    finally:
        stop.set()
        if thread.is_alive():
            thread.join(60)
        s.stop(signal.SIGTERM, timeout=60)
