"""The control channel's protocol, sans-IO: framing, the handshake, authentication, codecs.

Nothing here does I/O. ``ControlConnection`` is fed the bytes that arrived
(``receive_data``) and hands back messages; it turns messages into the bytes
to write (``send``). The asyncio shell in ``channel.py`` moves the bytes.

Wire format of one frame (big-endian)::

    u32 length        bytes after this field (header rest + payload + MAC)
    u8  version       FRAME_VERSION (2)
    u8  type          MessageType
    u16 flags         0
    u64 counter       0 for the handshake's frames; 1, 2, 3... afterwards, per direction
    ... payload
    32  HMAC-SHA256   over every preceding byte of the frame, length included

A whole frame (length field included) is at most ``MAX_FRAME`` bytes; before
the handshake is complete, at most ``MAX_HANDSHAKE_FRAME``.

The handshake (since protocol 2) proves to each side that the other holds the key
*for this session*, so that a recorded HELLO, or a whole recorded handshake,
replayed later establishes nothing::

    client -> server  HELLO      version, client node id, client nonce Nc (fresh)
    server -> client  CHALLENGE  version, server node id, server nonce Ns (fresh), proof_s
    client -> server  PROOF      proof_c

    hello_key  = HMAC(psk, "arr control v2 handshake")        MACs the three frames above
    transcript = SHA-256("arr control v2" || HELLO payload || CHALLENGE payload without proof_s)
    key_c2s    = HMAC(psk, "arr control v2 client to server" || transcript)
    key_s2c    = HMAC(psk, "arr control v2 server to client" || transcript)
    proof_s    = HMAC(key_s2c, "server proof");  proof_c = HMAC(key_c2s, "client proof")

The transcript holds both nonces and both node ids, so each proof answers the
other side's fresh nonce: a replayed HELLO cannot answer a new CHALLENGE (its
sender has no key) and a replayed CHALLENGE cannot answer a new HELLO. The
client is established once proof_s verifies; the server only once proof_c
does: before that it hands nothing on and sends nothing but its CHALLENGE.
Every later frame is MACed with its direction's key, so frames recorded in
one session (or reflected back to their sender) fail the MAC in any other.
A server also remembers the nonces of recent HELLOs (``SeenNonces``): a
HELLO replayed while its nonce is remembered is refused at once (``replay``),
without a CHALLENGE; one replayed later gets a CHALLENGE it cannot answer.

Checks on a received frame, in order: the length (``oversize`` before the
body is read; shorter than a bare header + MAC: ``malformed``), the frame
version (``version``: read before the MAC, since a peer of another version
MACs differently; the frame is refused either way), the MAC (``bad-mac``:
nothing unauthenticated is interpreted, so flipping any bit after the version
byte is ``bad-mac``), the type (``unknown-type``; a type the peer's role
never sends is also ``unknown-type``), handshake order (``handshake``), the
counter (``replay``), then flags and payload (``malformed``); in the
handshake, the peer's protocol version (``version``), a remembered HELLO
nonce (``replay``) and the proof (``bad-proof``).

Message types are one-way: the client (router) sends HELLO, PROOF, HANDOFF,
STOP_MIRROR, RELEASE, HOLDING, TAKEBACK, SHIFT and PING requests; the server (agent)
sends CHALLENGE, ACK, NACK, TAKEN, CLOSED and PING replies.

Lifecycle messages (blueprint 2.2/2.3): CLOSED with ``CLOSED_TARGET_GONE`` says
the target's kernel holds no live socket for the connection any more and the
agent's entry is gone, so the router may forget it and reuse its forwarding
port. RELEASE asks the agent to end a connection the router no longer routes
(a new connection took the client's 4-tuple, or a HANDOFF timed out). HOLDING
lists connections the router holds. All of them name a connection by its
``conn_id`` (the HANDOFF's) as well as its key: a late message about an old
connection must never touch a new one on the same 4-tuple. HOLDING: ``complete`` (sent on every new control
connection, in chunks, ``last`` on the final one) means "these and no others",
so the agent ends the rest; otherwise it is a question about silent ones. The
agent answers CLOSED(GONE) for every listed connection it does not hold.
"""

from __future__ import annotations

import enum
import hmac
import secrets
import socket
import struct
from dataclasses import dataclass
from typing import Union

from handoff.control.handshake import SeenNonces, SessionKeys, hello_key, transcript_hash
from handoff.translate import Translation

FRAME_VERSION = 2
PROTOCOL_VERSION = 4
"""2: the challenge-response handshake (HELLO, CHALLENGE, PROOF) and keys per
direction. 3: SHIFT (a re-handoff in place), which an agent of protocol 2
would take for an unknown type and end the session over. 4: TAKEBACK and
SHIFT end in a flags byte (``ANSWERS_HEAD``), one byte longer than protocol
3's, which would take them for malformed. A peer of another
protocol is refused with ``version`` at the handshake, which names both."""
MAX_FRAME = 64 * 1024
"""The largest frame, its length field included."""
MAX_HANDSHAKE_FRAME = 1024
"""The largest frame before the handshake is complete: an unproven peer makes
the other side buffer no more than this."""
MAC_LEN = 32
NONCE_LEN = 32
MAX_NODE_ID = 255
"""Bytes of a node id (UTF-8)."""

