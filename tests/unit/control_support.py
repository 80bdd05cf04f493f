"""What the control-channel tests share: a translation to hand off, and a
wait on a condition (the channel runs in the test's own loop)."""

from __future__ import annotations

import asyncio
import time

from handoff.control import FlowKey, HandoffRequest
from handoff.translate import Translation

XLATE = Translation(saddr="127.0.0.3", daddr="127.0.0.4", sport=80, dport=5000, seq_delta=1, ack_delta=2,
                    tsval_delta=3, tsecr_delta=4, wscale_in=7, wscale_out=7)


def handoff_request(conn_id: int, key: FlowKey) -> HandoffRequest:
    return HandoffRequest(conn_id=conn_id, key=key, translation=XLATE, mirror_from=10, mirror_until=20)


async def until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)
