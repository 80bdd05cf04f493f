"""Moving handed-off connections off a target (``arr migrate``, a drain, a
target found down): the I/O half; the order, selection and report are pure
(arr/migration.py).

Two ways, per connection:

* **live**: the router takes the connection back on its own initiative
  (``TakeBacks.take_back_now``: a probe makes the client send its current
  state, the agent lets go once the client has acknowledged the last
  response, both sockets are rebuilt) and gives it to its front-end like any
  taken-back connection. The rebuilt forwarding connection to the old
  target is closed at once (a FIN: its server logs a normal close). The
  client notices nothing; its next request is decided by the policy,
  steered to the order's destination by an override for its exact 4-tuple
  (arr/migration.py ``steer``). A connection in the middle of a response
  moves as soon as the client has acknowledged all of it (``order.wait``).
* **reset** (seed 002's method): the old target's socket gets a RST at the
  exact sequence number the client's stream stops at (translated), so its
  server sees the peer reset the connection; the ingress entry goes (the
  agent ends its entry and destroys the socket should the RST be lost);
  and a probe to the client is answered by the router's stack with a RST at
  the client's own ack: exact. The client reconnects, and an override for
  its address (and the order's ports) sends its new connections to the
  destination for ``[handoff] migrate_sticky`` seconds.

A live move that cannot be done without loss (no answer to the probes, the
response not acknowledged within ``wait``) leaves the connection where it
is, counted as skipped with the reason, unless the order says
``fallback_reset`` (a target found down: a reset beats a hang).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Awaitable, Callable

from arr.migration import Candidate, MoveOrder, MoveReport, PortRange, select
from handoff import craft
from handoff.lifecycle import forward_key_of, target_of
from handoff.maps import FLOW_ACTIVE, FlowEntry, FlowKey
from handoff.takeback import TakeBackFailed
from handoff.translate import wrap

if TYPE_CHECKING:
    import socket

    from arr.metrics import Metrics
    from handoff.datapath import RouterDatapath
    from handoff.lifecycle import RouterConnections
    from handoff.takeback import TakeBacks, TakenBack

log = logging.getLogger("arr.handoff")

Address = tuple[str, int]
RESPONSE_POLL = 0.02
"""Seconds between two looks at a connection that is not between responses yet."""
QUIET_NS = 300_000_000
"""A client silent this long has no response bytes arriving: it would have
acknowledged them (Linux delays an ACK 200 ms at most)."""
CONCURRENT_MOVES = 64
"""Connections moved at once: each holds a probe, an agent request and two
socket rebuilds; more at once only queues at the agent."""
RESET_PROBES = (0.005, 0.6)
"""When a reset client is probed (seconds after its entry went: the first
once the deletion is surely in force; the second for a probe or answer lost,
a Linux client answers one per 500 ms)."""


def client_probe(key: FlowKey, entry: FlowEntry) -> bytes:
    """The probe for the client of ingress entry KEY: from the service address
    it connected to, one below the client's latest ack."""
    client, service = key.src, key.dst
    return craft.probe(service, client, client_acked=entry.peer_ack,
                       client_next=entry.seq_next or entry.take_from)


def target_reset(entry: FlowEntry) -> bytes:
    """The RST the old target's server receives: from the router's end of the
    forwarding connection, at the target's rcv_nxt (the client's stream end,
    in the target's space)."""
    forward = forward_key_of(entry)  # the target's packets: target -> router
    client_end = entry.seq_next or entry.take_from
    return craft.reset(forward.dst, forward.src, wrap(client_end + entry.x.seq_delta))


