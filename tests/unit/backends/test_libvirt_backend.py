"""The libvirt driver against libvirt's in-process test driver (test:///default): fast, no QEMU."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import pytest

from proxy.backends.base import InstanceSpec
from proxy.backends.libvirt_xml import (
    DomainParams,
    copy_save_with_xml,
    domain_name,
    domain_xml,
    parse_metadata,
    read_save_xml,
    retarget_xml,
)
from proxy.backends.owner import proc_start
from proxy.config import Host, Route
from proxy.errors import BackendError, ImageError
from proxy.images.manifest import content_digest, load_image
from tests.helpers.owners import holder

libvirt = pytest.importorskip("libvirt")
from proxy.backends.libvirt import LibvirtBackend  # noqa: E402

URI = "test:///default"


def make_image(root: Path) -> Path:
    """An image with fake x86_64 artefacts: the test driver never reads them, verify does."""
    d = root / "tiny"
    (d / "site").mkdir(parents=True)
    (d / "site" / "index.html").write_text("<h1>tiny</h1>\n")
    (d / "build").mkdir()
    (d / "build" / "vmlinuz").write_bytes(b"kernel")
    (d / "build" / "initrd.cpio.gz").write_bytes(b"initrd")
    import hashlib

    k = hashlib.sha256(b"kernel").hexdigest()
    i = hashlib.sha256(b"initrd").hexdigest()
    (d / "image.toml").write_text(
        f"""name = "tiny"
