"""Rolling deploy and rollback for real: a `summon serve` with the process backend under
`wrk -c32` while `summon images deploy` and `summon images rollback` switch its route
between two built versions of decks, whose bodies say which version answered.

Needs linux-image-cloud-amd64 and busybox-static (for `summon images build`, about a
second a build) and wrk.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from proxy.images.manifest import content_digest, load_image, read_manifest_file
from tests.e2e.test_image_store import checkout, summon
from tests.helpers.paths import REPO
from tests.helpers.summon_proc import SUMMON, Summon, http_get, wait_for

T = TypeVar("T")

WRK = shutil.which("wrk") or "/usr/bin/wrk"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not list(Path("/boot").glob("vmlinuz-*-cloud-amd64")) or not Path("/bin/busybox").is_file(),
                       reason="linux-image-cloud-amd64 or busybox-static not installed"),
    pytest.mark.skipif(not Path(WRK).is_file(), reason="wrk not installed"),
]

# Counts per thread, summed in done(): 2xx, anything else, and which version the body names.
LUA = """
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) ok = 0; bad = 0; one = 0; two = 0; other = 0 end
function response(status, headers, body)
  if status >= 200 and status < 300 then ok = ok + 1 else bad = bad + 1 end
  if body:find("version one", 1, true) then one = one + 1
  elseif body:find("version two", 1, true) then two = two + 1
  else other = other + 1 end
end
function done(summary, latency, requests)
  local t = {ok = 0, bad = 0, one = 0, two = 0, other = 0}
  for _, th in ipairs(threads) do
    for k, _ in pairs(t) do t[k] = t[k] + th:get(k) end
  end
  local e = summary.errors
  io.write(string.format("COUNTS ok=%d bad=%d one=%d two=%d other=%d connect=%d read=%d write=%d timeout=%d status=%d\\n",
    t.ok, t.bad, t.one, t.two, t.other, e.connect, e.read, e.write, e.timeout, e.status))
end
"""

ROUTES = """
[limits]
max_instances = 8
[[route]]
name = "site"
path = "/"
image = "decks"
min_replicas = 2
max_replicas = 4
max_conns = 8
idle_timeout = "10m"
"""


def set_version(root: Path, text: str) -> str:
    """Write the site file that names the version, fix the recipe's digest, build; the new version."""
    images = root / "images"
    (images / "decks/site/v.txt").write_text(text + "\n")
    recipe = images / "decks/image.toml"
    old = read_manifest_file(recipe)["targets"]["unix"]["content_sha256"]
    recipe.write_text(recipe.read_text().replace(old, content_digest(images / "decks/site")))
    r = summon(root, "build", "decks")
    assert r.returncode == 0, r.stdout + r.stderr
    return load_image(images, "decks").digest


