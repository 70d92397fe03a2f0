"""curl, wrk and a browser all work through the proxy.

A static route sends everything to busybox httpd serving images/decks/site (with -vv, so
the upstream logs every URL it serves). Chromium loads index.html through the proxy with
its stylesheet, two SVGs and a PNG; curl fetches a page; wrk runs for a second.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.browser import (
    ARTIFACTS,
    SITE,
    Browser,
    Summon,
    dump_dom,
    free_port,
    http_get,
    metric_sum,
    needs_chromium,
    start,
    stop,
    wait_port,
)

ASSETS = ["/style.css", "/logo.svg", "/rss.svg", "/chart.png"]


@dataclass
class Stack:
    summon: Summon
    upstream_log: Path

    def upstream_urls(self) -> list[str]:
        return re.findall(r"url:(\S+)", self.upstream_log.read_text(errors="replace"))

    def requests(self, status: str | None = None) -> float:
        labels = {"route": "site"} if status is None else {"route": "site", "status": status}
        return metric_sum(self.summon.admin, "summon_requests_total", **labels)

    def statuses(self) -> dict[str, float]:
        """summon_requests_total of the route by status, from one scrape."""
        text = http_get(f"{self.summon.admin_url}/metrics")[1].decode()
        found = re.findall(r'^summon_requests_total\{([^}]*)\} (\S+)$', text, re.M)
        out: dict[str, float] = {}
        for labels, value in found:
            if 'route="site"' in labels:
                status = re.search(r'status="(\d+)"', labels)
                key = status.group(1) if status else "?"
                out[key] = out.get(key, 0.0) + float(value)
        return out


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    port = free_port()
    log = tmp_path / "upstream.log"
    upstream = start(["busybox", "httpd", "-f", "-vv", "-p", f"127.0.0.1:{port}", "-h", SITE], log)
    try:
        wait_port(port, upstream)
        route = f"""
[[route]]
name = "site"
host = "*"
path = "/"
upstreams = ["127.0.0.1:{port}"]
"""
        with Summon(tmp_path, route) as summon:
            yield Stack(summon, log)
    finally:
        stop(upstream)


@pytest.mark.slow
def test_curl_through_proxy(stack: Stack) -> None:
    res = subprocess.run(
        ["curl", "-sS", "--noproxy", "*", "-o", "-", "-w", "\\n%{http_code} %{content_type} %{size_download}",
         stack.summon.url + "/about.html"], capture_output=True, text=True, timeout=15)
    assert res.returncode == 0, res.stderr
    body, _, tail = res.stdout.rpartition("\n")
    code, ctype, size = tail.split(" ")
    assert code == "200" and ctype.startswith("text/html"), tail
    assert int(size) == (SITE / "about.html").stat().st_size
    assert body.encode() == (SITE / "about.html").read_bytes()
    assert "/about.html" in stack.upstream_urls()
    assert stack.requests("200") == 1


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk not installed")
def test_wrk_through_proxy(stack: Stack) -> None:
    res = subprocess.run(["wrk", "-t1", "-c4", "-d1s", stack.summon.url + "/style.css"],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    m = re.search(r"(\d+) requests in", out)
    assert m and int(m.group(1)) > 0, out
    assert "Socket errors" not in out, out
    assert "Non-2xx or 3xx responses" not in out, out
    # every request wrk completed was answered by the proxy with 200 (wrk may abandon a few at the end)
    statuses = stack.statuses()
    assert list(statuses) == ["200"], statuses
    assert statuses["200"] >= int(m.group(1)), (statuses, out)


@pytest.mark.browser
@pytest.mark.slow
@needs_chromium
def test_chromium_loads_page_with_assets_through_proxy(stack: Stack) -> None:
    url = stack.summon.url + "/index.html"
    with Browser(size=(1000, 700)) as page:
        page.navigate(url)
        dom = page.dom()
        # the content is there
        assert "<h1>decks</h1>" in dom
        assert "Summoning on demand" in dom and "Where cold starts go" in dom
        # the stylesheet arrived and applies; the images (two SVGs, a PNG) arrived and decoded
        assert page.evaluate("getComputedStyle(document.querySelector('ul.decks')).listStyleType") == "none"
        images = page.evaluate("[...document.images].map(i => [new URL(i.src).pathname, i.complete && i.naturalWidth > 0])")
        assert sorted(images) == sorted([["/logo.svg", True], ["/rss.svg", True], ["/chart.png", True]]), images
        page.screenshot(ARTIFACTS / "site-through-proxy.png")

    # the browser only knew the proxy's address, so everything the upstream served went through it
    urls = stack.upstream_urls()
    for path in ["/index.html", *ASSETS]:
        assert path in urls, f"{path} not fetched through the proxy; upstream saw {urls}"
    assert stack.requests("200") >= 1 + len(ASSETS)
    assert stack.requests() == len(urls), f"proxy answered {stack.requests()}, upstream served {urls}"


@pytest.mark.browser
@pytest.mark.slow
@needs_chromium
def test_chromium_dump_dom_through_proxy(stack: Stack) -> None:
    """The one-shot path (`chromium --dump-dom`), as a smoke test of a second page."""
    dom = dump_dom(stack.summon.url + "/posts/first.html")
    assert "<html" in dom and "Summoning on demand" in dom, dom[:1000]
    assert "/posts/first.html" in stack.upstream_urls()
