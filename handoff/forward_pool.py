"""Forwarding connections opened ahead of need (blueprint 2.1, step 4).

A handoff needs an established connection to the target before it can read
that connection's sequence numbers; opened on demand, its handshake sits in
every request's path (an RTT plus both kernels' work). The pool keeps a few
connections ready per target and per client *profile*: the options the
router's SYN announced (the router's BPF makes them the client's: MSS, SACK,
timestamps), since a connection's options are fixed at its handshake. Most
clients of a site share a handful of profiles; a new profile is connected
inline once, and its pool fills behind it.

A shelf's depth follows its demand (``ShelfDepth``): it starts at
``handoff.forward_pool``, grows by one at each miss (a handoff that found the
shelf empty: one more connection would have served it) up to
``handoff.forward_pool_max``, and shrinks by one each time a connection ages
out unused (it was one too many), down to ``MIN_DEPTH``. Clients that arrive
together (32 keep-alive clients moving between two targets in step, or 32
reconnecting clients on a busy router) drained a shelf of 4 faster than its
refill connects: half of their handoffs connected inline
(benchmarks/RESULTS.md, fourteenth session).

A ready connection is used only while it is young (``MAX_AGE``: servers
close connections that send no request, nginx after 60 s) and still
pristine (established, nothing queued either way: ``fastpath.ineligible``).
A profile unused for ``IDLE_PROFILE`` stops being refilled and its
connections are closed, so an idle router holds nothing.

A taken-back connection's forwarding connection whose next request went to
another target can come back to its shelf (``give_back``, setting
``handoff.reuse_forward``): the router rebuilt its side of it where the
server's side stands, so it is as ready as a new one, and the next handoff to
that target takes it instead of a connect. A shelf holds up to
``RETURNED_DEPTH`` times ``handoff.forward_pool`` that way (or its grown
depth, if more), and its refill connects only below its depth: where clients
move between targets about as often one way as the other, the connections
coming back replace the refill's connects. Back on the shelf a connection
follows the same rules (``MAX_AGE`` from its return, then closed with a FIN
as any unused one).

The decisions are pure (``usable``, ``ShelfDepth``, ``shelf_ceiling``,
``ForwardProfile``); ``ForwardPool`` is the I/O: the engine gives it
``open_forward`` (bind, watch entry, connect) and ``discard`` (a FIN, its
port free once the server answered: handoff/forward_close.py, so pool churn
leaves no TIME_WAIT behind).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Awaitable, Callable

from handoff import fastpath
from handoff.alarm import Alarm

if TYPE_CHECKING:
    from arr.pool import Target
    from handoff.maps import FlowKey

log = logging.getLogger("arr.handoff")

MAX_AGE = 0.9
"""Seconds a ready connection may wait for a request: under the target's
first SYN-ACK retransmission (1 s). Should the handshake's last ACK be lost,
the target completes the handshake with the request instead, and measures its
first RTT from its SYN-ACK: a connection kept longer would give it an RTT of
seconds, or (once its SYN-ACK was resent, a resend the router may never see)
RFC 6298's 3 s fallback RTO, and a response segment lost then waits that long
(seen under 2% loss: a 64 KiB response stalled 4.4 s)."""
IDLE_PROFILE = 60.0
"""A profile not taken from for this long is no longer kept ready."""
RETURNED_DEPTH = 4
"""A shelf takes connections back (``give_back``) up to this many times
``handoff.forward_pool`` (or its grown depth, if more): room for the swing
between clients leaving a target and clients coming to it (clients that move
in step leave a target together, then come back together), past which the
connection is closed ("full"). With 2, eight wrk connections alternating
between two targets found the shelf full at a third of their returns
(benchmarks/RESULTS.md)."""
MIN_DEPTH = 1
"""The least a shelf in use keeps: its connections age out unused below
about one handoff per ``MAX_AGE``, and each one kept then is a connect and a
FIN exchange every 0.9 s for nothing (4 of them doubled an idle router's CPU,
benchmarks/RESULTS.md, fourteenth session); one still serves such a trickle
of handoffs."""
PORT_SHARE = 16
"""A shelf grows to at most this fraction of the forward ports (1/16): the
pool's ports are taken from the handoffs' (a router given few ports keeps
its ``handoff.forward_pool``, ``shelf_ceiling``)."""
RETRY_AFTER = 1.0
"""After a failed connect, the refill waits this long (the target may be down)."""


@dataclass(frozen=True, slots=True)
class ForwardProfile:
    """What the router's SYN to the target announces for a client like this one."""

    mss: int
    """The client's MSS (0: leave the router's own)."""
    sack: bool
    timestamps: bool


