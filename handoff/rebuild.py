"""Rebuild a TCP connection's socket from its state (TCP_REPAIR), as CRIU
restores one: the inverse of what the handoff reads in handoff/tcpstate.py.

The router rebuilds two sockets when it takes a handed-off connection back
(handoff/takeback.py plans them): its side of the client's connection, with
the client's new request as the receive queue, and its side of the
forwarding connection to the target. Neither peer sees a packet while the
socket is built: a socket in repair mode sends nothing, and ``connect`` in
repair mode makes it ESTABLISHED without a handshake.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from typing import Callable, TypeVar

from handoff import craft, fastpath, tcpstate

TCP_REPAIR_WINDOW = 29
TCPOPT_MSS, TCPOPT_WINDOW, TCPOPT_SACK_PERM, TCPOPT_TIMESTAMP = 2, 3, 4, 8
_REPAIR_OPT = struct.Struct("=II")  # struct tcp_repair_opt
_REPAIR_WINDOW = struct.Struct("=IIIII")  # struct tcp_repair_window
_U32 = struct.Struct("=I")  # sequence numbers and clocks: unsigned, setsockopt's int is not
NO_WSCALE = 0xFF
Owed = TypeVar("Owed")


@dataclass(frozen=True, slots=True)
class SocketPlan:
    """Everything a rebuilt socket needs; sequence numbers in its own space."""

    local: tuple[str, int]
    remote: tuple[str, int]
    snd_nxt: int
    """The next byte it sends; everything before it is acknowledged."""
    rcv_nxt: int
    """The next byte it expects, before ``received`` is queued."""
    mss: int
    snd_wscale: int
    """The peer's window shift (NO_WSCALE: window scaling not negotiated)."""
    rcv_wscale: int
    """The shift this side announced."""
    sack: bool
    timestamps: bool
    ts_clock: int
    """The TSval it sends from now on (ignored without timestamps): even
    (``ms_clock``), since TCP_TIMESTAMP takes the lowest bit for the clock's
    unit."""
    snd_wnd: int
    """The peer's receive window, in bytes."""
    snd_wl1: int
    """Seq of the peer's segment that announced it."""
    received: bytes = b""
    """Bytes the peer sent that are queued as received (the receive queue)."""
    rto_min_us: int = 0
    rto_max_ms: int = 0
    """Bounds of its retransmission timeout (tcpstate.bound_retransmissions;
    0: the kernel's). A rebuilt socket has no RTT sample: without a cached
    one for its peer (``ip tcp_metrics``) its first RTO is 3 s."""

    @property
    def rcv_end(self) -> int:
        return (self.rcv_nxt + len(self.received)) % (1 << 32)


def ms_clock(tsval: int) -> int:
    """TSVAL (mod 2**32) as a millisecond clock's value for TCP_TIMESTAMP:
    since Linux 6.7 the lowest bit of the value set asks for a microsecond
    clock (tcp_usec_ts), which would run a rebuilt socket's TSvals a thousand
    times faster than the translations that follow it count on, and make the
    next handoff's margin (handoff/translate.py ``margin_ticks``) a quarter of
    the TSval space. One tick lower is within any step a plan takes ahead."""
    return tsval & 0xFFFFFFFE


def repair_options(plan: SocketPlan) -> bytes:
    """TCP_REPAIR_OPTIONS: what the handshake would have negotiated."""
    opts = [(TCPOPT_MSS, plan.mss)]
    if plan.snd_wscale != NO_WSCALE:
        opts.append((TCPOPT_WINDOW, plan.snd_wscale | (plan.rcv_wscale << 16)))
    if plan.sack:
        opts.append((TCPOPT_SACK_PERM, 0))
    if plan.timestamps:
        opts.append((TCPOPT_TIMESTAMP, 0))
    return b"".join(_REPAIR_OPT.pack(code, value) for code, value in opts)


def receive_window(sock: socket.socket) -> tuple[int, int]:
    """(rcv_wnd, rcv_wup) of a socket in repair mode: the right edge of the
    window it last announced is rcv_wup + rcv_wnd."""
    _, _, _, rcv_wnd, rcv_wup = _REPAIR_WINDOW.unpack(
        sock.getsockopt(socket.IPPROTO_TCP, TCP_REPAIR_WINDOW, _REPAIR_WINDOW.size))
    return rcv_wnd, rcv_wup


