"""Re-handoff in place: a handed-off client's next request goes to the same
server on the same connection, and no socket is rebuilt.

The ingress program captures the client's next request as for any take-back
(handoff/bpf/router.bpf.c, handoff/takeback.py). When the router reads and
decides it from those bytes (``Router.route_captured``) and the decision is a
handoff to the target that already holds the connection, ``InPlace.reroute``:

1. asks the agent to SHIFT the ack translation at the rewritten request's end
   (handoff/agent.py; the egress program keeps a one-step history,
   ``translate.AckShift``) and waits for its ACK, so that no ack of the new
   request can leave with the old offset;
2. moves the ingress entry on (``plan_in_place``): the new seq offset,
   take_from after the request, the request's region kept (the program drops
   a retransmission of it and asks for a resend), ACTIVE again;
3. sends the rewritten request to the server as crafted segments on the
   forwarding connection's 4-tuple, the first one last (``request_segments``
   says why), and keeps them. The client stays the party that retransmits:
   nothing acknowledges its request until the server's ACK of the rewritten
   one, translated, reaches it, and each copy it resends makes the router
   send the segments again (``on_resends``).

One agent exchange and one raw send per request. Whatever else (another
target, Proxy, Local, Reject, bytes that are not one whole request, an agent
that says no) goes the take-back's way, which still has every captured byte.
The plans are pure (tests/unit/test_inplace.py); ``InPlace`` is the I/O.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, TypeGuard

from handoff import framing
from handoff.control import UNACKED_ASK_AGAIN, Ack, ControlClient, ControlUnavailable, Nack, Shift
from handoff.craft import RawSender, data_segments
from handoff.event_reader import WINDOW as EVENT_WINDOW
from handoff.lifecycle import forward_key_of, target_of, wire_key
from handoff.maps import (FLOW_ACTIVE, FLOW_ENDED, FLOW_F_RST, FLOW_F_WANT_HEADER, FLOW_TAKEBACK, AckShiftState,
                          FlowEntry, FlowKey)
from handoff.translate import AckShift, TcpFields, seq_after, translate_fields, wrap

if TYPE_CHECKING:
    from arr.config import HandoffSettings
    from arr.metrics import Metrics
    from handoff.datapath import RouterDatapath
    from handoff.lifecycle import RouterConnections
    from handoff.takeback import Segment

DEFAULT_SEGMENT = 1460
"""Payload per crafted segment: an Ethernet MSS (they carry no options). The
server's own MSS is at least that on any path the cluster uses."""
SHIFT_UNACKED_FOR = 0.2
"""An agent that refuses a SHIFT as ``unacked`` waits for the server to
acknowledge all of the previous request (handoff/control/frames.py
``UNACKED_ASK_AGAIN``). The router asks again every UNACKED_ASK_AGAIN seconds
for up to SHIFT_UNACKED_FOR, rather than take the connection back, which
would wait for the same ACK and rebuild two sockets besides
(tests/net/test_takeback_bodies_net.py)."""
RESEND_GAP = 2 * EVENT_WINDOW
"""Seconds after the router sent a rerouted request (or sent it again) in
which a client's resend of its own does not make it send again: that resend
crossed the router's send. A client with more than one segment in flight
probes for a lost tail (TLP) after twice its RTT and 2 ms, here often before
the router has rerouted the request; its copy, dropped by the ingress
program once the entry is ACTIVE again, reaches the router with the next
batch of events (handoff/event_reader.py ``WINDOW``), and the router's copy
then went out a few milliseconds after the first, when a server that had
answered and closed in between answered it with a RST (seen under 1% loss
each way, tests/net/test_takeback_bodies_net.py). A segment the server did
lose is sent again on the client's next resend, at its RTO."""
KEEP_SEGMENTS = 60.0
"""Seconds the router keeps a rerouted request's segments for resends: a
client that has not heard the server acknowledge it by then has been
retransmitting for most of a minute, and its connection ends the usual way."""


@dataclass(frozen=True)
class InPlacePlan:
    """Where a rerouted request goes, in both sequence spaces."""

    request_from: int
    """Client seq of the request R (the entry's take_from)."""
    take_from: int
    """Client seq after R: the next request starts here."""
    start: int
    """Server seq of the rewritten request R' (where the server's stream stops)."""
    end: int
    """Server seq after R'."""
    seq_delta: int
    """The client-to-server offset from R's end on: also the egress entry's new
    ack offset (the server's acks from ``end`` on, back in the client's space)."""


def plan_in_place(entry: FlowEntry, request_len: int, rewritten_len: int) -> InPlacePlan:
    """R (REQUEST_LEN bytes from the entry's take_from) rerouted as R' of REWRITTEN_LEN."""
    t = entry.take_from
    start = wrap(t + entry.x.seq_delta)
    end = wrap(start + rewritten_len)
    take_from = wrap(t + request_len)
    return InPlacePlan(request_from=t, take_from=take_from, start=start, end=end, seq_delta=wrap(end - take_from))


