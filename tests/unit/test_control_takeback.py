"""TAKEBACK and TAKEN on the control channel (handoff/control/frames.py), and the
agent's answer to a TAKEBACK (handoff/agent.py)."""

from __future__ import annotations

import ctypes
import struct
import time

import pytest

from handoff.agent import Agent, AgentSettings, _take_back_verdict
from handoff.control import (TAKEN_CLOSED, TAKEN_OK, TAKEN_UNACKED, TAKEN_UNKNOWN, ControlConnection,
                             ControlError, FlowKey, MessageType, Shift, Taken, TakeBack)
from handoff.control.frames import ANSWERS_HEAD, _Malformed, decode_payload, encode_frame, encode_payload
from handoff.lifecycle import local_key
from handoff.maps import (FLOW_ACTIVE, FLOW_F_ACKED, FLOW_F_FIN, FLOW_F_RST, FLOW_F_SENT, FLOW_HOLD, HEAD_BYTES, FlowEntry,
                          MirrorState, ResponseHead, Xlate)
from handoff.translate import Translation

PSK = bytes(range(32))
KEY = FlowKey(saddr="10.0.0.9", daddr="192.168.1.7", sport=8080, dport=51234)

TAKEBACKS = [TakeBack(conn_id=7, key=KEY, acked=0xFFFFFFFF, stream_end=0),
             TakeBack(conn_id=(1 << 64) - 1, key=KEY, acked=0, stream_end=0xFFFFFFFF, answers_head=True)]
TAKENS = [Taken(conn_id=7, status=TAKEN_OK, snd_nxt=0xFFFFFFFF, window=29200 << 7, syn_seq=0xFFFFFFFE),
          Taken(conn_id=1, status=TAKEN_UNACKED, snd_nxt=5),
          Taken(conn_id=(1 << 64) - 1, status=TAKEN_UNKNOWN),
          Taken(conn_id=2, status=TAKEN_CLOSED, snd_nxt=9)]


def pair() -> tuple[ControlConnection, ControlConnection]:
    """An established client (router) / server (agent) pair, as test_control_frames.py builds it."""
    client = ControlConnection("client", PSK, "router-1")
    server = ControlConnection("server", PSK, "agent-1")
    server.receive_data(client.start())
    client.receive_data(server.data_to_send())  # the CHALLENGE
    server.receive_data(client.data_to_send())  # the PROOF
    assert client.established and server.established
    return client, server


def reason_of(conn: ControlConnection, data: bytes) -> str:
    with pytest.raises(ControlError) as info:
        conn.receive_data(data)
    return info.value.reason


# ------------------------------------------------------------------ codecs


@pytest.mark.parametrize("message", TAKEBACKS + TAKENS, ids=repr)
def test_payload_round_trip(message):
    mtype, payload = encode_payload(message)
    assert mtype is (MessageType.TAKEBACK if isinstance(message, TakeBack) else MessageType.TAKEN)
    assert decode_payload(mtype, payload) == message


def test_takeback_wire_layout():
    _, payload = encode_payload(TakeBack(conn_id=0x0102030405060708, key=KEY, acked=0xA0B0C0D0,
                                         stream_end=0x01020304, answers_head=True))
    assert payload == (bytes.fromhex("0102030405060708") + bytes([10, 0, 0, 9, 192, 168, 1, 7])
                       + struct.pack(">HHIIB", 8080, 51234, 0xA0B0C0D0, 0x01020304, ANSWERS_HEAD))


@pytest.mark.parametrize("flags", [2, 0x80, 0xFF])
def test_takeback_flags_unknown_are_malformed(flags):
    # A flag this side does not know would be a request it cannot honour.
    mtype, payload = encode_payload(TAKEBACKS[0])
    payload = payload[:-1] + bytes([flags])
    with pytest.raises(_Malformed, match="TAKEBACK flags"):
        decode_payload(mtype, payload)
    client, server = pair()
    assert reason_of(server, encode_frame(mtype, 1, payload, server._recv_key)) == "malformed"


def test_taken_wire_layout():
    _, payload = encode_payload(Taken(conn_id=3, status=TAKEN_UNACKED, snd_nxt=4, window=5, syn_seq=6))
    assert payload == struct.pack(">QBIII", 3, 1, 4, 5, 6)


