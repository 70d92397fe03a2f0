"""Environment problems (issue #14): what `summon serve` would fail on is reported by
`summon check`, and by `serve` itself, as `file:line: message` naming the key, exit 2,
never a traceback. Each case runs the real CLI in a subprocess, both commands."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.config import load
from proxy.errors import ConfigError
from tests.helpers.summon_proc import BUSYBOX, free_port, make_image

SUMMON = Path(sys.executable).with_name("summon")


def run(command: str, config: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # serve gets a bound: should a check miss the problem, serve would run, not hang the suite
    return subprocess.run([str(SUMMON), command, "-c", str(config)], capture_output=True, text=True, timeout=30,
                          cwd=config.parent, env=env)


def write(tmp_path: Path, body: str, listen: int | None = None, admin: int | None = None) -> Path:
    listen, admin = listen or free_port(), admin or free_port()
    path = tmp_path / "summon.toml"
    path.write_text(f'[proxy]\nlisten = "127.0.0.1:{listen}"\nadmin = "127.0.0.1:{admin}"\n'
                    f'[images]\ndir = "images"\n{body}')
    return path


def line_of(path: Path, needle: str) -> int:
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if needle in line)


def assert_refused(path: Path, needle: str, message: str, env: dict[str, str] | None = None) -> None:
    """`check` and `serve` both exit 2 with `file:line: message`, the line being the one
    that holds `needle` (the key), and print no traceback."""
    expected = f"{path}:{line_of(path, needle)}: "
    for command in ("check", "serve"):
        res = run(command, path, env)
        out = res.stdout + res.stderr
        assert res.returncode == 2, (command, out)
        assert "Traceback" not in out, (command, out)
        lines = [ln for ln in res.stderr.splitlines() if message in ln]
        assert lines and lines[0].startswith(expected), (command, expected, out)


def test_libvirt_python_missing(tmp_path: Path) -> None:
    """A `libvirt.py` shim first on PYTHONPATH raises ImportError on `import libvirt`: that
    is exactly what the driver meets on a machine without libvirt-python (its `try:
    import libvirt / except ImportError` sees the same exception), whatever is installed
    in this venv."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "libvirt.py").write_text('raise ImportError("No module named \'libvirt\' (test shim)")\n')
    path = write(tmp_path, '[[host]]\nname = "vm"\nbackend = "libvirt"\nuri = "test:///default"\n')
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(shim)}
    probe = subprocess.run([sys.executable, "-c", "import libvirt"], env=env, capture_output=True, text=True)
    assert "ImportError" in probe.stderr, "the shim must make the import fail"
    assert_refused(path, 'backend = "libvirt"', "needs libvirt-python", env)


def test_libvirtd_not_answering(tmp_path: Path) -> None:
    """A URI whose socket nobody listens on: what the client sees when libvirtd is down."""
    sock = tmp_path / "libvirt-sock"
    path = write(tmp_path, f'[[host]]\nname = "vm"\nbackend = "libvirt"\nuri = "qemu+unix:///system?socket={sock}"\n')
    assert_refused(path, "uri = ", "[[host]].uri of 'vm': cannot connect to")


def test_image_not_built_for_a_libvirt_host(tmp_path: Path) -> None:
    make_image(tmp_path / "images", "site", BUSYBOX)  # a unix target only: no microVM built
    path = write(tmp_path, '[[host]]\nname = "vm"\nbackend = "libvirt"\nuri = "test:///default"\n'
                           '[[route]]\npath = "/"\nimage = "site"\n')
    assert_refused(path, 'image = "site"', "has no target 'x86_64'")


def test_image_missing(tmp_path: Path) -> None:
    path = write(tmp_path, '[[route]]\npath = "/"\nimage = "nowhere"\n')
    assert_refused(path, 'image = "nowhere"', "no image named 'nowhere'")


def test_image_digest_wrong(tmp_path: Path) -> None:
    image = make_image(tmp_path / "images", "site", BUSYBOX)
    (image / "site" / "index.html").write_text("changed after the build\n")
    path = write(tmp_path, '[[route]]\npath = "/"\nimage = "site"\n')
    assert_refused(path, 'image = "site"', "does not match its digest")


def test_image_pin_wrong(tmp_path: Path) -> None:
    make_image(tmp_path / "images", "site", BUSYBOX)
    path = write(tmp_path, f'[[route]]\npath = "/"\nimage = "site@sha256:{"0" * 64}"\n')
    assert_refused(path, "image = ", "is pinned to sha256:0000")


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_listen_address_in_use(tmp_path: Path, taken_port: int) -> None:
    path = write(tmp_path, '[[route]]\npath = "/"\nupstreams = ["127.0.0.1:9"]\n', listen=taken_port)
    assert_refused(path, "listen = ", f"[proxy].listen: cannot listen on 127.0.0.1:{taken_port}: address already in use")


def test_admin_address_in_use(tmp_path: Path, taken_port: int) -> None:
    path = write(tmp_path, '[[route]]\npath = "/"\nupstreams = ["127.0.0.1:9"]\n', admin=taken_port)
    assert_refused(path, "admin = ", f"[proxy].admin: cannot listen on 127.0.0.1:{taken_port}: address already in use")


def test_plugin_address_in_use(tmp_path: Path, taken_port: int) -> None:
    path = write(tmp_path, f'[plugin]\nlisten = "127.0.0.1:{taken_port}"\n'
                           '[[route]]\npath = "/"\nupstreams = ["127.0.0.1:9"]\n')
    assert_refused(path, f"127.0.0.1:{taken_port}",
                   f"[plugin].listen: cannot listen on 127.0.0.1:{taken_port}: address already in use")


