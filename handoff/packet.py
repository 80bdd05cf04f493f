"""A byte-level reference model of the BPF packet rewrites (no I/O, no scapy).

``handoff/translate.py`` says what happens to the *fields* of a segment; this
module says what happens to the *bytes* of an Ethernet/IPv4/TCP frame, as
``handoff/bpf/arr_handoff.h``, ``router.bpf.c`` and ``target.bpf.c`` do it:

* :func:`parse` finds the headers (IP options honoured through IHL) exactly
  where the programs' ``parse_tcp4`` would, or says the frame is not theirs.
* :func:`translate` applies a :class:`~handoff.translate.Translation`
  (arithmetic by :func:`~handoff.translate.translate_fields`): addresses,
  ports, seq, ack, window, every TSval/TSecr and SACK edge in place, all other
  bytes identical; IP and TCP checksums updated incrementally.
* :func:`set_macs` writes the next hop's MACs (what ``forward`` does after the
  FIB lookup); :func:`forward` is both, with the verdict.
* :func:`normalise_syn` is the router's egress SYN normalisation,
  :func:`trim_mirror` turns a mirrored copy into a pure ACK,
  :func:`mirror_decision` says whether the target clones a packet while the
  request is not yet acknowledged, and :func:`mirror_step` is the whole
  mirror, its bounded tail and its end included.

Checksums. The kernel helpers (``csum_replace4``, ``inet_proto_csum_replace*``,
``bpf_csum_diff``) compute ``HC' = ~(~HC + ~m + m')`` (RFC 1624 eqn. 3) with
32-bit end-around-carry sums; the 32-bit ``~HC`` term is never zero, so the
folded sum is the representative in ``[1, 0xFFFF]`` of its class modulo
0xFFFF and ``HC'`` lies in ``[0, 0xFFFE]``. :func:`csum_update` computes the
same. When the input checksum verified, the result equals a full
recomputation (:func:`checksum`) of the new bytes, bit for bit (the data always
contains a non-zero word: the protocol number, the version); when it did not,
the error is carried over unchanged, as the kernel does.
``tests/unit/test_packet_model.py`` checks both claims. A ``CHECKSUM_PARTIAL``
skb (pseudo-header sum only in the field) is out of this model's scope.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from handoff.translate import AckShift, TcpFields, Translation, seq_after, translate_fields, wrap

MOD_32 = 1 << 32
ETH_LEN = 14
ETH_P_IP = 0x0800
IPPROTO_TCP = 6

TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = 0, 2, 7

TCPF_FIN, TCPF_SYN, TCPF_RST, TCPF_PSH, TCPF_ACK = 0x01, 0x02, 0x04, 0x08, 0x10
OPT_EOL, OPT_NOP, OPT_MSS, OPT_WSCALE, OPT_SACK_PERM, OPT_SACK, OPT_TS = 0, 1, 2, 3, 4, 5, 8
SACK_LENGTHS = (10, 18, 26, 34)
"""2 + 8 * blocks, 1 to 4 blocks (4 is all that fits in 40 bytes of options)."""


class Malformed(ValueError):
    """The TCP header cannot be rewritten (an option runs past the header, a
    SACK has a length that is not a whole number of blocks, the header runs
    past the frame): the programs drop such a packet and count it."""


# ------------------------------------------------------------------ checksums


def ones_sum(data: bytes) -> int:
    """One's-complement sum of big-endian 16-bit words (odd length: zero-padded),
    as an integer modulo 0xFFFF (0 and 0xFFFF are the same class)."""
    if len(data) % 2:
        data += b"\0"
    return sum(struct.unpack(f"!{len(data) // 2}H", data)) % 0xFFFF


def _complement_of(total: int) -> int:
    """~fold(sum): the folded sum is the class's representative in [1, 0xFFFF]."""
    folded = total % 0xFFFF or 0xFFFF
    return 0xFFFF - folded


def checksum(data: bytes) -> int:
    """The internet checksum of ``data`` computed from scratch (RFC 1071);
    ``data`` must contain a non-zero word (headers always do)."""
    return _complement_of(ones_sum(data))


def csum_update(check: int, old: bytes, new: bytes) -> int:
    """``check`` after the bytes ``old`` became ``new`` (same length, even
    offset), as the kernel's incremental helpers compute it."""
    if len(old) != len(new):
        raise ValueError("csum_update needs regions of equal length")
    return _complement_of((0xFFFF - check) + ones_sum(new) - ones_sum(old))