def received_ack(plan: SocketPlan, rcv_wnd: int, rcv_wup: int, tsecr: int) -> bytes | None:
    """The ACK a socket rebuilt from PLAN owes its peer for ``received``
    (None: nothing received), from the socket's own state (``receive_window``;
    TSECR: the peer's newest TSval). The kernel sends none: bytes queued in
    repair mode schedule no ACK, and the window probe that leaving repair
    mode sends is one below the peer's rcv_nxt, so the peer discards it (its
    ACK field too) and only answers it. A peer that sent its request in two
    writes without TCP_NODELAY holds the second (Nagle) until the first is
    acknowledged, and would wait for its loss probe, 200 ms or more
    (tests/net/test_takeback_bodies_net.py). This is the ACK the socket would
    send: seq its snd_nxt, ack past ``received``, the window it has left,
    its clock (``ts_clock``, the value it was set to a moment ago). Sent
    instead of the probe, from the window read before the socket leaves
    repair mode: a probe would announce a window of its own, which the
    socket then counts as the peer's."""
    if not plan.received:
        return None
    return owed_ack(plan, rcv_wnd, rcv_wup, tsecr)


def owed_ack(plan: SocketPlan, rcv_wnd: int, rcv_wup: int, tsecr: int) -> bytes:
    """The ACK of everything a socket rebuilt from PLAN has received (``rcv_end``),
    as ``received_ack`` builds it. Also owed when nothing is queued: the
    server of a taken-back forwarding connection has not seen its last
    response acknowledged (the client's ACK came with its next request, which
    the router captured) and would resend the tail at its loss-probe timeout
    should the connection stay idle (handoff/takeback.py ``_rebuild_forward``)."""
    open_window = (rcv_wup + rcv_wnd - plan.rcv_end) % (1 << 32)
    if open_window >= 1 << 31:  # a window already past: none left
        open_window = 0
    shift = plan.rcv_wscale if plan.snd_wscale != NO_WSCALE else 0
    return _ack_received(plan, min(open_window >> shift, 0xFFFF), tsecr)


def _ack_received(plan: SocketPlan, window: int, tsecr: int) -> bytes:
    """The ACK of ``rcv_end`` from PLAN's socket announcing WINDOW (already scaled)."""
    return craft.ack(plan.local, plan.remote, seq=plan.snd_nxt, ack=plan.rcv_end, window=window,
                     tsval=plan.ts_clock if plan.timestamps else None, tsecr=tsecr)


def parked_acks(plan: SocketPlan, rcv_wnd: int, rcv_wup: int, tsecr: int) -> tuple[bytes, bytes]:
    """The ACKs a forwarding socket rebuilt from PLAN sends when it waits for
    another client (``handoff.reuse_forward``, handoff/takeback.py
    ``_rebuild_forward``): ``owed_ack`` announcing a zero window, then
    ``owed_ack`` itself, announcing the window the socket has.

    Why both: the server's idea of its peer's window is the last client's,
    which grows to megabytes over a download, and the next client's request
    cannot make it smaller. Linux takes a window from a segment only when its
    ack or its seq moves on (``tcp_may_update_window``) or when it announces
    more, or zero; these ACKs' seq is where the server's window update stands
    (nothing was sent since), and the next request's is theirs. With the
    owed ACK alone (or none), the server sent the next client's first flight
    into the last client's window: that client dropped what lay past its own
    (``TcpExtBeyondWindow``) and the server resent it at its RTO, about 210 ms
    later (68 and 73 of 1,200 requests in two ad hoc rounds of [1 MiB,
    /whoami, 1 MiB] per connection, commit 24d4d34; tests/net/
    test_leaving_net.py counts the segments past the client's window). A
    zero window is always taken, and the second ACK's is more: the server
    then holds the router's window, as on a connection the pool opened, and
    the client's ACKs (translated) take it on from there.
    Not left at zero: a server still writing a response the take-back did
    not see the end of (one whose framing the agent cannot read, README "A
    client that pipelines") would hold the rest until the next client's
    request opened the window, and then send it to that client; with a window
    open it comes to this socket, where the pool may still see it
    (``ForwardPool.clean``: unread bytes)."""
    return _ack_received(plan, 0, tsecr), owed_ack(plan, rcv_wnd, rcv_wup, tsecr)


