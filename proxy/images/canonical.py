"""The canonical form of a manifest and its digest: the one definition of an image version.

Why a module of its own: both `manifest.py` (loading, pins) and `store.py` (versions by
digest) need it, and `manifest.py` reaches into the store for pinned older versions;
with the definition here neither imports the other at module level.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

DIGEST_SUFFIX = "_sha256"  # KEY_sha256 next to KEY marks KEY as an artefact path


def canonical_manifest(manifest: dict[str, Any]) -> bytes:
    """Sorted-key compact JSON: independent of TOML formatting, comments and key order."""
    return json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def manifest_digest(manifest: dict[str, Any]) -> str:
    return "sha256:" + hashlib.sha256(canonical_manifest(manifest)).hexdigest()
