"""The kernel's view of the router's TCP sockets, read exactly.

A handoff rewrites every segment of a live connection so that the target's
socket can continue it (see ``handoff.translate``). That needs numbers only the
kernel knows: the next sequence numbers in both directions (TCP_REPAIR +
TCP_QUEUE_SEQ), the window shifts and options negotiated on the handshake
(TCP_INFO, the saved SYN), and the timestamp clock the socket stamps TSvals
with (TCP_TIMESTAMP). This module reads them, and ends sockets without a FIN or
RST (closing in repair mode) once the connection belongs to the target.

Everything here needs CAP_NET_ADMIN for repair mode; TCP_INFO, the ioctls and
the saved SYN do not. IPv4 only for ``parse_syn``. All sequence and timestamp
values are unsigned 32-bit; arithmetic on them is modulo 2**32.

Kernel behaviour this relies on (checked on Linux 6.18, see the tests):

* ``tcpi_snd_wscale`` is the low nibble of byte 6 of ``struct tcp_info``,
  ``tcpi_rcv_wscale`` the high nibble (BTF: bits_offset 48 and 52).
* TCP_TIMESTAMP returns the clock plus the connection's random ``tsoffset``;
  since Linux 6.7 its lowest bit says the unit: 0 = milliseconds (the bit is
  cleared, so values are even), 1 = microseconds (``tcp_usec_ts`` routes).
* TCP_SAVED_SYN hands the SYN out once: the kernel frees it after a read.
* Leaving repair mode with TCP_REPAIR_OFF sends a window probe (a bare ACK at
  snd_una - 1 that the peer answers with an ACK); TCP_REPAIR_OFF_NO_WP does
  not. Either also resets SO_REUSEADDR on the socket.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import ipaddress
import os
import socket
import struct
import termios
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

from arr.inet_diag import TcpState  # noqa: F401  (re-exported: one definition of the states)
from handoff.packet import OPT_MSS, OPT_SACK_PERM, OPT_TS, OPT_WSCALE, walk_options
from handoff.translate import SocketState

# --- Constants the stdlib lacks (values from linux/tcp.h and linux/sockios.h) ---

TCP_REPAIR = 19
TCP_REPAIR_QUEUE = 20
TCP_QUEUE_SEQ = 21
TCP_REPAIR_OPTIONS = 22
TCP_TIMESTAMP = 24
TCP_SAVE_SYN = 27
TCP_SAVED_SYN = 28
TCP_RTO_MAX_MS = 44  # Linux 6.15+, as TCP_RTO_MIN_US
TCP_RTO_MIN_US = 45
RTO_MIN_RANGE_US = (5_000, 200_000)
"""What TCP_RTO_MIN_US accepts (Linux 6.18): a floor can only be lowered."""
RTO_MAX_LEAST_MS = 1_000
"""The lowest ceiling TCP_RTO_MAX_MS accepts."""

TCP_REPAIR_ON = 1
TCP_REPAIR_OFF = 0
TCP_REPAIR_OFF_NO_WP = -1
"""Leave repair mode without sending a window probe."""

TCP_NO_QUEUE = 0
TCP_RECV_QUEUE = 1
TCP_SEND_QUEUE = 2

TCPI_OPT_TIMESTAMPS = 1
TCPI_OPT_SACK = 2
TCPI_OPT_WSCALE = 4

SIOCINQ = termios.FIONREAD
SIOCOUTQ = termios.TIOCOUTQ
SIOCOUTQNSD = 0x894B

TS_USEC_FLAG = 1
"""Lowest bit of a TCP_TIMESTAMP value: set when the clock counts microseconds."""

SAVED_SYN_BUFFER = 512
"""Room for the largest IPv4 (60) or IPv6 header plus the largest TCP header (60)."""

MOD = 1 << 32


# --- TCP_INFO ---

# struct tcp_info as (field, struct code), in kernel order. Every member is
# naturally aligned, so native ("@") packing reproduces the C layout. Byte 6
# holds the two 4-bit wscale fields, byte 7 two flag bits: split after unpacking.
_TCP_INFO_LAYOUT: tuple[tuple[str, str], ...] = (
    ("state", "B"), ("ca_state", "B"), ("retransmits", "B"), ("probes", "B"),
    ("backoff", "B"), ("options", "B"), ("_wscale", "B"), ("_flags", "B"),
    ("rto", "I"), ("ato", "I"), ("snd_mss", "I"), ("rcv_mss", "I"),
    ("unacked", "I"), ("sacked", "I"), ("lost", "I"), ("retrans", "I"), ("fackets", "I"),
    ("last_data_sent", "I"), ("last_ack_sent", "I"), ("last_data_recv", "I"),
    ("last_ack_recv", "I"),
    ("pmtu", "I"), ("rcv_ssthresh", "I"), ("rtt", "I"), ("rttvar", "I"),
    ("snd_ssthresh", "I"), ("snd_cwnd", "I"), ("advmss", "I"), ("reordering", "I"),
    ("rcv_rtt", "I"), ("rcv_space", "I"), ("total_retrans", "I"),
    ("pacing_rate", "Q"), ("max_pacing_rate", "Q"), ("bytes_acked", "Q"),
    ("bytes_received", "Q"),
    ("segs_out", "I"), ("segs_in", "I"), ("notsent_bytes", "I"), ("min_rtt", "I"),
    ("data_segs_in", "I"), ("data_segs_out", "I"),
    ("delivery_rate", "Q"), ("busy_time", "Q"), ("rwnd_limited", "Q"), ("sndbuf_limited", "Q"),
    ("delivered", "I"), ("delivered_ce", "I"),
    ("bytes_sent", "Q"), ("bytes_retrans", "Q"),
    ("dsack_dups", "I"), ("reord_seen", "I"), ("rcv_ooopack", "I"), ("snd_wnd", "I"),
)
_TCP_INFO = struct.Struct("@" + "".join(code for _, code in _TCP_INFO_LAYOUT))
TCP_INFO_MIN_LEN = _TCP_INFO.size
"""Bytes of struct tcp_info parsed (through tcpi_snd_wnd, Linux 5.4+); newer
kernels append fields, which are ignored."""


def tcp_info_offsets() -> dict[str, int]:
    """{field: byte offset} of the parsed layout, for checking against BTF."""
    offsets: dict[str, int] = {}
    prefix = "@"
    for name, code in _TCP_INFO_LAYOUT:
        # The end of prefix+code minus the member's size is where native
        # alignment puts the member.
        offsets[name] = struct.calcsize(prefix + code) - struct.calcsize("@" + code)
        prefix += code
    return offsets


@dataclass(frozen=True, slots=True)
class TcpInfo:
    """``struct tcp_info`` (linux/tcp.h) through ``tcpi_snd_wnd``, ``tcpi_``
    prefix dropped. Times in microseconds, except ``last_*`` (milliseconds)."""

    state: int
    ca_state: int
    retransmits: int
    probes: int
    backoff: int
    options: int
    snd_wscale: int
    """Shift the peer applies to the windows it advertises (what it sent in its WS option)."""
    rcv_wscale: int
    """Shift this socket applies to the windows it advertises (its own WS option)."""
    delivery_rate_app_limited: bool
    fastopen_client_fail: int
    rto: int
    ato: int
    snd_mss: int
    rcv_mss: int
    unacked: int
    sacked: int
    lost: int
    retrans: int
    fackets: int
    last_data_sent: int
    last_ack_sent: int
    last_data_recv: int
    last_ack_recv: int
    pmtu: int
    rcv_ssthresh: int
    rtt: int
    rttvar: int
    snd_ssthresh: int
    snd_cwnd: int
    advmss: int
    reordering: int
    rcv_rtt: int
    rcv_space: int
    total_retrans: int
    pacing_rate: int
    max_pacing_rate: int
    bytes_acked: int
    bytes_received: int
    segs_out: int
    segs_in: int
    notsent_bytes: int
    min_rtt: int
    data_segs_in: int
    data_segs_out: int
    delivery_rate: int
    busy_time: int
    rwnd_limited: int
    sndbuf_limited: int
    delivered: int
    delivered_ce: int
    bytes_sent: int
    bytes_retrans: int
    dsack_dups: int
    reord_seen: int
    rcv_ooopack: int
    snd_wnd: int

    @property
    def tcp_state(self) -> TcpState:
        return TcpState(self.state)

    @property
    def timestamps(self) -> bool:
        """RFC 7323 timestamps were negotiated."""
        return bool(self.options & TCPI_OPT_TIMESTAMPS)

    @property
    def sack(self) -> bool:
        """SACK was negotiated."""
        return bool(self.options & TCPI_OPT_SACK)

    @property
    def wscale_ok(self) -> bool:
        """Window scaling was negotiated (both SYNs carried WS)."""
        return bool(self.options & TCPI_OPT_WSCALE)


def parse_tcp_info(data: bytes) -> TcpInfo:
    """Decode the bytes getsockopt(TCP_INFO) returned."""
    if len(data) < TCP_INFO_MIN_LEN:
        raise ValueError(f"tcp_info is {len(data)} bytes, need {TCP_INFO_MIN_LEN}")
    raw = dict(zip((name for name, _ in _TCP_INFO_LAYOUT), _TCP_INFO.unpack_from(data)))
    wscale, flags = raw.pop("_wscale"), raw.pop("_flags")
    # Little-endian GCC bitfields fill from the low bit: snd first, so low nibble.
    raw.update(snd_wscale=wscale & 0x0F, rcv_wscale=wscale >> 4,
               delivery_rate_app_limited=bool(flags & 1), fastopen_client_fail=(flags >> 1) & 3)
    return TcpInfo(**raw)


def tcp_info(sock: socket.socket) -> TcpInfo:
    """TCP_INFO of a connected (or listening) TCP socket."""
    return parse_tcp_info(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 512))


_RCV_WND = struct.Struct("@I")  # tcpi_rcv_wnd (Linux 6.2+), right after tcpi_snd_wnd


def announced_window(sock: socket.socket) -> int | None:
    """The receive window SOCK announces now, in bytes (tcpi_rcv_wnd); None
    on a kernel before 6.2, which does not report it."""
    data = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_MIN_LEN + _RCV_WND.size)
    if len(data) < TCP_INFO_MIN_LEN + _RCV_WND.size:
        return None
    return _RCV_WND.unpack_from(data, TCP_INFO_MIN_LEN)[0]


class TcpBasics(NamedTuple):
    """The few TCP_INFO fields the handoff path needs, read without building a
    full ``TcpInfo`` (whose 55 fields cost ~40 us to construct in Python)."""

    state: int
    timestamps: bool
    sack: bool
    snd_wscale: int
    rcv_wscale: int
    snd_mss: int


# state, ca_state, retransmits, probes, backoff, options, wscale nibbles, flags,
# rto, ato, snd_mss: the leading fields of struct tcp_info (checked against
# the full layout by the tests).
_TCP_BASICS = struct.Struct("@BBBBBBBBIII")


def tcp_basics(sock: socket.socket) -> TcpBasics:
    data = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_BASICS.size)
    state, _, _, _, _, options, wscale, _, _, _, snd_mss = _TCP_BASICS.unpack_from(data)
    return TcpBasics(state, bool(options & TCPI_OPT_TIMESTAMPS), bool(options & TCPI_OPT_SACK),
                     wscale & 0x0F, wscale >> 4, snd_mss)


# --- Queues ---

def rto_us(sock: socket.socket) -> int:
    """The socket's retransmission timeout now (tcpi_rto, microseconds)."""
    return struct.unpack_from("=I", sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 12), 8)[0]


