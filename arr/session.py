"""One client connection: read requests with h11 under limits, answer them.

The session owns the client side of the exchange (h11 server state, body
reading, writing responses). What to do with a request is the router's
business; relaying to a target is ``arr.proxy``'s.

``ClientSession`` is the connection's ``asyncio.Protocol`` itself: the bytes
the transport delivers are kept as they arrive (no copy) and fed to h11 only
when h11 asks for more, responses go straight to the transport. The async API
(``read_request``, ``send_raw``, ...) waits on plain futures, never on a task
per read.
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import TYPE_CHECKING, AsyncIterator, Callable, Coroutine, Iterable

import h11

from arr.config import Limits
from arr.http1 import (ALLOW, ChunkScanner, HeadScanner, HttpError, check_method, check_request_framing,
                       error_response, reason_phrase)
from arr.paths import PathError, route_target
from arr.request import Headers, Request

if TYPE_CHECKING:
    from arr.metrics import Metrics

READ_SIZE = 256 * 1024
"""Upstream reads, and the client bytes a session holds before it pauses reading."""


class ClientGone(Exception):
    """The client closed or reset the connection; nothing more can be sent."""


class RequestBody:
    """The request body: a buffered prefix, then whatever is still on the wire.

    Bodies up to ``Limits.body_buffer`` are read before the decision so a policy
    may look at them; larger ones stream through ``chunks()`` afterwards. Both
    ways, as bytes arrive: ``max_body`` (413), and three clocks for 408:
    ``body_timeout`` for each wait (body-stalled), ``body_deadline`` for the
    whole body from the end of the head (body-deadline), and ``min_body_rate``
    over the time spent waiting for the client once ``body_rate_grace`` of it
    has passed (body-too-slow). The rate counts waiting time only, not the
    time a streamed body spends blocked on a slow target.
    """

    def __init__(self, session: "ClientSession", declared_length: int | None, chunked: bool) -> None:
        self.session = session
        self.declared_length = declared_length
        self.chunked = chunked
        self.buffered: list[bytes] = []
        self.received = 0
        self.complete = False
        """True once h11 delivered EndOfMessage (at once for body-less requests)."""
        self.started = session._loop.time() if session._loop is not None else 0.0
        """When the head ended: where body_deadline counts from."""
        self.waited = 0.0
        """Seconds spent waiting for the client's body bytes."""

    @property
    def present(self) -> bool:
        return self.chunked or bool(self.declared_length)

    def _wait_budget(self, now: float) -> tuple[float, str]:
        """How long the next wait for body bytes may last, and the 408's
        reason if it lasts that long."""
        limits = self.session.limits
        budget, reason = limits.body_timeout, "body-stalled"
        left = self.started + limits.body_deadline - now
        if left < budget:
            budget, reason = left, "body-deadline"
        if limits.min_body_rate:
            # The average falls below the rate once waited > received / rate.
            allowance = max(limits.body_rate_grace, self.received / limits.min_body_rate) - self.waited
            if allowance < budget:
                budget, reason = allowance, "body-too-slow"
        return budget, reason

    async def _next_data(self) -> bytes | None:
        session = self.session
        limits = session.limits
        while True:
            event = session.poll_event()
            if event is h11.NEED_DATA:  # the clocks run only when the wire has to be waited for
                loop = session._loop
                now = loop.time()  # type: ignore[union-attr]
                budget, reason = self._wait_budget(now)
                try:
                    if budget <= 0:
                        raise TimeoutError
                    async with asyncio.timeout(budget):
                        event = await session.next_event()
                except TimeoutError:
                    raise HttpError(408, reason, _BODY_TIMEOUT_DETAIL[reason]) from None
                finally:
                    self.waited += loop.time() - now  # type: ignore[union-attr]
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


_BODY_TIMEOUT_DETAIL = {
    "body-stalled": "request body stalled",
    "body-deadline": "request body not complete by the body deadline",
    "body-too-slow": "request body slower than the minimum rate",
}


class DetachError(RuntimeError):
    """``detach()`` refused: response bytes not yet handed to the kernel, or
    no live connection (already detached, closed, or lost). Nothing changed."""


