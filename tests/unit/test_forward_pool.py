"""handoff/forward_pool.py with real loopback connections standing in for
forwarding connections (no root, no BPF: open_forward and discard are the
engine's, given here as plain functions)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from arr.pool import Target
from handoff import forward_pool
from handoff.forward_pool import ForwardPool, ForwardProfile, ReadyForward, ShelfDepth, shelf_ceiling, usable

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
    await settle(lambda: len(pool.shelves[(TARGET.address, PROFILE)].ready) == 3)
    ready = pool.take(TARGET, PROFILE)
    assert ready is not None and pool.taken == 1
    await settle(lambda: len(pool.shelves[(TARGET.address, PROFILE)].ready) == 3)
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
    await settle(lambda: len(pool.shelves[(TARGET.address, PROFILE)].ready) == 1)
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
    await settle(lambda: len(pool.shelves[(TARGET.address, PROFILE)].ready) == 2)
    await settle(lambda: pool.stale >= 2)  # replaced as they aged
    await settle(lambda: (TARGET.address, PROFILE) not in pool.shelves, timeout=3.0)
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
    await settle(lambda: len(pool.shelves[(TARGET.address, PROFILE)].ready) == 2)
    await pool.close()
    assert len(server.discarded) == 2


def test_depth_zero_never_connects_ahead(server, on_both_loops) -> None:
    on_both_loops(_depth_zero_never_connects_ahead(server))


async def _depth_zero_never_connects_ahead(server: Server) -> None:
    pool = ForwardPool(server.open_forward, server.discard, depth=0)
    assert pool.take(TARGET, PROFILE) is None
    await asyncio.sleep(0.02)
    assert server.opened == 0 and not pool.shelves


def test_connections_given_back_replace_the_refills_connects(server, on_both_loops) -> None:
    on_both_loops(_connections_given_back_replace_the_refills_connects(server))


async def _connections_given_back_replace_the_refills_connects(server: Server) -> None:
    """Clients moving between two targets: each handoff takes a connection
    from one shelf and gives the one it left back to the other. Once each
    shelf has been refilled after its first take, the connections coming
    back keep both at their depth: no more connects."""
    other = Target("127.0.0.2", 1)
    pool = ForwardPool(server.open_forward, server.discard, depth=2)
    for target in (TARGET, other):
        pool.take(target, PROFILE)
        await settle(lambda: len(pool.shelves[(target.address, PROFILE)].ready) == 2)
    held = {TARGET: pool.take(TARGET, PROFILE)}
    here, there = TARGET, other

    async def move() -> None:
        # A request for THERE: its connection from the pool, HERE's back in it.
        nonlocal here, there
        taken = pool.take(there, PROFILE)
        assert taken is not None
        assert pool.give_back(here.address, PROFILE, held.pop(here))
        held[there] = taken
        await asyncio.sleep(0.005)  # a refill, if one started, would connect now
        here, there = there, here

    for _ in range(2):
        await move()
    await settle(lambda: all(len(shelf.ready) >= 2 for shelf in pool.shelves.values()))
    opened = server.opened
    for _ in range(20):
        await move()
    assert server.opened == opened, "a given-back connection should have saved each connect"
    assert pool.returned == 22 and pool.stale == 0
    for ready in held.values():
        ready.sock.close()
    await pool.close()


def test_give_back_is_refused_without_a_shelf_or_room(server, monkeypatch, on_both_loops) -> None:
    on_both_loops(_give_back_is_refused_without_a_shelf_or_room(server, monkeypatch))


async def _give_back_is_refused_without_a_shelf_or_room(server: Server, monkeypatch) -> None:
    monkeypatch.setattr(forward_pool, "RETURNED_DEPTH", 2)
    counted: list[str] = []
    pool = ForwardPool(server.open_forward, server.discard, depth=1, count=counted.append)
    loose = [await server.open_forward(TARGET, PROFILE) for _ in range(4)]
    # No handoff took from this profile's shelf: it is not kept ready.
    assert not pool.give_back(TARGET.address, PROFILE, loose[0])
    pool.take(TARGET, PROFILE)
    await settle(lambda: len(pool.shelves[(TARGET.address, PROFILE)].ready) == 1)
    # Room up to RETURNED_DEPTH times the depth, then refused ("full": the caller closes it).
    assert pool.give_back(TARGET.address, PROFILE, loose[1])
    assert not pool.give_back(TARGET.address, PROFILE, loose[2])
    assert pool.returned == 1 and counted == ["miss", "returned", "full"]
    # Taken oldest first: the refill's connection, then the one given back.
    first, second = pool.take(TARGET, PROFILE), pool.take(TARGET, PROFILE)
    assert first is not None and second is loose[1]
    for ready in (first, second, loose[0], loose[2]):
        ready.sock.close()
    await pool.close()
    off = ForwardPool(server.open_forward, server.discard, depth=0)
    off.take(TARGET, PROFILE)
    assert not off.give_back(TARGET.address, PROFILE, loose[3])
    loose[3].sock.close()


def test_a_connection_given_back_ages_out_from_its_return(server, monkeypatch, on_both_loops) -> None:
    on_both_loops(_a_connection_given_back_ages_out_from_its_return(server, monkeypatch))


async def _a_connection_given_back_ages_out_from_its_return(server: Server, monkeypatch) -> None:
    monkeypatch.setattr(forward_pool, "MAX_AGE", 0.2)
    pool = ForwardPool(server.open_forward, server.discard, depth=1)
    pool.take(TARGET, PROFILE)
    await settle(lambda: len(pool.shelves[(TARGET.address, PROFILE)].ready) == 1)
    ready = await server.open_forward(TARGET, PROFILE)
    ready.opened = 0.0  # opened long ago: its age counts from the return
    assert pool.give_back(TARGET.address, PROFILE, ready)
    assert pool.shelves[(TARGET.address, PROFILE)].ready[-1].opened == pytest.approx(
        asyncio.get_running_loop().time(), abs=0.05)
    await settle(lambda: ready.conn_id in server.discarded, timeout=2.0)  # closed unused, as any
    await pool.close()


def test_one_server_listed_in_two_pools_has_one_shelf(server, on_both_loops) -> None:
    on_both_loops(_one_server_listed_in_two_pools_has_one_shelf(server))


async def _one_server_listed_in_two_pools_has_one_shelf(server: Server) -> None:
    """The same address under another name and weight (a second pool's
    listing): a connection given back after one pool's handoff serves the
    other's, and no second shelf connects for it."""
    pool = ForwardPool(server.open_forward, server.discard, depth=1)
    pool.take(TARGET, PROFILE)
    await settle(lambda: len(pool.shelves[(TARGET.address, PROFILE)].ready) == 1)
    opened = server.opened
    listed_again = Target(TARGET.host, TARGET.port, weight=3, name="in-another-pool")
    first = pool.take(listed_again, PROFILE)
    assert first is not None and len(pool.shelves) == 1
    assert pool.give_back(TARGET.address, PROFILE, first)
    assert pool.take(listed_again, PROFILE) is first
    first.sock.close()
    await asyncio.sleep(0.02)
    assert server.opened <= opened + 1  # the refill's one connect, for the shelf they share
    await pool.close()


