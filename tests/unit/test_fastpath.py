"""The compiled accelerator (handoff/_fastpath.c) against the Python reference
(handoff/tcpstate.py), on the same live sockets and on generated SYNs.

The extension must be built here (scripts/setup.sh builds it): a test run
that silently measured the reference twice would prove nothing. The socket
tests use TCP_REPAIR, so they need root, like tests/unit/test_tcpstate.py;
they fail, never skip, without it.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from handoff import fastpath, tcpstate

LOOPBACK = "127.0.0.1"


def test_the_extension_is_built() -> None:
    assert fastpath.COMPILED, "handoff._fastpath is not built: run scripts/setup.sh (setup.py build_ext)"


@pytest.fixture
def connection() -> Iterator[tuple[socket.socket, socket.socket, bytes]]:
    """(server side, client side, the saved SYN) of a loopback connection."""
    listener = socket.socket()
    listener.bind((LOOPBACK, 0))
    tcpstate.enable_saved_syn(listener)
    listener.listen()
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    syn = tcpstate.saved_syn(server)
    assert syn is not None
    try:
        yield server, client, syn
    finally:
        for sock in (server, client, listener):
            sock.close()


def settle(sock: socket.socket, inq: int) -> None:
    deadline = time.monotonic() + 2
    while tcpstate.queued(sock)[0] != inq:
        assert time.monotonic() < deadline, "bytes did not arrive"
        time.sleep(0.002)


def test_snapshot_matches_the_reference_on_a_quiet_connection(connection) -> None:
    server, client, _ = connection
    server.sendall(b"x" * 1000)
    client.recv(4096)
    time.sleep(0.02)  # the client's ACK is in
    reference = fastpath.snapshot_reference(server)
    compiled = fastpath.snapshot(server)
    # The timestamp clock ticks between the two reads (milliseconds, even
    # values); everything else is equal.
    assert 0 <= (compiled.tcp.ts_clock - reference.tcp.ts_clock) % (1 << 32) < 50
    assert compiled == replace(reference, tcp=replace(reference.tcp, ts_clock=compiled.tcp.ts_clock))
    assert compiled.tcp.snd_nxt == reference.tcp.snd_nxt and compiled.tcp.rcv_nxt == reference.tcp.rcv_nxt
    assert (compiled.state, compiled.inq, compiled.outq, compiled.urgent) == (tcpstate.TcpState.ESTABLISHED, 0, 0,
                                                                             False)
    assert not tcpstate.in_repair(server), "the compiled read leaves repair mode"


def test_snapshot_sees_the_same_queues_and_sequence_as_the_reference(connection) -> None:
    server, client, _ = connection
    client.sendall(b"abc" * 100)
    settle(server, 300)
    compiled, reference = fastpath.snapshot(server), fastpath.snapshot_reference(server)
    assert (compiled.inq, compiled.outq, compiled.outq_not_sent) == (reference.inq, reference.outq,
                                                                   reference.outq_not_sent) == (300, 0, 0)
    assert (compiled.tcp.snd_nxt, compiled.tcp.rcv_nxt) == (reference.tcp.snd_nxt, reference.tcp.rcv_nxt)
    assert compiled.tcp.local == reference.tcp.local and compiled.tcp.remote == reference.tcp.remote
    assert compiled.ineligible() == reference.ineligible() == "unread-data"


def test_snapshot_keeps_a_socket_that_was_in_repair_mode_in_it(connection) -> None:
    server, _, _ = connection
    tcpstate.enter_repair(server)
    try:
        fastpath.snapshot(server)
        assert tcpstate.in_repair(server)
    finally:
        tcpstate.leave_repair(server, window_probe=False)


def test_eligibility_unacked_and_drain_match_the_reference(connection) -> None:
    server, client, _ = connection
    assert fastpath.ineligible(server) == fastpath.ineligible_reference(server) is None
    client.sendall(b"pipelined")
    settle(server, 9)
    assert fastpath.ineligible(server) == fastpath.ineligible_reference(server) == "unread-data"
    assert fastpath.drain(server) == b"pipelined"
    assert fastpath.drain(server) == fastpath.drain_reference(server) == b""
    client.sendall(b"more")
    settle(server, 4)
    assert fastpath.drain_reference(server) == b"more"
    assert fastpath.unacked(server) == fastpath.unacked_reference(server) == 0
    client.send(b"!", socket.MSG_OOB)
    time.sleep(0.02)
    assert fastpath.ineligible(server) == fastpath.ineligible_reference(server) == "urgent-data"
    client.shutdown(socket.SHUT_WR)
    time.sleep(0.02)
    server.recv(1, socket.MSG_OOB)
    assert fastpath.ineligible(server) == fastpath.ineligible_reference(server) == "half-closed"


def test_errors_are_oserrors_like_the_reference() -> None:
    sock = socket.socket()
    try:
        with pytest.raises(OSError):
            fastpath.snapshot(sock)
        with pytest.raises(OSError):
            fastpath.snapshot_reference(sock)
    finally:
        sock.close()


def test_parse_syn_of_a_kernel_syn_matches(connection) -> None:
    _, _, syn = connection
    assert fastpath.parse_syn(syn) == fastpath.parse_syn_reference(syn)


# --- Generated SYNs: same fields, or both refuse ---

def ipv4_tcp(options: bytes, *, flags: int = 0x02, version: int = 4, ihl: int = 5, proto: int = 6,
             data_offset: int | None = None, truncate: int | None = None) -> bytes:
    ip = bytes([version << 4 | ihl, 0]) + struct.pack("!H", 0) + b"\0" * 4 + bytes([64, proto]) + b"\0\0" + \
        socket.inet_aton("10.1.2.3") + socket.inet_aton("10.9.8.7") + b"\0" * max(0, ihl * 4 - 20)
    offset = data_offset if data_offset is not None else (20 + len(options) + 3) // 4
    tcp = struct.pack("!HHIIBBHHH", 40000, 80, 0xDEADBEEF, 0, offset << 4, flags, 65535, 0, 0)
    padded = options + b"\0" * (-len(options) % 4)
    frame = ip + tcp + padded
    return frame[:truncate] if truncate is not None else frame


def option(kind: int, body: bytes) -> bytes:
    return bytes([kind, len(body) + 2]) + body


OPTION = st.one_of(
    st.builds(lambda v: option(2, struct.pack("!H", v)), st.integers(0, 0xFFFF)),
    st.builds(lambda v: option(3, bytes([v])), st.integers(0, 255)),
    st.just(option(4, b"")),
    st.builds(lambda a, b: option(8, struct.pack("!II", a, b)), st.integers(0, 2**32 - 1),
              st.integers(0, 2**32 - 1)),
    st.just(b"\x01"), st.just(b"\x00"),
    st.builds(lambda k, body: option(k, body), st.integers(5, 254), st.binary(max_size=6)),
    st.binary(min_size=1, max_size=4),  # anything: bad lengths, lone kinds
)


def both(frame: bytes) -> tuple[object, object]:
    def run(parse):
        try:
            return parse(frame)
        except ValueError:
            return ValueError
    return run(fastpath.parse_syn), run(fastpath.parse_syn_reference)


@settings(max_examples=400, deadline=None)
@given(st.lists(OPTION, max_size=8))
def test_parse_syn_agrees_on_generated_options(options: list[bytes]) -> None:
    compiled, reference = both(ipv4_tcp(b"".join(options)[:40]))
    assert compiled == reference


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=80))
def test_parse_syn_agrees_on_arbitrary_bytes(frame: bytes) -> None:
    compiled, reference = both(frame)
    assert compiled == reference


@pytest.mark.parametrize("frame", [
    ipv4_tcp(b"", flags=0x10),                  # not a SYN
    ipv4_tcp(b"", version=6),
    ipv4_tcp(b"", proto=17),
    ipv4_tcp(b"", ihl=4),
    ipv4_tcp(b"", data_offset=4),
    ipv4_tcp(option(2, b"\x05"), truncate=None),  # MSS of length 3
    ipv4_tcp(b"\x02"),                         # kind without a length
    ipv4_tcp(b"", truncate=30),
])
def test_parse_syn_refuses_what_the_reference_refuses(frame: bytes) -> None:
    assert both(frame) == (ValueError, ValueError)


# ------------------------------------------------------------------ restore (handoff/rebuild.py)

def restore_plan(local: tuple[str, int], remote: tuple[str, int], **fields) -> "SocketPlan":
    from handoff.rebuild import SocketPlan

    values = dict(local=local, remote=remote, snd_nxt=0xFFFF_FF00, rcv_nxt=0x7000_0000, mss=1400, snd_wscale=7,
                  rcv_wscale=9, sack=True, timestamps=True, ts_clock=0xFFFF_FFF0, snd_wnd=29200 << 7,
                  snd_wl1=0x6FFF_FFF0, received=b"GET /next HTTP/1.1\r\n\r\n", rto_min_us=20_000, rto_max_ms=1000)
    values.update(fields)
    return SocketPlan(**values)


def repaired_state(sock: socket.socket) -> tuple:
    """Everything a rebuild sets, read back while the socket is in repair mode."""
    from handoff.rebuild import TCP_REPAIR_WINDOW, _REPAIR_WINDOW

    tcp = socket.IPPROTO_TCP
    assert tcpstate.in_repair(sock)
    sequence = tcpstate.read_sequence(sock)  # stays in repair mode
    window = _REPAIR_WINDOW.unpack(sock.getsockopt(tcp, TCP_REPAIR_WINDOW, _REPAIR_WINDOW.size))
    sock.setsockopt(tcp, tcpstate.TCP_REPAIR_QUEUE, tcpstate.TCP_RECV_QUEUE)
    queued = sock.recv(65536, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    sock.setsockopt(tcp, tcpstate.TCP_REPAIR_QUEUE, tcpstate.TCP_NO_QUEUE)
    basics = tcpstate.tcp_basics(sock)
    bounds = tuple(sock.getsockopt(tcp, option) for option in (tcpstate.TCP_RTO_MIN_US, tcpstate.TCP_RTO_MAX_MS))
    return (sock.getsockname(), sock.getpeername(), sequence, window, queued, basics, bounds,
            sock.getsockopt(tcp, socket.TCP_MAXSEG))


@pytest.mark.parametrize("timestamps", [True, False])
def test_restore_builds_what_the_reference_builds(timestamps: bool) -> None:
    """The same plan through the compiled call and the Python steps, each
    socket kept in repair mode (nothing sent: the peer need not exist) and
    read back: every value the same."""
    from handoff.rebuild import repair_options, restore_reference

    free = socket.socket()
    free.bind((LOOPBACK, 0))
    local = free.getsockname()
    free.close()
    plan = restore_plan(local, (LOOPBACK, 9), timestamps=timestamps)
    states = []
    for build in ("compiled", "reference"):
        sock = socket.socket()
        try:
            if build == "compiled":
                fastpath.restore(sock, plan, repair_options(plan), None)
            else:
                restore_reference(sock, plan, None)
            states.append(repaired_state(sock))
        finally:
            sock.close()  # in repair mode: silent
    assert states[0] == states[1]
    _, _, (snd_nxt, rcv_nxt), window, queued, basics, _, _ = states[0]
    assert (snd_nxt, rcv_nxt) == (plan.snd_nxt, plan.rcv_end)  # the queued bytes count as received
    assert window[:3] == (plan.snd_wl1, plan.snd_wnd, plan.snd_wnd) and queued == plan.received
    assert basics.timestamps == timestamps and basics.sack


def test_restored_socket_talks_to_the_live_peer(connection) -> None:
    """A live connection's server side closed silently and restored by the
    compiled call where it stood: the client's bytes reach the new socket
    (after the ones the plan queued), the new socket's reach the client."""
    from handoff.rebuild import rebuild_socket

    server, client, _ = connection
    client.sendall(b"ping")
    settle(server, 4)
    assert server.recv(4) == b"ping"
    server.sendall(b"pong")
    assert client.recv(4) == b"pong"
    time.sleep(0.02)  # the client's ACK is in
    snap = fastpath.snapshot(server)
    info = snap.tcp
    # The receive queue ends where the client's stream stands: its last
    # bytes, as far as the client knows, are these (a take-back's request).
    queued = b"queued:"
    plan = restore_plan(info.local, info.remote, snd_nxt=info.snd_nxt, rcv_nxt=(info.rcv_nxt - len(queued)) % (1 << 32),
                        mss=min(info.mss, 1400),
                        snd_wscale=info.snd_wscale, rcv_wscale=info.rcv_wscale, sack=info.sack,
                        timestamps=info.timestamps, ts_clock=(info.ts_clock + 1000) % (1 << 32),
                        snd_wnd=65535, snd_wl1=info.rcv_nxt, received=queued)
    tcpstate.close_silently(server)
    rebuilt = rebuild_socket(plan, window_probe=True)
    try:
        assert not tcpstate.in_repair(rebuilt)
        client.sendall(b"after")
        rebuilt.setblocking(True)
        rebuilt.settimeout(2)
        got = b""
        while len(got) < len(b"queued:after"):
            got += rebuilt.recv(64)
        assert got == b"queued:after"
        rebuilt.sendall(b"back")
        client.settimeout(2)
        assert client.recv(4) == b"back"
    finally:
        rebuilt.close()
