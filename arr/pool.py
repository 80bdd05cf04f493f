"""Target pools: who can take traffic right now, and how a pool picks one.

Pure state, no I/O: the health checker and the proxy feed observations in
(``record_check``, ``record_connect_failure``), balancers read ``candidates``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, Sequence

if TYPE_CHECKING:
    from arr.request import Request


@dataclass(frozen=True)
class Target:
    """A back-end as configured: where its HTTP server and its agent listen."""

    host: str
    port: int
    weight: int = 1
    agent: tuple[str, int] | None = None
    name: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", f"{self.host}:{self.port}")

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)


@dataclass(frozen=True)
class HealthRule:
    """Rise/fall thresholds; the active checker also uses path and interval."""

    path: str = "/"
    interval: float = 2.0
    timeout: float = 1.0
    rise: int = 2
    fall: int = 3
    expect_status: tuple[int, int] = (200, 399)


@dataclass(eq=False)
class TargetState:
    """A target's live state inside one pool. Identity is the object itself."""

    target: Target
    healthy: bool = True
    draining: bool = False
    active: int = 0
    """Requests or connections in flight to this target through the router."""
    handed_off: int = 0
    """Client connections handed off to this target and not yet ended or taken
    back; maintained by the handoff engine, from its maps. Such a connection no
    longer passes through the router, so ``active`` does not see it."""
    consecutive_ok: int = 0
    consecutive_failures: int = 0
    weight_override: int | None = None
    """A weight set at run time (``arr weight``, arr/admin.py) instead of the configured one."""

    @property
    def name(self) -> str:
        return self.target.name

    @property
    def weight(self) -> int:
        return self.target.weight if self.weight_override is None else self.weight_override

    @property
    def load(self) -> int:
        """What least-connections and LARD balance: ``active + handed_off``.

        Both count, or a target holding many handed-off connections would look
        idle and the load-aware policies would degrade to round-robin.
        """
        return self.active + self.handed_off

    @property
    def available(self) -> bool:
        return self.healthy and not self.draining and self.weight > 0

    def record_check(self, ok: bool, rule: HealthRule) -> bool:
        """Feed one health observation; return True when health flipped."""
        if ok:
            self.consecutive_ok += 1
            self.consecutive_failures = 0
            if not self.healthy and self.consecutive_ok >= rule.rise:
                self.healthy = True
                return True
        else:
            self.consecutive_failures += 1
            self.consecutive_ok = 0
            if self.healthy and self.consecutive_failures >= rule.fall:
                self.healthy = False
                return True
        return False

    def __repr__(self) -> str:
        flags = "up" if self.healthy else "down"
        if self.draining:
            flags += ",draining"
        return f"<TargetState {self.name} {flags} active={self.active} handed_off={self.handed_off}>"


class Balancer(Protocol):
    """Picks one target among the pool's available ones.

    ``candidates`` is never empty and keeps a stable order (configuration order)
    so that stateful balancers can cache what they derive from it.
    """

    def choose(self, request: "Request", candidates: Sequence[TargetState]) -> TargetState: ...


@dataclass(eq=False)
class Pool:
    name: str
    members: list[TargetState]
    balancer: Balancer
    health: HealthRule | None = None
    """Active checks; None: passive detection only (connect failures)."""

    @classmethod
    def of(cls, name: str, targets: Sequence[Target], balancer: Balancer,
           health: HealthRule | None = None) -> "Pool":
        return cls(name, [TargetState(t) for t in targets], balancer, health)

    def candidates(self, exclude: Sequence[TargetState] = ()) -> list[TargetState]:
        return [m for m in self.members if m.available and m not in exclude]

    def pick(self, request: "Request", exclude: Sequence[TargetState] = ()) -> TargetState | None:
        """The balancer's choice among available members, or None if none is."""
        candidates = self.candidates(exclude)
        if not candidates:
            return None
        return self.balancer.choose(request, candidates)

    def find(self, name: str) -> TargetState | None:
        return next((m for m in self.members if m.name == name), None)

    def drain(self, name: str, draining: bool = True) -> None:
        """Stop (or resume) sending new requests to ``name``; in-flight ones finish."""
        member = self.find(name)
        if member is None:
            raise KeyError(f"pool {self.name!r} has no target {name!r}")
        member.draining = draining
