"""handoff/forward_close.py's schedule of looks at a closed forwarding
connection, as a pure function: no root, no sockets."""

from __future__ import annotations

import pytest

from arr.inet_diag import TcpState
from handoff.forward_close import LOOKS, TIME_WAIT_HOLD, CloseStep, close_step


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

