"""Push image artefacts into a libvirt host's storage pool over libvirt's stream API.

Why: a remote host (an arm64 board at the edge) boots from files on *its* disk, and the
centre reaches it only through its libvirtd. `virStorageVolUpload` streams bytes over the
same connection the driver already uses, so no ssh, scp or shared filesystem is needed.

Every artefact becomes a volume named by its digest (``sha256-<hex>``): the same bytes
are uploaded once however many images and versions share them. On arrival the volume is
read back over a download stream and hashed; a volume whose bytes are not its name (a
damaged transfer, or someone else's file under that name) is deleted and the push fails,
so what a host boots from a pool was checked there, not only here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from ..errors import BackendError, HostUnavailable

try:
    import libvirt
except ImportError:  # pragma: no cover - exercised only where libvirt-python is missing
    libvirt = None

if libvirt is not None:  # translated into our errors instead of printed (as in libvirt.py)
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

CHUNK = 1 << 20
VOLUME_PREFIX = "sha256-"


@dataclass(frozen=True)
class Pushed:
    name: str  # the volume's name, sha256-<hex>
    path: str  # where it is on the host (what a domain XML on that host names)
    size: int
    uploaded: bool  # False: the host already had it, intact


def volume_name(hexdigest: str) -> str:
    return f"{VOLUME_PREFIX}{hexdigest}"


def _volume_hash(conn: Any, vol: Any) -> str:
    """sha256 of a volume's bytes, read back through a download stream."""
    h = hashlib.sha256()
    stream = conn.newStream(0)
    vol.download(stream, 0, 0)
    stream.recvAll(lambda _s, buf, _o: h.update(buf), None)
    stream.finish()
    return h.hexdigest()


def _upload(conn: Any, vol: Any, path: Path, size: int, chunks: Callable[[Path], Any]) -> None:
    stream = conn.newStream(0)
    vol.upload(stream, 0, size)
    try:
        for chunk in chunks(path):
            stream.send(chunk)
        stream.finish()
    except BaseException:
        try:
            stream.abort()
        except libvirt.libvirtError:
            pass
        raise


def file_chunks(path: Path) -> Any:
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk


def push(uri: str, pool_name: str, artefacts: list[tuple[Path, str]], progress: Callable[[str], None],
         chunks: Callable[[Path], Any] = file_chunks) -> list[Pushed]:
    """Upload each (local path, sha256 hex) into pool `pool_name` on `uri`, verified there.

    `chunks` yields a file's bytes (a test hands in one that alters them in transit)."""
    if libvirt is None:
        raise HostUnavailable("libvirt-python is not installed (pip install summon[libvirt])")
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise HostUnavailable(f"cannot connect to {uri}: {exc}") from exc
    try:
        try:
            pool = conn.storagePoolLookupByName(pool_name)
        except libvirt.libvirtError as exc:
            raise BackendError(f"{uri}: no storage pool {pool_name!r} ({exc}): define one, e.g. "
                               f"virsh pool-define-as {pool_name} dir --target /var/lib/libvirt/summon && "
                               f"virsh pool-start {pool_name}") from exc
        out = []
        for path, hexd in artefacts:
            out.append(_push_one(conn, pool, uri, pool_name, path, hexd, progress, chunks))
        return out
    except libvirt.libvirtError as exc:
        raise BackendError(f"{uri}: pushing into pool {pool_name!r}: {exc}") from exc
    finally:
        conn.close()


def _push_one(conn: Any, pool: Any, uri: str, pool_name: str, path: Path, hexd: str,
              progress: Callable[[str], None], chunks: Callable[[Path], Any]) -> Pushed:
    name = volume_name(hexd)
    size = path.stat().st_size
    try:
        vol = pool.storageVolLookupByName(name)
    except libvirt.libvirtError:
        vol = None
    if vol is not None:
        if _volume_hash(conn, vol) == hexd:
            progress(f"{name[:23]}... already in {pool_name} on {uri}, intact")
            return Pushed(name, vol.path(), size, False)
        progress(f"{name[:23]}... in {pool_name} on {uri} does not match its name: replacing it")
        vol.delete(0)
    xml = (f"<volume><name>{escape(name)}</name><capacity unit='bytes'>{size}</capacity>"
           "<target><format type='raw'/><permissions><mode>0644</mode></permissions></target></volume>")
    vol = pool.createXML(xml, 0)
    try:
        _upload(conn, vol, path, size, chunks)
        got = _volume_hash(conn, vol)
    except BaseException:
        vol.delete(0)
        raise
    if got != hexd:
        vol.delete(0)
        raise BackendError(f"{uri}: {path.name} arrived in pool {pool_name!r} as sha256:{got}, not sha256:{hexd}: "
                           "refused (the volume is deleted)")
    progress(f"uploaded {path.name} ({size // 1024} KiB) to {pool_name} on {uri} as {name[:23]}..., verified")
    return Pushed(name, vol.path(), size, True)


def verified_paths(conn: Any, pool_name: str, artefacts: list[tuple[str, str]],
                   checked: dict[tuple[str, str], str]) -> dict[str, str]:
    """key -> the host-side path of each (key, sha256 hex) artefact's volume in the pool.

    A volume is hashed (read back over a stream) the first time this process uses it, and
    remembered in `checked`; a missing or damaged one refuses the boot (BackendError)."""
    out: dict[str, str] = {}
    pool = None
    for key, hexd in artefacts:
        hit = checked.get((pool_name, hexd))
        if hit is None:
            if pool is None:
                try:
                    pool = conn.storagePoolLookupByName(pool_name)
                except libvirt.libvirtError as exc:
                    raise BackendError(f"no storage pool {pool_name!r} on the host: {exc}") from exc
            try:
                vol = pool.storageVolLookupByName(volume_name(hexd))
            except libvirt.libvirtError as exc:
                raise BackendError(f"pool {pool_name!r} has no {volume_name(hexd)[:23]}... ({key}): "
                                   "run `summon images push` for this host first") from exc
            got = _volume_hash(conn, vol)
            if got != hexd:
                raise BackendError(f"pool {pool_name!r}: volume {volume_name(hexd)[:23]}... ({key}) holds "
                                   f"sha256:{got}: refused")
            hit = checked[(pool_name, hexd)] = vol.path()
        out[key] = hit
    return out
