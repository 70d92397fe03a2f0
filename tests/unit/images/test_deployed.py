"""The deployed-version record (proxy/images/deployed.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.errors import ImageError
from proxy.images.deployed import Deployed, all_deployed, deployed_file, read_deployed, write_deployed

V1, V2 = "sha256:" + "1" * 64, "sha256:" + "2" * 64


def test_written_whole_and_read_back(tmp_path: Path) -> None:
    assert read_deployed(tmp_path, "decks") is None
    write_deployed(tmp_path, Deployed("decks", V2, V1, "deploy", 1000.0))
    assert read_deployed(tmp_path, "decks") == Deployed("decks", V2, V1, "deploy", 1000.0)
    write_deployed(tmp_path, Deployed("decks", V1, V2, "rollback", 1001.0))
    assert read_deployed(tmp_path, "decks") == Deployed("decks", V1, V2, "rollback", 1001.0)
    assert [p.name for p in deployed_file(tmp_path, "decks").parent.iterdir()] == ["decks.json"], "no temp file left"
    assert all_deployed(tmp_path) == [Deployed("decks", V1, V2, "rollback", 1001.0)]


def test_a_damaged_record_is_a_clear_error_and_a_bad_name_refused(tmp_path: Path) -> None:
    f = deployed_file(tmp_path, "decks")
    f.parent.mkdir(parents=True)
    f.write_text("{not json")
    with pytest.raises(ImageError, match="not a deployed-version record"):
        read_deployed(tmp_path, "decks")
    assert all_deployed(tmp_path) == []
    with pytest.raises(ImageError, match="not an image name"):
        deployed_file(tmp_path, "../etc")
