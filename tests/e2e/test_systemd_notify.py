"""summon under systemd's Type=notify, without systemd: a real `summon serve` with
NOTIFY_SOCKET pointing at a unix datagram socket this test listens on (what systemd
does), and the shipped unit file's promises (plugins/systemd/summon.service)."""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.paths import REPO
from tests.helpers.summon_proc import BUSYBOX, Summon, make_image

pytestmark = pytest.mark.slow
ROUTES = '[[route]]\nname = "site"\nhost = "site"\npath = "/"\nimage = "site"\n'


@pytest.fixture
def notify() -> Iterator[tuple[socket.socket, Path]]:
    """What systemd listens on: a unix datagram socket (sun_path is short: not under tmp_path)."""
    path = Path("/tmp") / f"summon-notify-{time.monotonic_ns()}.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(20)
        try:
            yield sock, path
        finally:
            path.unlink(missing_ok=True)


def message(notify: tuple[socket.socket, Path]) -> dict[str, str]:
    data = notify[0].recv(4096).decode()
    return dict(line.partition("=")[::2] for line in data.split("\n") if line)


def accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def test_ready_after_listening_reloading_around_sighup_and_stopping_on_drain(
        tmp_path: Path, notify: tuple[socket.socket, Path]) -> None:
    make_image(tmp_path / "images", "site", BUSYBOX)
    summon = Summon(tmp_path, ROUTES)
    summon.env["NOTIFY_SOCKET"] = str(notify[1])
    summon.start()
    try:
        ready = message(notify)
        # READY=1 means it already accepts: both ports, at the moment the message is read
        assert ready["READY"] == "1" and accepts(summon.port) and accepts(summon.admin_port)
        assert "listening on" in ready["STATUS"]
        assert summon.proc is not None
        summon.proc.send_signal(signal.SIGHUP)
        reloading = message(notify)
        assert reloading["RELOADING"] == "1" and int(reloading["MONOTONIC_USEC"]) > 0
        assert message(notify)["READY"] == "1"
        summon.proc.send_signal(signal.SIGTERM)
        assert message(notify)["STOPPING"] == "1"
        assert summon.proc.wait(20) == 0
    finally:
        summon.stop()


def test_without_notify_socket_nothing_is_sent_and_a_missing_one_is_no_error() -> None:
    from proxy.serve.notify import Notifier

    env: dict[str, str] = {}
    assert Notifier.from_environ(env).ready() is False
    env = {"NOTIFY_SOCKET": "/nonexistent/notify.sock"}
    notifier = Notifier.from_environ(env)
    assert "NOTIFY_SOCKET" not in env  # instances started later do not inherit it
    assert notifier.ready() is False  # a missing socket is reported, never raised


def test_the_unit_file_reloads_with_sighup_and_stops_with_the_draining_signal() -> None:
    unit = (REPO / "plugins" / "systemd" / "summon.service").read_text()
    settings = dict(line.split("=", 1) for line in unit.splitlines() if "=" in line and not line.startswith("#"))
    assert settings["Type"] == "notify" and settings["NotifyAccess"] == "all"
    assert settings["ExecReload"] == "/bin/kill -HUP $MAINPID"
    # SIGTERM is what proxy/serve/server.py drains on; mixed: only the main process gets it
    # (a worker that got it twice, from systemd and from its parent, would cut its drain short)
    assert settings["KillSignal"] == "SIGTERM" and settings["KillMode"] == "mixed"
    source = (REPO / "proxy" / "serve" / "server.py").read_text()
    assert "for sig in (signal.SIGTERM, signal.SIGINT):\n        loop.add_signal_handler(sig, on_stop)" in source
