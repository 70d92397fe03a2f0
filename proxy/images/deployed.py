"""The version deployed per image (`summon images deploy|rollback`), kept across restarts.

Why a file: a route that follows an image (``image = "decks"``, no pin) serves the latest
build until a version is deployed; from then on it serves the deployed one, also after a
restart or a reload, until the next deploy or rollback. The record lives in the image
store (``deployed/NAME.json``) because it names store versions, and `gc` keeps what it
names. It is written whole, atomically (`store.write_atomic`): a crash leaves the old
record or the new one, never a mix.

A route that pins a version (``image = "decks@sha256:..."``) is not affected: its config
says what it serves (change the pin and reload: that is a rolling deploy too).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import NamedTuple

from ..errors import ImageError
from .store import write_atomic

DEPLOYED_DIR = "deployed"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class Deployed(NamedTuple):
    name: str
    version: str  # sha256:<hex> of the manifest: what routes following the image serve
    previous: str  # what they served before ("" if unknown): where `rollback` goes
    how: str  # "deploy", "rollback", "rolled back" (automatic, after failed boots)
    at: float  # unix time


def deployed_file(store: Path, name: str) -> Path:
    if not _NAME.match(name):
        raise ImageError(f"{name!r} is not an image name")
    return store / DEPLOYED_DIR / f"{name}.json"


def read_deployed(store: Path, name: str) -> Deployed | None:
    """The record for `name`, None if nothing was deployed; ImageError if it is unreadable."""
    path = deployed_file(store, name)
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        return Deployed(name, str(d["version"]), str(d.get("previous", "")), str(d.get("how", "deploy")),
                        float(d.get("at", 0.0)))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ImageError(f"{path}: not a deployed-version record ({exc}); remove it to follow the latest build") from exc


def write_deployed(store: Path, record: Deployed) -> None:
    data = {"version": record.version, "previous": record.previous, "how": record.how, "at": round(record.at, 3)}
    write_atomic(deployed_file(store, record.name), json.dumps(data, sort_keys=True).encode() + b"\n")


def all_deployed(store: Path) -> list[Deployed]:
    """Every record (for `gc`: the versions they name are in use)."""
    d = store / DEPLOYED_DIR
    if not d.is_dir():
        return []
    out = []
    for p in sorted(d.glob("*.json")):
        try:
            rec = read_deployed(store, p.stem)
        except ImageError:
            continue
        if rec is not None:
            out.append(rec)
    return out
