"""What every `summon` subcommand that reads a config does the same way."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ..config import Config, load
from ..errors import ConfigError, Problem

if TYPE_CHECKING:  # imported where used: not every subcommand talks to the admin API
    import urllib.error
    import urllib.request


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


def admin_request(config: Config, url: str, *, post: bool = False,
                  json_body: Any = None) -> urllib.request.Request:
    """A request to the admin API with the config's bearer token (a POST when `post` or
    with a JSON body)."""
    import json
    import urllib.request

    headers = {}
    data = None
    if json_body is not None:
        data = json.dumps(json_body).encode()
        headers["Content-Type"] = "application/json"
    elif post:
        data = b""
    if config.proxy.admin_token:
        headers["Authorization"] = f"Bearer {config.proxy.admin_token}"
    return urllib.request.Request(url, data=data, method="POST" if data is not None else "GET", headers=headers)


def refusal(exc: urllib.error.HTTPError) -> tuple[Any, str]:
    """What the admin API said when it refused: its JSON body (None when it is not JSON)
    and the body as text."""
    import json

    raw = exc.read()
    try:
        said = json.loads(raw)
    except ValueError:
        said = None
    return said, raw.decode(errors="replace").strip()
