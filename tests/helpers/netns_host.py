"""A "remote" hypervisor host for tests: a network namespace with its own libvirtd.

How: a veth pair with one end in a new network namespace (addresses in 198.18.0.0/15,
the benchmarking range, so nothing real is ever addressed), and inside it a second
virtlogd + libvirtd in a private mount namespace (a tmpfs on /run/libvirt and private
/var/lib/libvirt and /var/cache/libvirt, so its sockets, state and domains are its own)
listening on TCP at the namespace's address. From the root namespace it is then reached
as ``qemu+tcp://ADDR/system``, exactly like a libvirtd on another machine, and the guests
it starts live in that namespace: their forwarded ports are only reachable through the
veth, which the test can take down (`link`).

The filesystem is shared (but for the three private directories), so kernel and initrd
paths in a domain's XML resolve the same on both sides; on real separate machines the
image files must exist at the same path.

Everything is cleaned up by PID (the daemons from their pid files, any guest left in the
namespace from ``ip netns pids``), then the namespace and the veth, also when the test
fails. Nothing started by anyone else is touched.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=check, timeout=30)


def netns_available() -> str | None:
    """None if this machine can run a namespaced libvirtd, else why not (for skips)."""
    if os.geteuid() != 0:
        return "needs root (ip netns, mounts)"
    for tool in ("ip", "unshare", "libvirtd", "virtlogd", "virsh"):
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    return None


class NetnsHost:
    """One namespace, one veth, one libvirtd. Use as a context manager."""

    def __init__(self, tag: str = "") -> None:
        self.tag = tag or f"{os.getpid() % 10000}{random.randrange(100)}"
        self.ns = f"summon-h{self.tag}"
        self.veth_root = f"svr{self.tag}"[:15]
        self.veth_ns = f"svn{self.tag}"[:15]
        third = random.randrange(256)
        base = 4 * random.randrange(64)
        self.root_addr = f"198.18.{third}.{base + 1}"
        self.addr = f"198.18.{third}.{base + 2}"
        self.dir = Path(tempfile.mkdtemp(prefix=f"summon-{self.ns}-", dir="/var/tmp"))
        self.uri = f"qemu+tcp://{self.addr}/system"
        self.made_ns = False
        self.made_veth = False

    # --- setup -------------------------------------------------------------------------

    def __enter__(self) -> NetnsHost:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, timeout_s: float = 30.0) -> None:
        _run("ip", "netns", "add", self.ns)
        self.made_ns = True
        _run("ip", "link", "add", self.veth_root, "type", "veth", "peer", "name", self.veth_ns)
        self.made_veth = True
        _run("ip", "link", "set", self.veth_ns, "netns", self.ns)
        _run("ip", "addr", "add", f"{self.root_addr}/30", "dev", self.veth_root)
        _run("ip", "link", "set", self.veth_root, "up")
        _run("ip", "netns", "exec", self.ns, "ip", "addr", "add", f"{self.addr}/30", "dev", self.veth_ns)
        _run("ip", "netns", "exec", self.ns, "ip", "link", "set", self.veth_ns, "up")
        _run("ip", "netns", "exec", self.ns, "ip", "link", "set", "lo", "up")
        for sub in ("lib", "cache", "log"):
            (self.dir / sub).mkdir()
        conf = self.dir / "libvirtd.conf"
        conf.write_text(
            "listen_tls = 0\nlisten_tcp = 1\n"
            f'listen_addr = "{self.addr}"\nauth_tcp = "none"\n'
            f'log_outputs = "3:file:{self.dir / "log" / "libvirtd.log"}"\n'
        )
        script = (
            "set -e\n"
            "mount -t tmpfs tmpfs /run/libvirt\n"
            f"mount --bind {self.dir / 'lib'} /var/lib/libvirt\n"
            f"mount --bind {self.dir / 'cache'} /var/cache/libvirt\n"
            f"virtlogd -d -p {self.dir / 'virtlogd.pid'}\n"
            f"libvirtd -d --listen -p {self.dir / 'libvirtd.pid'} -f {conf}\n"
        )
        _run("ip", "netns", "exec", self.ns, "unshare", "--mount", "--propagation", "private",
             "sh", "-c", script)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.virsh("version", check=False).returncode == 0:
                return
            time.sleep(0.3)
        raise RuntimeError(f"libvirtd in {self.ns} does not answer on {self.uri}: {self.log_tail()}")

    # --- use ---------------------------------------------------------------------------

    def virsh(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run("virsh", "-c", self.uri, *args, check=check)

    def domains(self) -> list[str]:
        """Names of the running domains (empty if libvirtd does not answer)."""
        out = self.virsh("list", "--name", check=False)
        return [n for n in out.stdout.split() if n] if out.returncode == 0 else []

    def link(self, up: bool) -> None:
        """Take the namespace's end of the veth down (or up): the host drops off the net."""
        _run("ip", "netns", "exec", self.ns, "ip", "link", "set", self.veth_ns, "up" if up else "down")

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join((self.dir / "log" / "libvirtd.log").read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no libvirtd log)"

    # --- teardown ----------------------------------------------------------------------

    def _pid(self, name: str) -> int | None:
        try:
            return int((self.dir / name).read_text().strip())
        except (OSError, ValueError):
            return None

    def close(self) -> None:
        if self.made_ns:
            if self.made_veth:
                self.link(True)
            for name in self.domains():
                self.virsh("destroy", name, check=False)
        for pidfile in ("libvirtd.pid", "virtlogd.pid"):
            pid = self._pid(pidfile)
            if pid is not None:
                _kill(pid)
        if self.made_ns:
            # guests (qemu) that outlived their libvirtd: every process in the namespace is ours
            out = _run("ip", "netns", "pids", self.ns, check=False).stdout.split()
            for pid in (int(p) for p in out if p.isdigit()):
                _kill(pid)
            _run("ip", "netns", "del", self.ns, check=False)
            self.made_ns = False
        if self.made_veth:
            _run("ip", "link", "del", self.veth_root, check=False)  # gone with the namespace, usually
            self.made_veth = False
        shutil.rmtree(self.dir, ignore_errors=True)


def _kill(pid: int, timeout_s: float = 5.0) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return  # exited; its parent (not us) has yet to reap it
        except (ProcessLookupError, OSError):
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
