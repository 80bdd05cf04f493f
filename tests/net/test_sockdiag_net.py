"""arr.netlink's sock_diag functions against the real kernel, in a throw-away namespace.

Each test gets a fresh namespace with only ``lo`` up, so the kernel's TCP
table holds exactly the sockets the test made; no packet leaves it. Packet
counts come from the namespace's own /proc/net/snmp. Needs root: fails, never
skips, without it.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import time
import uuid
from typing import Callable, Iterator

import pytest

from arr import inet_diag, netlink
from arr.inet_diag import TcpSocket, TcpState
from arr.netlink import Address

pytestmark = pytest.mark.net

LOOPBACK = "127.0.0.1"


class Sockets:
    """Makes sockets inside the namespace; closes them all at teardown."""

    def __init__(self, ns: str):
        self.ns = ns
        self.made: list[socket.socket] = []

    def new(self, port: int = 0, host: str = LOOPBACK) -> socket.socket:
        sock = netlink.socket_in_netns(self.ns)
        self.made.append(sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.settimeout(2.0)
        return sock

    def listener(self) -> tuple[socket.socket, Address]:
        sock = self.new()
        sock.listen(64)
        return sock, sock.getsockname()

    def pair(self, listener: socket.socket, client_port: int = 0,
             client_host: str = LOOPBACK) -> tuple[socket.socket, socket.socket]:
        """(client, accepted server side) of a new connection to LISTENER."""
        client = self.new(client_port, client_host)
        client.connect(listener.getsockname())
        accepted, _ = listener.accept()
        self.made.append(accepted)
        accepted.settimeout(2.0)
        return client, accepted

    def close(self) -> None:
        for sock in self.made:
            sock.close()


@pytest.fixture
def sockets(ns: str) -> Iterator[Sockets]:
    made = Sockets(ns)
    try:
        yield made
    finally:
        made.close()


def ends(sock: socket.socket) -> tuple[Address, Address]:
    return sock.getsockname(), sock.getpeername()


def inode(sock: socket.socket) -> int:
    return os.fstat(sock.fileno()).st_ino


def tcp_counters(ns: str) -> dict[str, int]:
    """The namespace's Tcp: line of /proc/net/snmp (OutSegs, OutRsts, ...)."""

    def read() -> dict[str, int]:
        with open("/proc/thread-self/net/snmp") as f:  # thread-self: this thread's namespace
            names, values = (line.split()[1:] for line in f if line.startswith("Tcp:"))
        return dict(zip(names, map(int, values)))

    return netlink.run_in_netns(ns, read)


