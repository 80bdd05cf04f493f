"""Which connections a host's resets ended: a capture of handshakes, FINs and resets.

The loss tests count ``TcpOutRsts`` per host (arr/testbed/loss.py), which
cannot say *whose* connection a reset ended. A reset that ends a connection
that carried a client's request is a defect. Two kinds harm no one, and the
tests report them apart:

* *empty*: one the target sends on a forwarding connection that never carried
  a byte either way (the router's forward pool, handoff/forward_pool.py,
  closes unused connections every ``MAX_AGE``);
* *closed*: one a host sends after both sides of the connection closed. When
  the host's ACK and FIN cross from two CPUs, the veth pair can deliver the
  FIN first: the peer goes to TIME_WAIT on it, and the ACK that arrives after
  is out of window for TIME_WAIT, which answers it with an ACK (RFC 793);
  by then the host's socket has gone (LAST_ACK ended on the peer's first
  ACK), so that second ACK draws a RST. Every byte of both sides was
  delivered and acknowledged; the RST ends a TIME_WAIT. Seen on forward-pool
  connections (both ends' captures); nothing in it is particular to them.
  Loss makes a second crossing: both FINs cross, one is lost, both are
  retransmitted; the peer's ACK of the host's FIN ends the host's LAST_ACK
  before the peer's retransmitted FIN arrives, and that FIN (its ack just
  short of the host's FIN) draws a RST. Seen on a health check's connection
  under 2% loss (router and target captures).

``ResetCapture`` runs this module in a host's namespace: an AF_PACKET socket
whose classic BPF filter passes only TCP segments with SYN, FIN or RST set (a
few per connection, whatever the transfer), written as JSON lines.
``classify`` is the pure part: for each reset the host sent, the SYN-ACK or
SYN it sent earlier on the 4-tuple gives its initial sequence number, and a
reset whose sequence number is at most ISN + 2 (SYN and FIN) followed a
connection on which this host sent no payload; a reset that answers a
segment acknowledging all the host sent before its FIN, or the FIN too (no
ACK flag, its sequence number at that FIN or just past it), after the host
received the peer's FIN, followed a connection both sides had closed.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
SO_ATTACH_FILTER = 26
FIN, SYN, RST, ACK = 0x01, 0x02, 0x04, 0x10
SEQ_MOD = 1 << 32
EMPTY_CONNECTION_SPAN = 2
"""A connection on which a host sent only SYN and FIN has used 2 sequence numbers."""
EVERY_SEGMENT_ENV = "ARR_CAPTURE_EVERY_SEGMENT"
"""Set to a directory to capture every TCP segment, not only SYNs and resets,
and keep the capture files there (``<host>-<n>.jsonl``): to read what led to
a reset that a test could not explain."""


def _filter_program(every_segment: bool = False) -> bytes:
    """cBPF: IPv4 TCP with SYN, FIN or RST (Ethernet framing), else drop;
    with EVERY_SEGMENT, all IPv4 TCP (for reading what led to a reset)."""
    flags_mask = 0xFF if every_segment else SYN | FIN | RST
    ins = [
        (0x28, 0, 0, 12),            # ldh [12]            ethertype
        (0x15, 0, 6, 0x0800),        # jeq IPv4 else drop
        (0x30, 0, 0, 23),            # ldb [23]            protocol
        (0x15, 0, 4, 6),             # jeq TCP else drop
        (0xB1, 0, 0, 14),            # ldxb 4*([14]&0xf)   IP header length
        (0x50, 0, 0, 14 + 13),       # ldb [x+27]          TCP flags
        (0x45, 0, 1, flags_mask),    # jset SYN|FIN|RST else drop
        (0x06, 0, 0, 0x40000),       # ret whole packet
        (0x06, 0, 0, 0),             # ret 0 (drop)
    ]
    return b"".join(struct.pack("HBBI", *i) for i in ins)


@dataclass(frozen=True)
class Segment:
    at: float
    sent: bool
    """Sent by this host (PACKET_OUTGOING), not received."""
    src: tuple[str, int]
    dst: tuple[str, int]
    flags: int
    seq: int
    ack: int = 0
    payload: int = 0
    """TCP payload bytes (0 when the frame was cut short)."""


def parse(frame: bytes, pkttype: int, at: float) -> Segment | None:
    if len(frame) < 14 + 20 or frame[12:14] != b"\x08\x00" or frame[14 + 9] != 6:
        return None
    ihl = (frame[14] & 0x0F) * 4
    tcp = frame[14 + ihl:]
    if len(tcp) < 14:
        return None
    sport, dport, seq, ack = struct.unpack("!HHII", tcp[:12])
    total = struct.unpack("!H", frame[16:18])[0]
    payload = max(0, total - ihl - (tcp[12] >> 4) * 4)
    return Segment(at, pkttype == PACKET_OUTGOING, (socket.inet_ntoa(frame[26:30]), sport),
                   (socket.inet_ntoa(frame[30:34]), dport), tcp[13], seq, ack, payload)


@dataclass(frozen=True)
class ResetVerdict:
    reset: Segment
    empty: bool
    """The host had sent nothing but SYN (and FIN) on the connection it reset."""
    closed: bool = False
    """Both sides had closed: the reset answers a segment that acknowledged
    everything up to the host's FIN or past it (its seq is the FIN's or just
    past it, no ACK flag), and the host had received the peer's FIN."""


