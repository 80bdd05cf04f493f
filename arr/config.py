"""Configuration: TOML into frozen dataclasses, validated once at load time.

Every error is a ``ConfigError`` whose message starts with the dotted path of
the offending field (``pools.web.targets[1].address: ...``), so an operator can
fix the file without reading code. Two shapes are accepted: the minimal one
(top-level ``[[targets]]`` and ``[policy]``, which form the pool ``default``)
and the full one (named ``[pools.NAME]`` plus ``[[rules]]`` selecting them).
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from arr.pool import HealthRule, Target

MODES = ("nat", "proxy")
FALLBACKS = ("proxy", "503")


DEFAULT_ADMIN_SOCKET = "/run/arr/admin.sock"


class ConfigError(ValueError):
    """A configuration problem, prefixed with the dotted path of the field."""


@dataclass(frozen=True)
class Limits:
    """What one client may cost the router before it is answered 4xx."""

    header_bytes: int = 64 * 1024
    header_timeout: float = 10.0
    """Deadline for a whole request head: from the connection's start for its
    first request, from the request's first byte for later ones (408)."""
    body_buffer: int = 64 * 1024
    """Body bytes read before the decision (larger bodies stream after it)."""
    max_body: int = 1 << 30
    """Largest request body accepted (413 beyond); 0 means unlimited."""
    body_timeout: float = 30.0
    """Longest wait for the next body bytes (408 body-stalled)."""
    body_deadline: float = 300.0
    """Longest time for a whole request body, from the end of its head (408
    body-deadline), streamed bodies included."""
    min_body_rate: int = 1024
    """Bytes per second a body must average over the time spent waiting for
    the client, once ``body_rate_grace`` seconds of it have passed (408
    body-too-slow); 0 disables the check. Time a streamed body spends blocked
    on a slow target does not count against the client."""
    body_rate_grace: float = 5.0
    keepalive_timeout: float = 60.0
    max_connections: int = 10_000
    max_requests_per_connection: int = 10_000
    reserved_fds: int = 256
    """File descriptors kept free of client connections, for health checks,
    upstream and forwarding connections, maps and logs (see arr/fdlimit.py)."""


@dataclass(frozen=True)
class Upstream:
    connect_timeout: float = 3.0
    read_timeout: float = 60.0
    """Longest silence from a target before 504 (or an aborted response)."""
    retries: int = 1
    """Other targets tried after a connect failure (the request is not yet sent)."""
    keepalive: int = 32
    """Idle connections kept per target for later requests (0: one per request)."""
    keepalive_timeout: float = 15.0
    """An idle upstream connection is closed after this; keep it below the
    targets' own keep-alive timeout (nginx: 75 s)."""


@dataclass(frozen=True)
class RouterSettings:
    listen: tuple[str, int] = ("127.0.0.1", 8080)
    mode: str = "nat"
    fallback: str = "proxy"
    """What a failed or impossible handoff becomes: relay (``proxy``) or ``503``."""
    secret_file: str | None = None
    metrics: tuple[str, int] | None = None
    drain_timeout: float = 10.0
    access_log: str | None = "stderr"
    """Where the JSON-lines access log goes (arr/accesslog.py): "stderr",
    "stdout" or a file path; None (``"off"`` or ``false`` in a file) for nowhere."""
    health_path: str | None = "/_arr/health"
    """Answered locally (router liveness); None disables it."""
    admin_socket: str | None = None
    """The runtime admin interface's Unix socket (arr/admin.py). A config file
    (``load_config``) gets ``/run/arr/admin.sock`` unless it says otherwise
    ("" disables it); a config built in code or from a dict has none unless given."""


