"""One request's trip: client head -> replica -> upstream connection -> response.

How this works: the client connection hands a validated `RequestHead` to an Exchange.
The exchange asks the dispatcher for a lease on a replica (at once for a warm pool,
as a future while an instance is summoned), takes an idle upstream connection or opens
one, sends a re-framed head, then streams the body through as it arrives. Response
callbacks from the upstream connection stream back the same way. Flow control is
symmetric: a full upstream pauses client reads, a full client pauses upstream reads.

Retry rule (the edge rules in docs/architecture.md): a failure before any response byte is retried once,
on a fresh connection, when the method is idempotent and nothing of the body has been
sent (or there is no body). Connect failures never reach the replica and are not retried.
A head that arrives alone, of a fixed-length response to such a request, is kept back
until its body's first bytes (or its end): a replica that dies between its head and its
body (a server writes them apart, and a killed instance stops in between) has then sent
the client nothing, and the request is retried rather than cut. Not for chunked or
close-delimited bodies, which may stream (server-sent events): their head goes at once.

Trials: a lease marked `trial` is on an instance that has started but is not known to be
ready; this (safe method, no body) request is its readiness probe. Until the instance
answers, every failure (refused, reset, closed) is retried on a fresh connection a few
milliseconds later; an answer below 500 `confirm`s the lease, which makes the instance
ready. Silence is a failure only behind a forwarder (`Lease.forwarder`: QEMU's user
networking accepts for a guest whose network is not up yet, and that connection then
hangs): there an attempt unanswered after `TRIAL_ATTEMPT_S` is given up and sent again,
until the guest shows its network is up (a connection closed from its side: its stack
answered) or, for a guest that never shows it, with twice the wait after every
`TRIAL_ATTEMPTS_PER_STEP` give-ups. Elsewhere an accepted connection is the server's own,
and a slow first answer is just slow: giving up on it every 100 ms would never see an
answer that takes longer (a page that renders in 300 ms would fail at the boot timeout).
Trials save the cold request one extra round trip into a guest that has only just woken up. A 5xx may mean "still warming up" or "this
URL fails anyway": the lease is handed over to the health probe, and the request is sent
again once the probe finds the instance ready.

Phases (`Phase`, in the order an exchange goes through them; `NEXT` is the table):

    QUEUED -> BUFFERING -> ACQUIRING -> ATTACHED -> RESPONDING
       |                   ^  |   ^        |  |
       +-------------------+  |   +--------+  +--> TUNNEL     (101)
                              +-> HANDED_OVER <----+          (a trial's 5xx)

QUEUED: parsed, waiting its turn behind earlier requests on the connection. BUFFERING:
reading a small body whole before asking for a replica. ACQUIRING: asking for a lease
(a cold pool answers with a future) and then an upstream connection; ATTACHED goes back
here for a retry. ATTACHED: on an upstream connection, the request going out.
HANDED_OVER: a trial got a 5xx, the health probe decides. RESPONDING / TUNNEL: the
response head went to the client. An exchange can end (`finished`) in any phase, and
its phase then still says how far it got (an answer already begun means the client
must see a cut, not an error page).
"""

from __future__ import annotations

import asyncio
import enum

from ..config import Route
from ..errors import BadGateway, ClosedAtOnce, GatewayTimeout, PayloadTooLarge, SummonError, Unavailable
from ..routing.contracts import Lease
from .message import RequestHead, outbound_head, response_head
from .responses import continue_response
from .state import Client, ResponseMemo
from .upstream import Framing, UpstreamConnection

_BUFFER_HIGH = 256 * 1024  # body bytes held while no upstream is attached
CONNECT_RETRIES = 3  # a refused connect reached no replica: always safe to try elsewhere, a few times
TRIAL_ATTEMPT_S = 0.1  # a connection QEMU accepted for a guest not yet up can hang: give up on it
TRIAL_ATTEMPTS_PER_STEP = 30  # ... and after this many such give-ups, wait twice as long (a slow answer)
TRIAL_FIRST_DELAY_S = 0.0005  # between trial attempts, doubling up to the next
TRIAL_MAX_DELAY_S = 0.005


