"""The router's listening sockets and its own accept loop.

Not the loop's ``create_server``: uvloop's accept loop takes every pending
connection in one go before any of them is looked at, and on EMFILE libuv
accepts and closes the rest silently (its "EMFILE trick"); asyncio's pauses
accepting for a second while clients hang. Here each connection is admitted
(``admit``) or answered 503 the moment it is accepted, within the
file-descriptor budget of arr/fdlimit.py, and a spare fd answers 503 when
accept() still fails with EMFILE/ENFILE. Nothing is reset silently.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import time
from typing import TYPE_CHECKING, Callable

from arr.http1 import error_response

if TYPE_CHECKING:
    from arr.metrics import Metrics

log = logging.getLogger("arr")

ACCEPT_BATCH = 64
"""Connections accepted per wake-up of a listening socket: the loop's other
work (sessions, health checks) runs between batches."""
ACCEPT_PAUSE = 0.05
"""Seconds accepting pauses when out of fds with no spare to answer with: the
clients wait in the backlog meanwhile, none is reset."""
WARN_EVERY = 10.0
"""Seconds between two warnings of the same overload (refusing, out of fds)."""
REFUSAL = error_response(503, b"too many connections\n")
_OUT_OF_FDS = {errno.EMFILE: "emfile", errno.ENFILE: "enfile"}
_OUT_OF_MEMORY = {errno.ENOBUFS: "enobufs", errno.ENOMEM: "enomem"}
_GONE_BEFORE_ACCEPT = (errno.ECONNABORTED, errno.EPROTO, errno.EPERM)
"""accept() errors that concern one connection only (reset while queued, or
refused by a firewall rule): the next one is accepted as usual."""


class Listener:
    """Accepts on ``address``; ``has_room()`` says whether a connection may
    be admitted (``admit(sock)``), else it gets ``REFUSAL`` and is closed."""

    def __init__(self, address: tuple[str, int], *, has_room: Callable[[], bool],
                 admit: Callable[[socket.socket], None], metrics: "Metrics",
                 connections: Callable[[], int], max_connections: Callable[[], int]) -> None:
        self.address = address
        self.has_room = has_room
        self.admit = admit
        self.metrics = metrics
        self.connections = connections
        self.max_connections = max_connections
        self.sockets: list[socket.socket] = []
        self.spare_fd: int | None = None
        """Kept open, to be closed for a moment when accept() meets EMFILE: the 503's fd."""
        self._paused: asyncio.TimerHandle | None = None
        self._warned_at: dict[str, float] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.sockets = listen_sockets(*self.address)
        self.spare_fd = _open_spare()
        self._watch()

    def stop(self) -> None:
        if self._paused is not None:
            self._paused.cancel()
            self._paused = None
        for sock in self.sockets:
            if sock.fileno() >= 0:
                assert self._loop is not None
                self._loop.remove_reader(sock.fileno())
                sock.close()
        if self.spare_fd is not None:
            os.close(self.spare_fd)
            self.spare_fd = None

    def _watch(self) -> None:
        assert self._loop is not None
        for sock in self.sockets:
            self._loop.add_reader(sock.fileno(), self._on_readable, sock)

    def _on_readable(self, listening: socket.socket) -> None:
        """Accept what is pending: admit each connection while there is room,
        answer the others 503 at once (their fd is closed again before the
        next accept, so a flood costs one fd at a time)."""
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _peer = listening.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _GONE_BEFORE_ACCEPT:
                    continue
                self._accept_failed(listening, exc)
                return
            if not self.has_room():
                self._warn("full", "at max_connections %d: new connections are answered 503 "
                           "(arr_refused_connections)", self.max_connections())
                self.refuse(sock)
                continue
            self.admit(sock)

    def refuse(self, sock: socket.socket) -> None:
        """503 and close, before anything else is read or opened."""
        try:
            sock.setblocking(False)
            sock.send(REFUSAL)  # a fresh connection's send buffer takes it whole
            _discard_received(sock)
        except OSError:
            pass  # the client is gone: nothing to answer
        finally:
            sock.close()
        self.metrics.refused_connections.inc()

    def _accept_failed(self, listening: socket.socket, exc: OSError) -> None:
        """accept() failed for want of an fd (or memory). With the spare fd
        free for a moment, the pending connection is accepted and answered
        503, and the loop comes back for the next; without one, accepting
        pauses for ``ACCEPT_PAUSE`` and the clients wait in the backlog."""
        reason = _OUT_OF_FDS.get(exc.errno or 0) or _OUT_OF_MEMORY.get(exc.errno or 0) \
            or errno.errorcode.get(exc.errno or 0, "error").lower()
        self.metrics.accept_errors.labels(reason).inc()
        if exc.errno in _OUT_OF_FDS and self.spare_fd is not None:
            self._warn(reason, "accept: out of file descriptors (%s) with %d client connections: "
                       "answering 503 with the spare fd; something outside client connections "
                       "holds more than limits.reserved_fds", reason.upper(), self.connections())
            os.close(self.spare_fd)
            self.spare_fd = None
            try:
                sock, _peer = listening.accept()
            except OSError:
                pass
            else:
                self.refuse(sock)
            self.spare_fd = _open_spare()
            if self.spare_fd is not None:
                return  # the listener is still readable if more are pending
        self._warn(reason + "-pause", "accept: %s; pausing accepting for %.2fs", exc, ACCEPT_PAUSE)
        self._pause()

    def _pause(self) -> None:
        assert self._loop is not None
        for sock in self.sockets:
            self._loop.remove_reader(sock.fileno())
        self._paused = self._loop.call_later(ACCEPT_PAUSE, self._resume)

    def _resume(self) -> None:
        self._paused = None
        if self.spare_fd is None:
            self.spare_fd = _open_spare()
        self._watch()

    def _warn(self, what: str, message: str, *args: object) -> None:
        """MESSAGE, at most once per ``WARN_EVERY`` for WHAT: an overload
        must not turn into a log line per connection."""
        now = time.monotonic()
        if now - self._warned_at.get(what, -WARN_EVERY) >= WARN_EVERY:
            self._warned_at[what] = now
            log.warning(message, *args)


def listen_sockets(host: str, port: int) -> list[socket.socket]:
    """Non-blocking listening sockets for HOST:PORT (every address it names,
    as ``loop.create_server`` would bind)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(4096)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _open_spare() -> int | None:
    """The fd kept free for answering 503 when accept() meets EMFILE."""
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def _discard_received(sock: socket.socket) -> None:
    """Read what the client already sent: closing a socket with unread bytes
    sends a RST instead of a FIN, which may cost the client the 503."""
    for _ in range(4):
        try:
            if not sock.recv(65536):
                return
        except (BlockingIOError, InterruptedError):
            return