@pytest.mark.parametrize("message", TAKEBACKS, ids=repr)
def test_takeback_through_a_connection(message):
    client, server = pair()
    assert server.receive_data(client.send(message)) == [message]


@pytest.mark.parametrize("message", TAKENS, ids=repr)
def test_taken_through_a_connection(message):
    client, server = pair()
    assert client.receive_data(server.send(message)) == [message]


def test_question_and_answer_in_one_session():
    client, server = pair()
    ask = TakeBack(conn_id=11, key=KEY, acked=1000, stream_end=77)
    assert server.receive_data(client.send(ask)) == [ask]
    answer = Taken(conn_id=11, status=TAKEN_OK, snd_nxt=1000, window=65535, syn_seq=1)
    assert client.receive_data(server.send(answer)) == [answer]


@pytest.mark.parametrize("status", [4, 5, 0xFF])
def test_taken_with_an_unknown_status_is_malformed(status):
    payload = struct.pack(">QBIII", 1, status, 0, 0, 0)
    with pytest.raises(_Malformed):
        decode_payload(MessageType.TAKEN, payload)
    client, server = pair()
    assert reason_of(client, encode_frame(MessageType.TAKEN, 1, payload, client._recv_key)) == "malformed"


@pytest.mark.parametrize("message", [TAKEBACKS[0], TAKENS[0]], ids=repr)
@pytest.mark.parametrize("change", ["truncate", "extend"])
def test_truncated_or_extended_payload_is_malformed(message, change):
    client, server = pair()
    mtype, payload = encode_payload(message)
    payload = payload[:-1] if change == "truncate" else payload + b"\x00"
    receiver = server if isinstance(message, TakeBack) else client
    assert reason_of(receiver, encode_frame(mtype, 1, payload, receiver._recv_key)) == "malformed"


def test_values_that_do_not_fit_are_refused_on_send():
    client, server = pair()
    with pytest.raises(ValueError):
        client.send(TakeBack(conn_id=1, key=KEY, acked=1 << 32, stream_end=0))
    with pytest.raises(ValueError):
        server.send(Taken(conn_id=1, status=TAKEN_OK, window=1 << 32))


# ------------------------------------------------------------------ roles


def test_server_does_not_send_takeback_nor_client_taken():
    client, server = pair()
    with pytest.raises(ValueError, match="only a client"):
        server.send(TAKEBACKS[0])
    with pytest.raises(ValueError, match="only a server"):
        client.send(TAKENS[0])
    # The refusals consumed no counter: the session goes on.
    assert server.receive_data(client.send(TAKEBACKS[1])) == [TAKEBACKS[1]]


def test_takeback_arriving_at_the_client_is_refused():
    """A TAKEBACK is the router's: one reaching the router (a reflected or
    forged frame, authentic under the client's receiving key) is unknown-type."""
    client, server = pair()
    mtype, payload = encode_payload(TAKEBACKS[0])
    assert reason_of(client, encode_frame(mtype, 1, payload, client._recv_key)) == "unknown-type"


def test_taken_arriving_at_the_server_is_refused():
    client, server = pair()
    mtype, payload = encode_payload(TAKENS[0])
    assert reason_of(server, encode_frame(mtype, 1, payload, server._recv_key)) == "unknown-type"


# ------------------------------------------------------------------ the agent's verdict


def entry(snd_max: int, flags: int = FLOW_F_SENT | FLOW_F_ACKED, **fields) -> FlowEntry:
    """An egress entry whose server has sent something (FLOW_F_SENT) up to
    SND_MAX, and acknowledged (FLOW_F_ACKED) up to its peer_ack (0 unless given)."""
    return FlowEntry(state=FLOW_ACTIVE, flags=flags, snd_max=snd_max, conn_id=5, **fields)


@pytest.mark.parametrize("flags", [FLOW_F_FIN, FLOW_F_RST, FLOW_F_FIN | FLOW_F_RST])
def test_verdict_closed_when_the_server_sent_fin_or_rst(flags):
    # Even when everything is acknowledged: nothing left to take back.
    assert _take_back_verdict(entry(1000, flags), 1000, 0) == TAKEN_CLOSED
    assert _take_back_verdict(entry(0, flags), 0, 0) == TAKEN_CLOSED


