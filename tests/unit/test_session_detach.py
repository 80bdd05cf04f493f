"""ClientSession.detach / reattach on real loopback TCP, on asyncio and on uvloop.

The handoff engine's fallback path: detach the client connection (the session
lets go of its transport; nothing goes on the wire), try, then reattach the
socket with whatever was read from it meanwhile, and the router proxies the
same request on the same connection and serves what the client pipelined.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any, Awaitable, Callable

import pytest
import uvloop

import arr
from arr import Handoff, Local, LocalResponse, Target, TargetState
from arr.config import Limits, config_from_dict
from arr.metrics import Metrics
from arr.session import ClientGone, ClientSession, DetachError

LOOPBACK = "127.0.0.1"
LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
TCP_ESTABLISHED = 1


@pytest.fixture(params=sorted(LOOPS))
def run(request) -> Callable[[Callable[[], Awaitable[Any]]], Any]:
    """Run a test coroutine on a fresh loop of each kind (the router runs on uvloop)."""
    def run(main: Callable[[], Awaitable[Any]]) -> Any:
        with asyncio.Runner(loop_factory=LOOPS[request.param]) as runner:
            return runner.run(asyncio.wait_for(main(), 20))
    return run


def request_bytes(path: str, method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode()


def tcp_state(sock: socket.socket) -> int:
    return struct.unpack("B", sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1))[0]


async def assert_silent(client: socket.socket, seconds: float = 0.05) -> None:
    """Nothing arrives at the client: no byte, no EOF (FIN), no RST."""
    loop_end = asyncio.get_running_loop().time() + seconds
    while True:
        with pytest.raises(BlockingIOError):
            client.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK)
        assert tcp_state(client) == TCP_ESTABLISHED
        if asyncio.get_running_loop().time() >= loop_end:
            return
        await asyncio.sleep(0.005)


def drain(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return b"".join(chunks)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


async def connect(address: tuple[str, int]) -> socket.socket:
    client = socket.socket()
    client.setblocking(False)
    await asyncio.get_running_loop().sock_connect(client, address)
    return client


async def read_responses(client: socket.socket, count: int, timeout: float = 5.0) -> list[tuple[int, bytes]]:
    """``count`` responses (all with Content-Length), as (status, body)."""
    import h11

    loop = asyncio.get_running_loop()
    conn = h11.Connection(h11.CLIENT)
    out: list[tuple[int, bytes]] = []
    status, body = 0, b""
    while len(out) < count:
        if conn.our_state is h11.IDLE:  # h11 wants a request per response it parses
            conn.send(h11.Request(method="GET", target="/", headers=[("host", "t")]))
            conn.send(h11.EndOfMessage())
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await asyncio.wait_for(loop.sock_recv(client, 65536), timeout)
            conn.receive_data(data)
            continue
        if isinstance(event, h11.Response):
            status, body = event.status_code, b""
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            out.append((status, body))
            conn.start_next_cycle()
        else:
            raise AssertionError(f"unexpected {event!r}")
    return out


async def start_upstream() -> tuple[asyncio.AbstractServer, int]:
    """A tiny HTTP/1.1 target answering 200 'up:<path>' (keep-alive)."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ", 2)[1]
                body = b"up:" + path
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, LOOPBACK, 0)
    return server, server.sockets[0].getsockname()[1]


class FallbackEngine:
    """A handoff engine that always falls back, through detach and reattach.

    ``while_detached(session, sock)`` runs between the two; ``drain`` says
    whether the bytes that arrived meanwhile are read from the socket (and
    given to reattach) or left in the kernel for the new transport.
    """

    def __init__(self, while_detached: Callable[..., Awaitable[None]] | None = None,
                 drain: bool = True) -> None:
        self.while_detached = while_detached
        self.drain = drain
        self.pending: list[bytes] = []
        self.drained: list[bytes] = []

    async def start(self, router: Any) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def hand_off(self, session: ClientSession, request: Any, head: Any, target: Any) -> str | None:
        sock, pending = session.detach()
        assert session.detached and session.unsent_bytes == 0
        self.pending.append(pending)
        if self.while_detached is not None:
            await self.while_detached(session, sock)
        data = drain(sock) if self.drain else b""
        self.drained.append(data)
        await session.reattach(sock, data)
        assert not session.detached
        return "test-fallback"


async def start_router(engine: FallbackEngine, upstream_port: int,
                       before_handoff: Callable[[str], Awaitable[None]] | None = None) -> arr.Router:
    target = TargetState(Target(LOOPBACK, upstream_port))

    async def policy(request: arr.Request) -> Any:
        if request.path.startswith("/h"):
            if before_handoff is not None:
                await before_handoff(request.path)
            return Handoff(target)
        return Local(lambda r: LocalResponse(200, b"local:" + r.path.encode()))

    config = config_from_dict({"router": {"listen": f"{LOOPBACK}:0", "mode": "proxy",
                                          "access_log": False}})
    router = arr.Router(config, policy=policy, handoff=engine)
    await router.start()
    return router


