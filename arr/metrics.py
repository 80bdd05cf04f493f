"""Prometheus metrics of one router, on a registry of its own.

A registry per router (not the process-global default) lets a program embed
several routers, and tests read exact values without cross-talk.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, PlatformCollector,
                               ProcessCollector)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

log = logging.getLogger("arr.metrics")

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Children:
    """A labelled metric's children by their label values, each looked up
    once: prometheus_client's ``labels()`` checks the values and takes a lock
    on every call (about 2 µs, against 1 µs for the count itself)."""

    __slots__ = ("metric", "_children")

    def __init__(self, metric: Any) -> None:
        self.metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self.metric.labels(*values)
        return child


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "arr_requests", "Requests answered, by decision executed, status and target.",
            ("decision", "status", "target"), registry=r)
        self.latency = Histogram(
            "arr_request_duration_seconds",
            "From the end of the request head to the end of the response, by decision.",
            ("decision",), buckets=LATENCY_BUCKETS, registry=r)
        self.active_connections = Gauge(
            "arr_active_connections", "Client connections open on the router.", registry=r)
        self.connections = Counter(
            "arr_connections", "Client connections accepted.", registry=r)
        self.refused_connections = Counter(
            "arr_refused_connections",
            "Client connections answered 503 and closed because the router was full: at its "
            "effective max_connections (arr_max_connections), or out of file descriptors "
            "(arr_accept_errors).", registry=r)
        self.max_connections = Gauge(
            "arr_max_connections", "Client connections admitted at once: limits.max_connections, "
            "lowered to fit the file-descriptor limit (arr/fdlimit.py).", registry=r)
        self.accept_errors = Counter(
            "arr_accept_errors", "accept() failures on the listening socket, by reason (emfile, "
            "enfile: out of file descriptors, the connection is answered 503 with a spare fd; "
            "enobufs, enomem, others: accepting pauses briefly, clients wait in the backlog).",
            ("reason",), registry=r)
        self.client_errors = Counter(
            "arr_client_errors", "Requests rejected before any decision, by reason.",
            ("reason", "status"), registry=r)
        self.fallbacks = Counter(
            "arr_handoff_fallbacks", "Handoff decisions executed otherwise, by reason.",
            ("reason",), registry=r)
        self.target_up = Gauge(
            "arr_target_up", "1 if the target takes traffic (healthy, not draining).",
            ("pool", "target"), registry=r)
        self.health_checks = Counter(
            "arr_health_checks", "Active health checks, by result (ok, fail; no-fd: not made, the "
            "router had no file descriptor for it, the target keeps its state).",
            ("pool", "target", "result"), registry=r)
        self.upstream_errors = Counter(
            "arr_upstream_errors", "Failures talking to targets, by kind.",
            ("target", "kind"), registry=r)
        self.handoffs = Counter(
            "arr_handoffs", "Handoff attempts by result (ok, or fallback: see arr_handoff_fallbacks).",
            ("result",), registry=r)
        self.handoff_duration = Histogram(
            "arr_handoff_duration_seconds",
            "From the decision to the point of no return (client socket released).",
            buckets=(0.0001, 0.0002, 0.0003, 0.0004, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003,
                     0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
            registry=r)
        self.handed_off = Gauge(
            "arr_handed_off_connections", "Connections handed off and not yet over (map entries).",
            registry=r)
        self.handoff_closed = Counter(
            "arr_handoff_closed", "Handed-off connections forgotten, by why (closed, idle).",
            ("why",), registry=r)
        self.forward_pool_ready = Gauge(
            "arr_forward_pool_ready",
            "Forwarding connections established ahead of need, waiting for a handoff.", registry=r)
        self.forward_pool_depth = Gauge(
            "arr_forward_pool_depth",
            "Forwarding connections the pool's shelves keep ready, all shelves: each starts at "
            "handoff.forward_pool, grows by its misses up to handoff.forward_pool_max and shrinks by its "
            "connections aged out unused, down to one.", registry=r)
        self.forward_pool = Counter(
            "arr_forward_pool", "Forwarding connections asked of the pool, by result "
            "(hit: ready; miss: connected inline; stale: closed unused, aged or closed by the target).",
            ("result",), registry=r)
        self.forward_closes = Counter(
            "arr_forward_closes", "Forwarding connections the router closed with a FIN (taken back, then "
            "routed elsewhere; or pool connections aged out), by how the router's TIME_WAIT socket ended "
            "(handoff/forward_close.py: proven, destroyed, gone, quarantined, unknown).",
            ("result",), registry=r)
        self.forward_connect_races = Counter(
            "arr_forward_connect_races", "Forwarding connections opened on a request's path (the pool had "
            "none ready) whose handshake was not over after 100 ms, so that a second attempt raced it "
            "(a SYN or SYN-ACK lost: Linux resends it after 1 s).", registry=r)
        self.takebacks = Counter(
            "arr_takebacks", "Handed-off connections taken back on a new request, by result "
            "(ok, or why not: the connection then ends).", ("result",), registry=r)
        self.takeback_duration = Histogram(
            "arr_takeback_duration_seconds",
            "From the client's new request at the router's BPF to the rebuilt socket's session.",
            buckets=(0.0002, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1, 5),
            registry=r)
        self.router_takebacks = Counter(
            "arr_router_takebacks", "Handed-off connections the router took back on its own initiative "
            "(a migration, a drain, a response deadline), by result (ok, or why not).",
            ("result",), registry=r)
        self.migrations = Counter(
            "arr_migrations", "Connections a migration (arr migrate, a drain, a target found down) selected, "
            "by mode and outcome (moved, reset, skipped-<why>).", ("mode", "outcome"), registry=r)
        self.redispatches = Counter(
            "arr_redispatches", "Handed-off requests under a response deadline, by result (watched: "
            "the timer started; answered: the target answered in time; redispatched: sent to another "
            "target; not-repeatable: no timer, the request is not safe to repeat; takeback-failed).",
            ("result",), registry=r)
        self.steered = Counter(
            "arr_migration_steered", "Requests sent to a migration's destination by its override "
            "instead of the policy's choice.", registry=r)
        self.takeback_waits = Counter(
            "arr_takeback_waits", "Take-backs that waited for the client to acknowledge a response.",
            registry=r)
        self.rehandoffs = Counter(
            "arr_rehandoffs", "Handoffs of taken-back connections, by where "
            "(same-target: its forwarding connection reused; other-target: that one closed; "
            "in-place: the same connection, not taken back, handoff/inplace.py; "
            "handed-on: to another target from the captured request, no client socket rebuilt).",
            ("target",), registry=r)
        self.inplace = Counter(
            "arr_inplace_reroutes", "Requests of handed-off connections sent to the same target in place, by "
            "result (ok, or why the connection was taken back instead: other-target, agent-<reason>, ...).",
            ("result",), registry=r)
        self.handons = Counter(
            "arr_handons", "Requests of handed-off connections handed on to another target from their "
            "captures, by result (ok, or the handoff's fallback reason: the connection was then taken "
            "back and the request decided on the rebuilt socket).", ("result",), registry=r)
        self.inplace_waits = Counter(
            "arr_inplace_waits", "Re-handoffs in place asked again because the server had not yet "
            "acknowledged all of the previous request rerouted in place (handoff/inplace.py).", registry=r)
        self.inplace_resends = Counter(
            "arr_inplace_resends", "Rewritten requests sent again because their client resent the original "
            "(the server had not acknowledged it yet).", registry=r)
        self.forward_resends = Counter(
            "arr_forward_resends", "Handed-off requests the router sent again itself, as crafted segments, "
            "because the target had not acknowledged them after twice handoff.rto_min (handoff/release.py).",
            registry=r)
        self.proxied_bytes = Counter(
            "arr_proxied_bytes", "Body bytes relayed by the router, by direction.",
            ("direction",), registry=r)

        # What HAProxy's and Envoy's exporters have besides the above.
        self.pool_requests = Counter(
            "arr_pool_requests", "Requests decided for a pool's target, by pool and decision executed.",
            ("pool", "decision"), registry=r)
        self.upstream_connect = Histogram(
            "arr_upstream_connect_seconds", "Time to connect to a target (proxied requests).",
            ("target",), buckets=LATENCY_BUCKETS, registry=r)
        self.upstream_response = Histogram(
            "arr_upstream_response_seconds", "Time from the request sent to the response head "
            "received (proxied requests).", ("target",), buckets=LATENCY_BUCKETS, registry=r)
        self.upstream_retries = Counter(
            "arr_upstream_retries", "Requests sent to another target after a connect failure, by the "
            "target that failed.", ("target",), registry=r)
        self.health_transitions = Counter(
            "arr_health_transitions", "Targets going up or down (health checks, passive detection).",
            ("pool", "target", "to"), registry=r)
        self.handed_off_bytes = Counter(
            "arr_handed_off_bytes", "Bytes of ended handed-off connections, as their agents reported "
            "them: direction=client (sent by clients, through the router's ingress), "
            "direction=target (served by targets directly, never through the router).",
            ("direction",), registry=r)
        self.handed_off_packets = Counter(
            "arr_handed_off_packets", "Packets of ended handed-off connections (as arr_handed_off_bytes).",
            ("direction",), registry=r)
        self.map_capacity = Gauge(
            "arr_map_capacity", "Entries the connection maps hold (handoff.capacity): "
            "arr_handed_off_connections / arr_map_capacity is their fill.", registry=r)
        self.build_info = Gauge(
            "arr_build_info", "Always 1; the labels say what runs.", ("version", "python", "fastpath"),
            registry=r)
        # The children the per-request and per-connection paths count on,
        # each looked up once (Children).
        self.requests_of = Children(self.requests)
        self.pool_requests_of = Children(self.pool_requests)
        self.latency_of = Children(self.latency)
        self.handoff_closed_of = Children(self.handoff_closed)
        self.handed_off_bytes_of = Children(self.handed_off_bytes)
        self.handed_off_packets_of = Children(self.handed_off_packets)
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self._target_collector = _TargetCollector()
        r.register(self._target_collector)

    def watch_targets(self, pools: Any) -> None:
        """Export per-target in-flight and handed-off counts from POOLS (a
        callable returning the router's pools; read at scrape time)."""
        self._target_collector.pools = pools

    def publish_target(self, pool: Any, member: Any) -> None:
        """``arr_target_up`` of MEMBER in POOL as it stands now (health, drain, weight)."""
        self.target_up.labels(pool.name, member.name).set(1 if member.available else 0)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """A sample's current value (0 when absent); for tests and `arr demo`."""
        found = self.registry.get_sample_value(name, labels or {})
        return found if found is not None else 0.0


class _TargetCollector:
    """``arr_target_in_flight`` and ``arr_target_handed_off`` per pool and
    target, read from the live pools when scraped (a reload swaps them)."""

    def __init__(self) -> None:
        self.pools: Any = dict
        """A callable returning the router's pools (``Metrics.watch_targets``)."""

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Any:
        in_flight = GaugeMetricFamily("arr_target_in_flight", "Requests in flight to a target through "
                                      "the router (proxied, or being handed off).", labels=["pool", "target"])
        handed_off = GaugeMetricFamily("arr_target_handed_off", "Connections handed off to a target and "
                                       "not yet over.", labels=["pool", "target"])
        for pool in self.pools().values():
            for member in pool.members:
                in_flight.add_metric([pool.name, member.name], member.active)
                handed_off.add_metric([pool.name, member.name], member.handed_off)
        yield in_flight
        yield handed_off


def route_metrics_request(head: bytes) -> tuple[bytes, bytes] | None:
    """The status and body for a request head that is not a scrape (None: it is).
    Only ``GET /metrics`` (with any query) is answered with the exposition."""
    line = head.split(b"\r\n", 1)[0].split(b" ")
    if len(line) != 3 or line[0] not in (b"GET", b"HEAD"):
        return b"405 Method Not Allowed", b"only GET /metrics\n"
    if line[1].split(b"?", 1)[0] != b"/metrics":
        return b"404 Not Found", b"only /metrics is served here\n"
    return None


async def serve_metrics(metrics: "Metrics | Any", host: str, port: int) -> asyncio.AbstractServer:
    """A minimal HTTP endpoint for scrapers: ``GET /metrics`` answers the
    exposition (of anything with an ``exposition() -> bytes`` method)."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            refused = route_metrics_request(head)
            ok = refused is None
            status, body = (b"200 OK", metrics.exposition()) if refused is None else refused
            content_type = CONTENT_TYPE_LATEST.encode() if ok else b"text/plain"
            writer.write(b"HTTP/1.1 " + status + b"\r\ncontent-type: " + content_type
                         + b"\r\ncontent-length: " + str(len(body)).encode()
                         + b"\r\nconnection: close\r\n\r\n" + body)
            await writer.drain()
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(answer, host, port)
    log.info("metrics on http://%s:%d/metrics", host, port)
    return server
