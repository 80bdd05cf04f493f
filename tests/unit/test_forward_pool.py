"""handoff/forward_pool.py with real loopback connections standing in for
forwarding connections (no root, no BPF: open_forward and discard are the
engine's, given here as plain functions)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import pytest

from arr.pool import Target
from handoff import forward_pool
from handoff.forward_pool import ForwardPool, ForwardProfile, ReadyForward, usable

PROFILE = ForwardProfile(mss=1460, sack=True, timestamps=True)
OTHER = ForwardProfile(mss=1400, sack=False, timestamps=True)
TARGET = Target("127.0.0.1", 1)


class Server:
    """A listener that accepts and keeps (or closes) the connections."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.listener.setblocking(False)
        self.accepted: list[socket.socket] = []
        self.opened = 0
        self.discarded: list[int] = []
        self.fail = False

    async def open_forward(self, target: Target, profile: ForwardProfile) -> ReadyForward:
        if self.fail:
            raise ConnectionRefusedError("target down")
        sock = socket.socket()
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, self.listener.getsockname())
        peer, _ = self.listener.accept()
        self.accepted.append(peer)
        self.opened += 1
        return ReadyForward(sock, None, self.opened)  # type: ignore[arg-type]

    def discard(self, ready: ReadyForward) -> None:
        self.discarded.append(ready.conn_id)
        ready.sock.close()

    def close(self) -> None:
        for sock in self.accepted:
            sock.close()
        self.listener.close()


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.close()


async def settle(predicate, timeout: float = 2.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


def test_usable_only_while_young_and_pristine() -> None:
    assert usable(opened=10.0, now=10.0 + forward_pool.MAX_AGE - 0.1, ineligible=None)
    assert not usable(opened=10.0, now=10.0 + forward_pool.MAX_AGE, ineligible=None)
    assert not usable(opened=10.0, now=10.5, ineligible="half-closed")
    assert not usable(opened=10.0, now=10.5, ineligible="unread-data")


def test_a_miss_connects_inline_then_the_shelf_fills_per_profile(server, on_both_loops) -> None:
    on_both_loops(_a_miss_connects_inline_then_the_shelf_fills_per_profile(server))


async def _a_miss_connects_inline_then_the_shelf_fills_per_profile(server: Server) -> None:
    pool = ForwardPool(server.open_forward, server.discard, depth=3)
    assert pool.take(TARGET, PROFILE) is None and pool.missed == 1
    await settle(lambda: len(pool.shelves[(TARGET, PROFILE)].ready) == 3)
    ready = pool.take(TARGET, PROFILE)
    assert ready is not None and pool.taken == 1
    await settle(lambda: len(pool.shelves[(TARGET, PROFILE)].ready) == 3)
    assert server.opened == 4
    # Another profile has its own shelf: nothing of PROFILE's is handed out for it.
    assert pool.take(TARGET, OTHER) is None
    ready.sock.close()
    await pool.close()
    # Everything connected ahead and not taken is closed with the pool.
    assert ready.conn_id not in server.discarded
    assert len(server.discarded) == server.opened - 1


def test_a_connection_the_target_closed_is_discarded_not_used(server, on_both_loops) -> None:
    on_both_loops(_a_connection_the_target_closed_is_discarded_not_used(server))


async def _a_connection_the_target_closed_is_discarded_not_used(server: Server) -> None:
    pool = ForwardPool(server.open_forward, server.discard, depth=1)
    pool.take(TARGET, PROFILE)
    await settle(lambda: len(pool.shelves[(TARGET, PROFILE)].ready) == 1)
    server.accepted[0].close()  # the target's FIN: the router's side is half-closed now
    await asyncio.sleep(0.02)
    assert pool.take(TARGET, PROFILE) is None
    assert pool.stale == 1 and server.discarded == [1]
    await pool.close()


def test_old_connections_age_out_and_idle_profiles_are_dropped(server, monkeypatch, on_both_loops) -> None:
    on_both_loops(_old_connections_age_out_and_idle_profiles_are_dropped(server, monkeypatch))


async def _old_connections_age_out_and_idle_profiles_are_dropped(server: Server, monkeypatch) -> None:
    monkeypatch.setattr(forward_pool, "MAX_AGE", 0.1)
    monkeypatch.setattr(forward_pool, "IDLE_PROFILE", 0.4)
    pool = ForwardPool(server.open_forward, server.discard, depth=2)
    pool.take(TARGET, PROFILE)
    await settle(lambda: len(pool.shelves[(TARGET, PROFILE)].ready) == 2)
    await settle(lambda: pool.stale >= 2)  # replaced as they aged
    await settle(lambda: (TARGET, PROFILE) not in pool.shelves, timeout=3.0)
    assert len(server.discarded) == server.opened  # nothing left open
    await pool.close()


def test_a_target_that_refuses_is_retried_later_and_nothing_leaks(server, monkeypatch, on_both_loops) -> None:
    on_both_loops(_a_target_that_refuses_is_retried_later_and_nothing_leaks(server, monkeypatch))


async def _a_target_that_refuses_is_retried_later_and_nothing_leaks(server: Server, monkeypatch) -> None:
    monkeypatch.setattr(forward_pool, "RETRY_AFTER", 0.05)
    server.fail = True
    pool = ForwardPool(server.open_forward, server.discard, depth=2)
    assert pool.take(TARGET, PROFILE) is None
    await asyncio.sleep(0.12)
    server.fail = False
    await settle(lambda: len(pool.shelves[(TARGET, PROFILE)].ready) == 2)
    await pool.close()
    assert len(server.discarded) == 2


def test_depth_zero_never_connects_ahead(server, on_both_loops) -> None:
    on_both_loops(_depth_zero_never_connects_ahead(server))


async def _depth_zero_never_connects_ahead(server: Server) -> None:
    pool = ForwardPool(server.open_forward, server.discard, depth=0)
    assert pool.take(TARGET, PROFILE) is None
    await asyncio.sleep(0.02)
    assert server.opened == 0 and not pool.shelves