def moved_on(entry: FlowEntry, plan: InPlacePlan) -> FlowEntry:
    """The ingress entry after the request went in place: ACTIVE, the new
    offset and take_from, R's region (a retransmission of it: a resend)."""
    entry.shift = AckShiftState.of(AckShift(plan.request_from, plan.take_from, entry.x.seq_delta))
    entry.x.seq_delta = plan.seq_delta
    entry.take_from = plan.take_from
    entry.state = FLOW_ACTIVE
    entry.flags &= ~FLOW_F_WANT_HEADER
    entry.requests = min(entry.requests + 1, 0xFFFF)
    return entry


def request_segments(entry: FlowEntry, plan: InPlacePlan, rewritten: bytes, latest: "Segment",
                     segment_size: int = DEFAULT_SEGMENT) -> list[bytes]:
    """R' as the client would have sent it on the forwarding connection, from
    ``plan.start``: the client's ack and window of LATEST (a captured segment)
    translated as the ingress program translates them. In the order to send
    them: the first segment last.

    The first segment last, so that the server reads no byte of R' before it
    has all of it, as when a request fits in one segment. In order, a server
    that answers once it has read the head (nginx's ``return`` does, before
    the body) answered the client while the rest was still on its way. Its
    ACK of the rest then waited for its delayed ACK (40 ms up to 200 ms),
    and so did the client's next request, rerouted only once the server has
    acknowledged all of R' (handoff/agent.py ``_shift_verdict``). And a client
    that closed on the answer sent a FIN that could overtake the rest on its
    way: the server's SACK of it made the client resend R (RACK), and the
    router's copy of R', sent once the server had closed, drew a RST. Last,
    the first segment fills the gap below the rest, which Linux acknowledges
    at once (RFC 5681 4.2: an ACK when a gap is filled). The rest arrives
    out of order and draws a duplicate ACK each, whose SACK blocks lie inside
    R' and reach the client empty (``translate.shift_edge``): a client with
    SACK ignores them (every Linux client; one without SACK counts them as
    duplicate ACKs, as it does the server's partial ACKs of R' in order).

    No timestamps: the server's PAWS check would compare them with the newest
    TSval it saw, and the router cannot know the client's clock at the moment
    it sends (a pure ACK of the client's forwarded after LATEST, a resend long
    after it: a stale TSval is dropped, and every resend with it). A segment
    without them skips PAWS (handoff/craft.py says why that is safe on Linux)
    and leaves the server's ts_recent to the client's own segments."""
    x = entry.x.translation()
    fields = translate_fields(TcpFields("0.0.0.0", "0.0.0.0", 0, 0, 0, latest.ack, latest.window), x)
    frames = data_segments((x.saddr, x.sport), (x.daddr, x.dport), seq=plan.start, ack=fields.ack,
                           window=fields.window, payload=rewritten, segment_size=segment_size)
    return frames[1:] + frames[:1]


def connection_stands(entry: FlowEntry | None, conn_id: int) -> TypeGuard[FlowEntry]:
    """The connection a copy of a rerouted request is for still stands at the
    router's ingress: its entry (CONN_ID's, not a later connection's on the
    same 4-tuple) is not ended by a new SYN (FLOW_ENDED) nor by the client's
    RST. A FIN leaves it standing: the server still reads the request before
    the client's close."""
    return (entry is not None and entry.conn_id == conn_id and entry.state != FLOW_ENDED
            and not entry.flags & FLOW_F_RST)


def frames_to_resend(frames: list[bytes], answered: bool) -> list[bytes]:
    """Which of a rerouted request's FRAMES (``request_segments``: the head
    last) to send again when its client resent the original. ANSWERED: the
    client has acknowledged bytes of the server's answer, so the server has
    read the head: a one-segment request needs nothing, a longer one all but
    the head.

    A copy the server does not need is not harmless once it has closed: its
    kernel answers it with a RST. Both were seen under 1% loss each way, with
    the ingress entry still in place a few milliseconds after the close: a
    client whose answer was lost resent its GET, the server's own resend of
    the answer reached it, and the client closed before the router's copy,
    read from the next batch of events, arrived; and a server that answered a
    POST on its head while a segment of the body was lost closed as soon as
    the copy's first segment filled the gap, before the head's copy behind
    it arrived. Without the head, the copy of a two-segment request is just
    the segment the server lacks. With more, a lost segment that is not the
    last of them still draws the rest behind it (not seen in the runs)."""
    if not answered:
        return frames
    return frames[:-1]


@dataclass
class _Sent:
    conn_id: int
    frames: list[bytes]
    at: float
    sent_at: float
    """When the router last sent them (first or again)."""