_LEN = struct.Struct(">I")
_HEAD = struct.Struct(">IBBHQ")  # length, version, type, flags, counter
HEADER_LEN = _HEAD.size  # 16
MIN_LENGTH = HEADER_LEN - _LEN.size + MAC_LEN
"""The smallest value of the length field: an empty payload."""

REASONS = ("bad-mac", "replay", "malformed", "oversize", "unknown-type", "version", "handshake", "bad-proof")


class ControlError(Exception):
    """The peer broke the protocol. ``reason`` is one of ``REASONS``."""

    def __init__(self, reason: str, detail: str) -> None:
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class MessageType(enum.IntEnum):
    HELLO = 1
    CHALLENGE = 12
    PROOF = 13
    HANDOFF = 2
    ACK = 3
    NACK = 4
    STOP_MIRROR = 5
    CLOSED = 6
    PING = 7
    RELEASE = 8
    HOLDING = 9
    TAKEBACK = 10
    TAKEN = 11
    SHIFT = 14
    # CHALLENGE = 12, PROOF = 13 (above, with HELLO: the handshake)


CLOSED_TARGET_GONE = 0x100
"""Closed.flags bit (beside the FIN/RST bits the target sent): the target's
side is over and the agent's entry deleted."""
HOLDING_COMPLETE = 1
HOLDING_LAST = 2
ANSWERS_HEAD = 1
"""TAKEBACK and SHIFT flag: the server's latest response answers a HEAD
request, so it has no body whatever its head says (handoff/framing.py)."""
MAX_HOLDING_KEYS = 3000
"""Connections per HOLDING frame (20 bytes each: well under MAX_FRAME)."""


# ------------------------------------------------------------------ messages


@dataclass(frozen=True)
class Hello:
    """The client's first frame: who it is and its fresh nonce."""

    node_id: str
    nonce: bytes
    version: int = PROTOCOL_VERSION


@dataclass(frozen=True)
class Challenge:
    """The server's answer to a HELLO: who it is, its fresh nonce, and its
    proof over both (see the module's docstring)."""

    node_id: str
    nonce: bytes
    proof: bytes
    version: int = PROTOCOL_VERSION


@dataclass(frozen=True)
class Proof:
    """The client's proof over both nonces and both node ids."""

    proof: bytes


@dataclass(frozen=True)
class Established:
    """Not a message: what ``receive_data`` returns once the peer is proven."""

    peer_node_id: str


@dataclass(frozen=True, slots=True)
class FlowKey:
    """A TCP/IPv4 4-tuple; 12 bytes on the wire."""

    saddr: str
    daddr: str
    sport: int
    dport: int


@dataclass(frozen=True, slots=True)
class HandoffRequest:
    conn_id: int
    key: FlowKey
    translation: Translation
    mirror_from: int
    mirror_until: int
    syn_seq: int = 0
    """Seq of the target's SYN-ACK on the forwarding connection: a repeat of it
    is no new connection (``flow_entry.syn_seq``)."""


@dataclass(frozen=True, slots=True)
class Release:
    conn_id: int
    key: FlowKey


@dataclass(frozen=True, slots=True)
class Holding:
    connections: tuple[tuple[int, FlowKey], ...]
    """(conn_id, forwarding key) of each connection listed."""
    complete: bool = False
    last: bool = True


@dataclass(frozen=True, slots=True)
class Ack:
    conn_id: int


@dataclass(frozen=True, slots=True)
class Nack:
    conn_id: int
    reason: str


@dataclass(frozen=True, slots=True)
class StopMirror:
    conn_id: int
    key: FlowKey


@dataclass(frozen=True, slots=True)
class Closed:
    conn_id: int
    key: FlowKey
    packets: int
    bytes: int
    flags: int


@dataclass(frozen=True, slots=True)
class TakeBack:
    """The router takes connection CONN_ID back (its client sent a new request):
    if the client has acknowledged every byte the server sent (ACKED, in the
    server's sequence space, is the client's latest ack), the agent ends its
    egress entry, so that the server's packets on KEY reach the router again,
    and answers TAKEN with what the router needs to rebuild its sockets."""

    conn_id: int
    key: FlowKey
    acked: int
    stream_end: int
    """Where the router's stream to the server ends (server seq space): a
    request rerouted in place (SHIFT) is over once the server acknowledged up
    to here; a SHIFT that starts here was void (its request never sent)."""
    answers_head: bool = False
    """The last request the router sent the server was a HEAD: its response
    ends with its head (``ANSWERS_HEAD``); the agent cannot see requests."""


