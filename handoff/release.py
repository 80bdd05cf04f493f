"""Step 9 of the handoff for all connections at once: release each
forwarding socket when the target has acknowledged the request on it.

After the handoff the router's forwarding socket still holds the request
until the target acknowledges it (its kernel retransmits meanwhile; the
target's ACKs reach it through the mirror, handoff/bpf/target.bpf.c). The
acknowledgment usually comes within an RTT. One timer for all pending sockets
polls their send queues (one SIOCOUTQ each, handoff/fastpath.py), instead of a
task and a sleep loop per handoff: at a thousand handoffs a second the
per-handoff task cost more than the polls. Each socket is polled after 1 ms,
then at doubling intervals up to 50 ms, until ``timeout``.

A request still unacknowledged ``resend_after`` seconds after it was sent
(twice ``handoff.rto_min``) is sent again by the router itself, as crafted
segments from the forwarding socket's 4-tuple (``RequestCopy``), then at
doubling gaps, up to ``MAX_RESENDS`` times. The socket's own timer cannot be
trusted with it: its first RTO comes from the RTT the kernel cached for the
target (``ip tcp_metrics``), which closes under loss leave at anything up to
seconds, and a socket rebuilt by a take-back has only that (benchmarks/
RESULTS.md, "The request sent again by the router"). The target acknowledges
a copy it already had with a duplicate ACK, as it would the kernel's own
retransmission.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from handoff import fastpath
from handoff.craft import data_segments

if TYPE_CHECKING:
    from handoff.control import ControlClient
    from handoff.maps import FlowKey

log = logging.getLogger("arr.handoff")

FIRST_CHECK = 0.001
"""Seconds after the request was sent that its socket is first polled."""
MAX_INTERVAL = 0.05


MAX_RESENDS = 5
"""Copies the router sends of one request (at 2, 4, 8, 16 and 32 times
``handoff.rto_min`` after the first send, 1.2 s in all at the default): past
them the socket's own timer, capped at 1 s for a rebuilt one, goes on alone."""
RESEND_SEGMENTS = 4
"""Segments of the unacknowledged tail sent per copy, as a recovery's first
flight: the target's ACK (with SACK) says what else is missing."""


@dataclass(frozen=True, slots=True)
class RequestCopy:
    """A handed-off request as its forwarding socket sent it, to send again
    from the same 4-tuple: PAYLOAD from SEQ, acknowledging ACK (the
    forwarding socket's rcv_nxt: the target sends nothing before the request)."""

    local: tuple[str, int]
    remote: tuple[str, int]
    seq: int
    ack: int
    mss: int
    rcv_wscale: int
    payload: bytes

    def segments(self, unacked: int, rcv_wnd: int) -> list[bytes]:
        """The last UNACKED bytes of the payload (what the socket's send queue
        still holds), at most RESEND_SEGMENTS of them, announcing RCV_WND
        bytes as the socket would (its own scale)."""
        start = len(self.payload) - min(max(unacked, 0), len(self.payload))
        size = max(1, self.mss)
        tail = self.payload[start:start + RESEND_SEGMENTS * size]
        window = min(max(rcv_wnd, 0) >> self.rcv_wscale, 0xFFFF)
        return data_segments(self.local, self.remote, seq=self.seq + start, ack=self.ack, window=window,
                             payload=tail, segment_size=size)


@dataclass(slots=True)
class PendingRelease:
    conn_id: int
    forward: socket.socket
    watch_key: "FlowKey"
    agent: "ControlClient"
    copy: RequestCopy | None = None
    """What a resend sends (None: the socket's own timer alone)."""
    deadline: float = 0.0
    next_check: float = 0.0
    interval: float = FIRST_CHECK
    resend_at: float = float("inf")
    resends: int = 0
    """Copies sent so far: the next comes ``resend_after * 2**resends`` after the last."""


class ForwardReleaser:
    """``release(pending, acknowledged)`` is called once per socket added:
    with True once its send queue is empty, with False at the deadline."""

    def __init__(self, release: Callable[[PendingRelease, bool], None], timeout: float, *,
                 unacked: Callable[[socket.socket], int] = fastpath.unacked,
                 resend: Callable[[PendingRelease, int], None] | None = None, resend_after: float = 0.0) -> None:
        """RESEND(pending, unacked bytes) sends a request again, from
        RESEND_AFTER seconds after it was sent (0 or no RESEND: never)."""
        self.release = release
        self.timeout = timeout
        self.unacked = unacked
        self.resend = resend
        self.resend_after = resend_after
        self.pending: list[PendingRelease] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    def add(self, pending: PendingRelease) -> None:
        now = asyncio.get_running_loop().time()
        pending.deadline = now + self.timeout
        pending.next_check = now + pending.interval
        if pending.copy is not None and self.resend is not None and self.resend_after > 0:
            pending.resend_at = now + self.resend_after
        self.pending.append(pending)
        self._arm(pending.next_check)

    def release_now(self, watch_key: "FlowKey") -> bool:
        """Release the socket of WATCH_KEY at once, if it is still pending
        (True). A take-back needs its 4-tuple for the rebuilt socket: by then
        the agent has seen the target acknowledge all the router sent on it
        (``_take_back_verdict``, handoff/agent.py), so nothing of the request
        is lost with the socket's send queue."""
        for i, pending in enumerate(self.pending):
            if pending.watch_key == watch_key:
                del self.pending[i]
                self.release(pending, True)
                return True
        return False

    async def finish(self) -> None:
        """Wait until every socket added so far is released (shutdown)."""
        while self.pending:
            await asyncio.sleep(FIRST_CHECK)

    def _arm(self, when: float) -> None:
        # The due time is kept here: uvloop's timer handles have no when().
        if self._timer is not None:
            if self._timer_at <= when:
                return
            self._timer.cancel()
        self._timer_at = when
        self._timer = asyncio.get_running_loop().call_at(when, self._poll)

    def _poll(self) -> None:
        self._timer = None
        now = asyncio.get_running_loop().time()
        waiting: list[PendingRelease] = []
        for pending in self.pending:
            if pending.next_check > now:
                waiting.append(pending)
                continue
            try:
                outstanding = self.unacked(pending.forward)
            except OSError:
                outstanding = 0  # nothing left to retransmit on a broken socket
            if outstanding and now < pending.deadline:
                if now >= pending.resend_at:
                    self._resend(pending, outstanding, now)
                pending.interval = min(pending.interval * 2, MAX_INTERVAL)
                pending.next_check = min(now + pending.interval, pending.resend_at)
                waiting.append(pending)
                continue
            try:
                self.release(pending, not outstanding)
            except Exception:  # one connection's failure must not stop the others' release
                log.exception("releasing the forwarding socket of connection %d failed", pending.conn_id)
        self.pending = waiting
        if waiting:
            self._arm(min(p.next_check for p in waiting))

    def _resend(self, pending: PendingRelease, outstanding: int, now: float) -> None:
        pending.resends += 1
        pending.resend_at = (now + self.resend_after * 2 ** pending.resends if pending.resends < MAX_RESENDS
                             else float("inf"))
        assert self.resend is not None
        try:
            self.resend(pending, outstanding)
        except Exception:  # the socket's own timer still resends
            log.exception("sending the request of connection %d again failed", pending.conn_id)
