"""The target's side of the lifecycle: when the agent ends an egress entry.

The target's kernel is the source of truth (blueprint 2.3). The agent asks it
about the connections that something happened to, not about all of them:

* the egress program reports, through the ``arr_events`` ring buffer, the
  target's FIN, its RST, every packet after its FIN (the ACK of the client's
  FIN that puts its socket in TIME_WAIT) and a SYN-ACK of a new connection on
  an entry's 4-tuple; the router's HOLDING (not complete) names connections
  it wants looked at (the client's RST, which the target's egress never sees;
  silent connections). Each becomes a *suspect*: its socket is looked up
  exactly (sock_diag, one request per 4-tuple; never a dump, whose cost
  follows every socket of the port) at once. A socket still live is looked
  at again only if nothing the egress program sees will end it: in LAST_ACK
  or CLOSING (the client's ACK ends them), at growing intervals
  (``FIRST_LOOK_NS`` doubling up to ``gc_interval``, ``LOOKS`` at most);
  the router's questions get a few looks whatever the state;
* a slow full sweep (``sweep``: one filtered dump per server port, the map
  read in batches) at start, which reconciles what happened while the agent
  was down, and every ``sweep_interval`` (60 s), which finds what no event
  named (a client that vanished, the target's retransmissions timing out; a
  lost event).

An entry ends when its connection ends:

* no socket left, or only TIME_WAIT (the target closed first and has the
  client's FIN): nothing is left at the target to protect. A TIME_WAIT
  socket's duties are to re-ACK a retransmitted FIN of the client and to keep
  old duplicates out of a new connection on the 4-tuple. The first is moot:
  the client is then in LAST_ACK, and the RST it gets instead (from the
  router's stack once the ingress entry is gone, or the target's kernel
  through the entry) ends LAST_ACK just as well, with nothing lost. The
  second is the router's: it frees the port only after its ingress entry is
  gone, so no late segment of the old connection can be translated onto the
  4-tuple again. And the socket must go: the translated TSvals ran M (2^20 ms)
  ahead of the router's clock, so a TIME_WAIT socket would refuse (PAWS,
  RFC 6191) the router's next SYN on the 4-tuple and stall it a retransmission.
  So the entry goes at once (after ``linger``, 0 by default), the TIME_WAIT
  socket is destroyed (by its cookie, without a packet), and only then the
  agent reports CLOSED with ``CLOSED_TARGET_GONE``: on that report the router
  deletes its ingress entry and frees the forwarding port at once;
* a new connection took the 4-tuple (the program marked the entry ENDED at its
  SYN-ACK): the entry goes at once, the new connection's socket is left alone;
* the router RELEASEs it, or does not list it in a complete HOLDING: entry
  deleted first (so the RST does not reach the client of a new connection),
  then the target's socket destroyed (its server sees the connection aborted).

Silence ends nothing: a live socket keeps its entry however long it is idle.
``verdict`` and ``next_look`` are the decisions as pure functions;
``TargetConnections`` the I/O.

Reports go to the router that owns the connection, and to no other: the
agent records the node id of the (proven) control session whose HANDOFF
installed each entry, or whose HOLDING lists it (which restores the record
after an agent restart), in ``owners``. A CLOSED goes to the connected
sessions of that node id; an entry whose owner is unknown (installed before
a restart and not listed yet) is reported to the sessions from the address
the connection's 4-tuple names (the router's forwarding address). When the
owner is not connected, the report is dropped and counted (``unreported``):
nothing is kept, so nothing grows; on reconnecting, the router sends its
complete HOLDING list, and the agent answers GONE for each listed connection
it no longer holds, which is all the report would have said. Reports are
queued, never awaited: a router that does not read delays no other router and
no cleanup (handoff/control/channel.py drops it).
"""

from __future__ import annotations

import asyncio
import enum
import heapq
import itertools
import logging
import time
from typing import TYPE_CHECKING, Any, Iterable

from arr import netlink
from arr.inet_diag import TcpSocket, TcpState
from handoff.alarm import Alarm
from handoff.control import CLOSED_TARGET_GONE, Closed, Holding, Release
from handoff.control import FlowKey as WireKey
from handoff.lifecycle import local_key, wire_key
from handoff.maps import FLOW_ENDED, Event, FlowEntry, FlowKey

