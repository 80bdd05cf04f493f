"""Seed 000's response deadline: a handed-off request whose target has not
sent a response byte in time goes to another target.

``[handoff] response_deadline`` (or a rule's): when the handoff is done, a
timer starts. At its end the router looks at the client's latest ACK (its
BPF keeps it in the ingress entry): past the response's first byte, the
target is answering and nothing happens. Otherwise the router takes the
connection back (``TakeBacks.take_back_now`` with ``unanswered_at``: the
client's answer to the probe must still acknowledge exactly the response's
start, and the agent must find nothing sent, else the take-back is undone
and the target keeps the connection), closes the forwarding connection to
the silent target (a FIN), and gives the connection to the front-end with
the request to decide again (``Router.resume(replay=...)``), the silent
target excluded.

Only requests safe to repeat are watched (the router decides which:
arr/server.py ``_replay_for``); the router holds each until its timer ends.
Counted in ``arr_redispatches_total{result}``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from handoff.maps import FLOW_ACTIVE, FlowKey
from handoff.migrate import client_probe
from handoff.takeback import TakeBackFailed
from handoff.translate import wrap

if TYPE_CHECKING:
    from arr.metrics import Metrics
    from handoff.craft import RawSender
    from handoff.datapath import RouterDatapath
    from handoff.takeback import TakeBacks

log = logging.getLogger("arr.handoff")

Address = tuple[str, int]
TAKE_TIME = 1.0
"""Longest a deadline's take-back may take (two probes): the client is waiting."""


class ResponseDeadlines:
    def __init__(self, datapath: "RouterDatapath", takebacks: "TakeBacks", metrics: "Metrics",
                 sender: "RawSender", *,
                 resume: Callable[..., Awaitable[None]]) -> None:
        self.datapath = datapath
        self.takebacks = takebacks
        self.metrics = metrics
        self.sender = sender
        self.resume = resume
        self._timers: dict[FlowKey, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def watch(self, key: FlowKey, conn_id: int, response_start: int, seconds: float, replay: Any) -> None:
        """After a handoff: RESPONSE_START is the client-space seq of the
        response's first byte (the router's snd_nxt at the handoff)."""
        previous = self._timers.pop(key, None)
        if previous is not None:
            previous.cancel()
        self._timers[key] = asyncio.get_running_loop().call_later(
            seconds, self._expired, key, conn_id, response_start, replay)
        self.metrics.redispatches.labels("watched").inc()

    def _expired(self, key: FlowKey, conn_id: int, response_start: int, replay: Any) -> None:
        self._timers.pop(key, None)
        entry = self.datapath.ingress.lookup(key)
        if entry is None or entry.conn_id != conn_id:
            return  # the connection ended
        if entry.state != FLOW_ACTIVE or wrap(entry.peer_ack - response_start) != 0:
            self.metrics.redispatches.labels("answered").inc()  # the client acknowledged response bytes
            return
        if not self.sender.ready():
            self.metrics.redispatches.labels("takeback-failed").inc()
            log.error("response deadline of %r: %s", key, self.sender.error)
            return
        task = asyncio.get_running_loop().create_task(self._redispatch(key, response_start, replay))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _redispatch(self, key: FlowKey, response_start: int, replay: Any) -> None:
        try:
            sock, context, requests = await self.takebacks.take_back_now(
                key, probe=lambda entry: self.sender.send(client_probe(key, entry)),
                deadline=time.monotonic() + TAKE_TIME, unanswered_at=response_start)
        except TakeBackFailed as failed:
            answered = failed.reason in ("answered", "answering")
            self.metrics.redispatches.labels("answered" if answered else "takeback-failed").inc()
            if not answered:
                log.warning("response deadline of %r: taking it back failed (%s)", key, failed.reason)
            return
        self.takebacks.drop_forward(context)
        self.metrics.redispatches.labels("redispatched").inc()
        log.info("response deadline: %s:%d's request goes to another target", *key.src)
        await self.resume(sock, key.src, requests, context, replay=replay)

    async def stop(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