def wait_for(predicate: Callable[[], object], what: str, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def state_of(ns: str, local: Address, remote: Address) -> TcpState | None:
    found = netlink.tcp_socket(ns, local, remote)
    return found.state if found else None


def time_wait_on_server_side(ns: str, sockets: Sockets) -> tuple[socket.socket, Address, Address]:
    """A connection closed by the server first, then by the client: the
    server's end is left in TIME_WAIT. Returns (listener, server end, client end)."""
    listener, _ = sockets.listener()
    client, accepted = sockets.pair(listener)
    server_end, client_end = ends(accepted)
    accepted.close()
    assert client.recv(1) == b""  # the server's FIN arrived
    client.close()
    wait_for(lambda: state_of(ns, server_end, client_end) == TcpState.TIME_WAIT, "TIME_WAIT")
    return listener, server_end, client_end


# ------------------------------------------------------------------ listing


def test_dump_finds_the_established_pair(ns, sockets):
    listener, server = sockets.listener()
    client, accepted = sockets.pair(listener)
    found = netlink.tcp_sockets(ns)  # default: every state but LISTEN
    assert {(s.local, s.remote, s.state) for s in found} == {
        (client.getsockname(), server, TcpState.ESTABLISHED),
        (server, client.getsockname(), TcpState.ESTABLISHED),
    }
    by_local = {s.local: s for s in found}
    assert by_local[client.getsockname()].inode == inode(client)
    assert by_local[server].inode == inode(accepted)
    assert all(s.uid == 0 for s in found)  # root made them
    assert len({s.cookie for s in found}) == 2

    everything = netlink.tcp_sockets(ns, states=TcpState)
    [listening] = [s for s in everything if s.state == TcpState.LISTEN]
    assert (listening.local, listening.remote, listening.inode) == (server, ("0.0.0.0", 0), inode(listener))
    assert netlink.tcp_sockets(ns, states=[TcpState.LISTEN]) == [listening]
    assert netlink.tcp_sockets(ns, states=[]) == []


def test_queues_are_reported(ns, sockets):
    listener, _ = sockets.listener()
    client, accepted = sockets.pair(listener)
    client.sendall(b"x" * 1000)
    wait_for(lambda: netlink.tcp_socket(ns, *ends(accepted)).rqueue == 1000, "1000 unread bytes")


def test_notsent_counts_what_the_peer_s_window_holds_back(ns, sockets):
    """What the agent asks before letting a connection go (handoff/agent.py
    ``_unsent``): bytes written that the peer's full window keeps unsent."""
    listener, _ = sockets.listener()
    client, accepted = sockets.pair(listener)
    assert netlink.tcp_socket(ns, *ends(accepted), info=True).notsent == 0
    assert netlink.tcp_socket(ns, *ends(accepted)).notsent is None  # not asked for
    accepted.setblocking(False)
    written = 0
    try:
        while True:  # the client reads nothing: its window closes, the rest stays unsent
            written += accepted.send(b"x" * 65536)
    except BlockingIOError:
        pass
    found = netlink.tcp_socket(ns, *ends(accepted), info=True)
    assert 0 < found.notsent <= written and found.wqueue >= found.notsent
    received = 0
    while received < written:  # reading opens the window: the rest goes out
        received += len(client.recv(1 << 20))
    wait_for(lambda: netlink.tcp_socket(ns, *ends(accepted), info=True).notsent == 0, "all sent once read")


def test_local_port_filter_returns_only_that_servers_sockets(ns, sockets):
    listener, server = sockets.listener()
    other_listener, _ = sockets.listener()
    pairs = [sockets.pair(listener) for _ in range(3)]
    sockets.pair(other_listener)

    found = netlink.tcp_sockets(ns, local_port=server[1])
    assert sorted((s.local, s.remote) for s in found) == sorted(ends(accepted) for _, accepted in pairs)
    assert {s.state for s in found} == {TcpState.ESTABLISHED}

    with_listener = netlink.tcp_sockets(ns, states=TcpState, local_port=server[1])
    assert sorted(s.state for s in with_listener) == [TcpState.ESTABLISHED] * 3 + [TcpState.LISTEN]

    client = pairs[0][0]
    [client_side] = netlink.tcp_sockets(ns, local_port=client.getsockname()[1])
    assert (client_side.local, client_side.remote) == ends(client)


def test_big_dump_spans_many_datagrams(ns, sockets):
    """700 TIME_WAIT sockets: far more than one ~32 KiB reply datagram."""
    listener, server = sockets.listener()
    clients = []
    for i in range(700):
        # a client address each (all of 127/8 is on lo): a port picked twice
        # would make a new connection take over an old one's TIME_WAIT
        client, accepted = sockets.pair(listener, client_host=f"127.1.{i // 200}.{i % 200 + 1}")
        clients.append(client.getsockname())
        accepted.close()
        assert client.recv(1) == b""
        client.close()
    wait_for(lambda: len(netlink.tcp_sockets(ns, states=[TcpState.TIME_WAIT], local_port=server[1])) == 700,
             "700 sockets in TIME_WAIT")
    found = netlink.tcp_sockets(ns, states=[TcpState.TIME_WAIT], local_port=server[1])
    assert sorted(s.remote for s in found) == sorted(clients)
    assert len({s.cookie for s in found}) == 700


# ------------------------------------------------------------------ exact lookup


def test_exact_lookup(ns, sockets):
    listener, server = sockets.listener()
    client, accepted = sockets.pair(listener)
    found = netlink.tcp_socket(ns, *ends(accepted))
    assert found is not None
    assert found in netlink.tcp_sockets(ns)
    assert (found.local, found.remote, found.state, found.inode) == (*ends(accepted), TcpState.ESTABLISHED,
                                                                     inode(accepted))
    assert netlink.tcp_socket(ns, (LOOPBACK, 1), (LOOPBACK, 2)) is None


def test_lookup_of_a_missing_connection_is_none_even_where_the_kernel_answers_with_the_listener(ns, sockets):
    listener, server = sockets.listener()
    missing = (LOOPBACK, 1)
    # What the kernel itself answers: the listener on that local address.
    raw = netlink.socket_in_netns(ns, socket.AF_NETLINK, socket.SOCK_RAW, inet_diag.NETLINK_SOCK_DIAG)
    with raw:
        raw.send(inet_diag.lookup_request(server, missing))
        answered, _, err = inet_diag.parse_messages(raw.recv(65536))
    assert err in (None, 0)
    assert [(s.local, s.remote, s.state) for s in answered] == [(server, ("0.0.0.0", 0), TcpState.LISTEN)]

    assert netlink.tcp_socket(ns, server, missing) is None


def test_missing_namespace_is_an_error():
    with pytest.raises(netlink.NetlinkOpError, match="does not exist"):
        netlink.tcp_sockets(f"arrdiag-missing-{uuid.uuid4().hex[:6]}")


# ------------------------------------------------------------------ SOCK_DESTROY


def test_time_wait_after_server_closes_first_then_destroyed_without_a_packet(ns, sockets):
    listener, server_end, client_end = time_wait_on_server_side(ns, sockets)
    [waiting] = netlink.tcp_sockets(ns, states=[TcpState.TIME_WAIT])
    assert (waiting.local, waiting.remote, waiting.inode) == (server_end, client_end, 0)
    assert netlink.tcp_sockets(ns) == [waiting]  # the client's end is gone (closed by the FIN exchange)

    before = tcp_counters(ns)
    assert netlink.destroy_tcp_socket(ns, server_end, client_end) is True
    assert tcp_counters(ns)["OutSegs"] == before["OutSegs"]  # descheduled, nothing sent
    assert netlink.tcp_socket(ns, server_end, client_end) is None
    assert netlink.tcp_sockets(ns) == []

    # the same 4-tuple again, right away
    client, accepted = sockets.pair(listener, client_port=client_end[1])
    assert ends(accepted) == (server_end, client_end)
    assert state_of(ns, server_end, client_end) == TcpState.ESTABLISHED
    assert netlink.destroy_tcp_socket(ns, server_end, client_end, cookie=waiting.cookie) is False  # long gone


def test_client_time_wait_blocks_its_4_tuple_until_destroyed(ns, sockets):
    # Without timestamps the kernel cannot tell a new connection from an old
    # one's late segments, so a TIME_WAIT end refuses its 4-tuple to connect()
    # (with them, twsk_unique already lets a bound connect() take it over).
    netlink.sysctl_set(ns, {"net.ipv4.tcp_timestamps": 0})
    listener, server = sockets.listener()
    client, accepted = sockets.pair(listener)
    client_end = client.getsockname()
    client.close()  # client first: its end goes FIN_WAIT2, then TIME_WAIT
    assert accepted.recv(1) == b""
    accepted.close()
    wait_for(lambda: state_of(ns, client_end, server) == TcpState.TIME_WAIT, "TIME_WAIT")

    blocked = sockets.new(client_end[1])
    with pytest.raises(OSError) as refused:
        blocked.connect(server)
    assert refused.value.errno == errno.EADDRNOTAVAIL

    assert netlink.destroy_tcp_socket(ns, client_end, server) is True
    again = sockets.new(client_end[1])
    again.connect(server)
    assert ends(again) == (client_end, server)


def test_destroying_an_established_socket_resets_the_peer_and_aborts_the_owner(ns, sockets):
    listener, server = sockets.listener()
    client, accepted = sockets.pair(listener)
    before = tcp_counters(ns)
    assert netlink.destroy_tcp_socket(ns, *ends(accepted)) is True
    after = tcp_counters(ns)
    assert after["OutRsts"] - before["OutRsts"] == 1

    with pytest.raises(ConnectionResetError):
        client.recv(1)
    with pytest.raises(ConnectionAbortedError) as aborted:
        accepted.recv(1)
    assert aborted.value.errno == errno.ECONNABORTED
    assert netlink.tcp_sockets(ns) == []
    assert netlink.destroy_tcp_socket(ns, server, client.getsockname()) is False  # already closed


def test_destroying_a_request_socket_drops_it_silently(ns, sockets):
    # TCP_DEFER_ACCEPT keeps the completed handshake a request socket until data comes.
    listener = sockets.new()
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 30)
    listener.listen(8)
    server = listener.getsockname()
    client = sockets.new()
    client.connect(server)
    client_end = client.getsockname()
    wait_for(lambda: state_of(ns, server, client_end) == TcpState.SYN_RECV, "a request socket")
    [request] = netlink.tcp_sockets(ns, local_port=server[1])
    assert (request.local, request.remote, request.state, request.inode) == (server, client_end,
                                                                             TcpState.SYN_RECV, 0)
    assert netlink.tcp_sockets(ns, states=[TcpState.NEW_SYN_RECV]) == [request]

    before = tcp_counters(ns)
    assert netlink.destroy_tcp_socket(ns, server, client_end) is True
    assert tcp_counters(ns)["OutSegs"] == before["OutSegs"]  # the client is not told
    assert netlink.tcp_sockets(ns, local_port=server[1]) == []
    assert state_of(ns, client_end, server) == TcpState.ESTABLISHED
    assert netlink.tcp_sockets(ns, states=[TcpState.LISTEN]) != []  # the listener is untouched


