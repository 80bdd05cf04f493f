"""A re-handoff in place, target side: the agent's answer to SHIFT on the real
egress map (handoff/agent.py ``Agent._shift``), then the real egress program
on the server's packets (handoff/bpf/target.bpf.c), step by step through one
rerouted request, against the reference model (handoff/translate.py).

The scenario: the client's next request R is [T, T + 100) of its stream; the
router sends the rewritten R' (150 bytes) to the server at [S, S + 150).
"""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from handoff import packet
from handoff.agent import Agent, AgentSettings
from handoff.control import Ack, FlowKey as WireKey, Nack, Shift
from handoff.maps import FLOW_ACTIVE, FLOW_F_ACKED, FlowEntry, FlowKey, Xlate
from handoff.packet import TC_ACT_REDIRECT
from handoff.translate import MOD, AckShift, Translation, wrap

from conftest import eth

pytestmark = pytest.mark.bpf

FWD = (("10.9.0.11", 8080), ("10.9.0.1", 50123))  # target -> router
FWD_KEY = FlowKey.of(*FWD)
WIRE_KEY = WireKey(saddr=FWD[0][0], daddr=FWD[1][0], sport=FWD[0][1], dport=FWD[1][1])
CONN_ID = 0x5EED
T, R, R2 = MOD - 60, 100, 150  # R crosses the wrap of the client's sequence space
S = 4_000_000_000
PREV = wrap(S - T)  # the egress ack_delta before R: server seq minus client seq
NEW = wrap(S + R2 - T - R)
TO_CLIENT = Translation(saddr="10.9.0.100", daddr="10.9.0.2", sport=80, dport=40000, seq_delta=77,
                        ack_delta=PREV, tsval_delta=5, tsecr_delta=1 << 20, wscale_in=7, wscale_out=7)


def server_frame(ack: int, size: int = 0, sack: tuple[tuple[int, int], ...] = ()) -> bytes:
    options = [("NOP", None), ("NOP", None), ("Timestamp", (7, 8))]
    if sack:
        options += [("NOP", None), ("NOP", None), ("SAck", tuple(edge for block in sack for edge in block))]
    return bytes(eth() / IP(src=FWD[0][0], dst=FWD[1][0]) / TCP(
        sport=FWD[0][1], dport=FWD[1][1], flags="PA" if size else "A", seq=9000, ack=ack, window=500,
        options=options) / (b"r" * size))


def client_view(frame: bytes) -> tuple[int, tuple[tuple[int, int], ...]]:
    """(ack, SACK blocks) of a rewritten frame, as the client reads them."""
    tcp = Ether(frame)[TCP]
    edges = dict((k, v) for k, v in tcp.options if isinstance(k, str)).get("SAck", ())
    return tcp.ack, tuple(zip(edges[::2], edges[1::2]))


@pytest.fixture
def egress(bpf_env):
    """The target object's real egress map, emptied before and after."""
    egress_map = bpf_env.objects["target"].maps["arr_egress"]
    for key in egress_map.keys():
        egress_map.delete(key)
    yield egress_map
    for key in egress_map.keys():
        egress_map.delete(key)


def agent_on(bpf_env, egress_map) -> Agent:
    """An agent on the target object's real maps (the responses' starts too:
    handoff/agent.py ``_response_unfinished`` reads them)."""
    agent = Agent(AgentSettings(listen=("127.0.0.1", 0), secret_file="/nonexistent"))
    agent.datapath = SimpleNamespace(  # type: ignore[assignment]
        egress=egress_map, responses=bpf_env.objects["target"].maps["arr_response"])
    return agent


def step(bpf_env, egress_map, frame: bytes, shift: AckShift | None) -> tuple[int, tuple]:
    """Run the egress program on FRAME with the map's entry; keep what it wrote."""
    run = bpf_env.run("arr_target_egress", frame, {"arr_egress": {FWD_KEY: egress_map.lookup(FWD_KEY)}})
    assert run.verdict == TC_ACT_REDIRECT
    x = egress_map.lookup(FWD_KEY).x.translation()
    assert run.out[12:] == packet.translate(frame, x, shift)[12:]  # the model, checksums and all
    egress_map.update(FWD_KEY, run.maps["arr_egress"][FWD_KEY])
    return client_view(run.out)