@dataclass(frozen=True)
class HandoffSettings:
    """``[handoff]``: the nat mode's data path and its timers (what the
    handoff engine, handoff/engine.py, and its lifecycle run with)."""

    bpf_dir: str = "/run/arr/bpf"
    instance: str | None = None
    """Name of this router's pinned maps (default: one per network namespace)."""
    agent_timeout: float = 1.0
    """Longest wait for the agent's ACK before falling back."""
    connect_timeout: float = 3.0
    """Covers one lost SYN (Linux retransmits it after 1 s)."""
    request_ack_timeout: float = 30.0
    """Longest wait for the target to acknowledge the request before the router
    stops retransmitting it (its kernel retransmits meanwhile)."""
    linger: float = 2.0
    """How long an entry outlives its connection (late retransmissions)."""
    idle_timeout: float = 300.0
    """A connection silent this long is checked with its agent; never cut."""
    capacity: int = 65536
    """Handed-off connections the maps hold at most; beyond it handoffs fall back."""
    forward_ports: tuple[int, int] = (50000, 60999)
    """Local ports of the forwarding connections, reserved from the kernel's
    own choice (``net.ipv4.ip_local_reserved_ports``)."""
    forward_pool: int = 4
    """Forwarding connections kept ready per target and client profile, so
    that no handshake sits in a request's path (0: connect on demand): what a
    shelf keeps at first; then it follows its demand (``forward_pool_max``)."""
    forward_pool_max: int = 16
    """The most a shelf of the pool grows to: each handoff that found it
    empty adds one, each connection that aged out unused takes one away, down
    to one (handoff/forward_pool.py ``ShelfDepth``). Never below
    ``forward_pool``, nor above a sixteenth of ``forward_ports``."""
    takeback_timeout: float = 10.0
    """Longest a handed-off connection's next request waits for the client to
    acknowledge the previous response before the router takes it back (a
    pipelining client); past it the connection ends (handoff/takeback.py)."""
    rehandoff_in_place: bool = True
    """Send a handed-off connection's next request to the same target on the
    same connection without taking it back, when the policy decides it for
    that target from the captured bytes (handoff/inplace.py): one agent
    exchange, no socket rebuilt. Anything else is taken back as before."""
    rehandoff_hand_on: bool = True
    """Hand a handed-off connection's next request that the policy decides
    for another target on from the captured bytes (handoff/takeback.py
    ``_hand_on``): the old agent lets go, the old forwarding connection ends
    with a FIN, the new handoff starts from the client's state as the maps
    and the captured segment give it, no socket rebuilt for the client."""
    reuse_forward: bool = False
    """Give a taken-back connection's forwarding connection whose next request
    went to another target (or was proxied, answered locally or refused) back
    to the forward pool (handoff/forward_pool.py ``give_back``): the next
    handoff to its target takes it instead of connecting, and the FIN waits
    until the pool drops it unused. Off: it is closed at once with a FIN."""
    migrate_sticky: float = 60.0
    """How long a migration's override sends a moved client's next requests
    (a reset client's new connections too) to its destination (arr/migration.py)."""
    migrate_wait: float = 30.0
    """How long a live move waits for a response still on its way to the
    client before it leaves that connection where it is (``arr migrate --wait``)."""
    response_deadline: float = 0.0
    """Seconds a target has to send the first byte of a handed-off request's
    response; past it the router takes the connection back and sends the
    request to another target of the pool (seed 000's deadline), if the
    request is safe to repeat: an idempotent method, or a body of at most
    ``redispatch_body_max`` bytes, which the router keeps until then.
    0: off. Rules may set their own."""
    redispatch_body_max: int = 65536
    """The largest request body the router keeps for a re-dispatch."""
    move_on_down: bool = True
    """Move a target's handed-off connections off it when its health checks
    mark it down: live where they are idle, reset otherwise (handoff/migrate.py)."""
    rto_min: float = 0.02
    """Floor of the retransmission timeout of the router's own connections
    across the cluster's network (the control channel to the agents, the
    forwarding connections to the targets), in seconds: a segment of them
    lost waits this long (or srtt + 4 rttvar, if longer) before it is resent,
    instead of Linux's 200 ms, and every request waits with it. 0.005 to 0.2;
    0: the kernel's. Needs Linux 6.15 (TCP_RTO_MIN_US); older kernels keep
    their own. Connections to clients keep the kernel's."""

    @property
    def rto_min_us(self) -> int:
        return round(self.rto_min * 1_000_000)


@dataclass(frozen=True)
class PoolSettings:
    name: str
    targets: tuple[Target, ...]
    policy: str = "round-robin"
    policy_options: Mapping[str, Any] = field(default_factory=dict)
    health: HealthRule | None = None
    """Active checks; None means passive detection only."""


@dataclass(frozen=True)
class RuleSettings:
    pool: str
    """The pool matching requests go to ('' for a ``reject`` rule)."""
    host: str | None = None
    path_prefix: str | None = None
    path_regex: str | None = None
    method: str | None = None
    header: tuple[str, str | None] | None = None
    cookie: tuple[str, str | None] | None = None
    reject: int | None = None
    """An access rule: matching requests get this status from the router."""
    response_deadline: float | None = None
    """Overrides ``[handoff] response_deadline`` for this rule's requests (0: off)."""


