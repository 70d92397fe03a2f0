"""Domain XML and save-file surgery for the libvirt driver (no libvirt import: pure text).

Why a separate module: these are the parts worth unit-testing without a hypervisor.

Networking (libvirt 9.0, measured): no passt and no ``<portForward>``, so the NIC is
QEMU user networking with a ``hostfwd`` rule, passed through ``<qemu:commandline>``,
with an explicit PCI slot so libvirt's own device placement cannot collide with it.
The rule binds the guest's port on the hypervisor host at `DomainParams.host_address`:
127.0.0.1 for a local libvirtd, an address of that host that proxies can reach for a
remote one (QEMU runs there, so that is where it binds).

Restoring one snapshot many times: libvirt refuses a restore XML whose UUID differs from
the saved one ("Target domain uuid ... does not match source"), and two domains cannot
share a UUID. But the domain XML lives in the save file's header (a padded region in
front of QEMU's migration stream) and libvirt only checks *caller-supplied* XML. So each
restore gets its own copy of the save file with a rewritten header: new name, UUID,
forwarded port and metadata. The copy uses copy_file_range (a reflink or an in-kernel
copy: ~0.05 s for 90 MB here) and is deleted once QEMU has read it.
"""

from __future__ import annotations

import html
import os
import re
import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

NS = "https://summon.dev/xmlns/instance"
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
NIC_PCI_SLOT = "0x10"  # far from the slots libvirt assigns to its own devices

# libvirt's qemu save header (src/qemu/qemu_saveimage.h): magic, version, data_len,
# was_running, compressed, cookieOffset, 14 unused uint32 — then data_len bytes holding
# the NUL-terminated domain XML, the NUL-terminated cookie, and zero padding.
_SAVE_MAGIC = b"LibvirtQemudSave"
_SAVE_HEADER = struct.Struct("<16s19I")


@dataclass(frozen=True)
class DomainParams:
    name: str
    domain_type: str  # "kvm", "qemu" or "test" (libvirt's in-process test driver)
    kernel: Path
    initrd: Path
    cmdline: str
    memory_mib: int
    guest_port: int
    host_port: int
    route: str
    instance_id: str
    image_digest: str
    pid: int
    pid_start: str  # the process start time, so a reused pid is not mistaken for us
    hostname: str
    console_log: Path | None = None  # None: a null serial (remote: the path would be the host's)
    host_address: str = "127.0.0.1"  # where the forwarded port binds, on the hypervisor host
    owner: str = ""  # the owner lock file (`proxy.backends.owner`): held while summon lives
    arch: str = "x86_64"  # or "aarch64": QEMU's virt machine (qemu-system-aarch64)
    tb_cache_mib: int = 0  # TCG's translation buffer (QEMU's tb-size); 0: QEMU's default
    cpu_shares: int | None = None  # a background start's cgroup CPU share (<cputune>); None: libvirt's default


# Per guest arch: the machine, and what goes in <os>/<cpu>/<features>. aarch64 is QEMU's
# `virt` board booted straight into the kernel (no UEFI, so no ACPI: the kernel reads the
# device tree QEMU generates); under TCG a cortex-a57 is emulated faster than `max`, whose
# pointer authentication costs every function return.
MACHINES = {"x86_64": "pc", "aarch64": "virt"}
AARCH64_CPU = "cortex-a57"


def sanitise(text: str, limit: int = 40) -> str:
    """A route name as a domain-name fragment: lowercase [a-z0-9-], bounded length."""
    out = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return out[:limit].rstrip("-") or "route"


def domain_name(route: str, instance_id: str) -> str:
    return f"summon-{sanitise(route)}-{sanitise(instance_id, 24)}"


def metadata_xml(p: DomainParams) -> str:
    return (
        f"<summon:instance xmlns:summon={quoteattr(NS)}>"
        f"<summon:route>{escape(p.route)}</summon:route>"
        f"<summon:id>{escape(p.instance_id)}</summon:id>"
        f"<summon:image>{escape(p.image_digest)}</summon:image>"
        f"<summon:pid start={quoteattr(p.pid_start)} host={quoteattr(p.hostname)}>{p.pid}</summon:pid>"
        f"<summon:port>{p.host_port}</summon:port>"
        f"<summon:owner>{escape(p.owner)}</summon:owner>"
        "</summon:instance>"
    )


def domain_xml(p: DomainParams) -> str:
    """A transient microVM: direct kernel boot, no disk, one virtio NIC, no balloon."""
    qemu = p.domain_type != "test"
    devices = "<controller type='usb' model='none'/><memballoon model='none'/>"
    if qemu and p.console_log is not None:
        log = quoteattr(str(p.console_log))
        devices = f"<serial type='file'><source path={log}/><target port='0'/></serial>" + devices
    elif qemu:
        devices = "<serial type='null'><target port='0'/></serial>" + devices
    commandline = ""
    if qemu:
        netdev = f"user,id=summonnet,hostfwd=tcp:{p.host_address}:{p.host_port}-:{p.guest_port}"
        nic = f"virtio-net-pci,netdev=summonnet,addr={NIC_PCI_SLOT}"
        commandline = (
            "<qemu:commandline>"
            f"<qemu:arg value='-netdev'/><qemu:arg value={quoteattr(netdev)}/>"
            f"<qemu:arg value='-device'/><qemu:arg value={quoteattr(nic)}/>"
            "</qemu:commandline>"
        )
    ns = f" xmlns:qemu={quoteattr(QEMU_NS)}" if qemu else ""
    return (
        f"<domain type={quoteattr(p.domain_type)}{ns}>"
        f"<name>{escape(p.name)}</name>"
        f"<metadata>{metadata_xml(p)}</metadata>"
        f"<memory unit='MiB'>{p.memory_mib}</memory><vcpu>1</vcpu>{_cputune(p)}"
        f"<os><type arch={quoteattr(p.arch)} machine={quoteattr(MACHINES[p.arch])}>hvm</type>"
        f"<kernel>{escape(str(p.kernel))}</kernel><initrd>{escape(str(p.initrd))}</initrd>"
        f"<cmdline>{escape(p.cmdline)}</cmdline></os>"
        f"{_cpu_features(p)}"
        "<on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>"
        f"<devices>{devices}</devices>{commandline}</domain>"
    )


