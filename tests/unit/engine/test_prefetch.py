"""Predictive summoning with a fake clock: which followers a request wakes, within which
limits, and what the learned table says (proxy/engine/prefetch.py, its hooks in fleet.py)."""

from __future__ import annotations

from proxy.config import Address, Host, Limits, PrefetchSettings, Route
from proxy.engine.fleet import Boot, Fleet, Foreground, Forward, Record, Reject, Stop
from proxy.engine.lifecycle import State
from proxy.engine.prefetch import Observation, Prefetcher, learn, resolve_static, sampled

PAGE = Route(name="s:/", url="/", image="page", presummon=True, idle_timeout_s=60.0, boot_timeout_s=10.0,
             prefetch=("/style.css", "/logo.svg", "/img/a.png", "/nowhere"))
CSS = Route(name="s:/style.css", url="/style.css", image="css", idle_timeout_s=60.0, boot_timeout_s=10.0)
LOGO = Route(name="s:/logo.svg", url="/logo.svg", image="logo", idle_timeout_s=60.0, boot_timeout_s=10.0)
IMG = Route(name="s:/img", path="/img", image="img", idle_timeout_s=60.0, boot_timeout_s=10.0)
OTHER = Route(name="other", url="/other", image="other", idle_timeout_s=60.0, boot_timeout_s=10.0)
FOLLOWERS = {"s:/style.css", "s:/logo.svg", "s:/img"}


LOW = PrefetchSettings(low_priority=True)  # pre-summons at the lowest CPU priority until waited for


def fleet(*routes: Route, cap: int = 16, settings: PrefetchSettings | None = None, budget: float | None = None,
          slots: int = 32) -> Fleet:
    f = Fleet(Limits(max_instances=cap, budget_instance_seconds_per_hour=budget), (Host("h1", "local", slots=slots),),
              prefetch=settings or PrefetchSettings())
    f.set_routes(routes or (PAGE, CSS, LOGO, IMG, OTHER), 0.0)
    return f


def of(kind: type, commands: list) -> list:
    return [c for c in commands if isinstance(c, kind)]


def records(kind: str, commands: list) -> list[Record]:
    return [c for c in commands if isinstance(c, Record) and c.kind == kind]


def addr(n: int) -> Address:
    return Address("127.0.0.1", 10000 + n)


def test_static_paths_resolve_to_routes_of_the_same_host() -> None:
    elsewhere = Route(name="x:/style.css", host="x.example", url="/style.css", image="css")
    got = resolve_static([PAGE, CSS, LOGO, IMG, OTHER, elsewhere])
    assert got == {"s:/": ("s:/style.css", "s:/logo.svg", "s:/img")}  # /img/a.png by prefix, /nowhere: none


def test_a_cold_page_boots_its_followers_in_the_same_wave() -> None:
    f = fleet()
    out = f.request_arrived("s:/", 1, "k", None, 0.0)
    boots = of(Boot, out)
    assert [b.route for b in boots][0] == "s:/"  # the page first: it has first claim on capacity
    assert {b.route for b in boots[1:]} == FOLLOWERS
    pres = records("presummoned", out)
    assert {r.route for r in pres} == FOLLOWERS and all(r.detail == {"by": "s:/"} for r in pres)
    assert {r.instance for r in pres} == {b.instance_id for b in boots[1:]}
    # the follower's own request joins the booting pre-summon: no second boot
    later = f.request_arrived("s:/style.css", 2, "k", None, 0.1)
    assert not of(Boot, later) and not of(Reject, later)


def test_pre_summons_start_in_the_background_and_real_boots_never_do() -> None:
    f = fleet(settings=LOW)
    out = f.request_arrived("s:/", 1, "k", None, 0.0)
    boots = of(Boot, out)
    assert not boots[0].background  # the page's own: a request waits for it
    assert all(b.background for b in boots[1:]) and len(boots) == 4
    assert not of(Foreground, out)  # nobody waits for a follower yet
    real = of(Boot, f.request_arrived("other", 2, "k", None, 0.1))
    assert len(real) == 1 and not real[0].background


