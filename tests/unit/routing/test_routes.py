"""RouteTable precedence and normalise_path, by example and by property."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from proxy.config import Address, Route
from proxy.errors import BadRequest, NotFound
from proxy.routing.table import RouteTable, host_without_port, normalise_path

UP = (Address("127.0.0.1", 1),)


def route(name: str, host: str = "*", path: str | None = None, url: str | None = None) -> Route:
    return Route(name=name, host=host, path=path, url=url, upstreams=UP)


def names(table: RouteTable, host: str, *paths: str) -> list[str]:
    out = []
    for p in paths:
        try:
            out.append(table.lookup(host, p).name)
        except NotFound:
            out.append("404")
    return out


# --- RouteTable --------------------------------------------------------------------


def test_exact_url_beats_prefix():
    t = RouteTable([route("prefix", path="/blog"), route("exact", url="/blog/post"), route("root", path="/")])
    assert names(t, "x", "/blog/post", "/blog/post/", "/blog/post/x", "/blog/other", "/blog") == [
        "exact", "prefix", "prefix", "prefix", "prefix"]


def test_exact_url_matches_only_itself():
    t = RouteTable([route("exact", url="/health")])
    assert names(t, "x", "/health", "/health/", "/health/x", "/healthz", "/") == ["exact", "404", "404", "404", "404"]


def test_longest_prefix_wins():
    t = RouteTable([route("a", path="/a"), route("ab", path="/a/b"), route("abc", path="/a/b/c"), route("root", path="/")])
    assert names(t, "x", "/a/b/c/d", "/a/b/cd", "/a/b/", "/a/b", "/a/x", "/a", "/b") == [
        "abc", "ab", "ab", "ab", "a", "a", "root"]


def test_prefix_follows_segment_boundaries():
    t = RouteTable([route("blog", path="/blog"), route("admin", path="/admin")])
    assert names(t, "x", "/blog", "/blog/", "/blog/x", "/blogger", "/blog.html", "/administer", "/admin/x") == [
        "blog", "blog", "blog", "404", "404", "404", "admin"]


def test_prefix_with_trailing_slash():
    t = RouteTable([route("dir", path="/docs/"), route("root", path="/")])
    assert names(t, "x", "/docs/", "/docs/a/b", "/docs", "/docsx") == ["dir", "dir", "root", "root"]


def test_root_prefix_catches_everything():
    t = RouteTable([route("root", path="/")])
    assert names(t, "x", "/", "/a", "/a/b/c", "//x") == ["root"] * 4


def test_host_exact_beats_wildcard_beats_any():
    t = RouteTable([
        route("any", host="*", path="/"),
        route("wild", host="*.example.com", path="/"),
        route("deep", host="*.b.example.com", path="/"),
        route("api", host="api.example.com", path="/"),
    ])
    assert [t.lookup(h, "/x").name for h in (
        "api.example.com", "www.example.com", "a.b.example.com", "x.a.b.example.com", "example.com",
        "other.org", "b.example.com",
    )] == ["api", "wild", "deep", "deep", "any", "any", "wild"]


def test_more_specific_host_without_matching_path_falls_back():
    t = RouteTable([
        route("api-v1", host="api.example.com", path="/v1"),
        route("wild-static", host="*.example.com", path="/static"),
        route("any", host="*", path="/"),
    ])
    assert names(t, "api.example.com", "/v1/x", "/static/a", "/other") == ["api-v1", "wild-static", "any"]


def test_no_route_is_not_found():
    t = RouteTable([route("a", host="a.example", path="/")])
    with pytest.raises(NotFound):
        t.lookup("b.example", "/")
    with pytest.raises(NotFound):
        RouteTable([]).lookup("a.example", "/")


def test_by_name_and_len():
    rs = [route("one", path="/1"), route("two", path="/2")]
    t = RouteTable(rs)
    assert len(t) == 2 and t.by_name["two"] is rs[1]


def test_prefix_spellings_and_depths_mixed():
    t = RouteTable([route("a", path="/a"), route("a-dir", path="/a/"), route("deep", path="/a/b/c/"),
                    route("double", path="/x//"), route("root", path="/")])
    assert names(t, "h", "/a", "/a/", "/a/z", "/a/b/c", "/a/b/c/", "/a/b/c/d/e", "/x/", "/x//", "/x//y", "/") == [
        "a", "a-dir", "a-dir", "a-dir", "deep", "deep", "root", "double", "double", "root"]


def test_host_chain_skips_patterns_without_a_match():
    t = RouteTable([
        route("exact", host="a.b.example.com", url="/only"),
        route("deep", host="*.b.example.com", path="/deep"),
        route("wild", host="*.example.com", path="/wild"),
        route("any", host="*", url="/any"),
    ])
    assert names(t, "a.b.example.com", "/only", "/deep/x", "/wild", "/any", "/none") == [
        "exact", "deep", "wild", "any", "404"]
    assert names(t, "z.b.example.com", "/only", "/deep", "/wild/x", "/any") == ["404", "deep", "wild", "any"]


# Precedence spelled out the slow way, to hold the table's shortcuts against.
def _covers(prefix: str, path: str) -> bool:
    return path == prefix or (path.startswith(prefix) and (prefix.endswith("/") or path[len(prefix)] == "/"))


def _reference(routes: list[Route], host: str, path: str) -> str:
    patterns = [host] + ["*" + host[i:] for i, c in enumerate(host) if c == "."] + ["*"]
    for pattern in patterns:
        mine = [r for r in routes if r.host == pattern]
        exact = [r for r in mine if r.url == path]
        if exact:
            return exact[0].name
        covering = [r for r in mine if r.path is not None and _covers(r.path, path)]
        if covering:
            return max(covering, key=lambda r: len(r.path or "")).name
    return "404"


_HOSTS = ["*", "*.example.com", "*.b.example.com", "a.example.com", "a.b.example.com", "example.com"]
_ASKED = ["a.example.com", "a.b.example.com", "x.b.example.com", "x.a.b.example.com", "example.com",
          "b.example.com", "other.org"]
_PATHS = st.lists(st.sampled_from(["a", "b", "ab", ""]), max_size=4).map(lambda segs: "/" + "/".join(segs))


@settings(max_examples=300, deadline=None)
@given(
    specs=st.lists(st.tuples(st.sampled_from(_HOSTS), st.booleans(), _PATHS), max_size=12, unique=True),
    asked=st.lists(st.tuples(st.sampled_from(_ASKED), _PATHS), min_size=1, max_size=8),
)
def test_lookup_matches_the_reference(specs, asked):
    routes = [route(f"r{i}", host=h, url=p if exact else None, path=None if exact else p)
              for i, (h, exact, p) in enumerate(specs)]
    t = RouteTable(routes)
    for host, path in asked:
        assert names(t, host, path) == [_reference(routes, host, path)], (host, path)


@pytest.mark.parametrize("raw,host", [
    (b"Example.COM", "example.com"),
    (b"example.com:8080", "example.com"),
    (b" example.com:80 ", "example.com"),
    (b"[::1]:8080", "[::1]"),
    (b"[2001:db8::1]", "[2001:db8::1]"),
    (b"127.0.0.1:9", "127.0.0.1"),
])
def test_host_without_port(raw, host):
    assert host_without_port(raw) == host


@pytest.mark.parametrize("raw", [b"", b":80", b"example.com:", b"example.com:x", b"a b", b"a/b", b"user@a",
                                 b"[::1", b"[::1]x", b"\xc3\xa9.com", b"a:1:2"])
def test_host_without_port_rejects(raw):
    with pytest.raises(BadRequest):
        host_without_port(raw)


def test_port_stripped_before_lookup():
    t = RouteTable([route("api", host="api.example.com", path="/")])
    assert t.lookup(host_without_port(b"API.example.com:8443"), "/").name == "api"


# --- normalise_path --------------------------------------------------------------------


@pytest.mark.parametrize("raw,out", [
    (b"/", "/"),
    (b"/a/b", "/a/b"),
    (b"/a/../secret", "/secret"),
    (b"/a/./b", "/a/b"),
    (b"/a/b/..", "/a/"),
    (b"/a/b/.", "/a/b/"),
    (b"/a/..", "/"),
    (b"/.", "/"),
    (b"/a//b/../c", "/a//c"),
    (b"/%7Euser", "/~user"),
    (b"/%7euser/%41%62%2d%2E%5F", "/~user/Ab-._"),
    (b"/a%2fb", "/a%2Fb"),  # reserved: stays encoded (upper-cased)
    (b"/a%2F..%2Fb", "/a%2F..%2Fb"),  # an encoded slash does not make a segment
    (b"/a/%2e%2E/x", "/x"),
    (b"/a/%2e/b", "/a/b"),
    (b"/%25", "/%25"),
    (b"/%252e%252e/", "/%252e%252e/"),  # double encoding is not decoded twice
    (b"/a;b=c/..;/d", "/a;b=c/..;/d"),  # "..;" is an ordinary segment here (and forwarded as routed)
    (b"/.../x", "/.../x"),
])
def test_normalise_examples(raw, out):
    assert normalise_path(raw) == out


@pytest.mark.parametrize("raw", [
    b"/..", b"/../a", b"/a/../..", b"/a/../../b", b"/%2e%2e", b"/%2E%2E/x", b"/.%2e/x",
    b"a/b", b"", b"*", b"/a b", b"/a\x00", b"/a%", b"/a%g0", b"/a%2", b"/\xff", b"/a\\b", b"/<script>", b"/a#b",
    b"/a\"b", b"/{x}", b"/a|b", b"/a^b", b"/`",
])
def test_normalise_rejects(raw):
    with pytest.raises(BadRequest):
        normalise_path(raw)


SEGMENTS = st.sampled_from(["a", "b", "c.d", ".", "..", "", "%2e", "%2E", "%2e%2E", ".%2e", "%41", "%7e", "%2F",
                            "%2f", "%25", "%252e", "~", "-_", "..;", "x=y", "@", "%"])
paths = st.lists(SEGMENTS, max_size=12).map(lambda segs: ("/" + "/".join(segs)).encode())
arbitrary = st.binary(max_size=40).map(lambda b: b"/" + b)


def _segments(path: str) -> list[str]:
    return path.split("/")[1:]


@settings(max_examples=500, deadline=None)
@given(st.one_of(paths, arbitrary))
@example(b"/a/%2e%2e/%2e%2e")
@example(b"/%2e/..")
def test_normalise_properties(raw):
    try:
        out = normalise_path(raw)
    except BadRequest:
        return
    assert out.startswith("/")
    segs = _segments(out)
    assert "." not in segs and ".." not in segs, out
    assert "/../" not in out + "/" and "/./" not in out + "/"
    # unreserved characters are never left percent-encoded
    lowered = out.lower()
    for code in ("%2e", "%41", "%7e", "%5f", "%2d", "%30"):
        assert code not in lowered, out
    # idempotent
    assert normalise_path(out.encode()) == out


@settings(max_examples=300, deadline=None)
@given(st.lists(SEGMENTS, max_size=12))
def test_normalise_never_climbs_above_root(segs):
    """Walk the decoded segments by hand: a path that would climb above the root is
    refused; any other gets exactly the resolved segments."""
    raw = ("/" + "/".join(segs)).encode()
    depth_ok = True
    stack: list[str] = []
    decoded = [s.replace("%2e", ".").replace("%2E", ".").replace("%41", "A").replace("%7e", "~") for s in segs]
    if "%" in segs:  # the only malformed escape in the alphabet
        with pytest.raises(BadRequest):
            normalise_path(raw)
        return
    for i, s in enumerate(decoded):
        last = i == len(decoded) - 1
        if s == ".":
            if last:
                stack.append("")
        elif s == "..":
            if not stack:
                depth_ok = False
                break
            stack.pop()
            if last:
                stack.append("")
        else:
            stack.append(s)
    if not depth_ok:
        with pytest.raises(BadRequest):
            normalise_path(raw)
        return
    expected = ("/" + "/".join(stack)).replace("%2f", "%2F")
    assert normalise_path(raw) == expected