def bound_retransmissions(sock: socket.socket, *, min_us: int = 0, max_ms: int = 0) -> bool:
    """Floor (MIN_US) and ceiling (MAX_MS) of SOCK's retransmission timeout;
    0 leaves one as the kernel has it. The floor also holds for the RTO a
    connect derives from the route's cached RTT (``ip tcp_metrics``), so set
    it before connecting. The ceiling holds whenever the timer is armed: a
    socket with no RTT sample of its own (one rebuilt in repair mode, one
    whose SYN was resent) starts at RFC 6298's 3 s, which it cuts.

    False on a kernel without the options (before 6.15): nothing changed,
    the connection works as before, its losses cost Linux's 200 ms floor."""
    try:
        if min_us:
            sock.setsockopt(socket.IPPROTO_TCP, TCP_RTO_MIN_US, min_us)
        if max_ms:
            sock.setsockopt(socket.IPPROTO_TCP, TCP_RTO_MAX_MS, max_ms)
    except OSError as exc:
        if exc.errno in (errno.ENOPROTOOPT, errno.EOPNOTSUPP):
            return False
        raise
    return True


def rto_min_problem(seconds: float) -> str | None:
    """Why SECONDS cannot be a configured RTO floor (None: it can; 0 means
    the kernel's own)."""
    low, high = RTO_MIN_RANGE_US
    if seconds == 0 or low <= round(seconds * 1_000_000) <= high:
        return None
    return f"must be 0 (the kernel's) or from {low / 1e6:g} to {high / 1e6:g} seconds, got {seconds!r}"


