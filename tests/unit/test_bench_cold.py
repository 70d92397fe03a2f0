"""Unit tests of the pure parts of the bench's `cold_vm` section (loadtests/bench_cold.py):
summon's own time per cold start, and which start modes a run measures."""

from __future__ import annotations

import pytest

from tests.helpers.loadtests import load

cold = load("bench_cold")


def test_own_time_is_the_client_wait_outside_the_ready_duration_plus_preparing_the_call() -> None:
    # 1.2 s at the client, 1.19 s from the summons to the first answer, 2 ms preparing
    ready = [(1.19, {"prepare": 0.002, "qemu_up": 0.4}), (0.020, {"resume": 0.008, "first_response": 0.012})]
    assert cold.own_ms([1.2, 0.0235], ready) == [12.0, 3.5]


def test_own_time_is_not_guessed_when_requests_and_starts_do_not_pair() -> None:
    """A start no request caused (or a request served warm) would shift every pair."""
    assert cold.own_ms([1.2, 1.3], [(1.19, {})]) == []


def test_start_modes_from_the_environment_in_the_benchs_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUMMON_BENCH_VM_KINDS", "resume, boot")
    assert cold.bench_vm_kinds() == ["boot", "resume"]
    monkeypatch.delenv("SUMMON_BENCH_VM_KINDS")
    assert cold.bench_vm_kinds() == ["boot", "restore", "resume"]
    monkeypatch.setenv("SUMMON_BENCH_VM_KINDS", "boot,warm")
    with pytest.raises(SystemExit, match="unknown start mode.*warm"):
        cold.bench_vm_kinds()
