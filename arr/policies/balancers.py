"""Balancers that ignore the request: round-robin, weighted, least-connections.

Each keeps a little state between calls, keyed by target name rather than by
position, because the candidate list shrinks and grows as targets go down,
drain and come back: a position means a different target after such a change.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:
    from arr.pool import TargetState
    from arr.request import Request


class RoundRobin:
    """Each candidate in turn, in configuration order.

    A single counter taken modulo the current number of candidates: when the
    set changes the rotation simply continues over the new set, so no target
    is starved or hit twice in a row because of the change.
    """

    def __init__(self) -> None:
        self._turn = 0

    def choose(self, request: "Request", candidates: Sequence["TargetState"]) -> "TargetState":
        chosen = candidates[self._turn % len(candidates)]
        self._turn += 1
        return chosen


class WeightedRoundRobin:
    """Smooth weighted round-robin, as nginx does it.

    Every pick, each candidate's running score grows by its weight; the highest
    score wins (first in configuration order on a tie) and pays back the total
    weight. Over a cycle of ``sum(weights)`` picks each target is chosen exactly
    ``weight`` times, and the picks are interleaved (5,1,1 gives a a b a c a a,
    not a a a a a b c), so a heavy target never receives a burst.
    """

    def __init__(self) -> None:
        self._scores: dict[str, int] = {}

    def choose(self, request: "Request", candidates: Sequence["TargetState"]) -> "TargetState":
        weights = [max(c.weight, 0) for c in candidates]
        if not any(weights):  # nothing weighted: share evenly rather than fail
            weights = [1] * len(candidates)
        present = {c.name for c in candidates}
        if present != self._scores.keys():
            # A target that left loses its score and one that (re)joins starts
            # from zero, like a fresh nginx peer; survivors keep their place.
            self._scores = {name: self._scores.get(name, 0) for name in present}
        scores = self._scores
        best: "TargetState | None" = None
        best_score = 0
        for candidate, weight in zip(candidates, weights):
            score = scores[candidate.name] + weight
            scores[candidate.name] = score
            if best is None or score > best_score:
                best, best_score = candidate, score
        assert best is not None  # candidates is never empty
        scores[best.name] -= sum(weights)
        return best


def pick_least(candidates: Sequence["TargetState"], load: Callable[["TargetState"], float],
               turn: int) -> "TargetState":
    """The candidate with the lowest ``load``; ties go to ``tied[turn % len(tied)]``.

    Shared by least-connections and LARD: with a rotating ``turn`` equal loads
    (typically all idle) spread over the tied targets instead of always landing
    on the first one in configuration order.
    """
    loads = [load(c) for c in candidates]
    lowest = min(loads)
    tied = [c for c, value in zip(candidates, loads) if value == lowest]
    return tied[turn % len(tied)]


class LeastConnections:
    """The candidate with the fewest connections per unit of weight.

    Load is ``TargetState.load / weight``, i.e. ``(active + handed_off) / weight``:
    requests in flight through the router plus client connections handed off
    to the target, which the router no longer sees but the target still serves.
    A weight-0 target counts as infinitely loaded; ties are broken round-robin.
    """

    def __init__(self) -> None:
        self._turn = 0

    @staticmethod
    def load(target: "TargetState") -> float:
        return target.load / target.weight if target.weight > 0 else float("inf")

    def choose(self, request: "Request", candidates: Sequence["TargetState"]) -> "TargetState":
        chosen = pick_least(candidates, self.load, self._turn)
        self._turn += 1
        return chosen