TAKEN_OK = 0
TAKEN_UNACKED = 1
"""The server sent bytes the client has not acknowledged yet, or has not yet
acknowledged all of a request rerouted in place: the entry stays; the router
asks again once the client's ACK moved, or after ``UNACKED_ASK_AGAIN``."""
UNACKED_ASK_AGAIN = 0.01
"""Seconds after which the router asks again when the agent answered unacked
(TAKEN_UNACKED, or a NACK of a SHIFT with reason ``unacked``), although the
client's ACK has not moved: the agent may be waiting for the server instead,
to acknowledge all of a request rerouted in place, which the router does not
see. nginx answers a POST to ``return`` before reading its body and
acknowledges the rest of the body a delayed ACK later (about 40 ms, at most
Linux's 200 ms); waiting for the client instead hung such a connection until
``takeback_timeout`` (tests/net/test_takeback_bodies_net.py)."""
TAKEN_UNKNOWN = 2
"""No entry of CONN_ID on the key (ended, or never installed)."""
TAKEN_CLOSED = 3
"""The server already closed (FIN or RST sent): nothing to take back."""
TAKEN_STATUSES = (TAKEN_OK, TAKEN_UNACKED, TAKEN_UNKNOWN, TAKEN_CLOSED)


@dataclass(frozen=True, slots=True)
class Taken:
    conn_id: int
    status: int
    snd_nxt: int = 0
    """The server's snd_nxt as its egress program saw it (server seq space)."""
    window: int = 0
    """The server's latest receive window, in bytes (scaled)."""
    syn_seq: int = 0
    """Seq of the server's SYN-ACK on the forwarding connection (for the next HANDOFF)."""


@dataclass(frozen=True, slots=True)
class Shift:
    """A re-handoff in place (the router's next request of CONN_ID goes to
    the same server, on the same connection): the server is about to receive
    the rewritten request at [START, END) of its sequence space, where the
    client sent one of another length. The agent makes the egress entry
    translate acks up to START as before and acks from END on with DELTA
    (``translate.AckShift``), and answers ACK once it does; NACK when the
    server has not acknowledged exactly up to START (a request still on its
    way, or a connection that moved on) or has sent more than the client
    acknowledged (ACKED, server space: the response to the new request must
    start there, where the router counts it from): the router then takes the
    connection back the usual way."""

    conn_id: int
    key: FlowKey
    start: int
    end: int
    delta: int
    acked: int
    answers_head: bool = False
    """As ``TakeBack.answers_head``: the response the server may still be
    writing answers a HEAD."""


@dataclass(frozen=True, slots=True)
class Ping:
    token: int
    reply: bool = False


Message = Union[Hello, Challenge, Proof, HandoffRequest, Ack, Nack, StopMirror, Closed, Ping, Release, Holding,
                TakeBack, Taken, Shift]


# ------------------------------------------------------------------ codecs
#
# Encoders raise ValueError for values that do not fit (a bug of the caller);
# decoders raise _Malformed, which the connection turns into ControlError.


class _Malformed(Exception):
    pass


_KEY = struct.Struct(">4s4sHH")
_XLATE = struct.Struct(">4s4sHHIIIIBBI")
_U64 = struct.Struct(">Q")
_HANDOFF_TAIL = struct.Struct(">III")
_HOLDING_HEAD = struct.Struct(">BH")
_CLOSED_TAIL = struct.Struct(">QQI")
_PING = struct.Struct(">QB")
_TAKEBACK_TAIL = struct.Struct(">IIB")
_TAKEN = struct.Struct(">QBIII")
_SHIFT_TAIL = struct.Struct(">IIIIB")
_HELLO_HEAD = struct.Struct(">HH")


def _pack(st: struct.Struct, *values: object) -> bytes:
    try:
        return st.pack(*values)
    except struct.error as exc:
        raise ValueError(f"value out of range: {exc} in {values!r}") from None


def _ip(addr: str) -> bytes:
    # inet_pton is strict (no '1' or '1.2' shorthands) and much cheaper than
    # the ipaddress module on this per-handoff path.
    try:
        return socket.inet_pton(socket.AF_INET, addr)
    except (OSError, TypeError) as exc:
        raise ValueError(f"not an IPv4 address: {addr!r}") from exc


def _ip_text(packed: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET, packed)


def _unpack(st: struct.Struct, data: bytes, offset: int) -> tuple:
    if len(data) - offset < st.size:
        raise _Malformed(f"payload truncated: {len(data)} bytes")
    return st.unpack_from(data, offset)


def _encode_key(key: FlowKey) -> bytes:
    return _pack(_KEY, _ip(key.saddr), _ip(key.daddr), key.sport, key.dport)


def _decode_key(data: bytes, offset: int) -> FlowKey:
    s, d, sp, dp = _unpack(_KEY, data, offset)
    return FlowKey(_ip_text(s), _ip_text(d), sp, dp)


def _encode_xlate(x: Translation) -> bytes:
    return _pack(_XLATE, _ip(x.saddr), _ip(x.daddr), x.sport, x.dport, x.seq_delta, x.ack_delta,
                 x.tsval_delta, x.tsecr_delta, x.wscale_in, x.wscale_out, x.tsecr_floor)


