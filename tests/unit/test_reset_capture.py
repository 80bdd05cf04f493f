"""The reset classifier of the loss tests (arr/testbed/capture.py): which
connection a host's reset ended, from the handshakes and resets it sent."""

from __future__ import annotations

import socket
import struct

import pytest
from hypothesis import given, strategies as st

from arr.testbed.capture import ACK, FIN, PACKET_OUTGOING, RST, SYN, Segment, classify, parse

TARGET, ROUTER = ("10.0.0.11", 8080), ("10.0.0.1", 40001)


def sent(at: float, flags: int, seq: int, src=TARGET, dst=ROUTER, payload: int = 0) -> Segment:
    return Segment(at, True, src, dst, flags, seq, payload=payload)


def received(at: float, flags: int, seq: int) -> Segment:
    return Segment(at, False, ROUTER, TARGET, flags, seq)


def frame(src, dst, flags: int, seq: int) -> bytes:
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0, 64, 6, 0,
                     socket.inet_aton(src[0]), socket.inet_aton(dst[0]))
    tcp = struct.pack("!HHIIBBHHH", src[1], dst[1], seq, 0, 5 << 4, flags, 512, 0, 0)
    return b"\x00" * 12 + b"\x08\x00" + ip + tcp


def test_parse_reads_addresses_flags_and_direction():
    seg = parse(frame(TARGET, ROUTER, RST | ACK, 77), PACKET_OUTGOING, 1.5)
    assert seg == Segment(1.5, True, TARGET, ROUTER, RST | ACK, 77)
    assert parse(frame(TARGET, ROUTER, SYN, 1), 0, 0).sent is False
    assert parse(b"\x00" * 12 + b"\x86\xdd" + b"\x00" * 60, PACKET_OUTGOING, 0) is None  # IPv6


def test_a_reset_after_only_syn_and_fin_is_empty():
    isn = 1000
    verdicts = classify([sent(0, SYN | ACK, isn), sent(1, RST, isn + 2)])
    assert [v.empty for v in verdicts] == [True]


def test_a_reset_after_a_response_is_not_empty():
    isn = 1000
    verdicts = classify([sent(0, SYN | ACK, isn), sent(1, RST, isn + 1 + 512)])
    assert [v.empty for v in verdicts] == [False]


def test_a_reset_without_a_handshake_seen_is_not_empty():
    assert [v.empty for v in classify([sent(1, RST, 3)])] == [False]


def test_received_resets_are_not_this_hosts():
    assert classify([sent(0, SYN | ACK, 5), Segment(1, False, ROUTER, TARGET, RST, 6)]) == []


def test_the_latest_handshake_on_a_reused_four_tuple_counts():
    segs = [sent(0, SYN | ACK, 10), sent(5, SYN | ACK, 90_000), sent(6, RST, 90_002)]
    assert [v.empty for v in classify(segs)] == [True]


@given(isn=st.integers(0, (1 << 32) - 1), sent_bytes=st.integers(0, 1 << 20))
def test_sequence_numbers_wrap(isn: int, sent_bytes: int):
    rst_seq = (isn + 2 + sent_bytes) % (1 << 32)
    (verdict,) = classify([sent(0, SYN | ACK, isn), sent(1, RST, rst_seq)])
    assert verdict.empty == (sent_bytes == 0)


# ------------------------------------------------------------ closed on both sides

def test_a_reply_reset_after_both_fins_is_closed():
    """The crossing the module describes: the peer's FIN, our FIN (after a
    response), then a RST answering the peer's second ACK of our FIN."""
    isn = 1000
    segs = [sent(0, SYN | ACK, isn), received(1, FIN | ACK, 77), sent(2, FIN | ACK, isn + 1 + 512),
            sent(3, RST, isn + 1 + 512 + 1)]
    (verdict,) = classify(segs)
    assert (verdict.empty, verdict.closed) == (False, True)


def test_a_reply_to_the_peers_retransmitted_fin_after_both_fins_is_closed():
    """The crossing under loss (a health check's connection, router side):
    both FINs, the peer's ACK of ours ends our LAST_ACK, then the peer's
    retransmitted FIN, whose ack stops short of our FIN, draws a RST at our
    FIN's own seq."""
    isn = (1 << 32) - 300  # the FIN's seq wraps
    fin_seq = (isn + 1 + 512) % (1 << 32)
    segs = [sent(0, SYN, isn), received(1, FIN | ACK, 77), sent(2, FIN | ACK, fin_seq),
            sent(2.2, FIN | ACK, fin_seq), received(2.3, FIN | ACK, 77), sent(2.4, RST, fin_seq)]
    assert [(v.empty, v.closed) for v in classify(segs)] == [(False, True)]


def test_a_fin_with_payload_ends_past_its_payload():
    isn = 1000
    segs = [sent(0, SYN | ACK, isn), received(1, FIN | ACK, 77), sent(2, FIN | ACK | 0x08, isn + 1, payload=300),
            sent(3, RST, isn + 1 + 300 + 1)]
    assert [v.closed for v in classify(segs)] == [True]


@pytest.mark.parametrize("case", ["no-peer-fin", "abort-with-ack", "seq-elsewhere", "seq-before-the-fin", "no-own-fin",
                                  "peer-fin-of-an-older-connection"])
def test_a_reset_is_closed_only_after_both_fins_and_as_a_reply(case):
    isn = 1000
    fin_end = isn + 1 + 512 + 1
    segs = [sent(0, SYN | ACK, isn), received(1, FIN | ACK, 77), sent(2, FIN | ACK, isn + 1 + 512),
            sent(3, RST, fin_end)]
    if case == "no-peer-fin":
        del segs[1]
    elif case == "abort-with-ack":  # the agent destroying a socket (tcp_abort) sends RST|ACK
        segs[3] = sent(3, RST | ACK, fin_end)
    elif case == "seq-elsewhere":
        segs[3] = sent(3, RST, fin_end + 100)
    elif case == "seq-before-the-fin":  # the answered segment left bytes before our FIN unacknowledged
        segs[3] = sent(3, RST, fin_end - 2)
    elif case == "no-own-fin":
        del segs[2]
    elif case == "peer-fin-of-an-older-connection":
        segs.insert(2, received(1.5, SYN, 5000))  # a new connection on the 4-tuple
    assert [v.closed for v in classify(segs)] == [False]
