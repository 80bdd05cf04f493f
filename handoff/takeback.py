"""Taking a handed-off connection back (blueprint 2.4): every request routed.

When the client of a handed-off connection sends a new request, the router's
ingress program (handoff/bpf/router.bpf.c, ``while_taken_back``) marks the
entry TAKEBACK and passes the request's bytes here (``Capture`` records of
the ring buffer) instead of to the target. The router then:

1. asks the target's agent to let go (TAKEBACK): the agent answers only once
   the client has acknowledged every byte the server sent (else the router
   waits for the client's ACK and asks again), and ends its egress entry;
2. rebuilds both of its sockets (handoff/rebuild.py), planned here from the
   map entries, the client's segment and the agent's answer:
   * the client's: seq after the last response byte, the request (every
     capture read so far) as its receive queue; leaving repair mode, the
     router sends the request's ACK in place of the kernel's window probe
     (handoff/rebuild.py ``received_ack``), so the client never retransmits
     it nor waits to send the rest (when the router answers the request
     itself, a byte the socket sends again does that, and gives the socket
     its RTT: ``RTT_PROBE_BYTE``);
   * the forwarding connection's, where the target's server stands: its
     snd_nxt is what the client acknowledged, translated;
3. deletes the ingress entry (the client's packets reach the rebuilt
   socket) and gives the socket to the router (``Router.resume``), which
   reads the request with h11 and decides it like any other. The rebuilt
   forwarding connection travels with it (``TakenBack``): the engine reuses
   it for a handoff to the same target; otherwise it goes back to the forward
   pool for the next handoff to its target (``handoff.reuse_forward``,
   handoff/forward_pool.py ``give_back``) or is closed (a FIN: the server
   sees an ordinary close).

Two shortcuts skip the client's socket when the router can decide the
request from the captured bytes (``Router.route_captured``): a request for
the target that holds the connection goes there in place (handoff/inplace.py,
no take-back at all); one for another target is handed on (``_hand_on``):
step 1 and the forwarding connection's half of step 2 as above, then the
engine hands the captured request to the new target from the client's state
as ``plan_hand_on`` computes it (what ``plan_client`` would rebuild, the
request consumed), and the old forwarding connection is retired as above. Should
that handoff fall back, the take-back goes on from where the agent let go.

The planning functions are pure (tests/unit/test_takeback.py); ``TakeBacks``
is the I/O around them.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable, NamedTuple

from arr.decisions import Handoff
from arr.http1 import serialize_request
from handoff import craft
from handoff.control import (TAKEN_OK, TAKEN_UNACKED, UNACKED_ASK_AGAIN, ControlClient, ControlUnavailable, Taken,
                             TakeBack)
from handoff.forward_close import CLOSE_RESULTS, ForwardCloser
from handoff.forward_pool import ForwardProfile, ReadyForward
from handoff.lifecycle import forward_key_of, target_of, wire_key
from handoff.maps import (FLOW_ACTIVE, FLOW_F_RST, FLOW_F_WANT_HEADER, FLOW_TAKEBACK, WATCH_CONNECTING,
                          WATCH_OPT_SACK, WATCH_OPT_TS, WATCH_OPT_WSCALE, Capture, FlowEntry, FlowKey,
                          WatchEntry)
from handoff.rebuild import (NO_WSCALE, SocketPlan, ms_clock, parked_acks, rebuild_owing, rebuild_socket,
                             received_ack)
from handoff.tcpstate import RTO_MAX_LEAST_MS, enter_repair, leave_repair, parse_tcp_options
from handoff.translate import SocketState, seq_after, wrap

if TYPE_CHECKING:
    import h11

    from arr.config import HandoffSettings
    from arr.pool import Target, TargetState
    from arr.request import Request
    from handoff.inplace import InPlace
    from arr.metrics import Metrics
    from handoff.datapath import RouterDatapath
    from handoff.lifecycle import RouterConnections

log = logging.getLogger("arr.handoff")

TS_STEP = 1 << 10
"""Ticks a rebuilt socket's clock starts ahead of the newest TSval its peer
can have seen (plus the time the take-back took): never older (PAWS)."""
DEFAULT_MSS = 536
REBUILT_FORWARD_RTO_MAX_MS = RTO_MAX_LEAST_MS
"""Ceiling of a rebuilt forwarding connection's RTO: the lowest the kernel
allows, for a connection that lives for one request on the cluster's network."""
UNACKED_POLL = 0.002
"""Seconds between two looks at the client's ACK while a response is still
on its way to it (a pipelining client)."""
PROBE_INTERVAL = 0.5
"""Seconds between two probes of a take-back the router started: a Linux
client answers one old segment per 500 ms (net.ipv4.tcp_invalid_ratelimit)."""
UNDONE = frozenset({"probe-unanswered", "unacked", "agent-unavailable", "answered", "answering"})
"""Failures of a take-back the router started that leave the agent holding
the connection: it goes on as it was. After any other (the agent may have let
go) it ends."""


# ---------------------------------------------------------------- planning

