"""The `summon check` contract: exit 0 for a valid config; exit 2 and one
`file:line: message` line per problem, naming the key, for a bad one."""

from __future__ import annotations

import gc
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config import (
    _ROUTE_KEYS,
    Address,
    LineIndex,
    _checked_route,
    _clean_route,
    _Collector,
    _HostNames,
    load,
    parse_duration,
    parse_size,
)
from proxy.errors import ConfigError
from tests.helpers.paths import REPO

SUMMON = Path(sys.executable).with_name("summon")

VALID = """\
include = ["routes/*.toml"]

[proxy]
listen = ["127.0.0.1:18080", "127.0.0.1:18090"]
admin = "127.0.0.1:18081"
trusted_proxies = ["10.0.0.0/8"]
header_timeout = "500ms"
keepalive_timeout = 30
max_body_bytes = "1MiB"

[limits]
max_instances = 4

[[region]]
name = "local"
cidrs = ["127.0.0.0/8"]

[[host]]
name = "box"
region = "local"
backend = "fake"

[[route]]
name = "api"
host = "api.example.com"
path = "/api"
upstreams = ["127.0.0.1:9001", "127.0.0.1:9002"]

[[route]]
url = "/health"
upstreams = "127.0.0.1:9003"
"""

ROUTES = """\
# extra routes
[[route]]
name = "blog"
host = "*.example.com"
path = "/blog"
upstreams = ["127.0.0.1:9004"]
"""


def write(tmp_path: Path, main: str, routes: str | None = ROUTES) -> Path:
    (tmp_path / "routes").mkdir(exist_ok=True)
    if routes is not None:
        (tmp_path / "routes" / "extra.toml").write_text(routes)
    path = tmp_path / "summon.toml"
    path.write_text(main)
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(path)
    return [str(p) for p in info.value.problems]


def line_of(path: Path, needle: str) -> int:
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if needle in line:
            return n
    raise AssertionError(f"{needle!r} not in {path}")


def check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SUMMON), "check", "-c", str(path)], capture_output=True, text=True, timeout=30)


# --- valid --------------------------------------------------------------------------


def test_valid_config_loads(tmp_path):
    cfg = load(write(tmp_path, VALID))
    assert cfg.proxy.listen == (Address("127.0.0.1", 18080), Address("127.0.0.1", 18090))
    assert cfg.proxy.header_timeout_s == 0.5 and cfg.proxy.keepalive_timeout_s == 30.0
    assert cfg.proxy.max_body_bytes == 1024 * 1024
    names = [r.name for r in cfg.routes]
    assert names == ["api", "*/health", "blog"]
    blog = cfg.routes[2]
    assert blog.source.startswith(str(tmp_path / "routes" / "extra.toml"))
    assert cfg.routes[1].upstreams == (Address("127.0.0.1", 9003),)


STANDBY = """\
[[host]]
name = "vm"
backend = "process"
standby_memory = {memory}

[[route]]
path = "/"
image = "decks"
host = "*"
start = "resume"
standbys = {standbys}
"""


def test_standbys_and_their_memory_budget_load(tmp_path):
    cfg = load(write(tmp_path, STANDBY.format(memory='"2GiB"', standbys=2), None))
    assert cfg.hosts[0].standby_memory_mib == 2048
    assert cfg.routes[0].start == "resume" and cfg.routes[0].standbys == 2
    assert load(write(tmp_path, STANDBY.format(memory=512, standbys=1), None)).hosts[0].standby_memory_mib == 512


def test_a_bad_standby_memory_or_count_is_named_with_its_line(tmp_path):
    path = write(tmp_path, STANDBY.format(memory='"lots"', standbys=-1), None)
    found = problems(path)
    assert any(p.startswith(f"{path}:{line_of(path, 'standby_memory')}:") and "standby_memory" in p for p in found), found
    assert any(p.startswith(f"{path}:{line_of(path, 'standbys =')}:") and "standbys" in p for p in found), found


def test_cli_check_valid_exits_0(tmp_path):
    path = write(tmp_path, VALID)
    res = check(path)
    assert res.returncode == 0, res.stderr
    assert "ok" in res.stdout and "3 routes" in res.stdout
    assert res.stderr == ""


