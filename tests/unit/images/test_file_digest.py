"""The artefact hash cache: a file is hashed once per content it can hold (device, inode,
size, mtime), whatever path it is reached by: the store's hard link to a build is the
build's file, so the first boot does not hash the kernel that `serve` verified at start."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from proxy.images import manifest


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    seen: list[Path] = []
    real = Path.open

    def counting(self: Path, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        seen.append(self)
        return real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "open", counting)
    return seen


def test_a_hard_link_is_not_hashed_again_a_copy_is(tmp_path: Path, opened: list[Path]) -> None:
    build = tmp_path / "build" / "vmlinux"
    build.parent.mkdir()
    build.write_bytes(os.urandom(3 << 20))
    want = hashlib.sha256(build.read_bytes()).hexdigest()
    assert manifest.file_digest(build) == want
    link = tmp_path / "store-vmlinux"
    os.link(build, link)
    copy = tmp_path / "copy-vmlinux"
    shutil.copy2(build, copy)  # same bytes, size and mtime, another inode
    opened.clear()
    assert manifest.file_digest(link) == want
    assert opened == []
    assert manifest.file_digest(copy) == want
    assert opened == [copy]


def test_a_file_rewritten_in_place_is_hashed_anew(tmp_path: Path) -> None:
    f = tmp_path / "initrd"
    f.write_bytes(b"one")
    first = manifest.file_digest(f)
    f.write_bytes(b"two!")
    assert manifest.file_digest(f) == hashlib.sha256(b"two!").hexdigest() != first
