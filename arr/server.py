"""The router: accept clients, read each request, ask the policy, execute.

    client --> ClientSession.read_request --> policy(request) --> Decision
                                                   |
        Handoff --(HandoffEngine, else fallback)---+--> Proxy --> Relay (arr.proxy)
        Local   --> in-process handler                  Reject --> status line

The handoff itself lives in the ``handoff`` package; the router only knows the
``HandoffEngine`` protocol, so it runs (falling back to proxy) without it.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import signal
import time
from typing import TYPE_CHECKING, Protocol

from arr.config import Config
from arr.decisions import Decision, Handoff, Local, LocalResponse, Proxy, Reject, decision_name
from arr.health import HealthMonitor
from arr.http1 import HttpError, error_response
from arr.metrics import Metrics, serve_metrics
from arr.proxy import Relay, UpstreamFailed
from arr.routing import Policy, build_routing
from arr.session import ClientGone, ClientSession

if TYPE_CHECKING:
    import socket
    from collections.abc import Coroutine

    import h11

    from arr.pool import Pool, TargetState
    from arr.request import Request
    from arr.session import RequestBody

log = logging.getLogger("arr")
access_log = logging.getLogger("arr.access")


class HandoffEngine(Protocol):
    """Hands a client connection to a target (the ``handoff`` package).

    ``hand_off`` returns None once the connection belongs to the target (the
    engine took it with ``session.detach()``; the session stays detached), or
    the reason it could not, having changed nothing (a detached session is
    given back with ``session.reattach``), so that the router can fall back on
    the same sockets.
    """

    async def start(self, router: "Router") -> None: ...

    async def stop(self) -> None: ...

    async def hand_off(self, session: ClientSession, request: "Request", head: "h11.Request",
                       target: "TargetState") -> str | None: ...

    def forget(self, session: ClientSession) -> None:
        """SESSION (one the engine gave back with ``Router.resume``) no longer
        needs what the engine kept for it (``session.handoff_context``): its
        connection ended, or its request went elsewhere than a handoff."""


class NoHandoff:
    """The engine used when no handoff data path is installed."""

    async def start(self, router: "Router") -> None:
        pass

    async def stop(self) -> None:
        pass

    async def hand_off(self, session: ClientSession, request: "Request", head: "h11.Request",
                       target: "TargetState") -> str | None:
        return "unavailable"

    def forget(self, session: ClientSession) -> None:
        pass


class Router:
    """An HTTP/1.1 router. Give it a ``Config``, or a policy of your own."""

    def __init__(self, config: Config | None = None, *, policy: Policy | None = None,
                 pools: dict[str, "Pool"] | None = None, handoff: HandoffEngine | None = None,
                 metrics: Metrics | None = None) -> None:
        self.config = config or Config()
        if policy is None:
            routing = build_routing(self.config)
            policy, pools = routing.policy, routing.pools
        self.policy = policy
        self.pools = pools or {}
        self.handoff = handoff or NoHandoff()
        self.metrics = metrics or Metrics()
        self.health = HealthMonitor(self.pools, self.metrics)
        self.relay = Relay(self.config.upstream, self.metrics, self.health)
        self._pool_of = {m: p for p in self.pools.values() for m in p.members}
        self._sessions: set[ClientSession] = set()
        self._server: asyncio.AbstractServer | None = None
        self._metrics_server: asyncio.AbstractServer | None = None
        self._closed = asyncio.Event()

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        host, port = self.config.router.listen
        limits, metrics, accept = self.config.limits, self.metrics, self._accept
        self._server = await asyncio.get_running_loop().create_server(
            lambda: ClientSession(limits, metrics, accept), host, port, backlog=4096,
            reuse_address=True)
        if self.config.router.metrics:
            self._metrics_server = await serve_metrics(self.metrics, *self.config.router.metrics)
        await self.handoff.start(self)
        self.health.start()
        log.info("arr listening on %s:%d (mode %s)", *self.address, self.config.router.mode)

    def listening_sockets(self) -> list:
        assert self._server is not None, "router not started"
        return list(self._server.sockets)

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None, "router not started"
        return self._server.sockets[0].getsockname()[:2]

    async def serve(self) -> None:
        """Start, then run until ``shutdown`` (SIGTERM/SIGINT under ``run``)."""
        if self._server is None:
            await self.start()
        await self._closed.wait()

    async def shutdown(self, timeout: float | None = None) -> None:
        """Stop accepting; let in-flight exchanges finish for up to ``timeout``."""
        timeout = self.config.router.drain_timeout if timeout is None else timeout
        if self._server is not None:
            self._server.close()
        for session in list(self._sessions):
            session.draining = True
            if not session.busy:
                await session.close()  # idle keep-alive: nothing to finish
        deadline = time.monotonic() + timeout
        while any(s.busy for s in self._sessions) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for session in list(self._sessions):
            await session.close()
        await self.health.stop()
        self.relay.idle.close_all()
        await self.handoff.stop()
        if self._metrics_server is not None:
            self._metrics_server.close()
        self._closed.set()

    # ------------------------------------------------------------ per client

    def _accept(self, session: ClientSession) -> "Coroutine[object, object, None] | None":
        """A new connection (``ClientSession.connection_made``): refuse it, or
        return the coroutine that serves it (the session runs it as its task)."""
        if len(self._sessions) >= self.config.limits.max_connections:
            self.metrics.refused_connections.inc()
            session.refuse(error_response(503, b"too many connections\n"))
            return None
        self._sessions.add(session)
        self.metrics.connections.inc()
        self.metrics.active_connections.inc()
        return self._on_client(session)

    async def resume(self, sock: "socket.socket", peer: tuple[str, int], requests_served: int,
                     handoff_context: object) -> None:
        """A connection handed off earlier comes back (the engine took it back
        on its client's next request, handoff/takeback.py): it is served from
        here on like any other, its requests counted on from REQUESTS_SERVED.
        ``ClientSession.reattach`` is the one way its socket comes in."""
        session = ClientSession.returning(self.config.limits, self.metrics, peer, requests_served)
        session.handoff_context = handoff_context
        await session.reattach(sock)
        serving = self._accept(session)
        if serving is not None:
            session.task = asyncio.get_running_loop().create_task(serving)
        else:
            self.handoff.forget(session)

    async def _on_client(self, session: ClientSession) -> None:
        try:
            await self._serve_session(session)
        except Exception:  # one client's bug must never take the router down
            log.exception("session with %s:%d failed", *session.peer)
        finally:
            self._sessions.discard(session)
            self.metrics.active_connections.dec()
            await session.close()
            if session.handoff_context is not None:
                self.handoff.forget(session)

    async def _serve_session(self, session: ClientSession) -> None:
        while not session.draining:
            try:
                read = await session.read_request()
            except HttpError as error:
                self._log_rejected(session, error)
                if await session.answer_and_continue(error):
                    continue
                await session.send_error(error)
                return
            except ClientGone:
                return
            if read is None:
                return
            request, head, body = read
            handed_off = await self._exchange(session, request, head, body)
            if handed_off or not session.finish_exchange():
                return

    async def _exchange(self, session: ClientSession, request: "Request", head: "h11.Request",
                        body: "RequestBody") -> bool:
        """Decide and execute one request. True if the connection was handed off."""
        started = time.perf_counter()
        status, target_name, executed, reason = 0, "", "error", ""
        try:
            decision = await self._decide(request)
            executed = decision_name(decision)
            if session.handoff_context is not None and not isinstance(decision, Handoff):
                self.handoff.forget(session)  # e.g. the reclaimed forwarding connection: closed now
            if isinstance(decision, Handoff):
                if await self._try_handoff(session, request, head, body, decision):
                    status, target_name = 200, decision.target.name
                    return True
                decision = self._fallback(decision)
                executed = decision_name(decision)
                reason = "fallback"
            if isinstance(decision, Proxy):
                result = await self.relay.relay(session, request, head, body, decision.target,
                                                self._pool_of.get(decision.target))
                status, target_name = result.status, result.target.name
            elif isinstance(decision, Local):
                status = await self._answer_local(session, request, decision)
            elif isinstance(decision, Reject):
                status = decision.status
                await session.send_complete(decision.status, decision.body or b"",
                                            [(n.encode(), v.encode()) for n, v in decision.headers],
                                            head_only=request.method == "HEAD")
            else:
                raise TypeError(f"policy returned {decision!r}, not a Decision")
        except HttpError as error:
            status, reason = error.status, error.reason
            await session.send_error(error)
            session.draining = True
        except UpstreamFailed as exc:
            status, reason = 502, "upstream-aborted"
            log.warning("aborting client %s:%d: %s", *session.peer, exc)
            session.draining = True
        except ClientGone:
            status, reason = 499, "client-gone"  # nginx's code for it: the log needs one
            session.draining = True
        except Exception as exc:
            log.exception("request %s %s failed", request.method, request.target)
            status, reason = 500, type(exc).__name__
            await session.send_error(HttpError(500, "internal", "internal error"))
            session.draining = True
        finally:
            elapsed = time.perf_counter() - started
            self.metrics.requests.labels(executed, str(status), target_name).inc()
            self.metrics.latency.labels(executed).observe(elapsed)
            if self.config.router.access_log:
                self._log_request(session, request, executed, status, target_name, elapsed, reason)
        return False

    async def _decide(self, request: "Request") -> Decision:
        decision = self.policy(request)
        if inspect.isawaitable(decision):
            decision = await decision
        return decision  # type: ignore[return-value]

    async def _try_handoff(self, session: ClientSession, request: "Request", head: "h11.Request",
                           body: "RequestBody", decision: Handoff) -> bool:
        reason = "body-streaming" if request.body is None else None
        if reason is None:
            reason = await self.handoff.hand_off(session, request, head, decision.target)
        if reason is None:
            return True
        self.metrics.fallbacks.labels(reason).inc()
        return False

    def _fallback(self, decision: Handoff) -> Decision:
        if self.config.router.fallback == "503":
            return Reject(503, b"handoff unavailable\n")
        return Proxy(decision.target)

    async def _answer_local(self, session: ClientSession, request: "Request", decision: Local) -> int:
        response = decision.handler(request)
        if inspect.isawaitable(response):
            response = await response
        if not isinstance(response, LocalResponse):
            raise TypeError(f"local handler returned {response!r}, not a LocalResponse")
        await session.send_complete(response.status, response.body,
                                    [(n.encode(), v.encode()) for n, v in response.headers],
                                    head_only=request.method == "HEAD")
        return response.status

    # ------------------------------------------------------------ logging

    def _log_request(self, session: ClientSession, request: "Request", decision: str, status: int,
                     target: str, elapsed: float, reason: str) -> None:
        record = {
            "client": f"{session.peer[0]}:{session.peer[1]}", "method": request.method,
            "target": request.target, "host": request.headers.get("host", ""),
            "decision": decision, "upstream": target, "status": status,
            "ms": round(elapsed * 1000, 3),
        }
        if reason:
            record["reason"] = reason
        access_log.info(json.dumps(record, separators=(",", ":")))

    def _log_rejected(self, session: ClientSession, error: HttpError) -> None:
        if self.config.router.access_log:
            access_log.info(json.dumps({
                "client": f"{session.peer[0]}:{session.peer[1]}", "decision": "error",
                "status": error.status, "reason": error.reason, "detail": error.detail,
            }, separators=(",", ":")))


async def run(router: Router) -> None:
    """Serve until SIGTERM or SIGINT, then drain (what ``arr serve`` does)."""
    loop = asyncio.get_running_loop()
    await router.start()
    stopping: list[asyncio.Task[None]] = []

    def stop() -> None:
        if not stopping:
            log.info("signal received: draining for up to %.1fs", router.config.router.drain_timeout)
            stopping.append(loop.create_task(router.shutdown()))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    await router.serve()
