"""The Locust spike harness (loadtests/): its pure helpers, and a smoke run of the runner.

The smoke run starts summon with loadtests/loadtest.toml (process backend) and a tiny
spike (10 users, about 16 s, idle_timeout 2 s), then checks what the runner leaves
behind: Locust's CSVs, the chart, the replica samples and a summary with no failed
request, the cap respected and every pool back at zero.
"""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.helpers.loadtests import load
from tests.helpers.paths import LOADTESTS, REPO

regions = load("regions")
spike = load("spike")


def test_parse_weights() -> None:
    assert regions.parse_weights("eu=6, us=3,ap=1") == {"eu": 6.0, "us": 3.0, "ap": 1.0}
    assert regions.busiest({"eu": 1.0, "us": 3.0}) == "us"
    for bad in ("", "eu", "eu=x", "eu=-1", "eu=1,eu=2", "eu=0"):
        with pytest.raises(ValueError):
            regions.parse_weights(bad)


def test_weighted_cycle_is_exact_and_starts_with_the_busiest() -> None:
    cycle = regions.WeightedCycle({"eu": 6.0, "us": 3.0, "ap": 1.0})
    picks = [cycle.next() for _ in range(20)]
    assert picks[0] == "eu"
    assert picks.count("eu") == 12 and picks.count("us") == 6 and picks.count("ap") == 2


def test_profile_shape() -> None:
    p = regions.PROFILES["quick"]
    phases = dict((name, (a, b)) for name, a, b in p.phases())
    assert p.users_at(0)[0] == p.quiet_users
    assert p.users_at(phases["plateau"][0] + 1)[0] == p.peak_users
    mid_decay = sum(phases["decay"]) / 2
    assert 0 < p.users_at(mid_decay)[0] < p.peak_users
    assert p.users_at(phases["tail"][0] + 0.5)[0] == 0
    assert p.users_at(p.total_s) is None
    # the surge reaches the peak within the surge phase
    users, rate = p.users_at(phases["surge"][0])
    assert users == p.peak_users and rate * p.surge_s >= p.peak_users - p.quiet_users
    # every profile's tail outlasts its idle timeout, so pools can reach zero
    for prof in regions.PROFILES.values():
        assert prof.tail_s > prof.idle_timeout_s


def test_generated_config_round_trips(tmp_path: Path) -> None:
    prof = regions.PROFILES["libvirt"]
    data = spike.make_config(LOADTESTS / "loadtest.toml", tmp_path, prof, "libvirt", "test:///default", 1234, 1235)
    again = tomllib.loads((tmp_path / "summon.toml").read_text())
    assert again == data
    assert again["proxy"]["listen"] == "127.0.0.1:1234"
    assert again["limits"]["max_instances"] == prof.max_instances
    assert all(h["backend"] == "libvirt" and h["uri"] == "test:///default" for h in again["host"])
    assert Path(again["images"]["dir"]).is_absolute()


def test_events_max_live() -> None:
    ev = [
        {"ts": 1, "kind": "summoned", "instance": "a", "region": "eu"},
        {"ts": 2, "kind": "summoned", "instance": "b", "region": "eu"},
        {"ts": 3, "kind": "stopped", "instance": "a", "region": "eu"},
        {"ts": 4, "kind": "summoned", "instance": "c", "region": "us"},
    ]
    assert spike.events_max_live(ev) == (2, {"eu": 2, "us": 1})


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_spike_runner_smoke(tmp_path: Path) -> None:
    if shutil.which("busybox") is None:
        pytest.skip("busybox (the decks image's unix target) is not installed")
    out = tmp_path / "spike"
    proc = subprocess.run(
        [sys.executable, str(LOADTESTS / "spike.py"), "--profile", "tiny", "--out", str(out), "--settle", "15"],
        cwd=REPO, capture_output=True, text=True, timeout=170,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("spike_stats.csv", "spike_stats_history.csv", "spike_failures.csv", "chart.png",
                 "summary.txt", "replicas.csv", "events.jsonl", "summon.toml"):
        assert (out / name).exists(), name
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with (out / "spike_stats.csv").open() as f:
        agg = next(r for r in csv.DictReader(f) if r["Name"] == "Aggregated")
    assert int(agg["Request Count"]) > 0
    assert int(agg["Failure Count"]) == 0
    summary = (out / "summary.txt").read_text()
    assert "result: PASS" in summary
    assert "back to zero       yes" in summary
    with (out / "replicas.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows and max(int(r["total"]) for r in rows) >= 1
    assert int(rows[-1]["total"]) == 0