def test_verdict_unacked_before_the_server_sent_anything():
    assert _take_back_verdict(entry(0, flags=0), 0, 0) == TAKEN_UNACKED
    assert _take_back_verdict(entry(1000, flags=0), 1000, 0) == TAKEN_UNACKED


def test_verdict_ok_at_zero_once_the_server_sent():
    """snd_nxt 0 is a sequence number like any other (FLOW_F_SENT says it is one)."""
    assert _take_back_verdict(entry(0), 0, 0) == TAKEN_OK


@pytest.mark.parametrize("snd_max, acked", [(1000, 999), (1000, 1001), (5, 0xFFFFFFFF), (0xFFFFFFFF, 0)])
def test_verdict_unacked_while_the_ack_is_elsewhere(snd_max, acked):
    assert _take_back_verdict(entry(snd_max), acked, 0) == TAKEN_UNACKED


@pytest.mark.parametrize("snd_max", [1, 1000, 0xFFFFFFFF])
def test_verdict_ok_when_all_is_acknowledged(snd_max):
    assert _take_back_verdict(entry(snd_max), snd_max, 0) == TAKEN_OK


@pytest.mark.parametrize("peer_ack, verdict", [
    (1000, TAKEN_UNACKED),     # the server has none of the last request
    (1299, TAKEN_UNACKED),     # its last byte is missing (a lost tail)
    (0xFFFFF000, TAKEN_UNACKED),  # far behind, across the wrap
    (1300, TAKEN_OK),          # all of it
    (1301, TAKEN_OK),          # and a FIN
    (1500, TAKEN_OK),          # more than the router knows of: not a lost byte of its
])
def test_verdict_waits_for_the_servers_ack_of_the_routers_stream(peer_ack, verdict):
    """The router's stream to the server ends at 1300: it lets go only once the
    server acknowledged all of it, else the rebuilt forwarding socket starts
    after bytes the released one still held (a POST's lost tail)."""
    assert _take_back_verdict(entry(5000, peer_ack=peer_ack), 5000, 1300) == verdict


def test_verdict_unacked_before_the_servers_first_ack():
    """peer_ack means nothing before FLOW_F_ACKED: too early to tell."""
    assert _take_back_verdict(entry(5000, flags=FLOW_F_SENT, peer_ack=1300), 5000, 1300) == TAKEN_UNACKED


# ------------------------------------------------------------------ Agent._take_back


class FakeMap:
    """The dict-backed subset of a BpfMap the agent uses (values copied, like the kernel's)."""

    def __init__(self, value_type: type) -> None:
        self.value_type = value_type
        self.data: dict[bytes, bytes] = {}
        self.updates: list[tuple[bytes, int]] = []

    def lookup(self, key):
        raw = self.data.get(bytes(key))
        return None if raw is None else self.value_type.from_buffer_copy(raw)

    def update(self, key, value) -> None:
        self.data[bytes(key)] = bytes(value)
        self.updates.append((bytes(key), getattr(value, "state", 0)))

    def delete(self, key) -> None:
        self.data.pop(bytes(key), None)


class FakeDatapath:
    def __init__(self) -> None:
        self.egress = FakeMap(FlowEntry)
        self.mirror = FakeMap(MirrorState)
        self.responses = FakeMap(ResponseHead)


class FakeConnections:
    def __init__(self) -> None:
        self.taken: list = []

    def taken_back(self, key) -> None:
        self.taken.append(key)


TO_CLIENT = Translation(saddr="192.168.1.7", daddr="10.0.0.2", sport=80, dport=40000, seq_delta=1, ack_delta=2,
                        tsval_delta=3, tsecr_delta=4, wscale_in=7, wscale_out=6)


def agent_with(egress_entry: FlowEntry | None) -> tuple[Agent, FakeDatapath, FakeConnections]:
    agent = Agent(AgentSettings(listen=("127.0.0.1", 0), secret_file="/nonexistent"))
    datapath, connections = FakeDatapath(), FakeConnections()
    agent.datapath, agent.connections = datapath, connections  # type: ignore[assignment]
    if egress_entry is not None:
        datapath.egress.update(local_key(KEY), egress_entry)
        datapath.mirror.update(local_key(KEY), MirrorState(mirror_until=1))
        datapath.egress.updates.clear()
    return agent, datapath, connections