@dataclass(frozen=True)
class LocalRoute:
    """A small object answered in-process for an exact path."""

    path: str
    body: bytes
    status: int = 200
    content_type: str = "text/plain; charset=utf-8"


@dataclass(frozen=True)
class Config:
    router: RouterSettings = field(default_factory=RouterSettings)
    limits: Limits = field(default_factory=Limits)
    upstream: Upstream = field(default_factory=Upstream)
    pools: tuple[PoolSettings, ...] = ()
    rules: tuple[RuleSettings, ...] = ()
    default_pool: str | None = None
    local: tuple[LocalRoute, ...] = ()
    handoff: HandoffSettings = field(default_factory=HandoffSettings)

    def all_targets(self) -> list[Target]:
        """Every configured target once (a target may sit in several pools)."""
        return list({t.address: t for p in self.pools for t in p.targets}.values())


# ---------------------------------------------------------------- parsing

def parse_address(text: Any, where: str, *, default_port: int | None = None,
                  ephemeral_ok: bool = False) -> tuple[str, int]:
    """'10.0.0.1:80', '[::1]:80' or (with a default port) a bare host.

    Port 0 (let the kernel pick) only where ``ephemeral_ok``: a listener may,
    a target may not."""
    if not isinstance(text, str) or not text:
        raise ConfigError(f"{where}: expected 'host:port' as a string, got {text!r}")
    if text.startswith("["):  # [v6]:port
        close = text.find("]")
        rest = text[close + 1:] if close > 0 else "?"
        if close < 0 or (rest and not rest.startswith(":")):
            raise ConfigError(f"{where}: malformed address {text!r}")
        host, port_text = text[1:close], rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:  # a bare IPv4 host or a bare IPv6 literal
        host, port_text = text, ""
    if not port_text:
        if default_port is None:
            raise ConfigError(f"{where}: expected 'host:port', got {text!r} (missing port)")
        port = default_port
    else:
        try:
            port = int(port_text)
        except ValueError:
            raise ConfigError(f"{where}: port {port_text!r} in {text!r} is not a number") from None
    if not (0 if ephemeral_ok else 1) <= port < 65536:
        raise ConfigError(f"{where}: port {port} out of range 1-65535")
    if not host:
        raise ConfigError(f"{where}: missing host in {text!r}")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise ConfigError(
                f"{where}: {host!r} is not an IP address (names are not resolved, "
                "so that routing never waits on DNS)") from None
    return host, port


