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
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from handoff import fastpath

if TYPE_CHECKING:
    from handoff.control import ControlClient
    from handoff.maps import FlowKey

log = logging.getLogger("arr.handoff")

FIRST_CHECK = 0.001
"""Seconds after the request was sent that its socket is first polled."""
MAX_INTERVAL = 0.05


@dataclass(slots=True)
class PendingRelease:
    conn_id: int
    forward: socket.socket
    watch_key: "FlowKey"
    agent: "ControlClient"
    deadline: float = 0.0
    next_check: float = 0.0
    interval: float = FIRST_CHECK


class ForwardReleaser:
    """``release(pending, acknowledged)`` is called once per socket added:
    with True once its send queue is empty, with False at the deadline."""

    def __init__(self, release: Callable[[PendingRelease, bool], None], timeout: float, *,
                 unacked: Callable[[socket.socket], int] = fastpath.unacked) -> None:
        self.release = release
        self.timeout = timeout
        self.unacked = unacked
        self.pending: list[PendingRelease] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    def add(self, pending: PendingRelease) -> None:
        now = asyncio.get_running_loop().time()
        pending.deadline = now + self.timeout
        pending.next_check = now + pending.interval
        self.pending.append(pending)
        self._arm(pending.next_check)

    def release_now(self, watch_key: "FlowKey") -> bool:
        """Release the socket of WATCH_KEY at once, if it is still pending
        (True). A take-back needs its 4-tuple for the rebuilt socket: by then
        the client has acknowledged the whole response, which the target sent
        after it had all of the request."""
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
                pending.interval = min(pending.interval * 2, MAX_INTERVAL)
                pending.next_check = now + pending.interval
                waiting.append(pending)
                continue
            try:
                self.release(pending, not outstanding)
            except Exception:  # one connection's failure must not stop the others' release
                log.exception("releasing the forwarding socket of connection %d failed", pending.conn_id)
        self.pending = waiting
        if waiting:
            self._arm(min(p.next_check for p in waiting))