class Segment(NamedTuple):
    """The fields of a captured client segment's TCP header the plans use
    (a tuple: one is parsed per capture)."""

    seq: int
    ack: int
    window: int
    tsval: int | None
    tsecr: int | None

    @classmethod
    def parse(cls, header: bytes) -> "Segment":
        seq, ack, window = _SEQ_ACK_WINDOW.unpack_from(header, 4)
        if len(header) == 32 and header.startswith(_NOP_NOP_TS, 20):
            # What Linux puts on every segment of a connection with timestamps.
            tsval, tsecr = _TSVAL_TSECR.unpack_from(header, 24)
            return cls(seq, ack, window, tsval, tsecr)
        options = parse_tcp_options(header[20:])
        return cls(seq, ack, window, options.tsval, options.tsecr)


_SEQ_ACK_WINDOW = struct.Struct("!II2xH")
_TSVAL_TSECR = struct.Struct("!II")
_NOP_NOP_TS = bytes((1, 1, 8, 10))


def assemble(start: int, pieces: list[tuple[int, bytes]]) -> bytes:
    """The bytes from seq START on that PIECES ((seq, bytes), any order,
    overlapping, repeated) hold without a hole; what lies beyond a hole the
    client sends again."""
    out = bytearray()
    placed = []
    for seq, data in pieces:
        offset = wrap(seq - start)
        if offset >= 1 << 31:  # starts before START: routed already, or a straddling retransmission
            head = (1 << 32) - offset
            offset, data = 0, data[head:]
        if data:
            placed.append((offset, data))
    for offset, data in sorted(placed, key=lambda p: p[0]):
        if offset > len(out):
            break
        out += data[len(out) - offset:]
    return bytes(out)


@dataclass(frozen=True, slots=True)
class Taking:
    """What one take-back knows: the ingress entry, the captured request, the
    agent's answer, the forwarding connection's watch entry."""

    client_key: FlowKey
    entry: FlowEntry
    latest: Segment
    """The newest captured segment (its ACK, window and timestamps)."""
    received: bytes
    taken: Taken
    watch: WatchEntry | None
    elapsed_ms: int
    """Since the first capture: clocks have moved on by this much."""

    @property
    def target_tsval(self) -> int:
        """The server's newest TSval the client saw (its TSecr), in the server's clock."""
        return wrap((self.latest.tsecr or 0) - self.entry.x.tsecr_delta)


def client_seen_tsval(t: Taking) -> int:
    """The newest TSval the client can have taken from the router's side:
    its echo, or, when newer, the first the target's handoff showed it (the
    target's TSval then, translated: the router's clock plus the
    translation's margin, handoff/translate.py ``TS_MARGIN``).

    The echo lags when the server answered before acknowledging all of the
    request (nginx's ``return`` with a request body it has not read): every
    segment of that answer carries an ACK the client already had, and Linux
    takes no TS.Recent from a segment with an old ACK (tcp_ack's old-ack
    path), so the next request echoes the router's clock from before the
    handoff. A late ACK of the old server that does acknowledge all of it
    raises the client's TS.Recent past that clock by the margin, and the
    rebuilt socket's every segment would be dropped (PAWS): the connection
    hung (tests/net/test_takeback_bodies_net.py)."""
    echo = t.latest.tsecr or 0
    w = t.watch
    if w is None or not w.target_tsval:
        return echo
    shown = wrap(w.target_tsval + t.entry.x.tsecr_delta)
    return shown if seq_after(shown, echo) else echo


RTT_PROBE_BYTE = b"\0"
"""A client socket rebuilt for a request the router answers itself (a
``Reject``, ``Local`` or ``Proxy`` decided from the captures) starts one
byte short of the response the client acknowledged, and sends that byte
again at once (this value: the client drops it unread, as a byte it already
has). The client answers it at once with an ACK, which gives the socket its
first RTT sample one RTT after the rebuild; the byte's segment, an ordinary
one from the kernel, also acknowledges the request and announces the
socket's window, as ``received_ack`` would. Without it a rebuilt socket has
no RTT sample until the client acknowledges the answer, and a lost first
flight of the answer waited for Linux's loss probe of a socket without one:
1 s (measured 1.00 to 1.02 s; 0.21 s with the byte, as on a connection the
router accepted, tests/net/test_request_resend_net.py). Sent by the socket,
not queued in repair mode: Linux takes no RTT from bytes queued that way
(Karn's rule, as for a retransmission) other than from a timestamp echo,
which a client segment sent before the byte arrived would give from an older
clock. Not done for a request the router hands off again from the socket:
the handoff would first wait for that ACK (``RouterHandoff._eligible``)."""