@given(start=st.integers(1, 20), extra=st.integers(-5, 40),
       events=st.lists(st.sampled_from(["missed", "aged_out", "failed"]), max_size=200))
def test_a_shelf_depth_stays_between_one_and_its_ceiling(start, extra, events) -> None:
    depth = ShelfDepth(start, start + extra)
    assert depth.current == start and depth.ceiling == max(start, start + extra)
    for event in events:
        before = depth.current
        getattr(depth, event)()
        assert forward_pool.MIN_DEPTH <= depth.current <= depth.ceiling
        if event == "missed":
            assert depth.current == min(depth.ceiling, before + 1)
        elif event == "aged_out":
            assert depth.current == max(forward_pool.MIN_DEPTH, before - 1)
        else:
            assert depth.current == min(before, depth.start)


def test_a_shelf_depth_grows_a_connection_per_miss_and_gives_them_back_as_they_age() -> None:
    depth = ShelfDepth(4, 16)
    for _ in range(12):  # a burst 12 deeper than the shelf
        depth.missed()
    assert depth.current == 16
    depth.missed()
    assert depth.current == 16  # the ceiling
    for _ in range(5):
        depth.aged_out()
    assert depth.current == 11
    for _ in range(20):  # a trickle of handoffs: its connections age out, one is kept
        depth.aged_out()
    assert depth.current == 1
    depth.missed()
    assert depth.current == 2
    depth.failed()
    assert depth.current == 2  # a failure never deepens it
    for _ in range(10):
        depth.missed()
    depth.failed()
    assert depth.current == 4  # back to where it started


