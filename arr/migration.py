"""Moving connections between targets: what to move, and where to send it next.

The pure half of ``arr migrate`` (the I/O is handoff/migrate.py):

* ``MoveOrder``: one operator's order (from, to, which clients, how many,
  live or reset), validated once, as the admin interface receives it.
* ``select``: which of a target's handed-off connections an order names, and
  why each other one is left (counted, for the report).
* ``Overrides``: where a moved client's next request goes. A live-moved
  connection keeps its 4-tuple, so its override names that exact client
  port; a reset client reconnects from a new port, so its override covers
  the order's port range (all ports without ``--port``): the seed's sticky
  translation for "that client and port range", for ``sticky`` seconds.
  The newest override that matches wins (a migration back replaces one).
* ``steer``: a policy's decision, redirected to the override's target when
  that target is an available member of the pool the policy chose from; any
  other decision (``Local``, ``Reject``, a target of another pool) is left as
  the policy made it: an override moves load, it never bypasses a rule.
"""

from __future__ import annotations

import ipaddress
from collections import deque
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Iterable

from arr.decisions import Handoff, Proxy

if TYPE_CHECKING:
    from arr.decisions import Decision
    from arr.pool import Pool, TargetState

Address = tuple[str, int]

MODES = ("live", "reset")
MAX_OVERRIDES = 65536
"""Overrides kept at most: the oldest go first (each is a few dozen bytes)."""


class OrderError(ValueError):
    """An order the router refuses; the message names the field."""


