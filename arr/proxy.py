"""The ``Proxy`` decision: relay one request to a target, stream the response back.

Bodies stream in both directions with backpressure (``drain`` on every write);
nothing holds a whole body. Connect failures are retried on another member of
the pool before any byte is sent; later failures become 502/504 if the client
has not yet seen a status line, or an aborted connection if it has.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

import h11

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

    async def _connect(self, request: "Request", target: "TargetState", pool: "Pool | None"
                       ) -> tuple["TargetState", asyncio.StreamReader, asyncio.StreamWriter]:
        tried: list["TargetState"] = []
        while True:
            try:
                async with asyncio.timeout(self.settings.connect_timeout):
                    reader, writer = await asyncio.open_connection(*target.target.address)
                return target, reader, writer
            except (OSError, TimeoutError) as exc:
                timed_out = isinstance(exc, TimeoutError)
                self.metrics.upstream_errors.labels(target.name, "connect-timeout" if timed_out
                                                    else "connect").inc()
                self.health.passive_failure(target, pool)
                tried.append(target)
                retry = pool.pick(request, exclude=tried) if pool and len(tried) <= self.settings.retries else None
                if retry is None:
                    if timed_out:
                        raise HttpError(504, "upstream-connect-timeout", f"{target.name}: connect timed out") from None
                    raise HttpError(502, "upstream-connect", f"{target.name}: {exc}") from None
                target = retry

    async def relay(self, session: "ClientSession", request: "Request", head: h11.Request,
                    body: "RequestBody", target: "TargetState", pool: "Pool | None") -> RelayResult:
        target, reader, writer = await self._connect(request, target, pool)
        target.active += 1
        try:
            return await self._exchange(session, request, head, body, target, reader, writer)
        finally:
            target.active -= 1
            writer.close()

    async def _exchange(self, session: "ClientSession", request: "Request", head: h11.Request,
                        body: "RequestBody", target: "TargetState",
                        reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> RelayResult:
        upstream = h11.Connection(h11.CLIENT)
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
        # The relay opens one upstream connection per request; say so, so the
        # target frees it at once instead of waiting for its keep-alive timeout.
        headers.append((b"connection", b"close"))

        async def send(data: bytes) -> None:
            writer.write(data)
            await writer.drain()

        try:
            await send(upstream.send(h11.Request(method=head.method, target=head.target,
                                                 headers=headers)))
            if request.body is not None:
                if request.body:
                    await send(upstream.send(h11.Data(data=request.body)))
            else:
                async for chunk in body.chunks():
                    self.metrics.proxied_bytes.labels("request").inc(len(chunk))
                    await send(upstream.send(h11.Data(data=chunk)))
            await send(upstream.send(h11.EndOfMessage()))
        except (ConnectionError, OSError) as exc:
            self.metrics.upstream_errors.labels(target.name, "send").inc()
            raise HttpError(502, "upstream-send", f"{target.name}: {exc}") from None

        return await self._relay_response(session, request, upstream, reader, target)

    async def _relay_response(self, session: "ClientSession", request: "Request",
                              upstream: h11.Connection, reader: asyncio.StreamReader,
                              target: "TargetState") -> RelayResult:
        status = 0
        sent = 0
        head_only = request.method == "HEAD"
        while True:
            try:
                event = upstream.next_event()
            except h11.RemoteProtocolError as exc:
                self.metrics.upstream_errors.labels(target.name, "protocol").inc()
                if not status:
                    raise HttpError(502, "upstream-protocol", f"{target.name}: {exc}") from None
                raise UpstreamFailed(f"{target.name}: {exc}") from None
            if event is h11.NEED_DATA:
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
                await session.send_head(status, end_to_end(event.headers), event.reason)
            elif isinstance(event, h11.Data):
                if not head_only:
                    await session.send_data(bytes(event.data))
                    sent += len(event.data)
            elif isinstance(event, h11.EndOfMessage):
                await session.send_end()
                self.metrics.proxied_bytes.labels("response").inc(sent)
                return RelayResult(status, target, sent)
            elif isinstance(event, h11.ConnectionClosed):
                raise UpstreamFailed(f"{target.name}: closed before the response ended")


def _first(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    return next((v for n, v in headers if n == name), None)


__all__ = ["Relay", "RelayResult", "UpstreamFailed", "ClientGone"]