def plan_client(t: Taking, rtt_probe: bool = False) -> SocketPlan:
    """The router's side of the client connection: as the client sees it.
    RTT_PROBE: one byte short, for ``RTT_PROBE_BYTE``."""
    e, x = t.entry, t.entry.x
    ts = bool(e.client_opts & WATCH_OPT_TS) and t.latest.tsecr is not None
    return SocketPlan(
        local=t.client_key.dst, remote=t.client_key.src,
        # Everything the server sent, in the client's space: the client acked it.
        snd_nxt=wrap(t.taken.snd_nxt + x.ack_delta - (len(RTT_PROBE_BYTE) if rtt_probe else 0)),
        rcv_nxt=e.take_from,
        mss=e.client_mss or DEFAULT_MSS,
        snd_wscale=x.wscale_in, rcv_wscale=e.router_wscale,
        sack=bool(e.client_opts & WATCH_OPT_SACK), timestamps=ts,
        ts_clock=ms_clock(client_seen_tsval(t) + t.elapsed_ms + TS_STEP),
        snd_wnd=(e.peer_window or t.latest.window) << x.wscale_in,
        snd_wl1=t.latest.seq,
        received=t.received,
    )


def plan_forward(t: Taking, rto_min_us: int = 0) -> SocketPlan:
    """The router's side of the forwarding connection: as the server sees it.
    RTO_MIN_US: the floor of its retransmission timeout (``handoff.rto_min``)."""
    e, x, w = t.entry, t.entry.x, t.watch
    opts = w.synack_opts if w is not None else 0
    ts = bool(opts & WATCH_OPT_TS) and t.latest.tsval is not None
    forward = forward_key_of(e)
    return SocketPlan(
        local=forward.dst,  # the router's end of it
        remote=forward.src,  # the target
        snd_nxt=wrap(e.take_from + x.seq_delta),  # where the server's receive stream stops
        rcv_nxt=t.taken.snd_nxt,
        mss=(w.synack_mss if w is not None and w.synack_mss else DEFAULT_MSS),
        snd_wscale=(w.synack_wscale if w is not None and opts & WATCH_OPT_WSCALE else NO_WSCALE),
        rcv_wscale=x.wscale_out,
        sack=bool(opts & WATCH_OPT_SACK), timestamps=ts,
        # The newest TSval the server saw is the client's, translated.
        ts_clock=ms_clock((t.latest.tsval or 0) + x.tsval_delta + t.elapsed_ms + TS_STEP),
        snd_wnd=t.taken.window or 65535,
        snd_wl1=t.taken.snd_nxt,
        # It carries one request across the cluster's network: a lost segment
        # of it must not wait for the 3 s a socket with no RTT sample starts at.
        rto_min_us=rto_min_us, rto_max_ms=REBUILT_FORWARD_RTO_MAX_MS,
    )


@dataclass(frozen=True, slots=True)
class HandOn:
    """A taken-back connection's client side as a handoff to another target
    needs it, from the map entries, the captures and the agent's answer, with
    no socket rebuilt (``plan_hand_on``): the engine hands the captured
    request on from here (``RouterHandoff.hand_on``)."""

    client_key: FlowKey
    client: SocketState
    """As the router's socket would read after receiving the request: what
    ``plan_client`` rebuilds, the request consumed."""
    profile: ForwardProfile
    """The client's options, as its SYN announced them."""
    client_syn_seq: int
    client_tsval: int
    """The client's newest TSval seen: the floor of the next translation."""
    request_from: int
    """Client seq of the request: up to ``client.rcv_nxt`` nobody has
    acknowledged it (the new server's ACK of the rewritten one will), so a
    retransmission of it is dropped at the router (``rerouted``)."""
    requests: int
    """Requests of the connection routed before this one."""


def plan_hand_on(t: Taking, request_len: int) -> HandOn:
    """The client side of a handoff from a take-back's TAKING, for the
    request of REQUEST_LEN bytes from the entry's take_from (what the client
    sent after it, captured too, it sends again: nothing acknowledged it)."""
    plan = plan_client(t)
    e = t.entry
    state = SocketState(local=plan.local, remote=plan.remote, snd_nxt=plan.snd_nxt,
                        rcv_nxt=wrap(e.take_from + request_len),
                        snd_wscale=plan.snd_wscale, rcv_wscale=plan.rcv_wscale, ts_clock=plan.ts_clock,
                        timestamps=plan.timestamps, sack=plan.sack, mss=plan.mss)
    return HandOn(client_key=t.client_key, client=state, profile=profile_of(e),
                  client_syn_seq=e.syn_seq, client_tsval=t.latest.tsval or 0,
                  request_from=e.take_from, requests=e.requests)


def profile_of(entry: FlowEntry) -> ForwardProfile:
    """The client's options, as its SYN announced them (the ingress entry keeps them)."""
    return ForwardProfile(mss=entry.client_mss, sack=bool(entry.client_opts & WATCH_OPT_SACK),
                          timestamps=bool(entry.client_opts & WATCH_OPT_TS))


@dataclass
class TakenBack:
    """A taken-back connection's handoff context (``ClientSession.handoff_context``):
    what the engine needs to hand it off again without a saved SYN."""

    profile: ForwardProfile
    """The client's options, as its SYN announced them."""
    client_syn_seq: int
    client_tsval: int
    """The client's newest TSval seen: the floor of the next translation."""
    forward: ReadyForward | None
    """The rebuilt forwarding connection (None once used or closed)."""
    target: tuple[str, int]
    """Where ``forward`` leads (its server's SYN-ACK seq: ``forward.syn_seq``)."""


