"""`summon images push`: artefacts into a libvirt host's storage pool over the stream API
(virStorageVolUpload), verified on arrival; a tampered upload refused; a host with
`pool` boots from its volumes. Against the machine's libvirtd, in a transient dir pool
(test:///default has pools but no upload)."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.paths import REPO
from tests.helpers.summon_proc import Summon, http_get
from tests.helpers.vm_images import URI, copy_decks, libvirt_up, on_host, vm_marks

pytestmark = vm_marks(300)


@pytest.fixture(scope="module")
def built() -> Iterator[Path]:
    from proxy.images.build import build_image

    libvirt_up()
    root = copy_decks("summon-push-")
    try:
        build_image(root / "decks", print)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pool() -> Iterator[tuple[str, Path]]:
    """A transient dir pool of our own on the shared libvirtd: gone when destroyed."""
    import libvirt

    name = f"summon-test-{uuid.uuid4().hex[:8]}"
    where = Path(tempfile.mkdtemp(prefix="summon-pool-", dir="/var/tmp"))
    where.chmod(0o755)
    conn = libvirt.open(URI)
    p = conn.storagePoolCreateXML(f"<pool type='dir'><name>{name}</name><target><path>{where}</path></target></pool>", 0)
    try:
        yield name, where
    finally:
        for vol in p.listAllVolumes():
            vol.delete(0)
        p.destroy()
        conn.close()
        shutil.rmtree(where, ignore_errors=True)


def config(tmp: Path, images: Path, pool: str) -> Path:
    cfg = tmp / "push.toml"
    cfg.write_text(f'[images]\ndir = "{images}"\n[[host]]\nname = "edge"\nbackend = "libvirt"\nuri = "{URI}"\n'
                   f'pool = "{pool}"\nkvm_probe = false\n')
    return cfg


def summon(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy.cli", *argv], capture_output=True, text=True, timeout=120,
                          cwd=REPO)


def test_push_uploads_verifies_and_skips_what_is_there(tmp_path: Path, built: Path, pool: tuple[str, Path]) -> None:
    from proxy.images.manifest import load_image

    name, where = pool
    cfg = config(tmp_path, built, name)
    r = summon("images", "push", "decks", "--host", "edge", "-c", str(cfg))
    assert r.returncode == 0, r.stderr
    print(r.stdout.strip().splitlines()[-1])
    image = load_image(built, "decks")
    for _key, path, hexd in image.artefacts("x86_64"):
        on_host = where / f"sha256-{hexd}"
        assert hashlib.sha256(on_host.read_bytes()).hexdigest() == hexd == hashlib.sha256(path.read_bytes()).hexdigest()
    again = summon("images", "push", "decks", "--host", "edge", "-c", str(cfg))
    assert again.returncode == 0 and "0 of 2 artefact(s) uploaded" in again.stdout, again.stdout + again.stderr
    bad = summon("images", "push", "decks", "--host", "nowhere", "-c", str(cfg))
    assert bad.returncode == 2 and "--host 'nowhere'" in bad.stderr


def test_a_tampered_upload_is_refused_and_deleted(built: Path, pool: tuple[str, Path]) -> None:
    from proxy.backends.libvirt_pool import file_chunks, push
    from proxy.errors import BackendError
    from proxy.images.manifest import load_image

    name, where = pool
    image = load_image(built, "decks")
    artefacts = [(path, hexd) for _k, path, hexd in image.artefacts("x86_64")]

    def flipped(path: Path) -> Iterator[bytes]:  # one bit changed on the way
        for i, chunk in enumerate(file_chunks(path)):
            yield bytes([chunk[0] ^ 1]) + chunk[1:] if i == 0 else chunk

    with pytest.raises(BackendError, match="refused"):
        push(URI, name, artefacts, print, chunks=flipped)
    assert list(where.iterdir()) == []  # nothing of it stays in the pool


def test_a_host_with_a_pool_boots_from_its_volumes(tmp_path: Path, built: Path, pool: tuple[str, Path]) -> None:
    name, where = pool
    r = summon("images", "push", "decks", "--host", "edge", "-c", str(config(tmp_path, built, name)))
    assert r.returncode == 0, r.stderr
    route = '[[route]]\nname = "decks"\npath = "/"\nimage = "decks"\nboot_timeout = "120s"\n'
    host = (f'[[host]]\nname = "edge"\nbackend = "libvirt"\nuri = "{URI}"\npool = "{name}"\nkvm_probe = false\n')
    for attempt, damaged in enumerate((False, True)):
        d = tmp_path / f"run{attempt}"
        d.mkdir()
        s = on_host(Summon(d, route), built, host)
        if damaged:  # someone changes a volume on the host: the next summon hashes it there and refuses
            initrd = next(p for p in where.iterdir() if p.stat().st_size < 5_000_000)
            with initrd.open("ab") as f:
                f.write(b"\0")
        s.start()
        try:
            t0 = time.monotonic()
            status, _, body = http_get(s.port, "/", timeout=150)
            if not damaged:
                assert status == 200, body[:300]
                print(f"cold request from pool volumes: {time.monotonic() - t0:.1f}s")
                (inst,) = s.instances()
                xml = subprocess.run(["virsh", "-c", URI, "dumpxml", f"summon-decks-{inst['id']}"],
                                     capture_output=True, text=True, check=True).stdout
                assert f"<kernel>{where}/sha256-" in xml and f"<initrd>{where}/sha256-" in xml
            else:
                assert status == 503 and b"refused" in body, body[:300]
        finally:
            s.stop()