def _cputune(p: DomainParams) -> str:
    return f"<cputune><shares>{p.cpu_shares}</shares></cputune>" if p.cpu_shares is not None else ""


def _cpu_features(p: DomainParams) -> str:
    tcg = f"<tcg><tb-cache unit='MiB'>{p.tb_cache_mib}</tb-cache></tcg>" if p.tb_cache_mib and p.domain_type == "qemu" \
        else ""
    if p.arch == "x86_64":
        return f"<features><acpi/>{tcg}</features>"
    if p.domain_type == "kvm":
        return "<cpu mode='host-passthrough'/><features><gic version='host'/></features>"
    return f"<cpu mode='custom' match='exact'><model fallback='forbid'>{AARCH64_CPU}</model></cpu>"


def parse_metadata(xml: str) -> dict[str, str]:
    """Fields of summon's metadata element (as returned by ``dom.metadata(ELEMENT, NS)``)."""
    out: dict[str, str] = {}
    for tag in ("route", "id", "image", "pid", "port", "owner"):
        m = re.search(rf"<(?:\w+:)?{tag}\b([^>]*)>([^<]*)</", xml)
        if m:
            out[tag] = html.unescape(m.group(2))
            if tag == "pid":
                for attr in ("start", "host"):
                    a = re.search(rf"\b{attr}=['\"]([^'\"]*)['\"]", m.group(1))
                    if a:
                        out[f"pid_{attr}"] = html.unescape(a.group(1))
    return out


def retarget_xml(xml: str, p: DomainParams) -> str:
    """The saved domain's XML, made into instance `p`: name, UUID, address and port, log,
    CPU share, metadata. (A snapshot saved on one host can be restored on another: its hostfwd
    address is rewritten too.)"""
    xml = re.sub(r"<name>[^<]*</name>", f"<name>{escape(p.name)}</name>", xml, count=1)
    xml = re.sub(r"<uuid>[^<]*</uuid>", f"<uuid>{uuid.uuid4()}</uuid>", xml, count=1)
    xml, n = re.subn(r"hostfwd=tcp:[0-9.]*:\d+-:", f"hostfwd=tcp:{p.host_address}:{p.host_port}-:", xml)
    if n != 1:
        raise ValueError("saved domain XML has no single hostfwd rule to retarget")
    if p.console_log is not None:
        xml = re.sub(r"(<source path=)(['\"])[^'\"]*\.log\2", lambda m: f"{m.group(1)}{quoteattr(str(p.console_log))}", xml)
    xml = re.sub(r"\s*<cputune>.*?</cputune>", "", xml, count=1, flags=re.S)  # the snapshot's domain had none
    if p.cpu_shares is not None:
        xml, n = re.subn(r"(<vcpu\b[^>]*>[^<]*</vcpu>)", lambda m: m.group(1) + _cputune(p), xml, count=1)
        if n != 1:
            raise ValueError("saved domain XML has no <vcpu> to put a CPU share after")
    xml = re.sub(
        r"<(\w+:)?instance xmlns(:\w+)?=['\"]" + re.escape(NS) + r"['\"].*?</\1instance>",
        lambda _: metadata_xml(p),
        xml,
        count=1,
        flags=re.S,
    )
    return xml


def read_save_xml(path: Path) -> str:
    with path.open("rb") as f:
        magic, _ver, data_len, _run, _comp, cookie_off, *_ = _SAVE_HEADER.unpack(f.read(_SAVE_HEADER.size))
        if magic != _SAVE_MAGIC:
            raise ValueError(f"{path} is not a libvirt qemu save image")
        data = f.read(data_len)
    return data[:cookie_off].split(b"\0", 1)[0].decode()


def copy_save_with_xml(src: Path, dst: Path, transform: Callable[[str], str]) -> None:
    """Copy save image `src` to `dst`, replacing the domain XML in its header."""
    with src.open("rb") as f, open(dst, "wb", opener=lambda p, fl: os.open(p, fl, 0o600)) as g:
        magic, ver, data_len, running, compressed, cookie_off, *unused = _SAVE_HEADER.unpack(f.read(_SAVE_HEADER.size))
        if magic != _SAVE_MAGIC or compressed != 0:
            raise ValueError(f"{src} is not an uncompressed libvirt qemu save image")
        data = f.read(data_len)
        xml = data[:cookie_off].split(b"\0", 1)[0].decode()
        cookie = data[cookie_off:].split(b"\0", 1)[0]
        new_xml = transform(xml).encode() + b"\0"
        new_data = new_xml + cookie + b"\0"
        if len(new_data) > data_len:
            raise ValueError(f"rewritten XML does not fit the {data_len}-byte header of {src}")
        g.write(_SAVE_HEADER.pack(magic, ver, data_len, running, compressed, len(new_xml), *unused))
        g.write(new_data.ljust(data_len, b"\0"))
        g.flush()
        offset = _SAVE_HEADER.size + data_len
        remaining = os.fstat(f.fileno()).st_size - offset
        while remaining > 0:
            n = os.copy_file_range(f.fileno(), g.fileno(), remaining, offset)
            if n == 0:
                raise ValueError(f"{src} ended early")
            offset += n
            remaining -= n