def test_by_default_pre_summons_start_like_any_boot() -> None:
    f = fleet()
    out = f.request_arrived("s:/", 1, "k", None, 0.0)
    boots = of(Boot, out)
    assert len(boots) == 4 and not any(b.background for b in boots)  # still pre-summoned, not lowered
    assert {r.route for r in records("presummoned", out)} == FOLLOWERS
    css = next(b.instance_id for b in boots if b.route == "s:/style.css")
    assert not of(Foreground, f.request_arrived("s:/style.css", 2, "k", None, 0.5))  # nothing to lift
    assert not of(Foreground, f.instance_ready(css, addr(1), 1.0))


def test_a_request_queued_for_a_pre_summon_brings_it_to_the_foreground_once() -> None:
    f = fleet(settings=LOW)
    out = f.request_arrived("s:/", 1, "k", None, 0.0)
    css = next(b.instance_id for b in of(Boot, out) if b.route == "s:/style.css")
    first = f.request_arrived("s:/style.css", 2, "k", None, 0.5, trial_ok=True)
    assert of(Foreground, first) == [Foreground(css, "request")] and not of(Boot, first)
    second = f.request_arrived("s:/style.css", 3, "k", None, 0.6)
    assert not of(Foreground, second)  # once per instance
    # the page's own boot and the other followers are untouched
    assert not of(Foreground, f.request_arrived("s:/", 4, "k", None, 0.7))
    ready = f.instance_ready(css, addr(1), 1.0)
    assert not of(Foreground, ready) and len(of(Forward, ready)) == 2


def test_a_pre_summon_nobody_asked_for_runs_normally_once_ready() -> None:
    f = fleet(settings=LOW)
    out = f.request_arrived("s:/", 1, "k", None, 0.0)
    page, *followers = of(Boot, out)
    assert not of(Foreground, f.instance_ready(page.instance_id, addr(0), 1.0))
    logo = next(b.instance_id for b in followers if b.route == "s:/logo.svg")
    ready = f.instance_ready(logo, addr(2), 2.0)
    assert of(Foreground, ready) == [Foreground(logo, "ready")]
    assert not of(Foreground, f.request_arrived("s:/logo.svg", 2, "k", None, 2.5))  # warm: nothing left to lift


def test_a_failed_pre_summon_is_never_brought_to_the_foreground() -> None:
    f = fleet(settings=LOW)
    out = f.request_arrived("s:/", 1, "k", None, 0.0)
    img = next(b.instance_id for b in of(Boot, out) if b.route == "s:/img")
    f.boot_failed(img, "crashed", 0.5)
    later = f.request_arrived("s:/img", 2, "k", None, 5.0)  # past the back-off
    assert not of(Foreground, later)
    reboot = of(Boot, later)
    assert len(reboot) == 1 and not reboot[0].background  # the request's own boot


def test_a_warm_page_wakes_followers_that_went_cold() -> None:
    f = fleet()
    out = f.request_arrived("s:/", 1, "k", None, 0.0)
    for i, b in enumerate(of(Boot, out)):
        out += f.instance_ready(b.instance_id, addr(i), 1.0)
    css = next(b.instance_id for b in of(Boot, out) if b.route == "s:/style.css")
    f.request_finished("s:/", of(Forward, out)[0].instance_id, True, 1.0)
    f.instances[css].last_used = 0.0
    stopped = f.tick(20.0)  # unused pre-summons idle out first (15s), the page stays (60s)
    drained = {f.instances[s.instance_id].route for s in of(Stop, stopped)}
    assert drained == FOLLOWERS
    for s in of(Stop, stopped):
        f.instance_stopped(s.instance_id, 20.0)
    warm = f.request_arrived("s:/", 3, "k", None, 21.0)
    assert of(Forward, warm) and {b.route for b in of(Boot, warm)} == FOLLOWERS


