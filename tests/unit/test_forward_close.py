"""handoff/forward_close.py's schedule of looks at a closed forwarding
connection, as a pure function: no root, no sockets."""

from __future__ import annotations

import pytest

from arr.inet_diag import TcpState
from handoff.forward_close import LOOKS, TIME_WAIT_HOLD, CloseStep, close_step, time_wait_proven


def test_first_look_is_at_the_end_of_the_time_wait_hold():
    # The server's retransmitted FIN must still find TIME_WAIT: no look, and
    # so no destroy, before the hold is over.
    assert LOOKS[0] == TIME_WAIT_HOLD >= 0.6  # covers an RTO of 200 ms, then 400 ms


@pytest.mark.parametrize("look", range(len(LOOKS)))
def test_time_wait_is_destroyed_at_any_look(look):
    assert close_step(TcpState.TIME_WAIT, look) == CloseStep("destroy")


@pytest.mark.parametrize("look", range(len(LOOKS)))
def test_a_socket_already_gone_frees_the_port(look):
    assert close_step(None, look) == CloseStep("free")


@pytest.mark.parametrize("state", [TcpState.FIN_WAIT1, TcpState.FIN_WAIT2, TcpState.CLOSING,
                                   TcpState.LAST_ACK, TcpState.ESTABLISHED])
def test_a_close_not_done_is_looked_at_again_then_quarantined(state):
    steps = [close_step(state, look) for look in range(len(LOOKS))]
    assert steps[:-1] == [CloseStep("look", delay) for delay in LOOKS[1:]]
    assert steps[-1] == CloseStep("quarantine")  # the server never answered the FIN


def test_unanswered_looks_retry_then_count_as_gone():
    steps = [close_step(None, look, answered=False) for look in range(len(LOOKS))]
    assert steps[:-1] == [CloseStep("look", delay) for delay in LOOKS[1:]]
    assert steps[-1] == CloseStep("free")



def test_a_target_fin_that_acknowledges_the_routers_proves_time_wait():
    # The router's FIN at seq 1000; the target's FIN acknowledges 1001.
    assert time_wait_proven(1000, 1001)
    assert time_wait_proven(0xFFFFFFFE, 0xFFFFFFFF)
    # A FIN at 0xFFFFFFFF is acknowledged by 0, which the entry cannot tell
    # from "no FIN seen": one close in 2**32 is looked up.
    assert not time_wait_proven(0xFFFFFFFF, 0)


@pytest.mark.parametrize("fin_seq, target_fin_ack", [
    (1000, 0),      # no FIN from the target yet: looked up
    (1000, 1000),   # its FIN crossed the router's (CLOSING until the ACK): looked up
    (1000, 999),    # a FIN acknowledging less (sent before the router's FIN)
    (None, 1001),   # the FIN's seq is not known (a pool connection closed unused)
])
def test_anything_else_is_looked_up(fin_seq, target_fin_ack):
    assert not time_wait_proven(fin_seq, target_fin_ack)
