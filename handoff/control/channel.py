"""The control channel over asyncio: the agent's server, the router's client.

Both drive a sans-IO ``ControlConnection`` (``frames.py``). A connection that
breaks the protocol is counted in ``rejected[reason]``, logged in one line and
closed; nothing else is affected.

* ``ControlServer`` (agent): accepts routers; hands every message but PING to
  ``handler.on_message(session, message)`` (awaited, in order, per
  connection) and answers PINGs itself. ``sessions`` holds the established
  sessions, so the agent can push CLOSED to every router.
* ``ControlClient`` (router): keeps one connection to one agent up,
  reconnecting with exponential backoff (``on_connect`` messages go first on
  each new connection); ``request`` for HANDOFF -> ACK/NACK,
  ``send`` for fire-and-forget; PINGs the agent and reconnects when it stops
  answering.

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
import stat
import string
from pathlib import Path
from typing import Any, Callable

from handoff.control.frames import (
    Ack, ControlConnection, ControlError, HandoffRequest, Hello, Message, Nack, Ping, Taken, TakeBack,
)

log = logging.getLogger("arr.control")

_READ = 65536


class ControlUnavailable(ConnectionError):
    """No established control connection (or it was lost while waiting)."""


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


def _peer(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)


class CoalescingWriter:
    """Frames queued during one event-loop iteration leave in one write.

    Under load many handoffs reach the control step in the same iteration;
    one write (one segment, one wakeup of the peer) for all of them instead of
    one each. The flush runs at the end of the iteration (``call_soon``), so
    a frame waits for no timer. Order is kept: frames carry counters that the
    peer checks (frames.py)."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self._chunks: list[bytes] = []
        self._scheduled = False

    def write(self, frame: bytes) -> None:
        self._chunks.append(frame)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        chunks, self._chunks = self._chunks, []
        if chunks and not self.writer.is_closing():
            self.writer.write(b"".join(chunks) if len(chunks) > 1 else chunks[0])

    async def drain(self) -> None:
        """Back-pressure as StreamWriter.drain (raises once the connection is lost)."""
        await self.writer.drain()


async def _close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), 1.0)
    except (ConnectionError, OSError, asyncio.TimeoutError):
        pass


# ------------------------------------------------------------------ server


class ServerSession:
    """One router's established connection, as the agent's handler sees it."""

    def __init__(self, conn: ControlConnection, writer: asyncio.StreamWriter) -> None:
        self.conn = conn
        self.writer = writer
        self._out = CoalescingWriter(writer)
        self.peer = _peer(writer)
        self.closed = False

    @property
    def peer_node_id(self) -> str | None:
        return self.conn.peer_node_id

    @property
    def peer_host(self) -> str:
        """The router's address on this connection (without the port)."""
        return self.peer.rsplit(":", 1)[0]

    async def send(self, message: Message) -> None:
        """Raises ControlUnavailable (a ConnectionError) once the session is gone."""
        if self.closed or self.conn.failed is not None or self.writer.is_closing():
            raise ControlUnavailable(f"control session with {self.peer} is closed")
        self._out.write(self.conn.send(message))
        await self._out.drain()

    def close(self) -> None:
        self.closed = True
        self.conn.close()
        self.writer.close()

    def __repr__(self) -> str:
        return f"<ServerSession {self.peer_node_id!r} at {self.peer}>"


