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
destroy, both on the closer's own netlink socket.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from arr import netlink
from arr.inet_diag import TcpState
from handoff.forward_pool import ReadyForward
from handoff.maps import WATCH_CLOSED, FlowKey

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


class ForwardCloser:
    def __init__(self, datapath: "RouterDatapath", connections: "RouterConnections") -> None:
        self.datapath = datapath
        self.connections = connections
        self.reclaimed = 0
        self._diag = netlink.SockDiag(None)
        self._timers: dict[FlowKey, asyncio.TimerHandle] = {}

    def close(self, ready: ReadyForward) -> None:
        """FIN now; the port is free once the exchange is over."""
        # Kept "in flight" meanwhile: the lifecycle's sweep leaves its watch entry be.
        self.connections.in_flight.add(ready.watch_key)
        try:
            ready.sock.close()
        finally:
            self._schedule(ready.watch_key, ready.conn_id, 0)

    def _schedule(self, key: FlowKey, conn_id: int, look: int) -> None:
        self._timers[key] = asyncio.get_running_loop().call_later(LOOKS[look], self._look, key, conn_id, look)

    def _look(self, key: FlowKey, conn_id: int, look: int) -> None:
        self._timers.pop(key, None)
        watch = self.datapath.watch.lookup(key)
        if watch is None or watch.conn_id != conn_id:
            self.connections.in_flight.discard(key)
            return  # the port went another way meanwhile
        local, remote = key.dst, key.src
        found = None
        try:
            found = self._diag.sockets_of([(local, remote)])[(local, remote)]
            step = close_step(None if found is None else found.state, look)
        except OSError as exc:
            log.debug("looking up the closed forwarding connection %r: %s", key, exc)
            step = close_step(None, look, answered=False)
        if step.action == "destroy" and found is not None:
            try:
                self._diag.destroy(local, remote, found.cookie)
                self.reclaimed += 1
            except OSError as exc:
                log.debug("destroying %r in TIME_WAIT: %s", key, exc)
        if step.action in ("destroy", "free"):
            self.datapath.watch.delete(key)
            self.connections.in_flight.discard(key)
        elif step.action == "look":
            self._schedule(key, conn_id, look + 1)
        else:
            watch.state, watch.closed_ns = WATCH_CLOSED, time.monotonic_ns()
            self.datapath.watch.update(key, watch)
            self.connections.in_flight.discard(key)

    def stop(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._diag.close()
