"""Segments the router sends on a handed-off connection's behalf (raw IPv4).

A handed-off connection has no socket at the router; to move it
(handoff/migrate.py) the router speaks for one of its ends twice:

* a *probe* to the client, from the router's address as the client knows it
  (the service's): an ACK one below what the client has received, which the
  client's TCP answers at once with an ACK of its own (RFC 793's answer to
  an old segment, as a keepalive probe gets): seq, ack, window and
  timestamps as they are now. That answer is the state a take-back the
  router starts rebuilds the client's socket from; or, when the ingress
  entry is gone already, it meets the router's stack, which answers it with
  a RST whose sequence number is the client's own ack: exact (RFC 5961).
* a *reset* to the old target, from the forwarding connection's address:
  its sequence number is where the client's stream stops, translated, which
  is the server's ``rcv_nxt`` once it has everything the client sent
  (the seed's spoofed ACK learns it; the router knows it).

And once for a socket it rebuilt: the *ACK* of the request a take-back
queued as the socket's received bytes, which the kernel does not send
(handoff/rebuild.py ``received_ack``).

Requests go out as crafted *data segments* twice: a request rerouted in
place (handoff/inplace.py), and a handed-off request the target has not
acknowledged in time, sent again from the forwarding socket's 4-tuple
(handoff/release.py ``RequestCopy``).

``tcp_segment`` is pure (tests/unit/test_craft.py); ``RawSender`` is the
socket.
"""

from __future__ import annotations

import socket
import struct

from handoff.packet import OPT_NOP, OPT_TS, checksum

TCP_ACK, TCP_RST, TCP_PSH = 0x10, 0x04, 0x08
_TIMESTAMPS = struct.Struct("!BBBBII")  # NOP NOP TS(kind, length, TSval, TSecr): Linux's own layout
IP_TTL = 64


def tcp_segment(src: tuple[str, int], dst: tuple[str, int], *, seq: int, ack: int, flags: int,
                window: int = 0, options: bytes = b"", payload: bytes = b"") -> bytes:
    """An IPv4 packet with a TCP header, OPTIONS (a multiple of 4 bytes) and
    PAYLOAD, both checksums computed. Probes and resets carry no options on
    purpose: a segment without timestamps skips the receiver's PAWS check
    (RFC 7323 5.3 lets a receiver drop it; Linux does not), and no TSval the
    router could invent would be right for both ends. A rerouted request
    (handoff/inplace.py) carries the client's, translated."""
    if len(options) % 4 or len(options) > 40:
        raise ValueError(f"TCP options of {len(options)} bytes")
    saddr, daddr = socket.inet_aton(src[0]), socket.inet_aton(dst[0])
    tcp = bytearray(struct.pack("!HHIIBBHHH", src[1], dst[1], seq & 0xFFFFFFFF, ack & 0xFFFFFFFF,
                                (5 + len(options) // 4) << 4, flags, window & 0xFFFF, 0, 0) + options + payload)
    pseudo = saddr + daddr + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(tcp))
    struct.pack_into("!H", tcp, 16, checksum(pseudo + bytes(tcp)))
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0x4000, IP_TTL,
                               socket.IPPROTO_TCP, 0, saddr, daddr))
    struct.pack_into("!H", ip, 10, checksum(bytes(ip)))
    return bytes(ip + tcp)


def probe(service: tuple[str, int], client: tuple[str, int], *, client_acked: int, client_next: int) -> bytes:
    """The router's probe to a handed-off client: seq one below what the
    client acknowledged (old, so it is answered, never accepted)."""
    return tcp_segment(service, client, seq=client_acked - 1, ack=client_next, flags=TCP_ACK)


def ack(source: tuple[str, int], destination: tuple[str, int], *, seq: int, ack: int, window: int,
        tsval: int | None = None, tsecr: int = 0) -> bytes:
    """A pure ACK, with timestamps when TSVAL is given: a rebuilt socket's
    own, which the kernel does not send (handoff/rebuild.py ``received_ack``)."""
    options = b"" if tsval is None else _TIMESTAMPS.pack(OPT_NOP, OPT_NOP, OPT_TS, 10,
                                                         tsval & 0xFFFFFFFF, tsecr & 0xFFFFFFFF)
    return tcp_segment(source, destination, seq=seq, ack=ack, flags=TCP_ACK, window=window, options=options)


def data_segments(source: tuple[str, int], destination: tuple[str, int], *, seq: int, ack: int, window: int,
                  payload: bytes, segment_size: int) -> list[bytes]:
    """PAYLOAD from SEQ in segments of at most SEGMENT_SIZE bytes, each an
    ACK of ACK announcing WINDOW (wire units), the last one with PSH, none
    with options (``tcp_segment`` says why)."""
    size = max(1, segment_size)
    frames = []
    for offset in range(0, len(payload), size):
        last = offset + size >= len(payload)
        frames.append(tcp_segment(source, destination, seq=seq + offset, ack=ack,
                                  flags=TCP_ACK | (TCP_PSH if last else 0), window=window,
                                  payload=payload[offset:offset + size]))
    return frames


def reset(source: tuple[str, int], destination: tuple[str, int], seq: int) -> bytes:
    """A RST at SEQ (the receiver's rcv_nxt for it to be exact)."""
    return tcp_segment(source, destination, seq=seq, ack=0, flags=TCP_RST)


class RawSender:
    """One raw socket (IP_HDRINCL) for every crafted segment: the kernel
    routes them like its own (tc egress, neighbours), and no socket of the
    router's stack owns their 4-tuples. Opened at first use: a router
    without CAP_NET_RAW runs, and only moving connections is refused
    (``ready`` says why)."""

    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self.error: str | None = None
        self.sent = 0
        self.failed = 0

    def ready(self) -> bool:
        if self.sock is None and self.error is None:
            try:
                self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
                self.sock.setblocking(False)
            except OSError as exc:
                self.error = f"no raw socket ({exc.strerror}: CAP_NET_RAW is needed to move connections)"
        return self.sock is not None

    def send(self, packet: bytes) -> bool:
        if not self.ready():
            self.failed += 1
            return False
        assert self.sock is not None
        destination = socket.inet_ntoa(packet[16:20])
        try:
            self.sock.sendto(packet, (destination, 0))
        except OSError:  # ENOBUFS and the like: the caller probes again, the agent ends the rest
            self.failed += 1
            return False
        self.sent += 1
        return True

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
