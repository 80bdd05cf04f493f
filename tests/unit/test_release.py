"""handoff/release.py: one timer releases every forwarding socket once its
request is acknowledged, or at the deadline; real sockets, no root."""

from __future__ import annotations

import asyncio
import socket

from handoff.release import ForwardReleaser, PendingRelease


def pending(conn_id: int) -> PendingRelease:
    return PendingRelease(conn_id, socket.socket(), None, None)  # type: ignore[arg-type]


def test_sockets_are_released_as_their_requests_are_acknowledged(on_both_loops) -> None:
    on_both_loops(_sockets_are_released_as_their_requests_are_acknowledged())


async def _sockets_are_released_as_their_requests_are_acknowledged() -> None:
    outstanding: dict[int, int] = {}
    released: list[tuple[int, bool]] = []
    releaser = ForwardReleaser(lambda p, ok: released.append((p.conn_id, ok)), timeout=5.0,
                               unacked=lambda sock: outstanding[sock.fileno()])
    items = [pending(i) for i in range(3)]
    for item in items:
        outstanding[item.forward.fileno()] = 100
        releaser.add(item)
    outstanding[items[1].forward.fileno()] = 0
    await asyncio.sleep(0.01)
    assert released == [(1, True)]
    outstanding[items[0].forward.fileno()] = 0
    outstanding[items[2].forward.fileno()] = 0
    await asyncio.wait_for(releaser.finish(), 1.0)
    assert sorted(released) == [(0, True), (1, True), (2, True)]
    assert releaser.pending == []
    for item in items:
        item.forward.close()


def test_an_unacknowledged_request_is_released_at_the_deadline(on_both_loops) -> None:
    on_both_loops(_an_unacknowledged_request_is_released_at_the_deadline())


async def _an_unacknowledged_request_is_released_at_the_deadline() -> None:
    released: list[tuple[int, bool]] = []
    releaser = ForwardReleaser(lambda p, ok: released.append((p.conn_id, ok)), timeout=0.05,
                               unacked=lambda sock: 10)
    item = pending(7)
    releaser.add(item)
    await asyncio.sleep(0.02)
    assert released == []
    await asyncio.wait_for(releaser.finish(), 1.0)
    assert released == [(7, False)]
    item.forward.close()


def test_polls_back_off_and_one_failure_does_not_stop_the_others(on_both_loops) -> None:
    on_both_loops(_polls_back_off_and_one_failure_does_not_stop_the_others())


async def _polls_back_off_and_one_failure_does_not_stop_the_others() -> None:
    polls = 0

    def unacked(sock: socket.socket) -> int:
        nonlocal polls
        polls += 1
        return 1

    released: list[int] = []

    def release(p: PendingRelease, ok: bool) -> None:
        if p.conn_id == 1:
            raise RuntimeError("boom")
        released.append(p.conn_id)

    releaser = ForwardReleaser(release, timeout=0.3, unacked=unacked)
    items = [pending(1), pending(2)]
    for item in items:
        releaser.add(item)
    await asyncio.wait_for(releaser.finish(), 2.0)
    assert released == [2]
    # 1, 2, 4, ... 50 ms apart: far fewer polls than one a millisecond for 300 ms.
    assert polls < 2 * 20
    for item in items:
        item.forward.close()
