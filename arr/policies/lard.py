"""Locality-Aware Request Distribution, basic strategy (Pai et al., "Locality-
Aware Request Distribution in Cluster-based Network Servers", ASPLOS 1998).

Requests for the same key go to the same server so its cache stays warm; a
key moves only when its server is clearly overloaded. Load is the number of
connections the server is handling (``TargetState.load``): requests in flight
through the router (``active``), as in the paper, plus client connections
handed off to it (``handed_off``), which no longer pass through the router but
still occupy the server. Both the least-loaded choice and the ``t_low`` /
``t_high`` thresholds use it.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Sequence

from arr.policies.balancers import pick_least
from arr.policies.keys import KeySpec

if TYPE_CHECKING:
    from arr.pool import TargetState
    from arr.request import Request

DEFAULT_MAX_KEYS = 100_000


def _load(target: "TargetState") -> int:
    return target.load


class Lard:
    """Sticky key -> server assignment that yields to load imbalance.

    For a request with key ``k`` assigned to server ``s``:

    * ``k`` unassigned, or ``s`` no longer a candidate: assign the least loaded
      candidate.
    * ``load(s) > t_high`` and some candidate has ``load < t_low``, or
      ``load(s) >= 2 * t_high``: move ``k`` to the least loaded candidate.
      (``t_low`` keeps a moderately busy server's keys home while nobody is
      idle; ``2 * t_high`` bounds the delay even when everyone is busy.)

    ``load`` is ``TargetState.load`` (``active + handed_off``). Ties on least
    load are broken round-robin so idle servers share new keys.
    The key memory is an LRU bounded by ``max_keys``: a forgotten key is simply
    assigned afresh, which costs one cold cache, never a wrong answer.
    """

    def __init__(self, key: KeySpec, t_low: int = 25, t_high: int = 65,
                 max_keys: int = DEFAULT_MAX_KEYS) -> None:
        for label, value in (("t_low", t_low), ("t_high", t_high), ("max_keys", max_keys)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"lard: {label} must be a non-negative integer, got {value!r}")
        if t_low >= t_high:
            raise ValueError(f"lard: t_low must be below t_high, got t_low={t_low} t_high={t_high}")
        if max_keys < 1:
            raise ValueError(f"lard: max_keys must be at least 1, got {max_keys}")
        self.key = key
        self.t_low = t_low
        self.t_high = t_high
        self.max_keys = max_keys
        self._assigned: OrderedDict[str, str] = OrderedDict()  # key -> target name, LRU first
        self._turn = 0

    def choose(self, request: "Request", candidates: Sequence["TargetState"]) -> "TargetState":
        key = self.key.extract(request)
        name = self._assigned.get(key)
        server = next((c for c in candidates if c.name == name), None) if name else None
        if server is None or self._overloaded(server, candidates):
            server = pick_least(candidates, _load, self._turn)
            self._turn += 1
        self._remember(key, server.name)
        return server

    def assignment(self, key: str) -> str | None:
        """The target name ``key`` is currently assigned to (for tests and introspection)."""
        return self._assigned.get(key)

    def __len__(self) -> int:
        return len(self._assigned)

    def _overloaded(self, server: "TargetState", candidates: Sequence["TargetState"]) -> bool:
        if server.load >= 2 * self.t_high:
            return True
        return server.load > self.t_high and any(c.load < self.t_low for c in candidates)

    def _remember(self, key: str, name: str) -> None:
        self._assigned[key] = name
        self._assigned.move_to_end(key)
        while len(self._assigned) > self.max_keys:
            self._assigned.popitem(last=False)
