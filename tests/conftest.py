"""Shared fixtures for the router tests: upstreams, routers and a raw client.

Everything listens on and connects to 127.0.0.1 only.

* ``upstreams(*names)``: start in-process h11 upstream servers (see ``Upstream``).
* ``upstream``: one started upstream named ``up``.
* ``start_router(config_dict_or_Config, policy=None, **router_kwargs)``: a started
  ``arr.Router`` on 127.0.0.1:0 (mode ``proxy`` and no access log unless the
  dict says otherwise), shut down at teardown.
* ``http``: the client helpers (``http.connect``, ``http.request``, ``http.payload``).
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

import h11
import pytest

import arr
from arr.config import Config, config_from_dict

LOOPBACK = "127.0.0.1"

# ---------------------------------------------------------------- payloads

_BLOCK = b"".join(hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(2048))  # 64 KiB


def payload(n: int) -> bytes:
    """n deterministic bytes (what /bytes/<n> and /chunked/<n> send)."""
    reps = n // len(_BLOCK) + 1
    return (_BLOCK * reps)[:n]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- upstream


@dataclass
class Received:
    method: str
    target: str
    headers: list[tuple[str, str]]
    length: int
    sha256: str

    def header_all(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n == name.lower()]


class Upstream:
    """An HTTP/1.1 server written with h11, for the router to relay to.

    GET /bytes/<n>     n deterministic bytes, Content-Length
    GET /chunked/<n>   n deterministic bytes, chunked
    ANY /echo          JSON: method, target, length, sha256 of the body, headers
    GET /slow/<s>      sleeps s seconds, then answers "slow\\n"
    GET /status/<code> answers that status
    GET /whoami        the server's name
    GET /abort/<n>     announces n bytes, sends half, closes (chunked: /abort-chunked/<n>)
    GET /hop           a response carrying hop-by-hop headers
    GET /garbage       a response that is not HTTP, then close
    GET /              200 (so the router's default health probe is content)
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = 0
        self.requests: list[Received] = []
        self.connections = 0
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()

    @property
    def address(self) -> tuple[str, int]:
        return (LOOPBACK, self.port)

    @property
    def served(self) -> list[Received]:
        """Requests received, minus the router's health probes."""
        return [r for r in self.requests if r.header_all("user-agent") != ["arr-health"]]

    @property
    def target(self) -> str:
        """The address as config text (also the default target name)."""
        return f"{LOOPBACK}:{self.port}"

    async def start(self, port: int | None = None) -> "Upstream":
        self._server = await asyncio.start_server(self._handle, LOOPBACK, port or self.port,
                                                  reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        # The connections first: since Python 3.12.1 Server.wait_closed() also
        # waits for every connection the server accepted to close, and a
        # router's idle keep-alive connections to us would hold it forever.
        await asyncio.sleep(0)  # a connection accepted just now: its handler starts
        while self._tasks:  # (and one that started meanwhile is ended too)
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        self.connections += 1
        conn = h11.Connection(h11.SERVER)

        async def next_event() -> Any:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await reader.read(65536))
                    continue
                return event

        try:
            while True:
                head = await next_event()
                if not isinstance(head, h11.Request):
                    return
                digest, length = hashlib.sha256(), 0
                while True:
                    event = await next_event()
                    if isinstance(event, h11.Data):
                        digest.update(event.data)
                        length += len(event.data)
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    else:
                        return
                received = Received(
                    head.method.decode(), head.target.decode(),
                    [(n.decode("latin-1"), v.decode("latin-1")) for n, v in head.headers],
                    length, digest.hexdigest())
                self.requests.append(received)
                if not await self._respond(conn, writer, received):
                    return
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (h11.ProtocolError, ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            # stop(): end quietly; a cancelled handler makes start_server log an
            # error for it (3.11.7, 3.12.1: its done-callback asks the task for
            # its exception, which raises CancelledError).
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _respond(self, conn: h11.Connection, writer: asyncio.StreamWriter,
                       req: Received) -> bool:
        async def send(event: Any) -> None:
            writer.write(conn.send(event))
            await writer.drain()

        async def simple(status: int, body: bytes, ctype: bytes = b"text/plain",
                         extra: list[tuple[bytes, bytes]] | None = None) -> None:
            headers = [(b"content-type", ctype), (b"content-length", str(len(body)).encode()),
                       (b"x-upstream", self.name.encode())] + (extra or [])
            await send(h11.Response(status_code=status, headers=headers))
            if body and req.method != "HEAD":
                await send(h11.Data(data=body))
            await send(h11.EndOfMessage())

        parts = req.target.split("?", 1)[0].strip("/").split("/")
        route, arg = parts[0], (parts[1] if len(parts) > 1 else "")
        if route == "bytes":
            n = int(arg)
            await send(h11.Response(status_code=200, headers=[
                (b"content-type", b"application/octet-stream"),
                (b"content-length", str(n).encode()), (b"x-upstream", self.name.encode())]))
            if req.method != "HEAD":
                data = payload(n)
                for i in range(0, n, 65536):
                    await send(h11.Data(data=data[i:i + 65536]))
            await send(h11.EndOfMessage())
        elif route == "chunked":
            n = int(arg)
            await send(h11.Response(status_code=200, headers=[
                (b"content-type", b"application/octet-stream"), (b"x-upstream", self.name.encode())]))
            if req.method != "HEAD":
                data = payload(n)
                for i in range(0, n, 16384):
                    await send(h11.Data(data=data[i:i + 16384]))
            await send(h11.EndOfMessage())
        elif route == "echo":
            body = json.dumps({"method": req.method, "target": req.target, "length": req.length,
                               "sha256": req.sha256, "headers": req.headers}).encode()
            await simple(200, body, b"application/json")
        elif route == "slow":
            await asyncio.sleep(float(arg))
            await simple(200, b"slow\n")
        elif route == "status":
            await simple(int(arg), f"status {arg}\n".encode())
        elif route == "whoami":
            await simple(200, self.name.encode())
        elif route in ("abort", "abort-chunked"):
            n = int(arg)
            headers = [(b"x-upstream", self.name.encode())]
            if route == "abort":
                headers.append((b"content-length", str(n).encode()))
            await send(h11.Response(status_code=200, headers=headers))
            await send(h11.Data(data=payload(n)[: n // 2]))
            return False  # close mid-body
        elif route == "garbage":
            writer.write(b"THIS IS NOT HTTP\r\n\r\n")
            await writer.drain()
            return False
        elif route == "hop":
            await simple(200, b"hop\n", extra=[
                (b"connection", b"x-hop-resp"), (b"x-hop-resp", b"1"),
                (b"keep-alive", b"timeout=5"), (b"x-end-resp", b"1")])
        elif route == "":
            await simple(200, f"{self.name}\n".encode())
        else:
            await simple(404, b"not found\n")
        return True


@pytest.fixture
async def upstreams():
    made: list[Upstream] = []

    async def start(*names: str) -> list[Upstream]:
        started = []
        for name in names:
            up = await Upstream(name).start()
            made.append(up)
            started.append(up)
        return started

    yield start
    for up in made:
        await up.stop()


@pytest.fixture
async def upstream(upstreams) -> Upstream:
    (up,) = await upstreams("up")
    return up


# ---------------------------------------------------------------- router


def pool_config(*ups: Upstream, **sections: Any) -> dict[str, Any]:
    """The minimal config shape with ``ups`` as targets, plus extra sections."""
    data: dict[str, Any] = {"targets": [{"address": u.target} for u in ups]}
    data.update(sections)
    return data


@pytest.fixture
async def start_router():
    routers: list[arr.Router] = []

    async def start(config: Mapping[str, Any] | Config | None = None, policy: Any = None,
                    **kwargs: Any) -> arr.Router:
        if config is None or isinstance(config, Mapping):
            data = copy.deepcopy(dict(config or {}))
            router_section = data.setdefault("router", {})
            router_section.setdefault("mode", "proxy")
            router_section.setdefault("access_log", False)
            config = config_from_dict(data)
        # loopback, ephemeral port, no metrics listener: always
        config = dataclasses.replace(config, router=dataclasses.replace(
            config.router, listen=(LOOPBACK, 0), metrics=None))
        router = arr.Router(config, policy=policy, **kwargs)
        await router.start()
        routers.append(router)
        return router

    yield start
    for router in routers:
        await router.shutdown(timeout=0.5)


# ---------------------------------------------------------------- client


class IncompleteResponse(Exception):
    """The connection ended (or broke the protocol) before the response did."""

    def __init__(self, response: "Response | None", detail: str) -> None:
        super().__init__(detail)
        self.response = response


@dataclass
class Response:
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    complete: bool = False
    informational: list[int] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        values = self.header_all(name)
        return values[0] if values else None

    def header_all(self, name: str) -> list[str]:
        key = name.lower().encode()
        return [v.decode("latin-1") for n, v in self.headers if n == key]

    def json(self) -> Any:
        return json.loads(self.body)


class RawClient:
    """A TCP client that sends raw bytes and parses responses with h11."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._buffer = b""
        self._conn: h11.Connection | None = None
        self.eof = False

    @classmethod
    async def connect(cls, address: tuple[str, int]) -> "RawClient":
        assert address[0] == LOOPBACK
        reader, writer = await asyncio.open_connection(*address)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def _read(self, timeout: float) -> bytes:
        try:
            data = await asyncio.wait_for(self.reader.read(262144), timeout)
        except (ConnectionResetError, BrokenPipeError):
            data = b""
        if not data:
            self.eof = True
        return data

    async def _event(self, timeout: float) -> Any:
        assert self._conn is not None
        while True:
            try:
                event = self._conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise IncompleteResponse(None, str(exc)) from None
            if event is h11.NEED_DATA:
                self._conn.receive_data(await self._read(timeout))
                continue
            return event

    async def read_head(self, method: str = "GET", timeout: float = 10.0) -> Response:
        conn = h11.Connection(h11.CLIENT)
        conn.send(h11.Request(method=method, target="/", headers=[("host", "x")]))
        conn.send(h11.EndOfMessage())
        if self._buffer:
            conn.receive_data(self._buffer)
        if self.eof:
            conn.receive_data(b"")  # h11: empty data means EOF
        self._buffer = b""
        self._conn = conn
        informational = []
        while True:
            event = await self._event(timeout)
            if isinstance(event, h11.InformationalResponse):
                informational.append(event.status_code)
            elif isinstance(event, h11.Response):
                return Response(event.status_code, event.reason, list(event.headers),
                                informational=informational)
            else:
                raise IncompleteResponse(None, f"no response: {event!r}")

    async def read_body(self, response: Response, at_least: int | None = None,
                        timeout: float = 10.0) -> Response:
        """Read body data until the end, or until ``at_least`` bytes are in."""
        chunks = [response.body]
        got = len(response.body)
        try:
            while at_least is None or got < at_least:
                event = await self._event(timeout)
                if isinstance(event, h11.Data):
                    chunks.append(bytes(event.data))
                    got += len(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    response.complete = True
                    assert self._conn is not None
                    self._buffer = self._conn.trailing_data[0]
                    break
                else:
                    raise IncompleteResponse(response, f"unexpected {event!r}")
        except IncompleteResponse as exc:
            response.body = b"".join(chunks)
            exc.response = response
            raise
        response.body = b"".join(chunks)
        return response

    async def read_response(self, method: str = "GET", timeout: float = 10.0) -> Response:
        response = await self.read_head(method, timeout)
        return await self.read_body(response, timeout=timeout)

    async def closed_by_peer(self, timeout: float = 2.0) -> bool:
        """True if nothing more arrives and the peer closed (EOF or reset)."""
        if self._buffer:
            return False
        if self.eof:
            return True
        try:
            data = await self._read(timeout)
        except asyncio.TimeoutError:
            return False
        return not data

    async def close(self) -> None:
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 1.0)
        except (ConnectionError, OSError, asyncio.TimeoutError):
            pass


def build_request(method: str, path: str, headers: list[tuple[str, str]] = (), body: bytes | None = None,
                  host: str = "test.local") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{n}: {v}" for n, v in headers]
    if body is not None and not any(n.lower() in ("content-length", "transfer-encoding")
                                    for n, _ in headers):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


def chunked(data: bytes, size: int = 65536) -> bytes:
    out = [b"%x\r\n%s\r\n" % (len(data[i:i + size]), data[i:i + size])
           for i in range(0, len(data), size)]
    return b"".join(out) + b"0\r\n\r\n"


class HttpHelpers:
    """What tests use to talk to a router (handed out by the ``http`` fixture)."""

    Response = Response
    IncompleteResponse = IncompleteResponse
    payload = staticmethod(payload)
    sha256 = staticmethod(sha256)
    build_request = staticmethod(build_request)
    chunked = staticmethod(chunked)
    pool_config = staticmethod(pool_config)

    def __init__(self) -> None:
        self.clients: list[RawClient] = []

    async def connect(self, address: tuple[str, int]) -> RawClient:
        client = await RawClient.connect(address)
        self.clients.append(client)
        return client

    async def request(self, address: tuple[str, int], method: str = "GET", path: str = "/",
                      headers: list[tuple[str, str]] = (), body: bytes | None = None,
                      timeout: float = 10.0) -> Response:
        """One request on a new connection (closed afterwards)."""
        client = await self.connect(address)
        try:
            await client.send(build_request(method, path, list(headers), body))
            return await client.read_response(method, timeout)
        finally:
            await client.close()

    async def close_all(self) -> None:
        for client in self.clients:
            await client.close()


@pytest.fixture
async def http():
    helpers = HttpHelpers()
    yield helpers
    await helpers.close_all()


@pytest.fixture(params=["asyncio", "uvloop"])
def on_both_loops(request):
    """``run(coroutine)`` on a fresh loop of each kind: the router runs on
    uvloop, whose handles differ from asyncio's (no TimerHandle.when(), say)."""
    import uvloop

    factory = uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop

    def run(coroutine):
        loop = factory()
        try:
            return loop.run_until_complete(coroutine)
        finally:
            loop.close()
    return run