class ControlServer:
    """The agent's end: ``handler.on_message(session, message)`` is called for
    every message but PING (a plain callable ``handler(session, message)`` is
    accepted too; either may be a coroutine function)."""

    def __init__(self, psk: bytes, node_id: str, handler: Any, host: str = "127.0.0.1", port: int = 0,
                 *, handshake_timeout: float = 5.0, idle_timeout: float | None = 60.0) -> None:
        self.psk = psk
        self.node_id = node_id
        self.host = host
        self.port = port
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        """A router that sends nothing (not even its PINGs) for this long is dropped."""
        self._on_message: Callable[..., Any] = getattr(handler, "on_message", handler)
        self.rejected: collections.Counter[str] = collections.Counter()
        self.sessions: set[ServerSession] = set()
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.sessions.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        conn = ControlConnection("server", self.psk, self.node_id)
        session = ServerSession(conn, writer)
        try:
            while True:
                timeout = self.idle_timeout if conn.established else self.handshake_timeout
                try:
                    async with asyncio.timeout(timeout):  # cheaper than wait_for per read
                        data = await reader.read(_READ)
                except asyncio.TimeoutError:
                    log.info("control: %s %s silent for %.0fs; closing", session.peer,
                             "established but" if conn.established else "no HELLO,", timeout)
                    return
                if not data:
                    return
                try:
                    messages = conn.receive_data(data)
                except ControlError as exc:
                    self.rejected[exc.reason] += 1
                    log.warning("control: rejected %s from %s (%s); closing", exc.reason, session.peer,
                                exc.detail)
                    return
                for message in messages:
                    if isinstance(message, Hello):
                        writer.write(conn.data_to_send())
                        await writer.drain()
                        self.sessions.add(session)
                        log.info("control: router %r connected from %s", message.node_id, session.peer)
                    elif isinstance(message, Ping):
                        await session.send(Ping(message.token, reply=True))
                    else:
                        try:
                            await _maybe_await(self._on_message(session, message))
                        except (ConnectionError, OSError):
                            raise
                        except Exception:
                            log.exception("control: handler failed on %r from %s", message, session.peer)
        except (ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            # stop(): end quietly; a cancelled task here makes asyncio's
            # start_server log an error for it.
            pass
        finally:
            self.sessions.discard(session)
            session.close()
            self._writers.discard(writer)
            self._tasks.discard(task)


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
                 backoff_initial: float = 0.1, backoff_max: float = 5.0) -> None:
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
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.rejected: collections.Counter[str] = collections.Counter()
        self.connects = 0
        """Established connections so far (reconnections included)."""
        self.peer_node_id: str | None = None
        self._conn: ControlConnection | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._out: CoalescingWriter | None = None
        self._pending: dict[int, asyncio.Future[Ack | Nack | Taken]] = {}
        self._pongs: dict[int, asyncio.Future[None]] = {}
        self._tokens = itertools.count(1)
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._connected = asyncio.Event()

    @property
    def connected(self) -> bool:
        return (self._conn is not None and self._conn.established and self._writer is not None
                and not self._writer.is_closing())

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

    async def request(self, message: HandoffRequest | TakeBack, timeout: float) -> Ack | Nack | Taken:
        """Send MESSAGE and wait for the answer with its conn_id (ACK or NACK
        to a HANDOFF, TAKEN to a TAKEBACK).

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
            await self.send(message)
            return await future
        finally:
            expiry.cancel()
            if self._pending.get(message.conn_id) is future:
                del self._pending[message.conn_id]

    def post(self, message: Message) -> None:
        """Queue MESSAGE without waiting (no back-pressure): for the small
        notices of the handoff path, where a task per message would cost more
        than the message. ``ControlUnavailable`` when not connected."""
        if not self.connected:
            raise ControlUnavailable(f"no control connection to {self.host}:{self.port}")
        assert self._conn is not None and self._out is not None
        self._out.write(self._conn.send(message))

    async def send(self, message: Message) -> None:
        """Fire and forget. ``ControlUnavailable`` when not connected."""
        if not self.connected:
            raise ControlUnavailable(f"no control connection to {self.host}:{self.port}")
        assert self._conn is not None and self._out is not None
        self._out.write(self._conn.send(message))
        try:
            await self._out.drain()
        except (ConnectionError, OSError) as exc:
            raise ControlUnavailable(f"control connection to {self.host}:{self.port} lost: {exc}") from None

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
            if established:
                delay = self.backoff_initial
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, self.backoff_max)

    def _drop(self) -> None:
        self._connected.clear()
        if self._conn is not None:
            self._conn.close()
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

    async def _connect_and_serve(self) -> bool:
        """One connection's life; True if the handshake completed."""
        reader, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port),
                                                self.connect_timeout)
        conn = ControlConnection("client", self.psk, self.node_id)
        self._writer = writer
        self._out = CoalescingWriter(writer)
        self._conn = conn
        writer.write(conn.start())
        await writer.drain()
        pinger: asyncio.Task[None] | None = None
        established = False
        try:
            while True:
                timeout = None if conn.established else self.connect_timeout
                async with asyncio.timeout(timeout):  # cheaper than wait_for per read
                    data = await reader.read(_READ)
                if not data:
                    if established:
                        log.info("control: agent %r at %s:%d closed the connection",
                                 conn.peer_node_id, self.host, self.port)
                    return established
                try:
                    messages = conn.receive_data(data)
                except ControlError as exc:
                    self.rejected[exc.reason] += 1
                    log.warning("control: rejected %s from agent %s:%d (%s); reconnecting",
                                exc.reason, self.host, self.port, exc.detail)
                    return established
                for message in messages:
                    if isinstance(message, Hello):
                        established = True
                        self.connects += 1
                        self.peer_node_id = message.node_id
                        if self.on_connect is not None:
                            for first in self.on_connect():
                                writer.write(conn.send(first))
                            await writer.drain()
                        self._connected.set()
                        pinger = asyncio.get_running_loop().create_task(self._ping_loop(writer))
                        log.info("control: connected to agent %r at %s:%d", message.node_id,
                                 self.host, self.port)
                    else:
                        await self._dispatch(message)
        finally:
            if pinger is not None:
                pinger.cancel()
                await asyncio.gather(pinger, return_exceptions=True)
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
                await self.send(Ping(token))
                await asyncio.wait_for(pong, self.ping_timeout)
            except (asyncio.TimeoutError, ControlUnavailable):
                log.warning("control: agent at %s:%d did not answer PING within %.1fs; reconnecting",
                            self.host, self.port, self.ping_timeout)
                writer.close()  # the reader sees EOF and the loop reconnects
                return
            finally:
                self._pongs.pop(token, None)