def rebuild_owing(plan: SocketPlan, ack_of: Callable[[SocketPlan, int, int, int], Owed],
                  tsecr: int) -> tuple[socket.socket, Owed]:
    """PLAN's socket, still in repair mode (the caller leaves it), and what it
    owes its peer: ACK_OF (``received_ack``, ``parked_acks``) from the window
    the kernel gave it, TSECR the peer's newest TSval. Raises OSError with
    the socket closed and nothing on the wire."""
    sock = rebuild_socket(plan, window_probe=None)
    try:
        return sock, ack_of(plan, *receive_window(sock), tsecr)
    except OSError:
        sock.close()  # still in repair mode: silent
        raise


def rebuild_socket(plan: SocketPlan, *, window_probe: bool | None) -> socket.socket:
    """A connected, non-blocking socket in the state PLAN describes.

    ``window_probe``: leave repair mode with one probe (TCP_REPAIR_OFF): an
    ACK one below the peer's rcv_nxt, which makes the peer announce its
    window again (it acknowledges nothing: ``received_ack``). False: leave it
    without a probe; None: stay in repair mode (the caller leaves it). Raises
    OSError; nothing has been sent then (a socket closed in repair mode is
    silent). The steps are ``restore_reference``'s, in one compiled call when
    the accelerator is built (handoff/fastpath.py)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if fastpath.COMPILED:
            fastpath.restore(sock, plan, repair_options(plan), window_probe)
        else:
            restore_reference(sock, plan, window_probe)
        sock.setblocking(False)
    except BaseException:
        sock.close()  # in repair mode: nothing on the wire
        raise
    return sock


def restore_reference(sock: socket.socket, plan: SocketPlan, window_probe: bool | None) -> None:
    """The specification of a rebuild: a fresh, blocking SOCK put in PLAN's
    state (``rebuild_socket`` says what WINDOW_PROBE does)."""
    # Repair mode also forces the bind (SK_FORCE_REUSE; SO_REUSEADDR would
    # undo it): the router's listener holds the client connection's port.
    tcpstate.enter_repair(sock)
    # Before the connect, which derives the first RTO from the floor.
    tcpstate.bound_retransmissions(sock, min_us=plan.rto_min_us, max_ms=plan.rto_max_ms)
    sock.bind(plan.local)
    tcp = socket.IPPROTO_TCP
    sock.setsockopt(tcp, tcpstate.TCP_REPAIR_QUEUE, tcpstate.TCP_SEND_QUEUE)
    sock.setsockopt(tcp, tcpstate.TCP_QUEUE_SEQ, _U32.pack(plan.snd_nxt))
    sock.setsockopt(tcp, tcpstate.TCP_REPAIR_QUEUE, tcpstate.TCP_RECV_QUEUE)
    sock.setsockopt(tcp, tcpstate.TCP_QUEUE_SEQ, _U32.pack(plan.rcv_nxt))
    # The MSS before connect: the connect computes the segment size from
    # it (TCP_REPAIR_OPTIONS later only sets the clamp).
    sock.setsockopt(tcp, socket.TCP_MAXSEG, plan.mss)
    sock.connect(plan.remote)
    sock.setsockopt(tcp, tcpstate.TCP_REPAIR_OPTIONS, repair_options(plan))
    if plan.timestamps:
        sock.setsockopt(tcp, tcpstate.TCP_TIMESTAMP, _U32.pack(plan.ts_clock))
    if plan.received:
        # Still the receive queue: what is "sent" now is queued as received.
        view = memoryview(plan.received)
        while view:
            view = view[sock.send(view):]
    sock.setsockopt(tcp, tcpstate.TCP_REPAIR_QUEUE, tcpstate.TCP_NO_QUEUE)
    rcv_wnd, rcv_wup = receive_window(sock)
    sock.setsockopt(tcp, TCP_REPAIR_WINDOW, _REPAIR_WINDOW.pack(
        plan.snd_wl1, plan.snd_wnd, plan.snd_wnd, rcv_wnd, rcv_wup))
    if window_probe is not None:
        tcpstate.leave_repair(sock, window_probe=window_probe)
