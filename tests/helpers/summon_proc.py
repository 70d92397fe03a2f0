"""Run a real `summon serve` in a subprocess, with images and configs made in tmp_path."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from proxy.images.manifest import content_digest
from tests.helpers.paths import REPO

ROOT = REPO  # the repository
SUMMON = [sys.executable, "-m", "proxy.cli.main"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_image(images: Path, name: str, command: list[str], body: str = "hello from the instance\n") -> Path:
    """An image whose unix target runs `command` ({port} and {dir} substituted)."""
    d = images / name
    (d / "site").mkdir(parents=True, exist_ok=True)
    (d / "site" / "index.html").write_text(body)
    digest = content_digest(d / "site")
    cmd = ", ".join(json.dumps(a) for a in command)
    (d / "image.toml").write_text(
        f'name = "{name}"\n[targets.unix]\ncommand = [{cmd}]\nhealth_path = "/"\n'
        f'content = "site"\ncontent_sha256 = "{digest}"\n'
    )
    return d


BUSYBOX = ["busybox", "httpd", "-f", "-p", "127.0.0.1:{port}", "-h", "{dir}/site"]


class Summon:
    def __init__(self, tmp: Path, routes: str, extra: str = "") -> None:
        self.tmp = tmp
        self.port = free_port()
        self.admin_port = free_port()
        while self.admin_port == self.port:  # the kernel may hand out the same free port twice
            self.admin_port = free_port()
        self.config = tmp / "summon.toml"
        self.events = tmp / "events.db"
        self.config.write_text(
            f'[proxy]\nlisten = "127.0.0.1:{self.port}"\nadmin = "127.0.0.1:{self.admin_port}"\n'
            f'drain_timeout = "5s"\n{extra}\n'
            f'[images]\ndir = "images"\n[events]\npath = "events.db"\n'
            f'[[host]]\nname = "local"\nbackend = "process"\nslots = 16\n{routes}\n'
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tmp / "summon.log"
        self.env: dict[str, str] = {}  # added to summon's environment

    def start(self) -> Summon:
        env = dict(os.environ, PYTHONPATH=str(ROOT), **self.env)
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen([*SUMMON, "serve", "-c", str(self.config)], cwd=self.tmp, env=env,
                                         stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.time() + 15
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.admin_port), timeout=0.2).close()
                return self
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"summon exited: {self.log.read_text()}") from None
                time.sleep(0.05)
        raise RuntimeError("summon did not start")

    def status(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/status", timeout=5) as r:
            return json.load(r)

    def instances(self) -> list[dict]:
        return [i for r in self.status()["routes"] for i in r["instances"]]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)


def http_get(port: int, path: str = "/", host: str = "site", timeout: float = 30.0,
             headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """A minimal HTTP/1.1 GET with Connection: close; returns (status, headers, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    hdrs = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return status, hdrs, body


def pids_matching(text: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", text], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out if int(p) != os.getpid()]


def wait_for(cond, timeout: float = 10.0, step: float = 0.1):  # type: ignore[no-untyped-def]
    """`cond()`'s first truthy value within `timeout` seconds, else its last value."""
    end = time.time() + timeout
    while time.time() < end:
        value = cond()
        if value:
            return value
        time.sleep(step)
    return cond()
