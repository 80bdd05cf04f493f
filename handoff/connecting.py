"""Connecting a non-blocking TCP socket on the running loop, without a resolver.

uvloop's ``sock_connect`` gives every address, an IP address too, to
``getaddrinfo`` on libuv's thread pool before it connects: each connect
costs a round trip through a worker thread (futex and eventfd wake-ups).
On this VM that was about 120 µs of user and 150 µs of system CPU per
connect against 50 and 80 µs for :func:`connect` (loopback, 4,000 connects
each, benchmarks/RESULTS.md, "The forwarding connect without uvloop's
resolver"). The router connects a forwarding socket for every handoff
(handoff/forward_pool.py refills one per connection it gives out, and a
take-back to another target connects one), always to an IP address
(arr.config takes no names), so it connects them itself: ``connect_ex``,
then one wait for the socket to become writable.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket

_IN_PROGRESS = (errno.EINPROGRESS, errno.EINTR)
"""connect_ex's answers for a handshake that goes on without us."""


async def connect(sock: socket.socket, address: tuple[str, int]) -> None:
    """Connect non-blocking SOCK to ADDRESS (an IP address: a name would be
    resolved by the kernel call, blocking the loop), as ``loop.sock_connect``
    would: an OSError (ConnectionRefusedError, ...) when it fails. Cancelled
    (a timeout), it stops watching the socket; closing it is the caller's."""
    err = sock.connect_ex(address)
    if err in _IN_PROGRESS:
        loop = asyncio.get_running_loop()
        fd = sock.fileno()
        writable = loop.create_future()
        loop.add_writer(fd, _settle, writable)
        try:
            await writable
        finally:
            loop.remove_writer(fd)
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err))


def _settle(writable: asyncio.Future[None]) -> None:
    if not writable.done():
        writable.set_result(None)