[targets.unix]
command = ["busybox", "httpd", "-f", "-p", "127.0.0.1:{{port}}", "-h", "{{dir}}/site"]
content = "site"
content_sha256 = "{content_digest(d / 'site')}"
[targets.x86_64]
kernel = "build/vmlinuz"
kernel_sha256 = "{k}"
initrd = "build/initrd.cpio.gz"
initrd_sha256 = "{i}"
memory_mib = 64
guest_port = 80
"""
    )
    return d


def spec(image_dir: Path, iid: str, route: str = "Decks Site/v1") -> InstanceSpec:
    image = load_image(image_dir.parent, image_dir.name)
    return InstanceSpec(iid, Route(name=route, path="/", image="tiny"), Host("h", "local", "libvirt", URI), image)


def test_domain_name_is_sanitised() -> None:
    assert domain_name("Decks Site/v1", "ab12") == "summon-decks-site-v1-ab12"
    assert domain_name("///", "x") == "summon-route-x"


def test_xml_metadata_round_trip() -> None:
    p = DomainParams("summon-a-1", "qemu", Path("/k"), Path("/i"), "console=ttyS0", 128, 80, 40001,
                     "a&b", "1", "sha256:" + "0" * 64, 123, "456", "host1", Path("/tmp/x.log"),
                     owner="/var/lib/summon/summon-owners/ab<c.lock")
    xml = domain_xml(p)
    assert "hostfwd=tcp:127.0.0.1:40001-:80" in xml and "addr=0x10" in xml
    assert "<memballoon model='none'/>" in xml
    meta = parse_metadata(xml)
    assert meta == {"route": "a&b", "id": "1", "image": "sha256:" + "0" * 64, "pid": "123",
                    "pid_start": "456", "pid_host": "host1", "port": "40001",
                    "owner": "/var/lib/summon/summon-owners/ab<c.lock"}
    q = DomainParams(**{**p.__dict__, "name": "summon-a-2", "instance_id": "2", "host_port": 40002,
                        "console_log": Path("/tmp/y.log")})
    re_xml = retarget_xml(xml.replace("<name>", "<uuid>00000000-0000-0000-0000-000000000000</uuid><name>"), q)
    assert "summon-a-2" in re_xml and "40002-:80" in re_xml and "/tmp/y.log" in re_xml
    assert "00000000-0000-0000-0000-000000000000" not in re_xml
    assert parse_metadata(re_xml)["id"] == "2"


def test_save_header_rewrite(tmp_path: Path) -> None:
    """A synthetic save image: the XML is replaced, the payload after the header is kept."""
    import struct

    xml = b"<domain><name>old</name></domain>\n\0"
    cookie = b"<cookie/>\n\0"
    data = (xml + cookie).ljust(4096, b"\0")
    head = struct.pack("<16s19I", b"LibvirtQemudSave", 2, len(data), 1, 0, len(xml), *([0] * 14))
    src = tmp_path / "a.save"
    src.write_bytes(head + data + b"PAYLOAD" * 1000)
    dst = tmp_path / "b.save"
    copy_save_with_xml(src, dst, lambda x: x.replace("old", "a-much-longer-new-name"))
    assert read_save_xml(dst) == "<domain><name>a-much-longer-new-name</name></domain>\n"
    assert dst.read_bytes().endswith(b"PAYLOAD" * 1000)
    assert dst.stat().st_size == src.stat().st_size
    assert b"<cookie/>" in dst.read_bytes()[:5000]


def test_start_stop_and_metadata(tmp_path: Path) -> None:
    image_dir = make_image(tmp_path)

    async def main() -> None:
        b = LibvirtBackend(URI)
        h1 = await b.start(spec(image_dir, "i1"))
        h2 = await b.start(spec(image_dir, "i2"))
        assert h1.address.host == "127.0.0.1" and h1.address.port != h2.address.port
        assert h1.detail["domain"] == "summon-decks-site-v1-i1" and h1.detail["domain_type"] == "test"
        conn = b._connection()
        dom = conn.lookupByName("summon-decks-site-v1-i1")
        meta = parse_metadata(dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, "https://summon.dev/xmlns/instance"))
        assert meta["route"] == "Decks Site/v1" and meta["pid"] == str(os.getpid())
        assert meta["image"] == spec(image_dir, "x").image.digest
        await b.stop(h1)
        await b.stop(h1)  # already gone: no error
        assert h1.exited.result() == "stopped"
        assert "summon-decks-site-v1-i1" not in {d.name() for d in conn.listAllDomains()}
        # a domain that dies on its own resolves `exited`
        conn.lookupByName("summon-decks-site-v1-i2").destroy()
        reason = await asyncio.wait_for(h2.exited, 3)
        assert "no longer running" in reason
        await b.close()

    asyncio.run(main())


def test_a_paused_standby_is_suspended_then_resumed_and_still_counts_as_running(tmp_path: Path) -> None:
    image_dir = make_image(tmp_path)

    async def main() -> None:
        b = LibvirtBackend(URI)
        h = await b.start(spec(image_dir, "p1"))
        dom = b._connection().lookupByName(str(h.detail["domain"]))
        await b.pause(h)
        assert dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED
        await asyncio.sleep(1.2)  # two rounds of the driver's watch: a paused domain is not a dead one
        assert not h.exited.done()
        await b.resume(h)
        assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
        await b.stop(h)
        with pytest.raises(BackendError):
            await b.resume(h)  # gone: a typed error, not libvirt's
        await b.close()

    asyncio.run(main())


def test_a_domain_started_while_the_watch_lists_domains_is_not_taken_for_dead(tmp_path: Path) -> None:
    """The list of running domains answers for the moment it was taken: a domain created
    while that call is in flight is missing from it, and must not be reported gone."""
    image_dir = make_image(tmp_path)

    async def main() -> None:
        b = LibvirtBackend(URI)
        listed, go = threading.Event(), threading.Event()
        original = b._active_names

        def held() -> set[str]:
            names = original()
            listed.set()
            go.wait(10)
            return names

        h1 = await b.start(spec(image_dir, "w1"))  # starts the watch
        b._active_names = held  # type: ignore[method-assign]
        assert await asyncio.to_thread(listed.wait, 10)
        h2 = await b.start(spec(image_dir, "w2"))  # while that list call is in flight
        b._active_names = original  # type: ignore[method-assign]
        go.set()
        for _ in range(3):  # this round, and two more of the watch
            await asyncio.sleep(0.6)
        assert not h2.exited.done(), h2.exited.result()
        assert not h1.exited.done()
        await b.close()

    asyncio.run(main())


def test_tampered_image_refuses_to_start(tmp_path: Path) -> None:
    image_dir = make_image(tmp_path)
    s = spec(image_dir, "i1")
    (image_dir / "build" / "initrd.cpio.gz").write_bytes(b"evil")

    async def main() -> None:
        b = LibvirtBackend(URI)
        with pytest.raises(ImageError, match="initrd.cpio.gz.*expected sha256:"):
            await b.start(s)
        await b.close()

    asyncio.run(main())


def test_reap_orphans(tmp_path: Path) -> None:
    """A domain is reaped once its owner's lock is free: a zombie owner (killed, not yet
    waited for) counts as dead, a live one in another process does not; domains of an
    older summon (no owner lock) fall back to the pid; all_summon takes every one."""
    image_dir = make_image(tmp_path)
    live_proc, live_lock = holder(tmp_path / "owners")
    dead_proc, dead_lock = holder(tmp_path / "owners")
    dead_proc.kill()  # and no wait(): it stays a zombie, its pid and start time in /proc
    deadline = time.monotonic() + 10
    while proc_start(dead_proc.pid)[1] != "Z" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc_start(dead_proc.pid)[1] == "Z"

    async def main() -> None:
        b = LibvirtBackend(URI, owner_dir=tmp_path / "owners")
        h = await b.start(spec(image_dir, "live"))
        conn = b._connection()
        p = b._params(spec(image_dir, "x").image, "summon-x", "x", "test", 40999, "x")
        variants = {
            "summon-zombie-owner": {"owner": dead_lock, "pid": dead_proc.pid,
                                    "pid_start": proc_start(dead_proc.pid)[0]},
            "summon-live-owner": {"owner": live_lock, "pid": live_proc.pid, "pid_start": proc_start(live_proc.pid)[0]},
            "summon-old-dead-pid": {"owner": "", "pid": 2**22 + 7, "pid_start": "1"},
            "summon-lock-gone-dead-pid": {"owner": str(tmp_path / "owners" / "gone.lock"), "pid": 2**22 + 7,
                                          "pid_start": "1"},
        }
        for name, fields in variants.items():
            conn.createXML(domain_xml(DomainParams(**{**p.__dict__, "name": name, **fields})), 0)
        other = LibvirtBackend(URI, owner_dir=tmp_path / "owners")  # same process: b's domains look owned
        assert sorted(await other.reap_orphans()) == ["summon-lock-gone-dead-pid", "summon-old-dead-pid",
                                                      "summon-zombie-owner"]
        names = {d.name() for d in conn.listAllDomains()}
        assert {"summon-live-owner", h.detail["domain"]} <= names
        assert await other.reap_orphans() == []
        # the dead owner's lock file goes once no domain names it; the live one's stays
        assert not Path(dead_lock).exists() and Path(live_lock).exists()
        assert sorted(await other.reap_orphans(all_summon=True)) == sorted([h.detail["domain"], "summon-live-owner"])
        await other.close()
        await b.close()

    try:
        asyncio.run(main())
    finally:
        for proc in (live_proc, dead_proc):
            proc.kill()
            proc.communicate()


def test_unreachable_uri_is_host_unavailable(tmp_path: Path) -> None:
    from proxy.backends.libvirt import libvirt_available
    from proxy.errors import HostUnavailable

    image_dir = make_image(tmp_path)
    uri = "qemu+unix:///system?socket=/nonexistent/sock"
    assert libvirt_available(uri) is not None
    assert libvirt_available(URI) is None

    async def main() -> None:
        b = LibvirtBackend(uri, probe_kvm=False)
        with pytest.raises(HostUnavailable):
            await b.start(spec(image_dir, "i1"))
        await b.close()

    asyncio.run(main())


def test_restore_on_test_driver_is_refused_for_snapshots(tmp_path: Path) -> None:
    image_dir = make_image(tmp_path)

    async def main() -> None:
        b = LibvirtBackend(URI)
        with pytest.raises(BackendError, match="need QEMU"):
            await b.save_snapshot(spec(image_dir, "s"))
        await b.close()

    asyncio.run(main())


def test_kvm_probe_answer_is_remembered_until_the_machine_reboots(tmp_path: Path) -> None:
    from proxy.backends.libvirt import remember_kvm_answer, remembered_kvm_answer

    answers, boot = tmp_path / "answers.json", tmp_path / "boot_id"
    boot.write_text("boot-1\n")
    assert remembered_kvm_answer("qemu:///system", answers, boot) is None  # nothing yet: probe
    remember_kvm_answer("qemu:///system", False, answers, boot)
    remember_kvm_answer("qemu+ssh://other/system", True, answers, boot)
    assert remembered_kvm_answer("qemu:///system", answers, boot) is False
    assert remembered_kvm_answer("qemu+ssh://other/system", answers, boot) is True
    boot.write_text("boot-2\n")  # rebooted: KVM may work now (or no longer)
    assert remembered_kvm_answer("qemu:///system", answers, boot) is None
    answers.write_text("{not json")
    assert remembered_kvm_answer("qemu:///system", answers, boot) is None
    remember_kvm_answer("qemu:///system", True, answers, boot)  # a broken file is replaced
    assert remembered_kvm_answer("qemu:///system", answers, boot) is True
    if os.getuid() == 0:
        os.chown(answers, 65534, 65534)  # planted by another user in /tmp: not believed
        assert remembered_kvm_answer("qemu:///system", answers, boot) is None


def test_aarch64_domain_is_the_virt_machine_without_acpi() -> None:
    """QEMU's virt board booted straight into the kernel: no UEFI, so no ACPI (libvirt
    refuses ACPI on aarch64 without a loader); an emulated CPU model under TCG."""
    p = DomainParams("summon-a-1", "qemu", Path("/k"), Path("/i"), "console=ttyAMA0", 128, 80, 40001,
                     "a", "1", "sha256:" + "0" * 64, 123, "456", "host1", None, arch="aarch64")
    xml = domain_xml(p)
    assert '<type arch="aarch64" machine="virt">hvm</type>' in xml
    assert "<acpi/>" not in xml and "<model fallback='forbid'>cortex-a57</model>" in xml
    assert "hostfwd=tcp:127.0.0.1:40001-:80" in xml  # the same user-net port forward as x86
    x86 = domain_xml(DomainParams(**{**p.__dict__, "arch": "x86_64"}))
    assert '<type arch="x86_64" machine="pc">hvm</type>' in x86 and "<acpi/>" in x86 and "<cpu" not in x86


def test_a_tb_cache_size_goes_into_the_tcg_features_only_under_tcg() -> None:
    p = DomainParams("summon-a-1", "qemu", Path("/k"), Path("/i"), "console=ttyS0", 48, 80, 40001,
                     "a", "1", "sha256:" + "0" * 64, 123, "456", "host1", None)
    assert "<tcg>" not in domain_xml(p)  # 0: QEMU's own default
    tcg = domain_xml(DomainParams(**{**p.__dict__, "tb_cache_mib": 16}))
    assert "<features><acpi/><tcg><tb-cache unit='MiB'>16</tb-cache></tcg></features>" in tcg
    assert "<tcg>" not in domain_xml(DomainParams(**{**p.__dict__, "tb_cache_mib": 16, "domain_type": "kvm"}))


def test_a_host_whose_orphan_reap_hangs_on_its_return_is_still_reported_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """The health watch's "up" waits for the reap of the returning host's orphans, but not
    for ever: a reap stuck there once left the host out of placement with no more log lines."""
    import proxy.backends.libvirt as lv
    from proxy.backends.libvirt_host import HostHealth

    monkeypatch.setattr(lv, "REAP_ON_RETURN_TIMEOUT_S", 0.05)

    async def scenario() -> list[tuple[bool, str, list[str]]]:
        b = LibvirtBackend(URI)
        seen: list[tuple[bool, str, list[str]]] = []

        async def answers() -> None:
            return None

        async def hangs(all_summon: bool = False) -> list[str]:
            await asyncio.sleep(3600)
            return []

        monkeypatch.setattr(b, "_probe", answers)
        monkeypatch.setattr(b, "reap_orphans", hangs)
        b._on_health = lambda up, why, reaped: seen.append((up, why, reaped))
        health = HostHealth()
        health.up = False  # it was down: the first answer is its return
        task = asyncio.ensure_future(b._watch_host_once(health))
        for _ in range(100):
            if seen:
                break
            await asyncio.sleep(0.02)
        task.cancel()
        return seen

    assert asyncio.run(scenario()) == [(True, "", [])]


def test_a_background_domain_carries_the_least_cpu_share_and_a_restored_copy_its_own() -> None:
    """A pre-summon's domain is born with `<cputune><shares>`; a restore's XML (the saved
    domain's, which had none, or another instance's share) gets the instance's own, or none."""
    p = DomainParams("summon-a-1", "qemu", Path("/k"), Path("/i"), "console=ttyS0", 128, 80, 40001,
                     "a", "1", "sha256:" + "0" * 64, 123, "456", "host1", None)
    assert "<cputune>" not in domain_xml(p)
    bg = DomainParams(**{**p.__dict__, "cpu_shares": 2})
    assert "<vcpu>1</vcpu><cputune><shares>2</shares></cputune>" in domain_xml(bg)
    saved = domain_xml(p).replace("<vcpu>1</vcpu>", "<vcpu placement='static'>1</vcpu>")  # as libvirt writes it
    restored = retarget_xml(saved, bg)
    assert "<vcpu placement='static'>1</vcpu><cputune><shares>2</shares></cputune>" in restored
    assert retarget_xml(restored, p).count("<cputune>") == 0  # a request's restore: libvirt's default share
    assert retarget_xml(restored, bg).count("<cputune>") == 1