def test_agent_take_back_ok_ends_the_entry_and_reports_the_server_state():
    e = entry(5000, x=Xlate.of(TO_CLIENT), peer_window=300, syn_seq=0xABCDEF)
    agent, datapath, connections = agent_with(e)
    taken = agent._take_back(TakeBack(conn_id=5, key=KEY, acked=5000, stream_end=0))
    assert taken == Taken(5, TAKEN_OK, snd_nxt=5000, window=300 << 7, syn_seq=0xABCDEF)
    # Paused (HOLD) before it was checked again and ended.
    assert [state for _, state in datapath.egress.updates] == [FLOW_HOLD]
    assert datapath.egress.lookup(local_key(KEY)) is None and datapath.mirror.lookup(local_key(KEY)) is None
    assert connections.taken == [local_key(KEY)] and agent.taken_back == 1


def test_agent_take_back_unacked_leaves_the_entry_active():
    agent, datapath, connections = agent_with(entry(5000, x=Xlate.of(TO_CLIENT)))
    taken = agent._take_back(TakeBack(conn_id=5, key=KEY, acked=4000, stream_end=0))
    assert (taken.status, taken.snd_nxt) == (TAKEN_UNACKED, 5000)
    assert datapath.egress.lookup(local_key(KEY)).state == FLOW_ACTIVE and not connections.taken


def test_agent_take_back_waits_for_the_servers_ack_of_the_request_and_counts_it():
    # The client has all of the response (5000), the server lacks the end of the request (1300).
    agent, datapath, connections = agent_with(entry(5000, x=Xlate.of(TO_CLIENT), peer_ack=1200))
    taken = agent._take_back(TakeBack(conn_id=5, key=KEY, acked=5000, stream_end=1300))
    assert taken.status == TAKEN_UNACKED and agent.request_waits == 1
    assert datapath.egress.lookup(local_key(KEY)).state == FLOW_ACTIVE and not connections.taken
    # The client's ack alone behind: another wait, not counted as the request's.
    agent._take_back(TakeBack(conn_id=5, key=KEY, acked=4000, stream_end=1200))
    assert agent.request_waits == 1


def response_head(seq: int, start: bytes, tail: bytes = b"", tail_end: int = 0) -> ResponseHead:
    head = ResponseHead(seq=seq, len=min(len(start), HEAD_BYTES), tail_len=len(tail), tail_end=tail_end,
                        tail=int.from_bytes(tail, "big"))
    ctypes.memmove(head.bytes, start, head.len)
    return head


NGINX_HEAD = b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Length: 10000\r\nConnection: keep-alive\r\n\r\n"


@pytest.mark.parametrize("sent, quiet_ms, waits", [
    (3000, 1, True),       # the server is between two writes of its 10,000-byte body
    (3000, 60, False),     # silent past the patience: its framing is not trusted (a HEAD's)
    (1000 + len(NGINX_HEAD) + 10000, 1, False),  # all of it sent
])
def test_agent_take_back_waits_for_the_rest_of_a_framed_response(sent, quiet_ms, waits):
    # The response began at server seq 1000; the client has acknowledged all
    # the server sent (SENT), and its socket holds nothing more.
    e = entry(sent, x=Xlate.of(TO_CLIENT), last_seen_ns=time.monotonic_ns() - quiet_ms * 1_000_000)
    agent, datapath, connections = agent_with(e)
    datapath.responses.update(local_key(KEY), response_head(1000, NGINX_HEAD))
    taken = agent._take_back(TakeBack(conn_id=5, key=KEY, acked=sent, stream_end=0))
    assert (taken.status == TAKEN_UNACKED) == waits and agent.unfinished_waits == int(waits)
    assert (datapath.egress.lookup(local_key(KEY)) is not None) == waits


