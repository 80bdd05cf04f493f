"""The pure parts of a re-handoff in place (handoff/inplace.py): where the
rewritten request goes, the ingress entry after it, the crafted segments."""

from __future__ import annotations

import socket
import struct

import pytest
from hypothesis import given, strategies as st
from scapy.layers.inet import IP, TCP

from handoff.inplace import connection_stands, frames_to_resend, moved_on, plan_in_place, request_segments
from handoff.maps import (FLOW_ACTIVE, FLOW_ENDED, FLOW_F_FIN, FLOW_F_NEW_SYN, FLOW_F_RST, FLOW_F_WANT_HEADER, FLOW_TAKEBACK,
                          WATCH_OPT_TS, FlowEntry, Xlate)
from handoff.takeback import Segment
from handoff.translate import MOD, AckShift, Translation, rescale_window, shift_edge, wrap

u32 = st.integers(0, MOD - 1)
lengths = st.integers(1, 64 * 1024)
TO_TARGET = Translation(saddr="10.0.0.1", daddr="10.0.0.11", sport=50123, dport=8080, seq_delta=MOD - 1000,
                        ack_delta=123456, tsval_delta=777, tsecr_delta=5, wscale_in=7, wscale_out=9)


def entry(take_from: int, seq_delta: int = TO_TARGET.seq_delta, **fields) -> FlowEntry:
    x = Xlate.of(TO_TARGET)
    x.seq_delta = seq_delta
    return FlowEntry(**({"x": x, "state": FLOW_TAKEBACK, "take_from": take_from, "conn_id": 9, "requests": 3}
                        | fields))


@given(take_from=u32, delta=u32, r=lengths, r2=lengths)
def test_the_plan_joins_both_sequence_spaces(take_from, delta, r, r2):
    plan = plan_in_place(entry(take_from, delta), r, r2)
    assert plan.request_from == take_from and plan.take_from == wrap(take_from + r)
    assert plan.start == wrap(take_from + delta)  # where the server's stream stops now
    assert plan.end == wrap(plan.start + r2)
    # The client's next byte lands right after R' ...
    assert wrap(plan.take_from + plan.seq_delta) == plan.end
    # ... and the agent's shift (old delta up to R', the new one after it)
    # tells the client of R exactly when the server has all of R'.
    shift = AckShift(plan.start, plan.end, delta)
    assert shift_edge(plan.start, plan.seq_delta, shift) == take_from
    assert shift_edge(wrap(plan.end - 1), plan.seq_delta, shift) == take_from
    assert shift_edge(plan.end, plan.seq_delta, shift) == plan.take_from


def test_moved_on_reopens_the_entry_with_the_request_region():
    e = entry(5000, 100, flags=FLOW_F_WANT_HEADER | FLOW_F_RST, peer_ack=42)
    plan = plan_in_place(e, 300, 350)
    after = moved_on(e, plan)
    assert (after.state, after.take_from, after.x.seq_delta) == (FLOW_ACTIVE, 5300, 150)
    assert after.flags == FLOW_F_RST  # only the header request is over
    assert after.shift.model() == AckShift(5000, 5300, 100)  # R, in the client's space
    assert (after.requests, after.peer_ack) == (4, 42)
    assert moved_on(entry(0, requests=0xFFFF), plan).requests == 0xFFFF


def parsed(frame: bytes) -> IP:
    ip = IP(frame)
    # scapy recomputes both checksums of a copy with them cleared: they must match
    fresh = IP(frame)
    del fresh.chksum, fresh[TCP].chksum
    fresh = IP(bytes(fresh))
    assert (ip.chksum, ip[TCP].chksum) == (fresh.chksum, fresh[TCP].chksum)
    return ip


def test_segments_carry_the_rewritten_request_as_the_client_would_have():
    e = entry(wrap(-100), client_opts=WATCH_OPT_TS)
    rewritten = bytes(range(256)) * 13  # 3,328 bytes: three segments of at most 1,460
    plan = plan_in_place(e, 3000, len(rewritten))
    latest = Segment(seq=wrap(-100), ack=900_000, window=500, tsval=1234, tsecr=99)
    frames = request_segments(e, plan, rewritten, latest)
    packets = [parsed(f) for f in frames]
    # The first segment last: the server reads nothing before it has all.
    assert [len(p[TCP].payload) for p in packets] == [1460, 408, 1460]
    assert b"".join(bytes(p[TCP].payload) for p in packets[-1:] + packets[:-1]) == rewritten
    assert [p[TCP].seq for p in packets] == [wrap(plan.start + 1460), wrap(plan.start + 2920), plan.start]
    for i, p in enumerate(packets):
        assert (p.src, p.dst, p[TCP].sport, p[TCP].dport) == ("10.0.0.1", "10.0.0.11", 50123, 8080)
        assert p[TCP].ack == wrap(900_000 - TO_TARGET.ack_delta)  # the client's ack, in the server's space
        assert p[TCP].window == rescale_window(500, 7, 9)
        assert p[TCP].options == []  # no timestamps: PAWS (request_segments says why)
        assert p[TCP].flags == ("PA" if i == 1 else "A")  # PSH on the request's last byte
        assert p.flags == "DF"


@given(size=st.integers(1, 5000), segment=st.integers(1, 1460))
def test_segments_cover_the_request_once_the_first_last(size, segment):
    e = entry(1000)
    rewritten = struct.pack("!I", size) * (size // 4) + b"x" * (size % 4)
    plan = plan_in_place(e, 10, size)
    frames = request_segments(e, plan, rewritten, Segment(1000, 1, 1, None, None), segment)
    seqs = [struct.unpack_from("!I", frame, 24)[0] for frame in frames]
    assert seqs[-1] == plan.start  # the head last, the rest in order before it
    at = plan.start
    data = b""
    for seq, frame in zip(seqs[-1:] + seqs[:-1], frames[-1:] + frames[:-1]):
        assert seq == at and socket.inet_ntoa(frame[16:20]) == "10.0.0.11"
        payload = frame[40:]
        assert 0 < len(payload) <= segment
        data += payload
        at = wrap(at + len(payload))
    assert data == rewritten and at == plan.end


def test_a_copy_leaves_out_what_an_answering_server_has():
    """frames_to_resend: until the server answered, every segment; after, a
    one-segment request needs none, a longer one all but its head (the last
    in sending order)."""
    frames = [b"second", b"third", b"head"]
    assert frames_to_resend(frames, answered=False) == frames
    assert frames_to_resend(frames, answered=True) == [b"second", b"third"]
    assert frames_to_resend([b"head"], answered=False) == [b"head"]
    assert frames_to_resend([b"head"], answered=True) == []


@pytest.mark.parametrize("state, flags, conn_id, stands", [
    (FLOW_ACTIVE, 0, 7, True),
    (FLOW_TAKEBACK, 0, 7, True),       # the next request's take-back waits for the server's ACK of this one
    (FLOW_ACTIVE, FLOW_F_FIN, 7, True),  # the server still reads the request before the close
    (FLOW_ENDED, FLOW_F_NEW_SYN, 7, False),  # a new connection on the 4-tuple
    (FLOW_ACTIVE, FLOW_F_RST, 7, False),
    (FLOW_ACTIVE, 0, 8, False),        # another connection's entry
])
def test_a_copy_goes_only_to_a_connection_that_stands(state, flags, conn_id, stands):
    entry = FlowEntry(state=state, flags=flags, conn_id=7)
    assert connection_stands(entry, conn_id) is stands
    assert connection_stands(None, 7) is False