def test_repo_example_config_is_valid():
    res = subprocess.run([str(SUMMON), "check", "--config-only", "-c", str(REPO / "summon.toml")], capture_output=True,
                         text=True, timeout=30)  # the file only: `make demo` may hold its ports right now
    assert res.returncode == 0, res.stderr


# --- each problem names file, line and key ---------------------------------------------


def test_unknown_key(tmp_path):
    path = write(tmp_path, VALID.replace('header_timeout = "500ms"', 'header_timeout = "500ms"\nheader_timout = "1s"'))
    assert problems(path) == [
        f"{path}:{line_of(path, 'header_timout')}: [proxy]: unknown key 'header_timout' (known: "
        + ", ".join(sorted(["listen", "admin", "admin_token", "workers", "trusted_proxies", "max_header_bytes",
                            "max_header_count", "header_timeout", "keepalive_timeout", "body_timeout",
                            "max_body_bytes", "max_connections", "max_inflight", "connect_timeout",
                            "upstream_timeout", "upstream_idle_timeout", "upstream_pool_size", "drain_timeout",
                            "server_name", "send_timeout", "request_buffer_bytes", "shed_overload"])) + ")"
    ]


def test_unknown_route_key_in_included_file(tmp_path):
    path = write(tmp_path, VALID, ROUTES.replace('path = "/blog"', 'path = "/blog"\nreplicas = 3'))
    inc = tmp_path / "routes" / "extra.toml"
    (msg,) = problems(path)
    assert msg.startswith(f"{inc}:{line_of(inc, 'replicas')}: [[route]]: unknown key 'replicas'")


def test_unknown_top_level_key(tmp_path):
    path = write(tmp_path, VALID + "\n[proxyy]\nlisten = \"127.0.0.1:1\"\n")
    (msg,) = problems(path)
    assert msg.startswith(f"{path}:{line_of(path, '[proxyy]')}: unknown top-level key 'proxyy'")


@pytest.mark.parametrize("line,key,fragment", [
    ('max_connections = "lots"', "max_connections", "expected a whole number"),
    ("max_connections = -1", "max_connections", "expected a whole number"),
    ("max_connections = true", "max_connections", "expected a whole number"),
    ("listen = 8080", "listen", "expected a list of strings"),
    ('listen = "localhost"', "listen", "not HOST:PORT"),
    ('listen = "127.0.0.1:99999"', "listen", "not HOST:PORT"),
    ("trusted_proxies = \"10.0.0.0/8\"", "trusted_proxies", "expected a list of strings"),
    ('server_name = 5', "server_name", "expected a string"),
    ('shed_overload = "no"', "shed_overload", "expected true or false"),
    ('max_body_bytes = "lots"', "max_body_bytes", "not a size"),
])
def test_wrong_type(tmp_path, line, key, fragment):
    lines = VALID.splitlines()
    at = next((i for i, text in enumerate(lines) if text.startswith(f"{key} =")), None)
    if at is None:
        at = lines.index('max_body_bytes = "1MiB"')
    lines[at] = line
    path = write(tmp_path, "\n".join(lines) + "\n")
    (msg,) = problems(path)
    m = re.match(r"^(.+):(\d+): (.*)$", msg)
    assert m, msg
    assert m.group(1) == str(path) and int(m.group(2)) == line_of(path, line)
    assert f"[proxy].{key}:" in m.group(3) and fragment in m.group(3)


@pytest.mark.parametrize("value", ['"10 parsecs"', '"5 m s"', '"-1s"', "-3", '"s"', '""', "true", '"1.5.2s"'])
def test_bad_duration(tmp_path, value):
    path = write(tmp_path, VALID.replace('header_timeout = "500ms"', f"header_timeout = {value}"))
    (msg,) = problems(path)
    assert msg.startswith(f"{path}:{line_of(path, 'header_timeout')}: [proxy].header_timeout: ")


def test_duplicate_route_across_included_file(tmp_path):
    dup = ROUTES + '\n[[route]]\nname = "api-again"\nhost = "api.example.com"\npath = "/api"\nupstreams = ["127.0.0.1:1"]\n'
    path = write(tmp_path, VALID, dup)
    inc = tmp_path / "routes" / "extra.toml"
    (msg,) = problems(path)
    assert msg.startswith(f"{inc}:{line_of(inc, 'api-again') - 1}: duplicate route api.example.com path /api (first at ")
    assert f"first at {path}" in msg  # the earlier route's place in the main file


