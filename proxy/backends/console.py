"""Where a microVM's boot goes, read from its serial console.

How this works: the guest writes two kinds of timestamped lines to its console (a file
QEMU appends to): the kernel's own ``[    1.426293] Run /init as init process`` (printk
time, the kernel's clock from its start), and PID 1's marks, which it writes to
/dev/kmsg at level 2 so they pass ``quiet`` and carry the same clock:
``[    1.653849] summon-mark: network``. `ConsoleTail` reads the file every few
milliseconds from a thread and notes when each line arrived on the host's clock
(`time.monotonic`, the clock of asyncio's loop and so of the summoner). A mark is
printed as PID 1 writes it, so its arrival is its host time, at most a poll late.

The guest's clock places what happened before PID 1 could print: ``kernel_init`` (the
kernel hands over to /init: the ring buffer's line, which PID 1 copies to the console
later) and ``kernel_entry`` (the kernel's clock zero: its TSC set-up, a few ms after
the decompressed kernel starts). But under TCG on a loaded host the guest's TSC
calibration can fail and its clock run at a wrong rate (seen here: 45 guest seconds in
a 4 s boot). So the guest clock is believed only when, between PID 1's first and last
marks, it agrees with the host's arrivals (`RATE_TOLERANCE`) and puts its zero after
the vCPUs started; otherwise those two marks are left out, and the phase after a
missing mark covers both.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

POLL_S = 0.003  # the arrival times' resolution; reading a small file is cheap
MAX_WATCH_S = 300.0  # a tail nobody stopped ends by itself
MAX_BYTES = 1 << 20  # a chatty guest cannot make us hold more than this

# A start's phases in the order they happen, each named by what ends it (see
# `LibvirtBackend.boot_marks`; `summon stats` and the dashboard show them in this order).
PHASES = ("prepare", "libvirt_create", "qemu_up", "restore", "firmware", "kernel_init", "init", "network",
          "server", "first_response")

MARK = "summon-mark:"  # PID 1's lines: "summon-mark: NAME"
GUEST_MARKS = ("init", "network", "listening")
_LINE = re.compile(r"^\[\s*(\d+\.\d+)\]\s?(.*)$")
KERNEL_INIT = "Run /init as init process"

Line = tuple[float, str]  # (host arrival time, text)


def timestamped(lines: Iterable[Line]) -> list[tuple[float, float, str]]:
    """(arrival, guest seconds, text) of each line that starts with a printk time."""
    out = []
    for arrival, text in lines:
        m = _LINE.match(text.strip("\r"))
        if m:
            out.append((arrival, float(m.group(1)), m.group(2).strip()))
    return out


def guest_marks(lines: Iterable[Line], running_at: float | None = None) -> dict[str, float]:
    """Host times of the guest's boundaries (see the module docstring); {} without any.

    `running_at`: when the vCPUs started (host clock), the earliest the kernel can start."""
    stamped = timestamped(lines)
    out: dict[str, float] = {}
    guest: dict[str, float] = {}
    for arrival, g, text in stamped:
        if text.startswith(KERNEL_INIT):
            guest.setdefault("kernel_init", g)
        elif text.startswith(MARK):
            name = text[len(MARK):].strip()
            if name in GUEST_MARKS and name not in out:
                out[name] = arrival
                guest[name] = g
    names = [n for n in GUEST_MARKS if n in out]
    if not names or not clock_believable(out, guest, names, running_at):
        return out
    first = names[0]
    zero = out[first] - guest[first]
    out["kernel_entry"] = zero if running_at is None else max(zero, running_at)  # within SLACK_S: not before
    if "kernel_init" in guest and guest["kernel_init"] <= guest[first]:
        out["kernel_init"] = zero + guest["kernel_init"]
    return dict(sorted(out.items(), key=lambda kv: kv[1]))


RATE_TOLERANCE = 0.2  # the guest's clock may differ from the host's by this share ...
SLACK_S = 0.02  # ... or this much (the polls' and the console's own delays)


def clock_believable(host: dict[str, float], guest: dict[str, float], names: list[str],
                     running_at: float | None) -> bool:
    first, last = names[0], names[-1]
    host_span, guest_span = host[last] - host[first], guest[last] - guest[first]
    if abs(guest_span - host_span) > max(SLACK_S, RATE_TOLERANCE * host_span):
        return False
    zero = host[first] - guest[first]
    return running_at is None or zero >= running_at - SLACK_S


class ConsoleTail:
    """Note when each line of a growing console file arrives, until `stop` (bounded)."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.monotonic, poll_s: float = POLL_S) -> None:
        self.path = path
        self.clock = clock
        self.poll_s = poll_s
        self.lines: list[Line] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"console {path.name}", daemon=True)

    def start(self) -> ConsoleTail:
        self._thread.start()
        return self

    def stop(self) -> list[Line]:
        """Stop reading (after one last read) and return the lines so far."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(1.0)
        return list(self.lines)

    def _run(self) -> None:
        deadline = self.clock() + MAX_WATCH_S
        partial, read = b"", 0
        f = None
        try:
            while self.clock() < deadline and read < MAX_BYTES:
                stopping = self._stop.is_set()
                if f is None:
                    try:
                        f = self.path.open("rb")
                    except OSError:
                        f = None
                if f is not None:
                    data = f.read(MAX_BYTES - read)
                    if data:
                        now = self.clock()
                        read += len(data)
                        partial += data
                        *done, partial = partial.split(b"\n")
                        self.lines += [(now, ln.decode(errors="replace")) for ln in done]
                if stopping:
                    return
                self._stop.wait(self.poll_s)
        finally:
            if f is not None:
                f.close()
