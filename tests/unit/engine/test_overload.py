"""The overload verdict (proxy.engine.overload.Shedder), fed with a fake clock: what is and is
not overload, when shedding starts and stops, how long episodes last, and what is shed."""

from __future__ import annotations

import math

from proxy.engine.overload import IDLE_TICK_S, MAX_EPISODE_S, MIN_QUEUE, SETPOINT, TICK_S, Shedder

TARGET, INTERVAL, TICK = 0.05, 0.1, 0.01


class Loop:
    """Ticks as a loop would deliver them: due every TICK after the previous one ran."""

    def __init__(self) -> None:
        self.shedder = Shedder(target_s=TARGET, interval_s=INTERVAL)
        self.now = 0.0
        self.drops: list[float] = []  # when each drop was asked for

    def tick(self, late: float = 0.0, waited: float = 0.0, slept: bool = True) -> int:
        due = self.now + TICK
        self.now = due + late
        n = self.shedder.tick(due, self.now, waited, slept)
        self.drops += [self.now] * n
        return n

    def run(self, seconds: float, **kw: float | bool) -> None:
        end = self.now + seconds
        while self.now < end:
            self.tick(**kw)  # type: ignore[arg-type]


def test_an_idle_or_lightly_loaded_loop_never_sheds() -> None:
    loop = Loop()
    loop.run(5.0, late=0.001, slept=True)
    assert not loop.shedder.shedding and loop.shedder.episodes == 0 and not loop.drops


def test_a_saturated_loop_that_answers_promptly_is_not_overloaded() -> None:
    """A closed-loop benchmark keeps the loop busy (it never sleeps) but every request is
    read within a few ms: that is full use, not a standing queue."""
    loop = Loop()
    loop.run(5.0, late=0.004, waited=0.002, slept=False)
    assert loop.shedder.episodes == 0


def test_one_long_stall_is_not_overload() -> None:
    """A GC pause or a large reload: one tick very late, the next ones on time."""
    loop = Loop()
    loop.run(1.0)
    loop.tick(late=2.0, slept=False)
    loop.run(1.0)
    assert loop.shedder.episodes == 0


def test_a_burst_shorter_than_the_interval_is_absorbed() -> None:
    loop = Loop()
    loop.run(INTERVAL * 0.8, late=0.06, slept=False)
    loop.run(1.0)
    assert loop.shedder.episodes == 0


def test_long_waits_with_a_sleeping_loop_are_not_summons_overload() -> None:
    """Requests waiting for a boot or a slow upstream leave the loop idle: it sleeps, so
    whatever waits, it is not summon's CPU."""
    loop = Loop()
    loop.run(3.0, late=0.06, waited=0.5, slept=True)
    assert loop.shedder.episodes == 0


def test_a_standing_queue_in_the_loop_sheds_after_one_interval() -> None:
    loop = Loop()
    loop.run(0.5)
    start = loop.now
    while not loop.shedder.shedding:
        loop.tick(late=0.06, slept=False)
        assert loop.now - start < 1.0
    # every tick from the first late one on was late, for a whole interval, and no sooner
    assert INTERVAL <= loop.now - start < INTERVAL + 2 * (TICK + 0.06)
    assert loop.drops == []  # nothing in flight to cut: refusing new connections is all it does
    assert loop.shedder.episodes == 1


def test_a_standing_backlog_sheds_even_when_each_turn_is_short() -> None:
    """libuv accepts one connection per turn: a queue in the backlog shows as the wait
    of the accepted connections, not as lateness of the timer."""
    loop = Loop()
    loop.run(INTERVAL * 2, late=0.002, waited=0.2, slept=False)
    assert loop.shedder.shedding


def test_shedding_stops_when_the_loop_sleeps_and_counts_the_time() -> None:
    loop = Loop()
    loop.run(INTERVAL * 1.5, late=0.06, slept=False)
    assert loop.shedder.shedding
    began = loop.shedder.began
    loop.run(0.5, late=0.06, slept=False)
    assert loop.shedder.shedding
    loop.tick(late=0.06, slept=True)  # even late: the loop found nothing to do at some point
    assert not loop.shedder.shedding
    assert math.isclose(loop.shedder.seconds_shedding(loop.now), loop.now - began)
    loop.run(1.0)
    assert loop.shedder.episodes == 1
    assert math.isclose(loop.shedder.seconds_shedding(loop.now), loop.shedder.shed_s)


