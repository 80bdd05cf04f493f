"""The target's side of the lifecycle: when the agent ends an egress entry.

The target's kernel is the source of truth (blueprint 2.3): each sweep asks it,
with one sock_diag dump per server port, which forwarding connections still
have a socket, and in what state. An entry ends when its connection ends:

* no socket left, or only TIME_WAIT (the target closed first and has the
  client's FIN): the entry lingers ``linger`` more (late retransmissions are
  still answered, and the kernel's RSTs for a vanished socket still reach the
  client), then goes; the TIME_WAIT socket is destroyed with it, so that the
  router can reuse the forwarding port at once. Only then does the agent
  report CLOSED with ``CLOSED_TARGET_GONE``;
* a new connection took the 4-tuple (the program marked the entry ENDED at its
  SYN-ACK): the entry goes at once, the new connection's socket is left alone;
* the router RELEASEs it, or does not list it in a complete HOLDING: entry
  deleted first (so the RST does not reach the client of a new connection),
  then the target's socket destroyed (its server sees the connection aborted).

Silence ends nothing: a live socket keeps its entry however long it is idle.
``verdict`` is the decision as a pure function; ``TargetConnections`` the I/O.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from typing import TYPE_CHECKING, Any, Iterable

from arr import netlink
from arr.inet_diag import TcpSocket, TcpState
from handoff.control import CLOSED_TARGET_GONE, Closed, Holding, Release
from handoff.control import FlowKey as WireKey
from handoff.lifecycle import local_key, wire_key
from handoff.maps import FLOW_ENDED, FlowEntry, FlowKey

if TYPE_CHECKING:
    from handoff.control import ServerSession
    from handoff.datapath import TargetDatapath

log = logging.getLogger("arr.agent")

OVER = frozenset({TcpState.TIME_WAIT, TcpState.CLOSE})
"""Socket states in which the target's side of a connection is over."""
YIELD_EVERY = 32
"""Entries ended between two returns to the event loop: a sweep that ends
thousands at once must not hold up the HANDOFFs waiting for an answer."""


class Verdict(enum.Enum):
    LIVE = "live"          # the target's socket is alive: keep the entry
    LINGER = "linger"      # over at the target; the linger runs
    END = "end"            # over and lingered: delete (destroy a TIME_WAIT socket)
    REPLACED = "replaced"  # a new connection holds the 4-tuple: delete now, touch no socket


def verdict(entry_state: int, socket_state: TcpState | None, over_since_ns: int | None, now_ns: int,
            linger_ns: int) -> Verdict:
    """What to do with one egress entry, given its socket's state (None: no socket)."""
    if entry_state == FLOW_ENDED:
        return Verdict.REPLACED
    if socket_state is not None and socket_state not in OVER:
        return Verdict.LIVE
    if over_since_ns is None or now_ns - over_since_ns < linger_ns:
        return Verdict.LINGER
    return Verdict.END


def not_held(conn_id: int, key: WireKey) -> Closed:
    """The answer about a connection this agent holds no entry for."""
    return Closed(conn_id=conn_id, key=key, packets=0, bytes=0, flags=CLOSED_TARGET_GONE)


class TargetConnections:
    def __init__(self, datapath: "TargetDatapath", linger: float) -> None:
        self.datapath = datapath
        self.linger_ns = int(linger * 1e9)
        self.over_since: dict[FlowKey, int] = {}
        """Entries whose target side is over, since when (bounded by the map)."""
        self.sessions: set["ServerSession"] = set()
        self.ended: dict[str, int] = {}
        """Entries ended, by why (for the agent's metrics)."""
        self._sync: dict["ServerSession", tuple[int, set[int]]] = {}
        """Complete HOLDING lists being received: when they began, conn_ids so far."""

    def installed(self, key: FlowKey) -> None:
        self.over_since.pop(key, None)

    # ---------------------------------------------------------- the sweep

    async def sweep(self, now_ns: int) -> int:
        entries = self.datapath.egress.items()
        if not entries:
            return 0
        sockets = self._target_sockets(key for key, _ in entries)
        removed = 0
        for key, entry in entries:
            sock = sockets.get((key.src, key.dst))
            decision = verdict(entry.state, sock.state if sock else None, self.over_since.get(key), now_ns,
                               self.linger_ns)
            if decision is Verdict.LIVE:
                self.over_since.pop(key, None)
            elif decision is Verdict.LINGER:
                self.over_since.setdefault(key, now_ns)
            else:
                if decision is Verdict.REPLACED:
                    await self._end(key, entry, "replaced", destroy=False)
                else:
                    # Over in two dumps a linger apart: nothing can revive the
                    # 4-tuple but a new connection, whose SYN-ACK would have
                    # made the entry ENDED (or a new HANDOFF, which resets the
                    # linger). A TIME_WAIT socket goes by its cookie: that one.
                    await self._end(key, entry, "closed", destroy=sock is not None,
                                    cookie=sock.cookie if sock is not None else None)
                removed += 1
                if removed % YIELD_EVERY == 0:
                    await asyncio.sleep(0)
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
        after a complete list, end what the router does not hold."""
        for stale in [s for s in self._sync if s not in self.sessions]:
            del self._sync[stale]  # a session that broke mid-list
        if message.complete and session not in self._sync:
            self._sync[session] = (time.monotonic_ns(), set())
        for conn_id, wire in message.connections:
            key = local_key(wire)
            entry = self.datapath.egress.lookup(key)
            if entry is None or entry.conn_id != conn_id:
                await self._report(not_held(conn_id, wire), session)
            elif message.complete:
                self._sync[session][1].add(conn_id)
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
                netlink.destroy_tcp_socket(None, key.src, key.dst, cookie=cookie)
            except OSError as exc:
                log.warning("could not end the target's socket %s: %s", key, exc)
        self.over_since.pop(key, None)
        self.ended[why] = self.ended.get(why, 0) + 1
        await self._report(Closed(conn_id=entry.conn_id, key=wire_key(key),
                                  packets=entry.packets, bytes=entry.bytes,
                                  flags=entry.flags | CLOSED_TARGET_GONE))

    async def _report(self, closed: Closed, session: "ServerSession | None" = None) -> None:
        """To the router that owns the connection (its address is the key's
        destination); a router that is not connected learns it from the
        HOLDING sync when it is back."""
        if session is not None:
            targets = [session]
        else:
            targets = [s for s in self.sessions if s.peer_host == closed.key.daddr] or list(self.sessions)
        for target in targets:
            try:
                await target.send(closed)
            except (ConnectionError, OSError):
                continue
