"""plugins/grafana/summon-dashboard.json asks Prometheus only for metrics summon exports:
every `summon_*` name in its queries is one that proxy.observe.metrics renders (a renamed
metric would otherwise leave a panel empty without a word). Grafana does not install here;
tests/e2e/test_metrics_scrape.py checks the same against a real summon's /metrics."""

from __future__ import annotations

import json
import re

from prometheus_client import generate_latest

from proxy.observe.metrics import Metrics
from tests.helpers.paths import REPO

DASHBOARD = REPO / "plugins" / "grafana" / "summon-dashboard.json"
NAME = re.compile(r"\bsummon_[a-z0-9_]+")
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"), "gauge": ("",)}


def queries() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in board["panels"] for t in p["targets"]]


def series_names(exposition: str) -> set[str]:
    """The series names a scrape can have, from its `# TYPE` lines."""
    names = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            base = name.removesuffix("_total") if kind == "counter" else name
            names |= {base + s for s in SUFFIXES.get(kind, ("",))}
    return names


def test_every_metric_the_dashboard_queries_is_exported() -> None:
    exported = series_names(generate_latest(Metrics(status=lambda: {"routes": [], "totals": {}},
                                                    overload=lambda: {}).registry).decode())
    used = {n for q in queries() for n in NAME.findall(q)}
    assert used and used <= exported, sorted(used - exported)


def test_the_dashboard_covers_traffic_instances_boots_and_overload() -> None:
    used = {n for q in queries() for n in NAME.findall(q)}
    for needed in ("summon_requests_total", "summon_request_duration_seconds_bucket", "summon_instances",
                   "summon_boot_duration_seconds_bucket", "summon_shed_requests_total"):
        assert needed in used
    board = json.loads(DASHBOARD.read_text())
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])  # Grafana keys panels by id
