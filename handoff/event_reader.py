"""The programs' ``arr_events`` ring buffer, read from an event loop in batches.

Every handed-off connection produces a few events as it ends (the target's
FIN, the ACK after it; a client's RST at the router). Read as they come, each
is a wake-up of the agent or router process: at a thousand connections a
second, the wake-ups cost more than the events' work. So the first record of
a burst only arms a short timer (``WINDOW``); the records that arrived by then
are handed over in one batch, and the reader watches the ring buffer again.
An idle ring buffer costs nothing (the fd is watched, no timer runs); a busy
one costs at most one wake-up per window. Events are hints (the lifecycle
checks each against the kernel), so a few milliseconds of delay change
nothing but when a port is free again. The router's reader has no window
(handoff/lifecycle.py: a capture is a client waiting for its answer), and
reads the records as the loop finds them.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable, Generic, TypeVar

from handoff.libbpf import RingBuffer

log = logging.getLogger("arr.handoff")

R = TypeVar("R")

WINDOW = 0.005
"""Seconds records are gathered after the first one of a burst."""


class EventReader(Generic[R]):
    def __init__(self, ring: RingBuffer, on_records: Callable[[list[R]], None], window: float = WINDOW) -> None:
        self.ring = ring
        self.on_records = on_records
        self.window = window
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.batches = 0

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.ring.fileno(), self._readable)

    def stop(self) -> None:
        if self._loop is None:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        else:
            self._loop.remove_reader(self.ring.fileno())
        self._loop = None

    def close(self) -> None:
        """Stop, and close the ring buffer (the reader owns it)."""
        self.stop()
        self.ring.close()

    def read_now(self) -> None:
        """Hand over the records waiting now, without waiting for the loop
        (whose watch and timer stay as they are: their read finds the rest)."""
        try:
            records = self.ring.consume()
            if records:
                self.batches += 1
                self.on_records(records)
        except Exception:  # events are hints: the sweeps find what one missed
            log.exception("reading the programs' events failed")

    def _readable(self) -> None:
        assert self._loop is not None
        if self.window <= 0:
            # No window (the router: a capture is a client waiting): read
            # now and keep watching, rather than unwatch, arm a timer of 0
            # and watch again, two epoll_ctl calls and a timer per batch.
            self.read_now()
            return
        self._loop.remove_reader(self.ring.fileno())
        self._timer = self._loop.call_later(self.window, self._drain)

    def _drain(self) -> None:
        assert self._loop is not None
        self._timer = None
        try:
            self.read_now()
        finally:
            if self._loop is not None:
                self._loop.add_reader(self.ring.fileno(), self._readable)
