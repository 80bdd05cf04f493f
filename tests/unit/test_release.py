"""handoff/release.py: one timer releases every forwarding socket once its
request is acknowledged, or at the deadline; real sockets, no root."""

from __future__ import annotations

import asyncio
import socket
import struct

from hypothesis import given, strategies as st

from handoff import packet
from handoff.release import MAX_RESENDS, RESEND_SEGMENTS, ForwardReleaser, PendingRelease, RequestCopy


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


COPY = RequestCopy(("10.0.0.1", 40000), ("10.0.0.11", 8080), seq=(1 << 32) - 100, ack=777, mss=1000,
                   rcv_wscale=7, payload=bytes(range(256)) * 20)  # 5,120 bytes: six segments


def test_an_unacknowledged_request_is_sent_again_at_doubling_gaps(on_both_loops) -> None:
    on_both_loops(_an_unacknowledged_request_is_sent_again_at_doubling_gaps())


async def _an_unacknowledged_request_is_sent_again_at_doubling_gaps() -> None:
    loop = asyncio.get_running_loop()
    outstanding = {"bytes": 300}
    resent: list[tuple[float, int]] = []
    released: list[bool] = []
    releaser = ForwardReleaser(lambda p, ok: released.append(ok), timeout=5.0,
                               unacked=lambda sock: outstanding["bytes"],
                               resend=lambda p, unacked: resent.append((loop.time(), unacked)),
                               resend_after=0.01)
    item = PendingRelease(1, socket.socket(), None, None, COPY)  # type: ignore[arg-type]
    sent_at = loop.time()
    releaser.add(item)
    await asyncio.sleep(0.5)
    # 10, 20, 40, 80 and 160 ms apart, then the socket's own timer alone.
    assert len(resent) == MAX_RESENDS and all(unacked == 300 for _, unacked in resent)
    offsets = [at - sent_at for at, _ in resent]
    for n, offset in enumerate(offsets):
        due = 0.01 * (2 ** (n + 1) - 1)
        assert due - 0.002 <= offset < due + 0.05, (n, offsets)  # loop timers round to a millisecond
    outstanding["bytes"] = 0
    await asyncio.wait_for(releaser.finish(), 1.0)
    assert released == [True] and len(resent) == MAX_RESENDS
    item.forward.close()


def test_an_acknowledged_request_or_one_without_a_copy_is_never_sent_again(on_both_loops) -> None:
    on_both_loops(_an_acknowledged_request_or_one_without_a_copy_is_never_sent_again())


async def _an_acknowledged_request_or_one_without_a_copy_is_never_sent_again() -> None:
    resent: list[int] = []
    outstanding = {0: 0, 1: 50}
    releaser = ForwardReleaser(lambda p, ok: None, timeout=0.1,
                               unacked=lambda sock: outstanding[sock.conn_marker],  # type: ignore[attr-defined]
                               resend=lambda p, unacked: resent.append(p.conn_id), resend_after=0.005)
    quick = PendingRelease(0, _Marked(0), None, None, COPY)  # type: ignore[arg-type]
    uncopied = PendingRelease(1, _Marked(1), None, None)  # type: ignore[arg-type]
    releaser.add(quick)
    releaser.add(uncopied)
    await asyncio.wait_for(releaser.finish(), 1.0)
    assert resent == []


class _Marked:
    def __init__(self, marker: int) -> None:
        self.conn_marker = marker


@given(unacked=st.integers(-5, 6000), window=st.integers(0, 1 << 24))
def test_a_copy_is_the_unacknowledged_tail_from_where_it_starts(unacked, window) -> None:
    frames = COPY.segments(unacked, window)
    tail = min(max(unacked, 0), len(COPY.payload))
    start = len(COPY.payload) - tail
    at = COPY.seq + start
    data = b""
    for i, frame in enumerate(frames):
        addresses = socket.inet_ntoa(frame[12:16]), socket.inet_ntoa(frame[16:20])
        assert addresses + struct.unpack_from("!HH", frame, 20) == ("10.0.0.1", "10.0.0.11", 40000, 8080)
        assert packet.checksum(frame[:20]) == 0  # the IP header's checksum is right
        seq, ack, flags, wire_window = struct.unpack_from("!IIxBH", frame, 24)
        assert seq == at % (1 << 32) and ack == 777
        assert wire_window == min(window >> 7, 0xFFFF)  # in the scale the socket announced
        assert flags & 0x10 and bool(flags & 0x08) == (i == len(frames) - 1)  # ACK; PSH on the last
        assert frame[32] >> 4 == 5  # no options: no TSval for the target's PAWS to judge
        payload = frame[40:]
        assert 0 < len(payload) <= COPY.mss
        at += len(payload)
        data += payload
    # At most RESEND_SEGMENTS of the tail, from its first byte.
    assert data == COPY.payload[start:start + RESEND_SEGMENTS * COPY.mss]
