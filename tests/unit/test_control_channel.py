"""The control channel over asyncio, on 127.0.0.1 only."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from handoff.control import (
    Ack, Closed, ControlClient, ControlConnection, ControlServer, ControlUnavailable, FlowKey,
    HandoffRequest, Hello, Nack, Ping, StopMirror,
)
from handoff.control.frames import MessageType, encode_frame, encode_payload, hello_key
from control_support import handoff_request, until

LOOPBACK = "127.0.0.1"
PSK = b"0123456789abcdef0123456789abcdef"
KEY = FlowKey(saddr="127.0.0.2", daddr="127.0.0.3", sport=40000, dport=80)


def handoff(conn_id: int) -> HandoffRequest:
    return handoff_request(conn_id, KEY)


class Agent:
    """A handler: ACKs even conn_ids, NACKs odd ones, records the rest."""

    def __init__(self) -> None:
        self.received: list = []
        self.sessions: list = []

    async def on_message(self, session, message) -> None:
        self.received.append(message)
        self.sessions.append(session)
        if isinstance(message, HandoffRequest):
            if message.conn_id % 2:
                await session.send(Nack(message.conn_id, reason="odd"))
            else:
                await session.send(Ack(message.conn_id))


@pytest.fixture
async def channel():
    """A started server and a connected client: (server, client, agent, unsolicited)."""
    made = []

    async def make(**client_kwargs):
        agent = Agent()
        server = ControlServer(PSK, "agent-1", agent, LOOPBACK, 0)
        await server.start()
        unsolicited: list = []
        client = ControlClient(PSK, "router-1", LOOPBACK, server.port, on_message=unsolicited.append,
                               **client_kwargs)
        made.append((server, client))
        await client.start()
        await client.wait_connected(5)
        return server, client, agent, unsolicited

    yield make
    for server, client in made:
        await client.stop()
        await server.stop()


async def test_handoff_request_ack_and_nack(channel):
    server, client, agent, _ = await channel()
    assert client.connected and client.peer_node_id == "agent-1"
    assert await client.request(handoff(42), timeout=2) == Ack(42)
    assert await client.request(handoff(43), timeout=2) == Nack(43, reason="odd")
    assert agent.received == [handoff(42), handoff(43)]
    assert agent.sessions[0].peer_node_id == "router-1"


async def test_concurrent_requests_are_correlated_by_conn_id(channel):
    server, client, agent, _ = await channel()
    replies = await asyncio.gather(*(client.request(handoff(i), timeout=2) for i in range(20)))
    assert replies == [Ack(i) if i % 2 == 0 else Nack(i, "odd") for i in range(20)]


async def test_fire_and_forget_and_server_push(channel):
    server, client, agent, unsolicited = await channel()
    await client.send(StopMirror(conn_id=5, key=KEY))
    await until(lambda: agent.received == [StopMirror(conn_id=5, key=KEY)])
    [session] = server.sessions
    closed = Closed(conn_id=5, key=KEY, packets=10, bytes=12345, flags=3)
    await session.send(closed)
    await until(lambda: unsolicited == [closed])


async def test_request_times_out(channel):
    server, client, agent, _ = await channel()

    async def silent(session, message):
        pass

    server._on_message = silent
    started = time.monotonic()
    with pytest.raises(asyncio.TimeoutError):
        await client.request(handoff(2), timeout=0.1)
    assert time.monotonic() - started < 1
    assert client.connected  # a missing answer is not a broken connection


async def forge(port: int, data: bytes) -> bytes:
    """Send DATA on a raw connection; what comes back before the server closes."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    writer.write(data)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), 2)
    finally:
        writer.close()