# ------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class TcpFrame:
    """Where the headers of an Ethernet/IPv4/TCP frame are (``struct pkt``)."""

    l4: int
    """Offset of the TCP header (14 + IHL * 4)."""
    tcp_len: int
    """TCP header length (data offset * 4)."""
    ip_total: int
    """The IP total length field (not checked against the frame's length)."""
    flags: int
    """The TCP flags byte."""
    saddr: str
    daddr: str
    sport: int
    dport: int

    l3 = ETH_LEN

    @property
    def key(self) -> tuple[str, str, int, int]:
        """The flow as the maps are keyed (source first)."""
        return self.saddr, self.daddr, self.sport, self.dport

    @property
    def options(self) -> slice:
        return slice(self.l4 + 20, self.l4 + self.tcp_len)

    @property
    def headers_end(self) -> int:
        return self.l4 + self.tcp_len

    @property
    def payload_len(self) -> int:
        """TCP payload length by the IP total length (``payload_len``)."""
        return max(self.ip_total - (self.l4 - self.l3 + self.tcp_len), 0)


def parse(frame: bytes) -> TcpFrame | None:
    """The headers of a frame the programs would look at, or None (not IPv4,
    not TCP, a fragment, too short, IHL < 5 or data offset < 5): such frames
    pass every program untouched."""
    if len(frame) < ETH_LEN + 20 or frame[12:14] != b"\x08\x00":
        return None
    ver_ihl, proto = frame[14], frame[23]
    if ver_ihl >> 4 != 4 or ver_ihl & 15 < 5 or proto != IPPROTO_TCP:
        return None
    if struct.unpack_from("!H", frame, 20)[0] & 0x3FFF:  # MF or a fragment offset
        return None
    l4 = ETH_LEN + (ver_ihl & 15) * 4
    if len(frame) < l4 + 14:
        return None
    tcp_len = (frame[l4 + 12] >> 4) * 4
    if tcp_len < 20:
        return None
    sport, dport = struct.unpack_from("!HH", frame, l4)
    return TcpFrame(l4=l4, tcp_len=tcp_len, ip_total=struct.unpack_from("!H", frame, 16)[0],
                    flags=frame[l4 + 13], saddr=socket.inet_ntoa(frame[26:30]),
                    daddr=socket.inet_ntoa(frame[30:34]), sport=sport, dport=dport)


@dataclass(frozen=True)
class Option:
    """One TCP option other than NOP and EOL, by its offset in the option area."""

    offset: int
    kind: int
    length: int


def walk_options(opts: bytes) -> list[Option]:
    """The options up to the end or the first EOL (bytes after an EOL are never
    looked at). Raises Malformed for a kind without its length byte, a length
    below 2 or one running past the option area."""
    found: list[Option] = []
    i = 0
    while i < len(opts):
        kind = opts[i]
        if kind == OPT_EOL:
            break
        if kind == OPT_NOP:
            i += 1
            continue
        if i + 1 >= len(opts):
            raise Malformed(f"option {kind} at {i} has no length byte")
        length = opts[i + 1]
        if length < 2 or i + length > len(opts):
            raise Malformed(f"option {kind} at {i} has length {length} of {len(opts) - i} left")
        found.append(Option(i, kind, length))
        i += length
    return found


# ---------------------------------------------------------------- translation


def _u32(buf: bytes | bytearray, at: int) -> int:
    return struct.unpack_from("!I", buf, at)[0]


