"""Forwarding ports: which local ports the router's forwarding connections use.

A handed-off connection lives on at the target on the forwarding 4-tuple
(``r_ip:f_port <-> t_ip:t_port``) while the router's kernel has forgotten the
port (the socket was closed silently). The router's own connections (health
probes, proxying, upstream keep-alive) get ephemeral ports the kernel picks;
were the kernel to pick a forwarding port that is still live at the target,
the router's SYN would meet the target's live socket (a challenge ACK, then a
RST that kills the handed-off connection). So the two kinds never share a
port: forwarding ports come from a range listed in
``net.ipv4.ip_local_reserved_ports`` (the kernel never picks those by itself,
an explicit ``bind`` still may), and the router chooses among them, skipping
ports whose previous connection the target may still hold.

Everything here is pure: parsing, the reservation's sysctl text, the choice.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Iterable


@dataclass(frozen=True)
class PortRange:
    low: int
    high: int

    def __post_init__(self) -> None:
        if not 1 <= self.low <= self.high <= 65535:
            raise ValueError(f"port range {self.low}-{self.high} is not within 1-65535, low <= high")

    @classmethod
    def parse(cls, text: str) -> "PortRange":
        """``"50000-60999"`` or a single port ``"50000"``; ValueError with the reason."""
        low, sep, high = text.strip().partition("-")
        try:
            lo, hi = int(low), int(high) if sep else int(low)
        except ValueError:
            raise ValueError(f"{text!r} is not a port range like '50000-60999'") from None
        return cls(lo, hi)

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.low <= port <= self.high

    def __len__(self) -> int:
        return self.high - self.low + 1

    def overlaps(self, other: "PortRange") -> bool:
        return self.low <= other.high and other.low <= self.high

    def __str__(self) -> str:
        return f"{self.low}-{self.high}" if self.high != self.low else str(self.low)


def parse_port_list(text: str) -> list[PortRange]:
    """The kernel's port-list syntax (``ip_local_reserved_ports``): ``"1,5-9"``."""
    return [PortRange.parse(part) for part in text.replace("\n", ",").split(",") if part.strip()]


def reservation_text(current: str, forward: PortRange) -> str | None:
    """The ``ip_local_reserved_ports`` value that adds FORWARD to CURRENT, or
    None when every forwarding port is reserved already."""
    ranges = parse_port_list(current)
    covered = merge(ranges)
    if any(r.low <= forward.low and forward.high <= r.high for r in covered):
        return None
    return ",".join(str(r) for r in merge([*ranges, forward]))


def merge(ranges: Iterable[PortRange]) -> list[PortRange]:
    """Sorted, with overlapping and adjacent ranges joined."""
    out: list[PortRange] = []
    for r in sorted(ranges, key=lambda r: r.low):
        if out and r.low <= out[-1].high + 1:
            out[-1] = PortRange(out[-1].low, max(out[-1].high, r.high))
        else:
            out.append(r)
    return out


def choose_port(ports: PortRange, is_free: Callable[[int], bool], rng: random.Random,
                tries: int = 64) -> int | None:
    """A port of PORTS that IS_FREE accepts: random probes first (cheap when
    the range is mostly free), then one pass from a random start, so a nearly
    full range still yields its free ports. None when none is free."""
    for _ in range(min(tries, len(ports))):
        port = rng.randint(ports.low, ports.high)
        if is_free(port):
            return port
    start = rng.randint(ports.low, ports.high)
    for offset in range(len(ports)):
        port = ports.low + (start - ports.low + offset) % len(ports)
        if is_free(port):
            return port
    return None
