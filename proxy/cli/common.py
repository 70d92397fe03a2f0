"""What every `summon` subcommand that reads a config does the same way."""

from __future__ import annotations

import sys

from ..config import Config, load
from ..errors import ConfigError


def load_or_report(path: str) -> Config | None:
    """The config, or None after printing one `file:line: message` per problem
    (callers then exit 2, the `summon check` contract)."""
    try:
        return load(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return None
