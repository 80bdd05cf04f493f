"""Maglev consistent hashing (Eisenbud et al., "Maglev: A Fast and Reliable
Software Network Load Balancer", NSDI 2016, section 3.4).

Each target derives a permutation of the table slots from two hashes of its
name (``offset``, ``skip``); targets then take turns claiming the next free
slot of their own permutation until the table is full. A key is looked up by
hashing it to a slot. The result: near-perfectly even slot counts, and when a
target leaves, the slots of the others mostly stay put.
"""

from __future__ import annotations

import hashlib
from math import gcd
from typing import TYPE_CHECKING, Sequence

from arr.policies.keys import KeySpec

if TYPE_CHECKING:
    from arr.pool import TargetState
    from arr.request import Request

DEFAULT_TABLE_SIZE = 65537
"""Prime, and ~100x the slot count of a large pool, as the paper recommends."""


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    divisor = 3
    while divisor * divisor <= n:
        if n % divisor == 0:
            return False
        divisor += 2
    return True


def stable_hash(data: str, salt: bytes) -> int:
    """A 64-bit hash that is the same in every process (``hash()`` is randomized).

    ``salt`` (up to 16 bytes) yields independent hash functions from one algorithm.
    """
    digest = hashlib.blake2b(data.encode("utf-8", "surrogatepass"), digest_size=8, person=salt)
    return int.from_bytes(digest.digest(), "big")


_OFFSET_SALT = b"arr-maglev-off"
_SKIP_SALT = b"arr-maglev-skip"
_KEY_SALT = b"arr-maglev-key"


def build_table(targets: Sequence[tuple[str, int]], size: int) -> list[int]:
    """The lookup table: slot -> index into ``targets`` (a list of (name, weight)).

    ``size`` must be prime so that every ``skip`` in [1, size-1] generates a
    full permutation. Weights are honoured by giving a target ``weight`` turns
    per round (weights divided by their gcd first, so 2,2 behaves like 1,1);
    slot counts are then proportional to weight. Weight-0 targets get no turn,
    unless every weight is 0, in which case all are treated alike.
    """
    if not targets:
        raise ValueError("maglev: cannot build a table without targets")
    weights = [max(weight, 0) for _, weight in targets]
    if not any(weights):
        weights = [1] * len(targets)
    common = 0
    for weight in weights:
        common = gcd(common, weight)
    turns = [(index, weight // common) for index, weight in enumerate(weights) if weight]
    positions = [stable_hash(name, _OFFSET_SALT) % size for name, _ in targets]
    skips = [stable_hash(name, _SKIP_SALT) % (size - 1) + 1 if size > 1 else 1
             for name, _ in targets]

    table = [-1] * size
    filled = 0
    # The hot loop (it dominates the build: the last free slots take many
    # probes). Each target walks its own permutation by adding ``skip`` modulo
    # ``size``, which is the paper's (offset + j * skip) % size without the
    # multiplication.
    while True:
        for index, count in turns:
            skip = skips[index]
            slot = positions[index]
            for _ in range(count):
                while table[slot] >= 0:
                    slot += skip
                    if slot >= size:
                        slot -= size
                table[slot] = index
                filled += 1
                if filled == size:
                    return table
            positions[index] = slot


class Maglev:
    """Consistent hashing of ``key`` onto the candidates with a Maglev table.

    The table is cached and rebuilt only when the (name, weight) list of the
    candidates changes. It is built from the candidates sorted by name, so the
    mapping depends only on the set of targets, not on configuration order:
    two routers configured in a different order still agree.
    """

    def __init__(self, key: KeySpec, table_size: int = DEFAULT_TABLE_SIZE) -> None:
        if isinstance(table_size, bool) or not isinstance(table_size, int) or not is_prime(table_size):
            raise ValueError(f"maglev: table_size must be a prime, got {table_size!r}")
        self.key = key
        self.table_size = table_size
        self._built_for: tuple[tuple[str, int], ...] | None = None
        self._table: list[int] = []  # slot -> index into the candidate list
        self.builds = 0
        """How many times the table was (re)built; lets tests check the cache."""

    def choose(self, request: "Request", candidates: Sequence["TargetState"]) -> "TargetState":
        return candidates[self.slot_owner(self.key.extract(request), candidates)]

    def slot_owner(self, key: str, candidates: Sequence["TargetState"]) -> int:
        """Index into ``candidates`` of the target owning ``key``."""
        identity = tuple((c.name, c.weight) for c in candidates)
        if identity != self._built_for:
            self._rebuild(identity)
        return self._table[stable_hash(key, _KEY_SALT) % self.table_size]

    def _rebuild(self, identity: tuple[tuple[str, int], ...]) -> None:
        by_name = sorted(range(len(identity)), key=lambda i: identity[i][0])
        sorted_table = build_table([identity[i] for i in by_name], self.table_size)
        # Translate sorted positions back to positions in the candidate list.
        self._table = [by_name[i] for i in sorted_table]
        self._built_for = identity
        self.builds += 1