def translate(frame: bytes, x: Translation, shift: AckShift | None = None) -> bytes:
    """The frame after the rewrite of ``apply_xlate`` (MACs untouched); SHIFT:
    the target egress entry's ack history (``translate.AckShift``).

    Raises ValueError if ``parse`` rejects the frame, Malformed if the programs
    would drop it as unrewritable (nothing is ever half-rewritten)."""
    p = parse(frame)
    if p is None:
        raise ValueError("not a TCP/IPv4 frame the programs rewrite")
    # Options are loaded whole; without options, the checksum field is the
    # last byte written (a frame cut inside the base header is dropped).
    if len(frame) < p.l4 + (p.tcp_len if p.tcp_len > 20 else 18):
        raise Malformed("the TCP header runs past the frame")
    opts = frame[p.options]
    walked = walk_options(opts)
    for o in walked:
        if o.kind == OPT_SACK and o.length not in SACK_LENGTHS:
            raise Malformed(f"SACK option of length {o.length}")
    timestamps = [o for o in walked if o.kind == OPT_TS and o.length == 10]
    sacks = [o for o in walked if o.kind == OPT_SACK]

    l4 = p.l4
    seq, ack = _u32(frame, l4 + 4), _u32(frame, l4 + 8)
    window = struct.unpack_from("!H", frame, l4 + 14)[0]
    edges = [_u32(opts, o.offset + 2 + 4 * e) for o in sacks for e in range((o.length - 2) // 4)]
    fields = TcpFields(p.saddr, p.daddr, p.sport, p.dport, seq, ack, window,
                       sack=tuple(zip(edges[::2], edges[1::2])))
    out = translate_fields(fields, x, shift)

    new_opts = bytearray(opts)
    new_edges = iter(edge for block in out.sack for edge in block)
    for o in sacks:
        for e in range((o.length - 2) // 4):
            struct.pack_into("!I", new_opts, o.offset + 2 + 4 * e, next(new_edges))
    for o in timestamps:
        ts = translate_fields(TcpFields(p.saddr, p.daddr, p.sport, p.dport, 0, 0, 0,
                                        tsval=_u32(opts, o.offset + 2),
                                        tsecr=_u32(opts, o.offset + 6)), x)
        struct.pack_into("!II", new_opts, o.offset + 2, ts.tsval, ts.tsecr)

    buf = bytearray(frame)
    buf[26:30] = socket.inet_aton(out.saddr)
    buf[30:34] = socket.inet_aton(out.daddr)
    struct.pack_into("!HHII", buf, l4, out.sport, out.dport, out.seq, out.ack)
    struct.pack_into("!H", buf, l4 + 14, out.window)
    buf[p.options] = new_opts
    return _fix_checksums(frame, bytes(buf), p)


def _fix_checksums(old: bytes, new: bytearray | bytes, p: TcpFrame, *, force: bool = False
                   ) -> bytes:
    """Incremental IP and TCP checksum updates for changes confined to the
    addresses and the TCP header. The kernel skips the update of a field that
    does not change, so a checksum is only touched when something it covers
    changed (or ``force``: the programs updated it anyway). That matters for
    one input only: 0xFFFF, which any update turns into 0 (both are the
    checksum of the same bytes)."""
    buf = bytearray(new)
    if old[26:34] != buf[26:34]:
        ip_check = struct.unpack_from("!H", old, 24)[0]
        struct.pack_into("!H", buf, 24, csum_update(ip_check, old[26:34], bytes(buf[26:34])))

    def covered(frame: bytes | bytearray) -> bytes:
        header = bytearray(frame[p.l4:p.headers_end])
        header[16:18] = b"\0\0"
        return bytes(frame[26:34]) + bytes(header)

    before, after = covered(old), covered(buf)
    if before != after or force:
        tcp_check = struct.unpack_from("!H", old, p.l4 + 16)[0]
        struct.pack_into("!H", buf, p.l4 + 16, csum_update(tcp_check, before, after))
    return bytes(buf)


def set_macs(frame: bytes, dst: bytes, src: bytes) -> bytes:
    """The frame with the next hop's MACs (``fib.dmac``, ``fib.smac``)."""
    if len(dst) != 6 or len(src) != 6:
        raise ValueError("MAC addresses are 6 bytes")
    return dst + src + frame[12:]


def forward(frame: bytes, x: Translation, dst_mac: bytes, src_mac: bytes,
            shift: AckShift | None = None) -> tuple[int, bytes]:
    """(verdict, frame) of a packet of an ACTIVE entry whose next hop resolves
    to ``dst_mac`` from ``src_mac``: rewritten and redirected, or dropped
    unchanged when unrewritable."""
    try:
        return TC_ACT_REDIRECT, set_macs(translate(frame, x, shift), dst_mac, src_mac)
    except Malformed:
        return TC_ACT_SHOT, frame


# ------------------------------------------------------- SYN normalisation


def normalise_syn(frame: bytes, mss: int, sack_ok: bool, ts_ok: bool) -> tuple[bytes, bool]:
    """The router's SYN on a watched forwarding connection (router egress):
    every MSS option announces ``mss`` (0: left alone), SACK-permitted and
    timestamps the client did not negotiate become NOPs, checksum updated
    incrementally. Returns (frame, changed); ``changed`` is what the
    ``syn_rewrites`` counter counts (an MSS option rewritten to the same
    value counts). Frames that are not a pure SYN, or whose options are
    malformed, are returned unchanged."""
    p = parse(frame)
    if p is None or p.flags & (TCPF_SYN | TCPF_ACK) != TCPF_SYN:
        return frame, False
    if len(frame) < p.headers_end:
        return frame, False
    opts = bytearray(frame[p.options])
    try:
        walked = walk_options(bytes(opts))
    except Malformed:
        return frame, False
    changed = False
    for o in walked:
        at = o.offset
        if o.kind == OPT_MSS and o.length == 4 and mss:
            struct.pack_into("!H", opts, at + 2, mss)
            changed = True
        elif o.kind == OPT_SACK_PERM and o.length == 2 and not sack_ok:
            opts[at:at + 2] = bytes([OPT_NOP]) * 2
            changed = True
        elif o.kind == OPT_TS and o.length == 10 and not ts_ok:
            opts[at:at + 10] = bytes([OPT_NOP]) * 10
            changed = True
    if not changed:
        return frame, False
    buf = bytearray(frame)
    buf[p.options] = opts
    return _fix_checksums(frame, buf, p, force=True), True


# ------------------------------------------------------------------ mirroring


def trim_mirror(frame: bytes, rcv_nxt: int, request_end: int = 0) -> bytes:
    """A mirrored copy of a target packet at the router (watch entry handed
    off): everything after the TCP header is cut (payload and any Ethernet
    padding), seq becomes ``rcv_nxt``, an ack beyond ``request_end`` (the
    router's snd_nxt; 0: not known) becomes it, FIN and PSH are cleared, the
    IP total length is fixed (IP checksum incrementally), the TCP checksum is
    computed afresh. A RST is returned unchanged."""
    p = parse(frame)
    if p is None:
        raise ValueError("not a TCP/IPv4 frame the programs look at")
    if p.flags & TCPF_RST:
        return frame
    if len(frame) < p.headers_end:
        raise Malformed("the TCP header runs past the frame")
    buf = bytearray(frame[:p.headers_end])
    old_tot = bytes(buf[16:18])
    struct.pack_into("!H", buf, 16, p.headers_end - p.l3)
    ip_check = struct.unpack_from("!H", buf, 24)[0]
    struct.pack_into("!H", buf, 24, csum_update(ip_check, old_tot, bytes(buf[16:18])))
    l4 = p.l4
    struct.pack_into("!I", buf, l4 + 4, wrap(rcv_nxt))
    if request_end and seq_after(struct.unpack_from("!I", buf, l4 + 8)[0], request_end):
        struct.pack_into("!I", buf, l4 + 8, request_end)
    buf[l4 + 13] &= ~(TCPF_FIN | TCPF_PSH) & 0xFF
    buf[l4 + 16:l4 + 18] = b"\0\0"
    pseudo = bytes(buf[26:34]) + struct.pack("!BBH", 0, IPPROTO_TCP, p.tcp_len)
    struct.pack_into("!H", buf, l4 + 16, checksum(pseudo + bytes(buf[l4:])))
    return bytes(buf)


# ---------------------------------------------------------- entry lifecycle

SEQ_WINDOW_MAX = 1 << 30
"""The largest window TCP can announce (65535 << 14)."""


def syn_verdict(frame: bytes, syn_seq: int) -> int | None:
    """A SYN meeting an active entry (``end_on_syn`` in the header): None when
    the frame is no SYN; TC_ACT_SHOT for a late copy of the connection's own
    SYN (same seq); TC_ACT_OK for a new connection: the entry becomes ENDED
    (flag NEW_SYN) and the frame passes unchanged."""
    p = parse(frame)
    if p is None or not p.flags & TCPF_SYN:
        return None
    return TC_ACT_SHOT if _u32(frame, p.l4 + 4) == syn_seq else TC_ACT_OK


def client_window(frame: bytes, mark: int) -> tuple[bool, int]:
    """The router's check of a client segment against ``seq_next`` (MARK; 0:
    not learnt): (the segment can belong to the connection, the new mark).
    It can when its seq is within SEQ_WINDOW_MAX of the mark either way; the
    mark then moves to the segment's end if that is later (0 is stored as 1)."""
    p = parse(frame)
    if p is None:
        raise ValueError("not a TCP/IPv4 frame the programs look at")
    seq = _u32(frame, p.l4 + 4)
    if mark:
        distance = wrap(seq - mark)
        if SEQ_WINDOW_MAX < distance < MOD_32 - SEQ_WINDOW_MAX:
            return False, mark
    end = wrap(seq + p.payload_len + (1 if p.flags & TCPF_FIN else 0))
    if not mark or seq_after(end, mark):
        mark = end or 1
    return True, mark


def mirror_decision(frame: bytes, mirror_until: int, mirrored_ack: int) -> tuple[bool, int]:
    """Target egress with a mirror state: (clone this packet to the router,
    the new ``mirrored_ack``). A packet is cloned when its ack advances past
    ``mirrored_ack`` while the request is not yet all acknowledged, and every
    packet without payload is cloned (dupacks matter to the router)."""
    p = parse(frame)
    if p is None:
        raise ValueError("not a TCP/IPv4 frame the programs look at")
    ack = _u32(frame, p.l4 + 8)
    advances = seq_after(ack, mirrored_ack) and seq_after(mirror_until, mirrored_ack)
    if not advances and p.payload_len:
        return False, mirrored_ack
    return True, ack if advances else mirrored_ack


MIRROR_TAIL_ACKS = 8
MIRROR_TAIL_NS = 4 * 10**9
"""ARR_MIRROR_TAIL_* of arr_handoff.h (handoff/maps.py has them too)."""


@dataclass(frozen=True)
class Mirror:
    """struct mirror_state: what the target's mirror of one connection knows."""

    mirror_until: int
    mirrored_ack: int
    tail_acks: int = 0
    acked_ns: int = 0
    """When the request was all acknowledged (0: not yet)."""


def mirror_step(frame: bytes, m: Mirror, now_ns: int) -> tuple[bool, Mirror | None]:
    """Target egress with a mirror state: (clone this packet to the router, the
    state afterwards; None: the mirror is over and its state deleted).

    Until the request is all acknowledged, as :func:`mirror_decision`; the
    packet whose ack reaches ``mirror_until`` starts the tail (``acked_ns`` =
    now). In the tail only pure ACKs are cloned, at most MIRROR_TAIL_ACKS of
    them and only for MIRROR_TAIL_NS: the first pure ACK past either bound
    ends the mirror (not cloned). Timestamps are never 0 (0 is "not yet")."""
    p = parse(frame)
    if p is None:
        raise ValueError("not a TCP/IPv4 frame the programs look at")
    if m.acked_ns:
        if p.payload_len:
            return False, m
        if m.tail_acks >= MIRROR_TAIL_ACKS or now_ns - m.acked_ns > MIRROR_TAIL_NS:
            return False, None
        return True, Mirror(m.mirror_until, m.mirrored_ack, m.tail_acks + 1, m.acked_ns)
    clone, ack = mirror_decision(frame, m.mirror_until, m.mirrored_ack)
    acked_ns = m.acked_ns
    if ack != m.mirrored_ack and not seq_after(m.mirror_until, ack):
        acked_ns = now_ns | 1
    return clone, Mirror(m.mirror_until, ack, m.tail_acks, acked_ns)


EV_FIN, EV_RST, EV_NEW_SYN, EV_AFTER_FIN = 1, 2, 3, 4
"""enum arr_event_kind."""
ROUTER_EVENTS = frozenset({EV_RST})
TARGET_EVENTS = frozenset({EV_FIN, EV_RST, EV_AFTER_FIN})
"""What each program reports of the packets it rewrites (besides EV_NEW_SYN,
which both report when a SYN ends an entry)."""


def entry_event(frame: bytes, flags_before: int, reported: frozenset[int]) -> int | None:
    """The event a rewritten (non-SYN) packet reports, given the entry's flags
    before it (FLOW_F_FIN 1, FLOW_F_RST 2): the first RST; else, once the
    entry has a FIN, every packet (EV_AFTER_FIN); else the first FIN."""
    p = parse(frame)
    if p is None:
        raise ValueError("not a TCP/IPv4 frame the programs look at")
    if p.flags & TCPF_RST:
        kind = None if flags_before & 2 else EV_RST
    elif flags_before & 1:
        kind = EV_AFTER_FIN
    elif p.flags & TCPF_FIN:
        kind = EV_FIN
    else:
        kind = None
    return kind if kind in reported else None