def test_shedding_stops_after_an_interval_of_prompt_samples() -> None:
    """A loop still saturated, but by clients it answers promptly: new ones may come in."""
    loop = Loop()
    loop.run(INTERVAL * 1.5, late=0.06, slept=False)
    loop.run(INTERVAL * 0.8, late=0.002, slept=False)
    assert loop.shedder.shedding
    loop.tick(late=0.06, slept=False)  # one late sample starts the count again
    loop.run(INTERVAL * 0.8, late=0.002, slept=False)
    assert loop.shedder.shedding
    loop.run(INTERVAL * 0.4, late=0.002, slept=False)
    assert not loop.shedder.shedding and loop.shedder.episodes == 1


def test_shedding_drops_nothing_while_the_open_connections_wait_within_the_setpoint() -> None:
    """Refusing new connections bounds the queue on open ones; dropping more of them than
    the wait asks for only empties the loop (CoDel's pace did, in episodes of a second)."""
    loop = Loop()
    loop.run(INTERVAL * 1.5, waited=0.06, slept=False)
    assert loop.shedder.shedding
    loop.run(3.0, waited=0.06, slept=False)
    assert loop.shedder.shedding and loop.drops == []


def _episode(loop: Loop) -> float:
    """Overload until an episode begins, then prompt samples until it ends: its length."""
    while not loop.shedder.shedding:
        loop.tick(late=0.06, slept=False)
    began = loop.shedder.began
    while loop.shedder.shedding:
        loop.tick(late=0.001, slept=False)
        assert loop.now - began < 10.0
    return loop.shedder.ended - began


def test_an_overload_that_keeps_coming_back_gets_ever_longer_episodes_up_to_a_cap() -> None:
    """Each episode that begins soon after the last lasts at least twice as long, so a
    sustained overload is refused in long stretches, not in a flap of short ones."""
    loop = Loop()
    lengths = [_episode(loop) for _ in range(7)]
    minimums = [min(MAX_EPISODE_S, INTERVAL * 2**i) for i in range(7)]
    for length, minimum in zip(lengths, minimums, strict=True):
        # a prompt interval is needed too: the first episode ends one interval after its
        # last late sample; the others as soon as their minimum is over
        assert minimum - 1e-9 <= length <= max(minimum, 2 * INTERVAL) + 2 * TICK, (lengths, minimums)
    assert lengths[-1] < 2 * MAX_EPISODE_S


def test_an_episode_long_after_the_last_is_short_again() -> None:
    loop = Loop()
    for _ in range(4):
        _episode(loop)
    assert loop.shedder.min_s == 8 * INTERVAL
    loop.run(16 * INTERVAL + 0.1)
    assert _episode(loop) < 2 * INTERVAL + 2 * TICK
    assert loop.shedder.min_s == INTERVAL


def test_a_sleep_ends_an_episode_only_once_its_minimum_is_over() -> None:
    loop = Loop()
    for _ in range(3):
        _episode(loop)
    while not loop.shedder.shedding:
        loop.tick(late=0.06, slept=False)
    began = loop.shedder.began
    while loop.now - began < 8 * INTERVAL - TICK:
        loop.tick(slept=True)
        assert loop.shedder.shedding
    loop.run(2 * TICK, slept=True)
    assert not loop.shedder.shedding


def test_an_idle_proxy_is_sampled_ten_times_less_often() -> None:
    """Nothing in flight and the loop sleeping: no reason to wake it 100 times a second.
    Anything in flight, a busy loop or an episode under way: back to every tick."""
    shedder = Shedder(target_s=TARGET, interval_s=INTERVAL)
    assert shedder.next_tick_s(slept=True, inflight=0) == IDLE_TICK_S >= 10 * TICK_S
    assert shedder.next_tick_s(slept=True, inflight=3) == TICK_S
    assert shedder.next_tick_s(slept=False, inflight=0) == TICK_S
    loop = Loop()
    loop.shedder = shedder
    loop.run(INTERVAL * 2, late=0.06, slept=False)
    assert shedder.shedding and shedder.next_tick_s(slept=True, inflight=0) == TICK_S


class BusyConnections:
    """A loop serving `conns` busy keep-alive connections whose clients never let them go
    idle (an open-loop load past saturation, new connections refused): every turn reads
    and answers each of them once, so a turn, and the wait, grows with their number. A
    request shed closes its connection for good (its client is refused when it comes back)."""

    def __init__(self, conns: int, per_request_s: float = 0.001) -> None:
        self.shedder = Shedder(target_s=TARGET, interval_s=INTERVAL)
        self.conns = conns
        self.per_request_s = per_request_s
        self.now = 0.0
        self.budget = 0
        self.answered = 0
        self.turns: list[float] = []

    def turn(self) -> None:
        """The turn before a tick answers every busy connection, the first `budget` of them
        with a 503 that closes it (the budget lapses at the next tick, as in the shell)."""
        shed = min(self.budget, self.conns)
        turn = self.conns * self.per_request_s
        self.answered += self.conns
        self.conns -= shed
        self.turns.append(turn)
        due = self.now + TICK
        self.now = due + turn
        self.budget = self.shedder.tick(due, self.now, 0.0, slept=False, queued=self.conns, answered=self.answered)