@pytest.mark.parametrize("answers_head", [False, True])
def test_agent_take_back_after_a_head_response_waits_only_when_not_told(answers_head):
    # The server sent the head of a 10,000-byte resource and nothing more:
    # a GET's response would go on, a HEAD's is over. The router knows which.
    e = entry(1000 + len(NGINX_HEAD), x=Xlate.of(TO_CLIENT), last_seen_ns=time.monotonic_ns())
    agent, datapath, _ = agent_with(e)
    datapath.responses.update(local_key(KEY), response_head(1000, NGINX_HEAD, b"", 1000 + len(NGINX_HEAD)))
    taken = agent._take_back(TakeBack(conn_id=5, key=KEY, acked=e.snd_max, stream_end=0, answers_head=answers_head))
    assert taken.status == (TAKEN_OK if answers_head else TAKEN_UNACKED)
    assert agent.unfinished_waits == int(not answers_head)
    # And a SHIFT after it.
    agent, datapath, _ = agent_with(entry(e.snd_max, x=Xlate.of(TO_CLIENT), peer_ack=400,
                                          last_seen_ns=time.monotonic_ns()))
    datapath.responses.update(local_key(KEY), response_head(1000, NGINX_HEAD, b"", e.snd_max))
    answer = agent._shift(Shift(conn_id=5, key=KEY, start=400, end=450, delta=9, acked=e.snd_max,
                                answers_head=answers_head))
    assert (getattr(answer, "reason", None) == "responding") == (not answers_head), answer


@pytest.mark.parametrize("quiet_ms, refused", [(1, True), (60, False)])
def test_agent_refuses_a_shift_between_two_writes_of_a_framed_response(quiet_ms, refused):
    # In place, the router would count the new response from the client's
    # ack (shift_refusal), where the rest of this one goes.
    e = entry(3000, x=Xlate.of(TO_CLIENT), peer_ack=400, last_seen_ns=time.monotonic_ns() - quiet_ms * 1_000_000)
    agent, datapath, _ = agent_with(e)
    datapath.responses.update(local_key(KEY), response_head(1000, NGINX_HEAD))
    answer = agent._shift(Shift(conn_id=5, key=KEY, start=400, end=450, delta=9, acked=3000))
    assert (getattr(answer, "reason", None) == "responding") == refused, answer
    assert agent.shifts_refused["responding"] == int(refused)


class ServerSendsDuring(FakeMap):
    """The egress map of a server that sends 500 more bytes at a given moment
    of the agent's take-back: at its Nth lookup (AT_LOOKUP) or just before
    its Nth update lands (AT_UPDATE), the program records the segment in the
    entry (snd_max) and in the response record (tail_end), as
    handoff/bpf/target.bpf.c note_sent and note_tail do."""

    def __init__(self, responses: FakeMap, at_lookup: int = 0, at_update: int = 0) -> None:
        super().__init__(FlowEntry)
        self.responses, self.at_lookup, self.at_update = responses, at_lookup, at_update
        self.lookups = self.writes = 0

    def _server_sends(self, key) -> None:
        e = super().lookup(key)
        e.snd_max += 500
        FakeMap.update(self, key, e)
        self.updates.pop()
        head = self.responses.lookup(key)
        head.tail_end += 500
        self.responses.update(key, head)

    def lookup(self, key):
        self.lookups += 1
        if self.lookups == self.at_lookup:
            self._server_sends(key)
        return super().lookup(key)

    def update(self, key, value) -> None:
        self.writes += 1
        if self.writes == self.at_update:
            self._server_sends(key)
        super().update(key, value)


def racing_agent(**when) -> tuple[Agent, FakeDatapath, ServerSendsDuring]:
    # A response of 2,000 bytes from server seq 1000, all sent and acknowledged.
    head = NGINX_HEAD.replace(b"10000", str(2000 - len(NGINX_HEAD) + 1).encode())
    agent, datapath, _ = agent_with(None)
    datapath.egress = egress = ServerSendsDuring(datapath.responses, **when)
    datapath.responses.update(local_key(KEY), response_head(1000, head, b"", 3000))
    FakeMap.update(egress, local_key(KEY), entry(3000, x=Xlate.of(TO_CLIENT), last_seen_ns=time.monotonic_ns()))
    egress.updates.clear()
    return agent, datapath, egress


