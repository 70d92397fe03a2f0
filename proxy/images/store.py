"""The content-addressed image store: every artefact by its digest, every version by its manifest's.

Why: a route may pin an image version (``decks@sha256:<manifest digest>``) that is no longer
the latest build. `build/` beside the recipe holds only the latest; the store keeps every
version until `gc` drops it, so a pin to an older one can still be served, and two builds
of the same inputs share their files instead of copying them.

Layout (``[images] store``, default ``<images dir>/.store``, never committed)::

    objects/sha256/<hex>      an artefact file, or a manifest as canonical JSON, named by
                              the sha256 of its bytes (so a manifest's object name is the
                              image version)
    trees/<hex>.json          a directory artefact (a site): [[path, size, sha256], ...],
                              named by `manifest.content_digest` of the tree it lists;
                              each file is an object
    builds/<NAME>.jsonl       one line per build of NAME: version, recipe digest, time (appended)
    followed/<NAME>           on a node that follows announcements (``[images] follow``): the
                              version of NAME it last pulled and verified, which an unpinned
                              ``image = "NAME"`` means there (written only after the pull)
    versions/<hex>/           a version laid out like an image dir (build/vmlinuz,
                              site/...), hard links to the objects: what `load_image`
                              hands to the backends for a pinned version

Writes are atomic (a temp file in the same directory, fsync, rename, fsync the directory;
the build records are single appended lines):
a crash leaves an object whole or absent, never half. Reads are verified: a manifest or a
tree is re-hashed when read, and a version's artefacts are re-hashed when it is laid out
(the backends verify them again before every boot, as for any image).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ImageError
from .canonical import DIGEST_SUFFIX, canonical_manifest

STORE_DIR = ".store"  # the default, under the images dir
_HEX = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20


def default_store(images_dir: Path) -> Path:
    return images_dir / STORE_DIR


def hex_of(digest: str) -> str:
    """``sha256:<hex>`` or ``<hex>`` -> ``<hex>``; ImageError on anything else."""
    h = digest.removeprefix("sha256:")
    if not _HEX.match(h):
        raise ImageError(f"{digest!r} is not a sha256 digest (sha256:<64 hex digits>)")
    return h


def tree_digest(listing: Iterable[tuple[str, int, str]]) -> str:
    """`manifest.content_digest` computed from a listing instead of from files."""
    h = hashlib.sha256()
    for rel, size, hexd in sorted(listing):
        name = rel.encode()
        h.update(len(name).to_bytes(8, "big") + name)
        h.update(size.to_bytes(8, "big"))
        h.update(bytes.fromhex(hexd))
    return h.hexdigest()


@dataclass(frozen=True)
class Build:
    """One line of builds/NAME.jsonl."""

    name: str
    digest: str  # sha256:<hex> of the built manifest: the version
    recipe_digest: str
    built_at: float  # unix time
    how: str = "build"  # or "rebuild", "pull"


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(dest: Path, data: bytes) -> None:
    """Temp file beside `dest`, fsync, rename, fsync the directory (ImageError if it cannot)."""
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except OSError as exc:
        raise ImageError(f"cannot write {dest}: {exc.strerror or exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(dest.parent)


class Store:
    """One store directory. Safe for several processes: every write is a rename of a
    whole file, and two writers of the same object write the same bytes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.objects = root / "objects" / "sha256"
        self.trees = root / "trees"
        self.builds_dir = root / "builds"
        self.versions = root / "versions"
        self.followed_dir = root / "followed"

    # --- objects -----------------------------------------------------------------

    def object_path(self, digest: str) -> Path:
        return self.objects / hex_of(digest)

    def has(self, digest: str) -> bool:
        return self.object_path(digest).is_file()

    def put_bytes(self, data: bytes) -> str:
        """Store `data`; return its sha256 hex. An object already present is not rewritten."""
        h = hashlib.sha256(data).hexdigest()
        dest = self.objects / h
        if not self._intact(dest, h):
            write_atomic(dest, data)
        return h

    def put_file(self, src: Path, expect: str | None = None) -> str:
        """Copy `src` into the store, hashing as it goes; return its sha256 hex.

        With `expect`, a file whose digest is not that is refused and nothing is kept."""
        tmp = self.objects / f".in.{os.getpid()}.{time.monotonic_ns()}.tmp"
        h = hashlib.sha256()
        try:
            self.objects.mkdir(parents=True, exist_ok=True)
            with src.open("rb") as fin, tmp.open("wb") as fout:
                while chunk := fin.read(_CHUNK):
                    h.update(chunk)
                    fout.write(chunk)
                fout.flush()
                os.fsync(fout.fileno())
            hexd = h.hexdigest()
            if expect is not None and hexd != expect:
                raise ImageError(f"{src}: expected sha256:{expect}, got sha256:{hexd}; not stored")
            dest = self.objects / hexd
            if not self._intact(dest, hexd):
                os.replace(tmp, dest)
                _fsync_dir(self.objects)
        except OSError as exc:
            raise ImageError(f"cannot copy {src} into the image store {self.root}: {exc.strerror or exc}"
                             f"{' (' + exc.filename + ')' if isinstance(exc.filename, str) else ''}") from exc
        finally:
            tmp.unlink(missing_ok=True)
        return hexd

    def _intact(self, path: Path, hexd: str) -> bool:
        """Present with the right bytes (a damaged object is replaced, not trusted)."""
        try:
            return _hash_file(path) == hexd
        except FileNotFoundError:
            return False

    def read_object(self, digest: str) -> bytes:
        """The bytes of an object, verified against its name."""
        hexd = hex_of(digest)
        try:
            data = (self.objects / hexd).read_bytes()
        except FileNotFoundError as exc:
            raise ImageError(f"the image store {self.root} has no object sha256:{hexd}") from exc
        if hashlib.sha256(data).hexdigest() != hexd:
            raise ImageError(f"the image store's object {self.objects / hexd} does not match its digest (damaged)")
        return data

    def verify_object(self, digest: str) -> None:
        hexd = hex_of(digest)
        path = self.objects / hexd
        try:
            actual = _hash_file(path)
        except FileNotFoundError as exc:
            raise ImageError(f"the image store {self.root} has no object sha256:{hexd}") from exc
        if actual != hexd:
            raise ImageError(f"the image store's object {path} does not match its digest: actual sha256:{actual}")

    # --- trees (directory artefacts) ------------------------------------------------

    def put_tree(self, src: Path) -> str:
        """Store every regular file under `src` and its listing; return the content digest."""
        listing = []
        for p in sorted(src.rglob("*")):
            if p.is_file():
                hexd = self.put_file(p)
                listing.append((p.relative_to(src).as_posix(), p.stat().st_size, hexd))
        listing.sort()
        digest = tree_digest(listing)
        dest = self.trees / f"{digest}.json"
        if not dest.is_file():
            write_atomic(dest, json.dumps([list(x) for x in listing], separators=(",", ":")).encode())
        return digest

    def tree(self, digest: str) -> list[tuple[str, int, str]]:
        """A tree's listing, verified against its name (the files are checked when laid out)."""
        hexd = hex_of(digest)
        path = self.trees / f"{hexd}.json"
        try:
            raw = json.loads(path.read_bytes())
            listing = [(str(r), int(s), str(h)) for r, s, h in raw]
        except FileNotFoundError as exc:
            raise ImageError(f"the image store {self.root} has no tree sha256:{hexd}") from exc
        except (OSError, ValueError, TypeError) as exc:
            raise ImageError(f"the image store's tree {path} is unreadable: {exc}") from exc
        if tree_digest(listing) != hexd:
            raise ImageError(f"the image store's tree {path} does not match its digest (damaged)")
        return listing

    def has_tree(self, digest: str) -> bool:
        return (self.trees / f"{hex_of(digest)}.json").is_file()

    # --- manifests and builds ----------------------------------------------------------

    def put_manifest(self, manifest: dict[str, Any]) -> str:
        """Store a manifest as canonical JSON; its object name is the image version."""
        return "sha256:" + self.put_bytes(canonical_manifest(manifest))

    def manifest(self, digest: str) -> dict[str, Any]:
        data = self.read_object(digest)
        try:
            manifest = json.loads(data)
        except ValueError as exc:
            raise ImageError(f"the image store's object sha256:{hex_of(digest)} is not a manifest") from exc
        if not isinstance(manifest, dict) or not isinstance(manifest.get("name"), str):
            raise ImageError(f"the image store's object sha256:{hex_of(digest)} is not a manifest")
        return manifest

    def record(self, build: Build) -> None:
        """Append a build to builds/NAME.jsonl: one write(2) of one short line with O_APPEND,
        then fsync, so two builders at once both land (a rewrite-and-rename could drop one);
        `builds` skips a line a crash may have cut."""
        line = json.dumps({"digest": build.digest, "recipe_digest": build.recipe_digest,
                           "built_at": round(build.built_at, 3), "how": build.how}, sort_keys=True)
        path = self.builds_dir / f"{build.name}.jsonl"
        try:
            self.builds_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line.encode() + b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise ImageError(f"cannot record the build in {path}: {exc.strerror or exc}") from exc

    def builds(self, name: str) -> list[Build]:
        """Builds of `name`, oldest first."""
        path = self.builds_dir / f"{name}.jsonl"
        out: list[Build] = []
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return out
        for line in lines:
            try:
                d = json.loads(line)
                out.append(Build(name, str(d["digest"]), str(d.get("recipe_digest", "")), float(d["built_at"]),
                                 str(d.get("how", "build"))))
            except (ValueError, KeyError, TypeError):
                continue  # a line damaged by hand; the rest still tell the history
        return out

    def names(self) -> list[str]:
        if not self.builds_dir.is_dir():
            return []
        return sorted(p.stem for p in self.builds_dir.glob("*.jsonl"))

    # --- followed versions (an edge's, proxy.runtime.follower) ---------------------------

    def followed(self, name: str) -> str | None:
        """The version of `name` this node follows, or None (never pulled, or a bad file)."""
        try:
            text = (self.followed_dir / name).read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            return None
        try:
            return "sha256:" + hex_of(text)
        except ImageError:
            return None

    def set_followed(self, name: str, digest: str) -> None:
        """Point `name` at a version this store holds whole (laid out and verified first)."""
        self.materialize(digest)
        write_atomic(self.followed_dir / name, f"sha256:{hex_of(digest)}\n".encode())

    def followed_names(self) -> list[str]:
        if not self.followed_dir.is_dir():
            return []
        return sorted(p.name for p in self.followed_dir.iterdir() if not p.name.startswith("."))

    # --- versions laid out for the backends ------------------------------------------

    def version_dir(self, digest: str) -> Path:
        return self.versions / hex_of(digest)

    def materialize(self, digest: str) -> Path:
        """versions/<hex>/: the version's artefacts at the paths its manifest names.

        Built once in a temp dir and renamed into place; every object is verified on the
        way. Raises ImageError naming the first artefact the store does not hold intact."""
        dest = self.version_dir(digest)
        if dest.is_dir():
            return dest
        manifest = self.manifest(digest)
        tmp = self.versions / f".{hex_of(digest)}.{os.getpid()}.{time.monotonic_ns()}.tmp"
        try:
            tmp.mkdir(parents=True)
            for target, key, rel, expected in artefact_refs(manifest):
                out = _inside(tmp, rel, f"[targets.{target}].{key}")
                if self.has(expected):
                    self.verify_object(expected)
                    _link(self.object_path(expected), out)
                elif self.has_tree(expected):
                    for frel, _size, fhex in self.tree(expected):
                        self.verify_object(fhex)
                        _link(self.object_path(fhex), _inside(out, frel, f"[targets.{target}].{key}"))
                    out.mkdir(parents=True, exist_ok=True)
                else:
                    raise ImageError(f"the image store {self.root} does not hold [targets.{target}].{key} "
                                     f"(sha256:{expected}) of {manifest['name']}@{digest}")
            try:
                os.rename(tmp, dest)
            except OSError:
                if not dest.is_dir():  # else another process laid it out first: same content
                    raise
            _fsync_dir(self.versions)
        except OSError as exc:
            raise ImageError(f"cannot lay out {digest} under {self.versions}: {exc.strerror or exc}") from exc
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return dest

    def put_version(self, manifest: dict[str, Any], image_dir: Path) -> str:
        """Store the artefacts a manifest names (read from `image_dir`, verified against the
        manifest) and the manifest itself; return the version digest."""
        self.put_artefacts(manifest, image_dir)
        return self.put_manifest(manifest)

    def put_artefacts(self, manifest: dict[str, Any], image_dir: Path, skip: tuple[str, ...] = ()) -> None:
        """Store what the manifest names (but the `skip` targets), refusing (ImageError) any
        that is not as recorded."""
        for target, key, rel, expected in artefact_refs(manifest):
            if target in skip:
                continue
            src = _inside(image_dir, rel, f"[targets.{target}].{key}")
            if src.is_dir():
                got = self.put_tree(src)
                if got != expected:
                    raise ImageError(f"{src} ([targets.{target}].{key}) has content sha256:{got}, "
                                     f"the manifest says sha256:{expected}")
            else:
                self.put_file(src, expect=expected)


def artefact_refs(manifest: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(target, key, relative path, sha256 hex) of every artefact a manifest names."""
    out = []
    for target, table in sorted(manifest.get("targets", {}).items()):
        if not isinstance(table, dict):
            continue
        for key, value in sorted(table.items()):
            if key.endswith(DIGEST_SUFFIX) and isinstance(table.get(key[: -len(DIGEST_SUFFIX)]), str):
                out.append((target, key[: -len(DIGEST_SUFFIX)], table[key[: -len(DIGEST_SUFFIX)]], hex_of(str(value))))
    return out


def _inside(base: Path, rel: str, what: str) -> Path:
    """`base / rel`, refusing a path that climbs out (a manifest from a puller's peer)."""
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts:
        raise ImageError(f"{what} = {rel!r}: an artefact path must be relative, inside the image")
    return base / p


def _link(src: Path, dest: Path) -> None:
    """A hard link (shares the bytes); a copy where the store is on another filesystem."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dest)
    except FileExistsError:
        dest.unlink()
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)


def link_into(src: Path, dest: Path) -> None:
    """Place a store object at `dest` atomically (build/ points at the latest build's objects)."""
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    _link(src, tmp)
    os.replace(tmp, dest)


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()
