"""What `summon serve` would fail on, found before it starts (`summon check` and `serve`).

How this works: the config loader proves a file well formed; this module asks the
machine whether it can be served: every backend's package importable and its daemon
answering, every summoned route's image built for the hosts it may land on and matching
its digests, every listen address free, the event log writable. Each problem is a
`Problem` (``file:line: message``) naming the key it comes from, so the operator sees
the same shape as for a typo. `summon check` prints them and exits 2; `summon serve`
runs the same checks first, and turns the errors its own start-up can still meet (a
port taken in between) into the same problems through `listen_error` and
`events_error`, so no environment problem ever reaches the terminal as a traceback.

The checks only look: nothing is created (a bind is closed at once, the event log is
opened read-only if it exists).
"""

from __future__ import annotations

import errno
import functools
import os
import socket
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

from ..config import Address, Config, Host, LineIndex, key_line, route_place
from ..errors import ConfigError, Problem, SummonError

LIBVIRT_TIMEOUT_S = 10.0  # libvirt.open has no timeout of its own; a remote host may not answer at all


def environment_problems(config: Config) -> list[Problem]:
    """Every problem `serve` would meet with this config on this machine."""
    return [*host_problems(config), *image_problems(config), *listen_problems(config), *events_problems(config),
            *cluster_problems(config), *follow_problems(config)]


# --- the cluster ------------------------------------------------------------------------

def redis_password(config: Config) -> str | None:
    """The Redis password named by `[cluster].password_env`, read once at start-up (the
    serving process reads no environment below this)."""
    if config.cluster is None or config.cluster.password_env is None:
        return None
    return os.environ.get(config.cluster.password_env)


def cluster_problems(config: Config) -> list[Problem]:
    """An unreachable Redis is not one (summon serves on in degraded mode, and says so);
    a password variable that is not set is: nothing would ever authenticate."""
    c = config.cluster
    if c is None or c.password_env is None or redis_password(config) is not None:
        return []
    return [Problem(config.path, key_line(config.path, "cluster", 0, "password_env"),
                    f"[cluster].password_env: the environment variable {c.password_env} is not set")]


def pull_token(config: Config) -> str | None:
    """The centre's admin token an edge pulls with (`[images] pull_token_env`), read once."""
    if config.follow is None or config.follow.token_env is None:
        return None
    return os.environ.get(config.follow.token_env)


def follow_problems(config: Config) -> list[Problem]:
    f = config.follow
    if f is None or f.token_env is None or pull_token(config) is not None:
        return []
    return [Problem(config.path, key_line(config.path, "images", 0, "pull_token_env"),
                    f"[images].pull_token_env: the environment variable {f.token_env} is not set")]


# --- hosts ---------------------------------------------------------------------------


def _host_line(config: Config, i: int, key: str) -> int:
    return key_line(config.path, "host", i, key)


def host_problems(config: Config) -> list[Problem]:
    """libvirt hosts: libvirt-python importable, libvirtd answering on the host's URI."""
    problems: list[Problem] = []
    answers: dict[str, str | None] = {}
    for i, host in enumerate(config.hosts):
        if host.backend != "libvirt":
            continue
        from ..backends import libvirt as driver

        if driver.libvirt is None:
            problems.append(Problem(config.path, _host_line(config, i, "backend"),
                                    f"[[host]].backend of {host.name!r}: \"libvirt\" needs libvirt-python, which "
                                    "this Python cannot import (pip install 'summon[libvirt]')"))
            continue
        asked = f"{host.uri}#{host.arch}"
        if asked not in answers:
            answers[asked] = _with_timeout(functools.partial(driver.libvirt_available, host.uri, host.arch),
                                           LIBVIRT_TIMEOUT_S,
                                           f"cannot connect to {host.uri}: no answer in {LIBVIRT_TIMEOUT_S:g}s")
        reason = answers[asked]
        if reason is not None:
            key = "uri" if "uri" in _written(config, "host", i) else "backend"
            if "cannot run" in reason and "arch" in _written(config, "host", i):
                key = "arch"
            problems.append(Problem(config.path, _host_line(config, i, key), f"[[host]].uri of {host.name!r}: {reason}"))
    return problems