class InPlace:
    """Reroutes requests in place and resends them when their clients do."""

    def __init__(self, datapath: "RouterDatapath", connections: "RouterConnections", settings: "HandoffSettings",
                 metrics: "Metrics", sender: RawSender,
                 agent_of: Callable[[tuple[str, int]], ControlClient | None]) -> None:
        self.datapath = datapath
        self.connections = connections
        self.settings = settings
        self.metrics = metrics
        self.sender = sender
        self.agent_of = agent_of
        self._sent: dict[FlowKey, _Sent] = {}
        self._last_prune = time.monotonic()

    async def reroute(self, key: FlowKey, conn_id: int, request_len: int, rewritten: bytes,
                      latest: "Segment") -> str | None:
        """Send REWRITTEN (the request's REQUEST_LEN captured bytes, rewritten)
        to the server on KEY's connection. None once it is on its way; else why
        not, with nothing changed (the take-back goes on from the captures)."""
        entry = self.datapath.ingress.lookup(key)
        if entry is None or entry.conn_id != conn_id or entry.state != FLOW_TAKEBACK:
            return "entry-gone"
        if not self.sender.ready():
            return "no-raw-socket"
        agent = self.agent_of(target_of(entry))
        if agent is None or not agent.connected:
            return "agent-unavailable"
        plan = plan_in_place(entry, request_len, len(rewritten))
        # The client's ack on its request: all the server sent, or the agent says no.
        acked = wrap(latest.ack - entry.x.ack_delta)
        ask = Shift(conn_id=conn_id, key=wire_key(forward_key_of(entry)), start=plan.start, end=plan.end,
                    delta=plan.seq_delta, acked=acked, answers_head=conn_id in self.connections.answering_head)
        give_up = time.monotonic() + SHIFT_UNACKED_FOR
        while True:
            try:
                reply = await agent.request(ask, timeout=self.settings.agent_timeout)
            except ControlUnavailable:
                return "agent-unavailable"
            except (asyncio.TimeoutError, TimeoutError):
                # The agent may shift yet: harmless, the server's acks stay below
                # the shifted request until a take-back sends it (the history
                # rounds them down, and the next SHIFT or TAKEBACK starts afresh).
                return "agent-timeout"
            if not (isinstance(reply, Nack) and reply.reason == "unacked" and time.monotonic() < give_up):
                break
            self.metrics.inplace_waits.inc()
            await asyncio.sleep(UNACKED_ASK_AGAIN)
            entry = self.datapath.ingress.lookup(key)
            if entry is None or entry.conn_id != conn_id or entry.state != FLOW_TAKEBACK:
                return "entry-gone"
        if isinstance(reply, Nack):
            return f"agent-{reply.reason}"
        if not isinstance(reply, Ack):
            return "agent-protocol"
        # Read again: the program wrote the client's newest ack meanwhile.
        entry = self.datapath.ingress.lookup(key)
        if entry is None or entry.conn_id != conn_id or entry.state != FLOW_TAKEBACK:
            return "entry-gone"
        self.datapath.ingress.update(key, moved_on(entry, plan))
        # The response starts where the client's ack stands: until the client
        # acknowledges a byte past it, the request is unanswered (handoff/migrate.py).
        self.connections.answering(conn_id, latest.ack, framing.asks_head(rewritten))
        frames = request_segments(entry, plan, rewritten, latest)
        now = time.monotonic()
        self._sent[key] = _Sent(conn_id, frames, now, now)
        for frame in frames:
            self.sender.send(frame)
        self._prune()
        return None

    def on_resends(self, keys: list[tuple[FlowKey, int]]) -> None:
        """Clients resent requests rerouted in place (ARR_EV_RESEND): they
        have not heard the server acknowledge them; send the segments the
        server may lack again (``frames_to_resend``), once per batch of
        events (a client resends a request's segments together), and not
        within ``RESEND_GAP`` of their last send."""
        now = time.monotonic()
        for key, conn_id in dict.fromkeys(keys):
            sent = self._sent.get(key)
            if sent is None or sent.conn_id != conn_id or now - sent.sent_at < RESEND_GAP:
                continue
            entry = self.datapath.ingress.lookup(key)
            if not connection_stands(entry, conn_id):
                continue
            answer_from = self.connections.responses.get(conn_id)
            frames = frames_to_resend(sent.frames, answer_from is not None and seq_after(entry.peer_ack, answer_from))
            if not frames:
                continue
            self.metrics.inplace_resends.inc()
            sent.sent_at = now
            for frame in frames:
                self.sender.send(frame)

    def forget(self, key: FlowKey) -> None:
        """KEY's client sent its next request (or is gone): no resend any more."""
        self._sent.pop(key, None)

    def _prune(self) -> None:
        now = time.monotonic()
        if now - self._last_prune < KEEP_SEGMENTS / 4:
            return
        self._last_prune = now
        for key in [k for k, sent in self._sent.items() if now - sent.at > KEEP_SEGMENTS]:
            del self._sent[key]