def _ioctl_int(sock: socket.socket, request: int) -> int:
    buf = bytearray(4)
    fcntl.ioctl(sock.fileno(), request, buf)
    return struct.unpack("=i", buf)[0]


def queued(sock: socket.socket) -> tuple[int, int, int]:
    """(inq, outq, outq_not_sent) in bytes.

    inq: received, not yet read by the application (an unread urgent byte is
    not counted). outq: written and not yet acknowledged by the peer (sent or
    not). outq_not_sent: the part of outq never sent.
    """
    return (_ioctl_int(sock, SIOCINQ), _ioctl_int(sock, SIOCOUTQ),
            _ioctl_int(sock, SIOCOUTQNSD))


# --- Repair mode and sequence numbers ---

def _get_u32(sock: socket.socket, option: int) -> int:
    # getsockopt without a length returns a signed C int: sequence numbers and
    # timestamps above 2**31 would come back negative.
    return struct.unpack("=I", sock.getsockopt(socket.IPPROTO_TCP, option, 4))[0]


def in_repair(sock: socket.socket) -> bool:
    """Whether the socket is in repair mode now."""
    return bool(sock.getsockopt(socket.IPPROTO_TCP, TCP_REPAIR))


def enter_repair(sock: socket.socket) -> None:
    """Put the socket in repair mode: from now on a close sends nothing.

    Needs CAP_NET_ADMIN; refused (EPERM) on a listening socket.
    """
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, TCP_REPAIR_ON)


