"""Closing a forwarding connection the router rebuilt (handoff/takeback.py),
or one its pool opened and did not use (handoff/forward_pool.py, through
``HandoffEngine._retire_forward``), without the 60 s of TIME_WAIT that would
keep its port from the next handoff.

A taken-back connection whose next request goes elsewhere than its target
closes its forwarding connection the way any client would: a FIN, answered by
the server's. The router's side then waits in TIME_WAIT, holding the port
(the kernel refuses to bind it) for a minute: at a thousand take-backs to
another target a second, 11,000 forwarding ports last eleven seconds. So once
the router's socket is in TIME_WAIT (the server closed too) it is destroyed
(sock_diag, by cookie: no packet), as the agents do with the targets' TIME_WAIT
sockets (README, "How a handed-off connection ends"), and the port is free.
Until then the watch entry stays CONNECTING: the server's FIN and ACK reach
the router's socket, and the port counts as taken. A server that never
answers leaves the port in quarantine (WATCH_CLOSED).

Not at once, though: TIME_WAIT is there to re-ACK the server's FIN when the
router's ACK of it was lost. Destroyed 10 ms after the FIN, the socket left
the server's retransmitted FIN (an RTO, 200 ms or more, later) to find no
socket and draw a RST (seen under 2% loss: 5 to 8 per 200 moved connections,
tests/net/test_migrate_net.py). So TIME_WAIT is kept for ``TIME_WAIT_HOLD``,
which covers the server's first two retransmissions; a thousand take-backs to
another target a second then hold about a thousand ports. The hold's end is
also the first look (``LOOKS``): a close costs one sock_diag lookup and the
destroy, both on the closer's own netlink socket. The router pays that on
every hand-on (handoff/takeback.py), so the looks due within ``BATCH_WAIT``
of each other go together: one timer, one batch of lookups and one of
destroys (``SockDiag.sockets_of``, ``SockDiag.destroy_each``: a system call
per 32 sockets, not two per socket).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from arr import netlink
from arr.inet_diag import Address, TcpSocket, TcpState
from handoff.forward_pool import ReadyForward
from handoff.maps import WATCH_CLOSED, FlowKey, WatchEntry

if TYPE_CHECKING:
    from handoff.datapath import RouterDatapath
    from handoff.lifecycle import RouterConnections

log = logging.getLogger("arr.handoff")

TIME_WAIT_HOLD = 1.0
"""Seconds after the FIN before a TIME_WAIT socket is destroyed: the server's
FIN, retransmitted at its RTO (200 ms, then 400 ms), still finds it."""
LOOKS = (TIME_WAIT_HOLD, 1.0, 3.0)
"""Seconds before each look at the router's socket, from the FIN on. The
first is at the hold's end: by then almost every server has answered, so one
look (and the destroy) is all a close costs; a look earlier could only find
the socket still held (TIME_WAIT) or not done yet."""
BATCH_WAIT = 0.05
"""Seconds a due look may wait for the ones due after it, so that one timer
and one batch of sock_diag requests serve them all (at a thousand closes a
second, about fifty)."""
EARLY = 0.001
"""A look this close to its time goes with the batch (the loop's timers may
fire that early)."""


@dataclass(frozen=True)
class CloseStep:
    """What to do after a look at a closed forwarding connection's socket."""

    action: str
    """``destroy`` (TIME_WAIT, held long enough), ``free`` (the socket is
    gone: the port is free), ``look`` (again, after ``delay`` seconds), or
    ``quarantine`` (the server never finished: the port waits out WATCH_CLOSED)."""
    delay: float = 0.0


def close_step(state: TcpState | None, look: int, *, answered: bool = True) -> CloseStep:
    """The step after look number LOOK (0-based) found the socket in STATE
    (None: no socket). ANSWERED False: sock_diag failed, the state is unknown;
    after the last look it counts as gone, as a socket nobody can see."""
    last = look + 1 >= len(LOOKS)
    if not answered:
        return CloseStep("free") if last else CloseStep("look", LOOKS[look + 1])
    if state is None:
        return CloseStep("free")
    if state == TcpState.TIME_WAIT:
        return CloseStep("destroy")  # every look is at or after the hold's end
    return CloseStep("quarantine") if last else CloseStep("look", LOOKS[look + 1])


