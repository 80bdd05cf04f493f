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
from typing import TYPE_CHECKING, Any

from handoff.maps import FLOW_ACTIVE, FLOW_F_FIN, FLOW_F_RST, WATCH_CLOSED, FlowEntry, FlowKey

if TYPE_CHECKING:
    from arr.metrics import Metrics
    from handoff.datapath import RouterDatapath
    from handoff.engine import HandoffSettings

log = logging.getLogger("arr.handoff")

HOLD_STALE_S = 10.0
"""A HOLD entry older than this belongs to a router that died mid-handoff."""


def forward_key_of(entry: FlowEntry) -> FlowKey:
    """The forwarding connection (as the target's packets carry it) of an ingress entry."""
    x = entry.x
    return FlowKey(x.daddr, x.saddr, x.dport, x.sport)


class RouterConnections:
    def __init__(self, datapath: "RouterDatapath", settings: "HandoffSettings", metrics: "Metrics") -> None:
        self.datapath = datapath
        self.settings = settings
        self.metrics = metrics
        self.closed_forward: set[FlowKey] = set()
        """Forwarding keys the agents reported closed (also for connections a
        previous router process handed off). The router keeps no other Python
        state per connection: the maps are the record."""
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._gc_loop(), name="handoff-gc")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def on_agent_message(self, message: Any) -> None:
        """CLOSED from an agent: the target's side has sent its FIN or a RST."""
        key = getattr(message, "key", None)
        if key is None or type(message).__name__ != "Closed":
            return
        self.closed_forward.add(FlowKey.of((key.saddr, key.sport), (key.daddr, key.dport)))

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
        seen: set[FlowKey] = set()
        for client_key, entry in self.datapath.ingress.items():
            last = entry.last_seen_ns or entry.created_ns
            idle = now_ns - last if last else 0
            if entry.state != FLOW_ACTIVE:
                if idle > HOLD_STALE_S * 1e9:
                    self.datapath.ingress.delete(client_key)
                    removed += 1
                continue
            forward = forward_key_of(entry)
            seen.add(forward)
            target_closed = forward in self.closed_forward
            over = bool(entry.flags & FLOW_F_RST) or (bool(entry.flags & FLOW_F_FIN) and target_closed)
            if (over and idle > linger_ns) or idle > idle_ns:
                self._forget(client_key, forward, "closed" if over else "idle")
                removed += 1
            else:
                live += 1
        # Reports about connections this router no longer has (repeats after
        # the entry went, or a previous process's) must not accumulate.
        self.closed_forward &= seen
        self.metrics.handed_off.set(live)
        return removed

    def _forget(self, client_key: FlowKey, forward: FlowKey, why: str) -> None:
        self.datapath.ingress.delete(client_key)
        # The watch entry stays, CLOSED: it drops the target's late packets and
        # keeps the port in quarantine (engine.PORT_QUARANTINE_NS); the LRU
        # bound of the map retires it.
        watch = self.datapath.watch.lookup(forward)
        if watch is not None and watch.state != WATCH_CLOSED:
            watch.state = WATCH_CLOSED
            watch.closed_ns = time.monotonic_ns()
            self.datapath.watch.update(forward, watch)
        self.closed_forward.discard(forward)
        self.metrics.handoff_closed.labels(why).inc()
