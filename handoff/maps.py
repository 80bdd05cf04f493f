"""The map layouts of handoff/bpf/arr_structs.h, field for field, in ctypes,
and the numbers of handoff/bpf/arr_consts.h userspace needs.

tests/unit/test_bpf_layout.py checks these sizes and offsets against the
BTF of the compiled objects, and the numbers against the headers, so the two
cannot drift apart silently.
"""

from __future__ import annotations

import ctypes
import functools
import socket
import struct
from dataclasses import dataclass

from handoff.translate import AckShift, Translation

FLOW_HOLD, FLOW_ACTIVE, FLOW_ENDED, FLOW_TAKEBACK = 1, 2, 3, 4
FLOW_F_FIN, FLOW_F_RST, FLOW_F_NEW_SYN, FLOW_F_SENT, FLOW_F_WANT_HEADER, FLOW_F_ACKED = 1, 2, 4, 8, 16, 32
DEFAULT_CAPACITY = 65536
"""ARR_DEFAULT_CAPACITY of the header: entries per connection map."""
WATCH_CONNECTING, WATCH_HANDED_OFF, WATCH_CLOSED = 1, 2, 3
WATCH_OPT_SACK, WATCH_OPT_TS, WATCH_OPT_WSCALE = 1, 2, 4

STAT_NAMES = ("rewritten", "held", "redirect_neigh", "fib_failed", "parse_skipped", "mirrored",
              "mirror_trimmed", "syn_normalised", "synack_recorded", "rewrite_failed",
              "dropped_after_close", "ended_by_syn", "stale_syn", "out_of_window", "passed_ended",
              "events_lost", "mirror_done", "captured", "capture_lost", "header_captured", "rerouted_resent")
EV_FIN, EV_RST, EV_NEW_SYN, EV_AFTER_FIN, EV_CAPTURE, EV_RESEND = 1, 2, 3, 4, 5, 6
"""enum arr_event_kind: what an event of the arr_events ring buffer reports."""
EVENTS_BYTES = 1024 * 1024
"""ARR_EVENTS_BYTES of the header: the ring buffer's size."""
CAPTURE_CHUNK = 2048
CAPTURE_CHUNKS = 32
"""ARR_CAPTURE_*: how a taken-back segment's payload reaches userspace."""
TCP_HEADER_MAX = 60
"""A TCP header's largest size, options included (a capture's ``tcp``)."""
MIRROR_TAIL_ACKS = 8
MIRROR_TAIL_NS = 4 * 10**9
"""ARR_MIRROR_TAIL_*: the mirror's tail once the request is acknowledged."""


def _ip(text: str) -> int:
    """An IPv4 address as the u32 the kernel stores (network order in memory)."""
    return struct.unpack("=I", socket.inet_aton(text))[0]


@functools.lru_cache(maxsize=4096)
def _ip_text(value: int) -> str:
    # Cached: every take-back spells the same few router and target addresses
    # many times over (FlowKey.src/dst, the plans, the control frames' keys).
    return socket.inet_ntoa(struct.pack("=I", value))


def _port(port: int) -> int:
    return socket.htons(port)


class FlowKey(ctypes.Structure):
    _fields_ = [("saddr", ctypes.c_uint32), ("daddr", ctypes.c_uint32),
                ("sport", ctypes.c_uint16), ("dport", ctypes.c_uint16)]

    @classmethod
    def of(cls, src: tuple[str, int], dst: tuple[str, int]) -> "FlowKey":
        return cls(_ip(src[0]), _ip(dst[0]), _port(src[1]), _port(dst[1]))

    @property
    def src(self) -> tuple[str, int]:
        return _ip_text(self.saddr), socket.ntohs(self.sport)

    @property
    def dst(self) -> tuple[str, int]:
        return _ip_text(self.daddr), socket.ntohs(self.dport)

    def reversed(self) -> "FlowKey":
        return FlowKey(self.daddr, self.saddr, self.dport, self.sport)

    def __repr__(self) -> str:
        return "FlowKey(%s:%d -> %s:%d)" % (*self.src, *self.dst)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FlowKey) and bytes(self) == bytes(other)

    def __hash__(self) -> int:
        return hash(bytes(self))