@dataclass(eq=False)
class _Closing:
    key: FlowKey
    conn_id: int
    look: int = 0


class ForwardCloser:
    def __init__(self, datapath: "RouterDatapath", connections: "RouterConnections") -> None:
        self.datapath = datapath
        self.connections = connections
        self.reclaimed = 0
        self._diag = netlink.SockDiag(None)
        self._due: list[tuple[float, int, _Closing]] = []
        """(loop time of the look, order, close): a heap."""
        self._order = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    def close(self, ready: ReadyForward) -> None:
        """FIN now; the port is free once the exchange is over."""
        # Kept "in flight" meanwhile: the lifecycle's sweep leaves its watch entry be.
        self.connections.in_flight.add(ready.watch_key)
        try:
            ready.sock.close()
        finally:
            self._schedule(LOOKS[0], _Closing(ready.watch_key, ready.conn_id))

    def _schedule(self, delay: float, closing: _Closing) -> None:
        loop = asyncio.get_running_loop()
        at = loop.time() + delay
        heapq.heappush(self._due, (at, next(self._order), closing))
        if self._timer is None or at + BATCH_WAIT < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = at + BATCH_WAIT
            self._timer = loop.call_at(self._timer_at, self._look_due)

    def _look_due(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time() + EARLY
        due: list[_Closing] = []
        while self._due and self._due[0][0] <= now:
            due.append(heapq.heappop(self._due)[2])
        try:
            self._look(due)
        except Exception:  # the sweep's recount finds what a failed look left
            log.exception("looking at %d closed forwarding connections", len(due))
            for closing in due:
                self.connections.in_flight.discard(closing.key)
        if self._due and self._timer is None:
            self._timer_at = self._due[0][0] + BATCH_WAIT
            self._timer = loop.call_at(self._timer_at, self._look_due)

    def _look(self, due: list[_Closing]) -> None:
        watches: list[tuple[_Closing, WatchEntry]] = []
        for closing in due:
            watch = self.datapath.watch.lookup(closing.key)
            if watch is None or watch.conn_id != closing.conn_id:
                self.connections.in_flight.discard(closing.key)  # the port went another way meanwhile
            else:
                watches.append((closing, watch))
        if not watches:
            return
        pairs = [(closing.key.dst, closing.key.src) for closing, _ in watches]  # (local, remote)
        found: dict[tuple[Address, Address], TcpSocket | None] = {}
        answered = True
        try:
            found = self._diag.sockets_of(pairs)
        except OSError as exc:
            log.debug("looking up %d closed forwarding connections: %s", len(pairs), exc)
            answered = False
        destroy: list[tuple[Address, Address, int]] = []
        for (closing, watch), pair in zip(watches, pairs):
            sock = found.get(pair)
            step = close_step(None if sock is None else sock.state, closing.look, answered=answered)
            if step.action == "destroy" and sock is not None:
                destroy.append((*pair, sock.cookie))
            if step.action in ("destroy", "free"):
                self.datapath.watch.delete(closing.key)
                self.connections.in_flight.discard(closing.key)
            elif step.action == "look":
                closing.look += 1
                self._schedule(step.delay, closing)
            else:
                watch.state, watch.closed_ns = WATCH_CLOSED, time.monotonic_ns()
                self.datapath.watch.update(closing.key, watch)
                self.connections.in_flight.discard(closing.key)
        if destroy:
            # Their watch entries are gone already: a socket the destroy
            # missed keeps its port from bind() until its TIME_WAIT ends.
            try:
                self.reclaimed += sum(self._diag.destroy_each(destroy))
            except OSError as exc:
                log.debug("destroying %d forwarding connections in TIME_WAIT: %s", len(destroy), exc)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._due.clear()
        self._diag.close()