def leave_repair(sock: socket.socket, *, window_probe: bool = True) -> None:
    """Leave repair mode. With ``window_probe`` (TCP_REPAIR_OFF) an established
    socket sends one out-of-window ACK so the peer re-announces its window, which
    is how CRIU restarts a restored connection; it is harmless on a live one
    (the peer answers with a duplicate ACK). TCP_REPAIR_OFF_NO_WP sends nothing."""
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR,
                    TCP_REPAIR_OFF if window_probe else TCP_REPAIR_OFF_NO_WP)


def _queue_seq(sock: socket.socket, queue: int) -> int:
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, queue)
    return _get_u32(sock, TCP_QUEUE_SEQ)


def read_sequence(sock: socket.socket, *, window_probe: bool = True) -> tuple[int, int]:
    """(snd_nxt, rcv_nxt) of an established socket, via repair mode.

    The kernel exposes ``write_seq`` (after the last byte the application
    wrote) and ``rcv_nxt`` (after the last byte received). Preconditions for
    these to mean what the handoff needs:

    * send queue empty (outq == 0): then write_seq == snd_nxt == snd_una;
    * receive queue empty (inq == 0): then rcv_nxt is also what the
      application has read.

    Repair mode is left again unless the socket was already in it (a caller
    that entered it on purpose keeps it). ``window_probe``: see ``leave_repair``.
    """
    was_in_repair = in_repair(sock)
    if not was_in_repair:
        enter_repair(sock)
    try:
        snd_nxt = _queue_seq(sock, TCP_SEND_QUEUE)
        rcv_nxt = _queue_seq(sock, TCP_RECV_QUEUE)
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)
    finally:
        if not was_in_repair:
            leave_repair(sock, window_probe=window_probe)
    return snd_nxt, rcv_nxt


# --- Timestamps ---

def ts_clock(sock: socket.socket) -> int:
    """The value this socket would put in a TSval now (clock + its tsoffset).

    Linux randomizes tsoffset per address pair, so the value only compares
    with TSvals of the same connection. On 6.7+ the lowest bit is the unit flag
    (``TS_USEC_FLAG``); in the usual millisecond mode it is cleared, so the
    value may be one tick behind the real clock.
    """
    return _get_u32(sock, TCP_TIMESTAMP)


def ts_usec(value: int) -> bool:
    """Whether a TCP_TIMESTAMP value counts microseconds (else milliseconds)."""
    return bool(value & TS_USEC_FLAG)


# --- Saved SYN ---

def enable_saved_syn(listener: socket.socket) -> None:
    """Make the kernel keep each incoming SYN's IP+TCP headers (TCP_SAVE_SYN=1;
    2 would include the link-layer header). Set it before connections arrive."""
    listener.setsockopt(socket.IPPROTO_TCP, TCP_SAVE_SYN, 1)