class _Discard(asyncio.Protocol):
    """Where a detached transport reports: its close is not the client leaving."""

    def data_received(self, data: bytes) -> None:  # pragma: no cover - reading is off
        pass

    def eof_received(self) -> bool:  # pragma: no cover
        return True


_DISCARD = _Discard()

_CONNECTION_OPEN = 0
_CONNECTION_EOF = 1    # the client's FIN: reads see EOF once the held bytes are consumed
_CONNECTION_LOST = 2   # the transport is gone: EOF for reads, ClientGone for writes


class ClientSession(asyncio.Protocol):
    """The client's side of one TCP connection (possibly many requests).

    It is the connection's ``asyncio.Protocol``. ``connection_made`` hands the
    session to ``serve`` (the router's accept callback), which may return the
    coroutine that serves it: the session runs it as its task (``task``).
    Received bytes are held as the transport delivers them and fed to h11 when
    it needs more; above ``READ_SIZE`` held bytes the transport stops reading
    until they are consumed. ``send_raw`` writes to the transport and waits
    while the transport asks to (``pause_writing``/``resume_writing``).

    Giving the connection away (the handoff engine uses only this):

    ``unsent_bytes`` (int)
        Bytes written and not yet handed to the kernel (the transport's write
        buffer); 0 when detached or gone.
    ``detach() -> (socket.socket, bytes)``
        Let go of the transport without touching the TCP connection. Returns
        a non-blocking socket on a ``dup()`` of the connection's fd, which the
        caller owns, and a copy of every byte the client sent that the session
        received and did not consume (h11's trailing data of the current cycle,
        then the bytes not yet fed to h11), in stream order. The transport is
        closed: with the dup open that puts nothing on the wire (no FIN, no
        RST). The session keeps its state (h11, the held bytes) but reads and
        writes nothing (``send_raw`` raises ClientGone), ``close()`` is a no-op
        and the old transport's ``connection_lost`` is not the client leaving.
        Raises ``DetachError``, changing nothing, when ``unsent_bytes`` is not
        0 or there is no live connection (lost, closing, already detached).
        Bytes arriving while detached stay in the kernel for the caller (or
        the next transport); a read already waiting waits for ``reattach``.
    ``await reattach(sock, data=b"")``
        Take a detached connection back on ``sock`` (which the session then
        owns: a new transport on it) and continue exactly where it was: same
        h11 state, the held bytes first, then ``data`` (bytes the caller read
        from the socket while it was detached), then what the kernel holds.
        Raises RuntimeError if the session is not detached; if the socket
        cannot be taken back (OSError), closes it and raises ClientGone (the
        session stays detached: it writes nothing).
    ``detached`` (bool)
        True between ``detach()`` and ``reattach()``.
    """

    def __init__(self, limits: Limits, metrics: "Metrics",
                 serve: Callable[["ClientSession"], Coroutine[object, object, None] | None] | None = None
                 ) -> None:
        self.limits = limits
        self.metrics = metrics
        self.peer: tuple[str, int] = ("?", 0)
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
        self.handoff_context: object | None = None
        """The handoff engine's, opaque here: what it needs to hand a connection
        it took back off again (there is no saved SYN on a rebuilt socket)."""
        self.task: asyncio.Task[None] | None = None
        """The task serving this connection (what ``serve`` returned)."""
        self._serve = serve
        self._started = 0.0
        """When the connection was accepted: the first head's deadline counts from it."""
        self._head_scan: HeadScanner | None = None
        """Checks the current head's bytes before h11 parses them (while one is read)."""
        self._chunk_scan: ChunkScanner | None = None
        """Checks the current chunked body's framing before h11 reads it."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._transport: asyncio.Transport | None = None
        self._chunks: list[bytes] = []
        """Received bytes not yet fed to h11, as the transport delivered them."""
        self._held = 0
        self._state = _CONNECTION_OPEN
        self._error: BaseException | None = None
        self._read_paused = False
        self._write_paused = False
        self._detached = False
        self._waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._closed: asyncio.Future[None] | None = None

    # ------------------------------------------------------------ protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        if self._detached:  # reattach(): the same connection on a new transport
            self._detached = False
            self._state = _CONNECTION_OPEN if self._state == _CONNECTION_LOST else self._state
            self._error = None
            self._write_paused = False
            self._read_paused = False
            if self._held > READ_SIZE:
                self._read_paused = True
                transport.pause_reading()  # type: ignore[attr-defined]
            self._wake()
            return
        self._loop = asyncio.get_running_loop()
        self._started = self._loop.time()
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer = (peer[0], peer[1])
        if self._serve is not None:
            coroutine = self._serve(self)
            if coroutine is not None:
                self.task = self._loop.create_task(coroutine)

    def data_received(self, data: bytes) -> None:
        self._chunks.append(data)
        self._held += len(data)
        if self._held > READ_SIZE and not self._read_paused:
            self._read_paused = True
            self._transport.pause_reading()  # type: ignore[union-attr]
        _resolve(self._waiter)

    def eof_received(self) -> bool:
        if self._state == _CONNECTION_OPEN:
            self._state = _CONNECTION_EOF
        self._wake()
        return True  # keep the transport: a half-closed client still gets its answer

    def connection_lost(self, exc: Exception | None) -> None:
        self._state = _CONNECTION_LOST
        if exc is not None:
            self._error = exc
        self._wake()
        _resolve(self._drain_waiter)
        _resolve(self._closed)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        _resolve(self._drain_waiter)

    def _wake(self) -> None:
        _resolve(self._waiter)

    # -------------------------------------------------------------- reading

    async def _readable(self) -> None:
        """Until bytes are held, or the client's EOF, or the connection is lost."""
        while (not self._chunks and self._state == _CONNECTION_OPEN) or self._detached:
            waiter = self._loop.create_future()  # type: ignore[union-attr]
            self._waiter = waiter
            try:
                await waiter
            finally:
                self._waiter = None

    def _feed(self) -> None:
        """Give h11 every held byte (or, with none left, the client's EOF)."""
        if self._error is not None:
            raise ClientGone(str(self._error) or type(self._error).__name__)
        chunks = self._chunks
        if chunks:
            # The scanners see the bytes before h11, so that what they refuse
            # is refused at the byte that proves it (h11 would wait, or accept).
            held = self._held
            head_scan = self._head_scan
            if head_scan is not None and not head_scan.done:
                # (an empty chunk would be EOF to h11: drop what was all empty lines)
                chunks = [kept for kept in map(head_scan.feed, chunks) if kept]
                held = sum(map(len, chunks))
            chunk_scan = self._chunk_scan
            if chunk_scan is not None and not chunk_scan.done:
                for chunk in chunks:
                    chunk_scan.feed(chunk)
            receive = self.conn.receive_data
            for chunk in chunks:
                receive(chunk)
            self.fed += held
            self._chunks = []
            self._held = 0
            if self._read_paused and not self._detached:
                self._read_paused = False
                self._transport.resume_reading()  # type: ignore[union-attr]
        elif self._state != _CONNECTION_OPEN:
            self.conn.receive_data(b"")  # h11: EOF

    def poll_event(self) -> object:
        """The next h11 event from the bytes already received; NEED_DATA if
        more must come from the wire. Never waits."""
        conn = self.conn
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise _protocol_error(exc) from None
            if event is not h11.NEED_DATA or self._detached or (
                    not self._chunks and self._state == _CONNECTION_OPEN and self._error is None):
                return event
            self._feed()

    async def next_event(self) -> object:
        while True:
            event = self.poll_event()
            if event is not h11.NEED_DATA:
                return event
            await self._readable()

    async def read_request(self) -> tuple[Request, h11.Request, RequestBody] | None:
        """The next request, its body buffered as far as the limits allow.

        Returns None when the client is done (EOF, or idle past keep-alive).
        Raises HttpError for anything that deserves a 4xx/5xx. ``OPTIONS *``
        is answered here (it is about the router, not about a resource).
        """
        while True:
            read = await self._read_one()
            if read is not _ANSWERED_HERE:
                return read  # type: ignore[return-value]
            if not self.finish_exchange():  # OPTIONS * was answered: on to the next request
                return None

    async def _read_one(self) -> "tuple[Request, h11.Request, RequestBody] | _AnsweredHere | None":
        limits = self.limits
        loop = self._loop or asyncio.get_running_loop()
        self._head_scan = None
        first = not self.requests_served
        # The head deadline: for a connection's first request from its
        # start (a silent client and one trickling a head are cut alike),
        # for a kept-alive one from the request's first byte; the idle
        # time before that byte is keepalive_timeout's.
        deadline = self._started + limits.header_timeout if first else 0.0
        if not self.fed and not self._chunks:
            try:
                if first:
                    async with asyncio.timeout_at(deadline):
                        await self._readable()
                else:
                    async with asyncio.timeout(limits.keepalive_timeout):
                        await self._readable()
            except TimeoutError:
                if not first:
                    return None
                raise HttpError(408, "head-deadline", "no request received") from None
            if not self._chunks or self._error is not None:
                return None  # EOF, or the connection is gone
        if not first:
            deadline = loop.time() + limits.header_timeout
        self.busy = True
        try:
            self._begin_head()
            event = self.poll_event()
            if event is h11.NEED_DATA:  # the head is still on its way
                async with asyncio.timeout_at(deadline):
                    event = await self.next_event()
        except TimeoutError:
            raise HttpError(408, "head-deadline", "request head not complete by the head deadline") from None
        except ClientGone:
            return None
        if isinstance(event, h11.ConnectionClosed):
            return None
        if not isinstance(event, h11.Request):
            raise HttpError(400, "malformed", f"unexpected {type(event).__name__}")
        self._head_scan = None  # the head is whole; what follows is body
        # h11 bounds only an incomplete head; one that arrived whole in a
        # single read is measured here, so the limit holds however it is sent.
        head_size = self.fed - len(self.conn.trailing_data[0])
        if head_size > self.limits.header_bytes:
            error = HttpError(431, "header-too-large",
                              f"request head is {head_size} bytes, limit {self.limits.header_bytes}")
            # Parsed whole and without a body: the connection can go on (a
            # keep-alive client's later requests are not its fault).
            error.recoverable = check_request_framing(event.headers) in (None, 0) and not any(
                n == b"transfer-encoding" for n, _ in event.headers)
            raise error
        return await self._prepare(event)

    def _begin_head(self) -> None:
        """Start checking a new head: also the bytes of it that h11 already
        holds (pipelined behind the previous request)."""
        scan = self._head_scan = HeadScanner(self.limits.header_bytes)
        if not self.fed:
            return
        pending = self.conn.trailing_data[0]
        rest = scan.feed(pending)
        if len(rest) != len(pending):
            # Empty lines before the request line, which h11 refuses: a
            # connection between two requests holds nothing else, so a
            # fresh h11 state takes the rest.
            self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.header_bytes)
            if rest:  # (b"" would be EOF to h11)
                self.conn.receive_data(rest)
            self.fed = len(rest)

    async def _prepare(self, head: h11.Request) -> "tuple[Request, h11.Request, RequestBody] | _AnsweredHere":
        """Check what the head asks for, read the body as far as the limits
        allow, and build the Request the policy sees and the head the target
        receives (the normalised target); or answer it here (OPTIONS *)."""
        check_method(head.method)
        declared = check_request_framing(head.headers)
        chunked = any(n == b"transfer-encoding" for n, _ in head.headers)
        asterisk = head.target == b"*"
        routed = None
        if asterisk:
            if head.method != b"OPTIONS":
                raise HttpError(400, "bad-target", "'*' is the request-target of OPTIONS only")
        else:
            try:
                routed = route_target(head.target.decode("ascii"))
            except UnicodeDecodeError:  # pragma: no cover - HeadScanner lets ASCII through only
                raise HttpError(400, "bad-target", "non-ASCII request-target") from None
            except PathError as exc:
                raise HttpError(400, exc.reason, exc.detail) from None
        max_body = self.limits.max_body
        if max_body and declared is not None and declared > max_body:
            raise HttpError(413, "body-too-large", f"Content-Length {declared} > {max_body}")
        body = RequestBody(self, declared, chunked)
        if chunked:
            scan = self._chunk_scan = ChunkScanner()
            scan.feed(self.conn.trailing_data[0])  # the body bytes h11 already holds
        if body.present and self.conn.they_are_waiting_for_100_continue:
            await self.send_raw(self.conn.send(h11.InformationalResponse(status_code=100, headers=[])))
        buffered = await body.buffer(self.limits.body_buffer)
        if routed is None:  # OPTIONS *: about the router, answered by it
            await self.send_complete(200, b"", [(b"allow", ALLOW)])
            return _ANSWERED_HERE
        head = _forwarded_head(head, routed.target, routed.authority)
        request = Request.build(
            method=head.method.decode("ascii"),
            target=routed.target,
            headers=Headers.from_raw(head.headers),
            client=self.peer,
            http_version=head.http_version.decode("ascii"),
            body=buffered,
            number=self.requests_served + 1,
        )
        return request, head, body

    # -------------------------------------------------------------- writing

    async def send_raw(self, data: bytes) -> None:
        if not data:
            return
        transport = self._transport
        if transport is None or self._detached or self._state == _CONNECTION_LOST:
            raise ClientGone("connection closed")
        try:
            transport.write(data)
        except (RuntimeError, ConnectionError, OSError) as exc:  # uvloop: a closed handle
            raise ClientGone(str(exc)) from None
        if self._write_paused:
            await self._drain()

    async def _drain(self) -> None:
        while self._write_paused and self._state != _CONNECTION_LOST and not self._detached:
            waiter = self._loop.create_future()  # type: ignore[union-attr]
            self._drain_waiter = waiter
            try:
                await waiter
            finally:
                self._drain_waiter = None
        if self._state == _CONNECTION_LOST:
            raise ClientGone(str(self._error) if self._error else "connection lost")

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
            await self.send_raw(error_response(error.status, f"{error.detail}\n".encode(),
                                               headers=error.headers))
        except ClientGone:
            pass

    async def answer_and_continue(self, error: HttpError) -> bool:
        """Answer a refused request whose head h11 parsed whole and that has
        no body (``error.recoverable``) with a complete response, and make the
        connection ready for the next request. False: it must be closed
        (``send_error``)."""
        if not error.recoverable or self.response_started or self.conn.our_state is not h11.SEND_RESPONSE:
            return False
        self.metrics.client_errors.labels(error.reason, str(error.status)).inc()
        try:
            if not isinstance(self.poll_event(), h11.EndOfMessage):
                return False
            await self.send_complete(error.status, f"{error.detail}\n".encode(),
                                     [(b"content-type", b"text/plain")])
        except (HttpError, ClientGone):
            return False
        return self.finish_exchange()

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
        self._chunk_scan = None
        self.fed = len(self.conn.trailing_data[0])  # pipelined bytes already belong to the next request
        return True

    def refuse(self, response: bytes) -> None:
        """Answer a connection that will not be served, and close it."""
        transport = self._transport
        if transport is not None and not self._detached and not transport.is_closing():
            transport.write(response)
            transport.close()

    async def close(self) -> None:
        transport = self._transport
        if self._detached or transport is None or self._state == _CONNECTION_LOST:
            return
        if transport.is_closing():
            return
        pending = transport.get_write_buffer_size()
        closed = self._closed = self._loop.create_future()  # type: ignore[union-attr]
        transport.close()
        if not pending:  # connection_lost comes with the next loop iteration
            await closed
            return
        try:
            async with asyncio.timeout(1.0):
                await closed
        except TimeoutError:
            pass

    # -------------------------------------------------------------- detaching

    @property
    def detached(self) -> bool:
        return self._detached

    @property
    def unsent_bytes(self) -> int:
        transport = self._transport
        if transport is None or self._detached or self._state == _CONNECTION_LOST:
            return 0
        return transport.get_write_buffer_size()

    @classmethod
    def returning(cls, limits: Limits, metrics: "Metrics", peer: tuple[str, int], requests_served: int,
                  serve: Callable[["ClientSession"], Coroutine[object, object, None] | None] | None = None
                  ) -> "ClientSession":
        """A session for a connection that comes back to the router after it
        was handed off (handoff/takeback.py rebuilt its socket): detached, as
        if it had just been handed away, so that ``reattach`` is the one way
        the socket comes in; its requests keep counting from REQUESTS_SERVED."""
        session = cls(limits, metrics, serve)
        session.peer = peer
        session.requests_served = requests_served
        session._loop = asyncio.get_running_loop()
        session._detached = True
        return session

    @classmethod
    async def read_captured(cls, limits: Limits, metrics: "Metrics", peer: tuple[str, int], requests_served: int,
                            data: bytes) -> tuple[Request, h11.Request, RequestBody] | None:
        """The one request DATA holds: bytes a handed-off client sent, which
        the handoff engine captured (handoff/takeback.py). Read with every
        check a request on a socket gets, by a session without a transport.
        None when DATA is not exactly one whole request that can be read
        without an answer (incomplete, more bytes behind it, a 100-continue,
        OPTIONS *, anything refused): the engine then takes the connection
        back and the request is read from its socket, answered as usual."""
        if not data or len(data) > READ_SIZE:
            return None
        session = cls(limits, metrics)
        session.peer = peer
        session.requests_served = requests_served
        session._loop = asyncio.get_running_loop()
        session._chunks, session._held = [data], len(data)
        session._state = _CONNECTION_EOF  # nothing more comes: an incomplete request ends in an error
        try:
            read = await session._read_one()
        except (HttpError, ClientGone):
            return None
        if not isinstance(read, tuple) or session._chunks or session.conn.trailing_data[0]:
            return None
        return read if read[2].complete else None

    def detach(self) -> tuple[socket.socket, bytes]:
        transport = self._transport
        if (transport is None or self._detached or self._state == _CONNECTION_LOST
                or transport.is_closing()):
            raise DetachError("no live connection to detach")
        unsent = transport.get_write_buffer_size()
        if unsent:
            raise DetachError(f"{unsent} response bytes not yet sent")
        fd = transport.get_extra_info("socket").fileno()
        sock = socket.socket(fileno=os.dup(fd))
        sock.setblocking(False)
        held = b"".join(self._chunks)
        pending = self.conn.trailing_data[0] + held if held else self.conn.trailing_data[0]
        self._detached = True
        self._transport = None
        self._read_paused = self._write_paused = False
        # Its connection_lost must not look like the client leaving. Closing
        # one of two fds of the socket sends nothing.
        transport.set_protocol(_DISCARD)
        transport.close()
        return sock, bytes(pending)

    async def reattach(self, sock: socket.socket, data: bytes = b"") -> None:
        if not self._detached:
            raise RuntimeError("reattach: the session is not detached")
        if data:
            self._chunks.append(bytes(data))
            self._held += len(data)
        loop = self._loop or asyncio.get_running_loop()
        self._loop = loop
        try:
            sock.setblocking(False)
            await loop.connect_accepted_socket(lambda: self, sock)
        except OSError as exc:  # the connection cannot be taken back: it is lost
            sock.close()
            raise ClientGone(f"reattach: {exc}") from None