def wrk_during(s: Summon, root: Path, seconds: int, after_s: float,
               switch: Callable[[], T]) -> tuple[dict[str, int], str, T]:
    """wrk -c32 for `seconds`; after `after_s`, `switch()`. The counts, their line, and what
    the switch returned."""
    script = root / "count.lua"
    script.write_text(LUA)
    wrk = subprocess.Popen([WRK, "-t2", "-c32", f"-d{seconds}s", "--timeout", "5s", "-s", str(script),
                            f"http://127.0.0.1:{s.port}/v.txt"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    try:
        time.sleep(after_s)
        done = switch()
        out, _ = wrk.communicate(timeout=60)
    finally:
        if wrk.poll() is None:
            wrk.kill()
            wrk.wait()
    m = re.search(r"COUNTS (.*)", out)
    assert m, out
    return {k: int(v) for k, v in (kv.split("=") for kv in m.group(1).split())}, m.group(1), done


def under_load(s: Summon, root: Path, *switch: str) -> tuple[dict[str, int], subprocess.CompletedProcess[str]]:
    """wrk -c32 for 8 s; after 1.5 s, `summon images <switch...> --wait 30`. The counts and the switch's run."""
    counts, line, run = wrk_during(s, root, 8, 1.5,
                                   lambda: summon(root, *switch, "--wait", "30", "-c", str(s.config)))
    print(" ".join(switch), line, run.stdout.strip().replace("\n", " | "))  # the figures, with -s
    return counts, run


def events(s: Summon, kind: str) -> list[dict]:  # type: ignore[type-arg]
    with urllib.request.urlopen(f"http://127.0.0.1:{s.admin_port}/events?n=10000", timeout=5) as r:
        return [e for e in map(json.loads, r.read().decode().splitlines()) if e["kind"] == kind]


def serving(s: Summon) -> set[str]:
    """The versions of the route's live instances."""
    (route,) = [r for r in s.status()["routes"] if r["name"] == "site"]
    return {i["version"] for i in route["instances"] if i["state"] in ("booting", "ready", "draining")}


def test_deploy_and_rollback_under_load_answer_every_request(tmp_path: Path) -> None:
    root = checkout(tmp_path)
    v1 = set_version(root, "version one")
    s = Summon(root, ROUTES).start()
    try:
        assert wait_for(lambda: sum(i["state"] == "ready" for i in s.instances()) == 2, 30), s.instances()
        assert serving(s) == {v1}
        v2 = set_version(root, "version two")  # built while v1 serves: nothing switches by itself
        assert http_get(s.port, "/v.txt")[2] == b"version one\n"

        counts, run = under_load(s, root, "deploy", "decks")  # NAME alone: its latest build
        assert run.returncode == 0, run.stdout + run.stderr
        assert f"{v1} -> {v2}" in run.stdout and "deployed" in run.stdout, run.stdout
        assert counts["bad"] == 0 and counts["other"] == 0, counts
        assert all(counts[k] == 0 for k in ("connect", "read", "write", "timeout", "status")), counts
        assert counts["one"] > 0 and counts["two"] > 0, f"the switch happened under load: {counts}"
        assert serving(s) == {v2}, "afterwards only the new version's instances serve"
        assert {http_get(s.port, "/v.txt")[2] for _ in range(20)} == {b"version two\n"}
        (started,) = events(s, "deploy_started")
        assert started["detail"]["from"] == v1 and started["detail"]["to"] == v2 and started["detail"]["surge"] == 2

        counts, run = under_load(s, root, "rollback", "decks")
        assert run.returncode == 0, run.stdout + run.stderr
        assert f"{v2} -> {v1}" in run.stdout, run.stdout
        assert counts["bad"] == 0 and counts["other"] == 0, counts
        assert all(counts[k] == 0 for k in ("connect", "read", "write", "timeout", "status")), counts
        assert counts["one"] > 0 and counts["two"] > 0, counts
        assert serving(s) == {v1}
        assert {http_get(s.port, "/v.txt")[2] for _ in range(20)} == {b"version one\n"}
        deployed = [(e["detail"]["from"], e["detail"]["to"], e["detail"]["reason"]) for e in events(s, "deployed")]
        assert deployed == [(v1, v2, "deploy"), (v2, v1, "rollback")], deployed

        missing = "sha256:" + "0" * 64
        r = summon(root, "deploy", f"decks@{missing}", "-c", str(s.config))
        assert r.returncode == 1 and "does not hold" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert serving(s) == {v1}
    finally:
        s.stop()

    # a restart keeps the deployed version (v1), not the latest build (v2)
    s.start()
    try:
        assert http_get(s.port, "/v.txt")[2] == b"version one\n"
        assert serving(s) == {v1}
    finally:
        s.stop()
    time.sleep(0.2)

    # `history`: each version with the time ranges it served, from this run's event log
    r = summon(root, "history", "decks", "-c", str(s.config))
    assert r.returncode == 0, r.stderr
    print(r.stdout)
    rows = {line.split()[3][:24]: line for line in r.stdout.splitlines()[1:]}
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"
    ranges = re.compile(rf"{stamp} \.\. {stamp}")
    assert len(ranges.findall(rows[v2[:24]])) == 1, rows[v2[:24]]  # from the deploy to the rollback
    assert int(re.search(r"\((\d+) instance\(s\)\)", rows[v2[:24]]).group(1)) >= 2, rows[v2[:24]]  # type: ignore[union-attr]
    # v1 served, was replaced by v2, and served again after the rollback: two ranges at least
    assert len(ranges.findall(rows[v1[:24]])) >= 2, rows[v1[:24]]
    assert "deployed (rollback" in rows[v1[:24]] and "deployed" not in rows[v2[:24]], rows


def test_a_reload_that_changes_a_pin_is_the_same_rolling_switch(tmp_path: Path) -> None:
    root = checkout(tmp_path)
    v1 = set_version(root, "version one")
    v2 = set_version(root, "version two")
    pinned = ROUTES.replace('image = "decks"', f'image = "decks@{v1}"')
    s = Summon(root, pinned).start()
    try:
        assert wait_for(lambda: sum(i["state"] == "ready" for i in s.instances()) == 2, 30), s.instances()
        assert http_get(s.port, "/v.txt")[2] == b"version one\n"
        r = summon(root, "deploy", "decks", "-c", str(s.config))  # the config's pin wins
        assert r.returncode == 1 and "no route follows image 'decks'" in r.stderr and "site" in r.stderr, r.stderr
        s.config.write_text(s.config.read_text().replace(f"decks@{v1}", f"decks@{v2}"))
        env = dict(os.environ, PYTHONPATH=str(REPO))

        def reload() -> None:
            run = subprocess.run([*SUMMON, "reload", "-c", str(s.config)], cwd=root, env=env, capture_output=True,
                                 text=True, timeout=60)
            assert run.returncode == 0, run.stderr

        counts, line, _ = wrk_during(s, root, 5, 1.0, reload)
        print("reload", line)
        assert counts["bad"] == 0 and counts["other"] == 0 and counts["one"] > 0 and counts["two"] > 0, counts
        assert all(counts[k] == 0 for k in ("connect", "read", "write", "timeout", "status")), counts
        assert wait_for(lambda: serving(s) == {v2}, 20), serving(s)
        (started,) = events(s, "deploy_started")
        assert started["detail"]["reason"] == "reload" and started["detail"]["to"] == v2
    finally:
        s.stop()


def test_with_two_workers_both_switch(tmp_path: Path) -> None:
    """Worker 0 takes the deploy and records it; the parent passes SIGUSR1 on, and the
    other worker switches its own instances too."""
    root = checkout(tmp_path)
    v1 = set_version(root, "version one")
    s = Summon(root, ROUTES.replace("min_replicas = 2", "min_replicas = 1"), "workers = 2").start()
    try:
        for _ in range(40):  # requests reach both workers (SO_REUSEPORT): each may boot its own
            assert http_get(s.port, "/v.txt")[0] == 200
        assert wait_for(lambda: serving(s) == {v1}, 20)
        v2 = set_version(root, "version two")
        counts, run = under_load(s, root, "deploy", f"decks@{v2}")
        assert run.returncode == 0, run.stdout + run.stderr
        assert counts["bad"] == 0 and counts["other"] == 0 and counts["two"] > 0, counts
        assert all(counts[k] == 0 for k in ("connect", "read", "write", "timeout", "status")), counts
        assert wait_for(lambda: serving(s) == {v2}, 20), s.instances()
        assert {http_get(s.port, "/v.txt")[2] for _ in range(40)} == {b"version two\n"}
        workers = {i.get("worker") for i in s.instances()}
        print("workers with instances after the switch:", workers)
    finally:
        s.stop()