def test_destroying_a_missing_socket_is_false_and_spares_the_listener(ns, sockets):
    listener, server = sockets.listener()
    [listening] = netlink.tcp_sockets(ns, states=[TcpState.LISTEN])
    assert netlink.destroy_tcp_socket(ns, server, (LOOPBACK, 1)) is False
    assert netlink.destroy_tcp_socket(ns, server, (LOOPBACK, 1), cookie=listening.cookie + 1) is False
    assert netlink.destroy_tcp_socket(ns, (LOOPBACK, 1), (LOOPBACK, 2)) is False
    assert netlink.tcp_sockets(ns, states=[TcpState.LISTEN]) == [listening]
    client, accepted = sockets.pair(listener)  # still accepting
    assert isinstance(netlink.tcp_socket(ns, *ends(accepted)), TcpSocket)


def test_kept_sock_diag_looks_up_and_destroys_many_on_one_socket(ns, sockets):
    # What the router's ForwardCloser and the agents do: one SockDiag, a
    # lookup and a destroy per closed connection, many in a row; a miss or a
    # stale cookie on the way leaves the kept socket usable.
    listener, server = sockets.listener()
    opened = [sockets.pair(listener) for _ in range(20)]  # at once: no port reused meanwhile
    waiting = [ends(accepted) for _, accepted in opened]
    for client, accepted in opened:
        accepted.close()
        assert client.recv(1) == b""
        client.close()
    for server_end, client_end in waiting:
        wait_for(lambda: state_of(ns, server_end, client_end) == TcpState.TIME_WAIT, "TIME_WAIT")
    diag = netlink.SockDiag(ns)
    try:
        before = tcp_counters(ns)
        for server_end, client_end in waiting:
            found = diag.sockets_of([(server_end, client_end)])[(server_end, client_end)]
            assert found is not None and found.state == TcpState.TIME_WAIT
            assert diag.destroy(server_end, client_end, found.cookie + 1) is False  # not that socket
            assert diag.destroy(server_end, client_end, found.cookie) is True
            assert diag.destroy(server_end, client_end, found.cookie) is False  # gone
            assert diag.sockets_of([(server_end, client_end)]) == {(server_end, client_end): None}
        assert tcp_counters(ns)["OutSegs"] == before["OutSegs"]  # TIME_WAIT ends silently
        assert diag.destroy(server, (LOOPBACK, 1)) is False  # a miss by 4-tuple spares the listener
        assert [s.local for s in netlink.tcp_sockets(ns, states=TcpState)] == [server]
    finally:
        diag.close()



def test_a_sock_diag_socket_waits_in_the_kernel_and_a_missing_reply_is_an_error(ns, monkeypatch):
    # Blocking, with the kernel's receive and send timeouts: Python's own
    # timeout would poll before every send and receive (the agents ask at
    # every ended connection). A reply that never comes still ends the wait.
    monkeypatch.setattr(netlink, "_DIAG_TIMEOUT", 0.2)
    with netlink._open_sock_diag(ns) as sock:
        assert sock.gettimeout() is None
        timeval = struct.Struct("@ll")
        for option in (socket.SO_RCVTIMEO, socket.SO_SNDTIMEO):
            assert timeval.unpack(sock.getsockopt(socket.SOL_SOCKET, option, timeval.size)) == (0, 200_000)
        started = time.monotonic()
        with pytest.raises(BlockingIOError):
            sock.recv(64)  # nothing asked: nothing comes
        assert 0.15 < time.monotonic() - started < 2.0