def test_one_request_rerouted_in_place(bpf_env, egress):
    egress.update(FWD_KEY, FlowEntry(x=Xlate.of(TO_CLIENT), state=FLOW_ACTIVE, conn_id=CONN_ID))
    agent = agent_on(bpf_env, egress)
    ask = Shift(conn_id=CONN_ID, key=WIRE_KEY, start=S, end=wrap(S + R2), delta=NEW, acked=9300)

    # Before the server acknowledged the previous request, the agent refuses.
    assert agent._shift(ask) == Nack(conn_id=CONN_ID, reason="unacked")
    # The server's response to it (9000 to 9300), acknowledging everything before R.
    assert step(bpf_env, egress, server_frame(S, 300), None) == (T, ())
    assert agent._shift(replace(ask, acked=9000)) == Nack(conn_id=CONN_ID, reason="responding")
    assert egress.lookup(FWD_KEY).flags & FLOW_F_ACKED and egress.lookup(FWD_KEY).peer_ack == S

    assert agent._shift(ask) == Ack(conn_id=CONN_ID)
    entry = egress.lookup(FWD_KEY)
    shift = AckShift(S, wrap(S + R2), PREV)
    assert entry.shift.model() == shift and entry.x.ack_delta == NEW
    assert (agent.shifted, agent.shifts_refused) == (1, {"unacked": 1, "responding": 1})

    # A duplicate ACK from before R' arrived, D-SACKing the previous request's end: as before.
    assert step(bpf_env, egress, server_frame(S, sack=((wrap(S - 10), S),)), shift) == (T, ((wrap(T - 10), T),))
    # R' half received, its second half first: no byte of R acknowledged nor SACKed.
    half = wrap(S + 75)
    ack, blocks = step(bpf_env, egress, server_frame(S, sack=((half, wrap(S + R2)),)), shift)
    assert ack == T and blocks == ((wrap(T + R), wrap(T + R)),)  # empty: the client drops the block
    assert step(bpf_env, egress, server_frame(half), shift) == (T, ())
    assert egress.lookup(FWD_KEY).shift.active
    # All of R' and the response to it: all of R, and the history ends.
    assert step(bpf_env, egress, server_frame(wrap(S + R2), 1000), shift) == (wrap(T + R), ())
    assert not egress.lookup(FWD_KEY).shift.active
    # The next request's bytes, SACKed beyond a hole: the new delta.
    assert step(bpf_env, egress, server_frame(wrap(S + R2), sack=((wrap(S + R2 + 10), wrap(S + R2 + 20)),)),
                None) == (wrap(T + R), ((wrap(T + R + 10), wrap(T + R + 20)),))

    # A second shift at the new point is accepted; one at the old point is not.
    assert agent._shift(replace(ask, end=wrap(S + 5), delta=0)) == Nack(conn_id=CONN_ID, reason="unacked")
    assert agent._shift(replace(ask, start=wrap(S + R2), end=wrap(S + R2 + 80), delta=wrap(NEW + 30),
                                acked=10000)) == Ack(conn_id=CONN_ID)  # its response: 9000 to 10000
    assert egress.lookup(FWD_KEY).shift.model() == AckShift(wrap(S + R2), wrap(S + R2 + 80), NEW)


def test_shift_of_another_connection_on_the_key_is_refused(bpf_env, egress):
    egress.update(FWD_KEY, FlowEntry(x=Xlate.of(TO_CLIENT), state=FLOW_ACTIVE, conn_id=CONN_ID,
                                     flags=FLOW_F_ACKED, peer_ack=S))
    agent = agent_on(bpf_env, egress)
    before = bytes(egress.lookup(FWD_KEY))
    assert agent._shift(Shift(conn_id=CONN_ID + 1, key=WIRE_KEY, start=S, end=wrap(S + 1), delta=0,
                              acked=0)) == Nack(conn_id=CONN_ID + 1, reason="unknown")
    assert bytes(egress.lookup(FWD_KEY)) == before