def test_followers_already_warm_or_booting_are_not_booted_again() -> None:
    f = fleet()
    f.request_arrived("s:/style.css", 1, "k", None, 0.0)
    out = f.request_arrived("s:/", 2, "k", None, 0.1)
    assert {b.route for b in of(Boot, out)} == {"s:/", "s:/logo.svg", "s:/img"}


def test_off_routes_and_the_global_switch() -> None:
    off = PAGE._replace(presummon=None)
    f = fleet(off, CSS, LOGO, IMG)
    assert [b.route for b in of(Boot, f.request_arrived("s:/", 1, "k", None, 0.0))] == ["s:/"]
    f = fleet(off, CSS, LOGO, IMG, settings=PrefetchSettings(enabled=True))
    assert len(of(Boot, f.request_arrived("s:/", 1, "k", None, 0.0))) == 4
    f = fleet(PAGE._replace(presummon=False), CSS, LOGO, IMG, settings=PrefetchSettings(enabled=True))
    assert len(of(Boot, f.request_arrived("s:/", 1, "k", None, 0.0))) == 1


def test_a_request_wakes_at_most_max_followers() -> None:
    f = fleet(settings=PrefetchSettings(max_followers=2))
    out = f.request_arrived("s:/", 1, "k", None, 0.0)
    assert [b.route for b in of(Boot, out)] == ["s:/", "s:/style.css", "s:/logo.svg"]


def test_pre_summons_stay_within_the_cap_and_take_no_slot_from_the_page() -> None:
    f = fleet(cap=3)
    out = f.request_arrived("s:/", 1, "k", None, 0.0)
    assert [b.route for b in of(Boot, out)] == ["s:/", "s:/style.css"]  # one slot left free
    assert not records("cap_reached", out) and not of(Reject, out)
    real = f.request_arrived("other", 2, "k", None, 0.1)  # the next real request boots at once
    assert [b.route for b in of(Boot, real)] == ["other"] and not of(Stop, real)


def test_pre_summons_respect_the_budget() -> None:
    f = fleet(budget=1.0)
    f.request_arrived("s:/", 1, "k", None, 0.0)
    f.pools["s:/"].instances.clear()  # pretend the page's instance is gone but its cost spent
    f.budget_spent.append((0.5, 5.0))
    f.instances.clear()
    out = f.request_arrived("other", 2, "k", None, 1.0)
    assert not of(Boot, out)


def test_at_the_cap_a_real_request_reclaims_an_unused_pre_summon_first() -> None:
    f = fleet(cap=4)
    out = f.request_arrived("s:/", 1, "k", None, 0.0)
    assert len(of(Boot, out)) == 3  # the page and two followers, one slot left free
    assert len(of(Boot, f.request_arrived("other", 2, "k", None, 0.1))) == 1  # which a real request takes
    # the cap is full: a real request for another route has a booting, unused pre-summon stopped for it
    third = Route(name="third", url="/third", image="third")
    f.set_routes((PAGE, CSS, LOGO, IMG, OTHER, third), 0.1)
    real = f.request_arrived("third", 3, "k", None, 0.1)
    assert not of(Reject, real), real
    stops = of(Stop, real)
    assert len(stops) == 1 and f.instances[stops[0].instance_id].presummoned_by == "s:/"
    after = f.instance_stopped(stops[0].instance_id, 0.2)
    assert [b.route for b in of(Boot, after)] == ["third"]


def test_a_pre_summon_a_request_waits_for_is_not_reclaimed() -> None:
    f = fleet(PAGE, CSS, OTHER, cap=3)
    out = f.request_arrived("s:/", 1, "k", None, 0.0)
    assert [b.route for b in of(Boot, out)] == ["s:/", "s:/style.css"]
    f.request_arrived("s:/style.css", 2, "k", None, 0.1)  # the browser asks for it: it is used now
    assert of(Boot, f.request_arrived("other", 3, "k", None, 0.2))  # the free slot
    third = Route(name="third", url="/third", image="third")
    f.set_routes((PAGE, CSS, OTHER, third), 0.2)
    real = f.request_arrived("third", 4, "k", None, 0.3)
    assert of(Reject, real) and not of(Stop, real)  # the cap, plainly: nothing the page uses is taken