def _decode_xlate(data: bytes, offset: int) -> Translation:
    s, d, sp, dp, seq, ack, tsv, tse, w_in, w_out, floor = _unpack(_XLATE, data, offset)
    return Translation(saddr=_ip_text(s), daddr=_ip_text(d),
                       sport=sp, dport=dp, seq_delta=seq, ack_delta=ack, tsval_delta=tsv,
                       tsecr_delta=tse, wscale_in=w_in, wscale_out=w_out, tsecr_floor=floor)


def _encode_text(text: str) -> bytes:
    raw = text.encode("utf-8")
    return _pack(struct.Struct(">H"), len(raw)) + raw


def _decode_text(data: bytes, offset: int) -> tuple[str, int]:
    (n,) = _unpack(struct.Struct(">H"), data, offset)
    offset += 2
    if len(data) - offset < n:
        raise _Malformed(f"text of {n} bytes truncated")
    try:
        return data[offset:offset + n].decode("utf-8"), offset + n
    except UnicodeDecodeError as exc:
        raise _Malformed(f"text is not UTF-8: {exc}") from None


def encode_payload(message: Message) -> tuple[MessageType, bytes]:
    if isinstance(message, Hello):
        return MessageType.HELLO, _encode_greeting(message.version, message.node_id, message.nonce)
    if isinstance(message, Challenge):
        if len(message.proof) != MAC_LEN:
            raise ValueError(f"CHALLENGE proof must be {MAC_LEN} bytes")
        return MessageType.CHALLENGE, (_encode_greeting(message.version, message.node_id, message.nonce)
                                       + message.proof)
    if isinstance(message, Proof):
        if len(message.proof) != MAC_LEN:
            raise ValueError(f"PROOF must be {MAC_LEN} bytes")
        return MessageType.PROOF, bytes(message.proof)
    if isinstance(message, HandoffRequest):
        return MessageType.HANDOFF, (_pack(_U64, message.conn_id) + _encode_key(message.key)
                                     + _encode_xlate(message.translation)
                                     + _pack(_HANDOFF_TAIL, message.mirror_from, message.mirror_until,
                                             message.syn_seq))
    if isinstance(message, Ack):
        return MessageType.ACK, _pack(_U64, message.conn_id)
    if isinstance(message, Nack):
        return MessageType.NACK, _pack(_U64, message.conn_id) + _encode_text(message.reason)
    if isinstance(message, StopMirror):
        return MessageType.STOP_MIRROR, _encode_conn_key(message.conn_id, message.key)
    if isinstance(message, Closed):
        return MessageType.CLOSED, (_pack(_U64, message.conn_id) + _encode_key(message.key)
                                    + _pack(_CLOSED_TAIL, message.packets, message.bytes, message.flags))
    if isinstance(message, Ping):
        return MessageType.PING, _pack(_PING, message.token, 1 if message.reply else 0)
    if isinstance(message, Release):
        return MessageType.RELEASE, _encode_conn_key(message.conn_id, message.key)
    if isinstance(message, Holding):
        if len(message.connections) > MAX_HOLDING_KEYS:
            raise ValueError(f"HOLDING of {len(message.connections)} connections exceeds {MAX_HOLDING_KEYS}")
        flags = (HOLDING_COMPLETE if message.complete else 0) | (HOLDING_LAST if message.last else 0)
        return MessageType.HOLDING, (_pack(_HOLDING_HEAD, flags, len(message.connections))
                                     + b"".join(_pack(_U64, conn_id) + _encode_key(key)
                                                for conn_id, key in message.connections))
    if isinstance(message, TakeBack):
        return MessageType.TAKEBACK, (_encode_conn_key(message.conn_id, message.key)
                                      + _pack(_TAKEBACK_TAIL, message.acked, message.stream_end,
                                              ANSWERS_HEAD if message.answers_head else 0))
    if isinstance(message, Shift):
        return MessageType.SHIFT, (_encode_conn_key(message.conn_id, message.key)
                                   + _pack(_SHIFT_TAIL, message.start, message.end, message.delta,
                                           message.acked, ANSWERS_HEAD if message.answers_head else 0))
    if isinstance(message, Taken):
        return MessageType.TAKEN, _pack(_TAKEN, message.conn_id, message.status, message.snd_nxt,
                                        message.window, message.syn_seq)
    raise TypeError(f"not a control message: {message!r}")


def _encode_greeting(version: int, node_id: str, nonce: bytes) -> bytes:
    """The start of HELLO and CHALLENGE: version, node id, nonce."""
    if len(nonce) != NONCE_LEN:
        raise ValueError(f"nonce must be {NONCE_LEN} bytes")
    node = node_id.encode("utf-8")
    if len(node) > MAX_NODE_ID:
        raise ValueError(f"node id of {len(node)} bytes exceeds {MAX_NODE_ID}")
    return _pack(_HELLO_HEAD, version, len(node)) + node + bytes(nonce)


