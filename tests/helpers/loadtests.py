"""The benchmark scripts under loadtests/ as modules, for tests of their pure parts.

They are scripts, not a package: each is loaded from its file (and registered under its
name, so that a dataclass or a sibling import in it resolves) rather than imported."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

from tests.helpers.paths import LOADTESTS


def load(name: str) -> ModuleType:
    """loadtests/NAME.py, executed as module NAME."""
    spec = importlib.util.spec_from_file_location(name, LOADTESTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return module