class Migrator:
    def __init__(self, datapath: "RouterDatapath", connections: "RouterConnections", takebacks: "TakeBacks",
                 metrics: "Metrics", sender: craft.RawSender, *,
                 resume: Callable[["socket.socket", Address, int, "TakenBack"], Awaitable[None]],
                 steer: Callable[[str, PortRange | None, Address], None]) -> None:
        self.datapath = datapath
        self.connections = connections
        self.takebacks = takebacks
        self.metrics = metrics
        self.resume = resume
        self.steer = steer
        """(client address, its ports (None: all), destination): the
        router's override for the client's next requests (arr/migration.py)."""
        self.sender = sender
        self._tasks: set[asyncio.Task[None]] = set()

    def candidates(self) -> dict[Candidate, FlowKey]:
        return {Candidate(client=key.src, target=target_of(entry), busy=entry.state != FLOW_ACTIVE): key
                for key, entry in self.datapath.ingress.items()}

    async def migrate(self, order: MoveOrder, *, fallback_reset: bool = False) -> MoveReport:
        started = time.monotonic()
        keys = self.candidates()
        selection = select(order, keys)
        report = MoveReport(order, selected=len(selection.chosen), left=selection.left)
        if selection.chosen and not self.sender.ready():
            log.error("migrate: %s", self.sender.error)
            for _ in selection.chosen:
                report.skip("no-raw-socket")
            selection.chosen = []
        slots = asyncio.Semaphore(CONCURRENT_MOVES)

        async def move(candidate: Candidate) -> None:
            async with slots:
                await self._move(order, keys[candidate], report, fallback_reset)

        await asyncio.gather(*(move(c) for c in selection.chosen))
        report.seconds = time.monotonic() - started
        for outcome, count in (("moved", report.moved), ("reset", report.reset)):
            if count:
                self.metrics.migrations.labels(order.mode, outcome).inc(count)
        for why, count in report.skipped.items():
            self.metrics.migrations.labels(order.mode, f"skipped-{why}").inc(count)
        log.info("migrate %s -> %s (%s): %d selected, %d moved, %d reset, skipped %s, in %.2f s",
                 order.source, order.destination or "policy", order.mode, report.selected, report.moved,
                 report.reset, report.skipped or "none", report.seconds)
        return report

    async def _move(self, order: MoveOrder, key: FlowKey, report: MoveReport, fallback_reset: bool) -> None:
        if order.mode == "reset":
            why = await self.reset(key, order)
            if why is None:
                report.reset += 1
            else:
                report.skip(why)
            return
        why = await self.move_live(key, order)
        if why is None:
            report.moved += 1
        elif fallback_reset and await self.reset(key, order) is None:
            report.reset += 1
        else:
            report.skip(why)

    async def move_live(self, key: FlowKey, order: MoveOrder) -> str | None:
        """Take KEY's connection back and give it to the front-end; None, or
        why it stayed."""
        deadline = time.monotonic() + order.wait
        why = await self._settled(key, deadline)
        if why is not None:
            return why
        try:
            sock, context, requests = await self.takebacks.take_back_now(
                key, probe=lambda entry: self.sender.send(client_probe(key, entry)), deadline=deadline)
        except TakeBackFailed as failed:
            return failed.reason
        self.takebacks.drop_forward(context)
        if order.destination is not None:
            self.steer(key.src[0], PortRange(key.src[1], key.src[1]), order.destination)
        task = asyncio.get_running_loop().create_task(self.resume(sock, key.src, requests, context))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return None

    async def _settled(self, key: FlowKey, deadline: float) -> str | None:
        """Wait until the connection is between responses: its last request
        answered (the client acknowledged a response byte: taken back before
        that, the request would be lost, the target has it and the router
        does not), the client silent for ``QUIET`` (no response byte reached
        it lately: it would have acknowledged it) and its window open (a
        client that stopped reading holds the rest of a response back). The
        router cannot see where a response ends (it never sees one); the
        agent adds that the server's socket holds nothing unsent
        (handoff/agent.py ``_unsent``)."""
        while True:
            entry = self.datapath.ingress.lookup(key)
            if entry is None:
                return "gone"
            start = self.connections.responses.get(entry.conn_id)
            answered = start is None or wrap(entry.peer_ack - start) != 0
            quiet = time.monotonic_ns() - entry.last_seen_ns >= QUIET_NS and entry.peer_window != 0
            if answered and quiet:
                return None
            if time.monotonic() >= deadline:
                return "awaiting-response" if not answered else "responding"
            await asyncio.sleep(RESPONSE_POLL)

    async def reset(self, key: FlowKey, order: MoveOrder) -> str | None:
        """End KEY's connection with exact resets at both ends; None, or why not."""
        entry = self.datapath.ingress.lookup(key)
        if entry is None:
            return "gone"
        if entry.state != FLOW_ACTIVE:
            return "busy"
        if order.destination is not None:
            self.steer(key.src[0], order.ports, order.destination)
        self.sender.send(target_reset(entry))
        # The entry goes (the agent ends its side: its socket is gone by now,
        # or destroyed should the RST have been lost); from here the client's
        # packets meet the router's stack, which answers them with a RST.
        self.connections.end_moved(key, entry)
        probe = client_probe(key, entry)
        loop = asyncio.get_running_loop()
        for at in RESET_PROBES:
            loop.call_later(at, self.sender.send, probe)
        return None

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