async def test_forged_frames_are_rejected_counted_and_isolated(channel):
    server, client, agent, _ = await channel()
    _, hello = encode_payload(Hello("x", b"n" * 32))
    forged = [
        encode_frame(MessageType.HELLO, 0, hello, b"not the key" * 3),        # bad MAC
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",                                 # oversize
        encode_frame(MessageType.HANDOFF, 0, encode_payload(handoff(1))[1], hello_key(PSK)),  # before HELLO
    ]
    for data in forged:
        assert await forge(server.port, data) == b""  # closed without an answer
    assert server.rejected == {"bad-mac": 1, "oversize": 1, "handshake": 1}
    # the legitimate session is untouched
    assert client.connected and client.connects == 1
    assert await client.request(handoff(8), timeout=2) == Ack(8)


async def test_frame_injected_into_an_established_raw_session_is_rejected(channel):
    """A peer that knows the key but breaks the counter is cut off alone."""
    server, client, agent, _ = await channel()
    conn = ControlConnection("client", PSK, "intruder")
    reader, writer = await asyncio.open_connection(LOOPBACK, server.port)
    writer.write(conn.start())
    conn.receive_data(await reader.read(4096))
    assert conn.established
    writer.write(conn.data_to_send())  # the PROOF
    await until(lambda: len(server.sessions) == 2)
    first = conn.send(Ping(1))
    writer.write(first)
    assert conn.receive_data(await asyncio.wait_for(reader.read(4096), 2)) == [Ping(1, reply=True)]
    writer.write(first)  # a replay
    assert await asyncio.wait_for(reader.read(), 2) == b""  # closed
    writer.close()
    assert server.rejected == {"replay": 1}
    await until(lambda: len(server.sessions) == 1)
    assert await client.request(handoff(10), timeout=2) == Ack(10)


async def test_wrong_psk_client_is_rejected_and_not_connected():
    server = ControlServer(PSK, "agent-1", Agent(), LOOPBACK, 0)
    await server.start()
    client = ControlClient(b"another key of 16+ bytes", "router-1", LOOPBACK, server.port)
    try:
        await client.start()
        await until(lambda: server.rejected["bad-mac"] >= 1)
        assert not client.connected
        with pytest.raises(ControlUnavailable):
            await client.request(handoff(2), timeout=1)
    finally:
        await client.stop()
        await server.stop()


async def test_client_reconnects_after_server_restart(channel):
    server, client, agent, _ = await channel()
    port = server.port
    assert await client.request(handoff(2), timeout=2) == Ack(2)
    await server.stop()
    await until(lambda: not client.connected)
    with pytest.raises(ControlUnavailable):
        await client.request(handoff(4), timeout=1)
    restarted = ControlServer(PSK, "agent-2", agent, LOOPBACK, port)
    await restarted.start()
    try:
        await until(lambda: client.connected)
        assert client.connects == 2 and client.peer_node_id == "agent-2"
        assert await client.request(handoff(6), timeout=2) == Ack(6)
    finally:
        await restarted.stop()


async def test_pending_request_fails_when_the_connection_drops(channel):
    server, client, agent, _ = await channel()
    entered = asyncio.Event()

    async def stall(session, message):
        entered.set()
        await asyncio.sleep(10)

    server._on_message = stall
    task = asyncio.ensure_future(client.request(handoff(2), timeout=5))
    await entered.wait()
    started = time.monotonic()
    await server.stop()
    with pytest.raises(ControlUnavailable):
        await task
    assert time.monotonic() - started < 1


async def test_request_while_disconnected_fails_promptly():
    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind((LOOPBACK, 0))
        port = probe.getsockname()[1]
    client = ControlClient(PSK, "router-1", LOOPBACK, port)
    await client.start()
    try:
        started = time.monotonic()
        with pytest.raises(ControlUnavailable):
            await client.request(handoff(2), timeout=5)
        with pytest.raises(ControlUnavailable):
            await client.send(StopMirror(conn_id=2, key=KEY))
        assert time.monotonic() - started < 0.1
        assert not client.connected
    finally:
        await client.stop()


