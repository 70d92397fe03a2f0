"""The console's marks: which host times the guest's lines give, and when the guest clock is believed."""

from __future__ import annotations

import time
from pathlib import Path

from proxy.backends.console import ConsoleTail, guest_marks, timestamped


def lines(*pairs: tuple[float, str]) -> list[tuple[float, str]]:
    return list(pairs)


def test_marks_take_the_arrival_and_the_kernel_is_placed_by_the_guest_clock() -> None:
    got = guest_marks(lines(
        (10.0, "[    0.000000] Linux version 6.1"),  # before the TSC is set up: says nothing about time
        (11.50, "[    1.500000] summon-mark: init"),
        (11.81, "[    1.800000] summon-mark: network"),
        (11.84, "[    1.830000] summon-mark: listening"),
        (11.90, "[    1.450000] Run /init as init process"),  # copied from the ring buffer, later
    ), running_at=9.5)
    assert list(got) == ["kernel_entry", "kernel_init", "init", "network", "listening"]
    assert got["init"] == 11.50 and got["network"] == 11.81 and got["listening"] == 11.84
    assert abs(got["kernel_entry"] - 10.0) < 1e-9  # 11.5 s host - 1.5 s guest
    assert abs(got["kernel_init"] - 11.45) < 1e-9


def test_a_guest_clock_at_the_wrong_rate_is_not_believed() -> None:
    # seen under TCG on a loaded host: a failed TSC calibration, 6.7 guest seconds in 0.7 host seconds
    got = guest_marks(lines(
        (3.881, "[   45.146850] summon-mark: init"),
        (4.421, "[   51.701422] summon-mark: network"),
        (4.556, "[   51.837834] summon-mark: listening"),
        (4.602, "[   42.033955] Run /init as init process"),
    ), running_at=0.3)
    assert got == {"init": 3.881, "network": 4.421, "listening": 4.556}


def test_a_clock_zero_before_the_vcpus_ran_is_not_believed() -> None:
    got = guest_marks(lines((2.0, "[    1.900000] summon-mark: init")), running_at=1.0)
    assert got == {"init": 2.0}


def test_a_zero_just_before_the_vcpus_is_placed_at_them() -> None:
    got = guest_marks(lines((2.0, "[    0.995000] summon-mark: init")), running_at=1.01)
    assert got["kernel_entry"] == 1.01


def test_no_marks_no_times() -> None:
    assert guest_marks(lines((1.0, "summon: httpd on :80"), (1.1, "[    0.000000] early"))) == {}
    assert timestamped([(1.0, "[ 12.5] x\r")]) == [(1.0, 12.5, "x")]


def test_unknown_and_repeated_marks_are_ignored() -> None:
    got = guest_marks(lines((5.0, "[    1.0] summon-mark: init"), (6.0, "[    2.0] summon-mark: init"),
                            (6.5, "[    2.5] summon-mark: bogus")))
    assert got["init"] == 5.0 and "bogus" not in got


def test_tail_notes_lines_as_they_arrive(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    clock = iter(range(1, 10_000))
    tail = ConsoleTail(log, clock=lambda: float(next(clock)), poll_s=0.001).start()
    with log.open("ab") as f:  # QEMU appends; the tail opens the file once it exists
        f.write(b"[    1.0] summon-mark: init\n[    1.1] summon-")
        f.flush()
        deadline = time.monotonic() + 10
        while len(tail.lines) < 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        f.write(b"mark: network\n")
    got = tail.stop()
    assert [t for _a, t in got][:2] == ["[    1.0] summon-mark: init", "[    1.1] summon-mark: network"]
    assert got[0][0] < got[1][0]  # the partial line was completed on a later read
