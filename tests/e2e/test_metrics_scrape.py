"""The Grafana dashboard (plugins/grafana/summon-dashboard.json) against a real summon's
/metrics after it summoned an instance and answered through it: every metric its queries
name is in the scrape, with every label the queries group by."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import pytest

from tests.helpers.summon_proc import BUSYBOX, Summon, http_get, make_image
from tests.unit.observe.test_grafana_dashboard import NAME, queries, series_names

pytestmark = pytest.mark.slow
BY = re.compile(r"by \(([^)]*)\) \((?:rate|increase)?\(?(summon_[a-z0-9_]+)")


def test_the_dashboards_metrics_and_labels_are_in_a_real_scrape(tmp_path: Path) -> None:
    make_image(tmp_path / "images", "site", BUSYBOX)
    summon = Summon(tmp_path, '[[route]]\nname = "site"\nhost = "site"\npath = "/"\nimage = "site"\n').start()
    try:
        assert http_get(summon.port, "/", host="site")[0] == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{summon.admin_port}/metrics", timeout=10) as r:
            text = r.read().decode()
    finally:
        summon.stop()
    exported = series_names(text)
    used = {n for q in queries() for n in NAME.findall(q)}
    assert used <= exported, sorted(used - exported)
    labels: dict[str, set[str]] = {}
    for line in text.splitlines():
        if line.startswith("summon_") and "{" in line:
            name, _, rest = line.partition("{")
            labels.setdefault(name, set()).update(k for k, _, _ in (p.partition("=") for p in rest.split("}")[0].split(",")))
    grouped = [found for q in queries() for found in BY.findall(q)]
    assert len(grouped) >= 10  # the pattern still reads the dashboard's queries
    for by, name in grouped:
        if name in labels:  # a metric with no sample yet (no 503 in this run) has no labels to show
            assert {b.strip() for b in by.split(",")} <= labels[name], (name, by, labels[name])