class Xlate(ctypes.Structure):
    _fields_ = [("saddr", ctypes.c_uint32), ("daddr", ctypes.c_uint32),
                ("sport", ctypes.c_uint16), ("dport", ctypes.c_uint16),
                ("seq_delta", ctypes.c_uint32), ("ack_delta", ctypes.c_uint32),
                ("tsval_delta", ctypes.c_uint32), ("tsecr_delta", ctypes.c_uint32),
                ("wscale_in", ctypes.c_uint8), ("wscale_out", ctypes.c_uint8),
                ("pad", ctypes.c_uint8 * 2), ("tsecr_floor", ctypes.c_uint32)]

    @classmethod
    def of(cls, t: Translation) -> "Xlate":
        return cls(_ip(t.saddr), _ip(t.daddr), _port(t.sport), _port(t.dport),
                   t.seq_delta, t.ack_delta, t.tsval_delta, t.tsecr_delta, t.wscale_in, t.wscale_out,
                   (ctypes.c_uint8 * 2)(), t.tsecr_floor)

    def translation(self) -> Translation:
        return Translation(_ip_text(self.saddr), _ip_text(self.daddr), socket.ntohs(self.sport),
                           socket.ntohs(self.dport), self.seq_delta, self.ack_delta,
                           self.tsval_delta, self.tsecr_delta, self.wscale_in, self.wscale_out,
                           self.tsecr_floor)


class AckShiftState(ctypes.Structure):
    """struct ack_shift: a target egress entry's ack history (translate.AckShift)."""

    _fields_ = [("start", ctypes.c_uint32), ("end", ctypes.c_uint32), ("prev_delta", ctypes.c_uint32),
                ("active", ctypes.c_uint32)]

    @classmethod
    def of(cls, shift: AckShift) -> "AckShiftState":
        return cls(shift.start, shift.end, shift.prev_delta, 1)

    def model(self) -> AckShift | None:
        return AckShift(self.start, self.end, self.prev_delta) if self.active else None