class _AnsweredHere:
    """``_read_one``'s result for a request the session answered itself."""


_ANSWERED_HERE = _AnsweredHere()


def _resolve(waiter: "asyncio.Future[None] | None") -> None:
    """Wake whoever waits on WAITER, if anyone still does."""
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


def _protocol_error(exc: h11.RemoteProtocolError) -> HttpError:
    status = exc.error_status_hint or 400
    if status == 431:
        return HttpError(431, "header-too-large", str(exc))
    if status == 501:
        # h11's only 501s: Transfer-Encoding other than one 'chunked'. A
        # router cannot frame such a body the way every target would: 400
        # (RFC 9112 6.3 says so where 'chunked' is not the final coding).
        return HttpError(400, "bad-transfer-encoding", str(exc))
    return HttpError(status, "malformed", str(exc))


def _forwarded_head(head: h11.Request, target: str, authority: str | None) -> h11.Request:
    """HEAD as the target is to receive it: the normalised origin-form
    target; for an absolute-form request the authority as Host (RFC 9112
    3.2.2: the Host header is ignored then); HTTP/1.x with x >= 2 as 1.1.
    HEAD itself when nothing changes (the common case: no copy)."""
    version = head.http_version
    new_version = version if version in (b"1.1", b"1.0") else b"1.1"
    new_target = target.encode("ascii")
    if new_target == head.target and authority is None and new_version is version:
        return head
    headers = list(head.headers)
    if authority is not None:
        host = authority.encode("ascii")
        headers = [(n, v) for n, v in headers if n != b"host"]
        headers.insert(0, (b"host", host))
    return h11.Request(method=head.method, target=new_target, headers=headers, http_version=new_version)
