"""How many client connections fit in the process's file-descriptor limit.

Pure: the numbers in, a plan out. ``Router.start`` (arr/server.py) reads
RLIMIT_NOFILE, applies the plan (raises the soft limit, serves at most the
plan's ``max_connections``) and logs ``FdPlan.describe()``.

The budget::

    max_connections * fds_per_connection(mode) + limits.reserved_fds <= soft limit

A client connection's worst case, by mode (what one admitted connection can
hold at the same moment):

* ``proxy``: 2. The client socket, and the upstream connection the relay holds
  while a request is in flight (arr/proxy.py ``Relay.relay``; a stale
  kept-alive connection is closed before the next is opened).
* ``nat``: 3. During a handoff the client socket (``ClientSession.detach``
  hands out a dup of it, arr/session.py) and the forwarding connection
  (handoff/engine.py ``_connect``; a taken-back connection keeps its rebuilt
  one in ``session.handoff_context`` the whole time it is served,
  handoff/takeback.py). After the point of no return the session is gone and
  its slot admits the next client, but the forwarding socket stays open until
  the target acknowledged the request (handoff/release.py; usually one RTT, at
  most ``handoff.request_ack_timeout``): the third. A fallback closes the
  forwarding connection before the relay opens its upstream one.

What no client connection owns comes out of ``reserved_fds``: the listening
and metrics sockets, the spare fd that answers 503 on EMFILE (arr/server.py),
health probes (one per checked target at a time, arr/health.py), idle upstream
keep-alive connections (``upstream.keepalive`` per target), ready forwarding
connections (``handoff.forward_pool`` per target and client profile),
forwarding sockets of handoffs beyond one per slot, control channels, BPF maps
and programs, logs, and stdio. ``shared_fds`` is the part of that the
configuration can count; the plan warns when ``reserved_fds`` is below it.
"""

from __future__ import annotations

from dataclasses import dataclass

FDS_PER_CONNECTION = {"proxy": 2, "nat": 3}
"""A client connection's worst case, by ``router.mode`` (see the module doc)."""


def fds_per_connection(mode: str) -> int:
    """The worst case for MODE; an unknown mode gets the largest (never too few)."""
    return FDS_PER_CONNECTION.get(mode, max(FDS_PER_CONNECTION.values()))


@dataclass(frozen=True)
class FdPlan:
    current_soft: int | None
    """The soft RLIMIT_NOFILE found (None: unlimited)."""
    hard: int | None
    """The hard limit (None: unlimited)."""
    soft_limit: int | None
    """The soft limit to run with: the current one, or a raised one (never above
    ``hard``, never lowered). None: unlimited."""
    configured: int
    """``limits.max_connections`` as configured."""
    max_connections: int
    """Connections the router admits (at most ``configured``); the next ones are
    answered 503. 0: the limit leaves no room even for ``reserved``."""
    per_connection: int
    reserved: int
    shared_fds: int = 0

    @property
    def needed(self) -> int:
        """Fds the configured ``max_connections`` needs."""
        return self.configured * self.per_connection + self.reserved

    @property
    def raises_soft_limit(self) -> bool:
        return self.soft_limit != self.current_soft

    @property
    def lowered(self) -> bool:
        return self.max_connections < self.configured

    @property
    def reserve_short(self) -> bool:
        """The configuration can hold more fds outside client connections than
        ``reserved_fds`` keeps for them."""
        return self.shared_fds > self.reserved

    @property
    def warning(self) -> bool:
        return self.lowered or self.reserve_short

    def describe(self) -> str:
        """The one log line of the router's start."""
        budget = (f"limits.max_connections {self.configured} x {self.per_connection} fds "
                  f"+ {self.reserved} reserved = {self.needed}")
        hard = "unlimited" if self.hard is None else str(self.hard)
        if self.lowered:
            line = (f"file descriptors: limit {_show(self.soft_limit)} (hard {hard}) holds "
                    f"{self.max_connections} client connections, not the {budget} needed: "
                    f"serving at most {self.max_connections} (more are answered 503); raise the "
                    f"limit (ulimit -n {self.needed}, or LimitNOFILE={self.needed} in the systemd "
                    f"unit) or lower limits.max_connections")
        elif self.raises_soft_limit:
            line = (f"file descriptors: soft limit raised {_show(self.current_soft)} -> "
                    f"{_show(self.soft_limit)} (hard {hard}) for {budget}")
        else:
            line = f"file descriptors: limit {_show(self.soft_limit)} (hard {hard}) covers {budget}"
        if self.reserve_short:
            line += (f"; limits.reserved_fds {self.reserved} is below the {self.shared_fds} fds "
                     f"the configuration can hold outside client connections (idle upstream "
                     f"keep-alive, ready forwarding connections, health probes): raise it")
        return line


def plan_fds(soft: int | None, hard: int | None, max_connections: int, reserved_fds: int,
             per_connection: int, shared_fds: int = 0) -> FdPlan:
    """The plan for limits SOFT/HARD (None: unlimited).

    The soft limit is raised to what the configured ``max_connections`` needs,
    as far as ``hard`` allows; what still does not fit lowers the effective
    ``max_connections``. A soft limit above the need is left as it is.
    """
    if max_connections < 0 or reserved_fds < 0 or per_connection < 1 or shared_fds < 0:
        raise ValueError("plan_fds: negative budget")
    if soft is not None and hard is not None and soft > hard:
        raise ValueError(f"plan_fds: soft limit {soft} above hard limit {hard}")
    needed = max_connections * per_connection + reserved_fds
    if soft is None or soft >= needed:
        new_soft = soft
    elif hard is None or hard >= needed:
        new_soft = needed
    else:
        new_soft = hard
    if new_soft is None or new_soft >= needed:
        effective = max_connections
    else:
        effective = max(0, (new_soft - reserved_fds) // per_connection)
    return FdPlan(current_soft=soft, hard=hard, soft_limit=new_soft, configured=max_connections,
                  max_connections=effective, per_connection=per_connection,
                  reserved=reserved_fds, shared_fds=shared_fds)


def _show(limit: int | None) -> str:
    return "unlimited" if limit is None else str(limit)
