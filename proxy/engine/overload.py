"""Is summon itself overloaded? A CoDel-style verdict on its event loop. No I/O.

The overload meant here is summon's own CPU running out, and with it the event loop. Then
requests do not wait in summon's queues (`max_inflight` never trips: each one is handled
quickly once read) but in the kernel's, where nothing in the proxy can count them:
- the accept backlog: libuv accepts one connection per listening socket per turn of the
  loop, so when turns are busy, new connections queue there. The overload watch asks the
  front to look at the next connection it accepts (one per tick): TCP_INFO's
  tcpi_last_data_recv says how long ago its request (or, with none yet, its handshake)
  arrived, which is how long it sat in the backlog;
- the socket buffers of open connections: every turn reads them all, so a turn's length
  is how long a request that just arrived waits to be read. A timer every `TICK_S` sees
  it as its own lateness.
Together with "did the loop sleep since the last tick?" (one getrusage), that is one
callback and at most two syscalls per tick, nothing per request.

Overloaded means: for a whole `interval_s`, the loop never slept and every sample (the
tick's lateness, the backlog wait) was above `target_s`. Never sleeping is what tells
summon's CPU apart from everything else that makes requests wait: a request waiting for
a boot or a slow upstream leaves the loop idle, and an idle loop sleeps. The samples
above target are what tell a standing queue from a saturated loop serving its clients
promptly (a closed-loop benchmark); CoDel (Nichols and Jacobson, "Controlling Queue
Delay", 2012) asks for the whole interval so that one late sample, a GC pause, a reload
of a large route table, a short burst, is not taken for overload.

The overload is over when the loop sleeps (it only does when epoll finds nothing to read
and nothing to accept: no queue stands anywhere), or after a whole interval of samples
under target (still saturated, but answering promptly: new clients may come in again),
once the episode has lasted its minimum: an interval for an episode on its own, and for
one that begins within 16 intervals of the last one's end twice the last one's minimum, up
to `MAX_EPISODE_S` (while new connections are refused, a sleep or prompt samples say the
open ones are served, not that the demand outside has gone; ending at the first one flaps
between refusing and accepting every few ticks, a wave of new connections each time, and
each stop of listening resets the connections that wave left in the backlog). The
doubling is TCP's retransmission backoff applied to listening again: a short burst gets a
short episode, a sustained overload long ones and few transitions. Measured against
episodes of one interval (alternating fresh processes under the overload bench's cap,
offered a fixed 1,800/s, about 2x, for 5 s, 3 rounds; together with the change to the
drops below): 1,089 against 929-993 2xx/s, 77 against 83-89 us of CPU per 2xx answer,
a third of the backlog resets (614 against 1,625-1,768), half the 503s, and a 2xx p99
of 162 against 204-234 ms.
Not at the first sample under target, as CoDel would: while new connections are refused
the backlog wait cannot be sampled, and ending at once lets a wave of them in every few
ticks (measured: twice the p99 at 2x saturation).

What shedding does (carried out by the asyncio shell, `proxy.serve.server`) meanwhile:
- New connections are refused by the kernel (the listening sockets stop listening; those
  in the backlog are reset), which costs summon nothing: when summon's CPU is the
  bottleneck, every microsecond spent answering a refused client, even with a canned 503,
  is taken from the requests it serves.
- Requests on connections already open are dropped where they wait too long: each drop
  is a 503 + Retry-After + Connection: close, so the set of busy connections shrinks
  (their clients come back and are refused). Not at CoDel's pace (RFC 8289: the n-th drop
  of an episode `interval_s / sqrt(n)` after the one before), which is made for a queue
  that one sender refills: here the queue is the busy connections themselves, each
  request on one waits for a whole turn of the loop, a turn reads every busy connection,
  so the wait is proportional to their number, and one drop per CoDel step leaves it
  standing (measured: 51-56 drops in 5 s at 2x saturation, a 2xx p50 of 80 ms on open
  connections, against 2 ms at 1x). And once new connections are refused, CoDel's drops
  go on shrinking a set of connections whose wait is already in hand: with episodes of a
  second, they emptied it (goodput fell by a third at 2x: the loop ran out of work). So
  the drops follow the queue alone: by Little's law the wait on open connections is the
  requests in flight over the rate they are answered at, and the timer's lateness is no
  measure of it (under a CPU cap a request takes several turns). The shell reports both counts
  (`queued`: requests in flight; `answered`: requests answered so far, from the
  metrics' counts); the peak in
  flight (over the last interval or two, since the last cut) over the rate answered in
  the last interval is the wait, and when it is above SETPOINT * target the surplus,
  all of it, is shed at once (never below MIN_QUEUE in flight: the loop must keep work). Then no cut for `interval_s / 2`,
  while the peak is measured afresh: the turn after a cut still reads what it drops.
  SETPOINT is 1.5, not under 1 as a queue's setpoint would be: every request cut is a
  request read, parsed and answered 503 for nothing, and its client comes back on a new
  connection (an accept, a connection object, often another 503). Under a CPU cap, a
  cut down to half the target left the loop too little in flight and cut again and
  again (measured at 2x saturation, alternating 5 s runs: 300-360 503s and 330-370 new
  connections served per run at 0.5, 130-180 and 190-230 at 1.5, and 15-20% more 2xx
  answers for the same CPU, the 2xx p99 unchanged at 160-260 ms). Not higher either: at 3,
  half the 503s again and a third fewer new connections, but no more 2xx answers and no
  cheaper ones, and a higher p99 (12 alternating runs at about 2x).
- An episode that ended less than 16 intervals ago comes back at the first sample above
  target, not after a whole interval of them: the demand that ended episode was refused,
  not gone, and meanwhile every connection accepted from the backlog has waited (measured: episodes 100-200 ms apart, each preceded by 100 ms of
  backlog waits climbing to 200 ms, and those first requests were the 2xx p99).
"""