def test_duplicate_route_name(tmp_path):
    dup = ROUTES.replace('name = "blog"', 'name = "api"')
    path = write(tmp_path, VALID, dup)
    inc = tmp_path / "routes" / "extra.toml"
    (msg,) = problems(path)
    assert msg.startswith(f"{inc}:{line_of(inc, 'name = ')}: duplicate route name 'api'")


@pytest.mark.parametrize("listen,admin", [
    ('["127.0.0.1:18080", "127.0.0.1:18080"]', '"127.0.0.1:18081"'),
    ('["0.0.0.0:18080", "127.0.0.1:18080"]', '"127.0.0.1:18081"'),
    ('["127.0.0.1:18080"]', '"127.0.0.1:18080"'),
    ('["[::]:18080"]', '"127.0.0.1:18080"'),
])
def test_overlapping_listen_addresses(tmp_path, listen, admin):
    main = VALID.replace('listen = ["127.0.0.1:18080", "127.0.0.1:18090"]', f"listen = {listen}")
    main = main.replace('admin = "127.0.0.1:18081"', f"admin = {admin}")
    path = write(tmp_path, main)
    (msg,) = problems(path)
    assert msg.startswith(f"{path}:{line_of(path, 'listen =')}: [proxy]: listen addresses overlap at ")
    assert "18080" in msg


def test_unreadable_include(tmp_path):
    main = VALID.replace('include = ["routes/*.toml"]', 'include = ["routes/missing.toml", "routes/adir"]')
    path = write(tmp_path, main)
    (tmp_path / "routes" / "adir").mkdir()
    msgs = problems(path)
    assert len(msgs) == 2
    for msg, name in zip(msgs, ("missing.toml", "adir"), strict=True):
        assert msg.startswith(f"{path}:1: cannot read {tmp_path / 'routes' / name}")


def test_include_glob_matching_nothing(tmp_path):
    path = write(tmp_path, VALID.replace('"routes/*.toml"', '"nowhere/*.toml"'))
    (msg,) = problems(path)
    assert msg.startswith(f"{path}:1: include: no file matches 'nowhere/*.toml'")


def test_included_file_with_syntax_error(tmp_path):
    path = write(tmp_path, VALID, ROUTES + "\n[[route]\n")
    inc = tmp_path / "routes" / "extra.toml"
    (msg,) = problems(path)
    assert msg.startswith(f"{inc}:{len(inc.read_text().splitlines())}: TOML syntax")


def test_included_file_with_other_tables(tmp_path):
    path = write(tmp_path, VALID, ROUTES + "\n[proxy]\nlisten = \"127.0.0.1:1\"\n")
    inc = tmp_path / "routes" / "extra.toml"
    (msg,) = problems(path)
    assert msg.startswith(f"{inc}:{line_of(inc, '[proxy]')}: a route table may only hold [[route]] entries")


def test_route_with_both_path_and_url(tmp_path):
    path = write(tmp_path, VALID.replace('url = "/health"', 'url = "/health"\npath = "/h"'))
    (msg,) = problems(path)
    assert msg == f"{path}:{line_of(path, 'url = ') - 1}: [[route]]: give exactly one of 'path' (prefix) or 'url' (exact)"


def test_route_with_neither_path_nor_url(tmp_path):
    path = write(tmp_path, VALID.replace('url = "/health"\n', ""))
    (msg,) = problems(path)
    assert "give exactly one of 'path' (prefix) or 'url' (exact)" in msg


def test_route_with_both_image_and_upstreams(tmp_path):
    path = write(tmp_path, VALID.replace('url = "/health"', 'url = "/health"\nimage = "decks"'))
    (msg,) = problems(path)
    assert "give exactly one of 'image' (summoned) or 'upstreams' (static)" in msg


def test_min_greater_than_max(tmp_path):
    path = write(tmp_path, VALID, ROUTES + "min_replicas = 5\nmax_replicas = 2\n")
    inc = tmp_path / "routes" / "extra.toml"
    (msg,) = problems(path)
    assert msg == f"{inc}:{line_of(inc, 'min_replicas')}: [[route]] blog: min_replicas 5 > max_replicas 2"