def test_a_start_cancelled_while_libvirt_creates_its_domain_destroys_it_once_up(tmp_path: Path) -> None:
    """Summon stopping, or a booting pre-summon reclaimed, cancels a start whose createXML
    is still running in its thread: the domain it brings up has no handle to stop it by,
    so the driver destroys it when the call returns (and `close` waits for that) instead
    of leaving it running until some later summon reaps it."""
    image_dir = make_image(tmp_path)

    async def main() -> None:
        b = LibvirtBackend(URI)
        conn = b._connection()
        entered, go = threading.Event(), threading.Event()

        class Slow:
            def __getattr__(self, name: str) -> object:
                return getattr(conn, name)

            def createXML(self, xml: str, flags: int) -> object:  # noqa: N802 - libvirt's name
                entered.set()
                go.wait(10)
                return conn.createXML(xml, flags)

        b._connection = lambda: Slow()  # type: ignore[method-assign]
        name = domain_name("Decks Site/v1", "c1")
        start = asyncio.ensure_future(b.start(spec(image_dir, "c1")))
        assert await asyncio.to_thread(entered.wait, 10)
        start.cancel()
        with pytest.raises(asyncio.CancelledError):
            await start
        go.set()  # the create returns now, after its start was given up
        for _ in range(50):
            await asyncio.sleep(0.05)
            if name not in {d.name() for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)}:
                break
        assert name not in {d.name() for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)}
        # and at close, a create still in flight is waited for and destroyed
        entered.clear()
        go.clear()
        late = asyncio.ensure_future(b.start(spec(image_dir, "c2")))
        assert await asyncio.to_thread(entered.wait, 10)
        late.cancel()
        with pytest.raises(asyncio.CancelledError):
            await late
        destroyed: list[tuple[str, bool]] = []
        destroy = b._destroy

        async def spy(n: str) -> bool:
            gone = await destroy(n)
            destroyed.append((n, gone))
            return gone

        b._destroy = spy  # type: ignore[method-assign]
        asyncio.get_running_loop().call_later(0.2, go.set)
        await b.close()
        assert destroyed == [(domain_name("Decks Site/v1", "c2"), True)] and not b._orphaned

    asyncio.run(main())
