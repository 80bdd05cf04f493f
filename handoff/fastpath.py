"""The handoff's per-connection kernel reads, compiled when possible.

One handoff reads two sockets' state (about a dozen getsockopt/ioctl calls
each), polls eligibility, drains queues and parses the saved SYN; a take-back
restores sockets (about fifteen calls each, handoff/rebuild.py). Through
Python each value is a syscall wrapper plus objects; ``handoff/_fastpath.c``
does each of these steps in one call. The Python in ``handoff.tcpstate`` is
the specification: every function here returns exactly what its reference
returns (tests/unit/test_fastpath.py checks both on the same sockets and on
generated SYNs), and is the reference itself when the extension is not built
(``COMPILED`` says which). ``scripts/setup.sh`` builds it; see setup.py.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

from handoff import tcpstate
from handoff.translate import SocketState

if TYPE_CHECKING:
    from handoff.rebuild import SocketPlan

try:
    from handoff import _fastpath
except ImportError:  # not built: the Python reference serves
    _fastpath = None  # type: ignore[assignment]

COMPILED = _fastpath is not None


def snapshot_reference(sock: socket.socket) -> tcpstate.ConnectionSnapshot:
    """``tcpstate.snapshot`` without a window probe: the handoff's reading."""
    return tcpstate.snapshot(sock, window_probe=False)


def ineligible_reference(sock: socket.socket) -> str | None:
    return tcpstate.ineligible(sock)


def unacked_reference(sock: socket.socket) -> int:
    return tcpstate.queued(sock)[1]


def drain_reference(sock: socket.socket) -> bytes:
    """Whatever the kernel has queued on the socket, without blocking."""
    chunks = []
    while tcpstate.queued(sock)[0]:
        try:
            chunk = sock.recv(65536, socket.MSG_DONTWAIT)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def parse_syn_reference(headers: bytes) -> tcpstate.SynInfo:
    return tcpstate.parse_syn(headers)


if _fastpath is not None:
    _socket_state = _fastpath.socket_state
    _eligibility = _fastpath.eligibility
    _parse_syn = _fastpath.parse_syn

    def snapshot(sock: socket.socket) -> tcpstate.ConnectionSnapshot:
        (local, remote, state, options, wscale, snd_mss, inq, outq, not_sent, urgent,
         snd_nxt, rcv_nxt, clock) = _socket_state(sock.fileno())
        tcp = SocketState(
            local=local, remote=remote, snd_nxt=snd_nxt, rcv_nxt=rcv_nxt,
            snd_wscale=wscale & 0x0F, rcv_wscale=wscale >> 4, ts_clock=clock,
            timestamps=bool(options & tcpstate.TCPI_OPT_TIMESTAMPS),
            sack=bool(options & tcpstate.TCPI_OPT_SACK), mss=snd_mss,
            ts_usec=tcpstate.ts_usec(clock))
        return tcpstate.ConnectionSnapshot(tcp=tcp, state=state, inq=inq, outq=outq,
                                           outq_not_sent=not_sent, urgent=urgent)

    def ineligible(sock: socket.socket) -> str | None:
        return tcpstate.ineligibility(*_eligibility(sock.fileno()))

    def unacked(sock: socket.socket) -> int:
        return _fastpath.unacked(sock.fileno())

    def drain(sock: socket.socket) -> bytes:
        return _fastpath.drain(sock.fileno())

    def parse_syn(headers: bytes) -> tcpstate.SynInfo:
        return tcpstate.SynInfo(*_parse_syn(headers))

    def restore(sock: socket.socket, plan: "SocketPlan", options: bytes, window_probe: bool | None) -> None:
        """handoff/rebuild.py's ``restore_reference`` in one call (OPTIONS:
        ``repair_options(plan)``)."""
        _fastpath.restore(sock.fileno(), plan.local, plan.remote, plan.snd_nxt, plan.rcv_nxt, plan.mss, options,
                          plan.ts_clock if plan.timestamps else None, plan.received, plan.snd_wl1, plan.snd_wnd,
                          plan.rto_min_us, plan.rto_max_ms, _LEAVE[window_probe])

    _LEAVE = {True: 1, False: 0, None: -2}
else:
    snapshot = snapshot_reference
    ineligible = ineligible_reference
    unacked = unacked_reference
    drain = drain_reference
    parse_syn = parse_syn_reference
