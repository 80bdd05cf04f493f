"""Target health: active HTTP checks and passive failure detection.

Pools with a ``HealthRule`` are probed every ``interval``; ``rise``/``fall``
consecutive results flip a target. Connect failures seen by the relay count as
failed checks too, so a dead target leaves the pool without waiting for the
next probe. A pool without active checks still drops a target after ``fall``
connect failures, and lets it back after ``PASSIVE_COOLDOWN`` seconds: with no
probe, trying again is the only way to learn it recovered.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from typing import TYPE_CHECKING, Callable

from arr.pool import HealthRule

if TYPE_CHECKING:
    from arr.metrics import Metrics
    from arr.pool import Pool, TargetState

log = logging.getLogger("arr.health")

PASSIVE_RULE = HealthRule()
PASSIVE_COOLDOWN = 10.0
LOCAL_EXHAUSTION = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
"""Errors that say the router is out of fds or memory, nothing about the target."""


async def probe(member: "TargetState", rule: HealthRule) -> bool | None:
    """One HTTP/1.1 GET of ``rule.path``; True if the status is in range.
    None: no check was made, the router itself had no fd (or memory) for it
    (``limits.reserved_fds`` keeps fds for the probes, arr/fdlimit.py; should
    they run out anyway, a target must not be taken down for it)."""
    host, port = member.target.address
    writer = None
    try:
        async with asyncio.timeout(rule.timeout):
            reader, writer = await asyncio.open_connection(host, port)
            host_header = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            writer.write(f"GET {rule.path} HTTP/1.1\r\nHost: {host_header}\r\n"
                         "User-Agent: arr-health\r\nConnection: close\r\n\r\n".encode())
            status_line = await reader.readline()
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
            return False
        low, high = rule.expect_status
        healthy = low <= int(parts[1]) <= high
        # Read the (small) rest before closing, best effort: closing with
        # unread bytes makes the kernel send the target a RST, which servers
        # log as errors and count as reset connections.
        try:
            async with asyncio.timeout(rule.timeout):
                while await reader.read(65536):
                    pass
        except (OSError, TimeoutError):
            pass
        return healthy
    except OSError as exc:
        return None if exc.errno in LOCAL_EXHAUSTION else False
    except TimeoutError:
        return False
    finally:
        if writer is not None:
            writer.close()


class HealthMonitor:
    def __init__(self, pools: dict[str, "Pool"], metrics: "Metrics") -> None:
        self.pools = pools
        self.metrics = metrics
        self._tasks: list[asyncio.Task[None]] = []
        self._revivals: dict["TargetState", asyncio.TimerHandle] = {}
        self.on_down: Callable[["Pool", "TargetState"], None] = lambda pool, member: None
        """Told each member that goes down (the router moves its handed-off
        connections off it, arr/server.py)."""
        for pool in pools.values():
            for member in pool.members:
                self.metrics.publish_target(pool, member)

    def start(self) -> None:
        for pool in self.pools.values():
            if pool.health is not None:
                self._tasks.append(asyncio.create_task(self._run(pool, pool.health),
                                                       name=f"health:{pool.name}"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        for handle in self._revivals.values():
            handle.cancel()
        self._revivals.clear()

    async def _run(self, pool: "Pool", rule: HealthRule) -> None:
        while True:
            results = await asyncio.gather(*(probe(m, rule) for m in pool.members))
            for member, ok in zip(pool.members, results):
                if ok is None:
                    self.metrics.health_checks.labels(pool.name, member.name, "no-fd").inc()
                    continue
                self.metrics.health_checks.labels(pool.name, member.name, "ok" if ok else "fail").inc()
                self.observe(pool, member, ok, rule)
            await asyncio.sleep(rule.interval)

    def observe(self, pool: "Pool", member: "TargetState", ok: bool, rule: HealthRule) -> None:
        if member.record_check(ok, rule):
            log.warning("target %s in pool %s is now %s", member.name, pool.name,
                        "up" if member.healthy else "down")
            self.metrics.health_transitions.labels(pool.name, member.name, "up" if member.healthy else "down").inc()
            self.metrics.publish_target(pool, member)
            if not member.healthy:
                self.on_down(pool, member)

    def passive_failure(self, member: "TargetState", pool: "Pool | None") -> None:
        """A connect failure seen by the relay."""
        if pool is None:
            return
        rule = pool.health or PASSIVE_RULE
        was_healthy = member.healthy
        self.observe(pool, member, False, rule)
        if was_healthy and not member.healthy and pool.health is None:
            loop = asyncio.get_running_loop()
            self._revivals[member] = loop.call_later(PASSIVE_COOLDOWN, self._revive, pool, member)

    def _revive(self, pool: "Pool", member: "TargetState") -> None:
        self._revivals.pop(member, None)
        member.healthy = True
        member.consecutive_failures = 0
        log.warning("target %s in pool %s is back after the passive cool-down", member.name, pool.name)
        self.metrics.health_transitions.labels(pool.name, member.name, "up").inc()
        self.metrics.publish_target(pool, member)
