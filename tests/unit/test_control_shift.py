"""SHIFT on the control channel (handoff/control/frames.py) and the agent's
verdict on one (handoff/agent.py ``shift_refusal``; the agent's update of a
real egress map and what the program then does: tests/bpf/test_shift_bpf.py)."""

from __future__ import annotations

import struct

import pytest

from handoff.agent import _take_back_verdict, shift_refusal
from handoff.control import TAKEN_OK, TAKEN_UNACKED, ControlConnection, ControlError, FlowKey, MessageType, Shift
from handoff.control.frames import _Malformed, decode_payload, encode_frame, encode_payload
from handoff.maps import FLOW_ACTIVE, FLOW_F_ACKED, FLOW_F_FIN, FLOW_F_RST, FLOW_F_SENT, FLOW_HOLD, AckShiftState, FlowEntry
from handoff.translate import AckShift

PSK = bytes(range(32))
KEY = FlowKey(saddr="10.0.0.9", daddr="192.168.1.7", sport=8080, dport=51234)
SHIFTS = [Shift(conn_id=7, key=KEY, start=1000, end=1300, delta=0xFFFFFFFF, acked=5000),
          Shift(conn_id=(1 << 64) - 1, key=KEY, start=0xFFFFFF00, end=0x10, delta=0, acked=0xFFFFFFFF,
                answers_head=True)]


def pair() -> tuple[ControlConnection, ControlConnection]:
    client = ControlConnection("client", PSK, "router-1")
    server = ControlConnection("server", PSK, "agent-1")
    server.receive_data(client.start())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    return client, server


def reason_of(conn: ControlConnection, data: bytes) -> str:
    with pytest.raises(ControlError) as info:
        conn.receive_data(data)
    return info.value.reason


@pytest.mark.parametrize("message", SHIFTS, ids=repr)
def test_round_trip_through_a_connection(message):
    mtype, payload = encode_payload(message)
    assert mtype is MessageType.SHIFT and decode_payload(mtype, payload) == message
    client, server = pair()
    assert server.receive_data(client.send(message)) == [message]


def test_wire_layout():
    _, payload = encode_payload(Shift(conn_id=0x0102030405060708, key=KEY, start=1, end=2, delta=3, acked=4))
    assert payload == (bytes.fromhex("0102030405060708") + bytes([10, 0, 0, 9, 192, 168, 1, 7])
                       + struct.pack(">HHIIIIB", 8080, 51234, 1, 2, 3, 4, 0))


@pytest.mark.parametrize("change", ["truncate", "extend", "empty request", "unknown flag"])
def test_malformed_shift_is_refused_and_named(change):
    mtype, payload = encode_payload(SHIFTS[0])
    if change == "truncate":
        payload = payload[:-1]
    elif change == "extend":
        payload += b"\0"
    elif change == "unknown flag":
        payload = payload[:-1] + b"\x02"
        with pytest.raises(_Malformed, match="SHIFT flags"):
            decode_payload(mtype, payload)
    else:
        payload = payload[:-17] + struct.pack(">IIIIB", 5, 5, 0, 0, 0)
        with pytest.raises(_Malformed, match="empty"):
            decode_payload(mtype, payload)
    client, server = pair()
    assert reason_of(server, encode_frame(mtype, 1, payload, server._recv_key)) == "malformed"


def test_forged_shift_fails_the_mac():
    client, server = pair()
    frame = bytearray(client.send(SHIFTS[0]))
    frame[-40] ^= 1  # a bit of the payload: the MAC no longer matches
    assert reason_of(server, bytes(frame)) == "bad-mac"


def test_shift_is_the_routers():
    client, server = pair()
    with pytest.raises(ValueError, match="only a client"):
        server.send(SHIFTS[0])
    mtype, payload = encode_payload(SHIFTS[0])
    assert reason_of(client, encode_frame(mtype, 1, payload, client._recv_key)) == "unknown-type"


def test_values_that_do_not_fit_are_refused_on_send():
    client, _ = pair()
    with pytest.raises(ValueError):
        client.send(Shift(conn_id=1, key=KEY, start=0, end=1 << 32, delta=0, acked=0))


# ------------------------------------------------------------------ the agent's verdict


def entry(peer_ack: int = 1000, flags: int = FLOW_F_SENT | FLOW_F_ACKED, **fields) -> FlowEntry:
    """An egress entry whose server has acknowledged up to PEER_ACK and sent
    up to 5000 (what SHIFTS[0] says the client acknowledged)."""
    values = dict(state=FLOW_ACTIVE, flags=flags, peer_ack=peer_ack, snd_max=5000, conn_id=7)
    return FlowEntry(**(values | fields))


def test_shift_at_the_servers_ack_is_accepted():
    assert shift_refusal(entry(), SHIFTS[0]) is None


@pytest.mark.parametrize("found, reason", [
    (None, "unknown"),
    (entry(conn_id=8), "unknown"),
    (entry(state=FLOW_HOLD), "not-active"),
    (entry(flags=FLOW_F_SENT | FLOW_F_ACKED | FLOW_F_FIN), "closed"),
    (entry(flags=FLOW_F_SENT | FLOW_F_ACKED | FLOW_F_RST), "closed"),
    (entry(flags=FLOW_F_SENT), "unacked"),   # the server's ack not seen yet
    (entry(peer_ack=900), "unacked"),        # the previous request still on its way
    (entry(peer_ack=1100), "unacked"),       # the router's view is out of date
    (entry(snd_max=5100), "responding"),     # the client has not all of the last response yet
    (entry(flags=FLOW_F_ACKED), "responding"),  # the server's snd_max not known
])
def test_shift_refusals(found, reason):
    assert shift_refusal(found, SHIFTS[0]) == reason


def test_takeback_waits_while_a_shifted_request_is_unacknowledged():
    # R' is [1000, 1300) of the server's stream; the client acknowledged the response (5000).
    shifted = entry(snd_max=5000, peer_ack=1000, shift=AckShiftState.of(AckShift(1000, 1300, 4)))
    assert _take_back_verdict(shifted, 5000, 1300) == TAKEN_UNACKED  # the server lacks R'
    shifted.peer_ack = 1300
    assert _take_back_verdict(shifted, 5000, 1300) == TAKEN_OK  # it has all of it
    shifted.peer_ack = 1000
    # The router never sent R' (its SHIFT timed out): its stream ends where the shift starts.
    assert _take_back_verdict(shifted, 5000, 1000) == TAKEN_OK
    # The program ends the history once the server has acknowledged all of R'
    # (handoff/bpf/target.bpf.c): then its ack alone decides.
    shifted.shift.active = 0
    shifted.peer_ack = 1300
    assert _take_back_verdict(shifted, 5000, 1300) == TAKEN_OK
    shifted.peer_ack = 1000  # the server lacks the end of the stream all the same
    assert _take_back_verdict(shifted, 5000, 1300) == TAKEN_UNACKED