def _decode_greeting(data: bytes, what: str) -> tuple[int, str, bytes, int]:
    """(version, node id, nonce, offset after the nonce)."""
    version, n = _unpack(_HELLO_HEAD, data, 0)
    if n > MAX_NODE_ID:
        raise _Malformed(f"{what} node id of {n} bytes exceeds {MAX_NODE_ID}")
    end = _HELLO_HEAD.size + n + NONCE_LEN
    if len(data) < end:
        raise _Malformed(f"{what} of {len(data)} bytes with a node id of {n}")
    try:
        node_id = data[_HELLO_HEAD.size:_HELLO_HEAD.size + n].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Malformed(f"node id is not UTF-8: {exc}") from None
    return version, node_id, bytes(data[end - NONCE_LEN:end]), end


def _encode_conn_key(conn_id: int, key: FlowKey) -> bytes:
    """The whole payload of STOP_MIRROR and RELEASE: a connection and its key."""
    return _pack(_U64, conn_id) + _encode_key(key)


def _decode_conn_key(data: bytes) -> tuple[int, FlowKey]:
    (conn_id,) = _unpack(_U64, data, 0)
    key = _decode_key(data, 8)
    _done(data, 8 + _KEY.size)
    return conn_id, key


def _done(data: bytes, offset: int) -> None:
    if offset != len(data):
        raise _Malformed(f"{len(data) - offset} trailing bytes in payload")


def _answers_head(flags: int, what: str) -> bool:
    if flags & ~ANSWERS_HEAD:
        raise _Malformed(f"{what} flags {flags:#x}")
    return bool(flags & ANSWERS_HEAD)


def decode_payload(mtype: MessageType, data: bytes) -> Message:
    """Raises _Malformed."""
    if mtype is MessageType.HELLO:
        version, node_id, nonce, end = _decode_greeting(data, "HELLO")
        _done(data, end)
        return Hello(node_id=node_id, nonce=nonce, version=version)
    if mtype is MessageType.CHALLENGE:
        version, node_id, nonce, end = _decode_greeting(data, "CHALLENGE")
        if len(data) != end + MAC_LEN:
            raise _Malformed(f"CHALLENGE of {len(data)} bytes: its proof must be {MAC_LEN}")
        return Challenge(node_id=node_id, nonce=nonce, proof=bytes(data[end:]), version=version)
    if mtype is MessageType.PROOF:
        if len(data) != MAC_LEN:
            raise _Malformed(f"PROOF of {len(data)} bytes, not {MAC_LEN}")
        return Proof(bytes(data))
    if mtype is MessageType.HANDOFF:
        (conn_id,) = _unpack(_U64, data, 0)
        key = _decode_key(data, 8)
        x = _decode_xlate(data, 8 + _KEY.size)
        offset = 8 + _KEY.size + _XLATE.size
        mirror_from, mirror_until, syn_seq = _unpack(_HANDOFF_TAIL, data, offset)
        _done(data, offset + _HANDOFF_TAIL.size)
        return HandoffRequest(conn_id, key, x, mirror_from, mirror_until, syn_seq)
    if mtype is MessageType.ACK:
        (conn_id,) = _unpack(_U64, data, 0)
        _done(data, 8)
        return Ack(conn_id)
    if mtype is MessageType.NACK:
        (conn_id,) = _unpack(_U64, data, 0)
        reason, offset = _decode_text(data, 8)
        _done(data, offset)
        return Nack(conn_id, reason)
    if mtype is MessageType.STOP_MIRROR:
        return StopMirror(*_decode_conn_key(data))
    if mtype is MessageType.CLOSED:
        (conn_id,) = _unpack(_U64, data, 0)
        key = _decode_key(data, 8)
        packets, nbytes, flags = _unpack(_CLOSED_TAIL, data, 8 + _KEY.size)
        _done(data, 8 + _KEY.size + _CLOSED_TAIL.size)
        return Closed(conn_id, key, packets, nbytes, flags)
    if mtype is MessageType.RELEASE:
        return Release(*_decode_conn_key(data))
    if mtype is MessageType.HOLDING:
        flags, n = _unpack(_HOLDING_HEAD, data, 0)
        if flags & ~(HOLDING_COMPLETE | HOLDING_LAST):
            raise _Malformed(f"HOLDING flags {flags:#x}")
        if n > MAX_HOLDING_KEYS:
            raise _Malformed(f"HOLDING of {n} connections exceeds {MAX_HOLDING_KEYS}")
        item = _U64.size + _KEY.size
        offset = _HOLDING_HEAD.size
        connections = tuple((_unpack(_U64, data, offset + i * item)[0], _decode_key(data, offset + i * item + 8))
                            for i in range(n))
        _done(data, offset + n * item)
        return Holding(connections, bool(flags & HOLDING_COMPLETE), bool(flags & HOLDING_LAST))
    if mtype is MessageType.TAKEBACK:
        head = _U64.size + _KEY.size
        conn_id, key = _decode_conn_key(data[:head])
        acked, stream_end, flags = _unpack(_TAKEBACK_TAIL, data, head)
        _done(data, head + _TAKEBACK_TAIL.size)
        return TakeBack(conn_id, key, acked, stream_end, _answers_head(flags, "TAKEBACK"))
    if mtype is MessageType.SHIFT:
        head = _U64.size + _KEY.size
        conn_id, key = _decode_conn_key(data[:head])
        start, end, delta, acked, flags = _unpack(_SHIFT_TAIL, data, head)
        _done(data, head + _SHIFT_TAIL.size)
        if start == end:
            raise _Malformed("SHIFT of an empty request")
        return Shift(conn_id, key, start, end, delta, acked, _answers_head(flags, "SHIFT"))
    if mtype is MessageType.TAKEN:
        conn_id, status, snd_nxt, window, syn_seq = _unpack(_TAKEN, data, 0)
        _done(data, _TAKEN.size)
        if status not in TAKEN_STATUSES:
            raise _Malformed(f"TAKEN status {status}")
        return Taken(conn_id, status, snd_nxt, window, syn_seq)
    if mtype is MessageType.PING:
        token, reply = _unpack(_PING, data, 0)
        _done(data, _PING.size)
        if reply > 1:
            raise _Malformed(f"PING reply flag {reply}")
        return Ping(token, bool(reply))
    raise AssertionError(mtype)


