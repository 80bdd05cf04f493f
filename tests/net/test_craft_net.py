"""The segments a migration sends on a connection's behalf (handoff/craft.py),
against real TCP sockets in a namespace of their own: a probe one below what
the client acknowledged is answered at once and changes nothing; a RST at the
receiver's rcv_nxt resets it; without CAP_NET_RAW the sender says so."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from arr import netlink
from handoff import craft, tcpstate

pytestmark = pytest.mark.net

LOOPBACK = "127.0.0.1"
PROJECT_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def connection(ns: str) -> Iterator[tuple[socket.socket, socket.socket, craft.RawSender]]:
    """(client, server side, a raw sender in the namespace), 1000 bytes served and read."""
    listener = netlink.socket_in_netns(ns)
    listener.bind((LOOPBACK, 0))
    listener.listen(4)
    client = netlink.socket_in_netns(ns)
    client.settimeout(2)
    client.connect(listener.getsockname())
    server, _ = listener.accept()
    server.settimeout(2)
    server.sendall(b"r" * 1000)
    got = b""
    while len(got) < 1000:
        got += client.recv(4096)
    sender = craft.RawSender()
    assert netlink.run_in_netns(ns, sender.ready), sender.error
    try:
        yield client, server, sender
    finally:
        sender.close()
        for sock in (client, server, listener):
            sock.close()


def settle() -> None:
    time.sleep(0.05)


def test_a_probe_is_answered_at_once_and_changes_nothing(connection):
    client, server, sender = connection
    settle()  # the client's ACK of the 1000 bytes is in
    server_next, client_next = tcpstate.read_sequence(server, window_probe=False)
    before = tcpstate.tcp_info(server).segs_in
    assert sender.send(craft.probe(server.getsockname(), client.getsockname(),
                                   client_acked=server_next, client_next=client_next))
    settle()
    assert tcpstate.tcp_info(server).segs_in == before + 1  # the client's duplicate ACK
    # Nothing else happened: the connection carries on both ways.
    server.sendall(b"after")
    assert client.recv(100) == b"after"
    client.sendall(b"back")
    assert server.recv(100) == b"back"


def test_a_reset_at_rcv_nxt_resets_the_receiver(connection):
    client, server, sender = connection
    settle()
    server_next, _ = tcpstate.read_sequence(server, window_probe=False)
    assert sender.send(craft.reset(server.getsockname(), client.getsockname(), server_next))
    settle()
    with pytest.raises(ConnectionResetError):
        client.recv(100)


def test_a_reset_off_rcv_nxt_is_not_accepted(connection):
    client, server, sender = connection
    settle()
    server_next, _ = tcpstate.read_sequence(server, window_probe=False)
    # In the window but not exact: RFC 5961 answers with a challenge ACK.
    assert sender.send(craft.reset(server.getsockname(), client.getsockname(), server_next + 10))
    settle()
    server.sendall(b"still")
    assert client.recv(100) == b"still"


def test_without_cap_net_raw_the_sender_says_why():
    probe = ("from handoff.craft import RawSender, probe\n"
             "s = RawSender()\n"
             "print(s.ready(), s.send(probe(('10.0.0.1', 80), ('10.0.0.2', 1), client_acked=5, client_next=6)),"
             " s.failed, s.error)\n")
    out = subprocess.run(["setpriv", "--bounding-set=-net_raw", sys.executable, "-c", probe],
                         capture_output=True, text=True, cwd=PROJECT_ROOT, check=True).stdout
    assert out.startswith("False False 1 no raw socket") and "CAP_NET_RAW" in out, out