if TYPE_CHECKING:
    from handoff.control import ServerSession
    from handoff.datapath import TargetDatapath

log = logging.getLogger("arr.agent")

OVER = frozenset({TcpState.TIME_WAIT, TcpState.CLOSE})
"""Socket states in which the target's side of a connection is over."""
YIELD_EVERY = 32
"""Entries ended between two returns to the event loop: a sweep that ends
thousands at once must not hold up the HANDOFFs waiting for an answer."""
FIRST_LOOK_NS = 20 * 10**6
"""A suspect's first look is at once; the next after this, then doubling."""
LOOKS = 8
"""Looks at a socket in LAST_ACK or CLOSING before it is left to the next
event (20 ms, 40, ... : about 5 s of a connection's closing handshake)."""
RETRY_LOOK_NS = 100 * 10**6
"""After a failed look (sock_diag refused, say), its connections are looked at again this much later."""
HOLDING_LOOKS = 3
"""Looks at a connection the router asks about (HOLDING, not complete)."""
SWEEP_INTERVAL = 60.0
"""Seconds between two full sweeps (the safety net under the events)."""
REPORT_YIELD_EVERY = 256
"""Reports queued between two returns to the event loop (which sends them):
a HOLDING answered with thousands of GONE must not pile them all up first."""


class Verdict(enum.Enum):
    LIVE = "live"          # the target's socket is alive: keep the entry
    LINGER = "linger"      # over at the target; the linger runs
    END = "end"            # over (and lingered): delete (destroy a TIME_WAIT socket)
    REPLACED = "replaced"  # a new connection holds the 4-tuple: delete now, touch no socket


def verdict(entry_state: int, socket_state: TcpState | None, over_since_ns: int | None, now_ns: int,
            linger_ns: int) -> Verdict:
    """What to do with one egress entry, given its socket's state (None: no socket)."""
    if entry_state == FLOW_ENDED:
        return Verdict.REPLACED
    if socket_state is not None and socket_state not in OVER:
        return Verdict.LIVE
    if linger_ns > 0 and (over_since_ns is None or now_ns - over_since_ns < linger_ns):
        return Verdict.LINGER
    return Verdict.END


WAITING_ON_CLIENT = frozenset({TcpState.LAST_ACK, TcpState.CLOSING})
"""Live states that end without a packet from the target: the client's ACK of
the target's FIN ends them (a socket gone, or TIME_WAIT), and only the target's
ingress sees it. Every other live state ends with a packet the egress program
reports (FIN, RST, the ACK of the client's FIN), so the next event says when
to look again."""


def next_look(state: TcpState | None, looks: int, cap_ns: int, budget: int = LOOKS,
              any_state: bool = False) -> int | None:
    """Nanoseconds until the next look at a suspect whose socket is live in
    STATE after LOOKS looks; None: no more looks (the next event, or the
    sweep, says more). ANY_STATE: look again whatever the state (the
    router's question), up to BUDGET looks in all."""
    if looks >= budget or not (any_state or state in WAITING_ON_CLIENT):
        return None
    return min(FIRST_LOOK_NS << max(0, looks - 1), cap_ns)


def not_held(conn_id: int, key: WireKey) -> Closed:
    """The answer about a connection this agent holds no entry for."""
    return Closed(conn_id=conn_id, key=key, packets=0, bytes=0, flags=CLOSED_TARGET_GONE)


