"""Metric names and values after a scripted run (in-process, fake driver)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import uvloop
from prometheus_client.parser import text_string_to_metric_families

from proxy.backends.fake import FakeBackend
from tests.integration.test_summoner import ROUTE, get, start, write_config


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_after_a_scripted_run(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, ROUTE.format(name="site", path="/site", interval="0"))

    async def scenario() -> dict:
        rt, port = await start(cfg, FakeBackend())
        try:
            for _ in range(5):
                assert (await get(port, "/site"))[0] == 200
            assert (await get(port, "/nowhere"))[0] == 404
            await asyncio.sleep(0.05)
            body, ctype = rt.metrics.render()
            assert ctype.startswith("text/plain")
            return samples(body.decode())
        finally:
            from proxy.serve.server import drain

            await drain(rt, 1.0)

    m = uvloop.run(scenario())
    assert m[("summon_requests_total", (("route", "site"), ("status", "200")))] == 5
    assert m[("summon_requests_total", (("route", ""), ("status", "404")))] == 1
    # the first request waited for the boot (cold); the other four were warm
    assert m[("summon_request_duration_seconds_count", (("kind", "cold"), ("route", "site")))] == 1
    assert m[("summon_request_duration_seconds_count", (("kind", "warm"), ("route", "site")))] == 4
    assert m[("summon_boots_total", (("route", "site"),))] == 1
    assert m[("summon_boot_duration_seconds_count", (("route", "site"),))] == 1
    assert m[("summon_instances", (("region", "local"), ("route", "site"), ("state", "ready")))] == 1
    assert m[("summon_instances_live", ())] == 1
    assert m[("summon_instance_cap", ())] == 16
    assert m[("summon_queue_depth", (("route", "site"),))] == 0