def test_event_log_unwritable(tmp_path: Path) -> None:
    """The log's directory is a plain file: mkdir fails for root too (chmod would not)."""
    (tmp_path / "var").write_text("not a directory\n")
    path = write(tmp_path, '[events]\npath = "var/events.db"\n[[route]]\npath = "/"\nupstreams = ["127.0.0.1:9"]\n')
    assert_refused(path, 'path = "var/events.db"', "[events].path: cannot create the event log")


def test_event_log_not_a_database(tmp_path: Path) -> None:
    (tmp_path / "events.db").write_text("this is not SQLite, and long enough to have a header " * 10)
    path = write(tmp_path, '[events]\npath = "events.db"\n[[route]]\npath = "/"\nupstreams = ["127.0.0.1:9"]\n')
    assert_refused(path, 'path = "events.db"', "is not a usable SQLite database")


def test_admin_off_loopback_needs_a_token(tmp_path: Path) -> None:
    path = write(tmp_path, '[[route]]\npath = "/"\nupstreams = ["127.0.0.1:9"]\n')
    path.write_text(path.read_text().replace('admin = "127.0.0.1:', 'admin = "0.0.0.0:'))
    assert_refused(path, "admin = ", '[proxy].admin = "0.0.0.0:')
    res = run("check", path)
    assert "set [proxy].admin_token" in res.stderr
    path.write_text(path.read_text().replace("[images]", 'admin_token = "0123456789abcdef-xyz"\n[images]'))
    res = run("check", path)
    assert res.returncode == 0, res.stderr


def test_a_short_token_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, '[[route]]\npath = "/"\nupstreams = ["127.0.0.1:9"]\n')
    path.write_text(path.read_text().replace("[images]", 'admin_token = "s3cret"\n[images]'))
    assert_refused(path, "admin_token", "[proxy].admin_token: must be at least 16 characters")


def test_a_clean_environment_passes(tmp_path: Path) -> None:
    make_image(tmp_path / "images", "site", BUSYBOX)
    path = write(tmp_path, '[[host]]\nname = "local"\nbackend = "process"\n[[route]]\npath = "/"\nimage = "site"\n')
    res = run("check", path)
    assert res.returncode == 0 and res.stderr == "", res.stderr


def test_config_only_skips_the_machine(tmp_path: Path, taken_port: int) -> None:
    path = write(tmp_path, '[[route]]\npath = "/"\nupstreams = ["127.0.0.1:9"]\n', listen=taken_port)
    res = subprocess.run([str(SUMMON), "check", "--config-only", "-c", str(path)], capture_output=True, text=True,
                         timeout=30)
    assert res.returncode == 0, res.stderr


# --- serve's own start-up: what it meets after the checks (a port taken in between) ------


def test_serve_turns_a_bind_failure_into_the_problem(tmp_path: Path, taken_port: int) -> None:
    from proxy.serve.server import serve

    path = write(tmp_path, '[events]\npath = "events.db"\n[[route]]\npath = "/"\nupstreams = ["127.0.0.1:9"]\n',
                 listen=taken_port)
    with pytest.raises(ConfigError) as info:
        serve(load(path))
    assert [str(p) for p in info.value.problems] == [
        f"{path}:{line_of(path, 'listen = ')}: [proxy].listen: cannot listen on 127.0.0.1:{taken_port}: "
        "address already in use (is another summon or server running on it?)"]


def test_serve_turns_an_event_log_failure_into_the_problem(tmp_path: Path) -> None:
    from proxy.serve.server import serve

    path = write(tmp_path, '[events]\npath = "var/events.db"\n[[route]]\npath = "/"\nupstreams = ["127.0.0.1:9"]\n')
    config = load(path)
    (tmp_path / "var").write_text("a file where the directory should be\n")
    with pytest.raises(ConfigError) as info:
        serve(config)
    (problem,) = info.value.problems
    assert problem.line == line_of(path, 'path = "var/events.db"') and "[events].path: cannot write" in problem.message
    assert json.dumps(str(problem))  # one printable line


def test_image_not_built_for_an_aarch64_host(tmp_path: Path) -> None:
    make_image(tmp_path / "images", "site", BUSYBOX)
    path = write(tmp_path, '[[host]]\nname = "board"\nbackend = "libvirt"\nuri = "test:///default"\narch = "aarch64"\n'
                           '[[route]]\npath = "/"\nimage = "site"\n')
    assert_refused(path, 'image = "site"', "has no target 'aarch64'")


def test_an_x86_only_image_passes_with_an_aarch64_host_beside_an_x86_one(tmp_path: Path) -> None:
    """Placement skips hosts whose arch the image lacks: one of the arches is enough."""
    import hashlib

    from proxy.images.manifest import read_manifest, write_manifest

    d = make_image(tmp_path / "images", "site", BUSYBOX)
    manifest = read_manifest(d)
    for name in ("vmlinuz", "initrd.cpio.gz"):
        (d / name).write_bytes(name.encode())
    manifest["targets"]["x86_64"] = {"kernel": "vmlinuz", "kernel_sha256": hashlib.sha256(b"vmlinuz").hexdigest(),
                                     "initrd": "initrd.cpio.gz",
                                     "initrd_sha256": hashlib.sha256(b"initrd.cpio.gz").hexdigest()}
    write_manifest(d, manifest)
    path = write(tmp_path, '[[host]]\nname = "vm"\nbackend = "libvirt"\nuri = "test:///default"\n'
                           '[[host]]\nname = "board"\nbackend = "libvirt"\nuri = "test:///default"\narch = "aarch64"\n'
                           '[[route]]\npath = "/"\nimage = "site"\n')
    res = run("check", path)
    assert res.returncode == 0, res.stdout + res.stderr