class FlowEntry(ctypes.Structure):
    _fields_ = [("x", Xlate), ("state", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("syn_seq", ctypes.c_uint32), ("seq_next", ctypes.c_uint32),
                ("packets", ctypes.c_uint64), ("bytes", ctypes.c_uint64),
                ("last_seen_ns", ctypes.c_uint64), ("created_ns", ctypes.c_uint64),
                ("errors", ctypes.c_uint64), ("conn_id", ctypes.c_uint64),
                ("take_from", ctypes.c_uint32), ("peer_ack", ctypes.c_uint32), ("snd_max", ctypes.c_uint32),
                ("peer_window", ctypes.c_uint16), ("client_mss", ctypes.c_uint16),
                ("router_wscale", ctypes.c_uint8), ("client_opts", ctypes.c_uint8),
                ("requests", ctypes.c_uint16), ("shift", AckShiftState)]


class MirrorState(ctypes.Structure):
    _fields_ = [("mirror_until", ctypes.c_uint32), ("mirrored_ack", ctypes.c_uint32),
                ("tail_acks", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("acked_ns", ctypes.c_uint64)]


HEAD_BYTES = 512
"""ARR_HEAD_BYTES: bytes of a response's start the target program keeps."""


TAIL_BYTES = 8
"""ARR_TAIL_BYTES: the last bytes sent of a response the target program keeps."""


class ResponseHead(ctypes.Structure):
    """struct response_head: the start of the server's latest response, and
    the last bytes it has sent of it."""
    _fields_ = [("seq", ctypes.c_uint32), ("len", ctypes.c_uint16), ("tail_len", ctypes.c_uint16),
                ("tail_end", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("tail", ctypes.c_uint64),
                ("bytes", ctypes.c_uint8 * HEAD_BYTES)]

    def head(self) -> bytes:
        return bytes(self.bytes)[:min(self.len, HEAD_BYTES)]

    def tail_bytes(self) -> bytes:
        """The bytes just before ``tail_end``, oldest first."""
        return self.tail.to_bytes(TAIL_BYTES, "big")[TAIL_BYTES - min(self.tail_len, TAIL_BYTES):]


class WatchEntry(ctypes.Structure):
    _fields_ = [("state", ctypes.c_uint32), ("client_mss", ctypes.c_uint16),
                ("client_sack", ctypes.c_uint8), ("client_ts", ctypes.c_uint8),
                ("target_tsval", ctypes.c_uint32), ("rcv_nxt", ctypes.c_uint32),
                ("synack_mss", ctypes.c_uint16), ("synack_wscale", ctypes.c_uint8),
                ("synack_opts", ctypes.c_uint8), ("synacks", ctypes.c_uint32),
                ("mirrored", ctypes.c_uint64), ("syn_rewrites", ctypes.c_uint64),
                ("closed_ns", ctypes.c_uint64), ("conn_id", ctypes.c_uint64),
                ("client", FlowKey), ("target_fin_ack", ctypes.c_uint32), ("request_end", ctypes.c_uint32)]


class Event(ctypes.Structure):
    """struct arr_event: one record of the arr_events ring buffer."""

    _fields_ = [("key", FlowKey), ("kind", ctypes.c_uint32), ("conn_id", ctypes.c_uint64)]


class Capture(ctypes.Structure):
    """struct arr_capture: a piece of a client segment taken back (EV_CAPTURE)."""

    _fields_ = [("key", FlowKey), ("kind", ctypes.c_uint32), ("conn_id", ctypes.c_uint64),
                ("offset", ctypes.c_uint32), ("len", ctypes.c_uint16), ("tcp_len", ctypes.c_uint16),
                ("tcp", ctypes.c_uint8 * TCP_HEADER_MAX), ("data", ctypes.c_uint8 * CAPTURE_CHUNK)]

    # string_at copies only the bytes used (bytes() of the array would copy all of it first).
    @property
    def header(self) -> bytes:
        """The segment's TCP header, options included."""
        return ctypes.string_at(ctypes.addressof(self.tcp), min(self.tcp_len, TCP_HEADER_MAX))

    @property
    def payload(self) -> bytes:
        return ctypes.string_at(ctypes.addressof(self.data), min(self.len, CAPTURE_CHUNK))


class StatIndex(ctypes.Structure):
    _fields_ = [("index", ctypes.c_uint32)]


@dataclass(frozen=True)
class FlowSummary:
    """A flow entry as ``arr conns`` and the GC see it."""

    key: tuple[tuple[str, int], tuple[str, int]]
    to: tuple[tuple[str, int], tuple[str, int]]
    state: str
    flags: tuple[str, ...]
    packets: int
    bytes: int
    idle_s: float | None
    errors: int

    @classmethod
    def of(cls, key: FlowKey, entry: FlowEntry, now_ns: int) -> "FlowSummary":
        x = entry.x.translation()
        flags = tuple(name for bit, name in ((FLOW_F_FIN, "fin"), (FLOW_F_RST, "rst"),
                                             (FLOW_F_NEW_SYN, "new-syn"))
                      if entry.flags & bit)
        last = entry.last_seen_ns or entry.created_ns
        return cls(key=(key.src, key.dst), to=((x.saddr, x.sport), (x.daddr, x.dport)),
                   state={FLOW_HOLD: "hold", FLOW_ACTIVE: "active", FLOW_ENDED: "ended",
                          FLOW_TAKEBACK: "takeback"}.get(entry.state, str(entry.state)),
                   flags=flags, packets=entry.packets, bytes=entry.bytes,
                   idle_s=(now_ns - last) / 1e9 if last else None, errors=entry.errors)
