"""The control channel over asyncio: the agent's server, the router's client.

Both drive a sans-IO ``ControlConnection`` (``frames.py``). A connection that
breaks the protocol, or any limit below, is counted in ``rejected[reason]``
(``CHANNEL_REASONS`` beside the protocol's ``REASONS``), logged in one line
(rate-limited: ``RejectionLog``) and closed; nothing else is affected.

* ``ControlServer`` (agent): accepts routers; hands every message but PING to
  ``handler.on_message(session, message)`` (awaited, in order, per
  connection) and answers PINGs itself. ``sessions`` holds the proven
  sessions only: a peer is in it, and gets anything but the handshake, only
  once its PROOF verified. Connections are bounded in total, per peer
  address, and while unproven (``max_sessions``, ``max_sessions_per_address``,
  ``max_handshakes``); the handshake must complete within
  ``handshake_timeout`` of the accept, a started frame within ``frame_timeout``.
* ``ControlClient`` (router): keeps one connection to one agent up,
  reconnecting with exponential backoff (``on_connect`` messages go first on
  each new connection); ``request`` for HANDOFF -> ACK/NACK,
  ``send``/``post`` for fire-and-forget; PINGs the agent and reconnects when
  it stops answering.

Every send on either side is queued, never awaited (``FrameSender``): the
bytes waiting for a peer are bounded, and a peer that leaves bytes untaken
for ``send_timeout`` seconds is dropped (``slow-reader``). So nothing, the
agent's cleanup and report loop included, ever waits on a peer that does not
read.

``load_psk`` reads the key file.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import itertools
import logging
import os
import random
import socket
import stat
import string
from pathlib import Path
from typing import Any, Callable

from handoff.control.outbound import (
    DEFAULT_MAX_HANDSHAKES, DEFAULT_MAX_SESSIONS, DEFAULT_MAX_SESSIONS_PER_ADDRESS,
    DEFAULT_SEND_BUFFER, DEFAULT_SEND_TIMEOUT, ControlUnavailable, FrameSender, RejectionLog, peer_name,
)
from handoff.control.frames import (
    Ack, ControlConnection, ControlError, Established, HandoffRequest, Message, Nack, Ping, SeenNonces, Shift,
    Taken, TakeBack,
)
from handoff.connecting import connect
from handoff.tcpstate import bound_retransmissions

log = logging.getLogger("arr.control")

_READ = 65536


# ------------------------------------------------------------------ the key


def load_psk(path: str | os.PathLike[str], *, strict: bool = False) -> bytes:
    """The pre-shared key in PATH.

    The content, stripped of surrounding whitespace, is either hex (at least
    32 hex digits, i.e. 16 bytes; an even number) or raw bytes (at least 16).
    Content made only of hex digits is always read as hex, so it must then
    have 32 digits or more.

    Raises ``ValueError`` with a clear message when the file is missing,
    unreadable, empty or too short. A file readable by group or others is
    logged as a warning on the ``arr.control`` logger and the key returned
    anyway; with ``strict=True`` that is a ``ValueError`` too.
    """
    p = Path(path)
    try:
        mode = p.stat().st_mode
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"control key file {str(p)!r} does not exist") from None
    except OSError as exc:
        raise ValueError(f"control key file {str(p)!r} cannot be read: {exc.strerror or exc}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        message = (f"control key file {str(p)!r} is accessible by group or others "
                   f"(mode {stat.S_IMODE(mode):04o}); chmod 600 it")
        if strict:
            raise ValueError(message)
        log.warning("%s", message)
    key = raw.strip()
    if not key:
        raise ValueError(f"control key file {str(p)!r} is empty")
    hexdigits = set(string.hexdigits.encode())
    if all(b in hexdigits for b in key):
        if len(key) < 32:
            raise ValueError(f"control key in {str(p)!r} is too short: {len(key)} hex digits, need at least 32")
        if len(key) % 2:
            raise ValueError(f"control key in {str(p)!r} has an odd number of hex digits ({len(key)})")
        return bytes.fromhex(key.decode())
    if len(key) < 16:
        raise ValueError(f"control key in {str(p)!r} is too short: {len(key)} bytes, need at least 16 "
                         "(or 32 hex digits)")
    return key


# ------------------------------------------------------------------ helpers

def _expire(future: "asyncio.Future[Any]") -> None:
    if not future.done():
        future.set_exception(asyncio.TimeoutError())


async def _maybe_await(result: Any) -> None:
    if inspect.isawaitable(result):
        await result


async def _close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), 1.0)
    except (ConnectionError, OSError, asyncio.TimeoutError):
        pass


# ------------------------------------------------------------------ server


class ServerSession:
    """One router's connection, as the agent's handler sees it (proven: the
    handler sees no other)."""

    def __init__(self, conn: ControlConnection, writer: asyncio.StreamWriter, sender: FrameSender) -> None:
        self.conn = conn
        self.writer = writer
        self.sender = sender
        self.peer = peer_name(writer)
        self.closed = False
        self.proven = False
        """Set once the peer's PROOF verified (and stays set after the close)."""

    @property
    def peer_node_id(self) -> str | None:
        """The router's node id, once it proved it holds the key (None before)."""
        return self.conn.peer_node_id

    @property
    def peer_host(self) -> str:
        """The router's address on this connection (without the port)."""
        return self.peer.rsplit(":", 1)[0]

    def post(self, message: Message) -> None:
        """Queue MESSAGE; never waits. ControlUnavailable (a ConnectionError)
        once the session is gone, before it is proven, or when the router
        does not read (the session is then dropped)."""
        if self.closed or not self.conn.established or not self.sender.usable:
            raise ControlUnavailable(f"control session with {self.peer} is closed or not proven")
        self.sender.write(self.conn.send(message))

    async def send(self, message: Message) -> None:
        """As ``post`` (kept awaitable for handlers): it never waits for the peer."""
        self.post(message)

    def close(self) -> None:
        self.closed = True
        self.conn.close()
        self.sender.close()
        self.writer.close()

    def __repr__(self) -> str:
        return f"<ServerSession {self.peer_node_id!r} at {self.peer}>"