def saved_syn(sock: socket.socket) -> bytes | None:
    """The SYN's IP+TCP headers of an accepted socket, or None.

    None when the listener did not save SYNs or the SYN was already read: the
    kernel frees it on the first successful read, so read it once and keep it.
    """
    data = sock.getsockopt(socket.IPPROTO_TCP, TCP_SAVED_SYN, SAVED_SYN_BUFFER)
    return data or None


@dataclass(frozen=True, slots=True)
class TcpOptions:
    """The handshake options of a TCP header (None / False when absent)."""

    mss: int | None = None
    wscale: int | None = None
    sack_permitted: bool = False
    tsval: int | None = None
    tsecr: int | None = None


_OPT_LEN = {OPT_MSS: 4, OPT_WSCALE: 3, OPT_SACK_PERM: 2, OPT_TS: 10}


def parse_tcp_options(data: bytes) -> TcpOptions:
    """Parse the options area of a TCP header. Unknown kinds are skipped by
    their length; a length below 2, past the end, or wrong for a known kind
    raises ValueError (``packet.Malformed`` is one)."""
    found: dict[str, object] = {}
    for option in walk_options(data):
        if option.kind in _OPT_LEN and option.length != _OPT_LEN[option.kind]:
            raise ValueError(f"TCP option {option.kind} has length {option.length}, "
                             f"expected {_OPT_LEN[option.kind]}")
        body = data[option.offset + 2:option.offset + option.length]
        if option.kind == OPT_MSS:
            found["mss"] = struct.unpack("!H", body)[0]
        elif option.kind == OPT_WSCALE:
            found["wscale"] = body[0]
        elif option.kind == OPT_SACK_PERM:
            found["sack_permitted"] = True
        elif option.kind == OPT_TS:
            found["tsval"], found["tsecr"] = struct.unpack("!II", body)
    return TcpOptions(**found)  # type: ignore[arg-type]


@dataclass(frozen=True)
class SynInfo:
    """What a client's SYN said (addresses as strings, options as parsed)."""

    saddr: str
    daddr: str
    sport: int
    dport: int
    seq: int
    mss: int | None
    wscale: int | None
    sack_permitted: bool
    tsval: int | None
    tsecr: int | None


_TCP_FLAG_SYN = 0x02


def parse_syn(headers: bytes) -> SynInfo:
    """Parse a saved SYN (IPv4 header, options included, then the TCP header).

    Raises ValueError on anything that is not a well-formed IPv4/TCP SYN.
    """
    if len(headers) < 20:
        raise ValueError("shorter than an IPv4 header")
    version, ihl = headers[0] >> 4, (headers[0] & 0x0F) * 4
    if version != 4:
        raise ValueError(f"IP version {version}, only IPv4 is parsed")
    if ihl < 20 or ihl + 20 > len(headers):
        raise ValueError(f"bad IHL {ihl} for {len(headers)} bytes")
    if headers[9] != socket.IPPROTO_TCP:
        raise ValueError(f"IP protocol {headers[9]} is not TCP")
    tcp = headers[ihl:]
    sport, dport, seq, _ack, offset_byte, flags = struct.unpack_from("!HHIIBB", tcp)
    data_offset = (offset_byte >> 4) * 4
    if data_offset < 20 or data_offset > len(tcp):
        raise ValueError(f"bad TCP data offset {data_offset} for {len(tcp)} bytes")
    if not flags & _TCP_FLAG_SYN:
        raise ValueError("not a SYN")
    opts = parse_tcp_options(tcp[20:data_offset])
    return SynInfo(
        saddr=str(ipaddress.IPv4Address(headers[12:16])),
        daddr=str(ipaddress.IPv4Address(headers[16:20])),
        sport=sport, dport=dport, seq=seq, mss=opts.mss, wscale=opts.wscale,
        sack_permitted=opts.sack_permitted, tsval=opts.tsval, tsecr=opts.tsecr)


# --- Ending a connection without telling the peer ---

def close_silently(sock: socket.socket) -> None:
    """Close so that the kernel sends neither FIN nor RST: in repair mode
    tcp_close() just drops the socket. The socket is closed even if repair
    mode was refused, and the error raised then (a FIN may have gone out).

    Other descriptors of the same socket (dups, a transport's fd) keep it
    alive; the silent close happens when the last one goes, as repair mode is
    a property of the socket, not of the descriptor."""
    try:
        enter_repair(sock)
    finally:
        sock.close()


@contextlib.contextmanager
def borrowed(fd: int) -> Iterator[socket.socket]:
    """A socket object on someone else's fd (an asyncio/uvloop transport's),
    detached rather than closed at exit so the owner's fd stays valid."""
    sock = socket.socket(fileno=fd)
    try:
        yield sock
    finally:
        sock.detach()