@pytest.mark.parametrize("value", ['"/a/../b"', '"/a/./b"', '"blog"', '"/a%2fb"', '"/a?x=1"'])
def test_route_path_must_be_normalised(tmp_path, value):
    path = write(tmp_path, VALID, ROUTES.replace('path = "/blog"', f"path = {value}"))
    inc = tmp_path / "routes" / "extra.toml"
    (msg,) = problems(path)
    assert msg.startswith(f"{inc}:{line_of(inc, 'path = ')}: [[route]].path: ")


def test_all_problems_reported_at_once(tmp_path):
    main = VALID.replace('header_timeout = "500ms"', 'header_timeout = "soon"\nbogus = 1')
    path = write(tmp_path, main, ROUTES + "min_replicas = 5\nmax_replicas = 2\n")
    msgs = problems(path)
    assert len(msgs) == 3
    assert any("header_timeout" in m for m in msgs) and any("bogus" in m for m in msgs)
    assert any("min_replicas" in m for m in msgs)


# --- big tables: the fast path, and problems deep inside --------------------------------


def big_table(n: int) -> str:
    return "".join(f'[[route]]\nname = "r{i}"\nhost = "site{i % 7}.example.com"\npath = "/app{i}"\n'
                   f'upstreams = ["127.0.0.1:9000"]\n\n' for i in range(n))


def lines_of(path: Path, needle: str) -> list[int]:
    return [n for n, line in enumerate(path.read_text().splitlines(), start=1) if needle in line]


def test_problems_deep_in_a_big_table_name_their_lines(tmp_path):
    routes = big_table(5000).replace('name = "r3210"\n', 'name = "r3210"\nreplicas = 2\n')
    routes = routes.replace('path = "/app4321"', 'path = "/app/../4321"').replace('name = "r4999"', 'name = "r17"')
    path = write(tmp_path, VALID, routes)
    inc = tmp_path / "routes" / "extra.toml"
    msgs = problems(path)
    assert len(msgs) == 3
    assert msgs[0].startswith(f"{inc}:{line_of(inc, 'replicas = 2')}: [[route]]: unknown key 'replicas' (known: ")
    assert msgs[1] == (f"{inc}:{line_of(inc, '/app/../4321')}: [[route]].path: must be a normalised path "
                       "(no . or .. segments, no %, ? or #)")
    again = lines_of(inc, 'name = "r17"')[1]
    assert msgs[2] == f"{inc}:{again}: duplicate route name 'r17' (first at {inc} [[route]] #18)"


def test_duplicates_are_reported_in_file_order_among_other_problems(tmp_path):
    again = '\n[[route]]\nname = "blog2"\nhost = "*.example.com"\npath = "/blog"\nupstreams = ["127.0.0.1:1"]\n'
    bad = '\n[[route]]\nname = "bad"\npath = "blog"\nupstreams = ["127.0.0.1:1"]\n'
    path = write(tmp_path, VALID, ROUTES + again + bad + again.replace("blog2", "blog3"))
    inc = tmp_path / "routes" / "extra.toml"
    first, second = [n - 1 for n in lines_of(inc, 'name = "blog')][1:]  # the [[route]] lines of blog2 and blog3
    relative = line_of(inc, 'path = "blog"')
    assert problems(path) == [
        f"{inc}:{first}: duplicate route *.example.com path /blog (first at {inc} [[route]] #1)",
        f"{inc}:{relative}: [[route]].path: must start with /",
        f"{inc}:{second}: duplicate route *.example.com path /blog (first at {inc} [[route]] #1)",
    ]


def test_load_leaves_the_garbage_collector_as_it_found_it(tmp_path):
    good, bad = write(tmp_path, VALID), tmp_path / "bad.toml"
    bad.write_text("bogus = 1\n")
    assert gc.isenabled()
    load(good)
    with pytest.raises(ConfigError):
        load(bad)
    assert gc.isenabled()
    gc.disable()
    try:
        load(good)
        assert not gc.isenabled()
    finally:
        gc.enable()


