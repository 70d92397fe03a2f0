"""The overload bench's open-loop generator against a real server that answers late:
goodput counts the answers that came while the arrivals went on, not the tail's."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from pathlib import Path

from tests.helpers.loadtests import load

bo = load("bench_overload")
DELAY_S = 0.6


def slow_server() -> tuple[int, threading.Event]:
    """Answers every GET 200 after DELAY_S, keep-alive; runs in a thread until `stop` is set."""
    started = threading.Event()
    stop = threading.Event()
    port: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                await asyncio.sleep(DELAY_S)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port.append(server.sockets[0].getsockname()[1])
        started.set()
        while not stop.is_set():
            await asyncio.sleep(0.05)
        server.close()

    threading.Thread(target=lambda: asyncio.run(main()), daemon=True).start()
    assert started.wait(5)
    return port[0], stop


def test_answers_after_the_arrivals_stop_are_not_goodput(tmp_path: Path) -> None:
    port, stop = slow_server()
    try:
        script = tmp_path / "openloop.py"
        script.write_text(bo.GENERATOR)
        # 40/s for 1 s, then a 1 s tail: every answer comes DELAY_S after its request,
        # so those sent in the last DELAY_S of the second arrive in the tail.
        cp = subprocess.run([sys.executable, str(script), "127.0.0.1", str(port), "40", "1", "64", "1"],
                            capture_output=True, text=True, timeout=30, check=True)
    finally:
        stop.set()
    r = json.loads(cp.stdout.strip().splitlines()[-1])
    assert r["ok"] == r["sent"] >= 38 and r["unanswered"] == 0, r
    assert r["goodput_with_tail_per_s"] == r["ok"] / 1.0
    # about (1 - DELAY_S) of the second's answers came within it: 16, give or take the scheduling
    assert 8 <= r["ok_in_window"] <= 24, r
    assert r["goodput_per_s"] == r["ok_in_window"] / 1.0
