"""The ``Proxy`` decision: relay one request to a target, stream the response back.

Bodies stream in both directions with backpressure (``drain`` on every write);
nothing holds a whole body. Connect failures are retried on another member of
the pool before any byte is sent; later failures become 502/504 if the client
has not yet seen a status line, or an aborted connection if it has.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import h11

from arr.health import LOCAL_EXHAUSTION
from arr.http1 import HttpError, add_forwarding, end_to_end
from arr.session import READ_SIZE, ClientGone

if TYPE_CHECKING:
    from arr.config import Upstream
    from arr.health import HealthMonitor
    from arr.metrics import Metrics
    from arr.pool import Pool, TargetState
    from arr.request import Request
    from arr.session import ClientSession, RequestBody


class UpstreamFailed(Exception):
    """The target failed after the client saw a status line: abort the client."""


class _StaleConnection(Exception):
    """A kept-alive upstream connection turned out closed before any response
    byte: the target closed it while idle. The request may be sent again."""


@dataclass
class UpstreamConnection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    http: h11.Connection
    reused: bool = False
    idle_since: float = 0.0

    def close(self) -> None:
        self.writer.close()


class IdleConnections:
    """Kept-alive upstream connections, per target, most recently used first.

    Idle ones expire before a server's keep-alive timeout would close them
    (nginx: 75 s), which keeps the stale-connection race rare; the relay
    retries a request that hit one anyway when it can be sent again.
    """

    def __init__(self, max_per_target: int, idle_timeout: float) -> None:
        self.max_per_target = max_per_target
        self.idle_timeout = idle_timeout
        self._idle: dict[tuple[str, int], list[UpstreamConnection]] = {}

    def take(self, address: tuple[str, int]) -> UpstreamConnection | None:
        stack = self._idle.get(address)
        now = time.monotonic()
        while stack:
            conn = stack.pop()
            if (now - conn.idle_since < self.idle_timeout and not conn.writer.is_closing()
                    and not conn.reader.at_eof() and not conn.reader._buffer):  # noqa: SLF001
                conn.reused = True
                return conn
            conn.close()
        return None

    def give(self, address: tuple[str, int], conn: UpstreamConnection) -> None:
        stack = self._idle.setdefault(address, [])
        if len(stack) >= self.max_per_target:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        stack.append(conn)

    def close_all(self) -> None:
        for stack in self._idle.values():
            for conn in stack:
                conn.close()
        self._idle.clear()


@dataclass
class RelayResult:
    status: int
    target: "TargetState"
    response_bytes: int


class Relay:
    def __init__(self, upstream: "Upstream", metrics: "Metrics", health: "HealthMonitor") -> None:
        self.settings = upstream
        self.metrics = metrics
        self.health = health
        self.idle = IdleConnections(upstream.keepalive, upstream.keepalive_timeout)

    def reconfigure(self, upstream: "Upstream", health: "HealthMonitor") -> None:
        """A reload: new upstream settings and health monitor for requests
        from now on; idle connections stay (their targets may remain)."""
        self.settings, self.health = upstream, health
        self.idle.max_per_target, self.idle.idle_timeout = upstream.keepalive, upstream.keepalive_timeout

    async def _connect(self, request: "Request", target: "TargetState", pool: "Pool | None"
                       ) -> tuple["TargetState", UpstreamConnection]:
        tried: list["TargetState"] = []
        while True:
            started = time.perf_counter()
            try:
                async with asyncio.timeout(self.settings.connect_timeout):
                    reader, writer = await asyncio.open_connection(*target.target.address)
                self.metrics.upstream_connect.labels(target.name).observe(time.perf_counter() - started)
                return target, UpstreamConnection(reader, writer, h11.Connection(h11.CLIENT))
            except (OSError, TimeoutError) as exc:
                if isinstance(exc, OSError) and exc.errno in LOCAL_EXHAUSTION:
                    # The router's own shortage (arr/fdlimit.py) says nothing about the target.
                    self.metrics.upstream_errors.labels(target.name, "no-fd").inc()
                    raise HttpError(503, "no-fd", "router out of file descriptors") from None
                timed_out = isinstance(exc, TimeoutError)
                self.metrics.upstream_errors.labels(target.name, "connect-timeout" if timed_out
                                                    else "connect").inc()
                self.health.passive_failure(target, pool)
                tried.append(target)
                retry = pool.pick(request, exclude=tried) if pool and len(tried) <= self.settings.retries else None
                if retry is not None:
                    self.metrics.upstream_retries.labels(target.name).inc()
                if retry is None:
                    if timed_out:
                        raise HttpError(504, "upstream-connect-timeout", f"{target.name}: connect timed out") from None
                    raise HttpError(502, "upstream-connect", f"{target.name}: {exc}") from None
                target = retry

    async def relay(self, session: "ClientSession", request: "Request", head: h11.Request,
                    body: "RequestBody", target: "TargetState", pool: "Pool | None") -> RelayResult:
        conn = self.idle.take(target.target.address)
        if conn is None:
            target, conn = await self._connect(request, target, pool)
        target.active += 1
        try:
            try:
                result = await self._exchange(session, request, head, body, target, conn)
            except _StaleConnection:
                conn.close()
                self.metrics.upstream_errors.labels(target.name, "stale-keepalive").inc()
                target, conn = await self._connect(request, target, pool)
                result = await self._exchange(session, request, head, body, target, conn)
        except BaseException:
            conn.close()
            raise
        finally:
            target.active -= 1
        if conn.http.our_state is h11.DONE and conn.http.their_state is h11.DONE:
            conn.http.start_next_cycle()
            self.idle.give(target.target.address, conn)
        else:
            conn.close()
        return result

    async def _exchange(self, session: "ClientSession", request: "Request", head: h11.Request,
                        body: "RequestBody", target: "TargetState", conn: UpstreamConnection
                        ) -> RelayResult:
        upstream, reader, writer = conn.http, conn.reader, conn.writer
        # Only a request whose body is fully buffered can be sent again if a
        # kept-alive connection turns out stale.
        resendable = conn.reused and request.body is not None
        headers = end_to_end(head.headers, drop=(b"content-length", b"expect"))
        headers = add_forwarding(headers, request.client_ip, host=_first(head.headers, b"host"))
        if request.body is not None:
            # A body framed by the client (even an empty one: PUT with
            # Content-Length: 0) stays framed; a GET without one stays without.
            if request.body or body.declared_length is not None or body.chunked:
                headers.append((b"content-length", str(len(request.body)).encode()))
        elif body.chunked:
            headers.append((b"transfer-encoding", b"chunked"))
        else:
            headers.append((b"content-length", str(body.declared_length).encode()))

        async def send(data: bytes) -> None:
            writer.write(data)
            await writer.drain()

        try:
            request_head = upstream.send(h11.Request(method=head.method, target=head.target,
                                                     headers=headers)) or b""
            if request.body is not None:  # buffered: the whole request in one write
                body_bytes = upstream.send(h11.Data(data=request.body)) if request.body else b""
                await send(request_head + (body_bytes or b"") + (upstream.send(h11.EndOfMessage()) or b""))
            else:
                await send(request_head)
                async for chunk in body.chunks():
                    self.metrics.proxied_bytes.labels("request").inc(len(chunk))
                    await send(upstream.send(h11.Data(data=chunk)))
                await send(upstream.send(h11.EndOfMessage()) or b"")
        except (ConnectionError, OSError) as exc:
            if resendable:
                raise _StaleConnection() from None
            self.metrics.upstream_errors.labels(target.name, "send").inc()
            raise HttpError(502, "upstream-send", f"{target.name}: {exc}") from None

        return await self._relay_response(session, request, upstream, reader, target, resendable,
                                          sent_at=time.perf_counter())

    async def _relay_response(self, session: "ClientSession", request: "Request",
                              upstream: h11.Connection, reader: asyncio.StreamReader,
                              target: "TargetState", resendable: bool = False,
                              sent_at: float | None = None) -> RelayResult:
        status = 0
        sent = 0
        head_only = request.method == "HEAD"
        pending: list[bytes] = []
        """Client-bound bytes of the events taken from one upstream read: one write."""
        while True:
            try:
                event = upstream.next_event()
            except h11.RemoteProtocolError as exc:
                if resendable and not status and not upstream.trailing_data[0]:
                    raise _StaleConnection() from None  # closed while idle: nothing was answered
                self.metrics.upstream_errors.labels(target.name, "protocol").inc()
                if not status:
                    raise HttpError(502, "upstream-protocol", f"{target.name}: {exc}") from None
                raise UpstreamFailed(f"{target.name}: {exc}") from None
            if event is h11.NEED_DATA:
                if pending:
                    await session.send_raw(b"".join(pending))
                    pending.clear()
                try:
                    async with asyncio.timeout(self.settings.read_timeout):
                        data = await reader.read(READ_SIZE)
                except TimeoutError:
                    self.metrics.upstream_errors.labels(target.name, "read-timeout").inc()
                    if not status:
                        raise HttpError(504, "upstream-timeout", f"{target.name}: no response") from None
                    raise UpstreamFailed(f"{target.name}: response stalled") from None
                except (ConnectionError, OSError) as exc:
                    data = b""  # h11 turns a premature EOF into a protocol error above
                    if resendable and not status:
                        raise _StaleConnection() from None
                    self.metrics.upstream_errors.labels(target.name, "read").inc()
                    if not status:
                        raise HttpError(502, "upstream-read", f"{target.name}: {exc}") from None
                upstream.receive_data(data)
                continue
            if event is h11.PAUSED:  # the target switched protocols: nothing arr relays
                self.metrics.upstream_errors.labels(target.name, "protocol").inc()
                if not status:
                    raise HttpError(502, "upstream-protocol", f"{target.name}: switched protocols")
                raise UpstreamFailed(f"{target.name}: switched protocols")
            if isinstance(event, h11.InformationalResponse):
                continue  # 100-continue was answered to the client by the router itself
            if isinstance(event, h11.Response):
                status = event.status_code
                if sent_at is not None:
                    self.metrics.upstream_response.labels(target.name).observe(time.perf_counter() - sent_at)
                pending.append(session.head_bytes(status, end_to_end(event.headers), event.reason))
            elif isinstance(event, h11.Data):
                if not head_only:
                    pending.append(session.data_bytes(bytes(event.data)))
                    sent += len(event.data)
            elif isinstance(event, h11.EndOfMessage):
                pending.append(session.end_bytes())
                await session.send_raw(b"".join(pending))
                self.metrics.proxied_bytes.labels("response").inc(sent)
                return RelayResult(status, target, sent)
            elif isinstance(event, h11.ConnectionClosed):
                raise UpstreamFailed(f"{target.name}: closed before the response ended")


def _first(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    return next((v for n, v in headers if n == name), None)


__all__ = ["Relay", "RelayResult", "UpstreamFailed", "ClientGone"]
