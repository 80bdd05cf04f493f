"""handoff/event_reader.py: a burst of ring-buffer records costs one wake-up.

The ring buffer is stood in for by a pipe (EventReader uses only fileno() and
consume()); the real ring buffer is read in tests/bpf/test_events.py."""

from __future__ import annotations

import asyncio
import os

from handoff.event_reader import EventReader


class PipeRing:
    """fileno() is readable while records wait; consume() returns them all."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)

    def put(self, *records: int) -> None:
        os.write(self.write_fd, bytes(records))

    def fileno(self) -> int:
        return self.read_fd

    def consume(self) -> list[int]:
        try:
            return list(os.read(self.read_fd, 4096))
        except BlockingIOError:
            return []

    def close(self) -> None:
        os.close(self.read_fd)
        os.close(self.write_fd)


async def _a_burst_is_one_batch_and_the_reader_rearms() -> None:
    ring = PipeRing()
    batches: list[list[int]] = []
    reader = EventReader(ring, batches.append, window=0.02)  # type: ignore[arg-type]
    reader.start()
    try:
        ring.put(1)
        await asyncio.sleep(0.005)
        ring.put(2, 3)  # inside the window of the first
        await asyncio.sleep(0.05)
        assert batches == [[1, 2, 3]]
        ring.put(4)  # watched again after the batch
        await asyncio.sleep(0.05)
        assert batches == [[1, 2, 3], [4]] and reader.batches == 2
    finally:
        reader.stop()
        ring.close()


def test_a_burst_is_one_batch_and_the_reader_rearms(on_both_loops) -> None:
    on_both_loops(_a_burst_is_one_batch_and_the_reader_rearms())


async def _a_failing_handler_does_not_stop_the_reader() -> None:
    ring = PipeRing()
    seen: list[list[int]] = []

    def handle(records: list[int]) -> None:
        seen.append(records)
        if len(seen) == 1:
            raise RuntimeError("boom")

    reader = EventReader(ring, handle, window=0.001)  # type: ignore[arg-type]
    reader.start()
    try:
        ring.put(1)
        await asyncio.sleep(0.03)
        ring.put(2)
        await asyncio.sleep(0.03)
        assert seen == [[1], [2]]
    finally:
        reader.stop()
        ring.close()


def test_a_failing_handler_does_not_stop_the_reader(on_both_loops) -> None:
    on_both_loops(_a_failing_handler_does_not_stop_the_reader())


async def _stop_inside_a_window_cancels_the_batch() -> None:
    ring = PipeRing()
    seen: list[list[int]] = []
    reader = EventReader(ring, seen.append, window=0.05)  # type: ignore[arg-type]
    reader.start()
    ring.put(1)
    await asyncio.sleep(0.01)
    reader.stop()  # the timer is pending: cancelled, nothing delivered, no reader left
    await asyncio.sleep(0.08)
    assert seen == []
    ring.close()


def test_stop_inside_a_window_cancels_the_batch(on_both_loops) -> None:
    on_both_loops(_stop_inside_a_window_cancels_the_batch())


async def _read_now_hands_over_what_waits_and_the_reader_goes_on() -> None:
    ring = PipeRing()
    batches: list[list[int]] = []
    reader = EventReader(ring, batches.append, window=0.05)  # type: ignore[arg-type]
    reader.start()
    try:
        ring.put(1, 2)
        reader.read_now()  # a take-back before it rebuilds: no wait for the loop
        assert batches == [[1, 2]]
        await asyncio.sleep(0.08)  # the loop's read (armed by the same records) finds nothing
        assert batches == [[1, 2]]
        ring.put(3)
        await asyncio.sleep(0.08)
        assert batches == [[1, 2], [3]]
        reader.read_now()  # nothing waiting: nothing handed over
        assert batches == [[1, 2], [3]] and reader.batches == 2
    finally:
        reader.stop()
        ring.close()


def test_read_now_hands_over_what_waits_and_the_reader_goes_on(on_both_loops) -> None:
    on_both_loops(_read_now_hands_over_what_waits_and_the_reader_goes_on())


async def _without_a_window_each_wake_up_is_read_and_the_reader_stays() -> None:
    ring = PipeRing()
    batches: list[list[int]] = []

    def handle(records: list[int]) -> None:
        batches.append(records)
        if records == [2]:
            raise RuntimeError("boom")  # logged; the reader goes on

    reader = EventReader(ring, handle, window=0.0)  # type: ignore[arg-type]
    reader.start()
    try:
        ring.put(1)
        await asyncio.sleep(0.01)
        assert batches == [[1]]
        ring.put(2)
        await asyncio.sleep(0.01)
        ring.put(3, 4)
        await asyncio.sleep(0.01)
        assert batches == [[1], [2], [3, 4]] and reader.batches == 3
    finally:
        reader.stop()
    ring.put(5)  # stopped: the fd is no longer watched
    await asyncio.sleep(0.01)
    assert batches == [[1], [2], [3, 4]]
    ring.close()


def test_without_a_window_each_wake_up_is_read_and_the_reader_stays(on_both_loops) -> None:
    on_both_loops(_without_a_window_each_wake_up_is_read_and_the_reader_stays())
