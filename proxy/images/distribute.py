"""Moving image versions between summon nodes: serving store objects, and pulling them.

Why: a node that cannot build (an edge device without Debian's kernel package, or one
that should not) takes what another node built. The receiver trusts nothing it is sent:
it asks for a version by digest and checks every byte against the digests the version's
manifest records, which in turn hash to the version asked for. A tampered or truncated
object is refused, and the version is stored only when all of it checked out, so a route
pinned to it never sees part of one.

Serving (`serve_object`, behind the admin API's ``GET /images/sha256/<hex>``): a store
object's bytes (an artefact or a manifest), or a tree's listing (``X-Summon-Object:
tree``); ``Range: bytes=a-b`` answers 206 with Content-Range, so a puller resumes a cut
download instead of starting again.

Pulling (`pull`): the manifest, then each artefact (a tree: its listing, then each of
its files), streamed into the store through `Store.put_file`'s temp-file-fsync-rename
with the expected digest.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import ImageError
from .store import Build, Store, artefact_refs, hex_of, tree_digest, write_atomic

PREFIX = "/images/sha256/"
MAX_SERVED = 1 << 30  # one answer holds at most this many bytes: ask for ranges beyond it
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


@dataclass(frozen=True)
class Served:
    status: int
    ctype: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


def serve_object(store: Store, path: str, range_header: str | None) -> Served:
    """The answer to ``GET /images/sha256/<hex>`` (`path` is the request path)."""
    hexd = path.removeprefix(PREFIX)
    try:
        hex_of(hexd)
    except ImageError:
        return Served(404, "text/plain", b"not a sha256 digest\n")
    kind = "object"
    p = store.object_path(hexd)
    if not p.is_file():
        p, kind = store.trees / f"{hexd}.json", "tree"
        if not p.is_file():
            return Served(404, "text/plain", f"the image store holds no sha256:{hexd}\n".encode())
    size = p.stat().st_size
    headers: list[tuple[str, str]] = [("Accept-Ranges", "bytes"), ("X-Summon-Object", kind)]
    start, end = 0, size - 1
    status = 200
    if range_header:
        m = _RANGE.match(range_header.strip())
        if not m or (not m.group(1) and not m.group(2)):
            return Served(416, "text/plain", b"only one range: bytes=START-END\n", (("Content-Range", f"bytes */{size}"),))
        if m.group(1):
            start = int(m.group(1))
            end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
        else:  # bytes=-N: the last N
            start = max(0, size - int(m.group(2)))
        if start >= size or start > end:
            return Served(416, "text/plain", b"range not satisfiable\n", (("Content-Range", f"bytes */{size}"),))
        status = 206
        headers.append(("Content-Range", f"bytes {start}-{end}/{size}"))
    if end - start + 1 > MAX_SERVED:
        return Served(413, "text/plain", f"over {MAX_SERVED} bytes: ask for ranges\n".encode())
    with p.open("rb") as f:
        f.seek(start)
        body = f.read(end - start + 1)
    ctype = "application/json" if kind == "tree" else "application/octet-stream"
    return Served(status, ctype, body, tuple(headers))


# --- the puller -------------------------------------------------------------------------

Fetch = Callable[[str, int], tuple[int, bytes, int]]  # (url, from byte) -> (status, body, full size or -1)


def http_fetch(token: str | None, timeout_s: float = 60.0) -> Fetch:
    """GET with urllib: a body cut short comes back short (the caller resumes it)."""
    import http.client

    def fetch(url: str, offset: int) -> tuple[int, bytes, int]:
        req = urllib.request.Request(url)
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        if offset:
            req.add_header("Range", f"bytes={offset}-")
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as r:
                size = _full_size(r.status, r.headers.get("Content-Length"), r.headers.get("Content-Range"))
                chunks: list[bytes] = []
                try:
                    while chunk := r.read(1 << 20):
                        chunks.append(chunk)
                except http.client.IncompleteRead as exc:
                    chunks.append(exc.partial)
                except OSError:
                    pass
                return r.status, b"".join(chunks), size
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read(), -1
        except (OSError, urllib.error.URLError, http.client.HTTPException) as exc:
            raise ImageError(f"cannot fetch {url}: {getattr(exc, 'reason', exc)}") from exc
    return fetch


def _full_size(status: int, length: str | None, content_range: str | None) -> int:
    if status == 206 and content_range and "/" in content_range:
        total = content_range.rsplit("/", 1)[1]
        return int(total) if total.isdigit() else -1
    return int(length) if length and length.isdigit() else -1


def _get(fetch: Fetch, base: str, hexd: str, attempts: int = 3) -> bytes:
    """All of one object, resuming a cut answer with a Range (at most `attempts` requests);
    whether it is the right object is for the caller's digest check to say."""
    url = base.rstrip("/") + PREFIX + hexd
    data = b""
    for _ in range(attempts):
        status, body, size = fetch(url, len(data))
        if status == 404:
            raise ImageError(f"{url}: the serving node's store does not hold sha256:{hexd}")
        if status not in (200, 206):
            raise ImageError(f"{url}: HTTP {status}: {body[:200].decode(errors='replace').strip()}")
        data = body if status == 200 else data + body
        if size < 0 or len(data) >= size or not body:
            break
    return data