def _written(config: Config, table: str, i: int = 0) -> set[str]:
    """The keys written in the i-th `[table]` of the main file (a default, such as a
    libvirt host's uri or the event log's path, has no line of its own)."""
    try:
        index = LineIndex(Path(config.path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        return set()
    return set(index.tables.get((table, i), (1, {}))[1])


def _with_timeout(check: Callable[[], str | None], timeout_s: float, late: str) -> str | None:
    """Run a blocking check in a daemon thread: a host that never answers costs
    `timeout_s`, not a hung `summon check` (a daemon thread does not hold up the exit)."""
    result: list[str | None] = []

    def run() -> None:
        try:
            result.append(check())
        except Exception as exc:  # noqa: BLE001 - any failure of the probe is the answer
            result.append(f"{type(exc).__name__}: {exc}")

    t = threading.Thread(target=run, name="summon-preflight", daemon=True)
    t.start()
    t.join(timeout_s)
    return result[0] if result else late


# --- images --------------------------------------------------------------------------


def target_for(host: Host) -> str | None:
    """The image target a host's driver boots (None: the driver needs no image files)."""
    from ..backends.base import image_target

    return image_target(host)


def image_problems(config: Config) -> list[Problem]:
    """Each summoned route's image exists, matches its pin, has the target of every kind
    of host it may be placed on, and every artefact of that target matches its digest.

    MicroVM targets are per arch, and placement only picks a host whose arch the image
    has: an image needs one of the libvirt hosts' arches, not all of them."""
    from ..images.manifest import load_image

    targets = sorted({t for h in config.hosts if (t := target_for(h)) is not None})
    vm_arches = [t for t in targets if t in {h.arch for h in config.hosts if h.backend == "libvirt"}]
    seen: dict[str, str | None] = {}  # image ref -> problem (the same image is checked once)
    problems: list[Problem] = []
    for route in config.routes:
        if route.image is None:
            continue
        if route.image not in seen:
            try:
                image = load_image(config.images_dir, route.image, store=config.images_store)
                have = [t for t in vm_arches if t in image.targets()]
                if vm_arches and not have:
                    image.target(vm_arches[0])  # raises, naming the targets it has
                for target in targets:
                    if target in vm_arches and target not in have:
                        continue
                    image.target(target)
                    image.verify(target)
                seen[route.image] = None
            except SummonError as exc:  # ImageError
                seen[route.image] = None if _awaited(config, route.image) else exc.detail
        problem = seen[route.image]
        if problem is not None:
            file, i = route_place(route)
            problems.append(Problem(file, key_line(file, "route", i, "image"), f"[[route]].image of {route.name!r}: {problem}"))
    return problems


def _awaited(config: Config, ref: str) -> bool:
    """A followed image this node has no version of yet: it comes with the next
    announcement (until then its route answers 503), so it does not stop the start."""
    from ..images.store import Store

    return (config.follow is not None and ref in config.follow.images
            and Store(config.images_store).followed(ref) is None)


# --- listen addresses ----------------------------------------------------------------


def _why(exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return "address already in use (is another summon or server running on it?)"
    if exc.errno == errno.EADDRNOTAVAIL:
        return "no interface of this machine has that address"
    if exc.errno == errno.EACCES:
        return "permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
    return exc.strerror or str(exc)


def listen_error(config: Config, key: str, address: Address, exc: OSError, section: str = "proxy") -> ConfigError:
    """A bind that failed (`key` is "listen" or "admin" of [proxy], or [plugin] "listen")
    as the problem `check` prints."""
    return ConfigError([Problem(config.path, key_line(config.path, section, 0, key),
                                f"[{section}].{key}: cannot listen on {address}: {_why(exc)}")])


def listen_problems(config: Config) -> list[Problem]:
    """Bind each address once, as `serve` will, and let go at once. Port 0 always binds."""
    wanted = [("proxy", "listen", a) for a in config.proxy.listen]
    if config.proxy.admin is not None:
        wanted.append(("proxy", "admin", config.proxy.admin))
    if config.plugin is not None:
        wanted.append(("plugin", "listen", config.plugin.listen))
    problems: list[Problem] = []
    for section, key, address in wanted:
        if address.port == 0:
            continue
        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as serve: TIME_WAIT is no conflict
                sock.bind((address.host, address.port))
        except OSError as exc:
            problems.extend(listen_error(config, key, address, exc, section).problems)
        except (UnicodeError, ValueError) as exc:  # a host name the resolver refuses
            problems.append(Problem(config.path, key_line(config.path, section, 0, key),
                                    f"[{section}].{key}: cannot listen on {address}: {exc}"))
    return problems


# --- the event log -------------------------------------------------------------------


def events_error(config: Config, exc: Exception) -> ConfigError:
    """Opening the event log failed (OSError, sqlite3.Error) as the problem `check` prints."""
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return _events_problem(config, f"cannot write the event log {config.events_path}: {reason}")


def _events_problem(config: Config, message: str) -> ConfigError:
    keys = _written(config, "events")
    line = key_line(config.path, "events", 0, "path") if "path" in keys else 1
    hint = "" if "path" in keys else " (the default path: set [events] path)"
    return ConfigError([Problem(config.path, line, f"[events].path: {message}{hint}")])


def events_problems(config: Config) -> list[Problem]:
    """The event log can be created or written: its directory (or the nearest one that
    exists) is a writable directory, and an existing file is a writable SQLite database."""
    path = config.events_path
    if path.is_dir():
        return _events_problem(config, f"{path} is a directory").problems
    if path.exists():
        if not os.access(path, os.R_OK | os.W_OK):
            return _events_problem(config, f"cannot write the event log {path}: permission denied").problems
        try:
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                conn.execute("PRAGMA schema_version").fetchone()
            finally:
                conn.close()
        except sqlite3.Error as exc:
            return _events_problem(config, f"{path} is not a usable SQLite database: {exc}").problems
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return _events_problem(config, f"cannot create the event log {path}: {parent} is not a directory").problems
    # the WAL and shared-memory files live beside the database
    if not os.access(parent, os.W_OK | os.X_OK):
        return _events_problem(config, f"cannot write the event log {path}: {parent} is not writable").problems
    return []