def test_agent_take_back_sees_a_segment_sent_while_it_paused_the_entry():
    # Pausing writes the whole entry, over the program's record of a segment
    # sent a moment before: the response record, another map, still has it.
    # Taken back anyway, the router would send its next response from the
    # server's old snd_nxt, over bytes the client has.
    agent, datapath, egress = racing_agent(at_update=1)
    taken = agent._take_back(TakeBack(conn_id=5, key=KEY, acked=3000, stream_end=0))
    assert taken.status == TAKEN_UNACKED and agent.pausing_waits == 1
    assert [state for _, state in egress.updates] == [FLOW_HOLD, FLOW_ACTIVE]
    assert datapath.egress.lookup(local_key(KEY)).state == FLOW_ACTIVE


def test_agent_take_back_pauses_the_entry_as_the_program_left_it():
    # The server sends after the agent's first read: the entry paused and
    # restored is the program's, snd_max past the segment (not the first read's).
    agent, datapath, egress = racing_agent(at_lookup=2)
    taken = agent._take_back(TakeBack(conn_id=5, key=KEY, acked=3000, stream_end=0))
    assert taken.status == TAKEN_UNACKED
    restored = datapath.egress.lookup(local_key(KEY))
    assert (restored.state, restored.snd_max) == (FLOW_ACTIVE, 3500)


def test_agent_shift_is_written_over_the_entry_as_the_program_left_it():
    # The server sends between the agent's first read and its write: the
    # fresh read sees it, and the SHIFT is refused rather than written over it.
    agent, datapath, egress = racing_agent(at_lookup=2)
    answer = agent._shift(Shift(conn_id=5, key=KEY, start=0, end=50, delta=9, acked=3000))
    assert getattr(answer, "reason", None) == "responding", answer
    assert egress.updates == [] and datapath.egress.lookup(local_key(KEY)).snd_max == 3500


CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nServer: nginx\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize("tail, tail_end, waits", [
    (b"\xaa\xbb\r\n0\r\n\r\n"[-8:], 3000, False),  # the last chunk: all of it sent
    (b"\r\n0\r\n\r\n", 2999, False),                 # ... and the server's FIN after it
    (b"\xaa" * 8, 3000, True),                          # between two writes of a chunk
    (b"\r\n4000\r\n", 3000, True),                     # a chunk's size line, its data to come
    (b"\n0\r\n\r\n", 3000, True),                     # too few bytes kept to tell: the patience decides
])
def test_agent_take_back_waits_for_the_last_chunk_of_a_chunked_response(tail, tail_end, waits):
    # The server's snd_max is 3000 (all acknowledged); its last bytes, kept by
    # the egress program, say whether the body is over (handoff/framing.py).
    e = entry(3000, x=Xlate.of(TO_CLIENT), last_seen_ns=time.monotonic_ns())
    agent, datapath, _ = agent_with(e)
    datapath.responses.update(local_key(KEY), response_head(1000, CHUNKED_HEAD, tail, tail_end))
    taken = agent._take_back(TakeBack(conn_id=5, key=KEY, acked=3000, stream_end=0))
    assert (taken.status == TAKEN_UNACKED) == waits and agent.unfinished_waits == int(waits)


@pytest.mark.parametrize("start, seq", [
    (CHUNKED_HEAD, 1000),  # chunked, but the kept tail is not where the server's stream ends
    (b"\x00binary that is no head", 1000),
    (NGINX_HEAD, 3500),  # a start past what the server sent: another connection's
])
def test_agent_take_back_goes_by_tcp_where_the_framing_does_not_tell(start, seq):
    e = entry(3000, x=Xlate.of(TO_CLIENT), last_seen_ns=time.monotonic_ns())
    agent, datapath, _ = agent_with(e)
    datapath.responses.update(local_key(KEY), response_head(seq, start))
    assert agent._take_back(TakeBack(conn_id=5, key=KEY, acked=3000, stream_end=0)).status == TAKEN_OK
    assert agent.unfinished_waits == 0


@pytest.mark.parametrize("conn_id, state, present", [(6, FLOW_ACTIVE, True), (5, FLOW_HOLD, True),
                                                     (5, FLOW_ACTIVE, False)])
def test_agent_take_back_unknown(conn_id, state, present):
    e = entry(5000)
    e.state = state
    agent, datapath, connections = agent_with(e if present else None)
    assert agent._take_back(TakeBack(conn_id=conn_id, key=KEY, acked=5000, stream_end=0)) == Taken(conn_id, TAKEN_UNKNOWN)
    assert not connections.taken
