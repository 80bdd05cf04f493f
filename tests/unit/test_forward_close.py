"""handoff/forward_close.py's schedule of looks at a closed forwarding
connection, as a pure function, and the kernel behaviour it relies on
(loopback sockets; the destroy needs root, as CI runs)."""

from __future__ import annotations

import socket
import time

import pytest

from arr import netlink
from arr.inet_diag import TcpState
from handoff.forward_close import LOOKS, TIME_WAIT_HOLD, CloseStep, close_step
from handoff.tcpstate import socket_cookie, tcp_state


def test_first_look_is_at_the_end_of_the_time_wait_hold():
    # The server's retransmitted FIN must still find TIME_WAIT: no look, and
    # so no destroy, before the hold is over.
    assert LOOKS[0] == TIME_WAIT_HOLD >= 0.6  # covers an RTO of 200 ms, then 400 ms


@pytest.mark.parametrize("look", range(len(LOOKS)))
def test_a_socket_the_connection_left_is_destroyed_at_any_look(look):
    # CLOSE: the kernel moved the connection into a TIME_WAIT socket.
    assert close_step(TcpState.CLOSE, look) == CloseStep("destroy")


@pytest.mark.parametrize("state", [TcpState.FIN_WAIT1, TcpState.FIN_WAIT2, TcpState.CLOSING,
                                   TcpState.LAST_ACK, TcpState.ESTABLISHED])
def test_a_close_not_done_is_looked_at_again_then_quarantined(state):
    steps = [close_step(state, look) for look in range(len(LOOKS))]
    assert steps[:-1] == [CloseStep("look", delay) for delay in LOOKS[1:]]
    assert steps[-1] == CloseStep("quarantine")  # the server never answered the FIN


def test_an_unreadable_state_is_looked_at_again_then_counts_as_over():
    steps = [close_step(None, look) for look in range(len(LOOKS))]
    assert steps[:-1] == [CloseStep("look", delay) for delay in LOOKS[1:]]
    assert steps[-1] == CloseStep("free")


# ------------------------------------------------- what close_step relies on


@pytest.fixture
def loopback_pair():
    """A connected loopback TCP pair (client, server); closed after the test."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    try:
        yield client, server
    finally:
        client.close()
        server.close()


def _state_becomes(sock: socket.socket, state: TcpState) -> bool:
    deadline = time.monotonic() + 2
    while tcp_state(sock) != state and time.monotonic() < deadline:
        time.sleep(0.005)
    return tcp_state(sock) == state


def test_the_time_wait_socket_keeps_the_cookie_read_before_the_fin(loopback_pair):
    # ForwardCloser's premise, on the real kernel: after both FINs the
    # router's (still open) socket is CLOSE, and a TIME_WAIT socket with the
    # cookie it had holds the 4-tuple, until destroyed by that cookie.
    client, server = loopback_pair
    local, remote = client.getsockname(), client.getpeername()
    cookie = socket_cookie(client)
    client.shutdown(socket.SHUT_WR)
    assert _state_becomes(client, TcpState.FIN_WAIT2)
    server.close()
    assert _state_becomes(client, TcpState.CLOSE)
    found = netlink.tcp_sockets_of(None, [(local, remote)])[(local, remote)]
    assert found is not None and found.state == TcpState.TIME_WAIT and found.cookie == cookie
    assert netlink.destroy_tcp_socket(None, local, remote, cookie=cookie)
    assert netlink.tcp_sockets_of(None, [(local, remote)])[(local, remote)] is None


def test_a_server_that_has_not_closed_leaves_the_socket_in_fin_wait2(loopback_pair):
    client, _server = loopback_pair
    client.shutdown(socket.SHUT_WR)
    assert _state_becomes(client, TcpState.FIN_WAIT2)
    assert close_step(tcp_state(client), 0).action == "look"
