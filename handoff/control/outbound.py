"""What leaves a control connection, and what is refused: ``FrameSender``
(queued, bounded, with a deadline: nothing ever waits on a peer's drain()),
``RejectionLog`` (one rate-limited line per rejection) and the reasons
counted beside the protocol's (``CHANNEL_REASONS``)."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Callable


class ControlUnavailable(ConnectionError):
    """No established control connection (or it was lost while waiting)."""


CHANNEL_REASONS = (
    "handshake-timeout",      # no complete handshake within handshake_timeout of the accept
    "handshake-abandoned",    # the peer closed before proving itself (or, at a router: the agent did)
    "stalled-frame",          # a frame (or a length prefix) begun and not finished in time
    "idle-timeout",           # a proven router silent (not even its PINGs) for idle_timeout
    "too-many-sessions",      # max_sessions connections open already
    "too-many-from-address",  # max_sessions_per_address open already from that address
    "too-many-handshakes",    # max_handshakes unproven connections open already
    "slow-reader",            # the peer left send_buffer bytes, or bytes for send_timeout, untaken
)
"""Reasons of ``rejected`` beside the protocol's (``frames.REASONS``)."""

DEFAULT_MAX_SESSIONS = 64
DEFAULT_MAX_SESSIONS_PER_ADDRESS = 8
DEFAULT_MAX_HANDSHAKES = 16
DEFAULT_SEND_BUFFER = 4 << 20
DEFAULT_SEND_TIMEOUT = 10.0


def peer_name(writer: asyncio.StreamWriter) -> str:
    """ip:port of the connection's peer."""
    peer = writer.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)


class RejectionLog:
    """One log line per rejection, at most BURST lines per WINDOW seconds: a
    flood is counted in full (``rejected``) but logged in a few lines, the
    rest summed up in one line once the window is over."""

    def __init__(self, logger: logging.Logger, burst: int = 20, window: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.burst = burst
        self.window = window
        self.clock = clock
        self._started = clock()
        self._logged = 0
        self._suppressed: collections.Counter[str] = collections.Counter()

    def __call__(self, reason: str, peer: str, detail: str) -> None:
        now = self.clock()
        if now - self._started >= self.window:
            self.flush()
            self._started, self._logged = now, 0
        if self._logged < self.burst:
            self._logged += 1
            self.logger.warning("control: rejected %s from %s (%s); closing", reason, peer, detail)
        else:
            self._suppressed[reason] += 1

    def flush(self) -> None:
        if self._suppressed:
            self.logger.warning("control: %d more rejections not logged one by one: %s",
                                sum(self._suppressed.values()),
                                ", ".join(f"{r} {n}" for r, n in sorted(self._suppressed.items())))
            self._suppressed.clear()


class FrameSender:
    """The only way frames leave: queued, never awaited.

    Frames written during one event-loop iteration leave in one write (under
    load many handoffs reach the control step in the same iteration: one
    segment and one wakeup of the peer for all of them), at the end of the
    iteration (``call_soon``), so a frame waits for no timer. Order is kept:
    frames carry counters that the peer checks.

    Bounded: the bytes waiting (here and in the transport's buffer) never
    exceed MAX_BYTES, and every byte written must be taken by the kernel
    within DEADLINE seconds (the kernel takes them as the peer reads and
    acknowledges). Otherwise the peer does not read: the connection is
    aborted at once and ``on_give_up(reason, detail)`` called. Nobody ever
    awaits a peer's drain(): a slow peer stalls nothing but itself."""

    def __init__(self, writer: asyncio.StreamWriter, *, max_bytes: int = DEFAULT_SEND_BUFFER,
                 deadline: float = DEFAULT_SEND_TIMEOUT,
                 on_give_up: Callable[[str, str], None] | None = None) -> None:
        self.writer = writer
        self.transport = writer.transport
        self.max_bytes = max_bytes
        self.deadline = deadline
        self.on_give_up = on_give_up
        self.failed: str | None = None
        self._loop = asyncio.get_running_loop()
        self._chunks: list[bytes] = []
        self._pending = 0
        self._written = 0
        """Bytes handed to the transport so far."""
        self._marks: collections.deque[tuple[int, float]] = collections.deque()
        """(offset of its end, when) of each write the kernel had not taken all of."""
        self._timer: asyncio.TimerHandle | None = None

    @property
    def queued(self) -> int:
        """Bytes written and not yet taken by the kernel."""
        return self._pending + self.transport.get_write_buffer_size()

    @property
    def usable(self) -> bool:
        return self.failed is None and not self.writer.is_closing()

    def write(self, frame: bytes) -> None:
        """Queue FRAME. ``ControlUnavailable`` once the connection is closing
        or given up; giving up here when the queue would exceed its bound."""
        if not self.usable:
            raise ControlUnavailable(f"control connection with {peer_name(self.writer)} is closed")
        if self.queued + len(frame) > self.max_bytes:
            self._give_up(f"{self.queued + len(frame)} bytes queued would exceed {self.max_bytes}")
            raise ControlUnavailable(f"control connection with {peer_name(self.writer)} dropped: the peer does not read")
        self._chunks.append(frame)
        self._pending += len(frame)
        if len(self._chunks) == 1:
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        if not self._chunks:
            return
        chunks, self._chunks, self._pending = self._chunks, [], 0
        if not self.usable:
            return
        data = b"".join(chunks) if len(chunks) > 1 else chunks[0]
        self.transport.write(data)
        self._written += len(data)
        if self.transport.get_write_buffer_size():
            self._marks.append((self._written, self._loop.time()))
            self._arm()
        else:
            self._marks.clear()  # the kernel took all of it

    def _arm(self) -> None:
        if self._timer is None and self._marks:
            self._timer = self._loop.call_at(self._marks[0][1] + self.deadline, self._check)

    def _check(self) -> None:
        self._timer = None
        if self.failed is not None:
            return
        taken = self._written - self.transport.get_write_buffer_size()
        while self._marks and self._marks[0][0] <= taken:
            self._marks.popleft()
        if not self._marks:
            return
        waited = self._loop.time() - self._marks[0][1]
        if waited >= self.deadline * 0.999:  # (timers may fire a hair early)
            self._give_up(f"{self.queued} bytes not taken for {waited:.1f}s")
        else:
            self._arm()

    def _give_up(self, detail: str) -> None:
        self.failed = detail
        self.close()
        self.transport.abort()  # nothing more for this peer; its reader sees the end
        if self.on_give_up is not None:
            self.on_give_up("slow-reader", detail)

    def close(self) -> None:
        self._chunks, self._pending = [], 0
        self._marks.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