@pytest.mark.parametrize("drained", [True, False], ids=["drained", "left-in-kernel"])
def test_fallback_detach_reattach_serves_pipelined_requests_in_order(run, drained):
    async def main() -> None:
        upstream, port = await start_upstream()
        loop = asyncio.get_running_loop()
        client: socket.socket | None = None
        a, b1, b2, b3 = (request_bytes(p) for p in ("/h1", "/b1", "/b2", "/b3"))

        async def before_handoff(path: str) -> None:
            # The head of /h1 was parsed with /b1 behind it (h11's trailing
            # data); /b2 arrives now, held by the session but not yet parsed.
            assert client is not None
            if path == "/h1":
                await loop.sock_sendall(client, b2)
                await asyncio.sleep(0.05)

        async def while_detached(session: ClientSession, sock: socket.socket) -> None:
            assert client is not None
            await assert_silent(client)
            await loop.sock_sendall(client, b3)  # sent while detached
            await asyncio.sleep(0.05)
            await assert_silent(client)

        engine = FallbackEngine(while_detached, drain=drained)
        router = await start_router(engine, port, before_handoff)
        try:
            client = await connect(router.address)
            await loop.sock_sendall(client, a + b1)
            responses = await read_responses(client, 4)
            assert responses == [(200, b"up:/h1"), (200, b"local:/b1"), (200, b"local:/b2"),
                                 (200, b"local:/b3")]
            assert engine.pending == [b1 + b2]  # trailing data, then held bytes, in order
            assert engine.drained == [b3 if drained else b""]
            assert router.metrics.value("arr_handoff_fallbacks_total", {"reason": "test-fallback"}) == 1
            # the same connection goes on serving, handing off again
            await loop.sock_sendall(client, request_bytes("/h2") + request_bytes("/b4"))
            assert await read_responses(client, 2) == [(200, b"up:/h2"), (200, b"local:/b4")]
            assert engine.pending[1] == request_bytes("/b4")
            client.close()
        finally:
            await router.shutdown(timeout=0.5)
            upstream.close()

    run(main)


async def _bare_session() -> tuple[asyncio.AbstractServer, "asyncio.Queue[ClientSession]"]:
    """A listener whose sessions are handed to the test, served by nobody."""
    sessions: asyncio.Queue[ClientSession] = asyncio.Queue()
    limits, metrics = Limits(), Metrics()

    def serve(session: ClientSession) -> None:
        sessions.put_nowait(session)
        return None

    server = await asyncio.get_running_loop().create_server(
        lambda: ClientSession(limits, metrics, serve), LOOPBACK, 0)
    return server, sessions


def test_detach_returns_held_bytes_and_sends_nothing(run):
    async def main() -> None:
        server, sessions = await _bare_session()
        loop = asyncio.get_running_loop()
        client = await connect(server.sockets[0].getsockname()[:2])
        session = await sessions.get()
        sent = request_bytes("/one") + request_bytes("/two")
        await loop.sock_sendall(client, sent)
        await asyncio.sleep(0.05)
        sock, pending = session.detach()
        assert pending == sent  # nothing consumed yet: every byte comes back
        assert sock.getpeername() == client.getsockname()
        assert not sock.getblocking()
        await asyncio.sleep(0.05)  # the old transport is closed by now
        await assert_silent(client, 0.05)
        # the dup is the connection, intact: it carries bytes both ways
        sock.setblocking(True)
        sock.sendall(b"hello")
        client.setblocking(True)
        assert client.recv(5) == b"hello"
        client.sendall(b"x")
        assert sock.recv(1) == b"x"
        sock.close()
        assert client.recv(1) == b""  # the owner's close is the one that ends it
        client.close()
        server.close()

    run(main)


def test_close_of_a_detached_session_does_nothing(run):
    async def main() -> None:
        server, sessions = await _bare_session()
        client = await connect(server.sockets[0].getsockname()[:2])
        session = await sessions.get()
        sock, pending = session.detach()
        assert pending == b""
        await session.close()
        await asyncio.sleep(0.05)
        await assert_silent(client)
        assert tcp_state(sock) == TCP_ESTABLISHED
        with pytest.raises(ClientGone):
            await session.send_raw(b"x")  # a detached session writes nothing
        await assert_silent(client, 0.02)
        with pytest.raises(DetachError):
            session.detach()  # twice: nothing to detach
        sock.close()
        client.close()
        server.close()

    run(main)