_ROUTE_VALUES = {
    "name": st.sampled_from(["a", "", 5]),
    "host": st.sampled_from(["*", "*.Example.com", "API.example.com", "bad host", "", 3]),
    "path": st.sampled_from(["/", "/a", "/a/", "/.well-known", "/a/../b", "a", "/a%2f", "/a?b", "", 1]),
    "url": st.sampled_from(["/", "/x/y.html", "/x/./y", "/#", "x", 2]),
    "image": st.sampled_from(["decks", 1]),
    "upstreams": st.sampled_from([[], ["127.0.0.1:1"], "127.0.0.1:2", ["x"], [1], [[1]], [{}], {}]),
    "min_replicas": st.sampled_from([0, 2, 9, -1, True]),
    "max_replicas": st.sampled_from([0, 4, "4"]),
    "target_concurrency": st.sampled_from([0, 1, 32]),
    "idle_timeout": st.sampled_from(["5m", "soon", 3]),
    "hash_key": st.sampled_from(["client", "header:X-User", "nope"]),
    "start": st.sampled_from(["boot", "restore", "resume", "later"]),
    "standbys": st.sampled_from([0, 2, -1, "1"]),
    "prefetch": st.sampled_from([[], ["/a.css"], ["a.css"], "/a.css", ["/a/../b"], [1]]),
    "presummon": st.sampled_from([True, False, "yes"]),
    "replicas": st.just(2),
}
assert set(_ROUTE_VALUES) - {"replicas"} <= set(_ROUTE_KEYS)


@settings(max_examples=500, deadline=None)
@given(raw=st.fixed_dictionaries({}, optional=_ROUTE_VALUES) | st.sampled_from([[], "x", 1]))
def test_fast_path_agrees_with_the_careful_one(raw):
    out = _Collector()
    careful = _checked_route(raw, "f.toml [[route]] #1", "f.toml", LineIndex(""), 0, _HostNames(), out)
    fast = _clean_route(raw, "f.toml [[route]] #1", _HostNames())
    if fast is not None:
        assert fast == careful and not out.problems
    elif careful is not None and not out.problems:  # valid, yet the careful way: only for a "/." in the path
        assert "/." in (careful.url or careful.path or "")


# --- the real CLI ---------------------------------------------------------------------


def test_cli_check_bad_config_exits_2_with_file_line_messages(tmp_path):
    main = VALID.replace('header_timeout = "500ms"', 'header_timeout = "10 parsecs"\nheader_timout = "1s"')
    dup = ROUTES + '\n[[route]]\nhost = "api.example.com"\npath = "/api"\nupstreams = ["127.0.0.1:1"]\n'
    path = write(tmp_path, main, dup)
    res = check(path)
    assert res.returncode == 2
    assert res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 3, res.stderr
    for line in lines:
        assert re.match(r"^.+\.toml:\d+: \S", line), line
    inc = tmp_path / "routes" / "extra.toml"
    assert lines[0].startswith(f"{path}:{line_of(path, 'header_timeout')}: [proxy].header_timeout:")
    assert lines[1].startswith(f"{path}:{line_of(path, 'header_timout')}: [proxy]: unknown key 'header_timout'")
    assert lines[2].startswith(f"{inc}:") and "duplicate route api.example.com path /api" in lines[2]


def test_cli_check_min_max_and_missing_file(tmp_path):
    path = write(tmp_path, VALID, ROUTES + "min_replicas = 3\nmax_replicas = 1\n")
    res = check(path)
    assert res.returncode == 2
    assert "min_replicas 3 > max_replicas 1" in res.stderr and "extra.toml:" in res.stderr
    res = check(tmp_path / "nope.toml")
    assert res.returncode == 2
    assert res.stderr.startswith(f"{tmp_path / 'nope.toml'}:1: cannot read")


# --- value parsers ----------------------------------------------------------------------


@pytest.mark.parametrize("value,seconds", [("500ms", 0.5), ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0),
                                           ("2d", 172800.0), (7, 7.0), (1.5, 1.5), ("10", 10.0), (" 3 s ", 3.0)])
def test_parse_duration(value, seconds):
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value,size", [(16384, 16384), ("16k", 16384), ("64MiB", 64 << 20), ("1g", 1 << 30),
                                        ("10b", 10), ("7", 7)])
def test_parse_size(value, size):
    assert parse_size(value) == size


# --- [cluster] --------------------------------------------------------------------------

CLUSTER = """
[cluster]
redis = "redis://127.0.0.1:6379/0"
node = "eu-1"
region = "local"
password_env = "SUMMON_REDIS_PASSWORD"
lease = "4s"
local_share = 2
"""


