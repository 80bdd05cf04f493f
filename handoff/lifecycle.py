"""After the handoff: when the router forgets a connection (blueprint 2.2, 2.3).

An entry describes one connection and ends with it, never later than a linger:

* the target's side is over: the agent asks the target's kernel (sock_diag) and,
  once no live socket is left and its own entry is gone, reports CLOSED with
  ``CLOSED_TARGET_GONE``. The router then deletes its ingress entry and the
  watch entry, which frees the forwarding port.
* a new connection took the client's 4-tuple: the router's BPF marks the entry
  ENDED at the new SYN and lets the SYN through to the router's stack; the
  sweep tells the agent (RELEASE: it ends the target's side) and deletes the
  entry.
* with no agent to ask (down or unreachable): a client RST plus ``linger``;
  the watch entry of a released port after ``PORT_QUARANTINE_NS``.

Silence ends nothing: an entry idle for ``idle_timeout`` is put to its agent
(HOLDING), which answers GONE only if the target's kernel has no live socket.

Every new control connection starts with the router's list of what it holds
for that agent (HOLDING, complete): the agent ends the entries the router no
longer has, and answers GONE for those it no longer has itself. A restart of
either side so reconciles within one connection set-up. The router keeps no
other Python state per connection: the pinned maps are the record.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from handoff.control import (CLOSED_TARGET_GONE, MAX_HOLDING_KEYS, Closed, ControlClient,
                             ControlUnavailable, Holding, Message, Release)
from handoff.control import FlowKey as WireKey
from handoff.maps import (FLOW_ACTIVE, FLOW_ENDED, FLOW_F_RST, FLOW_HOLD, WATCH_CLOSED, FlowEntry,
                          FlowKey)

if TYPE_CHECKING:
    from arr.metrics import Metrics
    from handoff.datapath import RouterDatapath
    from handoff.engine import HandoffSettings

log = logging.getLogger("arr.handoff")

HOLD_STALE_S = 10.0
"""A HOLD entry older than this belongs to a router that died mid-handoff."""
WATCH_SWEEP_EVERY = 10
"""Sweeps between two walks of the watch map: its entries go on the agents'
GONE as it arrives; the walk only finds quarantines over and entries a dead
router process left (a full walk each second would cost the router CPU in
proportion to the connections it holds)."""
PORT_QUARANTINE_NS = 65 * 10**9
"""Without the agent's word, a released forwarding port is not reused towards
the same target for this long: the target may still hold the 4-tuple
(TIME_WAIT lasts 60 s there when it closed first)."""

Address = tuple[str, int]


def forward_key_of(entry: FlowEntry) -> FlowKey:
    """The forwarding connection (as the target's packets carry it) of an ingress entry."""
    x = entry.x
    return FlowKey(x.daddr, x.saddr, x.dport, x.sport)


def target_of(entry: FlowEntry) -> Address:
    """The target (its server's address) an ingress entry hands packets to."""
    return forward_key_of(entry).src


def wire_key(key: FlowKey) -> WireKey:
    (saddr, sport), (daddr, dport) = key.src, key.dst
    return WireKey(saddr=saddr, daddr=daddr, sport=sport, dport=dport)


def local_key(key: WireKey) -> FlowKey:
    return FlowKey.of((key.saddr, key.sport), (key.daddr, key.dport))


def holding_messages(connections: list[tuple[int, WireKey]], complete: bool) -> list[Holding]:
    """CONNECTIONS in HOLDING frames of at most MAX_HOLDING_KEYS, ``last`` on the final one."""
    chunks = [connections[i:i + MAX_HOLDING_KEYS]
              for i in range(0, len(connections), MAX_HOLDING_KEYS)] or [[]]
    return [Holding(tuple(chunk), complete=complete, last=i == len(chunks) - 1)
            for i, chunk in enumerate(chunks)]


class RouterConnections:
    def __init__(self, datapath: "RouterDatapath", settings: "HandoffSettings", metrics: "Metrics") -> None:
        self.datapath = datapath
        self.settings = settings
        self.metrics = metrics
        self.gone: dict[int, int] = {}
        """Connections (conn_id) whose target side the agents reported gone, and
        when, until swept."""
        self.in_flight: set[FlowKey] = set()
        """Watch keys of handoffs under way in this process (the engine's)."""
        self.released: dict[int, FlowKey] = {}
        """Connections whose ingress entry is gone while the target's side may
        live on, and their forwarding key: the port is freed on the agent's GONE."""
        self._checked: dict[int, int] = {}
        """Silent connections put to their agent, and when (bounded by the map)."""
        self._agent_of: dict[Address, ControlClient] = {}
        self._targets_of: dict[Address, set[Address]] = {}
        self._outbox: list[tuple[ControlClient, Message]] = []
        self._sweeps = 0
        self._task: asyncio.Task[None] | None = None

    def route(self, target: Address, agent_address: Address, agent: ControlClient) -> None:
        """TARGET's connections are the business of the agent at AGENT_ADDRESS."""
        self._agent_of[target] = agent
        self._targets_of.setdefault(agent_address, set()).add(target)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._gc_loop(), name="handoff-gc")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    # ---------------------------------------------------------- the agents' side

    def holding_sync(self, agent_address: Address) -> list[Message]:
        """The complete list of connections this router holds for that agent."""
        targets = self._targets_of.get(agent_address, set())
        held = [(entry.conn_id, wire_key(forward_key_of(entry))) for _, entry in self.datapath.ingress.items()
                if entry.state == FLOW_ACTIVE and target_of(entry) in targets]
        return list(holding_messages(held, complete=True))

    def on_agent_message(self, message: Any) -> None:
        """CLOSED from an agent: with GONE, the connection is over at the target."""
        if isinstance(message, Closed) and message.flags & CLOSED_TARGET_GONE:
            key = self.released.pop(message.conn_id, None)
            if key is not None:
                # No ingress entry translates onto the 4-tuple any more and the
                # target holds nothing on it: the port is free. (Otherwise the
                # sweep deletes the ingress entry first, then the watch entry:
                # a port reused while an old entry still pointed at it would
                # carry the old client's late packets into the new connection.)
                watch = self.datapath.watch.lookup(key)
                if watch is not None and watch.conn_id == message.conn_id:
                    self.datapath.watch.delete(key)
            else:
                self.gone[message.conn_id] = time.monotonic_ns()

    def end_replaced(self, client_key: FlowKey, entry: FlowEntry) -> None:
        """A new connection on CLIENT_KEY is being handed off over an old entry."""
        if entry.state == FLOW_HOLD:
            self.datapath.ingress.delete(client_key)
        else:
            self._release(client_key, entry, "new-syn")

    # ---------------------------------------------------------- the sweep

    async def _gc_loop(self) -> None:
        while True:
            try:
                self.sweep(time.monotonic_ns())
                await self.flush()
            except Exception:  # a sweep must never kill the router
                log.exception("handoff GC sweep failed")
            await asyncio.sleep(self.settings.gc_interval)

    async def flush(self) -> None:
        """Send what the sweep has for the agents (an agent that is down hears
        of it through the HOLDING sync when it is back)."""
        outbox, self._outbox = self._outbox, []
        for agent, message in outbox:
            try:
                await agent.send(message)
            except ControlUnavailable:
                pass

    def sweep(self, now_ns: int) -> int:
        """Delete the entries of connections that are over; return how many."""
        linger_ns = int(self.settings.linger * 1e9)
        idle_ns = int(self.settings.idle_timeout * 1e9)
        removed = live = 0
        seen: set[FlowKey] = set()
        live_ids: set[int] = set()
        silent: dict[ControlClient, list[tuple[int, WireKey]]] = {}
        for client_key, entry in self.datapath.ingress.items():
            last = entry.last_seen_ns or entry.created_ns
            idle = now_ns - last if last else 0
            if entry.state == FLOW_HOLD:
                if idle > HOLD_STALE_S * 1e9:
                    self.datapath.ingress.delete(client_key)
                    removed += 1
                continue
            if entry.state == FLOW_ENDED:
                self._release(client_key, entry, "new-syn")
                removed += 1
                continue
            forward = forward_key_of(entry)
            seen.add(forward)
            live_ids.add(entry.conn_id)
            agent = self._agent_of.get(forward.src)
            if entry.conn_id in self.gone:
                self._forget(client_key, entry, "reset" if entry.flags & FLOW_F_RST else "closed")
                removed += 1
            elif entry.flags & FLOW_F_RST and idle > linger_ns and (agent is None or not agent.connected):
                self._forget(client_key, entry, "reset")
                removed += 1
            else:
                live += 1
                if idle > idle_ns and agent is not None and now_ns - self._checked.get(entry.conn_id, 0) > idle_ns:
                    self._checked[entry.conn_id] = now_ns
                    silent.setdefault(agent, []).append((entry.conn_id, wire_key(forward)))
        for agent, connections in silent.items():
            self._outbox += [(agent, m) for m in holding_messages(connections, complete=False)]
        if self._sweeps % WATCH_SWEEP_EVERY == 0:
            self._sweep_watch(now_ns, seen)
        self._sweeps += 1
        # Reports about connections this router holds nothing of must not pile up.
        self.gone = {c: t for c, t in self.gone.items() if c in live_ids and now_ns - t < linger_ns + idle_ns}
        if len(self.released) > self.datapath.capacity:  # reports lost: the watch walk frees them
            self.released.clear()
        self._checked = {c: t for c, t in self._checked.items() if c in live_ids}
        self.metrics.handed_off.set(live)
        return removed

    def _sweep_watch(self, now_ns: int, live: set[FlowKey]) -> None:
        """Watch entries go when the target's side is gone (the port is free),
        or after the quarantine when no agent said so; entries of handoffs that
        a dead router process never finished are closed first."""
        for key, watch in self.datapath.watch.items():
            if watch.state == WATCH_CLOSED:
                if key in live:
                    continue  # its ingress entry goes first (the ingress sweep)
                if watch.conn_id in self.gone or (watch.closed_ns and now_ns - watch.closed_ns > PORT_QUARANTINE_NS):
                    self.datapath.watch.delete(key)
                    self.gone.pop(watch.conn_id, None)
                    self.released.pop(watch.conn_id, None)
            elif key not in live and key not in self.in_flight:
                watch.state = WATCH_CLOSED
                watch.closed_ns = now_ns
                self.datapath.watch.update(key, watch)

    # ---------------------------------------------------------- ending one

    def _release(self, client_key: FlowKey, entry: FlowEntry, why: str) -> None:
        """The router no longer routes this connection: the agent ends it."""
        agent = self._agent_of.get(target_of(entry))
        if agent is not None:
            self._outbox.append((agent, Release(conn_id=entry.conn_id, key=wire_key(forward_key_of(entry)))))
        self._forget(client_key, entry, why)

    def _forget(self, client_key: FlowKey, entry: FlowEntry, why: str) -> None:
        """Delete the ingress entry; then (never before) free its port if the
        target's side is gone, or keep the port taken until it is."""
        forward = forward_key_of(entry)
        self.datapath.ingress.delete(client_key)
        watch = self.datapath.watch.lookup(forward)
        if watch is not None and watch.conn_id == entry.conn_id:
            if entry.conn_id in self.gone:
                self.datapath.watch.delete(forward)
            else:
                # CLOSED drops the target's late packets and keeps the port
                # taken until the agent's GONE (or the quarantine).
                if watch.state != WATCH_CLOSED:
                    watch.state = WATCH_CLOSED
                    watch.closed_ns = time.monotonic_ns()
                    self.datapath.watch.update(forward, watch)
                self.released[entry.conn_id] = forward
        self.gone.pop(entry.conn_id, None)
        self._checked.pop(entry.conn_id, None)
        self.metrics.handoff_closed.labels(why).inc()