def test_detach_refused_while_response_bytes_are_unsent(run):
    async def main() -> None:
        server, sessions = await _bare_session()
        loop = asyncio.get_running_loop()
        client = await connect(server.sockets[0].getsockname()[:2])
        session = await sessions.get()
        big = b"z" * (32 << 20)  # more than the kernel's buffers take
        with pytest.raises(TimeoutError):  # the client reads nothing: the write waits
            await asyncio.wait_for(session.send_raw(big), 0.2)
        unsent = session.unsent_bytes
        assert unsent > 0
        with pytest.raises(DetachError, match="not yet sent"):
            session.detach()
        assert not session.detached and session.unsent_bytes == unsent  # nothing changed
        received = 0
        while received < len(big):  # once the client read it all, detach works
            data = await loop.sock_recv(client, 1 << 20)
            assert data
            received += len(data)
        for _ in range(100):
            if session.unsent_bytes == 0:
                break
            await asyncio.sleep(0.01)
        assert session.unsent_bytes == 0
        sock, pending = session.detach()
        assert pending == b""
        await asyncio.sleep(0.02)
        await assert_silent(client)
        sock.close()
        client.close()
        server.close()

    run(main)


def test_reattach_continues_the_same_h11_state(run):
    """Detach in the middle of a request head: the rest, sent while detached,
    completes it after reattach."""
    async def main() -> None:
        server, sessions = await _bare_session()
        loop = asyncio.get_running_loop()
        client = await connect(server.sockets[0].getsockname()[:2])
        session = await sessions.get()
        whole = request_bytes("/split") + request_bytes("/next")
        await loop.sock_sendall(client, whole[:10])
        reading = asyncio.ensure_future(session.read_request())
        await asyncio.sleep(0.05)
        assert not reading.done()  # half a head: h11 holds it
        sock, pending = session.detach()
        assert pending == whole[:10]
        await loop.sock_sendall(client, whole[10:20])
        await asyncio.sleep(0.02)
        drained = drain(sock)
        assert drained == whole[10:20]
        await loop.sock_sendall(client, whole[20:])  # left in the kernel
        await session.reattach(sock, drained)
        request, head, body = await asyncio.wait_for(reading, 2)
        assert request.path == "/split" and body.complete
        await session.send_complete(200, b"ok")
        assert session.finish_exchange()
        second = await session.read_request()
        assert second is not None and second[0].path == "/next"
        await session.send_complete(200, b"ok2")
        assert await read_responses(client, 2) == [(200, b"ok"), (200, b"ok2")]
        assert session.finish_exchange()
        client.close()  # the reattached transport sees the client leave
        assert await asyncio.wait_for(session.read_request(), 2) is None
        await session.close()
        server.close()

    run(main)


def test_reattach_requires_a_detached_session(run):
    async def main() -> None:
        server, sessions = await _bare_session()
        client = await connect(server.sockets[0].getsockname()[:2])
        session = await sessions.get()
        other = socket.socket()
        with pytest.raises(RuntimeError):
            await session.reattach(other)
        other.close()
        client.close()
        await asyncio.sleep(0.05)
        assert await session.read_request() is None  # the client left
        await session.close()
        with pytest.raises(DetachError):
            session.detach()  # closed: nothing to detach
        server.close()

    run(main)


def test_reading_pauses_while_held_bytes_are_not_consumed(run):
    """Flow control: a client that sends faster than the session consumes is
    held back by TCP, not buffered without bound; consuming resumes reading."""
    async def main() -> None:
        server, sessions = await _bare_session()
        loop = asyncio.get_running_loop()
        client = await connect(server.sockets[0].getsockname()[:2])
        session = await sessions.get()
        size = 64 << 20
        body = b"b" * size
        data = memoryview(b"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % size + body)
        sent = 0
        stalls = 0
        while stalls < 20 and sent < len(data):  # until the kernel refuses; the loop reads meanwhile
            try:
                sent += client.send(data[sent:sent + (1 << 20)])
            except BlockingIOError:
                stalls += 1
            await asyncio.sleep(0.002)
        assert sent < 16 << 20, f"{sent} bytes taken without being consumed"
        sender = asyncio.ensure_future(loop.sock_sendall(client, data[sent:]))
        request, _head, request_body = await session.read_request()
        assert request.body is None  # larger than body_buffer: it streams
        got = 0
        async for chunk in request_body.chunks():
            got += len(chunk)
        await sender
        assert got == size and request_body.complete
        client.close()
        await session.close()
        server.close()

    run(main)


def test_fallback_for_a_half_closed_client_still_answers(run):
    """The client sent its request and its FIN before the detach: after the
    reattach the request is answered, then the connection is closed."""
    async def main() -> None:
        upstream, port = await start_upstream()
        loop = asyncio.get_running_loop()
        client: socket.socket | None = None

        async def before_handoff(path: str) -> None:
            await asyncio.sleep(0.05)  # the FIN has reached the session by now

        engine = FallbackEngine()
        router = await start_router(engine, port, before_handoff)
        try:
            client = await connect(router.address)
            await loop.sock_sendall(client, request_bytes("/h-half"))
            client.shutdown(socket.SHUT_WR)
            assert await read_responses(client, 1) == [(200, b"up:/h-half")]
            assert await asyncio.wait_for(loop.sock_recv(client, 1), 5) == b""  # then closed
            assert engine.pending == [b""]
            client.close()
        finally:
            await router.shutdown(timeout=0.5)
            upstream.close()

    run(main)