# ---------------------------------------------------------------- I/O

class TakeBackFailed(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class LetGo:
    """A take-back past its agent's answer: the server's side of the
    forwarding connection is the router's rebuilt socket's."""

    taken: Taken
    watch: WatchEntry | None
    """The forwarding connection's watch entry as the handoff left it."""
    target: tuple[str, int]
    forward: ReadyForward | None
    """The rebuilt forwarding connection (None once used or closed)."""
    taking: Taking
    """What the take-back knew when the agent let go (without the captured
    bytes: ``received`` is empty)."""


@dataclass
class _Pending:
    conn_id: int
    pieces: list[tuple[int, bytes]] = field(default_factory=list)
    latest: Segment | None = None
    first_ns: int = field(default_factory=time.monotonic_ns)
    heard: asyncio.Event | None = None
    """Set at the first capture (a take-back the router started waits on it)."""
    let_go: LetGo | None = None


class TakeBacks:
    """Runs take-backs as the ingress program's captures arrive."""

    def __init__(self, datapath: "RouterDatapath", connections: "RouterConnections",
                 settings: "HandoffSettings", metrics: "Metrics", *,
                 agent_of: Callable[[tuple[str, int]], ControlClient | None],
                 new_conn_id: Callable[[], int],
                 release_now: Callable[[FlowKey], bool],
                 resume: Callable[..., Awaitable[None]], sender: craft.RawSender) -> None:
        """RESUME(sock, peer, requests, context, decided=...): give the rebuilt
        socket to the router (``Router.resume``); SENDER: the engine's raw
        socket, for the ACK of a rebuilt client socket's request
        (``_rebuild_client``)."""
        self.datapath = datapath
        self.connections = connections
        self.settings = settings
        self.metrics = metrics
        self.agent_of = agent_of
        self.new_conn_id = new_conn_id
        self.release_now = release_now
        self.resume = resume
        self.route: Callable[..., Awaitable[Any]] | None = None
        """``Router.route_captured``: with ``in_place`` or ``hand_on``, a
        request is first read and decided from its captures."""
        self.in_place: "InPlace | None" = None
        """(``handoff.rehandoff_in_place``) A request for the target that holds
        the connection is sent there without taking the connection back
        (handoff/inplace.py)."""
        self.hand_on: "Callable[[HandOn, int, bytes, Target], Awaitable[str | None]] | None" = None
        """(``handoff.rehandoff_hand_on``) ``RouterHandoff.hand_on``: a request
        for another target is handed on from its captures once the agent let
        go, no socket rebuilt for the client. Neither set: every request is
        taken back and decided on the rebuilt socket."""
        self.retire: "Callable[[ReadyForward, tuple[str, int], ForwardProfile], None] | None" = None
        """``RouterHandoff.retire_taken``: a rebuilt forwarding connection
        whose next request went elsewhere, back to the forward pool or closed
        (``handoff.reuse_forward``). None: closed (``close_forward``)."""
        # The counters of the paths taken on every request (labels() costs
        # a lookup per call).
        self._other_target = metrics.inplace.labels("other-target")
        self._handed_on = metrics.handons.labels("ok")
        self._taken_back = metrics.takebacks.labels("ok")
        self._in_place = metrics.inplace.labels("ok")
        self._rehandoff_in_place = metrics.rehandoffs.labels("in-place")
        self._handoff_ok = metrics.handoffs.labels("ok")
        self._pending: dict[FlowKey, _Pending] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        closes = {result: metrics.forward_closes.labels(result) for result in CLOSE_RESULTS}
        self.closer = ForwardCloser(datapath, connections, count=lambda result: closes[result].inc())
        self.sender = sender

    def on_captures(self, captures: list[Capture]) -> None:
        for capture in captures:
            key = FlowKey.from_buffer_copy(capture.key)
            pending = self._pending.get(key)
            if pending is None or pending.conn_id != capture.conn_id:
                entry = self.datapath.ingress.lookup(key)
                if entry is None or entry.conn_id != capture.conn_id or entry.state != FLOW_TAKEBACK:
                    # Late: a copy the client resent, captured just before its
                    # take-back ended (the rebuilt socket has those bytes).
                    continue
                pending = self._pending[key] = _Pending(capture.conn_id)
                task = asyncio.get_running_loop().create_task(self._take_back(key, pending))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            try:
                segment = Segment.parse(capture.header)
            except (ValueError, struct.error):
                continue  # the client sends it again
            pending.latest = segment
            if capture.len:
                pending.pieces.append((wrap(segment.seq + capture.offset), capture.payload))
            if pending.heard is not None:
                pending.heard.set()

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.closer.stop()

    async def _take_back(self, key: FlowKey, pending: _Pending) -> None:
        started = time.perf_counter()
        decided = None
        try:
            # No wait for the rest of this batch's captures: the task first
            # runs after on_captures has taken the whole batch.
            if self.route is not None and (self.in_place is not None or self.hand_on is not None):
                decided = await self._route_captured(key, pending)
                if decided is True:  # handed off again, counted as any handoff
                    return
            # The router answers it: the socket learns its RTT at once.
            rtt_probe = decided is not None and not isinstance(decided, Handoff)
            sock, context, requests = await self._take(key, pending, rtt_probe=rtt_probe)
        except TakeBackFailed as failed:
            self.metrics.takebacks.labels(failed.reason).inc()
            log.info("taking back %r failed: %s", key, failed.reason)
            self._abandon(key, pending.conn_id)
            return
        except Exception:
            log.exception("taking back %r failed", key)
            self.metrics.takebacks.labels("error").inc()
            self._abandon(key, pending.conn_id)
            return
        finally:
            if self._pending.get(key) is pending:
                del self._pending[key]
            self._end_forward(pending)
        self._taken_back.inc()
        self.metrics.takeback_duration.observe(time.perf_counter() - started)
        await self.resume(sock, key.src, requests, context, decided=decided)

    async def _route_captured(self, key: FlowKey, pending: _Pending) -> Any:
        """Decide the captured request; for the target that holds the
        connection, send it there in place (handoff/inplace.py), for another,
        hand it on (``_hand_on``): True when it went. Else the decision, for
        the session of the socket the take-back rebuilds (None: decide it there)."""
        assert self.route is not None
        entry = self.datapath.ingress.lookup(key)
        latest = pending.latest
        if entry is None or entry.conn_id != pending.conn_id or entry.state != FLOW_TAKEBACK or latest is None:
            return None
        data = assemble(entry.take_from, pending.pieces)
        target = target_of(entry)
        in_place = self.in_place

        async def send_on(request: "Request", head: "h11.Request", chosen: "TargetState") -> bool:
            if chosen.target.address != target:
                self._other_target.inc()
                return self.hand_on is not None and \
                    await self._hand_on(key, pending, entry, len(data), serialize_request(request, head),
                                        chosen.target)
            if in_place is None:
                return False
            reason = await in_place.reroute(key, pending.conn_id, len(data), serialize_request(request, head), latest)
            if reason is not None:
                self.metrics.inplace.labels(reason).inc()
                return False
            self._in_place.inc()
            self._rehandoff_in_place.inc()
            self._handoff_ok.inc()
            self.metrics.handoff_duration.observe((time.monotonic_ns() - pending.first_ns) / 1e9)
            return True

        try:
            return await self.route(key.src, entry.requests, data, send_on)
        except TakeBackFailed:
            raise  # the agent may have let go: the take-back cannot start again
        except Exception:  # the take-back still has every byte: it goes on
            log.exception("routing %r from its captures failed", key)
            self.metrics.inplace.labels("error").inc()
            return None

    async def _hand_on(self, key: FlowKey, pending: _Pending, entry: FlowEntry, request_len: int,
                       rewritten: bytes, target: "Target") -> bool:
        """The request (REQUEST_LEN captured bytes, REWRITTEN) to another
        target without a socket rebuilt for the client (ENTRY: the ingress
        entry the request was read from): the agent lets go, the
        engine hands the captured request on (``RouterHandoff.hand_on``); the
        old forwarding connection ends with the take-back (``_end_forward``).
        False when the engine fell back (counted): the take-back goes on from
        where the agent let go."""
        assert self.hand_on is not None
        let_go = await self._let_go(key, pending, entry=entry)
        on = plan_hand_on(let_go.taking, request_len)
        reason = await self.hand_on(on, pending.conn_id, rewritten, target)
        if reason is not None:
            self.metrics.handons.labels(reason).inc()
            return False
        self._handed_on.inc()
        if let_go.forward is not None:
            forward, let_go.forward = let_go.forward, None
            self._retire(forward, let_go.target, on.profile)
        return True

    async def take_back_now(self, key: FlowKey, *, probe: Callable[[FlowEntry], object], deadline: float,
                            unanswered_at: int | None = None) -> tuple[socket.socket, TakenBack, int]:
        """Take back a connection whose client sent nothing new: the router's
        own initiative (handoff/migrate.py: a migration, a drain, a target
        found down). The entry goes to TAKEBACK asking for the header of the
        client's next pure ACK, and PROBE (given the entry) makes the client
        send one; its seq, ack, window and timestamps stand in for a
        request's segment. A request the client sends meanwhile is captured
        as usual and becomes the rebuilt socket's receive queue.

        Until the agent has let go (a response still on its way past
        DEADLINE (monotonic), the agent unreachable, no answer to the probes)
        nothing is lost: the entry goes back to ACTIVE, the client resends
        whatever was captured (nothing of it was acknowledged), and
        TakeBackFailed says why. After that the connection is taken back or
        ended (``_abandon``), as a take-back the client started.

        UNANSWERED_AT (a response deadline, handoff/deadline.py): the client
        must not have received a byte past this seq (client space), nor the
        server have sent one; else "answered"/"answering", undone, at once."""
        entry = self.datapath.ingress.lookup(key)
        if entry is None or entry.state != FLOW_ACTIVE:
            raise TakeBackFailed("not-active")
        if key in self._pending:
            raise TakeBackFailed("busy")
        pending = self._pending[key] = _Pending(entry.conn_id, heard=asyncio.Event())
        try:
            entry.state = FLOW_TAKEBACK
            entry.flags |= FLOW_F_WANT_HEADER
            # The program may have written the entry since it was read (a
            # counter, the client's ack): those writes are lost, and none of
            # them is one the take-back needs from before this moment.
            self.datapath.ingress.update(key, entry)
            while pending.latest is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TakeBackFailed("probe-unanswered")
                probe(self._entry(key, pending.conn_id))
                try:
                    await asyncio.wait_for(pending.heard.wait(), min(PROBE_INTERVAL, remaining))
                except (asyncio.TimeoutError, TimeoutError):
                    self._want_header(key, pending.conn_id)  # the flag may have been lost to a race
            if unanswered_at is not None and wrap(pending.latest.ack - unanswered_at) != 0:
                raise TakeBackFailed("answered")
            sock, context, requests = await self._take(key, pending, deadline,
                                                       wait_unacked=unanswered_at is None)
        except TakeBackFailed as failed:
            if failed.reason in UNDONE:
                self._resume_forwarding(key, pending.conn_id)
            else:
                self._abandon(key, pending.conn_id)
            self.metrics.router_takebacks.labels(failed.reason).inc()
            raise
        finally:
            if self._pending.get(key) is pending:
                del self._pending[key]
            self._end_forward(pending)
        self.metrics.router_takebacks.labels("ok").inc()
        return sock, context, requests

    def _want_header(self, key: FlowKey, conn_id: int) -> None:
        entry = self.datapath.ingress.lookup(key)
        if entry is not None and entry.conn_id == conn_id and entry.state == FLOW_TAKEBACK \
                and not entry.flags & FLOW_F_WANT_HEADER:
            entry.flags |= FLOW_F_WANT_HEADER
            self.datapath.ingress.update(key, entry)

    def _resume_forwarding(self, key: FlowKey, conn_id: int) -> None:
        """Undo a take-back the router started, before the agent let go."""
        entry = self.datapath.ingress.lookup(key)
        if entry is not None and entry.conn_id == conn_id and entry.state == FLOW_TAKEBACK:
            entry.state = FLOW_ACTIVE
            entry.flags &= ~FLOW_F_WANT_HEADER
            self.datapath.ingress.update(key, entry)

    async def _take(self, key: FlowKey, pending: _Pending, deadline: float | None = None,
                    wait_unacked: bool = True, rtt_probe: bool = False) -> tuple[socket.socket, TakenBack, int]:
        if pending.let_go is None:  # a hand-on that failed has it already
            await self._let_go(key, pending, deadline, wait_unacked)
        return self._rebuild_client(key, pending, rtt_probe)

    async def _let_go(self, key: FlowKey, pending: _Pending, deadline: float | None = None,
                      wait_unacked: bool = True, entry: FlowEntry | None = None) -> "LetGo":
        """Steps 1 and 2 of the take-back up to the client's socket: the agent
        lets go (TAKEBACK) and the forwarding connection is rebuilt where the
        server's side of it stands (``pending.let_go``). ENTRY: the ingress
        entry as just read (a hand-on's), else it is read now. An entry a
        moment old asks with an ACK that may be behind: the agent answers
        UNACKED, and the loop below reads it again."""
        entry = self._checked(entry) if entry is not None else self._entry(key, pending.conn_id)
        forward_key = forward_key_of(entry)
        target = forward_key.src
        agent = self.agent_of(target)
        if agent is None or not agent.connected:
            raise TakeBackFailed("agent-unavailable")
        if deadline is None:
            deadline = time.monotonic() + self.settings.takeback_timeout
        while True:
            acked = wrap(entry.peer_ack - entry.x.ack_delta)
            try:
                # The whole take-back's time, not one handoff's agent_timeout:
                # the alternative to waiting is ending the connection.
                ask = TakeBack(entry.conn_id, wire_key(forward_key), acked,
                               stream_end=wrap(entry.take_from + entry.x.seq_delta),
                               answers_head=entry.conn_id in self.connections.answering_head)
                taken = await agent.request(ask,
                                            timeout=max(self.settings.agent_timeout, deadline - time.monotonic()))
            except ControlUnavailable:
                # Lost while asking: the agent may have let go already.
                raise TakeBackFailed("agent-lost") from None
            except (asyncio.TimeoutError, TimeoutError):
                raise TakeBackFailed("agent-timeout") from None
            if not isinstance(taken, Taken):
                raise TakeBackFailed("agent-protocol")
            if taken.status == TAKEN_OK:
                # The server has all of a request rerouted in place: no resend
                # of it any more. Not before: a server that answered before it
                # read the body still needs its lost tail, which the router
                # resends when the client does (handoff/inplace.py); forgotten
                # when the next request's take-back began, the tail never came,
                # and nginx closed the connection after 5 s (1% loss each way).
                if self.in_place is not None:
                    self.in_place.forget(key)
                break
            if taken.status != TAKEN_UNACKED:
                raise TakeBackFailed("target-closed" if taken.status else "agent-unknown")
            if not wait_unacked:
                raise TakeBackFailed("answering")
            # A response still on its way to the client (it pipelined): its
            # ACKs still reach the server; ask again once they moved on. Or
            # the server's ACK of a rerouted request: ask again in a moment.
            self.metrics.takeback_waits.inc()
            reask = time.monotonic() + UNACKED_ASK_AGAIN
            while entry.peer_ack == self._entry(key, pending.conn_id).peer_ack:
                now = time.monotonic()
                if now > deadline:
                    raise TakeBackFailed("unacked")
                if now > reask:
                    break
                await asyncio.sleep(UNACKED_POLL)
            entry = self._entry(key, pending.conn_id)
        watch = self.datapath.watch.lookup(forward_key)
        # Without the captured bytes: neither the forwarding connection's plan
        # nor a hand-on's reads them, and the client socket's rebuild takes
        # a newer Taking (``_rebuild_client``).
        taking = self._taking(key, pending, taken, watch, received=False)
        # The forwarding connection first: the server's packets on it reach
        # the router's stack from here on (CONNECTING passes them, and records
        # the server's TSval), where the rebuilt socket takes them.
        forward_plan = plan_forward(taking, self.settings.rto_min_us)
        conn_id = self.new_conn_id()
        # The handoff's own forwarding socket may still be waiting for its
        # release (handoff/release.py): it goes now, its 4-tuple is needed.
        self.release_now(forward_key)
        try:
            forward = self._rebuild_forward(forward_plan, taking)
        except OSError as exc:
            log.warning("rebuilding the forwarding connection %s -> %s failed: %s", forward_plan.local,
                        forward_plan.remote, exc)
            raise TakeBackFailed(f"rebuild-forward-{exc.errno}") from None
        self.connections.in_flight.add(forward_key)
        self.datapath.watch.update(forward_key, _watch_for_rebuilt(watch, conn_id, taking))
        pending.let_go = LetGo(taken, watch, target,
                               ReadyForward(forward, forward_key, conn_id, asyncio.get_running_loop().time(),
                                            fin_seq=forward_plan.snd_nxt, syn_seq=taken.syn_seq),
                               taking)
        return pending.let_go

    def _rebuild_forward(self, plan: SocketPlan, taking: Taking) -> socket.socket:
        """The forwarding connection's socket, leaving repair mode without a
        probe. With ``handoff.reuse_forward`` it may then wait, idle, for a
        handoff (on a shelf of the forward pool, or while the router serves
        the request itself), and the server has not seen its last response
        acknowledged: the client's ACK came with the request the router
        captured. So the router sends that ACK; else the server resends the
        response's tail at its loss-probe timeout, about 200 ms later (seen on
        each connection given back, tests/net/test_reuse_forward_net.py). It
        goes twice, first with a zero window (``parked_acks`` says why). Without reuse the
        next segment comes at once (the FIN, or the request of a handoff to
        the same target) and carries the ACK."""
        if not self.settings.reuse_forward:
            return rebuild_socket(plan, window_probe=False)
        forward, acks = rebuild_owing(plan, parked_acks, taking.target_tsval)
        try:
            leave_repair(forward, window_probe=False)
        except OSError:
            forward.close()  # still in repair mode: nothing on the wire
            raise
        for ack in acks:
            if not self.sender.send(ack):
                log.debug("acknowledging %s's response: %s", plan.remote, self.sender.error or "not sent")
        return forward

    def _taking(self, key: FlowKey, pending: _Pending, taken: Taken, watch: WatchEntry | None, *,
                received: bool = True) -> Taking:
        """What the take-back knows now: the newest entry (the client's ACK
        and window), captures (RECEIVED False: none, b"") and segment."""
        entry = self._entry(key, pending.conn_id)
        latest = pending.latest
        if latest is None:
            raise TakeBackFailed("capture-unreadable")
        return Taking(client_key=key, entry=entry, latest=latest,
                      received=assemble(entry.take_from, pending.pieces) if received else b"",
                      taken=taken, watch=watch,
                      elapsed_ms=(time.monotonic_ns() - pending.first_ns) // 1_000_000)

    def _rebuild_client(self, key: FlowKey, pending: _Pending,
                        rtt_probe: bool = False) -> tuple[socket.socket, TakenBack, int]:
        """Step 2's client socket and step 3: the connection is the router's
        again. RTT_PROBE: the socket learns its RTT (``RTT_PROBE_BYTE``)."""
        let_go = pending.let_go
        assert let_go is not None and let_go.forward is not None
        # Captures the loop has not read yet (the client sends on while the
        # agent answers): left out, they would reach the rebuilt socket as a
        # hole, which the client fills by resending (a SACK recovery).
        self.connections.read_events_now()
        try:
            taking = self._taking(key, pending, let_go.taken, let_go.watch)
            plan = plan_client(taking, rtt_probe)
            if rtt_probe:  # the byte's segment stands for the ACK (RTT_PROBE_BYTE)
                client, ack = rebuild_socket(plan, window_probe=None), None
            else:
                client, ack = rebuild_owing(plan, received_ack, taking.latest.tsval or 0)
        except OSError as exc:  # the caller's _end_forward closes the forwarding connection
            log.warning("rebuilding the client connection %r failed: %s", key, exc)
            raise TakeBackFailed(f"rebuild-client-{exc.errno}") from None
        entry = taking.entry
        # The client's packets reach the rebuilt socket from here on. The
        # request's ACK is the router's own (handoff/rebuild.py
        # ``received_ack``), and it stands for the window probe: a probe would
        # announce a window of its own, which the client discards with the
        # probe, while the socket takes it for the one the client knows and
        # opens no window it did not announce (a full one stayed shut until
        # the client's persist timer, 200 ms). Nothing to acknowledge, or no
        # way to send it: the probe, which makes the client announce its window.
        # With RTT_PROBE the socket's own segment of the byte sent again
        # acknowledges the request and announces its window instead.
        self.connections.taken_back(key, entry)
        leave_repair(client, window_probe=ack is None and not rtt_probe)
        if rtt_probe:
            try:
                client.send(RTT_PROBE_BYTE)  # one byte into an empty buffer: sent whole, or an error
            except OSError as exc:  # the client reset meanwhile; the answer would start a byte early
                client.close()
                raise TakeBackFailed(f"rebuild-client-{exc.errno}") from None
        elif ack is not None and not self.sender.send(ack):
            log.debug("acknowledging the request of %r: %s", key, self.sender.error or "not sent")
            enter_repair(client)
            leave_repair(client, window_probe=True)
        forward, let_go.forward = let_go.forward, None
        context = TakenBack(
            profile=profile_of(entry), client_syn_seq=entry.syn_seq, client_tsval=taking.latest.tsval or 0,
            forward=forward, target=let_go.target)
        return client, context, entry.requests

    def _entry(self, key: FlowKey, conn_id: int) -> FlowEntry:
        entry = self.datapath.ingress.lookup(key)
        if entry is None or entry.conn_id != conn_id or entry.state != FLOW_TAKEBACK:
            raise TakeBackFailed("entry-gone")
        return self._checked(entry)

    @staticmethod
    def _checked(entry: FlowEntry) -> FlowEntry:
        if entry.flags & FLOW_F_RST:
            raise TakeBackFailed("client-reset")
        return entry

    def _abandon(self, key: FlowKey, conn_id: int) -> None:
        """No way back: the client's connection ends (its next packet meets
        the router's stack, which resets it), the agent ends the server's."""
        entry = self.datapath.ingress.lookup(key)
        if entry is not None and entry.conn_id == conn_id:
            self.connections.abandon(key, entry)

    def _end_forward(self, pending: _Pending) -> None:
        """The end of a take-back: the forwarding connection rebuilt when the
        agent let go is closed (a FIN) unless the rebuilt client socket's
        context or the hand-on's retirement took it: a later step failed."""
        if pending.let_go is not None and pending.let_go.forward is not None:
            forward, pending.let_go.forward = pending.let_go.forward, None
            self.close_forward(forward)

    def drop_forward(self, context: TakenBack, *, reuse: bool = False) -> None:
        """Retire CONTEXT's rebuilt forwarding connection if it still has one:
        back to the pool (REUSE: its connection's next request went elsewhere
        than a handoff, or the connection ended) or closed (the router moved
        the connection away from its target: handoff/migrate.py,
        handoff/deadline.py)."""
        if context.forward is not None:
            forward, context.forward = context.forward, None
            if reuse:
                self._retire(forward, context.target, context.profile)
            else:
                self.close_forward(forward)

    def _retire(self, ready: ReadyForward, target: tuple[str, int], profile: ForwardProfile) -> None:
        if self.retire is not None:
            self.retire(ready, target, profile)
        else:
            self.close_forward(ready)

    def close_forward(self, ready: ReadyForward) -> None:
        """Close a rebuilt forwarding connection the way any client would: a
        FIN (handoff/forward_close.py frees its port once the exchange is over)."""
        self.closer.close(ready)


def _watch_for_rebuilt(watch: WatchEntry | None, conn_id: int, taking: Taking) -> WatchEntry:
    """CONNECTING (pass the server's packets to the stack, record its TSval),
    keeping what the server's SYN-ACK said (a later take-back needs it). A
    copy: WATCH, as the handoff left it, stays the take-back's (its TSval
    dates the client's clock, ``client_seen_tsval``)."""
    entry = WatchEntry() if watch is None else WatchEntry.from_buffer_copy(watch)
    entry.state = WATCH_CONNECTING
    entry.conn_id = conn_id
    entry.closed_ns = 0
    entry.target_fin_ack = 0
    entry.target_tsval = taking.target_tsval
    return entry

