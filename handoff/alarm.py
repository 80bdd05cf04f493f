"""A sleep that another callback can cut short.

The forward pool's refill (handoff/forward_pool.py) and the agent's looks
(handoff/agent_lifecycle.py) both wait for "a deadline, or news, whichever
comes first". One future and one timer do it: ``asyncio.wait_for`` on an
Event would create a task per wait, and these waits come at the rate of
handoffs.
"""

from __future__ import annotations

import asyncio


class Alarm:
    def __init__(self) -> None:
        self._waiter: asyncio.Future[None] | None = None

    def wake(self) -> None:
        """End the current ``sleep`` now (nothing if none is running)."""
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def sleep(self, seconds: float | None) -> None:
        """Until ``wake()`` or SECONDS have passed (None: until woken)."""
        loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        timer = None if seconds is None else loop.call_later(seconds, self.wake)
        try:
            await self._waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()
