"""IPv4 TCP sock_diag messages (inet_diag): build requests, parse replies.

A pure codec in the h11 style: bytes in, bytes or values out, no sockets and
no I/O. :mod:`arr.netlink` does the talking (``tcp_sockets``, ``tcp_socket``,
``destroy_tcp_socket``).

Wire layouts (include/uapi/linux/netlink.h, sock_diag.h, inet_diag.h)::

    struct nlmsghdr          u32 len, u16 type, u16 flags, u32 seq, u32 pid  (16)
    struct inet_diag_sockid  be16 sport, be16 dport, be32 src[4], be32 dst[4],
                             u32 if, u32 cookie[2]                            (48)
    struct inet_diag_req_v2  u8 family, u8 protocol, u8 ext, u8 pad,
                             u32 states, sockid                               (56)
    struct inet_diag_msg     u8 family, u8 state, u8 timer, u8 retrans, sockid,
                             u32 expires, rqueue, wqueue, uid, inode          (72)

Netlink headers and plain u32s are in host byte order; ports and addresses in
the sockid are in network order (an IPv4 address is the first of the four
address words). The 64-bit socket cookie is two host-order u32 words, low
word first.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Iterable

# netlink protocol and message types
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
SOCK_DESTROY = 21
NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3

# nlmsghdr flags
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH

# "no cookie": an exact lookup matches whatever socket has the 4-tuple
INET_DIAG_NOCOOKIE = 0xFFFFFFFF
NO_COOKIE = (INET_DIAG_NOCOOKIE << 32) | INET_DIAG_NOCOOKIE

# request attribute and the two bytecode operations the port filter uses
INET_DIAG_REQ_BYTECODE = 1
INET_DIAG_BC_S_GE = 2
INET_DIAG_BC_S_LE = 3
# reply attribute: struct tcp_info (asked for with the request's ext bit)
INET_DIAG_INFO = 2
TCP_INFO_NOTSENT_AT = 144
"""Offset of tcpi_notsent_bytes in struct tcp_info (Linux 4.6+; the layout
is handoff/tcpstate.py's, tests/unit/test_inet_diag.py checks the offset)."""


class TcpState(IntEnum):
    """Linux TCP states (include/net/tcp_states.h)."""

    ESTABLISHED = 1
    SYN_SENT = 2
    SYN_RECV = 3
    FIN_WAIT1 = 4
    FIN_WAIT2 = 5
    TIME_WAIT = 6
    CLOSE = 7
    CLOSE_WAIT = 8
    LAST_ACK = 9
    LISTEN = 10
    CLOSING = 11
    NEW_SYN_RECV = 12  # request sockets; the kernel reports them as SYN_RECV


_STATE_OF = {s.value: s for s in TcpState}  # faster than TcpState(n) in the parse loop
ALL_STATES = sum(1 << s for s in TcpState)
CONNECTION_STATES = ALL_STATES & ~(1 << TcpState.LISTEN)  # default of a dump


def state_mask(states: Iterable[TcpState]) -> int:
    """The idiag_states bitmask of STATES (bit N = state N)."""
    mask = 0
    for s in states:
        mask |= 1 << TcpState(s)
    return mask


Address = tuple[str, int]  # ("10.0.0.1", 8080)


@dataclass(frozen=True, slots=True)
class TcpSocket:
    """One TCP socket as the kernel reports it (struct inet_diag_msg).

    ``rqueue``/``wqueue``: for a connection, bytes received but not read and
    bytes sent but not acknowledged; for a listener, the accept queue length
    and its limit. TIME_WAIT and request sockets report 0 for both, and 0 for
    ``inode`` and ``uid`` (no file behind them; orphans have inode 0 too).
    ``cookie`` identifies the socket for its lifetime (a reused 4-tuple gets
    a new one).
    """

    local: Address
    remote: Address
    state: TcpState
    inode: int
    uid: int
    rqueue: int
    wqueue: int
    cookie: int
    notsent: int | None = None
    """Bytes written but not yet sent (tcpi_notsent_bytes): only from a
    request that asked for tcp_info (``lookup_request(info=True)``)."""


_HEADER = struct.Struct("=IHHII")  # nlmsghdr
_REQUEST = struct.Struct("=BBBBI")  # inet_diag_req_v2 up to the sockid
_PORTS = struct.Struct("!HH")  # sockid sport, dport
_SOCKID_REST = struct.Struct("=4s12x4s12xIII")  # src, dst (IPv4: first word), if, cookie[2]
_SOCKID_SIZE = _PORTS.size + _SOCKID_REST.size
# inet_diag_msg: family, state; timer, retrans, the sockid ports skipped (read by _PORTS);
# src, dst, if (skipped), cookie[2], expires (skipped), rqueue, wqueue, uid, inode
_MSG = struct.Struct("=BB6x4s12x4s12x4xII4xIIII")
_MSG_PORTS_AT = 4
_ERRNO = struct.Struct("=i")  # nlmsgerr.error / the NLMSG_DONE payload
_NLA = struct.Struct("=HH")  # nlattr len, type
_BC_OP = struct.Struct("=BBH")  # inet_diag_bc_op code, yes, no

assert _SOCKID_SIZE == 48 and _REQUEST.size + _SOCKID_SIZE == 56 and _MSG.size == 72


def _align4(n: int) -> int:
    return (n + 3) & ~3


def _address_bytes(address: Address) -> tuple[bytes, int]:
    host, port = address
    if not isinstance(port, int) or not 0 <= port <= 0xFFFF:
        raise ValueError(f"bad port {port!r} in {address!r}")
    try:
        return socket.inet_pton(socket.AF_INET, host), port
    except (OSError, TypeError):
        raise ValueError(f"not an IPv4 address: {host!r}") from None


def encode_sockid(local: Address, remote: Address, interface: int = 0, cookie: int | None = None) -> bytes:
    """struct inet_diag_sockid for LOCAL -> REMOTE (cookie None: INET_DIAG_NOCOOKIE)."""
    src, sport = _address_bytes(local)
    dst, dport = _address_bytes(remote)
    if cookie is None:
        cookie = NO_COOKIE
    if not 0 <= cookie <= NO_COOKIE:
        raise ValueError(f"cookie out of range: {cookie!r}")
    return _PORTS.pack(sport, dport) + _SOCKID_REST.pack(
        src, dst, interface, cookie & 0xFFFFFFFF, cookie >> 32
    )


def decode_sockid(data: bytes, offset: int = 0) -> tuple[Address, Address, int, int]:
    """(local, remote, interface, cookie) of the sockid at OFFSET in DATA."""
    if len(data) - offset < _SOCKID_SIZE:
        raise ValueError(f"truncated inet_diag_sockid: {len(data) - offset} of {_SOCKID_SIZE} bytes")
    sport, dport = _PORTS.unpack_from(data, offset)
    src, dst, interface, low, high = _SOCKID_REST.unpack_from(data, offset + _PORTS.size)
    return (
        (socket.inet_ntoa(src), sport),
        (socket.inet_ntoa(dst), dport),
        interface,
        low | (high << 32),
    )


def _message(msg_type: int, flags: int, seq: int, states: int, sockid: bytes, attributes: bytes = b"",
             ext: int = 0) -> bytes:
    request = _REQUEST.pack(socket.AF_INET, socket.IPPROTO_TCP, ext, 0, states) + sockid + attributes
    return _HEADER.pack(_HEADER.size + len(request), msg_type, flags, seq, 0) + request


def source_port_bytecode(port: int) -> bytes:
    """inet_diag bytecode accepting sockets whose local port is PORT.

    ``sport >= PORT and sport <= PORT``: two port comparisons, each a 4-byte
    op followed by a 4-byte op whose ``no`` field carries the port (host
    order). ``yes`` steps to the next op; reaching exactly the end accepts.
    ``no`` jumps 4 bytes past the end, which rejects. (INET_DIAG_BC_S_EQ would
    be one op, but GE+LE is understood by every kernel with inet_diag.)
    """
    if not 0 < port <= 0xFFFF:
        raise ValueError(f"bad port {port!r}")
    comparison = 2 * _BC_OP.size  # the op and its port operand
    program = 2 * comparison
    return b"".join((
        _BC_OP.pack(INET_DIAG_BC_S_GE, comparison, program + 4),
        _BC_OP.pack(0, 0, port),
        _BC_OP.pack(INET_DIAG_BC_S_LE, comparison, program - comparison + 4),
        _BC_OP.pack(0, 0, port),
    ))


def _attribute(attr_type: int, payload: bytes) -> bytes:
    size = _NLA.size + len(payload)
    return _NLA.pack(size, attr_type) + payload + b"\0" * (_align4(size) - size)


def dump_request(states: int, local_port: int | None = None, seq: int = 1) -> bytes:
    """SOCK_DIAG_BY_FAMILY dump of IPv4 TCP sockets in STATES (a bitmask, see
    :func:`state_mask`), only those with local port LOCAL_PORT if given.

    The kernel adds NEW_SYN_RECV to a mask that has SYN_RECV.
    """
    if not states or states & ~ALL_STATES:
        raise ValueError(f"bad state mask {states:#x}")
    attributes = b""
    if local_port is not None:
        attributes = _attribute(INET_DIAG_REQ_BYTECODE, source_port_bytecode(local_port))
    sockid = bytes(_SOCKID_SIZE)  # a dump filters on nonzero ports of the id: leave it empty
    return _message(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, states, sockid, attributes)


def lookup_request(local: Address, remote: Address, seq: int = 1, info: bool = False) -> bytes:
    """Exact lookup of the socket LOCAL -> REMOTE.

    The kernel answers with one message: the socket, or an NLMSG_ERROR with
    the errno (ENOENT when there is no such socket). No ACK is asked for: it
    would be a second datagram to read after every socket found. Beware: the kernel falls
    back to a *listener* on LOCAL when no connection has the 4-tuple (it uses
    the same lookup as an incoming packet); check the reply's addresses.
    The id names no interface, so a socket bound to a device (SO_BINDTODEVICE)
    is not found; a dump lists it.
    INFO: the reply carries tcp_info (``TcpSocket.notsent``; parse it with
    ``parse_messages(..., info=True)``).
    """
    return _message(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, seq, ALL_STATES, encode_sockid(local, remote),
                    ext=1 << (INET_DIAG_INFO - 1) if info else 0)


def destroy_request(local: Address, remote: Address, cookie: int | None = None, seq: int = 1) -> bytes:
    """SOCK_DESTROY of the socket LOCAL -> REMOTE; with COOKIE, only if it is
    still that very socket (else ENOENT). Same listener fallback as
    :func:`lookup_request`, which is why a cookie should be given."""
    sockid = encode_sockid(local, remote, cookie=cookie)
    return _message(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, seq, ALL_STATES, sockid)


def _notsent(data: bytes | bytearray | memoryview, at: int, end: int) -> int | None:
    """tcpi_notsent_bytes from the INET_DIAG_INFO attribute among AT..END."""
    while end - at >= _NLA.size:
        length, kind = _NLA.unpack_from(data, at)
        if length < _NLA.size or length > end - at:
            raise ValueError(f"bad inet_diag attribute length {length}")
        if kind & 0x3FFF == INET_DIAG_INFO and length - _NLA.size >= TCP_INFO_NOTSENT_AT + 4:
            return struct.unpack_from("=I", data, at + _NLA.size + TCP_INFO_NOTSENT_AT)[0]
        at += _align4(length)
    return None


def parse_messages(data: bytes | bytearray | memoryview, info: bool = False
                   ) -> tuple[list[TcpSocket], bool, int | None]:
    """Walk the netlink messages in DATA (one or more whole messages).

    Returns (sockets, done, errno): the inet_diag_msg records as TcpSocket;
    done: an NLMSG_DONE ended a dump; errno: None if no NLMSG_ERROR was seen,
    0 for an ACK, else the (positive) errno the kernel reported. A dump that
    failed midway ends with an NLMSG_DONE carrying the error: done and errno.
    Raises ValueError on a truncated or malformed buffer.
    """
    sockets: list[TcpSocket] = []
    done = False
    errno: int | None = None
    end = len(data)
    offset = 0
    # hot loop of a dump (tens of thousands of sockets): locals, no helper calls
    unpack_header, unpack_msg, unpack_ports = _HEADER.unpack_from, _MSG.unpack_from, _PORTS.unpack_from
    ntoa, state_of, append = socket.inet_ntoa, _STATE_OF, sockets.append
    names: dict[bytes, str] = {}  # a table has few distinct addresses: share their strings
    while offset < end:
        if end - offset < _HEADER.size:
            raise ValueError(f"truncated netlink header at byte {offset}: {end - offset} bytes left")
        length, msg_type, _flags, _seq, _pid = unpack_header(data, offset)
        if length < _HEADER.size or length > end - offset:
            raise ValueError(f"bad netlink message length {length} at byte {offset} ({end - offset} bytes left)")
        payload = offset + _HEADER.size
        payload_size = length - _HEADER.size
        if msg_type == SOCK_DIAG_BY_FAMILY:
            if payload_size < _MSG.size:
                raise ValueError(f"truncated inet_diag_msg at byte {offset}: {payload_size} of {_MSG.size} bytes")
            family, state, src, dst, low, high, rqueue, wqueue, uid, inode = unpack_msg(data, payload)
            if family != socket.AF_INET:
                raise ValueError(f"inet_diag_msg of family {family} at byte {offset}, expected AF_INET")
            if state not in state_of:
                raise ValueError(f"unknown TCP state {state} at byte {offset}")
            sport, dport = unpack_ports(data, payload + _MSG_PORTS_AT)
            src_name = names.get(src) or names.setdefault(src, ntoa(src))
            dst_name = names.get(dst) or names.setdefault(dst, ntoa(dst))
            notsent = _notsent(data, payload + _MSG.size, payload + payload_size) if info else None
            append(TcpSocket((src_name, sport), (dst_name, dport), state_of[state],
                             inode, uid, rqueue, wqueue, low | (high << 32), notsent))
        elif msg_type == NLMSG_ERROR or msg_type == NLMSG_DONE:
            if payload_size < _ERRNO.size:
                if msg_type == NLMSG_ERROR:
                    raise ValueError(f"truncated NLMSG_ERROR at byte {offset}")
                error = 0  # a DONE without its error word: nothing went wrong
            else:
                (error,) = _ERRNO.unpack_from(data, payload)
            if msg_type == NLMSG_DONE:
                done = True
                if error < 0:
                    errno = -error
            else:
                errno = -error
        elif msg_type != NLMSG_NOOP:
            raise ValueError(f"unexpected netlink message type {msg_type} at byte {offset}")
        offset += (length + 3) & ~3  # NLMSG_ALIGN; the last message may lack its padding
    return sockets, done, errno
