"""The learning shell (proxy/runtime/learning.py): bounded, sampled request records and the
persisted table. The maths is tested in tests/unit/engine/test_prefetch.py."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from proxy.config import Config, Host, Limits, PrefetchSettings, ProxySettings, Route
from proxy.engine.fleet import Fleet
from proxy.runtime import learning
from proxy.runtime.learning import Learning, load_table, save_table


class Log:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.events: list[Any] = []

    def record(self, event: Any) -> None:
        self.events.append(event)


def make(tmp_path: Path, **settings: Any) -> tuple[Learning, Log, Fleet]:
    prefetch = PrefetchSettings(**settings)
    cfg = Config(path="x", proxy=ProxySettings(), limits=Limits(), regions=(), hosts=(), routes=(),
                 images_dir=tmp_path, events_path=tmp_path / "e.db", prefetch=prefetch)
    fleet = Fleet(Limits(), (Host("h", "local"),), prefetch=prefetch)
    fleet.set_routes([Route(name="a", url="/a", image="a", presummon=True), Route(name="b", url="/b", image="b")], 0)
    log = Log(tmp_path / "e.db")
    loop = asyncio.new_event_loop()
    try:
        return Learning(cfg, log, fleet, loop), log, fleet  # type: ignore[arg-type]
    finally:
        loop.close()


def test_only_routes_that_pre_summon_are_recorded_with_a_client_hash(tmp_path: Path) -> None:
    learn, log, _ = make(tmp_path)
    assert learn.routes == {"a"}
    learn.observe("a", "10.0.0.1")
    learn.observe("a", "10.0.0.1")
    (e1, e2) = log.events
    assert e1.kind == "request" and e1.detail["client"] == e2.detail["client"] and "10.0.0.1" not in str(e1)
    assert (tmp_path / "e.db.prefetch-key").stat().st_mode & 0o777 == 0o600
    again, _, _ = make(tmp_path)  # a second worker: the same key, the same hash
    assert again._salt == learn._salt


def test_the_record_is_bounded_per_second(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr(learning, "MAX_PER_S", 5.0)
    learn, log, _ = make(tmp_path)
    learn._tokens = 5.0
    learn.loop = type("L", (), {"time": staticmethod(lambda: learn._refilled)})()  # a clock that stands still
    for _ in range(50):
        learn.observe("a", "10.0.0.2")
    assert len(log.events) == 5


def test_clients_outside_the_sample_are_never_recorded(tmp_path: Path) -> None:
    learn, log, _ = make(tmp_path, learn_sample=0.1)
    for n in range(200):
        learn.observe("a", f"10.0.1.{n}")
    assert 0 < len(log.events) < 60  # about 20


def test_the_table_persists_and_reaches_the_engine_at_start(tmp_path: Path) -> None:
    save_table(tmp_path / "e.db.prefetch.json", {"a": ("b",)}, 1.0)
    assert load_table(tmp_path / "e.db.prefetch.json") == {"a": ("b",)}
    _, _, fleet = make(tmp_path)
    assert fleet.prefetch.followers("a") == ("b",)
    (tmp_path / "e.db.prefetch.json").write_text("{not json")
    assert load_table(tmp_path / "e.db.prefetch.json") == {}