@dataclass(frozen=True)
class PortRange:
    first: int
    last: int

    @classmethod
    def parse(cls, value: Any) -> "PortRange":
        """``8000``, ``"8000"`` or ``"8000-8099"``."""
        if isinstance(value, bool):
            raise OrderError(f"port: expected N or N-M, got {value!r}")
        if isinstance(value, int):
            first = last = value
        elif isinstance(value, str):
            head, sep, tail = value.strip().partition("-")
            if not head.isdigit() or (sep and not tail.isdigit()):  # int() would take "+80", "1_000"
                raise OrderError(f"port: expected N or N-M, got {value!r}")
            first = int(head)
            last = int(tail) if sep else first
        else:
            raise OrderError(f"port: expected N or N-M, got {value!r}")
        if not 1 <= first <= last <= 65535:
            raise OrderError(f"port: {value!r} is not a range within 1-65535")
        return cls(first, last)

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.first <= port <= self.last

    def __str__(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"


@dataclass(frozen=True)
class MoveOrder:
    """``arr migrate --from SOURCE [--to DESTINATION] [--client CIDR]
    [--port N[-M]] [--max N] [--mode live|reset]``, targets resolved to
    addresses by the caller (arr/admin.py)."""

    source: Address
    destination: Address | None
    """None: the policy decides where each moved connection goes next (a
    drain, a target found down)."""
    mode: str = "live"
    clients: ipaddress.IPv4Network | None = None
    ports: PortRange | None = None
    """The clients' source ports."""
    limit: int | None = None
    wait: float = 30.0
    """How long a live move waits for a response still on its way to the client."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise OrderError(f"mode: expected one of {', '.join(MODES)}, got {self.mode!r}")
        if self.limit is not None and self.limit < 0:
            raise OrderError(f"max: expected a count >= 0, got {self.limit}")
        if not 0 < self.wait <= 3600:
            raise OrderError(f"wait: expected seconds in (0, 3600], got {self.wait}")
        if self.destination == self.source:
            raise OrderError("to: the destination is the source")

    @staticmethod
    def parse_clients(value: Any) -> ipaddress.IPv4Network | None:
        if value in (None, ""):
            return None
        try:
            network = ipaddress.ip_network(str(value), strict=False)
        except ValueError:
            raise OrderError(f"client: expected an IPv4 address or CIDR, got {value!r}") from None
        if not isinstance(network, ipaddress.IPv4Network):
            raise OrderError(f"client: handed-off connections are IPv4, got {value!r}")
        return network

    def matches(self, client: Address) -> str | None:
        """None if this order names the client; else why not."""
        if self.clients is not None and ipaddress.IPv4Address(client[0]) not in self.clients:
            return "client"
        if self.ports is not None and client[1] not in self.ports:
            return "port"
        return None


@dataclass(frozen=True)
class Candidate:
    """A handed-off connection as the selection sees it."""

    client: Address
    target: Address
    busy: bool = False
    """Not in a state that can move (being taken back already, ending)."""


@dataclass
class Selection:
    chosen: list[Candidate] = field(default_factory=list)
    left: dict[str, int] = field(default_factory=dict)
    """Connections of the source target left alone, by reason: ``client``,
    ``port`` (not named), ``max`` (over the count), ``busy``."""

    def leave(self, why: str) -> None:
        self.left[why] = self.left.get(why, 0) + 1


def select(order: MoveOrder, candidates: Iterable[Candidate]) -> Selection:
    """The source target's connections the order names, in a stable order
    (client address, then port), at most ``limit``."""
    selection = Selection()
    named = []
    for candidate in candidates:
        if candidate.target != order.source:
            continue
        why = order.matches(candidate.client)
        if why is not None:
            selection.leave(why)
        elif candidate.busy:
            selection.leave("busy")
        else:
            named.append(candidate)
    named.sort(key=lambda c: (ipaddress.IPv4Address(c.client[0]), c.client[1]))
    if order.limit is not None and len(named) > order.limit:
        for _ in named[order.limit:]:
            selection.leave("max")
        named = named[:order.limit]
    selection.chosen = named
    return selection


@dataclass(frozen=True)
class Override:
    ports: PortRange | None
    target: Address
    until: float
    serial: int
    """Order of addition: the newest matching override wins."""


class Overrides:
    """Where the next requests of moved clients go, for a while. A request
    looks at its own address's overrides only: those for one port (a live
    move's, by 4-tuple) in a dict, the others (a reset's: all ports or a
    range) in a short list per address. They expire in the order they were
    added (all share one sticky time)."""

    def __init__(self, limit: int = MAX_OVERRIDES) -> None:
        self.limit = limit
        self._exact: dict[Address, Override] = {}
        self._ranges: dict[str, list[Override]] = {}
        self._order: deque[tuple[Address, Override]] = deque()
        self._serial = 0

    def add(self, client_ip: str, ports: PortRange | None, target: Address, until: float) -> None:
        self._serial += 1
        rule = Override(ports, target, until, self._serial)
        if ports is not None and ports.first == ports.last:
            self._exact[(client_ip, ports.first)] = rule
            self._order.append(((client_ip, ports.first), rule))
        else:
            self._ranges.setdefault(client_ip, []).append(rule)
            self._order.append(((client_ip, 0), rule))
        while len(self._order) > self.limit:
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        (ip, port), rule = self._order.popleft()
        if port and self._exact.get((ip, port)) is rule:
            del self._exact[(ip, port)]
        elif not port:
            rules = self._ranges.get(ip)
            if rules is not None and rule in rules:
                rules.remove(rule)
                if not rules:
                    del self._ranges[ip]

    def lookup(self, client: Address, now: float) -> Address | None:
        """The newest live override for CLIENT; expired ones are dropped."""
        while self._order and self._order[0][1].until <= now:
            self._drop_oldest()
        best = self._exact.get(client)
        for rule in self._ranges.get(client[0], ()):
            if (rule.ports is None or client[1] in rule.ports) and (best is None or rule.serial > best.serial):
                best = rule
        return best.target if best is not None and best.until > now else None

    def __len__(self) -> int:
        return len(self._order)


def steer(decision: "Decision", wanted: Address | None, pool: "Pool | None") -> "Decision":
    """DECISION with its target replaced by the member at WANTED, when POOL
    (the pool the policy chose DECISION's target from; None: none known, a
    pool a reload replaced) has WANTED as an available member."""
    if wanted is None or pool is None or not isinstance(decision, (Handoff, Proxy)):
        return decision
    if decision.target.target.address == wanted:
        return decision
    member: "TargetState | None" = next(
        (m for m in pool.members if m.target.address == wanted and m.available), None)
    return replace(decision, target=member) if member is not None else decision


@dataclass(frozen=True)
class Replay:
    """A handed-off request kept for a re-dispatch (seed 000's response
    deadline, handoff/deadline.py): its bytes as the router read them, given
    back to the front-end as if the client sent them again, and the target
    that stayed silent, which the new decision avoids."""

    raw: bytes
    silent: Address


def request_bytes(method: bytes, target: bytes, headers: Iterable[tuple[bytes, bytes]], body: bytes) -> bytes:
    """An HTTP/1.1 request the front-end reads again: the head as h11 parsed
    it (names lower-cased), the body de-chunked with its length."""
    lines = [method + b" " + target + b" HTTP/1.1"]
    lines += [n + b": " + v for n, v in headers if n not in (b"content-length", b"transfer-encoding")]
    if body or method not in (b"GET", b"HEAD", b"OPTIONS", b"DELETE", b"TRACE"):
        lines.append(b"content-length: " + str(len(body)).encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def avoid(decision: "Decision", silent: Address, pool: "Pool | None", pick: Any) -> "Decision | None":
    """DECISION, but never to the target at SILENT: another available member
    of POOL, the pool the policy chose from (PICK(pool, excluded) is its
    balancer), or None when there is no other (the caller answers 504)."""
    if not isinstance(decision, (Handoff, Proxy)) or decision.target.target.address != silent:
        return decision
    if pool is None:
        return None
    other = pick(pool, [m for m in pool.members if m.target.address == silent])
    return replace(decision, target=other) if other is not None else None


@dataclass
class MoveReport:
    """What ``arr migrate`` did, as the admin interface answers it."""

    order: MoveOrder
    selected: int = 0
    moved: int = 0
    reset: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    """Selected connections that did not move, by reason."""
    left: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def skip(self, why: str) -> None:
        self.skipped[why] = self.skipped.get(why, 0) + 1

    def as_json(self) -> dict[str, Any]:
        o = self.order
        return {
            "from": f"{o.source[0]}:{o.source[1]}",
            "to": f"{o.destination[0]}:{o.destination[1]}" if o.destination else None,
            "mode": o.mode, "client": str(o.clients) if o.clients else None,
            "port": str(o.ports) if o.ports else None, "max": o.limit,
            "selected": self.selected, "moved": self.moved, "reset": self.reset,
            "skipped": dict(sorted(self.skipped.items())), "left": dict(sorted(self.left.items())),
            "seconds": round(self.seconds, 3),
        }