class TargetConnections:
    def __init__(self, datapath: "TargetDatapath", linger: float = 0.0, look_cap: float = 0.5) -> None:
        self.datapath = datapath
        self.linger_ns = int(linger * 1e9)
        self.look_cap_ns = max(FIRST_LOOK_NS, int(look_cap * 1e9))
        self.over_since: dict[FlowKey, int] = {}
        """Entries whose target side is over, since when (bounded by the map)."""
        self.suspects: dict[FlowKey, tuple[int, int, int, bool]] = {}
        """Entries to look at: (when, looks so far, looks in all, whatever the
        state). Bounded by the map."""
        self.sessions: set["ServerSession"] = set()
        """The proven control sessions (the server's own set)."""
        self.owners: dict[FlowKey, str] = {}
        """Node id of the router that owns each entry (bounded by the map)."""
        self.unreported = 0
        """Reports dropped: their router was not connected (for the agent's metrics)."""
        self._reports = 0
        self.ended: dict[str, int] = {}
        """Entries ended, by why (for the agent's metrics)."""
        self.looked = 0
        """Exact socket lookups made (for the agent's metrics)."""
        self._sync: dict["ServerSession", tuple[int, set[int]]] = {}
        """Complete HOLDING lists being received: when they began, conn_ids so far."""
        self._diag = netlink.SockDiag(None)
        """Kept open: the looks are frequent and each is a few lookups."""
        self._due: list[tuple[int, int, FlowKey]] = []
        self._order = itertools.count()
        """Heap of (when, order, key) over ``suspects``; an item whose time is no
        longer its suspect's is stale and skipped (so a reschedule is a push)."""
        self._alarm = Alarm()

    def _schedule(self, key: FlowKey, suspect: tuple[int, int, int, bool]) -> None:
        self.suspects[key] = suspect
        # The counter orders equal times (keys do not compare).
        heapq.heappush(self._due, (suspect[0], next(self._order), key))
        if len(self._due) > 4 * len(self.suspects) + 64:  # mostly stale: rebuild
            self._due = [(s[0], next(self._order), k) for k, s in self.suspects.items()]
            heapq.heapify(self._due)

    def _next_due(self) -> int | None:
        """The earliest time a suspect is due (stale heap items dropped)."""
        due = self._due
        while due:
            when, _, key = due[0]
            current = self.suspects.get(key)
            if current is not None and current[0] == when:
                return when
            heapq.heappop(due)
        return None

    def _take_due(self, now_ns: int) -> list[FlowKey]:
        keys: list[FlowKey] = []
        while (when := self._next_due()) is not None and when <= now_ns:
            keys.append(heapq.heappop(self._due)[2])
        return keys

    def close(self) -> None:
        self._diag.close()

    def installed(self, key: FlowKey, owner: str | None = None) -> None:
        """A HANDOFF installed KEY's entry; OWNER: the node id of the router that sent it."""
        self.over_since.pop(key, None)
        self.suspects.pop(key, None)
        if owner is None:
            self.owners.pop(key, None)
        else:
            self.owners[key] = owner

    def taken_back(self, key: FlowKey) -> None:
        """The router took the connection back (agent.py ended its entry): the
        server's socket lives on with the router as its peer; nothing to
        report, nothing to look at."""
        self.over_since.pop(key, None)
        self.suspects.pop(key, None)
        self.owners.pop(key, None)
        self.ended["taken-back"] = self.ended.get("taken-back", 0) + 1

    # ---------------------------------------------------------- events

    def suspect(self, keys: Iterable[FlowKey], now_ns: int | None = None, looks: int = LOOKS,
                any_state: bool = False) -> None:
        """Look at these connections' sockets now, and again (LOOKS times in
        all) while they wait on the client, or ANY_STATE while they live."""
        now_ns = time.monotonic_ns() if now_ns is None else now_ns
        added = False
        for key in keys:
            due, done, budget, anyway = self.suspects.get(key, (None, 0, 0, False))
            if due is None or due > now_ns or budget - done < looks or any_state > anyway:
                self._schedule(key, (now_ns, 0, max(looks, budget - done), any_state or anyway))
                added = True
        if added:
            self._alarm.wake()

    def on_events(self, events: Iterable[Event]) -> None:
        """Records of the egress program's ring buffer: hints, checked against the kernel."""
        self.suspect(FlowKey.from_buffer_copy(e.key) for e in events)

    async def run(self) -> None:
        """Look at the suspects when they are due (the agent's task). Waits on
        one future and one timer (handoff/alarm.py): a wake-up costs no task."""
        while True:
            now = time.monotonic_ns()
            due_at = self._next_due()
            if due_at is None or due_at > now:
                await self._alarm.sleep(None if due_at is None else (due_at - now) / 1e9)
                continue
            try:
                await self.look(now)
            except Exception:  # a look must never end the agent
                log.exception("looking at closing connections failed")
                await asyncio.sleep(0.1)

    async def look(self, now_ns: int) -> int:
        """Decide every suspect that is due; return how many entries ended."""
        due = self._take_due(now_ns)
        if not due:
            return 0
        try:
            return await self._look_at(due, now_ns)
        except BaseException:
            # Taken off the heap but not decided: due again shortly (run() logs).
            for key in due:
                suspect = self.suspects.get(key)
                if suspect is not None and suspect[0] <= now_ns:
                    self._schedule(key, (now_ns + RETRY_LOOK_NS, *suspect[1:]))
            raise

    async def _look_at(self, due: list[FlowKey], now_ns: int) -> int:
        entries = [(key, self.datapath.egress.lookup(key)) for key in due]
        present = [(key, entry) for key, entry in entries if entry is not None]
        for key, entry in entries:
            if entry is None:
                self.suspects.pop(key, None)
                self.over_since.pop(key, None)
                self.owners.pop(key, None)
        # Exact lookups, however many: a dump would cost in proportion to
        # every socket of the port, a lookup to the connection looked at.
        found = self._diag.sockets_of([(key.src, key.dst) for key, _ in present])
        self.looked += len(present)
        sockets = {pair: sock for pair, sock in found.items() if sock is not None}
        removed = 0
        for key, entry in present:
            _, done, budget, anyway = self.suspects.get(key, (0, 0, LOOKS, False))
            looks = done + 1
            sock = sockets.get((key.src, key.dst))
            decision = await self._decide(key, entry, sock, now_ns)
            if decision is Verdict.LIVE:
                assert sock is not None
                wait = next_look(sock.state, looks, self.look_cap_ns, budget, anyway)
                if wait is None:
                    self.suspects.pop(key, None)
                else:
                    self._schedule(key, (now_ns + wait, looks, budget, anyway))
            elif decision is Verdict.LINGER:
                since = self.over_since.get(key, now_ns)
                self._schedule(key, (since + self.linger_ns, looks, budget, anyway))
            else:
                removed += 1
                if removed % YIELD_EVERY == 0:
                    await asyncio.sleep(0)
        return removed

    async def _decide(self, key: FlowKey, entry: FlowEntry, sock: TcpSocket | None, now_ns: int) -> Verdict:
        decision = verdict(entry.state, sock.state if sock else None, self.over_since.get(key), now_ns,
                           self.linger_ns)
        if decision is Verdict.LIVE:
            self.over_since.pop(key, None)
        elif decision is Verdict.LINGER:
            self.over_since.setdefault(key, now_ns)
        elif decision is Verdict.REPLACED:
            await self._end(key, entry, "replaced", destroy=False)
        else:
            # Over: nothing can revive the 4-tuple but a new connection, whose
            # SYN-ACK would have made the entry ENDED (or a new HANDOFF, which
            # resets the linger). A TIME_WAIT socket goes by its cookie: that one.
            await self._end(key, entry, "closed", destroy=sock is not None,
                            cookie=sock.cookie if sock is not None else None)
        return decision

    # ---------------------------------------------------------- the full sweep

    async def sweep(self, now_ns: int) -> int:
        """Every entry against a dump of its server port's sockets."""
        entries = self.datapath.egress.items()
        if len(self.owners) > len(entries):  # records of entries no longer in the map
            present = {key for key, _ in entries}
            for key in [k for k in self.owners if k not in present]:
                del self.owners[key]
        if not entries:
            return 0
        sockets = self._target_sockets(key for key, _ in entries)
        removed = 0
        for key, entry in entries:
            decision = await self._decide(key, entry, sockets.get((key.src, key.dst)), now_ns)
            if decision in (Verdict.END, Verdict.REPLACED):
                removed += 1
                if removed % YIELD_EVERY == 0:
                    await asyncio.sleep(0)
            elif decision is Verdict.LINGER and key not in self.suspects:
                self._schedule(key, (self.over_since[key] + self.linger_ns, 0, LOOKS, False))
        return removed

    def _target_sockets(self, keys: Iterable[FlowKey]) -> dict[tuple[Any, Any], TcpSocket]:
        """{(local, remote): socket} of the target's sockets on the servers'
        ports: one filtered dump per port (the entries' source ports)."""
        ports = {key.src[1] for key in keys}
        found: dict[tuple[Any, Any], TcpSocket] = {}
        for port in ports:
            for sock in netlink.tcp_sockets(None, local_port=port):
                found[(sock.local, sock.remote)] = sock
        return found

    # ---------------------------------------------------------- the router's word

    async def release(self, session: "ServerSession", message: Release) -> None:
        key = local_key(message.key)
        entry = self.datapath.egress.lookup(key)
        if entry is None or entry.conn_id != message.conn_id:
            # Ended already, or the 4-tuple is another connection's by now.
            await self._report(not_held(message.conn_id, message.key), session)
            return
        await self._end(key, entry, "released", destroy=True)

    async def holding(self, session: "ServerSession", message: Holding) -> None:
        """Answer GONE for what the router lists and this agent does not hold;
        look at once at what it holds of a partial list (the router saw the
        client's RST, or the connection is silent); after a complete list, end
        what the router does not hold."""
        for stale in [s for s in self._sync if s not in self.sessions]:
            del self._sync[stale]  # a session that broke mid-list
        if message.complete and session not in self._sync:
            self._sync[session] = (time.monotonic_ns(), set())
        looks: list[FlowKey] = []
        for conn_id, wire in message.connections:
            key = local_key(wire)
            entry = self.datapath.egress.lookup(key)
            if entry is None or entry.conn_id != conn_id:
                await self._report(not_held(conn_id, wire), session)
            else:
                owner = getattr(session, "peer_node_id", None)
                if owner is not None:
                    self.owners[key] = owner  # the router holds it: it owns it (after an agent restart too)
                if message.complete:
                    self._sync[session][1].add(conn_id)
                else:
                    looks.append(key)
        # A few looks: the router saw the client's RST pass a moment ago (the
        # target's kernel has it by now), or asks about a silent connection
        # (it asks again after another idle_timeout).
        self.suspect(looks, looks=HOLDING_LOOKS, any_state=True)
        if message.complete and message.last:
            started, listed = self._sync.pop(session)
            router = session.peer_host
            for key, entry in self.datapath.egress.items():
                # Only this router's entries (keyed by its address), and only
                # those older than the list (none newer can be missing from it).
                if key.dst[0] == router and entry.conn_id not in listed and entry.created_ns < started:
                    await self._end(key, entry, "unlisted", destroy=True)

    # ---------------------------------------------------------- ending one

    async def _end(self, key: FlowKey, entry: FlowEntry, why: str, *, destroy: bool,
                   cookie: int | None = None) -> None:
        # Entry first: the RST a destroyed socket sends then goes to the router
        # untranslated (where the watch entry drops it), never to a client.
        self.datapath.egress.delete(key)
        self.datapath.mirror.delete(key)
        if destroy:
            try:
                self._diag.destroy(key.src, key.dst, cookie)
            except OSError as exc:
                log.warning("could not end the target's socket %s: %s", key, exc)
        self.over_since.pop(key, None)
        self.suspects.pop(key, None)
        owner = self.owners.pop(key, None)
        self.ended[why] = self.ended.get(why, 0) + 1
        await self._report(Closed(conn_id=entry.conn_id, key=wire_key(key),
                                  packets=entry.packets, bytes=entry.bytes,
                                  flags=entry.flags | CLOSED_TARGET_GONE), owner=owner)

    def report_targets(self, closed: Closed, owner: str | None) -> list["ServerSession"]:
        """Who is told about CLOSED: the sessions of the owner's node id; with
        no owner known, the sessions from the connection's router address."""
        if owner is not None:
            return [s for s in self.sessions if getattr(s, "peer_node_id", None) == owner]
        return [s for s in self.sessions if s.peer_host == closed.key.daddr]

    async def _report(self, closed: Closed, session: "ServerSession | None" = None,
                      owner: str | None = None) -> None:
        """To SESSION (the router asking), else to the router that owns the
        connection (see the module's docstring); queued, never waited for."""
        targets = [session] if session is not None else self.report_targets(closed, owner)
        if not targets:
            self.unreported += 1
            return
        for target in targets:
            try:
                await target.send(closed)
            except (ConnectionError, OSError):
                continue
        self._reports += 1
        if self._reports % REPORT_YIELD_EVERY == 0:
            await asyncio.sleep(0)
