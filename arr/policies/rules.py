"""Content-based routing: ordered rules pick a pool, the pool's balancer a target."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Mapping, Sequence

from arr.decisions import Decision, Handoff, Proxy, Reject

if TYPE_CHECKING:
    from arr.pool import Pool
    from arr.request import Request

Mode = Literal["handoff", "proxy"]
MODES: tuple[str, ...] = ("handoff", "proxy")

NO_ROUTE = Reject(404, b"no route\n")
NO_HEALTHY_TARGET = Reject(503, b"no healthy target\n")


@dataclass(frozen=True)
class Rule:
    """Send requests matching *every* given condition to ``pool``.

    A condition left as None is not checked; a rule with no condition matches
    everything (a catch-all).

    * ``host``: exact, case-insensitive, port ignored. ``*.example.com`` matches
      any name ending in ``.example.com`` (``a.example.com``, ``a.b.example.com``)
      but not ``example.com`` itself, as in nginx.
    * ``path_prefix``: the path starts with it (plain string prefix).
    * ``path_regex``: ``re.search`` on the path (anchor it with ``^`` if needed).

    The path is the one the router forwards: normalised by the front-end
    (arr/paths.py: unreserved escapes decoded, dot segments removed, slashes
    merged; ambiguous encodings already refused with 400), so ``/%77hoami``,
    ``/./whoami`` or ``//whoami`` match ``path_prefix = "/whoami"`` as the
    target will serve them. It stays case-sensitive.
    * ``header``: ``(name, regex)``; regex None means "present". A multi-valued
      header matches if any of its values does.
    * ``cookie``: ``(name, regex)``; regex None means "present".
    * ``method``: exact (HTTP methods are case-sensitive).

    ``reject``: an access rule: matching requests are answered by the router
    with this status and go nowhere (``pool`` is then empty). With every
    request of a keep-alive connection routed, it holds for the tenth request
    as for the first.
    """

    pool: str
    host: str | None = None
    path_prefix: str | None = None
    path_regex: str | None = None
    header: tuple[str, str | None] | None = None
    cookie: tuple[str, str | None] | None = None
    method: str | None = None
    reject: int | None = None
    response_deadline: float | None = None
    """Handed-off requests of this rule: seconds until the first response
    byte, else re-dispatched (None: ``[handoff] response_deadline``)."""


@dataclass(frozen=True)
class _CompiledRule:
    """A Rule with its patterns compiled once, ready to test requests."""

    rule: Rule
    host: str | None
    host_suffix: str | None
    path_regex: re.Pattern[str] | None
    header_regex: re.Pattern[str] | None
    cookie_regex: re.Pattern[str] | None

    @classmethod
    def of(cls, index: int, rule: Rule) -> "_CompiledRule":
        host = suffix = None
        if rule.host is not None:
            name = rule.host.strip().lower().rstrip(".")
            if name.startswith("*."):
                suffix = name[1:]  # keep the dot: "*.x.com" -> ".x.com"
            else:
                host = name
        return cls(
            rule,
            host,
            suffix,
            _compile(index, "path_regex", rule.path_regex),
            _compile(index, "header", rule.header[1] if rule.header else None),
            _compile(index, "cookie", rule.cookie[1] if rule.cookie else None),
        )

    def matches(self, request: "Request") -> bool:
        rule = self.rule
        if rule.method is not None and request.method != rule.method:
            return False
        if self.host is not None or self.host_suffix is not None:
            host = request.host.rstrip(".")
            if self.host is not None and host != self.host:
                return False
            if self.host_suffix is not None and not host.endswith(self.host_suffix):
                return False
        if rule.path_prefix is not None and not request.path.startswith(rule.path_prefix):
            return False
        if self.path_regex is not None and not self.path_regex.search(request.path):
            return False
        if rule.header is not None:
            values = request.headers.get_all(rule.header[0])
            if not values:
                return False
            if self.header_regex is not None and not any(self.header_regex.search(v) for v in values):
                return False
        if rule.cookie is not None:
            value = request.cookies.get(rule.cookie[0])
            if value is None:
                return False
            if self.cookie_regex is not None and not self.cookie_regex.search(value):
                return False
        return True


def _compile(index: int, field_name: str, pattern: str | None) -> re.Pattern[str] | None:
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ValueError(f"rule {index}: invalid {field_name} regex {pattern!r}: {err}") from None


class RoutingPolicy:
    """A policy (``request -> Decision``): first matching rule, else the default pool.

    No match and no default pool -> 404; the chosen pool has no available
    target -> 503. Everything that can be checked without a request (pool
    names, regexes, mode) is checked here, so a bad configuration fails at
    load time instead of on the first unlucky request.
    """

    def __init__(self, rules: Sequence[Rule], pools: Mapping[str, "Pool"],
                 default_pool: str | None = None, mode: Mode = "proxy") -> None:
        if mode not in MODES:
            raise ValueError(f"unknown routing mode {mode!r} (expected one of: {', '.join(MODES)})")
        known = ", ".join(sorted(pools)) or "none"
        for index, rule in enumerate(rules):
            if rule.reject is not None:
                if not 400 <= rule.reject <= 599:
                    raise ValueError(f"rule {index}: reject status {rule.reject} is not a 4xx or 5xx")
                continue
            if rule.pool not in pools:
                raise ValueError(f"rule {index}: unknown pool {rule.pool!r} (known pools: {known})")
        if default_pool is not None and default_pool not in pools:
            raise ValueError(f"unknown default pool {default_pool!r} (known pools: {known})")
        self.rules = tuple(rules)
        self.pools = dict(pools)
        self.default_pool = default_pool
        self.mode: Mode = mode
        self._compiled = tuple(_CompiledRule.of(i, rule) for i, rule in enumerate(self.rules))

    def pool_for(self, request: "Request") -> "Pool | Reject | None":
        """The pool the request routes to, the Reject of an access rule, or
        None when nothing matches."""
        return self._match(request)[0]

    def _match(self, request: "Request") -> "tuple[Pool | Reject | None, Rule | None]":
        for compiled in self._compiled:
            if compiled.matches(request):
                rule = compiled.rule
                if rule.reject is not None:
                    return Reject(rule.reject, f"{rule.reject} refused by rule\n".encode()), rule
                return self.pools[rule.pool], rule
        return (self.pools[self.default_pool] if self.default_pool is not None else None), None

    def __call__(self, request: "Request") -> Decision:
        pool, rule = self._match(request)
        if pool is None:
            return NO_ROUTE
        if isinstance(pool, Reject):
            return pool
        target = pool.pick(request)
        if target is None:
            return NO_HEALTHY_TARGET
        if self.mode != "handoff":
            return Proxy(target)
        return Handoff(target, rule.response_deadline if rule is not None else None)