def classify(segments: Iterable[Segment]) -> list[ResetVerdict]:
    """Each reset this host sent, with whether its connection was empty on
    this host's side, or closed on both. A reset with no handshake of ours
    before it on its 4-tuple counts as not empty (the safe side)."""
    isn: dict[tuple, int] = {}
    fin_end: dict[tuple, int] = {}
    """Per 4-tuple (ours first): the seq just past the FIN we sent."""
    peer_fin: set[tuple] = set()
    verdicts = []
    for seg in sorted(segments, key=lambda s: s.at):
        key = (seg.src, seg.dst) if seg.sent else (seg.dst, seg.src)
        if not seg.sent:
            if seg.flags & SYN:
                peer_fin.discard(key)
            elif seg.flags & FIN:
                peer_fin.add(key)
            continue
        if seg.flags & SYN:
            isn[key] = seg.seq
            fin_end.pop(key, None)
        elif seg.flags & RST:
            start = isn.get(key)
            span = (seg.seq - start) % SEQ_MOD if start is not None else None
            # A reply (no ACK flag) takes its seq from the segment it answers:
            # that segment acknowledged our FIN, or all before it (the peer's
            # retransmitted FIN). An abort's RST carries ACK.
            end = fin_end.get(key)
            closed = not seg.flags & ACK and key in peer_fin and end is not None \
                and (end - seg.seq) % SEQ_MOD <= 1
            verdicts.append(ResetVerdict(seg, span is not None and span <= EMPTY_CONNECTION_SPAN, closed))
        elif seg.flags & FIN:
            fin_end[key] = (seg.seq + seg.payload + 1) % SEQ_MOD
    return verdicts


def read(path: Path) -> list[Segment]:
    segments = []
    for line in path.read_text().splitlines():
        d = json.loads(line)
        segments.append(Segment(d["at"], d["sent"], tuple(d["src"]), tuple(d["dst"]), d["flags"], d["seq"],
                                d.get("ack", 0), d.get("payload", 0)))
    return segments


class ResetCapture:
    """The capture running in HOSTS' namespaces for the length of a ``with``."""

    def __init__(self, cluster, hosts) -> None:
        self.cluster = cluster
        self.hosts = list(hosts)
        self.procs: dict[str, object] = {}
        self.paths = {h.name: cluster.workdir / f"capture-{h.name}.jsonl" for h in self.hosts}

    def __enter__(self) -> "ResetCapture":
        for host in self.hosts:
            self.procs[host.name] = self.cluster.popen(
                host, [sys.executable, "-m", "arr.testbed.capture", str(self.paths[host.name]),
                       *(["--every-segment"] if os.environ.get(EVERY_SEGMENT_ENV) else [])],
                stdout=None, stderr=None)
        deadline = time.monotonic() + 10
        while not all(p.exists() for p in self.paths.values()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"capture did not start: {self.paths}")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        for proc in self.procs.values():
            self.cluster.stop_process(proc)
        if self.procs and os.environ.get(EVERY_SEGMENT_ENV):
            keep = Path(os.environ[EVERY_SEGMENT_ENV])
            keep.mkdir(parents=True, exist_ok=True)
            n = len(list(keep.iterdir()))
            for name, path in self.paths.items():
                shutil.copy(path, keep / f"{name}-{n}.jsonl")
        self.procs.clear()

    def resets(self) -> dict[str, list[ResetVerdict]]:
        """{host: its resets, classified}; call after ``stop``."""
        return {name: classify(read(path)) for name, path in self.paths.items()}

    def received_resets(self) -> dict[str, list[Segment]]:
        """{host: the resets it received}; call after ``stop``."""
        return {name: [s for s in read(path) if not s.sent and s.flags & RST] for name, path in self.paths.items()}


def capture(out: Path, every_segment: bool = False) -> None:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    program = _filter_program(every_segment)
    import ctypes
    buf = ctypes.create_string_buffer(program)
    fprog = struct.pack("HL", len(program) // 8, ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
    sock.settimeout(0.1)
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    with out.open("w", buffering=1) as f:
        while not stopping:
            try:
                frame, addr = sock.recvfrom(128)
            except socket.timeout:
                continue
            seg = parse(frame, addr[2], time.monotonic())
            if seg is not None:
                f.write(json.dumps({"at": seg.at, "sent": seg.sent, "src": seg.src, "dst": seg.dst,
                                    "flags": seg.flags, "seq": seg.seq, "ack": seg.ack,
                                    "payload": seg.payload}) + "\n")


if __name__ == "__main__":
    capture(Path(sys.argv[1]), every_segment="--every-segment" in sys.argv[2:])
