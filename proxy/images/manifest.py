"""Image manifests (`images/NAME/image.toml`), their digests, and artefact verification.

Why: a route names an image; the proxy must know *exactly* what it boots. The manifest
lists, per target (``unix``: a command; ``x86_64``: kernel + initrd), every artefact with
its sha256. The image digest is a hash over a canonical form of the whole manifest, so
pinning a route to ``name@sha256:...`` also pins every artefact the manifest names, and
`Image.verify` proves the files on disk are still those artefacts.

Two files, so that building never edits what is committed:
- ``NAME/image.toml`` is the recipe, written by people: the unix target, the site, and
  any knobs of the microVM (``[targets.x86_64]`` cmdline, memory_mib, guest_port).
- ``NAME/build/image.toml`` is what `summon images build` wrote next to its artefacts
  (build/ is not committed): the recipe's tables plus the built ``[targets.x86_64]``
  and a ``[build]`` table (packages, kernel, and ``recipe_digest``, the digest of the
  recipe it was built from). When that digest is the recipe's current one, the built
  manifest *is* the image; when the recipe changed since, the build is stale and the
  image is the recipe alone (no x86_64 target until it is built again).

Loading is on the request path (a cold route resolves its image per boot), so manifests
are cached by (path, mtime, size) and artefact hashes by (path, size, mtime): a file that
is rewritten gets a new mtime and is hashed again; an untouched 30 MB kernel is not.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ImageError
from .canonical import DIGEST_SUFFIX, manifest_digest

MANIFEST = "image.toml"
BUILD_DIR = "build"  # under the image dir; `summon images build` writes only here
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_PIN = re.compile(r"^(?P<ref>.+?)@(?P<digest>sha256:[0-9a-f]{64})$")

_lock = threading.Lock()
_manifest_cache: dict[tuple[str, int, int, int, int], Image] = {}  # recipe and build/image.toml stats
_file_hash_cache: dict[tuple[int, int, int, int], str] = {}
_stored_cache: dict[tuple[str, str], Image] = {}  # (store, pin): versions in the store never change


@dataclass(frozen=True)
class Image:
    """One loaded manifest. `manifest` is the raw TOML table; treat it as read-only."""

    name: str
    dir: Path
    manifest: dict[str, Any]
    digest: str  # "sha256:<hex>" over canonical_manifest(manifest)
    file: Path | None = None  # the manifest this was read from: the recipe or build/image.toml
    stale: str = ""  # why a build/image.toml next to the recipe was not used, if one was not

    @property
    def ref(self) -> str:
        """The pinned reference, e.g. ``decks@sha256:ab12...``, for logs and events."""
        return f"{self.name}@{self.digest}"

    def targets(self) -> list[str]:
        return sorted(self.manifest.get("targets", {}))

    def target(self, name: str) -> dict[str, Any]:
        table = self.manifest.get("targets", {}).get(name)
        if not isinstance(table, dict):
            have = ", ".join(self.targets()) or "none"
            hint = " (run `summon images build " + self.name + "`)" if name != "unix" else ""
            if self.stale and name != "unix":
                hint += f"; {self.stale}"
            file = self.file or self.dir / MANIFEST
            raise ImageError(f"image {self.name!r} ({file}) has no target {name!r} (has: {have}){hint}")
        return table

    def path(self, target: str, key: str) -> Path:
        """An artefact path of a target (relative paths are relative to the image dir)."""
        value = self.target(target).get(key)
        if not isinstance(value, str):
            raise ImageError(f"image {self.name!r}: [targets.{target}].{key} must be a path string")
        return self.dir / value

    def unix_command(self, port: int) -> list[str]:
        """The unix target's argv with ``{port}`` and ``{dir}`` substituted.

        Plain `str.replace`, not `str.format`: an argument may legitimately hold braces.
        """
        command = self.target("unix").get("command")
        if not isinstance(command, list) or not command or not all(isinstance(a, str) for a in command):
            raise ImageError(f"image {self.name!r}: [targets.unix].command must be a non-empty list of strings")
        return [a.replace("{port}", str(port)).replace("{dir}", str(self.dir)) for a in command]

    def artefacts(self, target: str) -> list[tuple[str, Path, str]]:
        """(key, path, expected hex digest) for each ``KEY`` that has a ``KEY_sha256`` sibling."""
        table = self.target(target)
        out: list[tuple[str, Path, str]] = []
        for key, expected in sorted(table.items()):
            if not key.endswith(DIGEST_SUFFIX):
                continue
            base = key[: -len(DIGEST_SUFFIX)]
            if base not in table:
                raise ImageError(f"image {self.name!r}: [targets.{target}].{key} has no '{base}' path next to it")
            if not isinstance(expected, str) or not re.fullmatch(r"[0-9a-f]{64}", expected):
                raise ImageError(f"image {self.name!r}: [targets.{target}].{key} is not a sha256 hex digest")
            out.append((base, self.path(target, base), expected))
        return out

    def verify(self, target: str) -> None:
        """Recompute every artefact digest of `target`; raise `ImageError` on the first mismatch."""
        for key, path, expected in self.artefacts(target):
            actual = artefact_digest(path, image=self.name)
            if actual != expected:
                raise ImageError(
                    f"image {self.name!r}: {path} ([targets.{target}].{key}) does not match its digest: "
                    f"expected sha256:{expected}, actual sha256:{actual}"
                )


def file_digest(path: Path, st: os.stat_result | None = None) -> str:
    """sha256 hex of a file, cached by (device, inode, size, mtime_ns) so re-verification
    is cheap. By inode, not path: the store's copy of a build is a hard link to it, so the
    files `summon serve` verifies at start are the ones its first boot verifies again
    (keyed by path, that first cold start hashed the kernel anew: some 50 ms)."""
    st = st or path.stat()
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    with _lock:
        hit = _file_hash_cache.get(key)
    if hit is not None:
        return hit
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    digest = h.hexdigest()
    with _lock:
        _file_hash_cache[key] = digest
    return digest


def content_digest(dir: Path) -> str:
    """sha256 hex over the sorted (relative path, bytes) of every regular file under `dir`.

    Each path and body is length-prefixed so that no two different trees hash the same
    (``a`` + ``bc`` vs ``ab`` + ``c``). Modes and mtimes are left out on purpose: a fresh
    checkout must produce the committed digest.
    """
    if not dir.is_dir():
        raise ImageError(f"content directory {dir} does not exist")
    files: list[tuple[str, Path, os.stat_result]] = []
    stack = [(dir, "")]
    while stack:  # scandir, one stat per file: this runs before every boot
        base, prefix = stack.pop()
        with os.scandir(base) as entries:
            for e in entries:
                rel = prefix + e.name
                if e.is_dir(follow_symlinks=True):
                    stack.append((Path(e.path), rel + "/"))
                elif e.is_file(follow_symlinks=True):
                    files.append((rel, Path(e.path), e.stat(follow_symlinks=True)))
    files.sort(key=lambda f: f[0])
    h = hashlib.sha256()
    for rel, path, st in files:
        name = rel.encode()
        h.update(len(name).to_bytes(8, "big") + name)
        h.update(st.st_size.to_bytes(8, "big"))
        h.update(bytes.fromhex(file_digest(path, st)))
    return h.hexdigest()


def artefact_digest(path: Path, image: str = "?") -> str:
    """Digest of an artefact: a file's sha256, or `content_digest` for a directory."""
    try:
        return content_digest(path) if path.is_dir() else file_digest(path)
    except FileNotFoundError as exc:
        raise ImageError(f"image {image!r}: artefact {path} is missing") from exc
    except OSError as exc:
        raise ImageError(f"image {image!r}: cannot read artefact {path}: {exc.strerror or exc}") from exc