def test_cluster_section_loads_and_its_region_is_the_default(tmp_path):
    cfg = load(write(tmp_path, VALID + CLUSTER))
    assert cfg.cluster is not None
    assert (cfg.cluster.redis, cfg.cluster.node, cfg.cluster.region) == ("redis://127.0.0.1:6379/0", "eu-1", "local")
    assert (cfg.cluster.password_env, cfg.cluster.lease_s, cfg.cluster.local_share) == ("SUMMON_REDIS_PASSWORD", 4.0, 2)
    assert cfg.default_region == "local"
    assert load(write(tmp_path, VALID)).cluster is None  # no [cluster]: the embedded engine


@pytest.mark.parametrize("line, fragment", [
    ('redis = "http://127.0.0.1:6379"', "[cluster].redis: expected redis://"),
    ('node = "eu 1"', "[cluster].node: 'eu 1'"),
    ('region = "mars"', "[cluster].region: unknown region 'mars'"),
    ('password_env = "1BAD"', "[cluster].password_env: '1BAD' is not an environment variable name"),
    ('lease = "100ms"', "[cluster].lease: at least 1s"),
    ('colour = "red"', "[cluster]: unknown key 'colour'"),
])
def test_cluster_problems_name_file_line_and_key(tmp_path, line, fragment):
    key = line.split(" ")[0]
    body = CLUSTER.replace(next(ln for ln in CLUSTER.splitlines() if ln.startswith(key + " ")), line) \
        if any(ln.startswith(key + " ") for ln in CLUSTER.splitlines()) else CLUSTER + line + "\n"
    path = write(tmp_path, VALID + body)
    got = problems(path)
    assert any(p.startswith(f"{path}:{line_of(path, line)}:") and fragment in p for p in got), got


def test_cluster_needs_redis_and_node(tmp_path):
    path = write(tmp_path, VALID + '\n[cluster]\nregion = "local"\n')
    got = problems(path)
    assert any("[cluster]: missing key 'redis'" in p for p in got) and any("missing key 'node'" in p for p in got)

def test_remote_libvirt_host_keys(tmp_path):
    path = write(tmp_path, '[[host]]\nname = "far"\nbackend = "libvirt"\nuri = "qemu+tcp://198.18.0.2/system"\n'
                           'address = "198.18.0.2"\nports = "25000-25099"\n', routes=None)
    [host] = load(path).hosts
    assert host.uri == "qemu+tcp://198.18.0.2/system" and host.address == "198.18.0.2"
    assert host.ports == (25000, 25099)
    for uri in ("qemu+ssh://root@hv1:2222/system", "qemu+tls://hv1.example/system", "test:///default"):
        write(tmp_path, f'[[host]]\nname = "far"\nbackend = "libvirt"\nuri = "{uri}"\n', routes=None)
        assert load(path).hosts[0].uri == uri


@pytest.mark.parametrize(("line", "fragment"), [
    ('uri = "qemu+tcp:///system"', "[[host]].uri: qemu+tcp:// needs a host"),
    ('uri = "http://hv1/"', "[[host]].uri: expected a libvirt URI"),
    ('address = "hv1.example"', "[[host]].address: expected an IPv4 address"),
    ('ports = "90-100"', "[[host]].ports: expected a port range LOW-HIGH"),
    ('ports = "25100-25000"', "[[host]].ports: expected a port range LOW-HIGH"),
])
def test_bad_remote_libvirt_host_keys(tmp_path, line, fragment):
    path = write(tmp_path, f'[[host]]\nname = "far"\nbackend = "libvirt"\n{line}\n', routes=None)
    [problem] = problems(path)
    assert problem.startswith(f"{path}:{line_of(path, line)}: ") and fragment in problem, problem


# --- [plugin] ------------------------------------------------------------------------


def test_the_plugin_section_is_off_unless_given(tmp_path: Path) -> None:
    assert load(write(tmp_path, VALID)).plugin is None
    cfg = load(write(tmp_path, VALID + '\n[plugin]\nlisten = "127.0.0.1:18082"\nlease_estimate = "250ms"\n'))
    assert cfg.plugin is not None
    assert (cfg.plugin.listen, cfg.plugin.token, cfg.plugin.lease_estimate_s) == (Address("127.0.0.1", 18082), None, 0.25)
    assert cfg.plugin.cache_s == 1  # nginx may reuse a steady pool's decision for a second
    off = load(write(tmp_path, VALID + '\n[plugin]\nlisten = "127.0.0.1:18082"\ncache = "0"\n'))
    assert off.plugin is not None and off.plugin.cache_s == 0