class _Section:
    """A TOML table being validated: typed getters, and unknown keys reported."""

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a table, got {type(data).__name__}")
        self.data = data
        self.where = where
        self.used: set[str] = set()

    def path(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
        self.used.add(key)
        if key not in self.data:
            return default
        value = self.data[key]
        # bool is an int in Python; a 'true' where a number belongs is a typo.
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            raise ConfigError(f"{self.path(key)}: expected {_kind_name(kind)}, got a boolean")
        if not isinstance(value, kind):
            raise ConfigError(f"{self.path(key)}: expected {_kind_name(kind)}, got {value!r}")
        return value

    def number(self, key: str, default: float, *, minimum: float = 0.0, integer: bool = False,
               allow_zero: bool = True) -> Any:
        value = self.get(key, int if integer else (int, float), default)
        if value < minimum or (not allow_zero and value == 0):
            bound = f"> {minimum}" if not allow_zero and minimum == 0 else f">= {minimum}"
            raise ConfigError(f"{self.path(key)}: must be {bound}, got {value!r}")
        return value

    def choice(self, key: str, options: tuple[str, ...], default: str) -> str:
        value = self.get(key, str, default)
        if value not in options:
            raise ConfigError(f"{self.path(key)}: must be one of {', '.join(options)}; got {value!r}")
        return value

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise ConfigError(
                f"{self.where or 'top level'}: unknown key {unknown[0]!r} "
                f"(expected one of: {', '.join(sorted(self.used))})")


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
             list: "a list", dict: "a table"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _access_log(s: _Section) -> str | None:
    value = s.get("access_log", (bool, str), "stderr")
    if value is True:
        return "stderr"
    if value in (False, "off", ""):
        return None
    if value not in ("stderr", "stdout") and not value.startswith("/"):
        raise ConfigError(f'{s.path("access_log")}: "stderr", "stdout", "off" or an absolute file path; '
                          f"got {value!r}")
    return value


def _router(data: Any) -> RouterSettings:
    s = _Section(data, "router")
    listen = parse_address(s.get("listen", str, "127.0.0.1:8080"), s.path("listen"), ephemeral_ok=True)
    metrics_text = s.get("metrics", str)
    settings = RouterSettings(
        listen=listen,
        mode=s.choice("mode", MODES, "nat"),
        fallback=s.choice("fallback", FALLBACKS, "proxy"),
        secret_file=s.get("secret_file", str),
        metrics=parse_address(metrics_text, s.path("metrics"), ephemeral_ok=True) if metrics_text else None,
        drain_timeout=s.number("drain_timeout", 10.0),
        access_log=_access_log(s),
        health_path=s.get("health_path", str, "/_arr/health") or None,
        admin_socket=s.get("admin_socket", str) or None,
    )
    if settings.admin_socket is not None and not settings.admin_socket.startswith("/"):
        raise ConfigError(f"router.admin_socket: must be an absolute path, got {settings.admin_socket!r}")
    if settings.health_path is not None and not settings.health_path.startswith("/"):
        raise ConfigError(f"router.health_path: must start with '/', got {settings.health_path!r}")
    s.finish()
    return settings


def _limits(data: Any) -> Limits:
    s = _Section(data, "limits")
    d = Limits()
    limits = Limits(
        header_bytes=s.number("header_bytes", d.header_bytes, minimum=1024, integer=True),
        header_timeout=s.number("header_timeout", d.header_timeout, allow_zero=False),
        body_buffer=s.number("body_buffer", d.body_buffer, integer=True),
        max_body=s.number("max_body", d.max_body, integer=True),
        body_timeout=s.number("body_timeout", d.body_timeout, allow_zero=False),
        body_deadline=s.number("body_deadline", d.body_deadline, allow_zero=False),
        min_body_rate=s.number("min_body_rate", d.min_body_rate, integer=True),
        body_rate_grace=s.number("body_rate_grace", d.body_rate_grace),
        keepalive_timeout=s.number("keepalive_timeout", d.keepalive_timeout, allow_zero=False),
        max_connections=s.number("max_connections", d.max_connections, minimum=1, integer=True),
        max_requests_per_connection=s.number(
            "max_requests_per_connection", d.max_requests_per_connection, minimum=1, integer=True),
        reserved_fds=s.number("reserved_fds", d.reserved_fds, minimum=16, integer=True),
    )
    s.finish()
    return limits


def _upstream(data: Any) -> Upstream:
    s = _Section(data, "upstream")
    d = Upstream()
    upstream = Upstream(
        connect_timeout=s.number("connect_timeout", d.connect_timeout, allow_zero=False),
        read_timeout=s.number("read_timeout", d.read_timeout, allow_zero=False),
        retries=s.number("retries", d.retries, integer=True),
        keepalive=s.number("keepalive", d.keepalive, integer=True),
        keepalive_timeout=s.number("keepalive_timeout", d.keepalive_timeout, allow_zero=False),
    )
    s.finish()
    return upstream


def _handoff(data: Any) -> HandoffSettings:
    s = _Section(data, "handoff")
    d = HandoffSettings()
    forward_pool = s.number("forward_pool", d.forward_pool, integer=True)
    forward_pool_max = s.number("forward_pool_max", max(d.forward_pool_max, forward_pool), integer=True)
    if forward_pool_max < forward_pool:
        raise ConfigError(f"{s.path('forward_pool_max')}: must be >= handoff.forward_pool ({forward_pool}), "
                          f"got {forward_pool_max!r}")
    settings = HandoffSettings(
        bpf_dir=s.get("bpf_dir", str, d.bpf_dir),
        instance=s.get("instance", str),
        agent_timeout=s.number("agent_timeout", d.agent_timeout, allow_zero=False),
        connect_timeout=s.number("connect_timeout", d.connect_timeout, allow_zero=False),
        request_ack_timeout=s.number("request_ack_timeout", d.request_ack_timeout, allow_zero=False),
        linger=s.number("linger", d.linger, allow_zero=False),
        idle_timeout=s.number("idle_timeout", d.idle_timeout, allow_zero=False),
        capacity=s.number("capacity", d.capacity, minimum=1, integer=True),
        forward_ports=_port_range(s, "forward_ports", d.forward_ports),
        forward_pool=forward_pool,
        forward_pool_max=forward_pool_max,
        takeback_timeout=s.number("takeback_timeout", d.takeback_timeout, allow_zero=False),
        rehandoff_in_place=s.get("rehandoff_in_place", bool, d.rehandoff_in_place),
        rehandoff_hand_on=s.get("rehandoff_hand_on", bool, d.rehandoff_hand_on),
        reuse_forward=s.get("reuse_forward", bool, d.reuse_forward),
        migrate_sticky=s.number("migrate_sticky", d.migrate_sticky, allow_zero=False),
        migrate_wait=s.number("migrate_wait", d.migrate_wait, allow_zero=False),
        move_on_down=s.get("move_on_down", bool, d.move_on_down),
        response_deadline=s.number("response_deadline", d.response_deadline),
        redispatch_body_max=s.number("redispatch_body_max", d.redispatch_body_max, integer=True),
        rto_min=_rto_min(s, "rto_min", d.rto_min),
    )
    s.finish()
    return settings


def _rto_min(s: _Section, key: str, default: float) -> float:
    from handoff.tcpstate import rto_min_problem

    value = s.number(key, default)
    problem = rto_min_problem(value)
    if problem is not None:
        raise ConfigError(f"{s.path(key)}: {problem}")
    return value


def _port_range(s: _Section, key: str, default: tuple[int, int]) -> tuple[int, int]:
    from handoff.ports import PortRange

    text = s.get(key, str)
    if text is None:
        return default
    try:
        ports = PortRange.parse(text)
    except ValueError as exc:
        raise ConfigError(f"{s.path(key)}: {exc}") from None
    if len(ports) < 16:
        raise ConfigError(f"{s.path(key)}: {len(ports)} ports is too few for forwarding connections")
    return ports.low, ports.high


def _weight(s: _Section) -> int:
    weight = s.number("weight", 1, integer=True)
    if weight < 1:
        raise ConfigError(f"{s.path('weight')}: must be >= 1, got {weight} (a target that should take no "
                          "traffic is left out, or drained at run time: arr drain / arr weight)")
    return weight


def _target(data: Any, where: str) -> Target:
    s = _Section(data, where)
    address = s.get("address", str)
    if address is None:
        raise ConfigError(f"{where}.address: required (the target's HTTP 'ip:port')")
    host, port = parse_address(address, s.path("address"))
    agent_text = s.get("agent", str)
    target = Target(
        host=host, port=port,
        weight=_weight(s),
        agent=parse_address(agent_text, s.path("agent")) if agent_text else None,
        name=s.get("name", str, ""),
    )
    s.finish()
    return target


def _health(data: Any, where: str) -> HealthRule:
    s = _Section(data, where)
    d = HealthRule()
    path = s.get("path", str, d.path)
    if not path.startswith("/"):
        raise ConfigError(f"{where}.path: must start with '/', got {path!r}")
    status = s.get("expect_status", list, list(d.expect_status))
    if (len(status) != 2 or not all(isinstance(x, int) for x in status)
            or not 100 <= status[0] <= status[1] <= 599):
        raise ConfigError(f"{where}.expect_status: expected [low, high] within 100-599, got {status!r}")
    rule = HealthRule(
        path=path,
        interval=s.number("interval", d.interval, allow_zero=False),
        timeout=s.number("timeout", d.timeout, allow_zero=False),
        rise=s.number("rise", d.rise, minimum=1, integer=True),
        fall=s.number("fall", d.fall, minimum=1, integer=True),
        expect_status=(status[0], status[1]),
    )
    s.finish()
    return rule


def _policy(data: Any, where: str) -> tuple[str, dict[str, Any]]:
    from arr.policies import make_balancer

    if isinstance(data, str):
        data = {"kind": data}
    s = _Section(data, where)
    kind = s.get("kind", str, "round-robin")
    options = {k: v for k, v in data.items() if k != "kind"}
    try:
        make_balancer(kind, dict(options))  # validate now, build per pool later
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return kind, options


def _pool(name: str, data: Any, where: str) -> PoolSettings:
    s = _Section(data, where)
    targets_data = s.get("targets", list, [])
    targets = tuple(_target(t, f"{s.path('targets')}[{i}]") for i, t in enumerate(targets_data))
    if not targets:
        raise ConfigError(f"{s.path('targets')}: a pool needs at least one target")
    names = [t.name for t in targets]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise ConfigError(f"{s.path('targets')}: target {duplicate!r} is listed twice")
    kind, options = _policy(s.get("policy", (dict, str), {"kind": "round-robin"}), s.path("policy"))
    health_data = s.get("health", dict)
    pool = PoolSettings(
        name=name, targets=targets, policy=kind, policy_options=options,
        health=_health(health_data, s.path("health")) if health_data is not None else None,
    )
    s.finish()
    return pool


def _match_pair(value: Any, where: str) -> tuple[str, str | None]:
    s = _Section(value, where)
    name = s.get("name", str)
    if not name:
        raise ConfigError(f"{where}.name: required")
    pair = (name, s.get("value", str))
    _check_regex(pair[1], where, where.rsplit(".", 1)[-1])
    s.finish()
    return pair


def _rule(data: Any, where: str, pools: set[str]) -> RuleSettings:
    s = _Section(data, where)
    pool = s.get("pool", str)
    reject = s.get("reject", int)
    if pool is not None and reject is not None:
        raise ConfigError(f"{where}: both 'pool' and 'reject' given (a rule either selects a pool or refuses)")
    if reject is not None and not 400 <= reject <= 599:
        raise ConfigError(f"{where}.reject: must be a 4xx or 5xx status, got {reject}")
    if pool is None and reject is None:
        raise ConfigError(f"{where}.pool: required (the pool this rule selects), or 'reject' (a status)")
    if pool is not None and pool not in pools:
        raise ConfigError(f"{where}.pool: no pool named {pool!r} (have: {', '.join(sorted(pools))})")
    header, cookie = s.get("header", dict), s.get("cookie", dict)
    _check_regex(s.get("path_regex", str), s.path("path_regex"), "path_regex")
    rule = RuleSettings(
        pool=pool or "",
        reject=reject,
        host=s.get("host", str),
        path_prefix=s.get("path_prefix", str),
        path_regex=s.get("path_regex", str),
        method=s.get("method", str),
        header=_match_pair(header, f"{where}.header") if header is not None else None,
        cookie=_match_pair(cookie, f"{where}.cookie") if cookie is not None else None,
        response_deadline=s.number("response_deadline", -1.0) if "response_deadline" in s.data else None,
    )
    s.finish()
    return rule


def _check_regex(pattern: str | None, where: str, what: str) -> None:
    if pattern is None:
        return
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"{where}: invalid {what} regex {pattern!r}: {exc}") from None


