"""Where things are, for every test module whatever its depth under tests/."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LOADTESTS = REPO / "loadtests"
