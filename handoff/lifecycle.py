"""After the handoff: when the router forgets a connection (blueprint 2.2, 2.3).

An entry describes one connection and ends with it:

* the target's side is over: the agent asks the target's kernel (sock_diag) and,
  once no live socket is left and its own entry is gone, reports CLOSED with
  ``CLOSED_TARGET_GONE``. The router acts on it at once: the watch entry of the
  forwarding connection names the client's 4-tuple, so the ingress entry is
  deleted, and then (never before) the watch entry, which frees the
  forwarding port. Reusing the port at once is safe: the target holds
  nothing on the 4-tuple any more (its agent destroyed a TIME_WAIT socket
  before reporting, which would otherwise refuse the router's next SYN by
  PAWS, RFC 6191: translated TSvals ran M ahead of the router's clock), and
  no entry translates the old client's late packets onto it (they reach the
  router's stack, whose RST ends whatever the client had left, e.g. a
  retransmitted FIN in LAST_ACK);
* a new connection took the client's 4-tuple: the router's BPF marks the entry
  ENDED at the new SYN, lets the SYN through to the router's stack and reports
  it (ring buffer); the router tells the agent (RELEASE: it ends the target's
  side) and deletes the entry;
* the client's RST: reported by the BPF as it passes; the router asks the
  agent at once (HOLDING, not complete: the target's kernel sends nothing its
  agent would see). With no agent to ask (down or unreachable): the RST plus
  ``linger`` ends it; the watch entry of a released port goes after
  ``PORT_QUARANTINE_NS``.

Silence ends nothing: an entry idle for ``idle_timeout`` is put to its agent
(HOLDING), which answers GONE only if the target's kernel has no live socket.

The work follows what happens, not how many connections are held: events from
the ingress program (``arr_events``) and the agents' reports drive it; a slow
full sweep every ``SWEEP_INTERVAL`` (maps read in batches) does what no event
names (silent connections, handoffs a dead router process left, quarantines
over, events lost).

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
from typing import TYPE_CHECKING, Any, Callable, Iterable

from arr import accesslog
from handoff.control import (CLOSED_TARGET_GONE, MAX_HOLDING_KEYS, Closed, ControlClient,
                             ControlUnavailable, Holding, Message, Release)
from handoff.control import FlowKey as WireKey
from handoff.event_reader import EventReader
from handoff.maps import (EV_NEW_SYN, EV_RESEND, EV_RST, FLOW_ACTIVE, FLOW_ENDED, FLOW_F_FIN, FLOW_F_RST, FLOW_HOLD,
                          FLOW_TAKEBACK, WATCH_CLOSED, Capture, Event, FlowEntry, FlowKey)

if TYPE_CHECKING:
    from arr.config import HandoffSettings
    from arr.metrics import Metrics
    from handoff.datapath import RouterDatapath

log = logging.getLogger("arr.handoff")

HOLD_STALE_S = 10.0
"""A HOLD entry older than this belongs to a router that died mid-handoff."""
SWEEP_INTERVAL = 30.0
"""Seconds between two full sweeps of the ingress and watch maps."""
WATCH_SWEEP_EVERY = 4
"""Full sweeps between two walks of the watch map: its entries go on the
agents' GONE as it arrives; the walk only finds quarantines over and entries
a dead router process left."""
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


def _known(key: FlowKey) -> bool:
    return any(bytes(key))


class RouterConnections:
    sweep_interval = SWEEP_INTERVAL

    def __init__(self, datapath: "RouterDatapath", settings: "HandoffSettings", metrics: "Metrics") -> None:
        self.datapath = datapath
        self.settings = settings
        self.metrics = metrics
        self.gone: dict[int, int] = {}
        """Connections (conn_id) the agents reported gone whose ingress entry
        could not be found from the report (a watch entry that does not name
        the client), and when: the next sweep ends them."""
        self.in_flight: set[FlowKey] = set()
        """Watch keys of handoffs under way in this process (the engine's)."""
        self._checked: dict[int, int] = {}
        """Silent connections put to their agent, and when (bounded by the map)."""
        self._agent_of: dict[Address, ControlClient] = {}
        self._targets_of: dict[Address, set[Address]] = {}
        self._outbox: list[tuple[ControlClient, Message]] = []
        self._sweeps = 0
        self._live = 0
        self._task: asyncio.Task[None] | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._reader: EventReader[Event] | None = None
        self.responses: dict[int, int] = {}
        """Client-space seq of the first response byte of each live
        connection's last handed-off request (handoff/engine.py): while the
        client's ack is still there, that request is unanswered, and the
        connection must not be moved (handoff/migrate.py). Unknown after a
        router restart (moved as if answered)."""
        self.answering_head: set[int] = set()
        """Connections (conn_id) whose last request sent to the target is a
        HEAD: TAKEBACK and SHIFT tell the agent (``answers_head``), which
        cannot see requests and would read the response's length as a body."""
        self.handed_off: dict[Address, int] = {}
        """Live handed-off connections per target (least-connections and
        LARD count them as load): kept as they start and end, recounted by
        every sweep."""
        self._counted: dict[int, Address] = {}
        """The connections (conn_id) ``handed_off`` counts, and where: an entry
        written ACTIVE again (a request in place, a take-back undone) is the
        same connection, counted once."""
        self.on_load: Callable[[Address, int], None] = lambda target, count: None
        """Told each change of ``handed_off``."""
        self.on_captures: Callable[[list[Capture]], None] = lambda captures: None
        """Where the ingress program's captures go (handoff/takeback.py)."""
        self.on_resends: Callable[[list[tuple[FlowKey, int]]], None] = lambda resends: None
        """(client key, conn_id) of clients that resent a request rerouted in place (handoff/inplace.py)."""
        datapath.ingress.on_active = self._installed

    def route(self, target: Address, agent_address: Address, agent: ControlClient) -> None:
        """TARGET's connections are the business of the agent at AGENT_ADDRESS."""
        self._agent_of[target] = agent
        self._targets_of.setdefault(agent_address, set()).add(target)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        # Window 0: a capture is a client waiting for its answer; the router's
        # other events are rare (a client's RST, a new SYN on an old 4-tuple).
        self._reader = EventReader(self.datapath.events(), self.on_events, window=0.0)
        self._reader.start()
        self._task = loop.create_task(self._gc_loop(), name="handoff-gc")

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        for task in (self._task, self._flusher):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    def _installed(self, _key: FlowKey, entry: FlowEntry) -> None:
        if entry.conn_id in self._counted:
            return
        target = self._counted[entry.conn_id] = target_of(entry)
        self._live += 1
        self.metrics.handed_off.set(self._live)
        self._load(target, +1)

    def _load(self, target: Address, change: int) -> None:
        count = max(0, self.handed_off.get(target, 0) + change)
        self.handed_off[target] = count
        self.on_load(target, count)

    # ---------------------------------------------------------- the agents' side

    def holding_sync(self, agent_address: Address) -> list[Message]:
        """The complete list of connections this router holds for that agent."""
        targets = self._targets_of.get(agent_address, set())
        held = [(entry.conn_id, wire_key(forward_key_of(entry))) for _, entry in self.datapath.ingress.items()
                if entry.state in (FLOW_ACTIVE, FLOW_TAKEBACK) and target_of(entry) in targets]
        return list(holding_messages(held, complete=True))

    def on_agent_message(self, message: Any) -> None:
        """CLOSED from an agent: with GONE, the connection is over at the target."""
        if isinstance(message, Closed) and message.flags & CLOSED_TARGET_GONE:
            self.target_gone(message.conn_id, local_key(message.key), message)

    def _record_end(self, client: FlowKey, entry: FlowEntry, report: Closed, why: str) -> None:
        """What a handed-off connection cost and how it ended: the client's
        side from the router's ingress entry, the target's (everything it
        served, directly) from the agent's CLOSED."""
        self.metrics.handed_off_bytes_of("client").inc(entry.bytes)
        self.metrics.handed_off_packets_of("client").inc(entry.packets)
        self.metrics.handed_off_bytes_of("target").inc(report.bytes)
        self.metrics.handed_off_packets_of("target").inc(report.packets)
        if not accesslog.enabled():
            return
        how = "rst" if report.flags & FLOW_F_RST else "fin" if report.flags & FLOW_F_FIN else why
        duration = (time.monotonic_ns() - entry.created_ns) / 1e9 if entry.created_ns else None
        accesslog.emit(accesslog.connection_end(
            client=client.src, target=target_of(entry), how=how, duration_s=duration,
            packets_in=entry.packets, bytes_in=entry.bytes, packets_out=report.packets, bytes_out=report.bytes))

    def target_gone(self, conn_id: int, forward: FlowKey, report: Closed | None = None) -> None:
        """The agent says connection CONN_ID on FORWARD is over at the target
        and its entry gone: end the ingress entry, then free the port."""
        watch = self.datapath.watch.lookup(forward)
        if watch is None or watch.conn_id != conn_id:
            # The port is free already, or another connection's by now (a
            # late report must never touch it). An ingress entry of CONN_ID,
            # if any is left, is found by the sweep.
            self.gone[conn_id] = time.monotonic_ns()
            return
        if not _known(watch.client):
            self.gone[conn_id] = time.monotonic_ns()  # the sweep ends the ingress entry, then frees the port
            return
        entry = self.datapath.ingress.lookup(watch.client)
        if entry is not None and entry.conn_id == conn_id and entry.state != FLOW_HOLD:
            self.datapath.ingress.delete(watch.client)
            why = "reset" if entry.flags & FLOW_F_RST else "closed"
            self._counted_end(conn_id, why, target_of(entry))
            if report is not None:
                self._record_end(watch.client, entry, report, why)
        # No ingress entry translates onto the 4-tuple any more and the target
        # holds nothing on it: the port is free.
        self.datapath.watch.delete(forward)
        self.gone.pop(conn_id, None)

    def end_replaced(self, client_key: FlowKey, entry: FlowEntry) -> None:
        """A new connection on CLIENT_KEY is being handed off over an old entry."""
        if entry.state == FLOW_HOLD:
            self.datapath.ingress.delete(client_key)
        else:
            self._release(client_key, entry, "new-syn")

    # ---------------------------------------------------------- events

    def on_events(self, events: Iterable[Event]) -> None:
        """The ingress program's reports: a new SYN ended an entry; the client's RST."""
        asks: dict[ControlClient, list[tuple[int, WireKey]]] = {}
        captures = [e for e in events if isinstance(e, Capture)]
        if captures:
            self.on_captures(captures)
        resends = [(FlowKey.from_buffer_copy(e.key), e.conn_id) for e in events
                   if not isinstance(e, Capture) and e.kind == EV_RESEND]
        if resends:
            self.on_resends(resends)
        for event in events:
            if isinstance(event, Capture) or event.kind == EV_RESEND:
                continue
            key = FlowKey.from_buffer_copy(event.key)
            entry = self.datapath.ingress.lookup(key)
            if entry is None or entry.conn_id != event.conn_id:
                continue  # over already
            if event.kind == EV_NEW_SYN and entry.state == FLOW_ENDED:
                self._release(key, entry, "new-syn")
            elif event.kind == EV_RST and entry.state in (FLOW_ACTIVE, FLOW_TAKEBACK):
                agent = self._agent_of.get(target_of(entry))
                if agent is not None and agent.connected:
                    asks.setdefault(agent, []).append((entry.conn_id, wire_key(forward_key_of(entry))))
                else:
                    asyncio.get_running_loop().call_later(self.settings.linger, self._reset_over, key,
                                                          entry.conn_id)
        for agent, connections in asks.items():
            self._outbox += [(agent, m) for m in holding_messages(connections, complete=False)]
        self._flush_soon()

    def _reset_over(self, key: FlowKey, conn_id: int) -> None:
        """The client reset CONN_ID ``linger`` ago: with no agent to ask, forget it."""
        entry = self.datapath.ingress.lookup(key)
        if entry is None or entry.conn_id != conn_id or entry.state != FLOW_ACTIVE:
            return
        agent = self._agent_of.get(target_of(entry))
        if agent is not None and agent.connected:
            self._outbox.append((agent, Holding(((conn_id, wire_key(forward_key_of(entry))),),
                                                complete=False, last=True)))
            self._flush_soon()
        else:
            self._forget(key, entry, "reset")

    def _flush_soon(self) -> None:
        if self._outbox and (self._flusher is None or self._flusher.done()):
            self._flusher = asyncio.get_running_loop().create_task(self.flush())

    # ---------------------------------------------------------- the sweep

    async def _gc_loop(self) -> None:
        while True:
            try:
                self.sweep(time.monotonic_ns())
                await self.flush()
            except Exception:  # a sweep must never kill the router
                log.exception("handoff GC sweep failed")
            await asyncio.sleep(self.sweep_interval)

    async def flush(self) -> None:
        """Send what is queued for the agents (an agent that is down hears
        of it through the HOLDING sync when it is back)."""
        while self._outbox:
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
        counted: dict[int, Address] = {}
        per_target: dict[Address, int] = {}
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
            if entry.state == FLOW_TAKEBACK and idle > HOLD_STALE_S * 1e9:
                # Taken back by a router process that is gone, and the client
                # silent since (a live client resends its request, which
                # starts the take-back again).
                self._release(client_key, entry, "takeback-failed")
                removed += 1
                continue
            forward = forward_key_of(entry)
            agent = self._agent_of.get(forward.src)
            if entry.conn_id in self.gone:
                self._forget(client_key, entry, "reset" if entry.flags & FLOW_F_RST else "closed")
                removed += 1
            elif entry.flags & FLOW_F_RST and idle > linger_ns and (agent is None or not agent.connected):
                self._forget(client_key, entry, "reset")
                removed += 1
            else:
                live += 1
                seen.add(forward)
                live_ids.add(entry.conn_id)
                counted[entry.conn_id] = forward.src
                per_target[forward.src] = per_target.get(forward.src, 0) + 1
                if idle > idle_ns and agent is not None and now_ns - self._checked.get(entry.conn_id, 0) > idle_ns:
                    self._checked[entry.conn_id] = now_ns
                    silent.setdefault(agent, []).append((entry.conn_id, wire_key(forward)))
        for agent, connections in silent.items():
            self._outbox += [(agent, m) for m in holding_messages(connections, complete=False)]
        if self._sweeps % WATCH_SWEEP_EVERY == 0:
            self._sweep_watch(now_ns, seen)
        self._sweeps += 1
        # Reports kept for the sweeps (a watch entry that does not name its
        # client: a rolled-back handoff's) must not pile up: kept until the
        # next watch walk has seen them, and never more than the map holds.
        keep_ns = int((WATCH_SWEEP_EVERY + 1) * self.sweep_interval * 1e9)
        self.gone = {c: t for c, t in self.gone.items() if now_ns - t < keep_ns}
        if len(self.gone) > self.datapath.capacity:
            self.gone.clear()
        self._checked = {c: t for c, t in self._checked.items() if c in live_ids}
        self._counted = counted
        self._live = live
        self.metrics.handed_off.set(live)
        for target in set(self.handed_off) | set(per_target):
            if self.handed_off.get(target, 0) != per_target.get(target, 0):
                self.handed_off[target] = per_target.get(target, 0)
                self.on_load(target, per_target.get(target, 0))
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
            self._flush_soon_if_running()
        self._forget(client_key, entry, why)

    def _flush_soon_if_running(self) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # called outside the event loop (a test's sweep): flush() sends it
        self._flush_soon()

    def _forget(self, client_key: FlowKey, entry: FlowEntry, why: str) -> None:
        """Delete the ingress entry; then (never before) free its port if the
        target's side is gone, or keep the port taken until it is."""
        forward = forward_key_of(entry)
        self.datapath.ingress.delete(client_key)
        watch = self.datapath.watch.lookup(forward)
        if watch is not None and watch.conn_id == entry.conn_id:
            if entry.conn_id in self.gone:
                self.datapath.watch.delete(forward)
            elif watch.state != WATCH_CLOSED or not _known(watch.client):
                # CLOSED drops the target's late packets and keeps the port
                # taken until the agent's GONE (or the quarantine); the
                # client's 4-tuple lets that GONE free it at once.
                if watch.state != WATCH_CLOSED:
                    watch.state = WATCH_CLOSED
                    watch.closed_ns = time.monotonic_ns()
                watch.client = client_key
                self.datapath.watch.update(forward, watch)
        self.gone.pop(entry.conn_id, None)
        self._counted_end(entry.conn_id, why, target_of(entry))

    def read_events_now(self) -> None:
        """Handle the programs' events waiting in the ring buffer now (a
        take-back wants every capture before it rebuilds: handoff/takeback.py)."""
        if self._reader is not None:
            self._reader.read_now()

    def taken_back(self, client_key: FlowKey, entry: FlowEntry) -> None:
        """The router took the connection back (handoff/takeback.py): its
        client's packets go to the router's stack from now on. The agent
        ended its side already; the watch entry is the rebuilt socket's."""
        self.datapath.ingress.delete(client_key)
        self.gone.pop(entry.conn_id, None)
        self._counted_end(entry.conn_id, "taken-back", target_of(entry))

    def handed_on(self, client_key: FlowKey, entry: FlowEntry) -> None:
        """The connection went on to another target from a take-back
        (handoff/takeback.py ``_hand_on``): the new handoff's entry replaces
        ENTRY under the same key; the old agent ended its side already."""
        self.gone.pop(entry.conn_id, None)
        self._counted_end(entry.conn_id, "handed-on", target_of(entry))

    def end_moved(self, client_key: FlowKey, entry: FlowEntry) -> None:
        """A connection moved off its target with resets (handoff/migrate.py):
        the agent ends the server's side (destroying its socket, should the
        router's RST have been lost); the client's packets meet the router's
        stack, which resets it."""
        self._release(client_key, entry, "migrated")

    def abandon(self, client_key: FlowKey, entry: FlowEntry) -> None:
        """A take-back that failed: the connection ends (the agent ends the
        server's side; the client's next packet meets the router's stack)."""
        self._release(client_key, entry, "takeback-failed")

    def answering(self, conn_id: int, response_from: int, head: bool) -> None:
        """CONN_ID's target has a request to answer (HEAD: a HEAD request),
        its response from client-space seq RESPONSE_FROM (``responses``)."""
        self.responses[conn_id] = response_from
        if head:
            self.answering_head.add(conn_id)
        else:
            self.answering_head.discard(conn_id)

    def _counted_end(self, conn_id: int, why: str, target: Address) -> None:
        self.responses.pop(conn_id, None)
        self.answering_head.discard(conn_id)
        self._checked.pop(conn_id, None)
        self.metrics.handoff_closed_of(why).inc()
        if self._counted.pop(conn_id, None) is None:
            return  # never counted (a router restarted since): the sweeps' count has it
        self._load(target, -1)
        self._live = max(0, self._live - 1)
        self.metrics.handed_off.set(self._live)
