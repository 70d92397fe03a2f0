"""The libvirt driver: each instance is a transient microVM (kernel + initramfs, no disk).

Why these choices:
- libvirt calls block, so they run on a small dedicated thread pool; one connection per
  URI, opened lazily and reopened if libvirtd went away.
- Transient domains (createXML): nothing is left defined if summon or libvirtd dies; what
  is left *running* carries summon's `<metadata>` (route, instance, image digest, the
  summon process's owner lock and pid) so `reap_orphans` can find and destroy it once its
  owner is dead (see `proxy.backends.owner`: a zombie owner holds no lock).
- Domain type ``kvm`` only if a KVM guest really boots to userspace (probed once per URI
  and cached): on nested setups /dev/kvm exists but Linux hangs, so we fall back to TCG.
  The probe takes up to 10 s there, so its answer is also kept on disk until the machine
  reboots: a restarted summon does not make its first cold request pay for it again.
- A start cancelled while libvirt is still creating or restoring its domain (summon
  stopping, a booting pre-summon reclaimed) destroys that domain once the call returns:
  with no handle it could not be stopped, and would run until a later summon reaped it.
- Death detection polls the list of running domains every 0.5 s (one call for all
  instances): simpler and more robust across libvirtd restarts than lifecycle events.
- ``start = "restore"``: boot one instance, wait for HTTP, ``dom.save()`` it once per
  image digest, then restore a per-instance copy of the save file whose header XML is
  rewritten (see `libvirt_xml`): 4-6x faster than booting under TCG.
- A remote URI (qemu+tcp://, qemu+ssh://, qemu+tls://; see `libvirt_host`): guests'
  ports bind at the host's address, from its port range; its connection is watched
  (`watch_health`): when the host stops answering its instances are given up as lost
  (their `exited` resolves) and their domains destroyed once it answers again, before
  it takes new boots, so a lost instance never runs beside its replacement.
  The kernel, initrd and save-file paths in the XML are read *on that host*: the image
  files must exist there at the same path (the console log is not kept remotely).
- A background start (a pre-summon, `InstanceSpec.background`) on this machine: its domain
  is created (or restored) with `<cputune><shares>2</shares>`, the least CPU share of
  libvirt's per-domain cgroup, from its QEMU's first instruction to `foreground`, which
  sets a normal domain's share (1024 under cgroup v1, 100 under v2) through
  virDomainSetSchedulerParameters. A nice value would do nothing here: libvirt puts each
  QEMU in a cgroup of its own, and the kernel weighs nice only within one. Its libvirt
  calls run on their own threads, so that the starts requests wait for never queue
  behind them. Where libvirt has no CPU controller (the first such start fails), or on a
  remote host, pre-summons start like any other.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from ..config import Address
from ..errors import BackendError, HostUnavailable
from ..images.manifest import Image
from .base import Handle, InstanceSpec
from .console import ConsoleTail, guest_marks
from .libvirt_host import (
    KEEPALIVE_COUNT,
    KEEPALIVE_INTERVAL_S,
    HostHealth,
    ensure_event_loop,
    guest_address,
    pick_port,
    reachable,
    remote_endpoint,
)
from .libvirt_pool import verified_paths
from .libvirt_xml import NS, DomainParams, copy_save_with_xml, domain_name, domain_xml, parse_metadata, retarget_xml
from .owner import claim, default_dir, owner_alive, pid_alive, proc_start, sweep
from .process import vm_rss_mib

try:
    import libvirt
except ImportError:  # pragma: no cover - exercised only where libvirt-python is missing
    libvirt = None

T = TypeVar("T")
log = logging.getLogger("summon.libvirt")
POLL_S = 0.5
PROBE_TIMEOUT_S = 3.0  # a remote host's answer to a cheap call; two misses and it is down
REAP_ON_RETURN_TIMEOUT_S = 10.0  # a returning host's orphans are reaped within this, or left to the reaper
KVM_PROBE_TIMEOUT_S = 10.0
CANCELLED_START_WAIT_S = 15.0  # `close` waits this long for cancelled starts' domains, to destroy them
CONSOLE_DIR = Path("/tmp/summon-console")
_kvm_answers: dict[str, bool] = {}  # per URI, for the life of the process
# ... and on disk for the life of the machine's boot (see `remembered_kvm_answer`)
KVM_ANSWERS_FILE = Path("/tmp/summon-kvm-probe.json")
BOOT_ID_FILE = Path("/proc/sys/kernel/random/boot_id")
_CONNECTION_ERRORS = {"VIR_ERR_NO_CONNECT", "VIR_ERR_SYSTEM_ERROR", "VIR_ERR_RPC", "VIR_ERR_AUTH_FAILED",
                      "VIR_ERR_INTERNAL_ERROR_CONNECT", "VIR_ERR_NO_SUPPORT_CONNECT"}


def remembered_kvm_answer(uri: str, path: Path | None = None, boot_id: Path | None = None) -> bool | None:
    """The probe's answer for `uri` from an earlier summon process since this boot, or
    None. Only a file of our own user is believed (it is in /tmp)."""
    path, boot_id = path or KVM_ANSWERS_FILE, boot_id or BOOT_ID_FILE
    try:
        if path.stat().st_uid != os.getuid():
            return None
        entry = json.loads(path.read_text()).get(uri)
        if isinstance(entry, dict) and entry.get("boot_id") == boot_id.read_text().strip():
            kvm = entry.get("kvm")
            return kvm if isinstance(kvm, bool) else None
    except (OSError, ValueError, AttributeError):
        pass
    return None


def remember_kvm_answer(uri: str, kvm: bool, path: Path | None = None, boot_id: Path | None = None) -> None:
    path, boot_id = path or KVM_ANSWERS_FILE, boot_id or BOOT_ID_FILE
    try:
        answers = json.loads(path.read_text()) if path.stat().st_uid == os.getuid() else {}
    except (OSError, ValueError):
        answers = {}  # none yet, or unreadable: start afresh
    if not isinstance(answers, dict):
        answers = {}
    try:
        answers[uri] = {"boot_id": boot_id.read_text().strip(), "kvm": kvm}
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(answers))
        os.replace(tmp, path)
    except (OSError, ValueError):
        pass  # a cache: without it the next summon probes again


def _quiet_errors() -> None:
    """libvirt prints every error to stderr by default; we translate them instead."""
    if libvirt is not None:
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


_quiet_errors()


def _is_connection_error(exc: Exception) -> bool:
    code = exc.get_error_code() if hasattr(exc, "get_error_code") else None
    return any(code == getattr(libvirt, name, object()) for name in _CONNECTION_ERRORS)


def _is_no_domain(exc: Exception) -> bool:
    return hasattr(exc, "get_error_code") and exc.get_error_code() == getattr(libvirt, "VIR_ERR_NO_DOMAIN", -1)


QEMU_PACKAGE = {"x86_64": "qemu-system-x86", "aarch64": "qemu-system-arm"}


def libvirt_available(uri: str, arch: str = "x86_64") -> str | None:
    """None if `uri` can be used to run `arch` domains, else a human reason (for skips and `check`)."""
    if libvirt is None:
        return "libvirt-python is not installed (pip install summon[libvirt])"
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as exc:
        return f"cannot connect to {uri}: {exc} (is libvirtd running? scripts/start-libvirt.sh)"
    try:
        if conn.getType() == "QEMU":
            caps = conn.getCapabilities()
            if "hvm" not in caps or f"<arch name='{arch}'>" not in caps:
                return (f"{uri}: QEMU cannot run {arch} hvm guests (install {QEMU_PACKAGE.get(arch, 'qemu')}, "
                        "then restart libvirtd so it sees the new emulator)")
    finally:
        conn.close()
    return None


def start_libvirt_daemons(timeout_s: float = 10.0) -> list[int]:
    """Start virtlogd and libvirtd if they are not running (no systemd here). Stops
    nothing; returns the PIDs of the daemons it started, so that whoever asked can stop
    them, and only them, when done (a libvirtd that was running before is left alone)."""
    started: list[int] = []
    for daemon in ("virtlogd", "libvirtd"):
        if subprocess.run(["pgrep", "-x", daemon], capture_output=True).returncode != 0:
            subprocess.run([daemon, "-d"], check=False)  # forks; as root it writes /run/<daemon>.pid
            started += _daemon_pid(daemon, timeout_s)
    sock = Path("/run/libvirt/libvirt-sock")
    deadline = time.monotonic() + timeout_s
    while not sock.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    return started


def _daemon_pid(daemon: str, timeout_s: float) -> list[int]:
    """The PID a daemon that just forked into the background wrote to its pid file."""
    pidfile = Path(f"/run/{daemon}.pid")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            return [int(pidfile.read_text().split()[0])]
        except (OSError, ValueError, IndexError):
            time.sleep(0.05)
    return []


def _free_port(avoid: set[int], host: str = "127.0.0.1") -> int:
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port not in avoid:
            return port


async def http_ok(port: int, path: str, timeout_s: float, host: str = "127.0.0.1") -> bool:
    """Poll ``GET path`` on host:port until a 2xx/3xx answer or the deadline."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 1.0)
            try:
                writer.write(f"GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode())
                line = await asyncio.wait_for(reader.readline(), 2.0)
            finally:
                writer.close()
            parts = line.split()
            if len(parts) >= 2 and parts[1][:1] in (b"2", b"3"):
                return True
        except (TimeoutError, OSError):
            pass
        await asyncio.sleep(0.1)
    return False


QEMU_PID_DIR = Path("/run/libvirt/qemu")


def qemu_exec_time(name: str, pid_dir: Path = QEMU_PID_DIR) -> float | None:
    """When the QEMU process of local domain `name` started, on the monotonic clock (to the
    kernel's clock tick, 10 ms), or None if that cannot be read."""
    try:
        pid = int((pid_dir / f"{name}.pid").read_text().strip())
        ticks = int(proc_start(pid)[0])
    except (OSError, ValueError):
        return None
    started_boottime = ticks / os.sysconf("SC_CLK_TCK")
    return time.monotonic() - (time.clock_gettime(time.CLOCK_BOOTTIME) - started_boottime)


BACKGROUND_SHARES = 2  # cgroup v1's least cpu.shares (v2: a weight of 2 against 100)


def normal_cpu_shares(root: Path = Path("/sys/fs/cgroup")) -> int:
    """A domain's CPU share without `<cputune>`: the kernel's default, cpu.shares 1024
    where the cpu controller is cgroup v1, else cpu.weight 100 (v2)."""
    v1 = any((root / d / "cpu.shares").exists() for d in ("cpu", "cpu,cpuacct"))
    return 1024 if v1 else 100


def _cputune_unsupported(exc: BackendError) -> bool:
    text = str(exc).lower()
    return "cgroup" in text or "cpu shares" in text or "cputune" in text


def _close_quietly(conn: Any) -> None:
    try:
        conn.close()
    except Exception:  # noqa: BLE001 - it is dead already; this only frees it
        pass


class LibvirtBackend:
    name = "libvirt"
    forwards_connections = True  # QEMU's user networking accepts before the guest listens (`Lease.forwarder`)

    def __init__(self, uri: str, probe_kvm: bool = True, console_dir: Path = CONSOLE_DIR,
                 address: str = "", ports: tuple[int, int] = (24000, 24999),
                 owner_dir: Path | None = None) -> None:
        if libvirt is None:
            raise HostUnavailable("libvirt-python is not installed (pip install summon[libvirt])")
        self.uri = uri
        self.endpoint = remote_endpoint(uri)  # None: libvirtd on this machine
        self.address_setting = address
        self._address: str | None = None  # resolved once (see `libvirt_host.guest_address`)
        self.port_range = ports
        self._down: str | None = None  # why the remote host is down, while it is
        self._abandoned: dict[str, int] = {}  # domain -> port, lost with the host: destroy on return
        self._monitor: asyncio.Task[None] | None = None
        self._pending_probe: asyncio.Future[None] | None = None
        self._on_health: Callable[[bool, str, list[str]], None] | None = None
        self.probe_kvm = probe_kvm
        self.console_dir = console_dir
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="libvirt")
        # the health probe's own thread: calls stuck on a dead host's connection may hold
        # every thread of the pool above, and the probe must still run to see it return
        self._probe_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="libvirt-probe")
        self._conn: Any = None
        self._conn_lock = threading.Lock()
        self._handles: dict[str, tuple[Handle, str]] = {}  # domain name -> (handle, instance id)
        self._ports: set[int] = set()
        self._watcher: asyncio.Task[None] | None = None
        self._type_lock: asyncio.Lock | None = None
        self._snap_locks: dict[str, asyncio.Lock] = {}
        self._pool_checked: dict[tuple[str, str], str] = {}  # (pool, sha256) -> volume path, hashed there
        self._boots: dict[str, tuple[dict[str, float], ConsoleTail | None]] = {}  # domain -> (host marks, tail)
        self._hostname = socket.gethostname()
        self.owner_dir = owner_dir or default_dir()
        # background starts not brought to the foreground yet: instance id -> domain name
        self._background: dict[str, str] = {}
        self._shares_ok: bool | None = None  # do domains here take <cputune><shares>? None: not tried yet
        self._normal_shares = normal_cpu_shares()
        # pre-summons' create/restore calls: never on the pool above, which the starts a request
        # waits for need, and all at once (as many as `max_followers`: a call queued here could
        # not be brought to the foreground); the calls that raise a share, behind no create
        self._background_executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="libvirt-bg")
        self._prio_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="libvirt-prio")
        # creates and restores whose start was cancelled while libvirt was still at them: their
        # domain is destroyed once the call returns (see `_unless_cancelled`)
        self._orphaned: set[asyncio.Task[Any]] = set()

    # --- plumbing -----------------------------------------------------------------

    def _connection(self) -> Any:
        with self._conn_lock:
            if self._alive(self._conn):
                return self._conn
            self._conn = None
        # Opened without the lock: a connect stuck on a path that just died (TCP retries last
        # minutes) must not hold up every other caller, the health probe above all.
        if self.endpoint is not None:
            why = reachable(self.endpoint)  # seconds, not the minutes libvirt.open would block
            if why is not None:
                raise HostUnavailable(f"cannot connect to {self.uri}: {why}")
            ensure_event_loop()
        try:
            conn = libvirt.open(self.uri)
        except libvirt.libvirtError as exc:
            raise HostUnavailable(f"cannot connect to {self.uri}: {exc}") from exc
        if self.endpoint is not None:
            try:  # calls on a dead TCP path then fail within seconds instead of hanging
                conn.setKeepAlive(KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT)
            except libvirt.libvirtError:
                pass
        with self._conn_lock:
            if self._alive(self._conn):  # another caller connected meanwhile: use one connection
                _close_quietly(conn)
                return self._conn
            self._conn = conn
            return conn

    @staticmethod
    def _alive(conn: Any) -> bool:
        if conn is None:
            return False
        try:
            return bool(conn.isAlive())
        except libvirt.libvirtError:
            return False

    def _lost(self) -> bool:
        """Is the connection gone (closed by keepalive, or never opened)? Local check, no RPC."""
        conn = self._conn
        try:
            return conn is None or not conn.isAlive()
        except libvirt.libvirtError:
            return True

    async def _call(self, what: str, fn: Callable[..., T], *args: Any, executor: ThreadPoolExecutor | None = None) -> T:
        """Run a blocking libvirt call on the pool; translate libvirtError."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(executor or self._executor, functools.partial(fn, *args))
        except BackendError:
            raise
        except Exception as exc:
            if libvirt is not None and isinstance(exc, libvirt.libvirtError):
                if _is_connection_error(exc) or (self.endpoint is not None and self._lost()):
                    raise HostUnavailable(f"{self.uri}: {what}: {exc}") from exc
                raise BackendError(f"{self.uri}: {what}: {exc}") from exc
            if isinstance(exc, OSError | ValueError):
                raise BackendError(f"{self.uri}: {what}: {exc}") from exc
            raise

    def _is_test_driver(self) -> bool:
        return self.uri.startswith("test:")

    # --- domain type ----------------------------------------------------------------

    async def domain_type(self, image: Image, arch: str = "x86_64") -> str:
        """"kvm" if a KVM guest really boots here, else "qemu" (TCG); "test" for test:///.

        An aarch64 guest is KVM only where libvirt offers KVM for aarch64 (an arm64 host);
        it is not boot-probed (the probe's initramfs holds this machine's busybox)."""
        if self._is_test_driver():
            return "test"
        if arch != "x86_64":
            key = f"{self.uri}#{arch}"
            if key not in _kvm_answers:
                _kvm_answers[key] = self.probe_kvm and await self._call(
                    "domain capabilities", lambda: self._kvm_offered(arch))
            return "kvm" if _kvm_answers[key] else "qemu"
        if self._type_lock is None:
            self._type_lock = asyncio.Lock()
        async with self._type_lock:
            if self.uri not in _kvm_answers:
                if not self.probe_kvm:
                    _kvm_answers[self.uri] = False
                else:
                    known = remembered_kvm_answer(self.uri)
                    _kvm_answers[self.uri] = known if known is not None else await self._probe_kvm(image)
                    if known is None:
                        remember_kvm_answer(self.uri, _kvm_answers[self.uri])
        return "kvm" if _kvm_answers[self.uri] else "qemu"

    def _kvm_offered(self, arch: str = "x86_64") -> bool:
        try:
            self._connection().getDomainCapabilities(None, arch, None, "kvm")
            return True
        except libvirt.libvirtError:
            return False

    async def _probe_kvm(self, image: Image) -> bool:
        """Boot the image's kernel under KVM with an /init that exits at once.

        init exiting panics the kernel; panic=-1 reboots; on_reboot=destroy removes the
        domain. So "the domain vanished in time" means Linux reached userspace under KVM.
        """
        if not await self._call("domain capabilities", self._kvm_offered):
            return False
        from ..images.build import BUSYBOX, S_IFREG, Entry, write_initramfs

        probe_initrd = image.dir / "build" / "kvm-probe.cpio.gz"
        init = b"#!/bin/busybox sh\n/bin/busybox echo summon-kvm-probe\n"
        await asyncio.to_thread(
            write_initramfs, probe_initrd,
            [Entry("bin/busybox", S_IFREG | 0o755, BUSYBOX.read_bytes()), Entry("init", S_IFREG | 0o755, init)],
        )
        probe_id = uuid.uuid4().hex[:8]
        port = await self._choose_port(set())
        params = self._params(image, f"summon-kvm-probe-{probe_id}", probe_id, "kvm", port=port)
        params = DomainParams(**{**params.__dict__, "initrd": probe_initrd, "route": "kvm-probe"})
        xml = domain_xml(params)
        self.console_dir.mkdir(parents=True, exist_ok=True)
        await self._call("create kvm probe", lambda: self._connection().createXML(xml, 0))
        try:
            deadline = time.monotonic() + KVM_PROBE_TIMEOUT_S
            while time.monotonic() < deadline:
                if params.name not in await self._call("list domains", self._active_names):
                    return True
                await asyncio.sleep(0.2)
            await self._destroy(params.name)
            return False
        finally:
            if params.console_log is not None:
                params.console_log.unlink(missing_ok=True)

    # --- start / stop -----------------------------------------------------------------

    def _params(self, image: Image, name: str, instance_id: str, dtype: str, port: int, route: str = "",
                arch: str = "x86_64", paths: dict[str, str] | None = None,
                cpu_shares: int | None = None) -> DomainParams:
        t = image.target(arch)
        return DomainParams(
            name=name,
            domain_type=dtype,
            kernel=Path(paths["kernel"]) if paths else image.path(arch, "kernel"),
            initrd=Path(paths["initrd"]) if paths else image.path(arch, "initrd"),
            cmdline=str(t.get("cmdline", "console=ttyAMA0 quiet panic=-1" if arch == "aarch64"
                              else "console=ttyS0 quiet panic=-1")),
            memory_mib=int(t.get("memory_mib", 128)),
            tb_cache_mib=int(t.get("tb_cache_mib", 0)),
            guest_port=int(t.get("guest_port", 80)),
            host_port=port,
            route=route,
            instance_id=instance_id,
            image_digest=image.digest,
            pid=os.getpid(),
            pid_start=proc_start(os.getpid())[0],
            hostname=self._hostname,
            console_log=None if dtype == "test" or self.endpoint is not None else self.console_dir / f"{name}.log",
            host_address=self._address or "127.0.0.1",
            owner=str(claim(self.owner_dir).path),  # this process's, also after a fork
            arch=arch,
            cpu_shares=cpu_shares,
        )

    # --- where guests' ports go -----------------------------------------------------------

    async def _resolve_address(self) -> str:
        if self._address is None:
            try:
                self._address = await asyncio.to_thread(guest_address, self.uri, self.address_setting)
            except OSError as exc:
                raise HostUnavailable(f"{self.uri}: cannot resolve the host's address: {exc}") from exc
        return self._address

    async def _choose_port(self, avoid: set[int]) -> int:
        """Local: a port the kernel says is free here. Remote: a random one from the
        host's range that no summon domain there forwards (see `libvirt_host.pick_port`)."""
        address = await self._resolve_address()
        if self.endpoint is None:
            return _free_port(self._ports | avoid, address)
        taken = await self._call("list forwarded ports", self._forwarded_ports)
        try:
            return pick_port(*self.port_range, self._ports | avoid | taken)
        except ValueError as exc:
            raise BackendError(f"{self.uri}: {exc}") from exc

    def _forwarded_ports(self) -> set[int]:
        ports = set()
        for dom in self._connection().listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
            try:
                port = parse_metadata(dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, NS)).get("port", "")
            except libvirt.libvirtError:
                continue  # not ours
            if port.isdigit():
                ports.add(int(port))
        return ports

    async def start(self, spec: InstanceSpec) -> Handle:
        if self._down is not None:
            raise HostUnavailable(f"{self.uri}: {self._down}")  # fail fast: placement goes elsewhere
        image, arch = spec.image, spec.host.arch
        await self._resolve_address()
        paths = await self._artefacts(spec)
        dtype = await self.domain_type(image, arch)
        name = domain_name(spec.route.name, spec.instance_id)
        restore = spec.start == "restore" and dtype != "test"
        snapshot = await self.save_snapshot(spec) if restore else None
        # a pre-summon: its domain is born with the least CPU share (`<cputune><shares>`), and its
        # libvirt calls take other threads than the starts a request waits for
        background = spec.background and self.endpoint is None and dtype != "test" and self._shares_ok is not False
        executor = self._background_executor if spec.background else None
        self.console_dir.mkdir(parents=True, exist_ok=True)
        last: BackendError | None = None
        tried: set[int] = set()
        for _attempt in range(3):  # a port picked as free can be taken before QEMU binds it
            port = await self._choose_port(tried)
            tried.add(port)
            params = self._params(image, name, spec.instance_id, dtype, port, spec.route.name, arch, paths,
                                  cpu_shares=BACKGROUND_SHARES if background else None)
            self._ports.add(port)
            if background:
                self._background[spec.instance_id] = name
            create_at = time.monotonic()
            try:
                if snapshot is not None:
                    await self._unless_cancelled(name, self._call(
                        f"restore {name}", self._restore_sync, snapshot, params, executor=executor))
                else:
                    xml = domain_xml(params)
                    await self._unless_cancelled(name, self._call(
                        f"create {name}", lambda xml=xml: self._connection().createXML(xml, 0), executor=executor))
            except (asyncio.CancelledError, HostUnavailable):
                self._ports.discard(port)
                self._background.pop(spec.instance_id, None)
                raise
            except BackendError as exc:
                self._ports.discard(port)
                self._background.pop(spec.instance_id, None)
                last = exc
                if "hostfwd" in str(exc) or "host forwarding" in str(exc):
                    continue
                if background and _cputune_unsupported(exc):
                    log.warning("%s: no CPU shares for pre-summons here (%s); they start like any other",
                                self.uri, exc)
                    self._shares_ok = background = False
                    continue
                raise
            if background:
                self._shares_ok = True
            loop = asyncio.get_running_loop()
            handle = Handle(
                instance_id=spec.instance_id,
                address=Address(params.host_address, port),
                exited=loop.create_future(),
                detail={"domain": name, "domain_type": dtype, "start": "restore" if snapshot else "boot",
                        "image": image.ref, "uri": self.uri},
            )
            self._handles[name] = (handle, spec.instance_id)
            self._note_boot(name, params, create_at, time.monotonic(), restored=snapshot is not None)
            if background and spec.instance_id not in self._background:  # brought to the foreground meanwhile
                try:
                    await self._set_shares(name, self._normal_shares)
                except BackendError as exc:
                    log.warning("cannot raise the CPU share of %s: %s", name, exc)
            if self._watcher is None or self._watcher.done():
                self._watcher = asyncio.create_task(self._watch(), name=f"libvirt-watch {self.uri}")
            return handle
        assert last is not None
        raise last

    async def _unless_cancelled(self, name: str, call: Any) -> None:
        """Await a create or restore; if the start is cancelled meanwhile (summon stopping,
        a booting pre-summon reclaimed), the call still runs on in its thread and its domain
        comes up with no handle to stop it by: it is destroyed as soon as the call returns,
        instead of running untracked until a later summon reaps it (`close` waits for that)."""
        task = asyncio.ensure_future(call)
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done() and (task.cancelled() or task.exception() is not None):
                raise  # no domain came up (a call that had just returned is destroyed below too)

            async def destroy_when_up() -> None:
                try:
                    await task
                except BaseException:  # noqa: BLE001 - no domain came up: nothing to destroy
                    return
                try:
                    await self._destroy(name)
                except BackendError as exc:
                    log.warning("cannot destroy %s, whose start was cancelled: %s", name, exc)

            cleanup = asyncio.ensure_future(destroy_when_up())
            self._orphaned.add(cleanup)
            cleanup.add_done_callback(self._orphaned.discard)
            raise

    async def _artefacts(self, spec: InstanceSpec) -> dict[str, str] | None:
        """Check what the guest boots: the image's files here, or (a host with `pool`) the
        volumes `summon images push` put there, hashed on the host once per digest."""
        arch = spec.host.arch
        if not spec.host.pool:
            await asyncio.to_thread(spec.image.verify, arch)
            return None
        wanted = [(key, hexd) for key, _path, hexd in spec.image.artefacts(arch)]
        return await self._call(f"pool {spec.host.pool}", lambda: verified_paths(
            self._connection(), spec.host.pool, wanted, self._pool_checked))

    # --- where a boot's time goes (see `console`) ------------------------------------------

    def _note_boot(self, name: str, params: DomainParams, create_at: float, running_at: float,
                   restored: bool) -> None:
        """Host-side marks, each the end of the phase it names, and the console's tail."""
        if restored:
            self._boots[name] = ({"prepare": create_at, "restore": running_at}, None)
            return
        marks = {"prepare": create_at}
        exec_at = qemu_exec_time(name) if self.endpoint is None else None
        if exec_at is not None and create_at <= exec_at <= running_at:
            marks["libvirt_create"] = exec_at
        marks["qemu_up"] = running_at
        tail = ConsoleTail(params.console_log).start() if params.console_log is not None else None
        self._boots[name] = (marks, tail)

    def boot_marks(self, handle: Handle) -> dict[str, float]:
        """When each phase of this instance's start ended (host monotonic clock, in order):
        the driver's own, then the guest's from its console. Stops reading the console."""
        marks, tail = self._boots.pop(str(handle.detail.get("domain", "")), ({}, None))
        if tail is not None:
            guest = guest_marks(tail.stop(), running_at=marks.get("qemu_up"))
            renamed = {"kernel_entry": "firmware", "kernel_init": "kernel_init", "init": "init",
                       "network": "network", "listening": "server"}
            marks = {**marks, **{renamed[k]: v for k, v in guest.items()}}
        return marks

    def _restore_sync(self, snapshot: Path, params: DomainParams) -> None:
        copy = snapshot.with_name(f".{params.name}.restore")
        try:
            copy_save_with_xml(snapshot, copy, lambda xml: retarget_xml(xml, params))
            self._connection().restore(str(copy))
        finally:
            copy.unlink(missing_ok=True)

    # --- background starts (pre-summons): the least CPU share until `foreground` ------------

    async def foreground(self, instance_id: str) -> None:
        """The domain's CPU share back to a normal domain's. One still being created is
        left to `start`, which raises it once its call returns."""
        name = self._background.pop(instance_id, None)
        if name is None or name not in self._handles:
            return
        try:
            await self._set_shares(name, self._normal_shares)
        except BackendError as exc:
            log.warning("cannot raise the CPU share of %s: %s", name, exc)

    async def _set_shares(self, name: str, shares: int) -> None:
        await self._call(f"cpu shares of {name}", lambda: self._connection().lookupByName(name).setSchedulerParametersFlags(
            {"cpu_shares": shares}, libvirt.VIR_DOMAIN_AFFECT_LIVE), executor=self._prio_executor)

    # --- paused standbys (`start = "resume"`) ------------------------------------------------

    async def pause(self, handle: Handle) -> None:
        """virDomainSuspend: QEMU stops the vCPUs; guest RAM and the port forward stay."""
        name = str(handle.detail.get("domain", ""))
        await self._call(f"suspend {name}", lambda: self._connection().lookupByName(name).suspend())

    async def resume(self, handle: Handle) -> None:
        """virDomainResume: the guest runs on from where it was paused."""
        name = str(handle.detail.get("domain", ""))
        await self._call(f"resume {name}", lambda: self._connection().lookupByName(name).resume())

    def rss_mib(self, handle: Handle) -> float | None:
        """The QEMU process's resident memory (local domains only)."""
        if self.endpoint is not None:
            return None
        try:
            pid = int((QEMU_PID_DIR / f"{handle.detail.get('domain', '')}.pid").read_text().strip())
        except (OSError, ValueError):
            return None
        return vm_rss_mib(pid)

    async def stop(self, handle: Handle) -> None:
        name = str(handle.detail.get("domain", ""))
        self._background.pop(handle.instance_id, None)
        self._handles.pop(name, None)
        _marks, tail = self._boots.pop(name, ({}, None))
        if tail is not None:
            tail.stop()
        try:
            if self._down is not None:
                raise HostUnavailable(self._down)
            await self._destroy(name)
        except HostUnavailable:
            if self.endpoint is None:
                raise
            self._abandoned[name] = handle.address.port  # destroyed when the host answers again
            if not handle.exited.done():
                handle.exited.set_result("stopped")
            return
        self._ports.discard(handle.address.port)
        (self.console_dir / f"{name}.log").unlink(missing_ok=True)
        if not handle.exited.done():
            handle.exited.set_result("stopped")

    async def _destroy(self, name: str) -> bool:
        def destroy() -> bool:
            try:
                self._connection().lookupByName(name).destroy()
                return True
            except libvirt.libvirtError as exc:
                if _is_no_domain(exc) or "not running" in str(exc):
                    return False
                raise

        return await self._call(f"destroy {name}", destroy)

    def _active_names(self) -> set[str]:
        conn = self._connection()
        return {d.name() for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)}

    async def _watch(self) -> None:
        """Resolve `exited` of every handle whose domain is no longer running."""
        while self._handles:
            await asyncio.sleep(POLL_S)
            # Only the handles there before the list was asked for: a domain created while
            # the call was on its way may be missing from the answer, and is not gone.
            known = {name: h for name, (h, _iid) in self._handles.items()}
            try:
                names = await self._call("list domains", self._active_names)
            except BackendError:
                continue  # libvirtd restarting: domains keep running; try again
            for name, (handle, _iid) in list(self._handles.items()):
                if name not in names and known.get(name) is handle:
                    self._handles.pop(name, None)
                    _marks, tail = self._boots.pop(name, ({}, None))
                    if tail is not None:
                        tail.stop()
                    self._ports.discard(handle.address.port)
                    if not handle.exited.done():
                        handle.exited.set_result(f"domain {name} is no longer running{self._console_tail(name)}")

    def _console_tail(self, name: str) -> str:
        try:
            lines = (self.console_dir / f"{name}.log").read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return f" (console: {lines[-1][:200]})" if lines else ""

    # --- orphans, close -------------------------------------------------------------------

    async def reap_orphans(self, all_summon: bool = False) -> list[str]:
        """Destroy summon domains whose owner is dead (or every one not ours, if all_summon).

        Runs at start-up and then periodically (`Summoner.reap_orphans`). Several summon
        processes may reap at once: a domain is destroyed by one of them (the others get
        "no domain") and reported once."""
        if self._down is not None:
            return []  # a lost remote host: its return reaps (`_watch_host_once`), not a call stuck on it
        claim(self.owner_dir)  # before looking: our own domains must look owned

        def orphans() -> tuple[list[str], set[str]]:
            out, owners = [], set()
            for dom in self._connection().listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
                try:
                    meta = parse_metadata(dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, NS))
                except libvirt.libvirtError:
                    continue  # not ours
                if dom.name() in self._handles:
                    continue
                if meta.get("owner"):
                    owners.add(meta["owner"])
                if all_summon or (meta.get("pid_host", self._hostname) == self._hostname and not self._owned(meta)):
                    out.append(dom.name())
            return out, owners

        names, owners = await self._call("list summon domains", orphans)
        reaped = [n for n in names if await self._destroy(n)]
        await asyncio.to_thread(sweep, self.owner_dir, owners)  # dead owners' lock files nothing names
        return reaped

    # --- a remote host's health ------------------------------------------------------------

    def watch_health(self, on_change: Callable[[bool, str, list[str]], None]) -> None:
        """Probe a remote host every second; call ``on_change(up, reason, reaped)`` when it
        stops or starts answering (`reaped`: orphans destroyed on its return). Local URIs
        are not watched: their guests stay reachable on loopback while libvirtd restarts."""
        if self.endpoint is None or (self._monitor is not None and not self._monitor.done()):
            return
        self._on_health = on_change
        self._monitor = asyncio.get_running_loop().create_task(self._watch_host(), name=f"libvirt-health {self.uri}")

    async def _watch_host(self) -> None:
        health = HostHealth()
        while True:
            try:
                await self._watch_host_once(health)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not end the watch: the host would stay down
                log.exception("watching libvirt host %s", self.uri)
                await asyncio.sleep(1.0)

    async def _watch_host_once(self, health: HostHealth) -> None:
        probe = self._pending_probe
        while True:
            if probe is None or probe.done():  # never a second probe stuck on a dead connection
                probe = self._pending_probe = asyncio.ensure_future(self._probe())
                probe.add_done_callback(lambda f: f.cancelled() or f.exception())
            why = ""
            try:
                await asyncio.wait_for(asyncio.shield(probe), PROBE_TIMEOUT_S)
            except TimeoutError:
                why = f"no answer from {self.uri} in {PROBE_TIMEOUT_S:g} s"
            except BackendError as exc:
                why = exc.detail
            change, wait_s = health.probed(not why)
            if why and not health.up and change is None:
                log.info("libvirt host %s still down (next try in %gs): %s", self.uri, wait_s, why)
            if change == "down":
                self._host_lost(why)
            elif change == "up":
                self._down = None
                try:  # bounded: a reap stuck on the host must not hold back its return (nor the watch)
                    reaped = await asyncio.wait_for(self.reap_orphans(), REAP_ON_RETURN_TIMEOUT_S)
                except TimeoutError:
                    log.warning("libvirt host %s is back; reaping its orphans took over %g s (the periodic "
                                "reaper tries again)", self.uri, REAP_ON_RETURN_TIMEOUT_S)
                    reaped = []
                except BackendError:
                    reaped = []  # the periodic reaper, or the next start-up, tries again
                if self._on_health is not None:
                    self._on_health(True, "", reaped)
            await asyncio.sleep(wait_s)

    async def _probe(self) -> None:
        """One cheap round trip; while the host is down, also destroy what was lost on it:
        it is only "up" again once those domains are gone."""
        await self._call("probe", lambda: self._connection().getLibVersion(), executor=self._probe_executor)
        if self._down is not None:
            for name, port in list(self._abandoned.items()):
                await self._destroy(name)  # False: it died with the host, or was reaped
                self._abandoned.pop(name, None)
                self._ports.discard(port)

    def _host_lost(self, why: str) -> None:
        """Give up every instance here: their `exited` resolves, so the summoner takes them
        out of rotation; their domains go to `_abandoned`."""
        log.warning("libvirt host %s is down: %s", self.uri, why)
        self._down = why
        conn, self._conn = self._conn, None
        # Threads blocked on the dead connection are left to finish on their own (or never):
        # later calls, and the return of the host, get a fresh pool instead of queueing behind them.
        stuck, self._executor = self._executor, ThreadPoolExecutor(max_workers=4, thread_name_prefix="libvirt")
        stuck.shutdown(wait=False)
        if conn is not None:
            # Closing wakes the calls blocked on a dead path (keepalive may not have fired
            # yet, or at all): they fail now instead of holding the pool's threads for the
            # kernel's TCP timeout. On another pool: close waits for them.
            asyncio.get_running_loop().run_in_executor(None, _close_quietly, conn)
        for name, (handle, _iid) in list(self._handles.items()):
            self._handles.pop(name, None)
            self._abandoned[name] = handle.address.port
            if not handle.exited.done():
                handle.exited.set_result(f"host {self.uri} unreachable: {why}")
        if self._on_health is not None:
            self._on_health(False, why, [])

    @staticmethod
    def _owned(meta: dict[str, str]) -> bool:
        """Is the summon process that made this domain alive? Its owner lock says; a
        domain without one (older summon) or whose lock file is gone falls back to the pid."""
        alive = owner_alive(meta["owner"]) if meta.get("owner") else None
        if alive is None:
            alive = pid_alive(int(meta.get("pid", "0") or 0), meta.get("pid_start", ""))
        return alive

    async def close(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
        if self._orphaned:  # cancelled starts still in libvirt: destroy what they bring up
            await asyncio.wait(list(self._orphaned), timeout=CANCELLED_START_WAIT_S)
        for name, (handle, _iid) in list(self._handles.items()):
            try:
                await self.stop(handle)
            except BackendError:
                self._handles.pop(name, None)
        if self._watcher is not None:
            self._watcher.cancel()
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await asyncio.get_running_loop().run_in_executor(self._executor, conn.close)
        self._executor.shutdown(wait=False)
        self._probe_executor.shutdown(wait=False)
        self._background_executor.shutdown(wait=False)
        self._prio_executor.shutdown(wait=False)

    # --- snapshots -----------------------------------------------------------------------

    def snapshot_path(self, image: Image, dtype: str) -> Path:
        """One per image digest and domain type, and per remote host: its save file holds
        that host's forwarding address, and is written and read by its libvirtd."""
        where = "" if self.endpoint is None else f"-{self._address or self.endpoint[0]}"
        return image.dir / "build" / "snapshots" / f"{image.digest.removeprefix('sha256:')}-{dtype}{where}.save"

    async def save_snapshot(self, spec: InstanceSpec) -> Path:
        """Boot once, wait for HTTP, save; reused until the image digest changes."""
        image, arch = spec.image, spec.host.arch
        dtype = await self.domain_type(image, arch)
        if dtype == "test":
            raise BackendError("snapshots need QEMU; the test driver cannot run a guest")
        path = self.snapshot_path(image, dtype if arch == "x86_64" else f"{dtype}-{arch}")
        lock = self._snap_locks.setdefault(str(path), asyncio.Lock())
        async with lock:
            if path.exists():
                return path
            paths = await self._artefacts(spec)
            path.parent.mkdir(parents=True, exist_ok=True)
            self.console_dir.mkdir(parents=True, exist_ok=True)
            port = await self._choose_port(set())
            name = domain_name(f"snapshot-{spec.route.name}", uuid.uuid4().hex[:8])
            params = self._params(image, name, "snapshot", dtype, port, spec.route.name, arch, paths)
            xml = domain_xml(params)
            t0 = time.monotonic()
            await self._call(f"create {name}", lambda: self._connection().createXML(xml, 0))
            try:
                if not await http_ok(port, spec.route.health_path, max(60.0, spec.route.boot_timeout_s),
                                     self._address or "127.0.0.1"):
                    raise BackendError(f"snapshot of {image.ref}: no HTTP answer on port {port}{self._console_tail(name)}")
                tmp = path.with_name(f".{path.name}.tmp")
                await self._call(f"save {name}", lambda: self._connection().lookupByName(name).save(str(tmp)))
                os.replace(tmp, path)
            finally:
                await self._destroy(name)
                (self.console_dir / f"{name}.log").unlink(missing_ok=True)
            digest = image.digest.removeprefix("sha256:")
            for old in path.parent.glob("*"):
                if not old.name.startswith((digest, ".")):
                    old.unlink(missing_ok=True)  # an older digest's snapshot: never restored again
            meta = {"image": image.ref, "domain_type": dtype, "seconds": round(time.monotonic() - t0, 2)}
            path.with_suffix(".json").write_text(json.dumps(meta) + "\n")
            return path