def _local(data: Any, where: str, base: Path) -> LocalRoute:
    s = _Section(data, where)
    path = s.get("path", str)
    if not path or not path.startswith("/"):
        raise ConfigError(f"{where}.path: required, and must start with '/'")
    body_text, file_name = s.get("body", str), s.get("file", str)
    if (body_text is None) == (file_name is None):
        raise ConfigError(f"{where}: give exactly one of 'body' or 'file'")
    if file_name is not None:
        file_path = (base / file_name) if not Path(file_name).is_absolute() else Path(file_name)
        try:
            body = file_path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"{where}.file: cannot read {str(file_path)!r}: {exc.strerror}") from None
    else:
        body = body_text.encode()
    status = s.number("status", 200, minimum=200, integer=True)
    if status > 599:
        raise ConfigError(f"{where}.status: must be 200-599, got {status}")
    route = LocalRoute(path=path, body=body, status=status,
                       content_type=s.get("content_type", str, "text/plain; charset=utf-8"))
    s.finish()
    return route


def config_from_dict(data: Mapping[str, Any], base: Path = Path(".")) -> Config:
    top = _Section(dict(data), "")
    router = _router(top.get("router", dict, {}))
    limits = _limits(top.get("limits", dict, {}))
    upstream = _upstream(top.get("upstream", dict, {}))

    pools: list[PoolSettings] = []
    flat_targets = top.get("targets", list)
    flat_policy = top.get("policy", (dict, str))
    flat_health = top.get("health", dict)
    if flat_targets is not None:
        flat = {"targets": flat_targets}
        if flat_policy is not None:
            flat["policy"] = flat_policy
        if flat_health is not None:
            flat["health"] = flat_health
        pools.append(_pool("default", flat, ""))
    elif flat_policy is not None or flat_health is not None:
        raise ConfigError("policy: a top-level [policy] or [health] needs top-level [[targets]] "
                          "(with [pools.NAME], put policy and health inside each pool)")
    for name, pool_data in top.get("pools", dict, {}).items():
        if name == "default" and flat_targets is not None:
            raise ConfigError("pools.default: clashes with the pool formed by top-level [[targets]]")
        pools.append(_pool(name, pool_data, f"pools.{name}"))

    pool_names = {p.name for p in pools}
    rules = tuple(_rule(r, f"rules[{i}]", pool_names)
                  for i, r in enumerate(top.get("rules", list, [])))
    default_pool = top.get("default_pool", str)
    if default_pool is not None and default_pool not in pool_names:
        raise ConfigError(f"default_pool: no pool named {default_pool!r} "
                          f"(have: {', '.join(sorted(pool_names))})")
    if default_pool is None and len(pools) == 1:
        default_pool = pools[0].name
    elif default_pool is None and "default" in pool_names:
        default_pool = "default"
    local = tuple(_local(r, f"local[{i}]", base) for i, r in enumerate(top.get("local", list, [])))
    handoff = _handoff(top.get("handoff", dict, {}))
    top.finish()

    if router.mode == "nat" and pools and router.secret_file is None:
        raise ConfigError("router.secret_file: required in nat mode (the control channel's "
                          "pre-shared key; the agents read the same file)")
    if router.mode == "nat":
        for pool in pools:
            for target in pool.targets:
                if target.agent is None:
                    raise ConfigError(
                        f"{_target_where(pool.name, flat_targets is not None)}: target {target.name} has no "
                        "'agent' but mode is nat (a handoff needs the target's arr agent: add "
                        "agent = \"host:port\", or use mode = \"proxy\")")
    _check_unconditional_rules(rules)
    config = Config(router=router, limits=limits, upstream=upstream, pools=tuple(pools),
                    rules=rules, default_pool=default_pool, local=local, handoff=handoff)
    _validate_rules(config)
    return config


