"""After the handoff: when the router forgets a connection (blueprint 2.2).

The router's ingress entry sees the client's FIN/RST; the agent reports the
target's (CLOSED). An entry goes after both FINs or a RST plus ``linger``
without packets (late retransmissions still get through meanwhile), or after
``idle_timeout``. Everything is derived from the pinned maps, so a restarted
``arr serve`` resumes the bookkeeping where the last one left off; the maps are
LRU-bounded, so even a lost report cannot leak memory forever (the same bound
covers watch entries of attempts a crashed router never finished).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from handoff.maps import FLOW_ACTIVE, FLOW_F_FIN, FLOW_F_RST, FlowEntry, FlowKey

if TYPE_CHECKING:
    from arr.metrics import Metrics
    from arr.pool import Target
    from handoff.datapath import RouterDatapath
    from handoff.engine import HandoffSettings

log = logging.getLogger("arr.handoff")

HOLD_STALE_S = 10.0
"""A HOLD entry older than this belongs to a router that died mid-handoff."""


def forward_key_of(entry: FlowEntry) -> FlowKey:
    """The forwarding connection (as the target's packets carry it) of an ingress entry."""
    x = entry.x
    return FlowKey(x.daddr, x.saddr, x.dport, x.sport)


@dataclass
class Tracked:
    conn_id: int
    client_key: FlowKey
    forward_key: FlowKey
    target: str
    target_closed: bool = False
    started: float = 0.0


class RouterConnections:
    def __init__(self, datapath: "RouterDatapath", settings: "HandoffSettings", metrics: "Metrics") -> None:
        self.datapath = datapath
        self.settings = settings
        self.metrics = metrics
        self.by_forward: dict[FlowKey, Tracked] = {}
        self.closed_forward: set[FlowKey] = set()
        """Forwarding keys the agents reported closed (also for connections a
        previous router process handed off)."""
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._gc_loop(), name="handoff-gc")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def track(self, conn_id: int, client_key: FlowKey, forward_key: FlowKey, target: "Target") -> None:
        self.by_forward[forward_key] = Tracked(conn_id, client_key, forward_key, target.name,
                                               started=time.monotonic())

    def on_agent_message(self, message: Any) -> None:
        """CLOSED from an agent: the target's side has sent its FIN or a RST."""
        key = getattr(message, "key", None)
        if key is None or type(message).__name__ != "Closed":
            return
        forward = FlowKey.of((key.saddr, key.sport), (key.daddr, key.dport))
        self.closed_forward.add(forward)
        tracked = self.by_forward.get(forward)
        if tracked is not None:
            tracked.target_closed = True

    async def _gc_loop(self) -> None:
        while True:
            try:
                self.sweep(time.monotonic_ns())
            except Exception:  # a sweep must never kill the router
                log.exception("handoff GC sweep failed")
            await asyncio.sleep(self.settings.gc_interval)

    def sweep(self, now_ns: int) -> int:
        """Delete the entries of connections that are over; return how many."""
        linger_ns = int(self.settings.linger * 1e9)
        idle_ns = int(self.settings.idle_timeout * 1e9)
        removed = 0
        live = 0
        for client_key, entry in self.datapath.ingress.items():
            last = entry.last_seen_ns or entry.created_ns
            idle = now_ns - last if last else 0
            if entry.state != FLOW_ACTIVE:
                if idle > HOLD_STALE_S * 1e9:
                    self.datapath.ingress.delete(client_key)
                    removed += 1
                continue
            forward = forward_key_of(entry)
            target_closed = forward in self.closed_forward
            over = bool(entry.flags & FLOW_F_RST) or (bool(entry.flags & FLOW_F_FIN) and target_closed)
            if (over and idle > linger_ns) or idle > idle_ns:
                self._forget(client_key, forward, "closed" if over else "idle")
                removed += 1
            else:
                live += 1
        self.metrics.handed_off.set(live)
        return removed

    def _forget(self, client_key: FlowKey, forward: FlowKey, why: str) -> None:
        self.datapath.ingress.delete(client_key)
        self.datapath.watch.delete(forward)
        self.closed_forward.discard(forward)
        tracked = self.by_forward.pop(forward, None)
        self.metrics.handoff_closed.labels(why).inc()
        if tracked is not None:
            log.debug("connection %d to %s over (%s)", tracked.conn_id, tracked.target, why)