def test_a_shelf_ceiling_is_the_setting_within_a_sixteenth_of_the_ports() -> None:
    assert shelf_ceiling(4, 16, 11000) == 16  # the defaults
    assert shelf_ceiling(4, 64, 512) == 32  # 512 ports: 32 at most
    assert shelf_ceiling(4, 16, 16) == 4  # a handful of ports: the floor, no growth
    assert shelf_ceiling(8, 4, 11000) == 8  # never below the floor
    assert shelf_ceiling(0, 16, 11000) == 16


def test_misses_deepen_the_shelf_and_age_outs_shallow_it(server, monkeypatch, on_both_loops) -> None:
    on_both_loops(_misses_deepen_the_shelf_and_age_outs_shallow_it(server, monkeypatch))


async def _misses_deepen_the_shelf_and_age_outs_shallow_it(server: Server, monkeypatch) -> None:
    """A burst that empties the shelf: each handoff beyond it connected inline
    and the shelf keeps one more from then on, so the same burst again finds
    a connection for every handoff; unused, they age out one by one and the
    shelf keeps one."""
    monkeypatch.setattr(forward_pool, "MAX_AGE", 0.3)
    counted: list[str] = []
    pool = ForwardPool(server.open_forward, server.discard, depth=2, ceiling=6, count=counted.append)
    key = (TARGET.address, PROFILE)
    assert pool.take(TARGET, PROFILE) is None  # a new shelf: its first miss says nothing of demand
    assert pool.shelves[key].depth.current == 2 and pool.kept == 2
    await settle(lambda: len(pool.shelves[key].ready) == 2)
    burst = [pool.take(TARGET, PROFILE) for _ in range(5)]  # 2 ready, 3 missed
    assert sum(ready is not None for ready in burst) == 2
    assert pool.shelves[key].depth.current == 5 and pool.kept == 5
    await settle(lambda: len(pool.shelves[key].ready) == 5)
    again = [pool.take(TARGET, PROFILE) for _ in range(5)]
    assert all(ready is not None for ready in again), "the deeper shelf should have served the same burst"
    assert counted.count("miss") == 4
    taken = [ready for ready in [*burst, *again] if ready is not None]
    for ready in taken:
        ready.sock.close()
    # Left alone, the connections age out unused, each taking the depth one back.
    await settle(lambda: pool.shelves[key].depth.current == 1, timeout=3.0)
    await settle(lambda: len(pool.shelves[key].ready) == 1, timeout=3.0)
    await pool.close()
    assert len(server.discarded) == server.opened - len(taken)  # all that no handoff took


def test_a_target_that_refuses_gets_the_first_depths_connects(server, monkeypatch, on_both_loops) -> None:
    on_both_loops(_a_target_that_refuses_gets_the_first_depths_connects(server, monkeypatch))


async def _a_target_that_refuses_gets_the_first_depths_connects(server: Server, monkeypatch) -> None:
    """Handoffs that miss because the target is down would deepen the shelf;
    a failed connect puts it back where it started, so a dead target gets
    that many connects per RETRY_AFTER, not the ceiling's."""
    monkeypatch.setattr(forward_pool, "RETRY_AFTER", 0.05)
    attempts = 0
    open_forward = server.open_forward

    async def counting(target: Target, profile: ForwardProfile) -> ReadyForward:
        nonlocal attempts
        attempts += 1
        return await open_forward(target, profile)

    server.fail = True
    pool = ForwardPool(counting, server.discard, depth=3, ceiling=8)
    for _ in range(6):
        assert pool.take(TARGET, PROFILE) is None
    await asyncio.sleep(0.02)
    assert pool.shelves[(TARGET.address, PROFILE)].depth.current == 3
    first = attempts
    await asyncio.sleep(0.3)  # six RETRY_AFTERs: three connects each
    assert attempts - first <= 3 * 7, f"{attempts - first} connects at a target that refuses"
    await pool.close()
