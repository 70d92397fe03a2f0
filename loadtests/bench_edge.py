"""The arm64 edge's figures: boot-to-first-200 of an arm64 microVM under TCG, push and pull throughput.

    python loadtests/bench_edge.py [--boots 3] [--rounds 3] [--out loadtests/results/edge.json]

What it does, all on this machine (loopback and the local libvirtd):

1. builds the demo image `decks` for aarch64 from Debian's arm64 packages (`make image-arm64`
   or `make test` enables them) in a temporary directory;
2. **boot**: runs `summon serve` with one aarch64 libvirt host and sends `--boots` cold
   requests, one at a time, each after the previous instance idled out and was destroyed:
   the time from the request to its 200 (qemu-system-aarch64 emulates the CPU: TCG);
3. **push**: `proxy.backends.libvirt_pool.push` of the aarch64 kernel and initramfs into a
   transient dir pool over libvirt's stream API (virStorageVolUpload), each volume read back
   and hashed on arrival, `--rounds` times (volumes deleted in between);
4. **pull**: `proxy.images.distribute.pull` of the whole version (manifest, kernel, initramfs,
   site) from a running `summon serve`'s admin address (`GET /images/sha256/<hex>`) into an
   empty store, every digest checked, `--rounds` times.

MB/s are 10^6 bytes per second of artefact bytes moved (verification included), with the
artefact sizes printed beside them. Every process and domain started here is stopped by
PID or name at the end, also on errors.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
URI = "qemu:///system"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(port: int, path: str = "/", timeout: float = 300.0) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: decks\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1])


class Serve:
    """`summon serve -c CONFIG` in the background, stopped by PID."""

    def __init__(self, work: Path, images: Path, hosts: str, routes: str) -> None:
        self.port, self.admin = free_port(), free_port()
        while self.admin == self.port:
            self.admin = free_port()
        self.config = work / "summon.toml"
        self.config.write_text(
            f'[proxy]\nlisten = "127.0.0.1:{self.port}"\nadmin = "127.0.0.1:{self.admin}"\ndrain_timeout = "5s"\n'
            f'[images]\ndir = "{images}"\n[events]\npath = "{work / "events.db"}"\n{hosts}\n{routes}\n')
        self.log = work / "summon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Serve:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "proxy.cli.main", "serve", "-c", str(self.config)],
                                         env=env, stdout=subprocess.DEVNULL, stderr=log, cwd=ROOT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.admin), timeout=0.5).close()
                return self
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"summon exited: {self.log.read_text()[-2000:]}") from None
                time.sleep(0.1)
        raise RuntimeError("summon did not start")

    def instances(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/status", timeout=10) as r:
            return [i for route in json.load(r)["routes"] for i in route["instances"]]

    def __exit__(self, *_: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def build(root: Path) -> tuple[Path, float]:
    from proxy.images.build import build_image

    shutil.copytree(ROOT / "images" / "decks", root / "decks", ignore=shutil.ignore_patterns("build"))
    t0 = time.monotonic()
    build_image(root / "decks", lambda line: None, arches=("aarch64",))
    return root, time.monotonic() - t0


def bench_boots(images: Path, work: Path, boots: int) -> list[float]:
    hosts = (f'[[host]]\nname = "board"\nbackend = "libvirt"\nuri = "{URI}"\narch = "aarch64"\nslots = 1\n'
             'kvm_probe = false\n')
    routes = '[[route]]\nname = "decks"\npath = "/"\nimage = "decks"\nboot_timeout = "200s"\nidle_timeout = "1s"\n'
    out = []
    with Serve(work, images, hosts, routes) as s:
        for i in range(boots):
            deadline = time.monotonic() + 120
            while s.instances() and time.monotonic() < deadline:  # cold: the last one idled out and is gone
                time.sleep(0.5)
            t0 = time.monotonic()
            status = get(s.port)
            took = time.monotonic() - t0
            if status != 200:
                raise RuntimeError(f"boot {i + 1}: HTTP {status}: {s.log.read_text()[-1500:]}")
            out.append(took)
            print(f"  boot {i + 1}: first 200 after {took:.2f}s", flush=True)
    return out


def bench_push(image: Any, rounds: int) -> tuple[list[float], int]:
    import libvirt

    from proxy.backends.libvirt_pool import push

    artefacts = [(path, hexd) for _k, path, hexd in image.artefacts("aarch64")]
    size = sum(p.stat().st_size for p, _ in artefacts)
    where = Path(tempfile.mkdtemp(prefix="summon-bench-pool-", dir="/var/tmp"))
    where.chmod(0o755)
    name = f"summon-bench-{uuid.uuid4().hex[:8]}"
    conn = libvirt.open(URI)
    pool = conn.storagePoolCreateXML(f"<pool type='dir'><name>{name}</name><target><path>{where}</path></target>"
                                     "</pool>", 0)
    times = []
    try:
        for i in range(rounds):
            for vol in pool.listAllVolumes():
                vol.delete(0)
            pool.refresh(0)
            t0 = time.monotonic()
            pushed = push(URI, name, artefacts, lambda line: None)
            took = time.monotonic() - t0
            assert all(p.uploaded for p in pushed)
            times.append(took)
            print(f"  push {i + 1}: {size / 1e6:.1f} MB in {took:.2f}s ({size / took / 1e6:.0f} MB/s)", flush=True)
    finally:
        for vol in pool.listAllVolumes():
            vol.delete(0)
        pool.destroy()
        conn.close()
        shutil.rmtree(where, ignore_errors=True)
    return times, size


def bench_pull(images: Path, version: str, work: Path, rounds: int) -> tuple[list[float], int]:
    from proxy.images.distribute import http_fetch, pull
    from proxy.images.store import Store

    hosts = '[[host]]\nname = "local"\nbackend = "process"\n'
    times, size = [], 0
    with Serve(work, images, hosts, "") as s:
        for i in range(rounds):
            dest = Path(tempfile.mkdtemp(prefix="summon-bench-pull-", dir="/var/tmp"))
            try:
                t0 = time.monotonic()
                got = pull(f"http://127.0.0.1:{s.admin}", "decks", version, Store(dest / ".store"), http_fetch(None))
                took = time.monotonic() - t0
            finally:
                shutil.rmtree(dest, ignore_errors=True)
            size = got.bytes
            times.append(took)
            print(f"  pull {i + 1}: {got.objects} objects, {size / 1e6:.1f} MB in {took:.2f}s "
                  f"({size / took / 1e6:.0f} MB/s)", flush=True)
    return times, size


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--boots", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "loadtests" / "results" / "edge.json")
    args = ap.parse_args()
    from proxy.backends.libvirt import libvirt_available, start_libvirt_daemons
    from proxy.images.manifest import load_image

    if os.geteuid() == 0:
        start_libvirt_daemons()
    if (reason := libvirt_available(URI, "aarch64")) is not None:
        print(f"bench_edge: {reason}", file=sys.stderr)
        return 1
    root = Path(tempfile.mkdtemp(prefix="summon-bench-edge-", dir="/var/tmp"))
    root.chmod(0o755)
    try:
        images, build_s = build(root / "images")
        image = load_image(images, "decks")
        sizes = {Path(p).name: p.stat().st_size for _k, p, _h in image.artefacts("aarch64")}
        print(f"aarch64 decks built in {build_s:.0f}s: " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sizes.items()))
        (root / "boot").mkdir()
        (root / "pull").mkdir()
        print("boot-to-first-200 (aarch64 under TCG, cold, through summon):")
        boots = bench_boots(images, root / "boot", args.boots)
        print("push (virStorageVolUpload into a dir pool, read back and verified):")
        push_s, push_bytes = bench_push(image, args.rounds)
        print("pull (GET /images/sha256/<hex> from summon's admin address, every digest checked):")
        pull_s, pull_bytes = bench_pull(images, image.digest, root / "pull", args.rounds)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result = {
        "artefact_bytes": sizes,
        "boot_to_first_200_s": [round(b, 2) for b in boots],
        "boot_median_s": round(statistics.median(boots), 2),
        "push_bytes": push_bytes, "push_s": [round(t, 3) for t in push_s],
        "push_mb_s_median": round(push_bytes / statistics.median(push_s) / 1e6, 1),
        "pull_bytes": pull_bytes, "pull_s": [round(t, 3) for t in pull_s],
        "pull_mb_s_median": round(pull_bytes / statistics.median(pull_s) / 1e6, 1),
    }
    print(f"\narm64 boot-to-first-200 (TCG): median {result['boot_median_s']}s of {result['boot_to_first_200_s']}")
    print(f"push: {push_bytes / 1e6:.1f} MB at {result['push_mb_s_median']} MB/s (median of {args.rounds})")
    print(f"pull: {pull_bytes / 1e6:.1f} MB at {result['pull_mb_s_median']} MB/s (median of {args.rounds})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
