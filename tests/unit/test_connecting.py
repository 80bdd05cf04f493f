"""handoff.connecting.connect: a non-blocking connect on the running loop that
never asks a resolver (handoff/connecting.py), on both kinds of loop."""

from __future__ import annotations

import asyncio
import socket

import pytest

from handoff.connecting import connect

LOOPBACK = "127.0.0.1"


def _socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    return sock


def test_connects_and_the_peer_reads_what_it_sends(on_both_loops) -> None:
    with socket.create_server((LOOPBACK, 0)) as listener:
        async def go() -> bytes:
            sock = _socket()
            try:
                await connect(sock, listener.getsockname())
                assert sock.getpeername() == listener.getsockname()
                sock.send(b"hello")
                peer, _ = listener.accept()
                with peer:
                    return peer.recv(16)
            finally:
                sock.close()
        assert on_both_loops(go()) == b"hello"


def test_a_refused_connect_raises_connection_refused_and_leaves_no_writer(on_both_loops) -> None:
    with socket.create_server((LOOPBACK, 0)) as listener:
        address = listener.getsockname()
    # Nothing listens there any more: the kernel answers the SYN with a RST.

    async def go() -> None:
        sock = _socket()
        try:
            with pytest.raises(ConnectionRefusedError):
                await connect(sock, address)
            assert not asyncio.get_running_loop().remove_writer(sock.fileno())
        finally:
            sock.close()
    on_both_loops(go())


def test_a_timed_out_connect_stops_watching_the_socket(on_both_loops) -> None:
    # A listener whose accept queue is full drops further SYNs (the client
    # would resend one a second later): the connect hangs until the timeout.
    with socket.socket() as listener:
        listener.bind((LOOPBACK, 0))
        listener.listen(0)
        first = socket.create_connection(listener.getsockname(), timeout=2)
        second = socket.socket()
        second.setblocking(False)
        second.connect_ex(listener.getsockname())  # fills the queue (backlog 0 holds one more)

        async def go() -> None:
            sock = _socket()
            try:
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(0.2):
                        await connect(sock, listener.getsockname())
                assert not asyncio.get_running_loop().remove_writer(sock.fileno())
            finally:
                sock.close()
        try:
            on_both_loops(go())
        finally:
            first.close()
            second.close()


THREADS_AFTER_CONNECTS = """
import asyncio, os, socket, sys
import uvloop
from handoff.connecting import connect

async def main(via_loop):
    loop = asyncio.get_running_loop()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        for _ in range(3):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            if via_loop:
                await loop.sock_connect(sock, listener.getsockname())
            else:
                await connect(sock, listener.getsockname())
            sock.close()
    return len(os.listdir("/proc/self/task"))

print(uvloop.run(main(sys.argv[1] == "loop")))
"""


def test_connect_keeps_the_router_on_one_thread_where_uvloop_starts_its_pool() -> None:
    """The reason handoff/connecting.py exists: uvloop's sock_connect resolves
    even an IP address on libuv's thread pool (its workers start on first
    use); connect never starts it. Each in a fresh interpreter."""
    import subprocess
    import sys

    def threads(how: str) -> int:
        out = subprocess.run([sys.executable, "-c", THREADS_AFTER_CONNECTS, how], capture_output=True,
                             text=True, check=True, timeout=60)
        return int(out.stdout)
    assert threads("connect") == 1
    assert threads("loop") > 1  # what connect avoids (and the check can see it)