def test_drops_follow_the_standing_queue_not_codels_pace() -> None:
    """200 busy connections at 1 ms each: a 200 ms wait, four times the target. CoDel's
    pace alone would need hundreds of steps to clear that (one drop per interval/sqrt(n));
    a cut brings the wait down to the setpoint within one interval of shedding."""
    loop = BusyConnections(200)
    while not loop.shedder.shedding:
        loop.turn()
        assert loop.now < 2.0
    began = loop.now
    while loop.now - began < INTERVAL:
        loop.turn()
    assert loop.conns * loop.per_request_s <= SETPOINT * TARGET, loop.turns
    # and not far under it: what is left keeps the loop busy (goodput does not collapse)
    assert loop.conns * loop.per_request_s >= 0.5 * SETPOINT * TARGET, loop.turns
    assert loop.shedder.cut > 0
    for _ in range(50):  # and it stays there: no further cuts once the wait is at the setpoint
        loop.turn()
    assert 0.5 * SETPOINT * TARGET <= loop.conns * loop.per_request_s <= SETPOINT * TARGET


def _shedding_with(queued: int, rate: float) -> tuple[Shedder, float, int]:
    """A shedder in an episode, told `queued` in flight answered at `rate` per second;
    what the first tick of the episode asked for."""
    shedder = Shedder(target_s=TARGET, interval_s=INTERVAL)
    now, answered, first = 0.0, 0, 0
    while not shedder.shedding:
        now += TICK + 0.06
        answered += round(rate * (TICK + 0.06))
        first = shedder.tick(now - 0.06, now, 0.0, slept=False, queued=queued, answered=answered)
        assert now < 2.0
    return shedder, now, first


def test_a_cut_sheds_the_surplus_over_littles_law() -> None:
    """400 in flight answered at 1,000/s wait 400 ms: keep what is answered in SETPOINT
    targets (75), shed the rest, once; the next ticks see the same count (the dropped
    connections are still being read) and must not cut again."""
    shedder, now, first = _shedding_with(400, 1000.0)
    kept = round(1000.0 * SETPOINT * TARGET)
    assert 400 - kept - 2 <= first <= 400 - kept + 2
    answered = 10**6
    for _ in range(3):  # within interval / 2
        now += TICK
        assert shedder.tick(now - TICK, now, 0.0, slept=False, queued=400, answered=answered) <= 1


def test_no_cut_while_what_is_in_flight_is_answered_promptly() -> None:
    """Shedding because the backlog stood, the open connections answered within the
    setpoint: they are not cut. And a cut never leaves the loop without work."""
    shedder, _, first = _shedding_with(20, 1000.0)  # 20 ms
    assert first == 0 and shedder.cut == 0
    shedder, _, first = _shedding_with(50, 100.0)  # 500 ms, but only 50 in flight
    assert first == 50 - MIN_QUEUE


def test_an_episode_soon_after_the_last_comes_back_at_the_first_late_sample() -> None:
    """A sleep ended the episode; the backlog fills again at once. Waiting a whole interval
    would let every connection accepted meanwhile wait past the target."""
    loop = Loop()
    loop.run(INTERVAL * 4, late=0.06, slept=False)
    loop.tick(slept=True)
    assert not loop.shedder.shedding
    loop.run(INTERVAL * 0.5, late=0.001, waited=0.01, slept=False)
    loop.tick(late=0.001, waited=0.06, slept=False)
    assert loop.shedder.shedding and loop.shedder.episodes == 2
    # long after, the interval is asked for again
    loop.run(17 * INTERVAL + 0.2)  # the episode ends within an interval, then 16 more
    assert loop.shedder.episodes == 2 and not loop.shedder.shedding
    loop.tick(late=0.001, waited=0.06, slept=False)
    assert not loop.shedder.shedding


def test_a_sleep_ends_an_episode_only_once_it_has_lasted_an_interval() -> None:
    """While connections are refused, a sleep says the open ones are served, not that
    the demand outside has gone: ending at the first one flaps between refusing and
    accepting every few ticks, a wave of new connections each time."""
    loop = Loop()
    loop.run(INTERVAL * 1.5, late=0.06, slept=False)
    assert loop.shedder.shedding
    began = loop.shedder.began
    loop.tick(late=0.06, slept=True)
    assert loop.shedder.shedding
    while loop.now - began < INTERVAL:
        loop.tick(late=0.06, slept=False)
    loop.tick(late=0.06, slept=True)
    assert not loop.shedder.shedding
