"""Routing policies: key extraction, balancers, Maglev, LARD and routing rules.

``make_balancer`` turns a configuration entry (a kind and an options dict)
into a balancer, rejecting anything it does not understand with a message
that says what would have been accepted.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from arr.policies.balancers import LeastConnections, RoundRobin, WeightedRoundRobin
from arr.policies.keys import KeySpec
from arr.policies.lard import Lard
from arr.policies.maglev import Maglev
from arr.policies.rules import RoutingPolicy, Rule
from arr.pool import Balancer

__all__ = [
    "BALANCER_KINDS", "KeySpec", "Lard", "LeastConnections", "Maglev", "RoundRobin",
    "RoutingPolicy", "Rule", "WeightedRoundRobin", "make_balancer",
]

# kind -> {option: (expected type, required)}. Keys are given as text and
# parsed into a KeySpec; every other option is an int.
_OPTIONS: dict[str, dict[str, tuple[type, bool]]] = {
    "round-robin": {},
    "weighted": {},
    "least-connections": {},
    "maglev": {"key": (str, True), "table_size": (int, False)},
    "lard": {"key": (str, True), "t_low": (int, False), "t_high": (int, False),
             "max_keys": (int, False)},
}

_FACTORIES: dict[str, Callable[..., Balancer]] = {
    "round-robin": RoundRobin,
    "weighted": WeightedRoundRobin,
    "least-connections": LeastConnections,
    "maglev": Maglev,
    "lard": Lard,
}

BALANCER_KINDS: tuple[str, ...] = tuple(_OPTIONS)


def make_balancer(kind: str, options: Mapping[str, Any] | None = None) -> Balancer:
    """A new balancer of ``kind`` configured with ``options``; ValueError if either is wrong."""
    if not isinstance(kind, str) or kind not in _OPTIONS:
        raise ValueError(f"unknown policy kind {kind!r} (expected one of: {', '.join(BALANCER_KINDS)})")
    accepted = _OPTIONS[kind]
    if options is not None and not isinstance(options, Mapping):
        raise ValueError(f"{kind}: options must be a mapping, got {type(options).__name__}")
    options = dict(options or {})
    for name, value in options.items():
        if name not in accepted:
            names = ", ".join(accepted) or "none"
            raise ValueError(f"{kind}: unknown option {name!r} (accepted: {names})")
        expected, _ = accepted[name]
        # bool is an int subclass, but `table_size: true` is a mistake, not 1.
        if isinstance(value, bool) or not isinstance(value, expected):
            type_name = "a string" if expected is str else "an integer"
            raise ValueError(f"{kind}: option {name!r} must be {type_name}, "
                             f"got {type(value).__name__} {value!r}")
    for name, (_, required) in accepted.items():
        if required and name not in options:
            raise ValueError(f"{kind}: missing required option {name!r}")
    if "key" in options:
        try:
            options["key"] = KeySpec.parse(options["key"])
        except ValueError as err:
            raise ValueError(f"{kind}: option 'key': {err}") from None
    return _FACTORIES[kind](**options)
