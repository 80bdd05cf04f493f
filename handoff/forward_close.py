"""Closing a forwarding connection the router rebuilt (handoff/takeback.py),
or one its pool opened and did not use (handoff/forward_pool.py, through
``HandoffEngine._retire_forward``), without the 60 s of TIME_WAIT that would
keep its port from the next handoff.

A taken-back connection whose next request goes elsewhere than its target
closes its forwarding connection the way any client would: a FIN, answered by
the server's. The router's side then waits in TIME_WAIT, holding the port
(the kernel refuses to bind it) for a minute: at a thousand take-backs to
another target a second, 11,000 forwarding ports last eleven seconds. So once
the server closed too, the TIME_WAIT socket is destroyed (sock_diag, by
cookie: no packet), as the agents do with the targets' TIME_WAIT sockets
(README, "How a handed-off connection ends"), and the port is free. Until
then the watch entry stays CONNECTING: the server's FIN and ACK reach the
router's socket, and the port counts as taken. A server that never answers
leaves the port in quarantine (WATCH_CLOSED).

Not at once, though: TIME_WAIT is there to re-ACK the server's FIN when the
router's ACK of it was lost. Destroyed 10 ms after the FIN, the socket left
the server's retransmitted FIN (an RTO, 200 ms or more, later) to find no
socket and draw a RST (seen under 2% loss: 5 to 8 per 200 moved connections,
tests/net/test_migrate_net.py). So TIME_WAIT is kept for ``TIME_WAIT_HOLD``,
which covers the server's first two retransmissions; a thousand take-backs to
another target a second then hold about a thousand ports.

What a close costs (the router pays it on every hand-on): the FIN is a
``shutdown``, and the socket stays open until the hold is over. Its own state
then says whether the server answered: the kernel moves a connection whose
FIN exchange is done out of the socket, into a TIME_WAIT socket with the same
cookie (read before the FIN, ``socket_cookie``), and leaves the socket CLOSE.
So a look is one getsockopt instead of a sock_diag lookup (about 50 us in
Python), and the destroy goes by that cookie. The looks due within
``BATCH_WAIT`` of each other share one timer.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from arr import netlink
from arr.inet_diag import TcpState
from handoff.forward_pool import ReadyForward
from handoff.maps import WATCH_CLOSED
from handoff.tcpstate import socket_cookie, tcp_state

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
serves them all (at a thousand closes a second, about fifty)."""
EARLY = 0.001
"""A look this close to its time goes with the batch (the loop's timers may
fire that early)."""


@dataclass(frozen=True)
class CloseStep:
    """What to do after a look at a closed forwarding connection's socket."""

    action: str
    """``destroy`` (the FIN exchange is over: the connection is in TIME_WAIT,
    held long enough), ``free`` (nothing to destroy: the port is free once
    the socket is closed), ``look`` (again, after ``delay`` seconds), or
    ``quarantine`` (the server never finished: the port waits out WATCH_CLOSED)."""
    delay: float = 0.0


def close_step(state: int | None, look: int) -> CloseStep:
    """The step after look number LOOK (0-based) found the router's own
    socket in STATE (None: its state could not be read). CLOSE: the kernel
    moved the connection into a TIME_WAIT socket (or it was reset, and the
    destroy finds nothing). After the last look, an unreadable state counts
    as over."""
    last = look + 1 >= len(LOOKS)
    if state is None:
        return CloseStep("free") if last else CloseStep("look", LOOKS[look + 1])
    if state == TcpState.CLOSE:
        return CloseStep("destroy")  # every look is at or after the hold's end
    return CloseStep("quarantine") if last else CloseStep("look", LOOKS[look + 1])


@dataclass(eq=False)
class _Closing:
    ready: ReadyForward
    cookie: int
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

    @property
    def closing(self) -> int:
        """Closes not over yet (each holds its socket's fd)."""
        return len(self._due)

    def close(self, ready: ReadyForward) -> None:
        """FIN now; the port is free once the exchange is over."""
        # Kept "in flight" meanwhile: the lifecycle's sweep leaves its watch entry be.
        self.connections.in_flight.add(ready.watch_key)
        cookie = 0
        try:
            cookie = socket_cookie(ready.sock)  # before the FIN: the TIME_WAIT socket inherits it
            ready.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:  # reset meanwhile: the look finds it CLOSE, the destroy nothing
            log.debug("closing the forwarding connection %r: %s", ready.watch_key, exc)
        self._schedule(LOOKS[0], _Closing(ready, cookie))

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
        while self._due and self._due[0][0] <= now:
            closing = heapq.heappop(self._due)[2]
            try:
                self._look(closing)
            except Exception:  # one close's failure must not strand the others
                log.exception("looking at the closed forwarding connection %r", closing.ready.watch_key)
                self._end(closing)
        if self._due and self._timer is None:
            self._timer_at = self._due[0][0] + BATCH_WAIT
            self._timer = loop.call_at(self._timer_at, self._look_due)

    def _look(self, closing: _Closing) -> None:
        ready = closing.ready
        key = ready.watch_key
        watch = self.datapath.watch.lookup(key)
        if watch is None or watch.conn_id != ready.conn_id:
            self._end(closing)
            return  # the port went another way meanwhile
        try:
            state: int | None = tcp_state(ready.sock)
        except OSError as exc:
            log.debug("reading the state of the closed forwarding connection %r: %s", key, exc)
            state = None
        step = close_step(state, closing.look)
        if step.action == "destroy":
            try:
                if self._diag.destroy(key.dst, key.src, closing.cookie):
                    self.reclaimed += 1
            except OSError as exc:
                log.debug("destroying %r in TIME_WAIT: %s", key, exc)
        if step.action in ("destroy", "free"):
            self.datapath.watch.delete(key)
            self._end(closing)
        elif step.action == "look":
            closing.look += 1
            self._schedule(step.delay, closing)
        else:
            # The socket, closed, becomes an orphan: the kernel ends its
            # FIN_WAIT2 within tcp_fin_timeout (60 s), inside the quarantine.
            watch.state, watch.closed_ns = WATCH_CLOSED, time.monotonic_ns()
            self.datapath.watch.update(key, watch)
            self._end(closing)

    def _end(self, closing: _Closing) -> None:
        closing.ready.sock.close()
        self.connections.in_flight.discard(closing.ready.watch_key)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for _, _, closing in self._due:
            closing.ready.sock.close()
        self._due.clear()
        self._diag.close()
