"""Fixtures for the front-proxy tests: a loop thread, a recording upstream, a proxy factory."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.net import LoopThread, ProxyUnderTest, RecordingUpstream


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture
def upstream(loop_thread: LoopThread) -> Iterator[RecordingUpstream]:
    up = RecordingUpstream(loop_thread).start()
    yield up
    up.close()


ProxyFactory = Callable[..., ProxyUnderTest]


@pytest.fixture
def make_proxy(loop_thread: LoopThread, upstream: RecordingUpstream, tmp_path: Path) -> Iterator[ProxyFactory]:
    """`make_proxy(routes=None, **proxy_settings)`: a running proxy; by default one
    catch-all route to the recording upstream."""
    started: list[ProxyUnderTest] = []

    def make(routes: list[dict[str, Any]] | None = None, **proxy: Any) -> ProxyUnderTest:
        if routes is None:
            routes = [{"path": "/", "upstreams": [upstream.address]}]
        directory = tmp_path / f"proxy{len(started)}"
        directory.mkdir()
        p = ProxyUnderTest(loop_thread, directory, proxy, routes)
        started.append(p)
        return p

    yield make
    for p in started:
        p.stop()


@pytest.fixture
def proxy(make_proxy: ProxyFactory) -> ProxyUnderTest:
    return make_proxy()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Stop, by PID, the libvirt daemons this run started (tests/helpers/vm_images.py);
    one that was running before the run is left running."""
    from tests.helpers.vm_images import stop_started_daemons

    stop_started_daemons()