async def test_backoff_doubles_up_to_the_maximum(monkeypatch):
    """Connection attempts to a dead port: delays double from the first, capped."""
    import handoff.control.channel as channel_module

    delays: list[float] = []
    real_sleep = asyncio.sleep

    async def record(delay, *args):
        delays.append(delay)
        await real_sleep(0)

    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        port = probe.getsockname()[1]
    client = ControlClient(PSK, "r", LOOPBACK, port, backoff_initial=0.1, backoff_max=0.8)
    monkeypatch.setattr(channel_module.asyncio, "sleep", record)
    await client.start()
    try:
        deadline = time.monotonic() + 5
        while len(delays) < 7 and time.monotonic() < deadline:
            await real_sleep(0.001)  # (asyncio.sleep is patched)
    finally:
        monkeypatch.setattr(channel_module.asyncio, "sleep", real_sleep)
        await client.stop()
    caps = [0.1, 0.2, 0.4, 0.8, 0.8, 0.8, 0.8]
    assert len(delays) >= 7
    for delay, cap in zip(delays, caps):
        assert cap * 0.5 <= delay <= cap  # jitter: half to all of the step


async def test_dead_peer_is_detected_by_ping_and_client_reconnects():
    """An agent that completes the handshake but never answers PINGs."""
    accepted: list[asyncio.StreamWriter] = []

    async def mute(reader, writer):
        accepted.append(writer)
        conn = ControlConnection("server", PSK, "mute")
        while data := await reader.read(4096):
            conn.receive_data(data)
            writer.write(conn.data_to_send())  # the HELLO; PINGs go unanswered

    fake = await asyncio.start_server(mute, LOOPBACK, 0)
    port = fake.sockets[0].getsockname()[1]
    client = ControlClient(PSK, "r", LOOPBACK, port, ping_interval=0.05, ping_timeout=0.1)
    await client.start()
    try:
        await client.wait_connected(2)
        await until(lambda: client.connects >= 2, timeout=5)
    finally:
        await client.stop()
        fake.close()
        for writer in accepted:
            writer.close()
        await fake.wait_closed()


async def test_pings_keep_a_healthy_connection(channel):
    server, client, agent, _ = await channel(ping_interval=0.02, ping_timeout=0.5)
    await asyncio.sleep(0.2)  # about ten PING rounds
    assert client.connected and client.connects == 1
    assert agent.received == []  # PINGs are answered by the server, not handed on


async def test_server_drops_a_silent_router():
    server = ControlServer(PSK, "agent-1", Agent(), LOOPBACK, 0, handshake_timeout=0.1)
    await server.start()
    try:
        reader, writer = await asyncio.open_connection(LOOPBACK, server.port)
        assert await asyncio.wait_for(reader.read(), 2) == b""
        writer.close()
        assert server.rejected == {"handshake-timeout": 1}  # silence is counted too
    finally:
        await server.stop()


async def test_client_counts_a_bad_frame_from_the_agent_and_reconnects():
    """A bogus agent (right key) that sends a frame with a skipped counter."""
    accepted: list[asyncio.StreamWriter] = []

    async def bogus(reader, writer):
        accepted.append(writer)
        conn = ControlConnection("server", PSK, "bogus")
        conn.receive_data(await reader.read(4096))
        writer.write(conn.data_to_send())
        while not conn.established:
            conn.receive_data(await reader.read(4096))  # the PROOF
        conn.send(Ack(1))  # counter 1 never goes out
        writer.write(conn.send(Ack(2)))
        await reader.read()

    fake = await asyncio.start_server(bogus, LOOPBACK, 0)
    client = ControlClient(PSK, "r", LOOPBACK, fake.sockets[0].getsockname()[1])
    await client.start()
    try:
        await until(lambda: client.rejected["replay"] >= 2)  # reconnected and refused again
    finally:
        await client.stop()
        fake.close()
        for writer in accepted:
            writer.close()
        await fake.wait_closed()
