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

Most closes skip the lookup. A rebuilt connection has sent nothing, so the
router knows its FIN's seq (``ReadyForward.fin_seq``); the router's program
records the ack of the target's FIN in the watch entry (``target_fin_ack``,
handoff/bpf/router.bpf.c ``record_target``). A FIN from the target that
acknowledges the router's has put the socket in TIME_WAIT: at the look it is
destroyed by its cookie (read before the close) at once (``time_wait_proven``).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

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


def time_wait_proven(fin_seq: int | None, target_fin_ack: int) -> bool:
    """Whether the target's FIN (TARGET_FIN_ACK: its ack, 0 for none seen)
    acknowledged the router's FIN at seq FIN_SEQ: the router's socket went
    from FIN_WAIT to TIME_WAIT on it. A FIN the target sent before it saw the
    router's (both closed at once) proves nothing: the socket is CLOSING until
    the ACK, and is looked up."""
    return fin_seq is not None and target_fin_ack != 0 and target_fin_ack == (fin_seq + 1) % (1 << 32)


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


CLOSE_RESULTS = ("proven", "destroyed", "gone", "quarantined", "unknown")
"""How a close ended (``arr_forward_closes_total``): TIME_WAIT proven by the
target's FIN and destroyed without a lookup; looked up in TIME_WAIT and
destroyed; no socket left; the target never finished (the port waits out
its quarantine); sock_diag did not answer (the port counts as free)."""


class ForwardCloser:
    def __init__(self, datapath: "RouterDatapath", connections: "RouterConnections",
                 count: Callable[[str], None] = lambda result: None) -> None:
        self.datapath = datapath
        self.connections = connections
        self.count = count
        """Told each close's result (``CLOSE_RESULTS``)."""
        self._diag = netlink.SockDiag(None)
        self._timers: dict[FlowKey, asyncio.TimerHandle] = {}

    def close(self, ready: ReadyForward) -> None:
        """FIN now; the port is free once the exchange is over."""
        # Kept "in flight" meanwhile: the lifecycle's sweep leaves its watch entry be.
        self.connections.in_flight.add(ready.watch_key)
        proof = None
        if ready.fin_seq is not None:
            try:
                proof = (ready.fin_seq, _cookie(ready.sock))
            except OSError:
                pass  # looked up instead
        try:
            ready.sock.close()
        finally:
            self._schedule(ready.watch_key, ready.conn_id, 0, proof)

    def _schedule(self, key: FlowKey, conn_id: int, look: int, proof: tuple[int, int] | None = None) -> None:
        self._timers[key] = asyncio.get_running_loop().call_later(LOOKS[look], self._look, key, conn_id, look,
                                                                  proof)

    def _look(self, key: FlowKey, conn_id: int, look: int, proof: tuple[int, int] | None = None) -> None:
        """PROOF: (the FIN's seq, the socket's cookie), when the router knows them."""
        self._timers.pop(key, None)
        watch = self.datapath.watch.lookup(key)
        if watch is None or watch.conn_id != conn_id:
            self.connections.in_flight.discard(key)
            return  # the port went another way meanwhile
        local, remote = key.dst, key.src
        cookie = None
        answered = True
        proven = proof is not None and time_wait_proven(proof[0], watch.target_fin_ack)
        if proven:
            assert proof is not None
            step, cookie = CloseStep("destroy"), proof[1]
        else:
            try:
                found = self._diag.sockets_of([(local, remote)])[(local, remote)]
                step = close_step(None if found is None else found.state, look)
                cookie = None if found is None else found.cookie
            except OSError as exc:
                log.debug("looking up the closed forwarding connection %r: %s", key, exc)
                step = close_step(None, look, answered=False)
                answered = False
        if step.action == "destroy" and cookie is not None:
            try:
                self._diag.destroy(local, remote, cookie)
            except OSError as exc:
                log.debug("destroying %r in TIME_WAIT: %s", key, exc)
        if step.action in ("destroy", "free"):
            self.datapath.watch.delete(key)
            self.connections.in_flight.discard(key)
            self.count("proven" if proven else "destroyed" if step.action == "destroy"
                       else "gone" if answered else "unknown")
        elif step.action == "look":
            self._schedule(key, conn_id, look + 1, proof)
        else:
            self.count("quarantined")
            watch.state, watch.closed_ns = WATCH_CLOSED, time.monotonic_ns()
            self.datapath.watch.update(key, watch)
            self.connections.in_flight.discard(key)

    def stop(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._diag.close()


SO_COOKIE = getattr(socket, "SO_COOKIE", 57)
"""<asm-generic/socket.h>: the socket's cookie, as sock_diag names it."""


def _cookie(sock: socket.socket) -> int:
    return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), sys.byteorder)