@dataclass
class Pulled:
    version: str
    objects: int
    bytes: int


def pull(base: str, name: str, version: str, store: Store, fetch: Fetch,
         now: Callable[[], float] = time.time) -> Pulled:
    """Fetch `name@version` from `base` into `store`, verifying everything; ImageError on any
    mismatch, with nothing of the version usable (its manifest is stored last)."""
    want = hex_of(version)
    raw = _checked(fetch, base, want, "the manifest")
    try:
        manifest = json.loads(raw)
    except ValueError as exc:
        raise ImageError(f"sha256:{want} from {base} is not a manifest") from exc
    if not isinstance(manifest, dict) or manifest.get("name") != name:
        raise ImageError(f"sha256:{want} from {base} is a version of {manifest.get('name')!r}, not {name!r}")
    n, total = 1, len(raw)
    with tempfile.TemporaryDirectory(prefix="summon-pull-", dir=_scratch(store)) as tmp:
        for target, key, _rel, hexd in artefact_refs(manifest):
            what = f"[targets.{target}].{key}"
            body = _get(fetch, base, hexd)
            if _sha(body) == hexd:
                total += _keep(store, Path(tmp), body, hexd)
                n += 1
                continue
            try:  # a tree: its listing, then its files
                listing = [(str(r), int(s), str(h)) for r, s, h in json.loads(body)]
            except (ValueError, TypeError):
                listing = None
            if listing is None or tree_digest(listing) != hexd:
                raise ImageError(f"{what} of {name}@sha256:{want} from {base} does not match its digest "
                                 f"sha256:{hexd} (tampered or truncated): refused, nothing stored as that version")
            for rel, size, fhex in listing:
                fbody = _checked(fetch, base, fhex, f"{what}/{rel}")
                if len(fbody) != size:
                    raise ImageError(f"{what}/{rel}: {len(fbody)} bytes, the listing says {size}")
                total += _keep(store, Path(tmp), fbody, fhex)
                n += 1
            write_atomic(store.trees / f"{hexd}.json", body)
    got = store.put_bytes(raw)  # last: until now no reader could take this version
    assert got == want
    store.record(Build(name, f"sha256:{want}", str(manifest.get("build", {}).get("recipe_digest", "")), now(), "pull"))
    store.materialize(f"sha256:{want}")
    return Pulled(f"sha256:{want}", n, total)


def _checked(fetch: Fetch, base: str, hexd: str, what: str) -> bytes:
    body = _get(fetch, base, hexd)
    if _sha(body) != hexd:
        raise ImageError(f"{what} from {base} does not match sha256:{hexd} (tampered or truncated): refused")
    return body


def _keep(store: Store, tmp: Path, body: bytes, hexd: str) -> int:
    p = tmp / hexd
    p.write_bytes(body)
    store.put_file(p, expect=hexd)
    p.unlink()
    return len(body)


def _scratch(store: Store) -> str:
    store.root.mkdir(parents=True, exist_ok=True)
    return str(store.root)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