from __future__ import annotations

import math

TICK_S = 0.01  # how often the loop is sampled while it keeps up
IDLE_TICK_S = 0.1  # ... and while nothing is in flight and the loop sleeps: an idle proxy stays idle
TARGET_S = 0.05  # a request that waits longer than this before it is read waited too long
INTERVAL_S = 0.1  # the wait must stay above target this long to be a standing queue
SETPOINT = 1.5  # a cut leaves this many targets' worth of requests in flight (see above)
MIN_QUEUE = 8  # a cut leaves at least this many requests in flight
RECUR_INTERVALS = 16  # an episode that begins this soon after the last one's end is the same overload
MAX_EPISODE_S = 1.6  # the longest minimum an episode's doubling reaches (see above)


class Shedder:
    """Feed it `tick(...)` for every timer callback; it answers how many requests on open
    connections to shed now, and `shedding` says whether to refuse new connections."""

    def __init__(self, target_s: float = TARGET_S, interval_s: float = INTERVAL_S) -> None:
        self.target_s = target_s
        self.interval_s = interval_s
        self.shedding = False
        self.wait_s = 0.0  # the last sample
        self.episodes = 0
        self.shed_s = 0.0  # time spent shedding in finished episodes
        self.late_since: float | None = None  # when the current run of samples above target began
        self.prompt_since: float | None = None  # when the current run under target began
        self.began = 0.0  # start of the current episode
        self.ended = -math.inf  # end of the previous episode
        self.min_s = 0.0  # how long the current episode lasts at least
        self.cut = 0  # requests shed by cuts, in total
        self.hold_until = 0.0  # no cut before this
        self.peak = 0  # most requests in flight at a tick, this window (or since the last cut)
        self.peak_before = 0  # ... and in the window before
        self.rate = 0.0  # requests answered per second over the last whole interval
        self.rate_at: float | None = None  # when that window began
        self.rate_from = 0  # `answered` then

    def tick(self, due: float, now: float, waited: float, slept: bool, queued: int = 0,
             answered: int = 0) -> int:
        """A timer due at `due` ran at `now` (same clock, seconds). `waited`: how long
        the connection accepted since the last tick sat in the backlog (0 if none was);
        `slept`: whether the loop slept since the last tick; `queued`: how many requests
        are in flight; `answered`: how many have been answered so far (a running count).
        Returns how many requests on open connections to shed now."""
        if self.rate_at is None or now - self.rate_at >= self.interval_s:
            if self.rate_at is not None:
                self.rate = (answered - self.rate_from) / (now - self.rate_at)
            self.rate_at, self.rate_from = now, answered
            self.peak_before, self.peak = self.peak, 0
        self.peak = max(self.peak, queued)
        self.wait_s = wait = max(now - due, waited)
        # Runs of samples above and under target, timed from when they were seen (so one
        # stall counts once); a sleep breaks a run above target.
        if wait < self.target_s:
            self.late_since = None
            self.prompt_since = now if self.prompt_since is None else self.prompt_since
        else:
            self.prompt_since = None
            self.late_since = now if self.late_since is None or slept else self.late_since
        recurs = now - self.ended < RECUR_INTERVALS * self.interval_s
        if self.shedding:
            if now - self.began >= self.min_s and (
                    slept or (self.prompt_since is not None and now - self.prompt_since >= self.interval_s)):
                self.shedding = False
                self.ended = now
                self.shed_s += now - self.began
                return 0
            return self._cut(now)
        if self.late_since is not None and (now - self.late_since >= self.interval_s or (not slept and recurs)):
            self._begin(now, recurs)
            return self._cut(now)
        return 0

    def _cut(self, now: float) -> int:
        """The requests in flight past what the loop answers within SETPOINT * target
        (Little's law), all shed at once; 0 while a previous cut is still taking effect."""
        if now < self.hold_until or self.rate <= 0:
            return 0
        allowed = max(MIN_QUEUE, math.ceil(self.rate * SETPOINT * self.target_s))
        n = max(self.peak, self.peak_before) - allowed
        if n <= 0:
            return 0
        self.hold_until = now + self.interval_s / 2
        self.peak = self.peak_before = 0
        self.cut += n
        return n

    def _begin(self, now: float, recurs: bool) -> None:
        self.shedding = True
        self.episodes += 1
        self.began = now
        self.hold_until = 0.0
        self.min_s = min(MAX_EPISODE_S, 2 * self.min_s) if recurs else self.interval_s

    def next_tick_s(self, slept: bool, inflight: int) -> float:
        """When to sample next: every TICK_S, but every IDLE_TICK_S while the loop sleeps
        with nothing in flight (overload then shows up at most IDLE_TICK_S later)."""
        return IDLE_TICK_S if slept and not inflight and not self.shedding else TICK_S

    def seconds_shedding(self, now: float) -> float:
        """Total time spent shedding, the current episode included."""
        return self.shed_s + (now - self.began if self.shedding else 0.0)