def _resolve(images_dir: Path, ref: str) -> Path:
    """A bare name is looked up under `images_dir`; anything with a slash is a path."""
    if "/" in ref or ref.startswith("."):
        candidates = [Path(ref)] if Path(ref).is_absolute() else [Path(ref), images_dir / ref]
        for c in candidates:
            if (c / MANIFEST).is_file():
                return c
        raise ImageError(f"no image at {ref!r} (looked for {' and '.join(str(c / MANIFEST) for c in candidates)})")
    if not _NAME.match(ref):
        raise ImageError(f"{ref!r} is not an image name")
    path = images_dir / ref
    if not (path / MANIFEST).is_file():
        raise ImageError(f"no image named {ref!r} (looked for {path / MANIFEST})")
    return path


def read_manifest(image_dir: Path) -> dict[str, Any]:
    """Parse and shape-check the recipe `image_dir/image.toml` (uncached: for builders and the CLI)."""
    return read_manifest_file(image_dir / MANIFEST)


def built_manifest_file(image_dir: Path) -> Path:
    """Where `summon images build` records what it built: `image_dir/build/image.toml`."""
    return image_dir / BUILD_DIR / MANIFEST


def read_manifest_file(file: Path) -> dict[str, Any]:
    """Parse and shape-check one manifest file, a recipe or a built manifest."""
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ImageError(f"no image manifest at {file}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ImageError(f"cannot read {file}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ImageError(f"{file}: TOML syntax: {exc}") from exc
    if not isinstance(data.get("name"), str) or not _NAME.match(data["name"]):
        raise ImageError(f"{file}: 'name' must be an image name string")
    targets = data.get("targets", {})
    if not isinstance(targets, dict) or not all(isinstance(t, dict) for t in targets.values()):
        raise ImageError(f"{file}: 'targets' must hold tables such as [targets.unix]")
    return data


def load_image(images_dir: Path, ref: str, store: Path | None = None, prefer_store: bool = False) -> Image:
    """Resolve ``NAME``, ``path/to/dir`` or either with ``@sha256:<hex>``; cached by mtime.

    Unpinned, or pinned to the current version: the latest build (or the recipe), as
    `_load` says; on a node that follows NAME's announcements, the version it followed
    last (``<store>/followed/NAME``). Pinned to another version: that version from the image store (`store`,
    default ``<images_dir>/.store``), laid out under its versions/ directory, so a route
    keeps the version it pins while newer ones are built. `prefer_store`: a pin to the
    current version is served from the store too when the store holds it (what a boot
    wants: the image dir's site is edited in place for the next build, a running
    instance of this version must not see that)."""
    pin: str | None = None
    m = _PIN.match(ref)
    if m:
        ref, pin = m.group("ref"), m.group("digest")
    elif "@" in ref:
        raise ImageError(f"{ref!r}: a pin must look like NAME@sha256:<64 hex digits>")
    elif _NAME.match(ref):
        # a node that follows announcements (proxy.runtime.follower): NAME means the version
        # it last pulled and verified, whatever recipe or build its images dir may hold
        from .store import Store

        pin = Store(store if store is not None else images_dir / ".store").followed(ref)
    try:
        image_dir = _resolve(images_dir, ref).absolute()  # {dir} must not depend on a later cwd
    except ImageError:
        if pin is None or not _NAME.match(ref):
            raise
        # no recipe here (a node that only pulls): a pinned version can still come from the store
        nothing = Image(ref, images_dir / ref, {}, "", file=images_dir / ref / MANIFEST)
        return _load_stored(nothing, pin, store if store is not None else images_dir / ".store")
    file = image_dir / MANIFEST
    built = built_manifest_file(image_dir)
    try:
        st = file.stat()
    except OSError as exc:
        raise ImageError(f"cannot read {file}: {exc.strerror or exc}") from exc
    try:
        bs = built.stat()
        bst = (bs.st_mtime_ns, bs.st_size)
    except FileNotFoundError:
        bst = (0, -1)
    except OSError as exc:
        raise ImageError(f"cannot read {built}: {exc.strerror or exc}") from exc
    key = (str(file.resolve()), st.st_mtime_ns, st.st_size, *bst)
    with _lock:
        image = _manifest_cache.get(key)
    if image is None:
        image = _load(image_dir, built_exists=bst[1] >= 0)
        with _lock:
            _manifest_cache[key] = image
    store_dir = store if store is not None else images_dir / ".store"
    if pin is not None and (pin != image.digest or (prefer_store and _in_store(store_dir, pin))):
        return _load_stored(image, pin, store_dir)
    return image


def _in_store(store_dir: Path, pin: str) -> bool:
    from .store import Store

    return Store(store_dir).has(pin)


def _load_stored(current: Image, pin: str, store_dir: Path) -> Image:
    """A pinned version other than the current one, from the store (immutable: cached by pin)."""
    from .store import Store  # the store imports .canonical, not this module

    store = Store(store_dir)
    key = (str(store_dir.absolute()), pin)
    with _lock:
        hit = _stored_cache.get(key)
    if hit is not None and hit.dir.is_dir():
        return hit
    if not store.has(pin):
        here = f"{current.file} has digest {current.digest}" if current.digest else f"there is no {current.file}"
        raise ImageError(f"image {current.name!r} is pinned to {pin} but {here} "
                         f"and the image store {store_dir} does not hold {pin}")
    manifest = store.manifest(pin)  # verified: its bytes hash to the pin
    if manifest.get("name") != current.name:
        raise ImageError(f"image {current.name!r} is pinned to {pin}, which the image store {store_dir} "
                         f"holds as a version of {manifest.get('name')!r}")
    vdir = store.materialize(pin).absolute()
    image = Image(current.name, vdir, manifest, pin, file=store.object_path(pin))
    with _lock:
        _stored_cache[key] = image
    return image


def _load(image_dir: Path, built_exists: bool) -> Image:
    """The built manifest when it was built from the recipe as it is now, else the recipe."""
    recipe = read_manifest(image_dir)
    recipe_digest = manifest_digest(recipe)
    stale = ""
    if built_exists:
        file = built_manifest_file(image_dir)
        built = read_manifest_file(file)
        from_recipe = built.get("build", {}).get("recipe_digest") if isinstance(built.get("build"), dict) else None
        if from_recipe == recipe_digest and built["name"] == recipe["name"]:
            return Image(built["name"], image_dir, built, manifest_digest(built), file=file)
        stale = f"{file} was built from another version of {image_dir / MANIFEST}"
    return Image(recipe["name"], image_dir, recipe, recipe_digest, file=image_dir / MANIFEST, stale=stale)


def image_names(images_dir: Path) -> list[str]:
    """Names of the image directories (those holding an image.toml), sorted."""
    if not images_dir.is_dir():
        return []
    return sorted(p.name for p in images_dir.iterdir() if (p / MANIFEST).is_file())


# --- writing manifests ----------------------------------------------------------------
# tomllib only reads. The manifest has a small fixed shape (strings, ints, lists of
# strings, tables of strings), so a tiny emitter is simpler than another dependency.


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_\-]+", key) else json.dumps(key)


