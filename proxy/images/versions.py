"""Image versions over time: what changed between two (`diff`), and which to keep (`gc`).

Why here and not in the CLI: both are plain functions of the store and a few facts (the
pins routes hold, how many builds to keep), so they are tested without a terminal, and a
future admin endpoint can call the same ones.

Garbage collection keeps, for each image, the versions routes pin, the last `keep`
builds, and the version build/ currently holds (an unpinned route follows it); an
object is kept when any kept version refers to it (its artefacts, its site's files, the
manifest itself). Everything else goes: objects, tree listings, laid-out versions. The
build records stay, so `history` still tells what was built (marked as collected).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from typing import Any

from ..errors import ImageError
from .store import Store, artefact_refs, hex_of


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def diff_manifests(a: dict[str, Any], b: dict[str, Any], store: Store | None = None) -> list[str]:
    """Lines ``~ key: old -> new``, ``+ key = new``, ``- key = old``; with a store, a
    directory artefact that changed is opened up file by file."""
    fa, fb = _flatten(a), _flatten(b)
    lines: list[str] = []
    for key in sorted(set(fa) | set(fb)):
        if key not in fb:
            lines.append(f"- {key} = {fa[key]!r}")
        elif key not in fa:
            lines.append(f"+ {key} = {fb[key]!r}")
        elif fa[key] != fb[key]:
            lines.append(f"~ {key}: {fa[key]!r} -> {fb[key]!r}")
    if store is not None:
        refs_a = {(t, k): h for t, k, _rel, h in artefact_refs(a)}
        for t, k, _rel, hb in artefact_refs(b):
            ha = refs_a.get((t, k))
            if ha and ha != hb and store.has_tree(ha) and store.has_tree(hb):
                lines += [f"    [targets.{t}].{k}: {line}" for line in diff_trees(store, ha, hb)]
    return lines


def diff_trees(store: Store, a: str, b: str) -> list[str]:
    ta = {rel: h for rel, _s, h in store.tree(a)}
    tb = {rel: h for rel, _s, h in store.tree(b)}
    out = []
    for rel in sorted(set(ta) | set(tb)):
        if rel not in tb:
            out.append(f"- {rel}")
        elif rel not in ta:
            out.append(f"+ {rel}")
        elif ta[rel] != tb[rel]:
            out.append(f"~ {rel}")
    return out


@dataclass
class Collected:
    kept_versions: list[str] = field(default_factory=list)
    removed_versions: list[str] = field(default_factory=list)
    removed_objects: int = 0
    removed_bytes: int = 0
    removed_trees: int = 0


def references(store: Store, version: str) -> set[str]:
    """Object hex digests a stored version needs: its manifest, artefacts and site files."""
    manifest = store.manifest(version)
    out = {hex_of(version)}
    for _t, _k, _rel, h in artefact_refs(manifest):
        out.add(h)
        if store.has_tree(h):
            out.update(fh for _r, _s, fh in store.tree(h))
    return out


def plan_keep(store: Store, pinned: set[str], current: set[str], keep: int) -> list[str]:
    """The versions gc keeps: pinned, current, followed (an edge's unpinned routes run
    those), and each image's last `keep` builds."""
    kept = set(pinned) | set(current)
    kept.update(v for n in store.followed_names() if (v := store.followed(n)) is not None)
    for name in store.names():
        seen: list[str] = []
        for b in reversed(store.builds(name)):
            if b.digest not in seen:
                seen.append(b.digest)
            if len(seen) >= keep:
                break
        kept.update(seen)
    return sorted(d for d in kept if store.has(d))


def gc(store: Store, pinned: set[str], current: set[str], keep: int, dry_run: bool = False) -> Collected:
    """Remove what no kept version refers to; return what was (or would be) removed."""
    if keep < 1:
        raise ImageError("gc keeps at least the last build of each image (--keep 1 or more)")
    result = Collected(kept_versions=plan_keep(store, pinned, current, keep))
    live: set[str] = set()
    for v in result.kept_versions:
        live |= references(store, v)
    live_trees: set[str] = set()
    for v in result.kept_versions:
        live_trees.update(h for _t, _k, _r, h in artefact_refs(store.manifest(v)) if store.has_tree(h))
    versions: set[str] = set()
    for name in store.names():
        versions.update(b.digest for b in store.builds(name))
    if store.objects.is_dir():
        for p in sorted(store.objects.iterdir()):
            if p.name.startswith(".") or p.name in live:
                continue
            if ("sha256:" + p.name) in versions:
                result.removed_versions.append("sha256:" + p.name)
            result.removed_objects += 1
            result.removed_bytes += p.stat().st_size
            if not dry_run:
                p.unlink()
    if store.trees.is_dir():
        for p in sorted(store.trees.glob("*.json")):
            if p.stem not in live_trees:
                result.removed_trees += 1
                if not dry_run:
                    p.unlink()
    if store.versions.is_dir() and not dry_run:
        keep_dirs = {hex_of(v) for v in result.kept_versions}
        for d in store.versions.iterdir():
            if d.name not in keep_dirs and not d.name.startswith("."):  # a dot: being laid out right now
                shutil.rmtree(d, ignore_errors=True)
    return result