def test_no_pre_summon_while_a_real_request_waits_for_a_slot() -> None:
    f = fleet(PAGE, CSS, OTHER, cap=1)
    f.request_arrived("other", 1, "k", None, 0.0)  # other boots, holds the only slot
    out = f.request_arrived("s:/", 2, "k", None, 0.1)
    assert not of(Boot, out)
    assert of(Reject, out)  # the page itself: the cap (other is busy booting)
    assert not records("presummoned", out)


def test_a_used_pre_summon_idles_out_on_the_route_timeout() -> None:
    f = fleet(PAGE, CSS)
    out = f.request_arrived("s:/", 1, "k", None, 0.0)
    css = next(b.instance_id for b in of(Boot, out) if b.route == "s:/style.css")
    page = next(b.instance_id for b in of(Boot, out) if b.route == "s:/")
    f.instance_ready(css, addr(1), 1.0)
    f.request_finished("s:/", page, True, f.instance_ready(page, addr(2), 1.0) and 1.0)
    used = f.request_arrived("s:/style.css", 2, "k", None, 1.5)
    assert records("first_request", used)
    f.request_finished("s:/style.css", css, True, 1.6)
    assert not of(Stop, f.tick(30.0))
    assert f.instances[css].state is State.READY
    assert of(Stop, f.tick(62.0))


def test_the_shared_fleet_logs_a_pre_summon_once_its_boot_is_granted() -> None:
    f = Fleet(Limits(max_instances=8), (Host("h1", "local", slots=8),), shared=True, node="a")
    f.set_routes((PAGE, CSS), 0.0)
    out = f.request_arrived("s:/", 1, "k", None, 0.0)
    css = next(b for b in of(Boot, out) if b.route == "s:/style.css")
    assert css.cold and not records("presummoned", out)
    granted = f.boot_claimed(css.instance_id, 0.1)
    assert {r.kind for r in granted} == {"summoned", "presummoned"}


def test_learned_followers_need_the_threshold_and_the_count() -> None:
    obs = []
    for visit in range(4):  # four clients: /a, then /b by script 0.5 s later; /c once only
        t = 100.0 * visit
        obs += [Observation(t, f"c{visit}", "a"), Observation(t + 0.5, f"c{visit}", "b")]
    obs.append(Observation(0.6, "c0", "c"))
    obs.append(Observation(5.0, "c0", "late"))  # outside the window
    got = learn(obs, window_s=2.0, threshold=0.5, min_count=3, limit=8)
    assert got == {"a": ("b",)}
    assert learn(obs, window_s=2.0, threshold=0.5, min_count=5, limit=8) == {}
    # a lower threshold believes what happened once in four visits: most confident first
    assert learn(obs, window_s=2.0, threshold=0.2, min_count=3, limit=8) == {"a": ("b", "c"), "b": ("c",)}
    assert learn(obs, window_s=2.0, threshold=0.2, min_count=3, limit=1) == {"a": ("b",), "b": ("c",)}


def test_learned_followers_are_woken_like_static_ones() -> None:
    a = Route(name="a", url="/a", image="a", presummon=True)
    b = Route(name="b", url="/b", image="b")
    f = fleet(a, b)
    f.prefetch.set_learned({"a": ("b",), "b": ("a",)})  # b does not pre-summon: its entry is ignored
    assert f.prefetch.followers("b") == ()
    assert {x.route for x in of(Boot, f.request_arrived("a", 1, "k", None, 0.0))} == {"a", "b"}


def test_clients_are_sampled_whole() -> None:
    assert sampled("ffff00", 1.0) and sampled("0000ff", 0.5) and not sampled("ffff00", 0.5)
    p = Prefetcher(PrefetchSettings())
    assert p.choose("nothing", lambda _: True) == []