class Phase(enum.IntEnum):
    """Where an exchange is (see the module docstring). Ordered, so that "the response
    has begun" is `phase >= RESPONDING`: an int comparison, as cheap as a flag."""

    QUEUED = 0
    BUFFERING = 1
    ACQUIRING = 2
    HANDED_OVER = 3
    ATTACHED = 4
    RESPONDING = 5
    TUNNEL = 6


NEXT: dict[Phase, frozenset[Phase]] = {
    Phase.QUEUED: frozenset({Phase.BUFFERING, Phase.ACQUIRING}),
    Phase.BUFFERING: frozenset({Phase.ACQUIRING}),
    Phase.ACQUIRING: frozenset({Phase.ATTACHED}),
    Phase.HANDED_OVER: frozenset({Phase.ACQUIRING}),
    Phase.ATTACHED: frozenset({Phase.ACQUIRING, Phase.HANDED_OVER, Phase.RESPONDING, Phase.TUNNEL}),
    Phase.RESPONDING: frozenset(),
    Phase.TUNNEL: frozenset(),
}

# module globals: a global load is cheaper than Phase.X's attribute lookup on the hot path
_QUEUED, _BUFFERING, _ACQUIRING, _HANDED_OVER = Phase.QUEUED, Phase.BUFFERING, Phase.ACQUIRING, Phase.HANDED_OVER
_ATTACHED, _RESPONDING, _TUNNEL = Phase.ATTACHED, Phase.RESPONDING, Phase.TUNNEL
_F_NONE, _F_LENGTH, _F_CHUNKED, _F_CLOSE, _F_TUNNEL = (Framing.NONE, Framing.LENGTH, Framing.CHUNKED, Framing.CLOSE,
                                                     Framing.TUNNEL)