def shelf_ceiling(start: int, configured: int, ports: int) -> int:
    """The most a shelf grows to: ``handoff.forward_pool_max`` (CONFIGURED),
    no more than PORTS (the forward port range's size) / ``PORT_SHARE``, and
    never below START (``handoff.forward_pool``)."""
    return max(start, min(configured, ports // PORT_SHARE))


@dataclass(slots=True)
class ShelfDepth:
    """How many ready connections a shelf keeps: ``start`` at first, one
    more at each miss (up to ``ceiling``), one less at each age-out (down to
    ``MIN_DEPTH``). Pure; the pool tells it what happened."""

    start: int
    """``handoff.forward_pool``: what a new shelf keeps."""
    ceiling: int
    """The most it grows to (``handoff.forward_pool_max``, at least ``start``)."""
    current: int = 0

    def __post_init__(self) -> None:
        self.start = max(MIN_DEPTH, self.start)
        self.ceiling = max(self.start, self.ceiling)
        if not MIN_DEPTH <= self.current <= self.ceiling:
            self.current = self.start

    def missed(self) -> None:
        """A handoff found the shelf empty and connected inline."""
        self.current = min(self.ceiling, self.current + 1)

    def aged_out(self) -> None:
        """A connection waited ``MAX_AGE`` unused: one too many for the demand."""
        self.current = max(MIN_DEPTH, self.current - 1)

    def failed(self) -> None:
        """A connect failed: the target may be down, and a grown shelf would
        keep that many connects at it (each slot retries after
        ``RETRY_AFTER``): no more than ``start``."""
        self.current = min(self.current, self.start)


@dataclass(slots=True)
class ReadyForward:
    sock: socket.socket
    watch_key: "FlowKey"
    conn_id: int
    opened: float = 0.0
    """Loop time when the connection was established."""
    fin_seq: int | None = None
    """Seq its FIN would carry (its snd_nxt), when known: a rebuilt
    connection's, which has sent nothing (handoff/forward_close.py)."""
    syn_seq: int | None = None
    """Seq of the server's SYN-ACK when the router's socket is a rebuilt one
    (handoff/takeback.py): its rcv_nxt is past the responses it carried, so it
    no longer tells. None: a connection as its handshake left it."""


def aged(opened: float, now: float) -> bool:
    """Whether a connection ready since OPENED is too old to use at NOW (``MAX_AGE``)."""
    return now - opened >= MAX_AGE


def usable(opened: float, now: float, ineligible: str | None) -> bool:
    """Whether a ready connection may carry a handoff now."""
    return not aged(opened, now) and ineligible is None


@dataclass
class _Shelf:
    depth: ShelfDepth
    ready: deque[ReadyForward] = field(default_factory=deque)
    last_taken: float = 0.0
    refill: asyncio.Task[None] | None = None
    alarm: Alarm = field(default_factory=Alarm)
    """What a full shelf's refill sleeps on: a take or the oldest's expiry wakes it."""


class ForwardPool:
    def __init__(self, open_forward: Callable[["Target", ForwardProfile], Awaitable[ReadyForward]],
                 discard: Callable[[ReadyForward], None], depth: int, *, ceiling: int = 0,
                 count: Callable[[str], None] = lambda result: None,
                 clean: Callable[[ReadyForward], bool] = lambda ready: True) -> None:
        self.open_forward = open_forward
        self.discard = discard
        self.clean = clean
        """Whether a connection's handshake went without a loss (the engine
        asks the watch entry): the target's RTO starts at 3 s after one."""
        self.depth = depth
        """A new shelf's depth (``handoff.forward_pool``); 0: no pool."""
        self.ceiling = ceiling
        """The most a shelf's depth grows to (``ShelfDepth``; never below ``depth``)."""
        self.count = count
        """Told each outcome: "hit", "miss" (connect inline), "stale" (closed
        unused), "returned" (given back, ``give_back``), "full" (given back to
        a full shelf: the caller closes it)."""
        self.shelves: dict[tuple[tuple[str, int], ForwardProfile], _Shelf] = {}
        """By the target's address, not its ``Target``: a target listed in
        several pools (its weight or name differing) is one server, and a
        connection given back for one pool's handoff serves another's."""
        self.taken = self.missed = self.stale = self.returned = 0

    @property
    def ready(self) -> int:
        """Connections waiting on all shelves (each holds a socket and a watch entry)."""
        return sum(len(shelf.ready) for shelf in self.shelves.values())

    @property
    def kept(self) -> int:
        """The depths of all shelves: how many connections they keep ready now."""
        return sum(shelf.depth.current for shelf in self.shelves.values())

    def take(self, target: "Target", profile: ForwardProfile) -> ReadyForward | None:
        """A ready connection for this target and profile, or None (connect
        inline); either way the shelf is refilled behind the caller."""
        if self.depth <= 0:
            return None
        now = asyncio.get_running_loop().time()
        shelf = self.shelves.get((target.address, profile))
        new = shelf is None
        if shelf is None:
            shelf = self.shelves[(target.address, profile)] = _Shelf(ShelfDepth(self.depth, self.ceiling))
        shelf.last_taken = now
        found = None
        while shelf.ready:
            candidate = shelf.ready.popleft()
            try:
                reason = fastpath.ineligible(candidate.sock)
            except OSError:
                reason = "gone"
            if usable(candidate.opened, now, reason) and self.clean(candidate):
                found = candidate
                break
            self._stale(candidate, shelf if aged(candidate.opened, now) else None)
        if found is None:
            self.missed += 1
            self.count("miss")
            if not new:  # a new shelf's first miss is no measure of its demand
                shelf.depth.missed()
        else:
            self.taken += 1
            self.count("hit")
        if shelf.refill is None or shelf.refill.done():
            shelf.refill = asyncio.get_running_loop().create_task(self._refill(target, profile, shelf))
        else:
            shelf.alarm.wake()
        return found

    def give_back(self, target: tuple[str, int], profile: ForwardProfile, ready: ReadyForward) -> bool:
        """Shelve READY, a connection to TARGET (its address) for PROFILE that carried
        requests and is idle again, for the next handoff there; False (the
        caller closes it) when the pool is off, no handoff took from this
        shelf lately (its profile is not kept ready) or the shelf is full."""
        shelf = self.shelves.get((target, profile))
        if self.depth <= 0 or shelf is None:
            return False
        if len(shelf.ready) >= max(self.depth * RETURNED_DEPTH, shelf.depth.current):
            self.count("full")
            return False
        ready.opened = asyncio.get_running_loop().time()
        shelf.ready.append(ready)  # the newest: the deque stays in order of ``opened``
        self.returned += 1
        self.count("returned")
        return True

    async def _refill(self, target: "Target", profile: ForwardProfile, shelf: _Shelf) -> None:
        """Keep the shelf at ``depth``: up to that many connects at once, each
        on its own, so that one whose SYN is lost (the kernel resends it after
        a second) holds one slot, not the whole shelf's refill."""
        loop = asyncio.get_running_loop()
        opening: set[asyncio.Task[None]] = set()

        def opened(task: asyncio.Task[None]) -> None:
            opening.discard(task)
            shelf.alarm.wake()

        try:
            while True:
                now = loop.time()
                if now - shelf.last_taken > IDLE_PROFILE and not opening:
                    self._empty(shelf)
                    del self.shelves[(target.address, profile)]
                    return
                while shelf.ready and aged(shelf.ready[0].opened, now):
                    self._stale(shelf.ready.popleft(), shelf)
                for _ in range(shelf.depth.current - len(shelf.ready) - len(opening)):
                    task = loop.create_task(self._open_one(target, profile, shelf))
                    opening.add(task)
                    task.add_done_callback(opened)
                # Wake at a take, a connect done, or when the oldest ages out.
                oldest = MAX_AGE - (now - shelf.ready[0].opened) if shelf.ready else MAX_AGE
                await shelf.alarm.sleep(min(oldest, IDLE_PROFILE))
        finally:
            for task in opening:
                task.cancel()

    async def _open_one(self, target: "Target", profile: ForwardProfile, shelf: _Shelf) -> None:
        try:
            ready = await self.open_forward(target, profile)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the target is down or the ports are taken: inline connects say why
            log.debug("forward pool for %s: %s", target.name, exc)
            shelf.depth.failed()
            await asyncio.sleep(RETRY_AFTER)  # holding its slot: no storm of connects to a dead target
            return
        if len(shelf.ready) >= shelf.depth.current or (target.address, profile) not in self.shelves:
            self.discard(ready)  # the shelf filled (or went) meanwhile
            return
        ready.opened = asyncio.get_running_loop().time()
        shelf.ready.append(ready)

    def _stale(self, ready: ReadyForward, aged_on: _Shelf | None = None) -> None:
        """READY closed unused; AGED_ON: the shelf it aged out of (not one the
        target closed or whose handshake lost a packet), which shrinks."""
        self.stale += 1
        self.count("stale")
        self.discard(ready)
        if aged_on is not None:
            aged_on.depth.aged_out()

    def _empty(self, shelf: _Shelf) -> None:
        while shelf.ready:
            self.discard(shelf.ready.popleft())

    async def close(self) -> None:
        for shelf in self.shelves.values():
            if shelf.refill is not None:
                shelf.refill.cancel()
        await asyncio.gather(*(s.refill for s in self.shelves.values() if s.refill is not None),
                             return_exceptions=True)
        for shelf in self.shelves.values():
            self._empty(shelf)
        self.shelves.clear()
