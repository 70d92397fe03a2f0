"""The admin API against its description (docs/admin-api.yaml), and its access rules.

A real `summon serve` (a static route, and a summoned one on the process backend so
/status has instances) with `admin_token`. schemathesis generates requests from the
description, valid ones and invalid ones (wrong types, out-of-range `n`, missing form
fields, unknown methods, no auth), and checks each answer against it: documented status,
content type, schema and headers, 4xx for bad input, 401 without the token. On top, every
4xx must leave the proxy as it was: the same routes and instances, no reload recorded.
"""

from __future__ import annotations

import sqlite3
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from tests.helpers.paths import REPO
from tests.helpers.summon_proc import BUSYBOX, Summon, make_image

SPEC = REPO / "docs" / "admin-api.yaml"
TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

schema = schemathesis.openapi.from_path(SPEC)
schema.config.generation.update(modes=[schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE],
                                max_examples=50)


@pytest.fixture(scope="module")
def summon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Summon]:
    tmp = tmp_path_factory.mktemp("admin-api")
    make_image(tmp / "images", "site", BUSYBOX)
    routes = ('[[route]]\nname = "static"\npath = "/static"\nupstreams = ["127.0.0.1:9"]\n'
              '[[route]]\nname = "site"\npath = "/"\nimage = "site"\nmin_replicas = 1\n')
    s = Summon(tmp, routes, f'admin_token = "{TOKEN}"').start()
    try:
        def ready() -> bool:  # the site's own instance: the static route's upstream is always "ready"
            return any(i["state"] == "ready" for r in get_status(s)["routes"] if r["name"] == "site"
                       for i in r["instances"])

        deadline = time.monotonic() + 60  # a busy machine: the fingerprints below need it settled
        while time.monotonic() < deadline and not ready():
            time.sleep(0.1)
        assert ready(), "the min_replicas instance did not become ready"
        yield s
    finally:
        s.stop()


def admin(s: Summon, path: str, method: str = "GET", headers: dict[str, str] | None = None,
          data: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{s.admin_port}{path}", method=method, data=data,
                                 headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def get_status(s: Summon) -> dict[str, Any]:
    import json

    status, _, body = admin(s, "/status", headers=AUTH)
    assert status == 200, body
    return dict(json.loads(body))


def fingerprint(s: Summon) -> tuple[object, ...]:
    """What a request could change: the routes and their instances, and reloads recorded."""
    routes = [(r["name"], sorted((i["id"], i["state"]) for i in r["instances"])) for r in get_status(s)["routes"]]
    with sqlite3.connect(f"file:{s.events}?mode=ro", uri=True) as db:
        reloads = db.execute("SELECT count(*) FROM events WHERE kind = 'reload'").fetchone()[0]
    return tuple(sorted(routes)), reloads


@pytest.mark.timeout(120)
@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_admin_api_matches_its_description(case: schemathesis.Case, summon: Summon) -> None:
    base = f"http://127.0.0.1:{summon.admin_port}"
    before = fingerprint(summon)
    response = case.call(base_url=base, headers=AUTH if case.operation.path != "/login" else None)
    case.validate_response(response, headers=AUTH)
    if 400 <= response.status_code < 500:
        # events may be recorded meanwhile (instances), but no reload and no instance change
        assert fingerprint(summon) == before, (case.method, case.path, response.status_code)


def test_every_endpoint_asks_for_the_token(summon: Summon) -> None:
    for method, path in [("GET", "/status"), ("GET", "/events"), ("GET", "/metrics"), ("GET", "/"),
                         ("GET", "/index.html"), ("POST", "/reload"), ("GET", "/nowhere"),
                         ("POST", "/images/deploy"), ("POST", "/images/rollback")]:
        for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789abc"}, {"Authorization": TOKEN},
                        {"Authorization": f"Basic {TOKEN}"}, {"Cookie": "summon_admin=forged"}):
            status, got, body = admin(summon, path, method, headers, b"" if method == "POST" else None)
            assert status == 401, (method, path, headers, status)
            assert got["WWW-Authenticate"].startswith('Bearer realm="summon admin"')
            assert b"routes" not in body and b"summon_" not in body, "nothing of the fleet before the token"
        status, _, _ = admin(summon, path, method, AUTH, b"" if method == "POST" else None)
        # (with the token, an empty body is the deploys' own 400: past the token check)
        assert status == (404 if path == "/nowhere" else 400 if path.startswith("/images/") else 200), (path, status)


def test_prometheus_style_scrape_with_a_bearer_token(summon: Summon) -> None:
    status, headers, body = admin(summon, "/metrics", headers=AUTH)
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert b"summon_" in body


def test_dashboard_signs_in_with_a_cookie_for_reads_only(summon: Summon) -> None:
    status, _, page = admin(summon, "/")
    assert status == 401 and b'action="login"' in page, "a browser gets the sign-in form"
    status, _, page = admin(summon, "/login", "POST", {"Content-Type": "application/x-www-form-urlencoded"},
                            b"token=wrong")
    assert status == 401 and b"not the admin token" in page

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    req = urllib.request.Request(f"http://127.0.0.1:{summon.admin_port}/login", method="POST",
                                 data=f"token={TOKEN}".encode(),
                                 headers={"Content-Type": "application/x-www-form-urlencoded"})
    try:
        urllib.request.build_opener(NoRedirect).open(req, timeout=10)
        raise AssertionError("expected 303")
    except urllib.error.HTTPError as exc:
        assert exc.code == 303
        cookie_header = exc.headers["Set-Cookie"]
    assert "HttpOnly" in cookie_header and "SameSite=Strict" in cookie_header
    cookie = cookie_header.split(";")[0]
    assert TOKEN not in cookie, "the cookie is not the token itself"
    # what the dashboard's polls fetch, with what the browser sends along
    for path in ("/", "/status", "/metrics", "/events?n=30"):
        assert admin(summon, path, headers={"Cookie": cookie})[0] == 200, path
    # the one state-changing endpoint takes the header only: no ambient credential
    assert admin(summon, "/reload", "POST", {"Cookie": cookie}, b"")[0] == 401


def test_bad_input_is_a_4xx(summon: Summon) -> None:
    for path in ("/events?n=abc", "/events?n=0", "/events?n=10001", "/events?n=1&n=2", "/events?route=a&route=b"):
        assert admin(summon, path, headers=AUTH)[0] == 400, path
    status, headers, _ = admin(summon, "/status", "POST", AUTH, b"")
    assert status == 405 and headers["Allow"] == "GET"
    status, headers, _ = admin(summon, "/reload", "GET", AUTH)
    assert status == 405 and headers["Allow"] == "POST"
    assert admin(summon, "/reload", "POST", AUTH, b"x" * 9000)[0] == 413