def test_the_plugin_off_loopback_needs_a_token(tmp_path: Path) -> None:
    path = write(tmp_path, VALID + '\n[plugin]\nlisten = "0.0.0.0:18082"\n')
    [msg] = problems(path)
    assert msg.startswith(f"{path}:{line_of(path, '0.0.0.0:18082')}: [plugin].listen = \"0.0.0.0:18082\" is "
                          "reachable from other machines: set [plugin].token")
    assert "X-Summon-Token" in msg
    ok = write(tmp_path, VALID + '\n[plugin]\nlisten = "0.0.0.0:18082"\ntoken = "a-long-enough-plugin-token"\n')
    assert load(ok).plugin.token == "a-long-enough-plugin-token"  # type: ignore[union-attr]


@pytest.mark.parametrize("body,needle,fragment", [
    ('lease_timeout = "0s"\nlisten = "127.0.0.1:18082"', "lease_timeout", "[plugin].lease_timeout: must be more than 0"),
    ('listen = "127.0.0.1:18082"\nlease = "1s"', "lease =", "[plugin]: unknown key 'lease'"),
    ('token = "short"\nlisten = "127.0.0.1:18082"', "token", "[plugin].token: must be at least 16"),
    ('lease_estimate = "1s"', "[plugin]", "[plugin]: missing key 'listen'"),
    ('listen = "127.0.0.1:18082"\ncache = "1500ms"', "cache", "[plugin].cache: whole seconds"),
    ('listen = "127.0.0.1:18081"', "listen = \"127.0.0.1:18081\"", "listen addresses overlap"),
])
def test_plugin_problems_name_the_key(tmp_path: Path, body: str, needle: str, fragment: str) -> None:
    path = write(tmp_path, VALID + f"\n[plugin]\n{body}\n")
    msgs = problems(path)
    assert any(fragment in m for m in msgs), msgs
    if needle != 'listen = "127.0.0.1:18081"':  # the overlap is reported at [proxy] listen
        assert any(m.startswith(f"{path}:{line_of(path, needle)}: ") and fragment in m for m in msgs), msgs


# --- predictive summoning -------------------------------------------------------------


def test_prefetch_settings_and_route_keys_load(tmp_path):
    main = VALID + ('\n[prefetch]\nenabled = true\nmax_followers = 3\nunused_idle_timeout = "5s"\nlearn_window = "1s"\n'
                    'low_priority = true\n')
    routes = ROUTES.replace('upstreams = ["127.0.0.1:9004"]', 'image = "blog"\nprefetch = ["/blog/a.css"]\npresummon = false')
    cfg = load(write(tmp_path, main, routes))
    assert (cfg.prefetch.enabled, cfg.prefetch.max_followers, cfg.prefetch.unused_idle_timeout_s) == (True, 3, 5.0)
    assert cfg.prefetch.learn_window_s == 1.0 and cfg.prefetch.learn_min_count == 3
    assert cfg.prefetch.low_priority is True
    blog = next(r for r in cfg.routes if r.name == "blog")
    assert blog.prefetch == ("/blog/a.css",) and blog.presummon is False
    default = load(write(tmp_path, VALID)).prefetch
    assert default.enabled is False  # off unless a route or [prefetch] says
    assert default.low_priority is False  # pre-summons start like any boot unless told to yield


@pytest.mark.parametrize(("value", "fragment"), [
    ('["a.css"]', "'a.css' must start with /"),
    ('"/a.css"', "expected a list of strings"),
    ('["/a/../b"]', "must be a normalised path"),
])
def test_bad_route_prefetch_names_its_line(tmp_path, value, fragment):
    path = write(tmp_path, VALID, ROUTES + f"prefetch = {value}\n")
    inc = tmp_path / "routes" / "extra.toml"
    (msg,) = problems(path)
    assert msg.startswith(f"{inc}:{line_of(inc, 'prefetch = ')}: [[route]].prefetch: ") and fragment in msg, msg