def encode_frame(mtype: int, counter: int, payload: bytes, key: bytes, *,
                 version: int = FRAME_VERSION, flags: int = 0) -> bytes:
    """One frame MACed with KEY. Public so tests can build hostile frames."""
    length = HEADER_LEN - _LEN.size + len(payload) + MAC_LEN
    if length + _LEN.size > MAX_FRAME:
        raise ValueError(f"frame of {length + _LEN.size} bytes exceeds {MAX_FRAME}")
    head = _pack(_HEAD, length, version, mtype, flags, counter)
    body = head + payload
    return body + hmac.digest(key, body, "sha256")


# ------------------------------------------------------------------ the connection

CLIENT = "client"
SERVER = "server"

_SENT_BY: dict[type, str] = {
    # the role that sends each message (PING: both, told apart by the reply flag)
    Hello: CLIENT,
    Proof: CLIENT,
    HandoffRequest: CLIENT,
    StopMirror: CLIENT,
    Release: CLIENT,
    Holding: CLIENT,
    TakeBack: CLIENT,
    Shift: CLIENT,
    Challenge: SERVER,
    Ack: SERVER,
    Taken: SERVER,
    Nack: SERVER,
    Closed: SERVER,
}
_HANDSHAKE_TYPES = frozenset({MessageType.HELLO, MessageType.CHALLENGE, MessageType.PROOF})


def _sender_of(message: Message) -> str | None:
    if isinstance(message, Ping):
        return SERVER if message.reply else CLIENT
    return _SENT_BY.get(type(message))


class _Stage(enum.Enum):
    NEW = "new"                          # client: start() not called yet
    AWAIT_HELLO = "await-hello"          # server
    AWAIT_CHALLENGE = "await-challenge"  # client, its HELLO sent
    AWAIT_PROOF = "await-proof"          # server, its CHALLENGE sent
    ESTABLISHED = "established"


_EXPECTED = {_Stage.AWAIT_HELLO: MessageType.HELLO, _Stage.AWAIT_CHALLENGE: MessageType.CHALLENGE,
             _Stage.AWAIT_PROOF: MessageType.PROOF}