def close_fd_silently(fd: int) -> None:
    """``close_silently`` for a bare fd. Closing a transport's fd under it
    confuses its event loop: prefer ``enter_repair`` on ``borrowed(fd)`` and
    then the transport's own ``abort()``."""
    try:
        with borrowed(fd) as sock:
            enter_repair(sock)
    finally:
        os.close(fd)


# --- Urgent data ---

_libc = ctypes.CDLL(None, use_errno=True)
_libc.recv.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_libc.recv.restype = ctypes.c_ssize_t


def urgent_pending(sock: socket.socket) -> bool:
    """Whether the peer sent urgent data the application has not read.

    A non-blocking MSG_OOB peek: 1 byte = the urgent byte is here, EAGAIN =
    announced but not arrived, EINVAL = none (or SO_OOBINLINE, where the byte
    is ordinary data and shows in inq). Through libc rather than sock.recv
    because a socket with a timeout would poll() for input first and wait.
    """
    buf = ctypes.create_string_buffer(1)
    flags = socket.MSG_OOB | socket.MSG_PEEK | socket.MSG_DONTWAIT
    if _libc.recv(sock.fileno(), buf, 1, flags) > 0:
        return True
    err = ctypes.get_errno()
    return err in (errno.EAGAIN, errno.EWOULDBLOCK)


# --- Snapshot and eligibility ---

def ineligibility(state: int, inq: int, outq: int, urgent: bool) -> str | None:
    """Why a connection in this state cannot be handed off, or None.

    half-closed: the peer's FIN is consumed by this socket; the target would
    never see it. not-established: no sequence space to hand over.
    urgent-data / unread-data: bytes the kernel holds that the target would
    not receive. unacked-data: bytes the target could not retransmit.
    """
    if state == TcpState.CLOSE_WAIT:
        return "half-closed"
    if state != TcpState.ESTABLISHED:
        return "not-established"
    if urgent:
        return "urgent-data"
    if inq:
        return "unread-data"
    if outq:
        return "unacked-data"
    return None


def ineligible(sock: socket.socket) -> str | None:
    """``ineligibility`` of a socket, without repair mode (cheap enough to poll)."""
    inq, outq, _ = queued(sock)
    return ineligibility(tcp_basics(sock).state, inq, outq, urgent_pending(sock))


@dataclass(frozen=True, slots=True)
class ConnectionSnapshot:
    """One socket read for the handoff: what the translation needs
    (``translate.SocketState``) and what eligibility needs, at one moment."""

    tcp: SocketState
    state: int
    inq: int
    outq: int
    outq_not_sent: int
    urgent: bool
    syn_tsval: int | None = None
    """The peer's TSval in its SYN, when the caller had the saved SYN."""

    def ineligible(self) -> str | None:
        """None if the connection can be handed off, else a short reason."""
        return ineligibility(self.state, self.inq, self.outq, self.urgent)


def snapshot(sock: socket.socket, *, saved_syn_tsval: int | None = None,
             window_probe: bool = True) -> ConnectionSnapshot:
    """Read a socket's state for the handoff.

    The reads are separate syscalls, not one atomic view: the caller keeps the
    connection quiet meanwhile (nothing written, the peer's packets held), and
    checks ``ineligible()``, since sequence numbers are only meaningful with
    both queues empty (see ``read_sequence``). ``tcp.mss`` is tcpi_snd_mss.
    """
    info = tcp_basics(sock)
    inq, outq, not_sent = queued(sock)
    snd_nxt, rcv_nxt = read_sequence(sock, window_probe=window_probe)
    clock = ts_clock(sock)
    tcp = SocketState(
        local=tuple(sock.getsockname()[:2]), remote=tuple(sock.getpeername()[:2]),  # type: ignore[arg-type]
        snd_nxt=snd_nxt, rcv_nxt=rcv_nxt, snd_wscale=info.snd_wscale, rcv_wscale=info.rcv_wscale,
        ts_clock=clock, timestamps=info.timestamps, sack=info.sack, mss=info.snd_mss,
        ts_usec=ts_usec(clock))
    return ConnectionSnapshot(tcp=tcp, state=info.state, inq=inq, outq=outq, outq_not_sent=not_sent,
                              urgent=urgent_pending(sock), syn_tsval=saved_syn_tsval)

