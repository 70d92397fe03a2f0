"""What every `summon` subcommand that reads a config does the same way."""

from __future__ import annotations

import sys
from collections.abc import Iterable

from ..config import Config, load
from ..errors import ConfigError, Problem


def report(problems: Iterable[Problem]) -> None:
    """One `file:line: message` line per problem on stderr."""
    for problem in problems:
        print(problem, file=sys.stderr)


def load_or_report(path: str) -> Config | None:
    """The config, or None after printing one `file:line: message` per problem
    (callers then exit 2, the `summon check` contract)."""
    try:
        return load(path)
    except ConfigError as exc:
        report(exc.problems)
        return None


def environment_ok(config: Config) -> bool:
    """True if this machine can serve `config`; else False after printing each problem
    (`proxy.preflight`: backends, images, listen addresses, the event log)."""
    from ..serve.preflight import environment_problems

    problems = environment_problems(config)
    report(problems)
    return not problems


def admin_target(config_path: str, path: str) -> tuple[Config, str] | int:
    """The config and the admin API URL for `path`, or the exit code after a message."""
    config = load_or_report(config_path)
    if config is None:
        return 2
    if config.proxy.admin is None:
        print("summon: [proxy] admin is disabled in this config", file=sys.stderr)
        return 1
    address = str(config.proxy.admin).replace("0.0.0.0:", "127.0.0.1:").replace("[::]:", "[::1]:")  # wildcards
    return config, f"http://{address}{path}"
