"""The control protocol without I/O: framing, authentication, replay, codecs, the key file."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from handoff.control import (
    MAX_FRAME, MAX_HOLDING_KEYS, Ack, Closed, ControlConnection, ControlError, FlowKey, HandoffRequest,
    Hello, Holding, MessageType, Nack, Ping, Release, SeenNonces, StopMirror, load_psk,
)
from handoff.control.frames import (MAX_HANDSHAKE_FRAME, Challenge, Established, Proof, SessionKeys, decode_payload,
                                    encode_frame, encode_payload, hello_key, transcript_hash)
from handoff.translate import Translation

PSK = bytes(range(32))
KEY = FlowKey(saddr="10.0.0.2", daddr="192.168.1.7", sport=40000, dport=80)
XLATE = Translation(saddr="192.168.1.7", daddr="10.0.0.9", sport=80, dport=51234, seq_delta=0xFFFFFFFF,
                    ack_delta=12345, tsval_delta=1 << 20, tsecr_delta=0, wscale_in=7, wscale_out=14)
HANDOFF = HandoffRequest(conn_id=(1 << 64) - 1, key=KEY, translation=XLATE, mirror_from=1000, mirror_until=5000,
                         syn_seq=0xFFFFFFFF)
OTHER_KEY = FlowKey(saddr="10.0.0.3", daddr="192.168.1.7", sport=1, dport=65535)

CLIENT_MESSAGES = [HANDOFF, StopMirror(conn_id=7, key=KEY), Ping(token=99, reply=False),
                   Release(conn_id=3, key=KEY), Holding((), complete=True, last=True),
                   Holding(((1, KEY), ((1 << 64) - 1, OTHER_KEY)), complete=False, last=True),
                   Holding(((7, KEY),) * MAX_HOLDING_KEYS, complete=True, last=False)]
SERVER_MESSAGES = [Ack(conn_id=7), Nack(conn_id=8, reason="map full — ünïcode"), Nack(conn_id=9, reason=""),
                   Closed(conn_id=7, key=KEY, packets=3, bytes=(1 << 64) - 1, flags=0xFFFFFFFF),
                   Ping(token=(1 << 64) - 1, reply=True)]


def pair(psk_client: bytes = PSK, psk_server: bytes = PSK) -> tuple[ControlConnection, ControlConnection]:
    """An established client/server pair."""
    client = ControlConnection("client", psk_client, "router-1")
    server = ControlConnection("server", psk_server, "agent-1")
    assert server.receive_data(client.start()) == []  # the HELLO: nothing is handed on yet
    assert not server.established
    assert client.receive_data(server.data_to_send()) == [Established("agent-1")]  # the CHALLENGE
    assert server.receive_data(client.data_to_send()) == [Established("router-1")]  # the PROOF
    assert client.established and server.established
    return client, server


def reason_of(conn: ControlConnection, data: bytes) -> str:
    with pytest.raises(ControlError) as info:
        conn.receive_data(data)
    return info.value.reason


# ------------------------------------------------------------------ handshake, round trips


def test_handshake_sets_peer_ids_and_keys_per_direction():
    client, server = pair()
    assert client.peer_node_id == "agent-1" and server.peer_node_id == "router-1"
    assert client._send_key == server._recv_key and client._recv_key == server._send_key
    assert client._send_key != client._recv_key
    assert client._send_key not in (PSK, hello_key(PSK))
    assert server.data_to_send() == b"" and client.data_to_send() == b""  # drained


def test_server_start_sends_nothing_and_client_not_established_before_answer():
    client = ControlConnection("client", PSK, "r")
    server = ControlConnection("server", PSK, "a")
    assert server.start() == b""
    hello = client.start()
    assert not client.established
    with pytest.raises(RuntimeError):
        client.send(Ping(1))
    server.receive_data(hello)
    assert not server.established and not client.established  # the server waits for the PROOF
    with pytest.raises(RuntimeError):
        server.send(Ack(1))


@pytest.mark.parametrize("message", CLIENT_MESSAGES, ids=lambda m: type(m).__name__)
def test_client_messages_round_trip(message):
    client, server = pair()
    assert server.receive_data(client.send(message)) == [message]


@pytest.mark.parametrize("message", SERVER_MESSAGES, ids=lambda m: type(m).__name__)
def test_server_messages_round_trip(message):
    client, server = pair()
    assert client.receive_data(server.send(message)) == [message]


def test_many_frames_in_one_read_and_counters_advance():
    client, server = pair()
    data = b"".join(client.send(m) for m in CLIENT_MESSAGES * 3)
    assert server.receive_data(data) == CLIENT_MESSAGES * 3


def test_translation_is_the_one_from_translate_module():
    client, server = pair()
    [got] = server.receive_data(client.send(HANDOFF))
    assert type(got.translation) is Translation and got.translation == XLATE


def test_frame_layout_is_as_specified():
    client, server = pair()
    frame = client.send(StopMirror(conn_id=0x0102030405060708, key=KEY))
    length, version, mtype, flags, counter = struct.unpack(">IBBHQ", frame[:16])
    assert length == len(frame) - 4
    assert (version, mtype, flags, counter) == (2, MessageType.STOP_MIRROR, 0, 1)
    payload = frame[16:-32]
    assert payload == bytes.fromhex("0102030405060708") + bytes([10, 0, 0, 2, 192, 168, 1, 7]) + \
        struct.pack(">HH", 40000, 80)
    assert frame[-32:] == hmac.new(client._send_key, frame[:-32], hashlib.sha256).digest()
    assert client.send(Ping(1))[8:16] == struct.pack(">Q", 2)


def test_handshake_frames_are_as_specified():
    client = ControlConnection("client", PSK, "rtr", nonce=b"N" * 32)
    server = ControlConnection("server", PSK, "agt", nonce=b"S" * 32)
    handshake_key = hmac.new(PSK, b"arr control v2 handshake", hashlib.sha256).digest()
    frame = client.start()
    assert frame[4:16] == bytes([2, MessageType.HELLO, 0, 0]) + bytes(8)
    hello = struct.pack(">HH", 4, 3) + b"rtr" + b"N" * 32  # protocol 4, a node id of 3 bytes
    assert frame[16:-32] == hello
    assert frame[-32:] == hmac.new(handshake_key, frame[:-32], hashlib.sha256).digest()
    server.receive_data(frame)
    challenge = server.data_to_send()
    assert challenge[4:16] == bytes([2, MessageType.CHALLENGE, 0, 0]) + bytes(8)
    core = struct.pack(">HH", 4, 3) + b"agt" + b"S" * 32
    transcript = hashlib.sha256(b"arr control v2" + hello + core).digest()
    s2c = hmac.new(PSK, b"arr control v2 server to client" + transcript, hashlib.sha256).digest()
    c2s = hmac.new(PSK, b"arr control v2 client to server" + transcript, hashlib.sha256).digest()
    assert challenge[16:-32] == core + hmac.new(s2c, b"server proof", hashlib.sha256).digest()
    assert challenge[-32:] == hmac.new(handshake_key, challenge[:-32], hashlib.sha256).digest()
    client.receive_data(challenge)
    proof = client.data_to_send()
    assert proof[4:16] == bytes([2, MessageType.PROOF, 0, 0]) + bytes(8)
    assert proof[16:-32] == hmac.new(c2s, b"client proof", hashlib.sha256).digest()
    server.receive_data(proof)
    assert (client._send_key, client._recv_key) == (c2s, s2c) == (server._recv_key, server._send_key)


def test_values_that_do_not_fit_are_refused_on_send():
    client, server = pair()
    for bad in (HandoffRequest(conn_id=-1, key=KEY, translation=XLATE, mirror_from=0, mirror_until=0),
                HandoffRequest(conn_id=1, key=FlowKey("10.0.0.256", "1.1.1.1", 1, 1), translation=XLATE,
                               mirror_from=0, mirror_until=0),
                StopMirror(conn_id=1, key=FlowKey("::1", "1.1.1.1", 1, 1)),
                StopMirror(conn_id=1, key=FlowKey("1.1.1.1", "1.1.1.1", 65536, 1))):
        with pytest.raises(ValueError):
            client.send(bad)
    with pytest.raises(ValueError):
        server.send(Nack(conn_id=1, reason="x" * (MAX_FRAME - 57)))  # one byte too many
    # refusals did not consume counters: the next frame is still accepted
    assert server.receive_data(client.send(Ping(5))) == [Ping(5)]


def test_a_role_only_sends_its_own_messages():
    client, server = pair()
    for message in SERVER_MESSAGES:
        with pytest.raises(ValueError):
            client.send(message)
    for message in CLIENT_MESSAGES:
        with pytest.raises(ValueError):
            server.send(message)


# ------------------------------------------------------------------ partial delivery


@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12))
def test_arbitrary_split_points(cuts):
    client, server = pair()
    stream = b"".join(client.send(m) for m in CLIENT_MESSAGES)
    points = sorted({c % (len(stream) + 1) for c in cuts})
    got = []
    previous = 0
    for point in points + [len(stream)]:
        got += server.receive_data(stream[previous:point])
        previous = point
    assert got == CLIENT_MESSAGES


def test_byte_by_byte_including_handshake():
    client = ControlConnection("client", PSK, "r")
    server = ControlConnection("server", PSK, "a")
    got = []
    for b in client.start():
        got += server.receive_data(bytes([b]))
    assert got == [] and server.buffered == 0
    answer = server.data_to_send()
    for b in answer[:-1]:
        assert client.receive_data(bytes([b])) == []
        assert client.buffered > 0
    assert not client.established
    assert len(client.receive_data(answer[-1:])) == 1 and client.established
    for b in client.data_to_send():
        got += server.receive_data(bytes([b]))
    assert got == [Established("r")] and server.established
    got = []
    for b in b"".join(server.send(m) for m in SERVER_MESSAGES):
        got += client.receive_data(bytes([b]))
    assert got == SERVER_MESSAGES


# ------------------------------------------------------------------ authentication


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(message=st.sampled_from(CLIENT_MESSAGES), data=st.data())
def test_flipping_any_bit_after_the_version_is_bad_mac(message, data):
    client, server = pair()
    frame = bytearray(client.send(message))
    bit = data.draw(st.integers(min_value=40, max_value=len(frame) * 8 - 1))
    frame[bit // 8] ^= 1 << (bit % 8)
    assert reason_of(server, bytes(frame)) == "bad-mac"


@settings(max_examples=100, deadline=None)
@given(bit=st.integers(min_value=0, max_value=31))
def test_flipping_a_length_bit_never_delivers(bit):
    client, server = pair()
    frame = bytearray(client.send(HANDOFF))
    frame[bit // 8] ^= 1 << (bit % 8)
    try:
        assert server.receive_data(bytes(frame)) == []  # waits for a body that never comes
    except ControlError as exc:
        assert exc.reason in ("bad-mac", "oversize", "malformed")


@pytest.mark.parametrize("bit", range(32, 40))
def test_flipping_a_bit_of_the_version_is_version(bit):
    client, server = pair()
    frame = bytearray(client.send(Ping(1)))
    frame[bit // 8] ^= 1 << (bit % 8)
    assert reason_of(server, bytes(frame)) == "version"


@settings(max_examples=50, deadline=None)
@given(bit=st.integers(min_value=40, max_value=(16 + 4 + 3 + 32 + 32) * 8 - 1))  # "rtr"
def test_flipping_any_bit_of_a_hello_is_bad_mac(bit):
    client = ControlConnection("client", PSK, "rtr")
    frame = bytearray(client.start())
    frame[bit // 8] ^= 1 << (bit % 8)
    assert reason_of(ControlConnection("server", PSK, "a"), bytes(frame)) == "bad-mac"


def test_wrong_psk_is_bad_mac_at_hello_both_ways():
    client = ControlConnection("client", b"k" * 32, "r")
    assert reason_of(ControlConnection("server", PSK, "a"), client.start()) == "bad-mac"
    # the server's answer checked by a client with another key
    client = ControlConnection("client", b"k" * 32, "r")
    server = ControlConnection("server", b"k" * 32, "a")
    server.receive_data(client.start())
    other = ControlConnection("client", PSK, "r")
    other.start()
    assert reason_of(other, server.data_to_send()) == "bad-mac"


def test_frame_maced_with_psk_after_handshake_is_bad_mac():
    client, server = pair()
    _, payload = encode_payload(Ping(1))
    assert reason_of(server, encode_frame(MessageType.PING, 1, payload, PSK)) == "bad-mac"


# ------------------------------------------------------------------ replay


def test_replayed_frame_is_replay():
    client, server = pair()
    first = client.send(Ping(1))
    assert server.receive_data(first) == [Ping(1)]
    assert server.receive_data(client.send(Ping(2))) == [Ping(2)]
    assert reason_of(server, first) == "replay"


def test_reordered_frames_are_replay():
    client, server = pair()
    one, two = client.send(Ping(1)), client.send(Ping(2))
    assert reason_of(server, two) == "replay"
    client, server = pair()
    one, two, three = client.send(Ping(1)), client.send(Ping(2)), client.send(Ping(3))
    assert server.receive_data(one) == [Ping(1)]
    assert reason_of(server, three) == "replay"  # a skipped counter too


def test_counter_zero_after_handshake_is_replay():
    client, server = pair()
    _, payload = encode_payload(Ping(1))
    assert reason_of(server, encode_frame(MessageType.PING, 0, payload, server._recv_key)) == "replay"


def test_server_frame_replayed_back_to_the_server_is_refused():
    """Each direction has its key: a reflected frame fails the MAC."""
    client, server = pair()
    assert reason_of(server, server.send(Ack(1))) == "bad-mac"
    client, server = pair()
    assert reason_of(client, client.send(Ping(1))) == "bad-mac"


def record_session() -> list[bytes]:
    """The client's frames of one whole session, as a wiretap sees them:
    HELLO, PROOF, then two messages."""
    client = ControlConnection("client", PSK, "router-1")
    server = ControlConnection("server", PSK, "agent-1")
    hello = client.start()
    server.receive_data(hello)
    client.receive_data(server.data_to_send())
    proof = client.data_to_send()
    server.receive_data(proof)
    return [hello, proof, client.send(HANDOFF), client.send(Ping(1))]


def test_old_hello_replayed_to_a_new_session_cannot_be_followed():
    hello, proof, handoff_frame, ping = record_session()
    fresh = ControlConnection("server", PSK, "agent-1")  # no memory of the HELLO (a restarted agent, say)
    assert fresh.receive_data(hello) == []  # the HELLO itself is authentic: a CHALLENGE goes out...
    assert fresh.data_to_send()[5] == MessageType.CHALLENGE and not fresh.established
    assert reason_of(fresh, proof) == "bad-proof"  # ...which the recorded PROOF does not answer
    fresh = ControlConnection("server", PSK, "agent-1")
    fresh.receive_data(hello)
    assert reason_of(fresh, handoff_frame) == "bad-mac"  # the old session's frames are MACed with its keys


def test_replayed_hello_is_refused_while_remembered():
    seen = SeenNonces(capacity=2)
    hello, *_ = record_session()
    first = ControlConnection("server", PSK, "agent-1", seen_nonces=seen)
    assert first.receive_data(hello) == []
    again = ControlConnection("server", PSK, "agent-1", seen_nonces=seen)
    assert reason_of(again, hello) == "replay"
    assert again.data_to_send() == b""  # no CHALLENGE for a replay
    for _ in range(2):  # two newer HELLOs push it out: then it gets a CHALLENGE it cannot answer
        ControlConnection("server", PSK, "a", seen_nonces=seen).receive_data(record_session()[0])
    assert len(seen) == 2
    late = ControlConnection("server", PSK, "agent-1", seen_nonces=seen)
    assert late.receive_data(hello) == [] and not late.established


def test_replayed_challenge_is_refused_by_the_client():
    client = ControlConnection("client", PSK, "router-1")
    server = ControlConnection("server", PSK, "agent-1")
    server.receive_data(client.start())
    recorded = server.data_to_send()
    other = ControlConnection("client", PSK, "router-1")
    other.start()
    assert reason_of(other, recorded) == "bad-proof"


def test_a_forged_proof_is_bad_proof():
    client = ControlConnection("client", PSK, "r")
    server = ControlConnection("server", PSK, "a")
    server.receive_data(client.start())
    _, payload = encode_payload(Proof(bytes(32)))
    assert reason_of(server, encode_frame(MessageType.PROOF, 0, payload, hello_key(PSK))) == "bad-proof"


def test_reflected_hello_is_refused():
    client = ControlConnection("client", PSK, "r")
    hello = client.start()
    assert reason_of(client, hello) == "handshake"


# ------------------------------------------------------------------ malformed, oversize, order


def test_oversize_length_before_the_body():
    server = ControlConnection("server", PSK, "a")
    assert reason_of(server, struct.pack(">I", MAX_FRAME - 3)) == "oversize"  # 4 bytes, no body
    assert reason_of(ControlConnection("server", PSK, "a"), b"\xff\xff\xff\xff") == "oversize"
    assert reason_of(ControlConnection("server", PSK, "a"), b"GET / HTTP/1.1\r\n") == "oversize"


def test_frames_are_small_until_the_peer_is_proven():
    """An unproven peer makes the other side buffer a handshake frame at most."""
    assert reason_of(ControlConnection("server", PSK, "a"), struct.pack(">I", MAX_HANDSHAKE_FRAME - 3)) == "oversize"
    client = ControlConnection("client", PSK, "r")
    client.start()
    assert reason_of(client, struct.pack(">I", MAX_HANDSHAKE_FRAME - 3)) == "oversize"
    assert ControlConnection("server", PSK, "a").receive_data(struct.pack(">I", MAX_HANDSHAKE_FRAME - 4)) == []


def test_handshake_codecs_and_keys():
    challenge = Challenge("agent-1", b"s" * 32, b"p" * 32)
    assert decode_payload(*encode_payload(challenge)) == challenge
    assert decode_payload(*encode_payload(Proof(b"q" * 32))) == Proof(b"q" * 32)
    for bad in (Challenge("a", b"s" * 31, b"p" * 32), Challenge("a", b"s" * 32, b"p"), Proof(b"x"),
                Hello("x" * 256, b"n" * 32)):
        with pytest.raises(ValueError):
            encode_payload(bad)
    keys = SessionKeys.derive(PSK, transcript_hash(b"hello", b"challenge"))
    assert len({keys.client_to_server, keys.server_to_client, keys.client_proof(), keys.server_proof()}) == 4
    assert SessionKeys.derive(PSK, transcript_hash(b"hello", b"challengf")) != keys


def test_largest_frame_is_accepted():
    client, server = pair()
    overhead = 16 + len(encode_payload(Nack(1, ""))[1]) + 32
    big = Nack(1, "x" * (MAX_FRAME - overhead))
    frame = server.send(big)
    assert len(frame) == MAX_FRAME
    assert client.receive_data(frame) == [big]


def test_length_below_the_header_is_malformed():
    assert reason_of(ControlConnection("server", PSK, "a"), struct.pack(">I", 43)) == "malformed"
    assert reason_of(ControlConnection("server", PSK, "a"), bytes(4)) == "malformed"


MESSAGE_TYPES = [MessageType.HANDOFF, MessageType.STOP_MIRROR, MessageType.PING]


@pytest.mark.parametrize("message", CLIENT_MESSAGES, ids=lambda m: type(m).__name__)
@pytest.mark.parametrize("change", ["truncate", "extend"])
def test_truncated_or_extended_payload_is_malformed(message, change):
    client, server = pair()
    mtype, payload = encode_payload(message)
    payload = payload[:-1] if change == "truncate" else payload + b"\x00"
    assert reason_of(server, encode_frame(mtype, 1, payload, server._recv_key)) == "malformed"


@settings(max_examples=100, deadline=None)
@given(mtype=st.sampled_from(list(MessageType)), garbage=st.binary(max_size=80))
def test_garbage_payloads_are_refused_cleanly(mtype, garbage):
    """Authentic garbage never crashes the decoder: a message or a ControlError."""
    client, server = pair()
    frame = encode_frame(mtype, 1, garbage, server._recv_key)
    try:
        server.receive_data(frame)
    except ControlError as exc:
        assert exc.reason in ("malformed", "handshake", "unknown-type")


@pytest.mark.parametrize("payload", [b"", bytes(5), struct.pack(">HH", 2, 5) + b"ab" + bytes(32),
                                     struct.pack(">HH", 2, 2) + b"\xff\xfe" + bytes(32),
                                     struct.pack(">HH", 2, 0) + bytes(33),
                                     struct.pack(">HH", 2, 256) + b"x" * 256 + bytes(32)])
def test_malformed_hello(payload):
    server = ControlConnection("server", PSK, "a")
    assert reason_of(server, encode_frame(MessageType.HELLO, 0, payload, hello_key(PSK))) == "malformed"


def test_bad_ping_flag_and_nonzero_flags_are_malformed():
    client, server = pair()
    assert reason_of(server, encode_frame(MessageType.PING, 1, struct.pack(">QB", 1, 2), server._recv_key)) \
        == "malformed"
    client, server = pair()
    _, payload = encode_payload(Ping(1))
    assert reason_of(server, encode_frame(MessageType.PING, 1, payload, server._recv_key, flags=1)) == "malformed"


def test_unknown_type():
    client, server = pair()
    assert reason_of(server, encode_frame(99, 1, b"", server._recv_key)) == "unknown-type"
    assert reason_of(ControlConnection("server", PSK, "a"), encode_frame(0, 0, b"", hello_key(PSK))) \
        == "unknown-type"


def test_message_before_hello_is_handshake():
    _, payload = encode_payload(HANDOFF)
    server = ControlConnection("server", PSK, "a")
    assert reason_of(server, encode_frame(MessageType.HANDOFF, 0, payload, hello_key(PSK))) == "handshake"
    client = ControlConnection("client", PSK, "r")
    client.start()
    assert reason_of(client, encode_frame(MessageType.ACK, 0, struct.pack(">Q", 1), hello_key(PSK))) \
        == "handshake"
    # a message before the PROOF, after the HELLO
    client = ControlConnection("client", PSK, "r")
    server = ControlConnection("server", PSK, "a")
    server.receive_data(client.start())
    assert reason_of(server, encode_frame(MessageType.HANDOFF, 0, payload, hello_key(PSK))) == "handshake"


def test_client_refuses_a_hello_it_did_not_ask_for():
    client = ControlConnection("client", PSK, "r")
    other = ControlConnection("client", PSK, "x")
    assert reason_of(client, other.start()) == "handshake"


def test_hello_with_nonzero_counter_is_handshake():
    _, payload = encode_payload(Hello("r", b"n" * 32))
    server = ControlConnection("server", PSK, "a")
    assert reason_of(server, encode_frame(MessageType.HELLO, 3, payload, hello_key(PSK))) == "handshake"


def test_second_hello_is_handshake():
    client, server = pair()
    _, payload = encode_payload(Hello("r", b"n" * 32))
    assert reason_of(server, encode_frame(MessageType.HELLO, 1, payload, server._recv_key)) == "handshake"
    client, server = pair()
    hello = ControlConnection("client", PSK, "r").start()
    assert reason_of(server, hello) == "bad-mac"  # MACed with the handshake key: not this session's


def test_version_mismatch():
    _, payload = encode_payload(Hello("r", b"n" * 32, version=5))
    assert reason_of(ControlConnection("server", PSK, "a"),
                     encode_frame(MessageType.HELLO, 0, payload, hello_key(PSK))) == "version"
    _, payload = encode_payload(Hello("r", b"n" * 32))
    assert reason_of(ControlConnection("server", PSK, "a"),
                     encode_frame(MessageType.HELLO, 0, payload, hello_key(PSK), version=3)) == "version"


@pytest.mark.parametrize("old", [2, 3])
def test_an_older_protocol_peer_is_refused_by_name(old):
    """Protocol 3 added SHIFT, which an agent of protocol 2 would end the
    session over; protocol 4 made TAKEBACK and SHIFT a byte longer, which one
    of protocol 3 would refuse as malformed. So the handshake refuses such a
    peer at once, naming both."""
    _, payload = encode_payload(Hello("r", b"n" * 32, version=old))
    server = ControlConnection("server", PSK, "a")
    with pytest.raises(ControlError) as info:
        server.receive_data(encode_frame(MessageType.HELLO, 0, payload, hello_key(PSK)))
    assert info.value.reason == "version"
    assert f"protocol {old}" in info.value.detail and "protocol 4" in info.value.detail


def test_a_protocol_1_hello_is_version():
    """What a router of protocol 1 sends (its frame layout: version 1, a
    16-byte nonce, MACed with the PSK itself) is refused as ``version``."""
    v1_payload = struct.pack(">HH", 1, 8) + b"router-1" + b"n" * 16
    v1_hello = encode_frame(MessageType.HELLO, 0, v1_payload, PSK, version=1)
    server = ControlConnection("server", PSK, "a")
    with pytest.raises(ControlError) as info:
        server.receive_data(v1_hello)
    assert info.value.reason == "version" and "protocol 1" in info.value.detail


def test_after_an_error_the_connection_refuses_use():
    client, server = pair()
    frame = client.send(Ping(1))
    assert reason_of(server, b"\xff" * 8) == "oversize"
    with pytest.raises(ControlError):
        server.receive_data(frame)
    with pytest.raises(ControlError):
        server.send(Ack(1))
    assert not server.established


def test_valid_frames_before_a_bad_one_in_the_same_read_are_dropped():
    client, server = pair()
    with pytest.raises(ControlError):
        server.receive_data(client.send(Ping(1)) + b"\xff" * 8)


# ------------------------------------------------------------------ the key file


def write_key(tmp_path, content: bytes, mode: int = 0o600):
    path = tmp_path / "psk"
    path.write_bytes(content)
    os.chmod(path, mode)
    return path


def test_load_psk_hex_and_raw(tmp_path):
    assert load_psk(write_key(tmp_path, PSK.hex().encode() + b"\n")) == PSK
    assert load_psk(write_key(tmp_path, b"  " + PSK.hex().upper().encode() + b"  \n")) == PSK
    assert load_psk(write_key(tmp_path, b"correct horse battery staple\n")) == b"correct horse battery staple"


@pytest.mark.parametrize("content, words", [
    (b"", "empty"), (b" \n\t", "empty"), (b"abcdef0123", "too short"), (b"short-key!", "too short"),
    (b"a" * 33, "odd number"),
])
def test_load_psk_refuses_bad_content(tmp_path, content, words):
    with pytest.raises(ValueError, match=words):
        load_psk(write_key(tmp_path, content))


def test_load_psk_missing_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_psk(tmp_path / "nope")


def test_load_psk_warns_on_loose_permissions(tmp_path, caplog):
    path = write_key(tmp_path, PSK.hex().encode(), 0o644)
    with caplog.at_level(logging.WARNING, logger="arr.control"):
        assert load_psk(path) == PSK
    assert "group or others" in caplog.text and "0644" in caplog.text
    with pytest.raises(ValueError, match="group or others"):
        load_psk(path, strict=True)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="arr.control"):
        load_psk(write_key(tmp_path, PSK.hex().encode(), 0o600))
    assert caplog.text == ""


def test_holding_is_bounded_and_its_flags_checked():
    client, server = pair()
    with pytest.raises(ValueError, match="exceeds"):
        client.send(Holding(((1, KEY),) * (MAX_HOLDING_KEYS + 1)))
    mtype, payload = encode_payload(Holding(((1, KEY),), complete=True, last=True))
    forged = encode_frame(mtype, 1, bytes([0x80]) + payload[1:], server._recv_key)
    assert reason_of(server, forged) == "malformed"
    _, server = pair()
    forged = encode_frame(mtype, 1, payload[:1] + struct.pack(">H", 2) + payload[3:], server._recv_key)
    assert reason_of(server, forged) == "malformed"  # claims 2 keys, carries 1
