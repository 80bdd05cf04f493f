"""The pure parts of the lifecycle: forwarding port choice and reservation
(handoff/ports.py), the agent's verdict on an entry (handoff/agent_lifecycle.py),
the timestamp margin in a connection's own clock units (handoff/translate.py)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, strategies as st

from arr.inet_diag import TcpState
from handoff.agent_lifecycle import FIRST_LOOK_NS, LOOKS, Verdict, next_look, verdict
from handoff.maps import FLOW_ACTIVE, FLOW_ENDED
from handoff.ports import PortRange, choose_port, merge, parse_port_list, reservation_text
from handoff.translate import TS_MARGIN, HandoffInputs, SocketState, compute_translations

S = 10**9


# ------------------------------------------------------------------ ports

def test_port_range_parsing_and_errors():
    assert PortRange.parse("50000-60999") == PortRange(50000, 60999)
    assert PortRange.parse(" 8080 ") == PortRange(8080, 8080)
    for bad in ("", "a-b", "60999-50000", "0-10", "1-70000"):
        with pytest.raises(ValueError):
            PortRange.parse(bad)
    assert len(PortRange(10, 19)) == 10 and 15 in PortRange(10, 19) and 20 not in PortRange(10, 19)


def test_reservation_adds_the_forwarding_range_once():
    forward = PortRange(50000, 60999)
    assert reservation_text("", forward) == "50000-60999"
    assert reservation_text("50000-60999\n", forward) is None
    assert reservation_text("40000-65535", forward) is None
    assert reservation_text("80,55000-62000", forward) == "80,50000-62000"
    assert reservation_text("1-10,49990-49999", forward) == "1-10,49990-60999"  # adjacent joins


@given(st.lists(st.tuples(st.integers(1, 65535), st.integers(0, 2000)), max_size=8),
       st.integers(1, 65535), st.integers(0, 5000))
def test_reservation_covers_old_and_new_ports_and_nothing_else(old, low, span):
    ranges = [PortRange(lo, min(65535, lo + n)) for lo, n in old]
    forward = PortRange(low, min(65535, low + span))
    current = ",".join(str(r) for r in ranges)
    text = reservation_text(current, forward)
    after = parse_port_list(text if text is not None else current)
    probe = random.Random(low).sample(range(1, 65536), 300) + [forward.low, forward.high]
    for port in probe:
        before_has = any(port in r for r in ranges)
        assert any(port in r for r in after) == (before_has or port in forward)
    if text is not None:
        assert after == merge(after)  # written sorted and joined


@given(st.sets(st.integers(100, 163)), st.integers(0, 1000))
def test_choose_port_finds_a_free_port_whenever_there_is_one(taken, seed):
    ports = PortRange(100, 163)
    port = choose_port(ports, lambda p: p not in taken, random.Random(seed), tries=4)
    if len(taken) == len(ports):
        assert port is None
    else:
        assert port in ports and port not in taken


# --------------------------------------------------------- the agent's verdict

LINGER = 1 * S


@pytest.mark.parametrize("state", [TcpState.ESTABLISHED, TcpState.SYN_RECV, TcpState.FIN_WAIT1,
                                   TcpState.FIN_WAIT2, TcpState.CLOSE_WAIT, TcpState.LAST_ACK,
                                   TcpState.CLOSING])
def test_a_live_socket_keeps_its_entry_however_long_it_is_silent(state):
    assert verdict(FLOW_ACTIVE, state, None, 10**6 * S, LINGER) is Verdict.LIVE
    assert verdict(FLOW_ACTIVE, state, 0, 10**6 * S, LINGER) is Verdict.LIVE  # came back to life


@pytest.mark.parametrize("state", [None, TcpState.TIME_WAIT, TcpState.CLOSE])
def test_an_entry_outlives_its_connection_by_the_linger_only(state):
    assert verdict(FLOW_ACTIVE, state, None, 100 * S, LINGER) is Verdict.LINGER
    assert verdict(FLOW_ACTIVE, state, 100 * S, 100 * S + LINGER - 1, LINGER) is Verdict.LINGER
    assert verdict(FLOW_ACTIVE, state, 100 * S, 100 * S + LINGER, LINGER) is Verdict.END


@pytest.mark.parametrize("state", [None, TcpState.ESTABLISHED, TcpState.TIME_WAIT])
def test_an_entry_whose_4_tuple_a_new_connection_took_ends_at_once(state):
    assert verdict(FLOW_ENDED, state, None, 0, LINGER) is Verdict.REPLACED


@pytest.mark.parametrize("state", [None, TcpState.TIME_WAIT, TcpState.CLOSE])
def test_without_a_linger_an_entry_ends_with_its_connection(state):
    """The default (linger 0): over at the target is the end, at first sight,
    so the forwarding port is free again at once (issue 9)."""
    assert verdict(FLOW_ACTIVE, state, None, 100 * S, 0) is Verdict.END
    assert verdict(FLOW_ACTIVE, TcpState.LAST_ACK, None, 100 * S, 0) is Verdict.LIVE


def test_a_closing_connection_is_looked_at_more_and_more_rarely_then_left_to_events():
    cap = 2 * S
    waits = [next_look(TcpState.LAST_ACK, n, cap) for n in range(1, LOOKS + 1)]
    assert waits[0] == FIRST_LOOK_NS and waits[-1] is None
    known = [w for w in waits if w is not None]
    assert known == sorted(known) and max(known) <= cap
    assert sum(known) < 10 * S  # a closing handshake's time, not a connection's life
    assert next_look(TcpState.CLOSING, 1, cap) == FIRST_LOOK_NS


@pytest.mark.parametrize("state", [TcpState.ESTABLISHED, TcpState.CLOSE_WAIT, TcpState.FIN_WAIT1,
                                   TcpState.FIN_WAIT2])
def test_a_socket_that_ends_with_a_packet_of_the_target_waits_for_its_event(state):
    """The target's FIN, RST or its ACK of the client's FIN passes the egress
    program, which reports it: no look until then (a held or half-closed
    connection costs nothing however long it lasts)."""
    assert next_look(state, 1, 2 * S) is None
    assert next_look(state, 1, 2 * S, budget=3, any_state=True) == FIRST_LOOK_NS  # the router asks
    assert next_look(state, 3, 2 * S, budget=3, any_state=True) is None


# ------------------------------------------------------- timestamp margin

def socket_state(clock: int, usec: bool) -> SocketState:
    return SocketState(local=("10.0.0.1", 80), remote=("10.0.0.2", 40000), snd_nxt=1, rcv_nxt=2,
                       snd_wscale=7, rcv_wscale=7, ts_clock=clock, timestamps=True, sack=True, mss=1448,
                       ts_usec=usec)


@pytest.mark.parametrize("client_usec, forward_usec", [(False, False), (True, True), (False, True),
                                                       (True, False)])
def test_timestamp_margin_is_the_same_time_in_each_connections_ticks(client_usec, forward_usec):
    inputs = HandoffInputs(client=socket_state(5000, client_usec), forward=socket_state(9000, forward_usec),
                           request_len=10, client_syn_tsval=100, target_tsval=300)
    to_target, to_client = compute_translations(inputs)
    # A translated TSval starts M ahead of the clock the peer knew from the router.
    assert to_client.tsval_delta == 5000 + TS_MARGIN * (1000 if client_usec else 1) - 300
    assert to_target.tsval_delta == 9000 + TS_MARGIN * (1000 if forward_usec else 1) - 100


# ---------------------------------------------------------------- the agent's look schedule


def test_suspects_due_at_the_same_time_are_all_taken_once() -> None:
    from handoff.agent_lifecycle import TargetConnections
    from handoff.maps import FlowKey

    agent = TargetConnections(datapath=None)  # type: ignore[arg-type]  # the schedule touches no map
    keys = [FlowKey.of(("10.0.0.11", 8080), ("10.0.0.1", 50000 + i)) for i in range(5)]
    agent.suspect(keys, now_ns=1000)  # equal times: keys are never compared
    agent.suspect(keys[:2], now_ns=1000)  # again: nothing new, nothing twice
    assert agent._next_due() == 1000
    assert sorted(agent._take_due(1000), key=lambda k: k.sport) == sorted(keys, key=lambda k: k.sport)
    assert agent._take_due(10**12) == []


def test_a_rescheduled_suspect_is_taken_at_its_new_time_only() -> None:
    from handoff.agent_lifecycle import TargetConnections
    from handoff.maps import FlowKey

    agent = TargetConnections(datapath=None)  # type: ignore[arg-type]
    key = FlowKey.of(("10.0.0.11", 8080), ("10.0.0.1", 50000))
    agent._schedule(key, (100, 0, 8, False))
    agent._schedule(key, (500, 1, 8, False))  # the item at 100 is stale now
    assert agent._take_due(200) == []
    assert agent._take_due(500) == [key]