class ControlConnection:
    """One end of a control connection, sans-IO (in the manner of h11).

    Client (router)::

        conn = ControlConnection("client", psk, "router-1")
        write(conn.start())                      # its HELLO
        for msg in conn.receive_data(read()):    # Established (the CHALLENGE verified), then messages
            ...
        write(conn.data_to_send())               # its PROOF (send() would put it first anyway)
        write(conn.send(HandoffRequest(...)))    # once conn.established

    Server (agent)::

        conn = ControlConnection("server", psk, "agent-1", seen_nonces=shared)
        conn.receive_data(read())                # the client's HELLO: nothing yet ...
        write(conn.data_to_send())               # ... but the CHALLENGE answering it
        conn.receive_data(read())                # [Established(...)] once the PROOF verifies

    ``receive_data`` raises ``ControlError`` on any violation; messages
    decoded earlier in the same call are dropped with it (the peer is not to be
    trusted any more). After an error, or ``close()``, every call raises
    ``ControlError`` again: the connection must be discarded.
    """

    def __init__(self, role: str, psk: bytes, node_id: str, *, nonce: bytes | None = None,
                 seen_nonces: SeenNonces | None = None) -> None:
        if role not in (CLIENT, SERVER):
            raise ValueError(f"role must be 'client' or 'server', not {role!r}")
        if not psk:
            raise ValueError("empty pre-shared key")
        if len(node_id.encode("utf-8")) > MAX_NODE_ID:
            raise ValueError(f"node id longer than {MAX_NODE_ID} bytes")
        self.role = role
        self._psk = bytes(psk)
        self._hello_key = hello_key(self._psk)
        self.node_id = node_id
        self._nonce = nonce if nonce is not None else secrets.token_bytes(NONCE_LEN)
        if len(self._nonce) != NONCE_LEN:
            raise ValueError(f"nonce must be {NONCE_LEN} bytes")
        self._seen = seen_nonces
        self._stage = _Stage.NEW if role == CLIENT else _Stage.AWAIT_HELLO
        self._hello_payload = b""  # the client's own, for the transcript
        self._keys: SessionKeys | None = None  # derived at the HELLO (server) or CHALLENGE (client)
        self._send_key: bytes | None = None  # set once established
        self._recv_key: bytes | None = None
        self._buffer = bytearray()
        self._outbox = bytearray()
        self._send_counter = 0
        self._recv_counter = 0
        self._error: ControlError | None = None
        self.peer_node_id: str | None = None
        """The peer's node id, once proven (a server: once the PROOF verifies)."""
        self.claimed_node_id: str | None = None
        """The node id the peer's greeting claims (before it is proven; for logs)."""
        self.peer_nonce: bytes | None = None

    @property
    def established(self) -> bool:
        return self._stage is _Stage.ESTABLISHED and self._error is None

    @property
    def failed(self) -> ControlError | None:
        return self._error

    @property
    def buffered(self) -> int:
        """Bytes received of a frame not complete yet (a stalled peer leaves some)."""
        return len(self._buffer)

    @property
    def stage(self) -> str:
        return self._stage.value

    def _check_usable(self) -> None:
        if self._error is not None:
            raise ControlError(self._error.reason, f"connection already failed ({self._error.detail})")

    def start(self) -> bytes:
        """The client's HELLO (b"" for a server, which answers the client's)."""
        self._check_usable()
        if self.role == SERVER:
            return b""
        if self._stage is not _Stage.NEW:
            raise RuntimeError("start() called twice")
        self._stage = _Stage.AWAIT_CHALLENGE
        _, self._hello_payload = encode_payload(Hello(node_id=self.node_id, nonce=self._nonce))
        return encode_frame(MessageType.HELLO, 0, self._hello_payload, self._hello_key)

    def data_to_send(self) -> bytes:
        """Bytes of the handshake the connection produced by itself (the
        server's CHALLENGE, the client's PROOF); clears them."""
        out = bytes(self._outbox)
        self._outbox.clear()
        return out

    def send(self, message: Message) -> bytes:
        """The frame carrying MESSAGE (preceded by handshake bytes not taken
        with ``data_to_send`` yet). ValueError if it does not fit the wire or
        is not this role's to send; RuntimeError before the handshake."""
        self._check_usable()
        if self._send_key is None:
            raise RuntimeError("the handshake is not complete")
        sender = _sender_of(message)
        if sender != self.role or isinstance(message, (Hello, Challenge, Proof)):
            raise ValueError(f"a {self.role} does not send {type(message).__name__} "
                             f"{'' if sender is None or sender == self.role else '(only a ' + sender + ' does)'}"
                             .rstrip())
        mtype, payload = encode_payload(message)
        frame = encode_frame(mtype, self._send_counter + 1, payload, self._send_key)
        self._send_counter += 1
        if self._outbox:
            return self.data_to_send() + frame
        return frame

    def close(self) -> None:
        """Refuse any further use."""
        if self._error is None:
            self._error = ControlError("handshake", "connection closed")

    def receive_data(self, data: bytes) -> list[Message | Established]:
        self._check_usable()
        self._buffer += data
        out: list[Message | Established] = []
        try:
            while len(self._buffer) >= _LEN.size:
                (length,) = _LEN.unpack_from(self._buffer, 0)
                limit = MAX_FRAME if self._stage is _Stage.ESTABLISHED else MAX_HANDSHAKE_FRAME
                if length + _LEN.size > limit:
                    raise ControlError("oversize", f"frame length {length} exceeds {limit - _LEN.size}"
                                       + ("" if limit == MAX_FRAME else " before the handshake is complete"))
                if length < MIN_LENGTH:
                    raise ControlError("malformed", f"frame length {length} below {MIN_LENGTH}")
                if len(self._buffer) < _LEN.size + length:
                    break
                frame = bytes(self._buffer[:_LEN.size + length])
                del self._buffer[:_LEN.size + length]
                item = self._frame(frame)
                if item is not None:
                    out.append(item)
        except ControlError as exc:
            self._error = exc
            self._buffer.clear()
            raise
        return out

    def _frame(self, frame: bytes) -> Message | Established | None:
        body, mac = frame[:-MAC_LEN], frame[-MAC_LEN:]
        _, version, raw_type, flags, counter = _HEAD.unpack_from(body, 0)
        if version != FRAME_VERSION:
            # Read before the MAC: a peer of another version MACs otherwise.
            # Refused either way; a forger only picks the reason counted.
            raise ControlError("version", f"frame version {version}, we speak {FRAME_VERSION}"
                               + (" (a peer of protocol 1: upgrade it)" if version == 1 else ""))
        established = self._stage is _Stage.ESTABLISHED
        key = self._recv_key if established else self._hello_key
        assert key is not None
        if not hmac.compare_digest(hmac.digest(key, body, "sha256"), mac):
            raise ControlError("bad-mac", "frame MAC does not verify" if established else
                               "handshake frame not MACed with our pre-shared key (wrong key?)")
        try:
            mtype = MessageType(raw_type)
        except ValueError:
            raise ControlError("unknown-type", f"frame type {raw_type}") from None
        if not established:
            if self._stage is _Stage.NEW:
                raise ControlError("handshake", f"{mtype.name} before our HELLO was sent")
            expected = _EXPECTED[self._stage]
            if mtype is not expected:
                raise ControlError("handshake", f"{mtype.name} while awaiting {expected.name}")
            if counter != 0:
                raise ControlError("handshake", f"{mtype.name} with counter {counter}")
        else:
            if mtype in _HANDSHAKE_TYPES:
                raise ControlError("handshake", f"{mtype.name} after the handshake")
            if counter != self._recv_counter + 1:
                raise ControlError("replay", f"counter {counter}, expected {self._recv_counter + 1}")
        if flags != 0:
            raise ControlError("malformed", f"flags {flags:#x}")
        payload = body[HEADER_LEN:]
        try:
            message = decode_payload(mtype, payload)
        except _Malformed as exc:
            raise ControlError("malformed", f"{mtype.name}: {exc}") from None
        if not established:
            return self._handshake(message, payload)
        sender = _sender_of(message)
        if sender == self.role:
            raise ControlError("unknown-type", f"{mtype.name}{' reply' if getattr(message, 'reply', False) else ''}"
                               f" is not sent by a {'client' if self.role == SERVER else 'server'}")
        self._recv_counter = counter
        return message

    # ---------------------------------------------------------- the handshake

    def _handshake(self, message: Message, payload: bytes) -> Established | None:
        if isinstance(message, Hello):
            return self._on_hello(message, payload)
        if isinstance(message, Challenge):
            return self._on_challenge(message, payload)
        assert isinstance(message, Proof)
        return self._on_proof(message)

    def _check_greeting(self, greeting: Hello | Challenge) -> None:
        if greeting.version != PROTOCOL_VERSION:
            raise ControlError("version",
                               f"peer speaks protocol {greeting.version}, we speak protocol {PROTOCOL_VERSION}")
        if greeting.nonce == self._nonce:
            raise ControlError("handshake", "peer's greeting carries our own nonce (reflected)")
        self.claimed_node_id = greeting.node_id
        self.peer_nonce = greeting.nonce

    def _on_hello(self, hello: Hello, payload: bytes) -> None:
        self._check_greeting(hello)
        if self._seen is not None and not self._seen.remember(hello.nonce):
            raise ControlError("replay", f"HELLO of {hello.node_id!r} with a nonce seen before (a replayed HELLO)")
        core = _encode_greeting(PROTOCOL_VERSION, self.node_id, self._nonce)
        self._keys = SessionKeys.derive(self._psk, transcript_hash(payload, core))
        self._outbox += encode_frame(MessageType.CHALLENGE, 0, core + self._keys.server_proof(), self._hello_key)
        self._stage = _Stage.AWAIT_PROOF
        return None

    def _on_challenge(self, challenge: Challenge, payload: bytes) -> Established:
        self._check_greeting(challenge)
        keys = SessionKeys.derive(self._psk, transcript_hash(self._hello_payload, payload[:-MAC_LEN]))
        if not hmac.compare_digest(keys.server_proof(), challenge.proof):
            raise ControlError("bad-proof", "the CHALLENGE does not answer our HELLO (replayed, or another key)")
        self._keys = keys
        _, proof = encode_payload(Proof(keys.client_proof()))
        self._outbox += encode_frame(MessageType.PROOF, 0, proof, self._hello_key)
        return self._establish(send=keys.client_to_server, receive=keys.server_to_client)

    def _on_proof(self, proof: Proof) -> Established:
        assert self._keys is not None
        if not hmac.compare_digest(self._keys.client_proof(), proof.proof):
            raise ControlError("bad-proof", f"PROOF of {self.claimed_node_id!r} does not answer our CHALLENGE "
                               "(a replayed handshake?)")
        return self._establish(send=self._keys.server_to_client, receive=self._keys.client_to_server)

    def _establish(self, *, send: bytes, receive: bytes) -> Established:
        self._send_key, self._recv_key = send, receive
        self._stage = _Stage.ESTABLISHED
        self.peer_node_id = self.claimed_node_id
        assert self.peer_node_id is not None
        return Established(self.peer_node_id)