def _target_where(pool: str, flat: bool) -> str:
    return "targets" if flat and pool == "default" else f"pools.{pool}.targets"


def _check_unconditional_rules(rules: tuple[RuleSettings, ...]) -> None:
    """A rule without any condition matches every request: rules after it
    could never match, which is never what the author meant."""
    for index, rule in enumerate(rules[:-1]):
        if not any((rule.host, rule.path_prefix, rule.path_regex, rule.method, rule.header, rule.cookie)):
            raise ConfigError(
                f"rules[{index}]: has no condition, so it matches every request and rules[{index + 1}] and "
                "after can never match (put it last, use default_pool, or add a condition)")


def router_secret(config: Config) -> bytes:
    """The control channel's key, read from ``router.secret_file`` (a
    ConfigError naming the field when it cannot be used)."""
    from handoff.control import load_psk

    if config.router.secret_file is None:
        raise ConfigError("router.secret_file: required in nat mode")
    try:
        return load_psk(config.router.secret_file)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"router.secret_file: {exc}") from None


def check_files(config: Config) -> None:
    """What ``arr check-config`` adds to parsing: the files the config names
    exist and are usable (the key file is read as the router would)."""
    if config.router.mode == "nat" and config.router.secret_file:
        router_secret(config)
    if config.router.access_log not in (None, "stderr", "stdout"):
        directory = Path(config.router.access_log).parent
        if not directory.is_dir():
            raise ConfigError(f"router.access_log: directory {str(directory)!r} does not exist")


def _validate_rules(config: Config) -> None:
    """Compile the routing once so a bad regex is a config error, not a 500."""
    from arr.routing import build_routing

    try:
        build_routing(config)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def load_config(path: str | Path) -> Config:
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(path)!r}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid UTF-8 (byte {exc.start}); TOML files are UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    if not data:
        raise ConfigError(f"{path}: the file is empty (at least [[targets]] or [pools.NAME] is needed)")
    config = config_from_dict(data, base=path.parent)
    router = data.get("router")
    if not (isinstance(router, dict) and "admin_socket" in router):
        # An operator's router (a file) gets the admin interface unless it says
        # otherwise; a router built in code (a library, a test) only if asked.
        config = replace(config, router=replace(config.router, admin_socket=DEFAULT_ADMIN_SOCKET))
    return config