class ControlServer:
    """The agent's end: ``handler.on_message(session, message)`` is called for
    every message but PING (a plain callable ``handler(session, message)`` is
    accepted too; either may be a coroutine function) of proven sessions."""

    def __init__(self, psk: bytes, node_id: str, handler: Any, host: str = "127.0.0.1", port: int = 0,
                 *, handshake_timeout: float = 5.0, idle_timeout: float | None = 60.0,
                 frame_timeout: float = 5.0, max_sessions: int = DEFAULT_MAX_SESSIONS,
                 max_sessions_per_address: int = DEFAULT_MAX_SESSIONS_PER_ADDRESS,
                 max_handshakes: int = DEFAULT_MAX_HANDSHAKES, send_buffer: int = DEFAULT_SEND_BUFFER,
                 send_timeout: float = DEFAULT_SEND_TIMEOUT, remembered_hellos: int = 4096,
                 socket_send_buffer: int | None = 256 * 1024, stop_timeout: float = 1.0,
                 rto_min_us: int = 0) -> None:
        self.psk = psk
        self.node_id = node_id
        self.host = host
        self.port = port
        self.handshake_timeout = handshake_timeout
        """From the accept to a verified PROOF."""
        self.idle_timeout = idle_timeout
        """A router that sends nothing (not even its PINGs) for this long is dropped."""
        self.frame_timeout = frame_timeout
        """A proven router's frame, once begun, must be complete within this."""
        self.max_sessions = max_sessions
        """Connections at once, proven or not."""
        self.max_sessions_per_address = max_sessions_per_address
        self.max_handshakes = max_handshakes
        """Unproven connections at once."""
        self.send_buffer = send_buffer
        self.send_timeout = send_timeout
        self.socket_send_buffer = socket_send_buffer
        """SO_SNDBUF of each connection: what the kernel holds for a router that
        does not read is bounded too, and the send deadline starts soon after."""
        self.rto_min_us = rto_min_us
        """Retransmission timeout floor of each connection (0: the kernel's):
        a lost frame holds up a handoff for as long as it takes to resend."""
        self.stop_timeout = stop_timeout
        self._on_message: Callable[..., Any] = getattr(handler, "on_message", handler)
        self.rejected: collections.Counter[str] = collections.Counter()
        self.sessions: set[ServerSession] = set()
        """Proven sessions."""
        self.log_rejection = RejectionLog(log)
        self._seen = SeenNonces(remembered_hellos)
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._per_address: collections.Counter[str] = collections.Counter()
        self._handshaking = 0

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def connections(self) -> int:
        """Connections open now, proven or not."""
        return len(self._writers)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port, reuse_address=True,
                                                  limit=2 * 65536)
        for listening in self._server.sockets:
            # Accepted connections inherit it before their first RTT sample.
            bound_retransmissions(listening, min_us=self.rto_min_us)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Close the listener and every connection at once, then wait (bounded)
        for the tasks: on Python 3.12+ ``wait_closed`` waits for every open
        connection, so they go first, and the wait is bounded anyway."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for session in list(self.sessions):
            session.close()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=self.stop_timeout)
        if server is not None:
            try:
                await asyncio.wait_for(server.wait_closed(), self.stop_timeout)
            except asyncio.TimeoutError:
                log.warning("control: listener not closed within %.1fs; going on", self.stop_timeout)
        self.sessions.clear()
        self.log_rejection.flush()
        if self.rejected:
            log.info("control: connections rejected while running: %s",
                     ", ".join(f"{r} {n}" for r, n in sorted(self.rejected.items())))

    def reject(self, reason: str, peer: str, detail: str) -> None:
        """Count and log (rate-limited) one rejection."""
        self.rejected[reason] += 1
        self.log_rejection(reason, peer, detail)

    def _refusal(self, host: str) -> tuple[str, str] | None:
        if len(self._writers) >= self.max_sessions:
            return "too-many-sessions", f"{len(self._writers)} connections open (max_sessions)"
        if self._per_address[host] >= self.max_sessions_per_address:
            return "too-many-from-address", f"{self._per_address[host]} open from {host} (max_sessions_per_address)"
        if self._handshaking >= self.max_handshakes:
            return "too-many-handshakes", f"{self._handshaking} handshakes under way (max_handshakes)"
        return None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = peer_name(writer)
        host = peer.rsplit(":", 1)[0]
        refusal = self._refusal(host)
        if refusal is not None:
            self.reject(refusal[0], peer, refusal[1])
            writer.transport.abort()  # no FIN dance, no buffers: the fd goes now
            return
        if self.socket_send_buffer is not None:
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.socket_send_buffer)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self._per_address[host] += 1
        self._handshaking += 1
        session = ServerSession(ControlConnection("server", self.psk, self.node_id, seen_nonces=self._seen),
                                writer, FrameSender(writer, max_bytes=self.send_buffer, deadline=self.send_timeout,
                                                    on_give_up=lambda reason, detail: self.reject(reason, peer,
                                                                                                  detail)))
        try:
            await self._converse(reader, session)
        except (ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            # stop(): end quietly; a cancelled task here makes asyncio's
            # start_server log an error for it.
            pass
        finally:
            if not session.proven:
                self._handshaking -= 1
            self.sessions.discard(session)
            session.close()
            self._writers.discard(writer)
            self._per_address[host] -= 1
            if not self._per_address[host]:
                del self._per_address[host]
            self._tasks.discard(task)

    async def _converse(self, reader: asyncio.StreamReader, session: ServerSession) -> None:
        """One connection's life."""
        conn, peer = session.conn, session.peer
        loop = asyncio.get_running_loop()
        handshake_deadline = loop.time() + self.handshake_timeout
        last_heard = loop.time()
        frame_begun: float | None = None
        proven = False
        while True:
            if not proven:
                deadline, why = handshake_deadline, "handshake-timeout"
            else:
                deadline, why = (last_heard + self.idle_timeout if self.idle_timeout is not None else None,
                                 "idle-timeout")
            if frame_begun is not None and (deadline is None or frame_begun + self.frame_timeout < deadline):
                deadline, why = frame_begun + self.frame_timeout, "stalled-frame"
            if not proven and conn.buffered:
                why = "stalled-frame"  # the handshake's deadline, with a frame begun
            try:
                async with asyncio.timeout_at(deadline):  # cheaper than wait_for per read
                    data = await reader.read(_READ)
            except TimeoutError:
                what = {"stalled-frame": f"{conn.buffered} bytes of a frame pending too long",
                        "handshake-timeout": f"no complete handshake within {self.handshake_timeout:.1f}s",
                        "idle-timeout": f"silent for {self.idle_timeout}s"}[why]
                self.reject(why, peer, f"{what} (stage {conn.stage}, node id {conn.claimed_node_id!r})")
                return
            if not data:
                if not proven and session.sender.failed is None:
                    self.reject("handshake-abandoned", peer, f"closed at stage {conn.stage} "
                                f"(node id {conn.claimed_node_id!r})")
                return
            last_heard = loop.time()
            try:
                messages = conn.receive_data(data)
            except ControlError as exc:
                self.reject(exc.reason, peer, exc.detail)
                return
            handshake = conn.data_to_send()
            if handshake:
                session.sender.write(handshake)  # the CHALLENGE: all an unproven peer ever gets
            if not conn.buffered:
                frame_begun = None
            elif frame_begun is None or messages:
                frame_begun = last_heard
            for message in messages:
                if isinstance(message, Established):
                    proven = session.proven = True
                    self._handshaking -= 1
                    self.sessions.add(session)
                    log.info("control: router %r connected from %s", message.peer_node_id, peer)
                elif isinstance(message, Ping):
                    session.post(Ping(message.token, reply=True))
                else:
                    try:
                        await _maybe_await(self._on_message(session, message))
                    except (ConnectionError, OSError):
                        raise
                    except Exception:
                        log.exception("control: handler failed on %r from %s", message, peer)
            if not session.sender.usable and session.sender.failed is not None:
                return


# ------------------------------------------------------------------ client


class ControlClient:
    """The router's end towards one agent: one connection, kept up.

    ``on_message(message)`` (plain or coroutine function) receives what is not
    an answer to a pending ``request``: CLOSED, and ACK/NACKs that arrive after
    their request timed out.
    """

    def __init__(self, psk: bytes, node_id: str, host: str, port: int,
                 on_message: Callable[[Message], Any] | None = None, *,
                 on_connect: Callable[[], list[Message]] | None = None,
                 ping_interval: float = 5.0, ping_timeout: float = 5.0, connect_timeout: float = 5.0,
                 backoff_initial: float = 0.1, backoff_max: float = 5.0,
                 send_buffer: int = 16 << 20, send_timeout: float = DEFAULT_SEND_TIMEOUT,
                 rto_min_us: int = 0) -> None:
        self.psk = psk
        self.node_id = node_id
        self.host = host
        self.port = port
        self.on_message = on_message
        self.on_connect = on_connect
        """Messages to send first on every new connection (the router's HOLDING
        sync), written before any request can use the connection."""
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.connect_timeout = connect_timeout
        """Bounds the TCP connect, and then the whole handshake."""
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.send_buffer = send_buffer
        self.send_timeout = send_timeout
        self.rto_min_us = rto_min_us
        """Retransmission timeout floor of the connection (0: the kernel's): a
        lost frame holds up a handoff or a take-back until it is resent."""
        self.rejected: collections.Counter[str] = collections.Counter()
        self.connects = 0
        """Established connections so far (reconnections included)."""
        self.peer_node_id: str | None = None
        self._conn: ControlConnection | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._out: FrameSender | None = None
        self._pending: dict[int, asyncio.Future[Ack | Nack | Taken]] = {}
        self._pongs: dict[int, asyncio.Future[None]] = {}
        self._tokens = itertools.count(1)
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._connected = asyncio.Event()

    @property
    def connected(self) -> bool:
        return (self._conn is not None and self._conn.established and self._out is not None
                and self._out.usable)

    async def start(self) -> None:
        """Start connecting (in the background: an agent that is down is no error)."""
        if self._task is None:
            self._stopping = False
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"control-{self.host}:{self.port}")

    async def wait_connected(self, timeout: float | None = None) -> None:
        await asyncio.wait_for(self._connected.wait(), timeout)

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def request(self, message: HandoffRequest | TakeBack | Shift, timeout: float) -> Ack | Nack | Taken:
        """Send MESSAGE and wait for the answer with its conn_id (ACK or NACK
        to a HANDOFF or a SHIFT, TAKEN to a TAKEBACK).

        ``ControlUnavailable`` when not connected or when the connection drops
        before the answer; ``asyncio.TimeoutError`` after TIMEOUT seconds."""
        if not self.connected:
            raise ControlUnavailable(f"no control connection to {self.host}:{self.port}")
        if message.conn_id in self._pending:
            raise ValueError(f"a request for conn_id {message.conn_id} is already pending")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Ack | Nack | Taken] = loop.create_future()
        self._pending[message.conn_id] = future
        # One timer on the future rather than wait_for (which adds a second
        # future and callbacks): this runs once per handoff.
        expiry = loop.call_later(timeout, _expire, future)
        try:
            self.post(message)
            return await future
        finally:
            expiry.cancel()
            if self._pending.get(message.conn_id) is future:
                del self._pending[message.conn_id]

    def post(self, message: Message) -> None:
        """Queue MESSAGE without waiting (the queue is bounded: an agent that
        does not read is dropped, see ``FrameSender``). ``ControlUnavailable``
        when not connected."""
        if not self.connected:
            raise ControlUnavailable(f"no control connection to {self.host}:{self.port}")
        assert self._conn is not None and self._out is not None
        self._out.write(self._conn.send(message))

    async def send(self, message: Message) -> None:
        """Fire and forget (as ``post``). ``ControlUnavailable`` when not connected."""
        self.post(message)

    # ---------------------------------------------------------- the connection loop

    async def _run(self) -> None:
        delay = self.backoff_initial
        while not self._stopping:
            established = False
            try:
                established = await self._connect_and_serve()
            except asyncio.CancelledError:
                raise
            except (ConnectionError, OSError, asyncio.TimeoutError, EOFError) as exc:
                log.debug("control: %s:%d: %s", self.host, self.port, exc or type(exc).__name__)
            except Exception:
                log.exception("control: %s:%d: unexpected failure", self.host, self.port)
            finally:
                self._drop()
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # A cancel that met a connection error at once (3.11's
                # wait_for can trade the one for the other): still a cancel.
                raise asyncio.CancelledError()
            if established:
                delay = self.backoff_initial
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, self.backoff_max)

    def _drop(self) -> None:
        self._connected.clear()
        if self._conn is not None:
            self._conn.close()
        if self._out is not None:
            self._out.close()
        if self._writer is not None:
            self._writer.close()
        self._conn = None
        self._writer = None
        self._out = None
        lost = ControlUnavailable(f"control connection to {self.host}:{self.port} lost")
        for future in self._pending.values():
            if not future.done():
                future.set_exception(lost)
        for pong in self._pongs.values():
            if not pong.done():
                pong.cancel()
        self._pongs.clear()

    def _give_up(self, reason: str, detail: str) -> None:
        self.rejected[reason] += 1
        log.warning("control: agent at %s:%d does not read (%s); reconnecting", self.host, self.port, detail)

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """The TCP connection, its RTO floor set before the connect: the
        handshake's RTT sample already uses it."""
        loop = asyncio.get_running_loop()
        family, kind, proto, _, address = (await loop.getaddrinfo(self.host, self.port,
                                                                  type=socket.SOCK_STREAM))[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            bound_retransmissions(sock, min_us=self.rto_min_us)
            await connect(sock, address)
        except BaseException:
            sock.close()
            raise
        return await asyncio.open_connection(sock=sock)

    async def _connect_and_serve(self) -> bool:
        """One connection's life; True if the handshake completed."""
        loop = asyncio.get_running_loop()
        handshake_deadline = loop.time() + self.connect_timeout
        reader, writer = await asyncio.wait_for(self._open(), self.connect_timeout)
        conn = ControlConnection("client", self.psk, self.node_id)
        out = FrameSender(writer, max_bytes=self.send_buffer, deadline=self.send_timeout, on_give_up=self._give_up)
        self._writer, self._out, self._conn = writer, out, conn
        out.write(conn.start())
        pinger: asyncio.Task[None] | None = None
        established = False
        try:
            while True:
                if conn.established:  # no timeout context per frame: a few per handoff
                    data = await reader.read(_READ)
                else:
                    async with asyncio.timeout_at(handshake_deadline):
                        data = await reader.read(_READ)
                if not data:
                    if established:
                        log.info("control: agent %r at %s:%d closed the connection",
                                 conn.peer_node_id, self.host, self.port)
                    elif out.failed is None:
                        self.rejected["handshake-abandoned"] += 1
                        log.warning("control: agent at %s:%d closed the connection during the handshake "
                                    "(another key, an agent of another protocol version, or its limits: "
                                    "see its log)", self.host, self.port)
                    return established
                try:
                    messages = conn.receive_data(data)
                except ControlError as exc:
                    self.rejected[exc.reason] += 1
                    log.warning("control: rejected %s from agent %s:%d (%s); reconnecting",
                                exc.reason, self.host, self.port, exc.detail)
                    return established
                for message in messages:
                    if isinstance(message, Established):
                        established = True
                        self.connects += 1
                        self.peer_node_id = message.peer_node_id
                        out.write(conn.data_to_send())  # the PROOF, before anything else
                        if self.on_connect is not None:
                            for first in self.on_connect():
                                out.write(conn.send(first))
                        self._connected.set()
                        pinger = loop.create_task(self._ping_loop(writer))
                        log.info("control: connected to agent %r at %s:%d", message.peer_node_id,
                                 self.host, self.port)
                    else:
                        await self._dispatch(message)
        finally:
            if pinger is not None:
                pinger.cancel()
                await asyncio.gather(pinger, return_exceptions=True)
            out.flush()
            await _close_writer(writer)

    async def _dispatch(self, message: Message) -> None:
        if isinstance(message, Ping):
            pong = self._pongs.get(message.token)
            if pong is not None and not pong.done():
                pong.set_result(None)
            return
        if isinstance(message, (Ack, Nack, Taken)):
            future = self._pending.get(message.conn_id)
            if future is not None and not future.done():
                future.set_result(message)
                return
            log.debug("control: %r matches no pending request", message)
        if self.on_message is not None:
            try:
                await _maybe_await(self.on_message(message))
            except Exception:
                log.exception("control: on_message failed on %r", message)

    async def _ping_loop(self, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.ping_interval)
            token = next(self._tokens)
            pong: asyncio.Future[None] = loop.create_future()
            self._pongs[token] = pong
            try:
                self.post(Ping(token))
                await asyncio.wait_for(pong, self.ping_timeout)
            except (asyncio.TimeoutError, ControlUnavailable):
                log.warning("control: agent at %s:%d did not answer PING within %.1fs; reconnecting",
                            self.host, self.port, self.ping_timeout)
                writer.close()  # the reader sees EOF and the loop reconnects
                return
            finally:
                self._pongs.pop(token, None)
