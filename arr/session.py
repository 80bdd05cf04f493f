"""One client connection: read requests with h11 under limits, answer them.

The session owns the client side of the exchange (h11 server state, body
reading, writing responses). What to do with a request is the router's
business; relaying to a target is ``arr.proxy``'s.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, AsyncIterator, Iterable

import h11

from arr.config import Limits
from arr.http1 import HttpError, check_request_framing, error_response, reason_phrase
from arr.request import Headers, Request

if TYPE_CHECKING:
    from arr.metrics import Metrics

READ_SIZE = 256 * 1024


class ClientGone(Exception):
    """The client closed or reset the connection; nothing more can be sent."""


class RequestBody:
    """The request body: a buffered prefix, then whatever is still on the wire.

    Bodies up to ``Limits.body_buffer`` are read before the decision so a policy
    may look at them; larger ones stream through ``chunks()`` afterwards, with
    ``max_body`` and ``body_timeout`` enforced as they arrive.
    """

    def __init__(self, session: "ClientSession", declared_length: int | None, chunked: bool) -> None:
        self.session = session
        self.declared_length = declared_length
        self.chunked = chunked
        self.buffered: list[bytes] = []
        self.received = 0
        self.complete = False
        """True once h11 delivered EndOfMessage (at once for body-less requests)."""

    @property
    def present(self) -> bool:
        return self.chunked or bool(self.declared_length)

    async def _next_data(self) -> bytes | None:
        limits = self.session.limits
        while True:
            try:
                async with asyncio.timeout(limits.body_timeout):
                    event = await self.session.next_event()
            except TimeoutError:
                raise HttpError(408, "body-timeout", "request body stalled") from None
            if isinstance(event, h11.Data):
                self.received += len(event.data)
                if limits.max_body and self.received > limits.max_body:
                    raise HttpError(413, "body-too-large", f"body exceeds {limits.max_body} bytes")
                if event.data:
                    return bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self.complete = True
                return None
            elif isinstance(event, h11.ConnectionClosed):
                raise ClientGone("client closed during the request body")

    async def buffer(self, limit: int) -> bytes | None:
        """Read up to ``limit`` bytes; the whole body if it fits, else None."""
        while not self.complete and self.received <= limit:
            data = await self._next_data()
            if data is not None:
                self.buffered.append(data)
        return b"".join(self.buffered) if self.complete else None

    async def chunks(self) -> AsyncIterator[bytes]:
        """Every body byte not yet consumed: the buffered prefix, then the wire."""
        while self.buffered:
            yield self.buffered.pop(0)
        while not self.complete:
            data = await self._next_data()
            if data is not None:
                yield data


class ClientSession:
    """The client's side of one TCP connection (possibly many requests)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 limits: Limits, metrics: "Metrics") -> None:
        self.reader = reader
        self.writer = writer
        self.limits = limits
        self.metrics = metrics
        peer = writer.get_extra_info("peername") or ("?", 0)
        self.peer: tuple[str, int] = (peer[0], peer[1])
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.header_bytes)
        self.requests_served = 0
        self.busy = False
        """True from the first byte of a request to the end of its response."""
        self.response_started = False
        self.draining = False
        """Set by the router on shutdown: finish the current exchange, then close."""
        self.fed = 0
        """Bytes given to h11 since the current request began (to size its head)."""
        self.saved_syn: bytes | None = None
        """The client's SYN headers, kept by the handoff engine: the kernel
        hands them out once, and a later handoff of this connection needs them."""

    # -------------------------------------------------------------- reading

    async def next_event(self) -> object:
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise _protocol_error(exc) from None
            if event is not h11.NEED_DATA:
                return event
            try:
                data = await self.reader.read(READ_SIZE)
            except (ConnectionError, OSError) as exc:
                raise ClientGone(str(exc)) from None
            self._receive(data)

    def _receive(self, data: bytes) -> None:
        self.fed += len(data)
        self.conn.receive_data(data)

    async def read_request(self) -> tuple[Request, h11.Request, RequestBody] | None:
        """The next request, its body buffered as far as the limits allow.

        Returns None when the client is done (EOF, or idle past keep-alive).
        Raises HttpError for anything that deserves a 4xx.
        """
        limits = self.limits
        if not self.conn.trailing_data[0]:
            # Idle: before the first byte a new connection gets header_timeout
            # (a silent client is a slow one), a kept-alive one keepalive_timeout.
            idle = limits.keepalive_timeout if self.requests_served else limits.header_timeout
            try:
                async with asyncio.timeout(idle):
                    data = await self.reader.read(READ_SIZE)
            except TimeoutError:
                if self.requests_served:
                    return None
                raise HttpError(408, "header-timeout", "no request received") from None
            except (ConnectionError, OSError):
                return None
            if not data:
                return None
            self._receive(data)
        self.busy = True
        try:
            async with asyncio.timeout(limits.header_timeout):
                event = await self.next_event()
        except TimeoutError:
            raise HttpError(408, "header-timeout", "request head incomplete") from None
        except ClientGone:
            return None
        if isinstance(event, h11.ConnectionClosed):
            return None
        if not isinstance(event, h11.Request):
            raise HttpError(400, "malformed", f"unexpected {type(event).__name__}")
        # h11 bounds only an incomplete head; one that arrived whole in a
        # single read is measured here, so the limit holds however it is sent.
        head_size = self.fed - len(self.conn.trailing_data[0])
        if head_size > self.limits.header_bytes:
            raise HttpError(431, "header-too-large",
                            f"request head is {head_size} bytes, limit {self.limits.header_bytes}")
        return await self._prepare(event)

    async def _prepare(self, head: h11.Request) -> tuple[Request, h11.Request, RequestBody]:
        if head.method == b"CONNECT":
            # A reverse proxy opens no tunnels; h11 would also stop parsing the
            # connection after a 2xx to CONNECT.
            raise HttpError(405, "method-not-allowed", "CONNECT is not supported by a reverse proxy")
        declared = check_request_framing(head.headers)
        chunked = any(n == b"transfer-encoding" for n, _ in head.headers)
        max_body = self.limits.max_body
        if max_body and declared is not None and declared > max_body:
            raise HttpError(413, "body-too-large", f"Content-Length {declared} > {max_body}")
        body = RequestBody(self, declared, chunked)
        if body.present and self.conn.they_are_waiting_for_100_continue:
            await self.send_raw(self.conn.send(h11.InformationalResponse(status_code=100, headers=[])))
        buffered = await body.buffer(self.limits.body_buffer)
        try:
            target = head.target.decode("ascii")
        except UnicodeDecodeError:
            raise HttpError(400, "malformed", "non-ASCII request target") from None
        request = Request.build(
            method=head.method.decode("ascii"),
            target=target,
            headers=Headers.from_raw(head.headers),
            client=self.peer,
            http_version=head.http_version.decode("ascii"),
            body=buffered,
        )
        return request, head, body

    # -------------------------------------------------------------- writing

    async def send_raw(self, data: bytes) -> None:
        if not data:
            return
        try:
            self.writer.write(data)
            await self.writer.drain()
        except (ConnectionError, OSError) as exc:
            raise ClientGone(str(exc)) from None

    # The *_bytes methods advance h11 and return the bytes without writing, so
    # that a caller can put several events in one write: a syscall per event
    # was a third of the router's CPU on small responses.

    def head_bytes(self, status: int, headers: Iterable[tuple[bytes, bytes]],
                   reason: bytes = b"", *, close: bool = False) -> bytes:
        headers = list(headers)
        if close or self.must_close:
            headers.append((b"connection", b"close"))
        self.response_started = True
        return self.conn.send(h11.Response(
            status_code=status, headers=headers, reason=reason or reason_phrase(status))) or b""

    def data_bytes(self, data: bytes) -> bytes:
        return self.conn.send(h11.Data(data=data)) or b""

    def end_bytes(self) -> bytes:
        return self.conn.send(h11.EndOfMessage()) or b""

    async def send_complete(self, status: int, body: bytes, headers: Iterable[tuple[bytes, bytes]] = (),
                            *, head_only: bool = False, close: bool = False) -> None:
        headers = [(n, v) for n, v in headers if n.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        out = self.head_bytes(status, headers, close=close)
        if body and not head_only:
            out += self.data_bytes(body)
        await self.send_raw(out + self.end_bytes())

    async def send_error(self, error: HttpError) -> None:
        """Answer a request the router refuses; always closes afterwards."""
        self.metrics.client_errors.labels(error.reason, str(error.status)).inc()
        if self.response_started:
            return  # too late for a status line; closing is the only signal left
        self.response_started = True
        try:
            await self.send_raw(error_response(error.status, f"{error.detail}\n".encode()))
        except ClientGone:
            pass

    # -------------------------------------------------------------- lifecycle

    @property
    def must_close(self) -> bool:
        """True when this exchange is the connection's last (told to the client
        with 'connection: close'): shutting down, request budget spent, or a
        request body left unread that cannot be skipped safely."""
        return (self.draining or self.conn.their_state is h11.SEND_BODY
                or self.requests_served + 1 >= self.limits.max_requests_per_connection)

    def finish_exchange(self) -> bool:
        """After a response: True if the connection can carry another request."""
        self.requests_served += 1
        self.busy = False
        self.response_started = False
        if (self.draining or self.conn.our_state is not h11.DONE
                or self.conn.their_state is not h11.DONE):
            return False
        self.conn.start_next_cycle()
        self.fed = len(self.conn.trailing_data[0])  # pipelined bytes already belong to the next request
        return True

    async def close(self) -> None:
        if self.writer.is_closing():
            return
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 1.0)
        except (ConnectionError, OSError, asyncio.TimeoutError):
            pass


def _protocol_error(exc: h11.RemoteProtocolError) -> HttpError:
    status = exc.error_status_hint or 400
    reason = "header-too-large" if status == 431 else ("unsupported" if status == 501 else "malformed")
    return HttpError(status, reason, str(exc))