def dump_manifest(manifest: dict[str, Any]) -> str:
    """Manifest -> TOML text: top-level keys, then [targets.X] tables, then the rest."""
    lines: list[str] = []
    tables: list[tuple[str, dict[str, Any]]] = []
    for key, value in manifest.items():
        if key == "targets":
            tables.extend((f"targets.{_toml_key(t)}", v) for t, v in value.items())
        elif isinstance(value, dict):
            tables.append((_toml_key(key), value))
        else:
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    tables.sort(key=lambda t: (not t[0].startswith("targets."), t[0] != "targets.unix", t[0]))
    for header, table in tables:
        lines.append("")
        lines.append(f"[{header}]")
        lines.extend(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items())
    return "\n".join(lines) + "\n"


def write_manifest(image_dir: Path, manifest: dict[str, Any]) -> None:
    """Atomically replace the recipe image.toml (tools that generate recipes, tests)."""
    _write_atomic(image_dir / MANIFEST, dump_manifest(manifest))


def write_built_manifest(image_dir: Path, manifest: dict[str, Any]) -> Path:
    """Atomically write build/image.toml; the recipe next to it is left as it is."""
    file = built_manifest_file(image_dir)
    file.parent.mkdir(exist_ok=True)
    header = (f"# Written by `summon images build` from ../{MANIFEST} (the recipe): edit that one, then build\n"
              "# again. [build].recipe_digest says which version of the recipe this was built from.\n")
    _write_atomic(file, header + dump_manifest(manifest))
    return file


def _write_atomic(file: Path, text: str) -> None:
    """A reader never sees half a manifest."""
    tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, file)