class Exchange:
    __slots__ = (
        "phase",
        "client", "head", "route", "method", "lease", "upstream", "out_head", "body_buf", "body_buf_bytes",
        "body_done", "body_bytes", "body_sent", "client_framing",
        "keep_alive", "finished", "response_deadline", "retries", "continue_sent",
        "started_at", "cold", "status", "tunnel_buf", "error", "counted", "trial_timer", "trial_attempts",
        "trial_timeouts", "trial_patient",
        "body_chunks", "stall_mark", "held_head",
    )

    def __init__(self, client: Client, head: RequestHead, route: Route | None,
                 error: SummonError | None = None, out_head: bytes | None = None) -> None:
        self.client = client
        self.head = head
        self.route = route
        self.method = head.method
        self.phase = _QUEUED
        self.lease: Lease | None = None
        self.upstream: UpstreamConnection | None = None
        state = client.state
        self.out_head = out_head or outbound_head(head, client.peer_ip, client.trusted, state.via)
        self.body_buf: list[bytes] = []
        self.body_buf_bytes = 0
        self.body_done = not head.has_body and head.upgrade is None
        self.body_bytes = 0
        self.body_sent = False  # a byte of the body went upstream: never retried after that
        self.client_framing = _F_NONE  # set with the response head
        self.keep_alive = head.keep_alive
        self.finished = False  # ended, in whatever phase (see the module docstring)
        self.response_deadline: float | None = None  # checked by ServerState.sweep
        self.retries = 0
        self.continue_sent = False
        self.started_at = state.loop.time()
        self.cold = False
        self.status = 0
        self.tunnel_buf: list[bytes] = []
        self.error = error  # answered with this instead of being forwarded (404, shed)
        self.counted = False
        self.trial_timer: asyncio.TimerHandle | None = None
        self.trial_attempts = 0
        self.trial_timeouts = 0  # attempts given up unanswered (behind a forwarder)
        self.trial_patient = False  # the guest's network answered: silence now means a slow answer
        self.body_chunks = 0  # response body reads, so the deadline can tell a stall from a long body
        self.stall_mark = -1
        self.held_head: bytes | None = None  # a response head kept back until its body starts (see response_head)

    @property
    def response_started(self) -> bool:
        """The response head went to the client: from now on a failure is a cut, not an
        error page (still true once finished)."""
        return self.phase >= _RESPONDING

    # --- getting a replica ---------------------------------------------------------

    def start(self, avoid: Lease | None = None) -> None:
        state = self.client.state
        if self.error is not None or self.route is None:
            self.fail(self.error or Unavailable("no route"))
            return
        head = self.head
        if not self.body_done and not head.expect_continue:
            limit = min(state.config.request_buffer_bytes, _BUFFER_HIGH - 1)
            if ((head.content_length is not None and head.content_length <= limit)
                    or (head.chunked and self.body_bytes <= limit)):
                # Like nginx's request buffering: read a small body whole before taking a
                # replica, so a client trickling its upload cannot hold a slot (max_conns),
                # and a chunked body whose framing turns bad later is refused with nothing
                # forwarded. A chunked body that outgrows the buffer starts streaming then
                # (`client_body`).
                self.phase = _BUFFERING
                return
        self.phase = _ACQUIRING
        try:
            client = self.client
            region = client.region(self.head) if client.trusted else None  # only trusted proxies may say
            got = state.dispatcher.acquire(self.route, self.head, client.peer_ip, region, avoid)
        except SummonError as exc:
            self.fail(exc)
            return
        if isinstance(got, asyncio.Future):
            self.cold = True
            got.add_done_callback(self._lease_ready)
            self.client.waiting.add(got)
        else:
            self._use(got)

    def _lease_ready(self, fut: asyncio.Future[Lease]) -> None:
        self.client.waiting.discard(fut)
        if self.finished:
            if not fut.cancelled() and fut.exception() is None:
                fut.result().release(True)
            return
        if fut.cancelled():
            self.fail(Unavailable("request cancelled while waiting for an instance"))
            return
        exc = fut.exception()
        if exc is not None:
            self.fail(exc if isinstance(exc, SummonError) else Unavailable(str(exc)))
            return
        self._use(fut.result())

    def _use(self, lease: Lease) -> None:
        self.lease = lease
        if lease.trial:
            lease.on_abandon = self._trial_abandoned
        self._connect()

    def _connect(self) -> None:
        if self.finished or self.lease is None or self.route is None:
            return
        conn = self.client.state.upstreams.request(self.lease.address, self.route.max_conns, self._connected)
        if conn is not None:
            self._attach(conn)

    def _connected(self, got: UpstreamConnection | Exception) -> None:
        if isinstance(got, Exception):
            if isinstance(got, ClosedAtOnce):
                self.trial_patient = True  # behind a forwarder: the guest's stack refused, so it is up
            if self._trial_again():
                return
            if not self.finished and self.retries < CONNECT_RETRIES and self.lease is not None:
                # nothing of the request reached that replica: try another one (more than once:
                # while replicas die, the next pick may be one whose death is not known yet)
                self.retries += 1
                self._retry_elsewhere()
                return
            self._release_lease(False)
            if not self.finished:
                self.fail(got if isinstance(got, SummonError) else BadGateway(str(got)))
            return
        if self.finished:
            got.release()  # nobody wants it any more: back to the pool (or the next waiter)
            self._release_lease(True)
            return
        self._attach(got)

    def _attach(self, conn: UpstreamConnection) -> None:
        self.upstream = conn
        self.phase = _ATTACHED
        conn.start(self, self.out_head)
        lease = self.lease
        if lease is not None and lease.trial and lease.forwarder and not self.trial_patient:
            wait = TRIAL_ATTEMPT_S * 2 ** min(self.trial_timeouts // TRIAL_ATTEMPTS_PER_STEP, 6)
            self.trial_timer = self.client.state.loop.call_later(wait, self._trial_timeout)
        if self.head.expect_continue and not self.body_done and self.body_bytes == 0 and not self.continue_sent:
            # The replica is up: now invite the body (we stripped Expect upstream).
            self.continue_sent = True
            self.client.write(continue_response())
        if self.body_buf:
            self.body_sent = True
            for chunk in self.body_buf:
                conn.write(self._frame(chunk))
            self.body_buf.clear()
            if self.body_buf_bytes >= _BUFFER_HIGH:
                self.client.set_reading_for_body(True)
            self.body_buf_bytes = 0
        if self.body_done:
            self._request_sent()

    # --- request body -----------------------------------------------------------------

    def _frame(self, chunk: bytes) -> bytes:
        if self.head.chunked:
            return b"%x\r\n%b\r\n" % (len(chunk), chunk)
        return chunk

    def client_body(self, data: bytes) -> None:
        self.body_bytes += len(data)
        if self.body_bytes > self.client.state.config.max_body_bytes:
            self.fail(PayloadTooLarge(f"body over {self.client.state.config.max_body_bytes} bytes"))
            return
        if self.phase >= _ATTACHED and self.upstream is not None:
            self.body_sent = True
            self.upstream.write(self._frame(data))
        else:
            self.body_buf.append(data)
            self.body_buf_bytes += len(data)
            if self.phase is _BUFFERING and self.head.chunked and self.body_bytes > min(
                    self.client.state.config.request_buffer_bytes, _BUFFER_HIGH - 1):
                # too big to hold whole: take a replica and stream, once this read is parsed
                self.phase = _ACQUIRING
                self.client.start_soon(self)
            elif self.body_buf_bytes >= _BUFFER_HIGH:
                self.client.set_reading_for_body(False)

    def client_body_done(self) -> None:
        if self.body_done:
            return
        self.body_done = True
        if self.phase is _BUFFERING:
            if not self.finished:
                self.start()
            return
        if self.phase >= _ATTACHED:
            self._request_sent()

    def _request_sent(self) -> None:
        if self.head.chunked and self.upstream is not None:
            self.upstream.write(b"0\r\n\r\n")  # trailers are never forwarded
        if self.response_deadline is None and self.phase < _RESPONDING:
            self.response_deadline = self.client.state.loop.time() + self.client.state.config.upstream_timeout_s

    def response_timeout(self) -> None:
        """The deadline armed when the request was sent has passed. Before the response
        head: 504. After it (the deadline is left running, so the hot path arms nothing),
        a stall check: the body must have moved since the last check, else the upstream
        is hung mid-response and the client is cut off (it must see a truncated answer)."""
        if self.finished:
            return
        if self.phase >= _RESPONDING:
            self._check_body_stall()
            return
        self.held_head = None  # a head kept back and no body since: the client gets the 504
        if self.upstream is not None:
            self.upstream.abort()
        self.upstream = None
        self._release_lease(False)
        self.fail(GatewayTimeout(f"no response from {self.lease.address if self.lease else 'upstream'} in time"))

    # --- response, called by UpstreamConnection ------------------------------------------

    def response_head(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]],
                      framing: Framing) -> None:
        # the deadline stays armed: after the head it watches for a stalled body
        if self.finished:
            return
        lease = self.lease
        if lease is not None and lease.trial:
            self._cancel_trial_timer()
            if status >= 500:
                # warming up, or this URL fails anyway? the health probe decides, and the
                # request goes again once the instance is ready (`_ready_after_hand_over`)
                self.phase = _HANDED_OVER
                lease.hand_over(self._ready_after_hand_over)
                raise BadGateway(f"instance answered {status} while starting")
            lease.confirm()
        tunnel = framing is _F_TUNNEL
        if tunnel and self.head.upgrade is None:
            # checked before anything is sent, so the client still gets a clean 502
            raise BadGateway("upstream switched protocols without being asked")
        self.status = status
        client_http11 = self.head.version == "1.1"
        keep = self.keep_alive and not self.client.state.draining
        line = b""
        copy_length = False  # declare the upstream's own Content-Length (response_head finds it)
        if tunnel:
            self.phase = _TUNNEL
            self.response_deadline = None  # an idle tunnel is not a stalled response
            self.client_framing = framing
            keep = False  # the client connection ends with the tunnel
        else:
            if framing is _F_NONE:
                self.client_framing = framing
                copy_length = self.method == "HEAD" or status == 304
            elif framing is _F_LENGTH:
                self.client_framing = framing
                copy_length = True
            elif client_http11:
                self.client_framing = _F_CHUNKED
                line = b"Transfer-Encoding: chunked\r\n"
            else:
                self.client_framing = _F_CLOSE  # HTTP/1.0 client: the end of the body is the close
                keep = False
            if self.head.upgrade is not None:
                keep = False  # the client may already be speaking the new protocol
        self.keep_alive = keep
        # Responses on a connection tend to repeat their head (only Date changes, once a
        # second): keep the last one built and reuse it when everything that goes in matches.
        client = self.client
        key = (status, reason, line, keep, tunnel, client_http11, copy_length)
        hold = (framing is _F_LENGTH and self.retries < 1 and not self.body_sent and self.head.idempotent)
        last = client.last_response
        if last is not None and last.key == key and last.headers == headers:
            out = last.out
        else:
            out = response_head(status, reason, headers, client.state.via, line, keep, tunnel=tunnel,
                                http10=not client_http11, copy_length=copy_length)
            client.last_response = ResponseMemo(key, headers, out)
        if hold:  # still ATTACHED: nothing went to the client yet, a failure can still be retried
            self.held_head = out
            return
        if not tunnel:
            self.phase = _RESPONDING
        client.write(out)
        if tunnel:
            self.client.start_tunnel(self)

    def _send_held_head(self) -> None:
        out, self.held_head = self.held_head, None
        assert out is not None
        self.phase = _RESPONDING
        self.client.write(out)

    def response_body(self, data: bytes) -> None:
        if self.finished:
            return
        if self.held_head is not None:
            self._send_held_head()
        self.body_chunks += 1
        if self.client_framing is _F_CHUNKED:
            self.client.write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            self.client.write(data)

    def response_complete(self, reusable: bool) -> None:
        self.response_deadline = None
        if self.finished:
            return
        if self.held_head is not None:
            self._send_held_head()
        if self.client_framing is _F_CHUNKED:
            self.client.write(b"0\r\n\r\n")
        conn, self.upstream = self.upstream, None
        if conn is not None:
            if reusable and self.body_done and self.head.upgrade is None:
                conn.release()
            else:
                conn.close()
        self._release_lease(True)
        self.finished = True
        if not self.body_done:
            self.keep_alive = False  # an unread request body is still on the wire
        self.client.exchange_finished(self)

    def _check_body_stall(self) -> None:
        client = self.client
        if self.body_chunks != self.stall_mark or client.write_paused:
            # progress since the last check (or the first check since the head), or the
            # client is the slow side (send_timeout is its deadline): look again later
            self.stall_mark = self.body_chunks
            self.response_deadline = client.state.loop.time() + client.state.config.upstream_timeout_s
            return
        if self.upstream is not None:
            self.upstream.abort()  # hung: no FIN exchange to wait for
            self.upstream = None
        self._finish(ok=False)
        client.abort()  # the client must see a truncated answer, not a short one

    def upstream_failed(self, exc: Exception, got_bytes: bool) -> None:
        self.response_deadline = None
        if self.finished:
            return
        conn, self.upstream = self.upstream, None
        if conn is not None:
            conn.close()
        started = self.phase >= _RESPONDING
        held, self.held_head = self.held_head is not None, None  # a head kept back: nothing reached the client
        if not started:
            if self.phase is _ATTACHED:
                self.phase = _ACQUIRING  # off the connection: a retry, or an error page
                if not got_bytes:
                    self.trial_patient = True  # closed from the far side: behind a forwarder, the guest's stack
            if self._trial_again():
                return
        if ((not got_bytes or held) and not started and self.retries < 1 and not self.body_sent
                and self.head.idempotent):
            # Nothing of the response reached us, no body byte left and the method is
            # idempotent (the head did reach the replica, which may have acted on it):
            # safe to retry, on another replica when there is one, else on a fresh
            # connection (a reused one may just have hit the keep-alive race).
            self.retries += 1
            self._retry_elsewhere()
            return
        self._release_lease(False)
        if started:
            self.finished = True
            self.client.abort()  # the client must see a truncated response, not a clean one
            return
        self.fail(exc if isinstance(exc, SummonError) else BadGateway(str(exc)))

    def _retry_elsewhere(self) -> None:
        """Ask for a replica again, avoiding the one that failed (unless it is the only
        one: then a fresh connection to it, which also covers the keep-alive race)."""
        failed, self.lease = self.lease, None
        if failed is not None:
            failed.release(False)
        self.start(avoid=failed)

    # --- trial requests (see the module docstring) -------------------------------------

    def _trial_again(self) -> bool:
        """A trial attempt got no answer: True when another attempt has been scheduled.
        Attempts go on until the pool gives up on the instance (its boot timeout, in the
        engine's tick) and abandons the lease."""
        if self.phase is _HANDED_OVER:
            return not self.finished  # `_ready_after_hand_over` sends it again
        lease = self.lease
        if lease is None or not lease.trial or self.finished:
            return False
        self._cancel_trial_timer()
        delay = min(TRIAL_MAX_DELAY_S, TRIAL_FIRST_DELAY_S * 2 ** min(self.trial_attempts, 8))
        self.trial_attempts += 1
        self.trial_timer = self.client.state.loop.call_later(delay, self._trial_reconnect)
        return True

    def _ready_after_hand_over(self) -> None:
        if self.phase is _HANDED_OVER:
            self.phase = _ACQUIRING
        self._connect()

    def _trial_reconnect(self) -> None:
        self.trial_timer = None
        self._connect()

    def _trial_timeout(self) -> None:
        """No answer on this attempt in time: a hung forwarded connection, most likely.
        Start over on a fresh one (a safe method: a duplicate is harmless)."""
        self.trial_timer = None
        conn = self.upstream
        if self.finished or self.phase >= _RESPONDING or conn is None:
            return
        self.trial_timeouts += 1
        self.upstream = None
        self.phase = _ACQUIRING
        conn.abort()
        self._trial_again()  # still a trial: confirm and hand_over cancel this timer

    def _trial_abandoned(self, error: SummonError) -> None:
        """The pool gave up on the instance (boot failed, route removed) and took the
        lease back: answer with its error."""
        if self.phase is _HANDED_OVER:
            self.phase = _ACQUIRING
        self._cancel_trial_timer()
        self.lease = None
        self.fail(error)

    def _cancel_trial_timer(self) -> None:
        if self.trial_timer is not None:
            self.trial_timer.cancel()
            self.trial_timer = None

    def upstream_write_paused(self, paused: bool) -> None:
        self.client.set_reading_for_body(not paused)

    # --- tunnel ----------------------------------------------------------------------

    def tunnel_data(self, data: bytes) -> None:
        self.client.write(data)

    def client_tunnel_data(self, data: bytes) -> None:
        # Before the 101 nothing may reach the upstream: held until the switch.
        if self.phase is _TUNNEL and self.upstream is not None:
            self.upstream.write(data)
        else:
            self.tunnel_buf.append(data)

    def flush_tunnel(self) -> None:
        if self.upstream is not None and self.tunnel_buf:
            for chunk in self.tunnel_buf:
                self.upstream.write(chunk)
            self.tunnel_buf.clear()

    def client_closed(self) -> None:
        """The client went away: give back the replica, drop the upstream connection."""
        self._finish(ok=self.phase >= _RESPONDING)

    # --- ending ------------------------------------------------------------------------

    def _release_lease(self, ok: bool) -> None:
        lease, self.lease = self.lease, None
        if lease is not None:
            lease.release(ok)

    def _finish(self, ok: bool) -> bool:
        """End the exchange once: close its upstream connection, give back its lease.
        False when it had already ended.

        A request cut off in its body (the client went, its framing turned bad, it grew
        over max_body_bytes) is reset, not closed: an upstream must never take a FIN at a
        chunk or Content-Length boundary for the end of a request."""
        self.response_deadline = None
        if self.finished:
            return False
        self.finished = True
        self._cancel_trial_timer()
        conn, self.upstream = self.upstream, None
        if conn is not None:
            if self.phase >= _ATTACHED and not self.body_done and self.head.has_body:
                conn.reset()
            else:
                conn.close()
        self._release_lease(ok)
        return True

    def fail(self, exc: SummonError | BaseException) -> None:
        if not self._finish(ok=False):
            return
        err = exc if isinstance(exc, SummonError) else BadGateway(str(exc))
        self.status = err.status
        if self.phase >= _RESPONDING:
            self.client.abort()
        else:
            self.client.send_error(self, err)