def test_bad_prefetch_section_names_its_lines(tmp_path):
    path = write(tmp_path, VALID + '\n[prefetch]\nlearn_threshold = 2\nlearn_window = "0s"\nsoon = 1\n')
    msgs = problems(path)
    assert msgs == [
        f"{path}:{line_of(path, 'learn_threshold')}: [prefetch].learn_threshold: must be more than 0 and at most 1",
        f"{path}:{line_of(path, 'soon')}: [prefetch]: unknown key 'soon' (known: enabled, learn, learn_interval, "
        "learn_min_count, learn_sample, learn_threshold, learn_window, low_priority, max_followers, "
        "unused_idle_timeout)",
        f"{path}:{line_of(path, 'learn_window')}: [prefetch].learn_window: must be more than 0",
    ]


# --- [images] follow and announce_urls (an edge that follows the centre's announcements) --

FOLLOW = """
[images]
follow = ["decks"]
follow_every = "500ms"
follow_retry = "1m"
pull_token_env = "SUMMON_CENTRE_TOKEN"
announce_urls = ["http://10.0.0.5:8081/", "https://centre.example"]
"""


def test_follow_keys_load(tmp_path):
    cfg = load(write(tmp_path, VALID + CLUSTER + FOLLOW))
    assert cfg.follow is not None
    assert (cfg.follow.images, cfg.follow.every_s, cfg.follow.retry_s, cfg.follow.token_env) == (
        ("decks",), 0.5, 60.0, "SUMMON_CENTRE_TOKEN")
    assert cfg.announce_urls == ("http://10.0.0.5:8081", "https://centre.example")
    plain = load(write(tmp_path, VALID))
    assert plain.follow is None and plain.announce_urls == ()


@pytest.mark.parametrize("line, fragment", [
    ('follow = ["decks@sha256:' + "0" * 64 + '"]', "[images].follow: 'decks@sha256:"),
    ("follow = []", "[images].follow: name at least one image"),
    ('follow = "decks"', "[images].follow: expected a list of strings"),
    ('follow_every = "0s"', "[images].follow_every: must be more than 0"),
    ('follow_retry = "soon"', "[images].follow_retry:"),
    ('pull_token_env = "1BAD"', "[images].pull_token_env: '1BAD' is not an environment variable name"),
    ('announce_urls = ["ftp://centre"]', "[images].announce_urls: 'ftp://centre': expected http://HOST:PORT"),
    ('announce_urls = ["http://centre:99999"]', "[images].announce_urls: 'http://centre:99999'"),
    ('colour = "red"', "[images]: unknown key 'colour'"),
])
def test_follow_problems_name_file_line_and_key(tmp_path, line, fragment):
    key = line.split(" ")[0]
    lines = [ln for ln in FOLLOW.splitlines() if not ln.startswith(key + " ")]
    path = write(tmp_path, VALID + CLUSTER + "\n".join(lines) + "\n" + line + "\n")
    got = problems(path)
    assert any(p.startswith(f"{path}:{line_of(path, line)}:") and fragment in p for p in got), got


def test_follow_needs_a_cluster_and_its_options_need_follow(tmp_path):
    path = write(tmp_path, VALID + FOLLOW)
    got = problems(path)
    assert any(p.startswith(f"{path}:{line_of(path, 'follow = ')}:") and "add [cluster] redis" in p
               for p in got), got
    path = write(tmp_path, VALID + CLUSTER + '[images]\nfollow_every = "1s"\n')
    got = problems(path)
    assert any("[images].follow_every: only with [images].follow" in p for p in got), got


def test_rollback_after_failures_defaults_to_three_and_must_be_at_least_one(tmp_path: Path) -> None:
    routes = '[[route]]\nname = "site"\npath = "/site"\nimage = "decks"\n'
    config = load(write(tmp_path, VALID, routes))
    assert next(r for r in config.routes if r.name == "site").rollback_after_failures == 3
    path = write(tmp_path, VALID, routes + "rollback_after_failures = 0\n")
    (problem,) = problems(path)
    assert problem.startswith(f"{tmp_path / 'routes' / 'extra.toml'}:{line_of(tmp_path / 'routes' / 'extra.toml', 'rollback_after')}:")
    assert "rollback_after_failures" in problem
