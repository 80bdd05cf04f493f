"""The router: accept clients, read each request, ask the policy, execute.

    client --> ClientSession.read_request --> policy(request) --> Decision
                                                   |
        Handoff --(HandoffEngine, else fallback)---+--> Proxy --> Relay (arr.proxy)
        Local   --> in-process handler                  Reject --> status line

The handoff itself lives in the ``handoff`` package; the router only knows the
``HandoffEngine`` protocol, so it runs (falling back to proxy) without it.

Accepting is the router's own (arr/listener.py): each connection is admitted
or answered 503 the moment it is accepted, within the file-descriptor budget
of arr/fdlimit.py.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import resource
import signal
import socket
import time
from typing import TYPE_CHECKING, Awaitable, Callable, Protocol

from arr import accesslog
from arr.admin import AdminCommands, AdminError, AdminServer
from arr.config import Config, ConfigError, Limits, load_config
from arr.decisions import Decision, Handoff, Local, LocalResponse, Proxy, Reject, decision_name
from arr.fdlimit import FdPlan, fds_per_connection, plan_fds
from arr.health import HealthMonitor
from arr.listener import REFUSAL, Listener
from arr.http1 import HttpError
from arr.metrics import Metrics, serve_metrics
from arr.migration import MoveOrder, MoveReport, Overrides, PortRange, Replay, avoid, request_bytes, steer
from arr.proxy import Relay, UpstreamFailed
from arr.reload import ReloadPlan, effective_config, plan_reload
from arr.routing import Policy, build_routing
from arr.session import ClientGone, ClientSession
from arr.version import build, version

if TYPE_CHECKING:
    from collections.abc import Coroutine

    import h11

    from arr.pool import Pool, TargetState
    from arr.request import Request
    from arr.session import RequestBody

log = logging.getLogger("arr")

FIXED_FDS = 8
"""Fds the router holds whatever its configuration: stdio, listening and
metrics sockets, the spare fd, the loop's epoll and wake-up fds."""
DOWN_MOVE_WAIT = 5.0
"""Longest a move off a target found down waits for a response to complete
before it resets the connection (a dead server completes none)."""


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
                       target: "TargetState", *, deadline: float = 0.0, replay: object = None) -> str | None:
        """DEADLINE > 0: seconds the target has for its first response byte,
        else the connection comes back with REPLAY (``resume``)."""

    async def reconfigure(self, router: "Router") -> None:
        """The router's pools changed (a reload): reach the agents of new targets."""

    def forget(self, session: ClientSession) -> None:
        """SESSION (one the engine gave back with ``Router.resume``) no longer
        needs what the engine kept for it (``session.handoff_context``): its
        connection ended, or its request went elsewhere than a handoff."""

    async def migrate(self, order: MoveOrder, *, fallback_reset: bool = False) -> MoveReport:
        """Move the handed-off connections ORDER names off their target
        (``arr migrate``, a drain, a target found down)."""


class NoHandoff:
    """The engine used when no handoff data path is installed."""

    async def start(self, router: "Router") -> None:
        pass

    async def stop(self) -> None:
        pass

    async def hand_off(self, session: ClientSession, request: "Request", head: "h11.Request",
                       target: "TargetState", *, deadline: float = 0.0, replay: object = None) -> str | None:
        return "unavailable"

    async def reconfigure(self, router: "Router") -> None:
        pass

    def forget(self, session: ClientSession) -> None:
        pass

    async def migrate(self, order: MoveOrder, *, fallback_reset: bool = False) -> MoveReport:
        return MoveReport(order)  # nothing is ever handed off


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
        self.max_connections = self.config.limits.max_connections
        """Connections admitted at once: ``limits.max_connections`` until
        ``start`` fits it into the fd limit (``fd_plan``)."""
        self.fd_plan: FdPlan | None = None
        self._admitting = 0
        """Connections accepted and admitted whose session has not started yet."""
        self.listener: Listener | None = None
        self._metrics_server: asyncio.AbstractServer | None = None
        self._closed = asyncio.Event()
        self.config_path: str | None = None
        """The file ``reload`` (SIGHUP, ``arr reload``) reads again; set by ``run``."""
        self.admin: AdminServer | None = None
        self.started: float | None = None
        """When ``start`` ran (monotonic), for ``status``."""
        self._reloading = asyncio.Lock()
        self._silent: dict[ClientSession, tuple[str, int]] = {}
        """Resumed sessions whose first request is a re-dispatch, and the
        target it must avoid (``resume``)."""
        self._decided: dict[ClientSession, Decision] = {}
        """Resumed sessions whose first request the policy decided already,
        from the captured bytes (``route_captured``): asked once per request."""
        self.overrides = Overrides()
        """Where migrated clients' next requests go (arr/migration.py)."""
        self._moving: dict[tuple[str, int], asyncio.Task[MoveReport]] = {}
        """Moves off a target found down, by its address (one at a time)."""
        self.health.on_down = self._target_down
        self.metrics.watch_targets(lambda: self.pools)
        self.metrics.build_info.labels(*build()).set(1)

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        plan = self._fit_fds()
        (log.warning if plan.warning else log.info)("%s", plan.describe())
        if plan.max_connections < 1:
            raise FdLimitError(plan.describe())
        self.started = time.monotonic()
        loop = asyncio.get_running_loop()
        self.listener = Listener(self.config.router.listen, has_room=self._has_room, admit=self._on_accepted,
                                 metrics=self.metrics, connections=lambda: len(self._sessions),
                                 max_connections=lambda: self.max_connections)
        self.listener.start(loop)
        if self.config.router.metrics:
            self._metrics_server = await serve_metrics(self.metrics, *self.config.router.metrics)
        if self.config.router.admin_socket:
            commands = AdminCommands(lambda: self.pools, self.metrics, reload=self._reload_command,
                                     status=self.status, migrate=self.handoff.migrate,
                                     move_wait=self.config.handoff.migrate_wait)
            self.admin = AdminServer(commands, self.config.router.admin_socket)
            await self.admin.start()
        await self.handoff.start(self)
        self.health.start()
        log.info("arr listening on %s:%d (mode %s)", *self.address, self.config.router.mode)

    def _fit_fds(self) -> FdPlan:
        """Plan the configured limits into the fd limit (arr/fdlimit.py) and
        admit at most what it allows (at least one: ``start`` refuses a plan
        that holds none)."""
        self.fd_plan = plan = apply_fd_plan(self.config.limits, self._fds_per_connection(), self._shared_fds())
        self.max_connections = max(plan.max_connections, 1)
        self.metrics.max_connections.set(self.max_connections)
        return plan

    def _fds_per_connection(self) -> int:
        # A router without a handoff engine falls back to proxying every
        # handoff decision, whatever router.mode says.
        return fds_per_connection("proxy" if isinstance(self.handoff, NoHandoff) else "nat")

    def _shared_fds(self) -> int:
        """Fds the configuration can hold outside any client connection (what
        ``limits.reserved_fds`` must cover, arr/fdlimit.py): idle upstream
        connections, ready forwarding connections (one client profile, its
        shelf grown to its ceiling; with ``handoff.reuse_forward`` a shelf
        holds up to RETURNED_DEPTH times the pool's depth), one health probe
        per checked member."""
        from handoff.forward_pool import RETURNED_DEPTH, shelf_ceiling
        from handoff.ports import PortRange

        targets = {m.target.address for p in self.pools.values() for m in p.members}
        handoff = self.config.handoff
        # A shelf grows up to its ceiling (handoff/forward_pool.py ShelfDepth).
        ceiling = shelf_ceiling(handoff.forward_pool, handoff.forward_pool_max,
                                len(PortRange(*handoff.forward_ports)))
        ready = 0 if isinstance(self.handoff, NoHandoff) else \
            max(ceiling, handoff.forward_pool * (RETURNED_DEPTH if handoff.reuse_forward else 1))
        probes = sum(len(p.members) for p in self.pools.values() if p.health is not None)
        return FIXED_FDS + (self.config.upstream.keepalive + ready) * len(targets) + probes

    def listening_sockets(self) -> list[socket.socket]:
        assert self.listener is not None, "router not started"
        return list(self.listener.sockets)

    @property
    def address(self) -> tuple[str, int]:
        assert self.listener is not None, "router not started"
        return self.listener.sockets[0].getsockname()[:2]

    async def serve(self) -> None:
        """Start, then run until ``shutdown`` (SIGTERM/SIGINT under ``run``)."""
        if self.listener is None:
            await self.start()
        await self._closed.wait()

    async def shutdown(self, timeout: float | None = None) -> None:
        """Stop accepting; let in-flight exchanges finish for up to ``timeout``."""
        timeout = self.config.router.drain_timeout if timeout is None else timeout
        if self.listener is not None:
            self.listener.stop()
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
        if self.admin is not None:
            await self.admin.stop()
        self._closed.set()

    # ------------------------------------------------------------ reloading

    async def reload(self, config: Config) -> ReloadPlan:
        """Run with CONFIG from now on, without dropping a connection: pools,
        rules, targets, limits and upstream settings (arr/reload.py says what
        carries over and what needs a restart). Exchanges in flight finish as
        they began; new connections and requests see the new configuration.
        Raises ConfigError (nothing changed) when CONFIG cannot be run."""
        async with self._reloading:
            effective = effective_config(self.config, config)
            try:
                routing = build_routing(effective)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
            plan = plan_reload(self.config, config, self.pools, routing.pools)
            await self.health.stop()
            self.config = plan.config
            self.policy, self.pools = routing.policy, routing.pools
            self._pool_of = {m: p for p in self.pools.values() for m in p.members}
            self.health = HealthMonitor(self.pools, self.metrics)
            self.health.on_down = self._target_down
            self.relay.reconfigure(self.config.upstream, self.health)
            self._fit_fds()
            await self.handoff.reconfigure(self)
            self.health.start()
            if self.config.router.access_log != accesslog.current_destination():
                accesslog.configure(self.config.router.access_log)
            log.info("configuration reloaded: %d target(s) kept, added %s, removed %s%s",
                     len(plan.kept), list(plan.added) or "none", list(plan.removed) or "none",
                     f"; needs a restart to change: {', '.join(plan.needs_restart)}" if plan.needs_restart else "")
            return plan

    async def reload_from_file(self) -> ReloadPlan:
        """Read ``config_path`` again and ``reload``; on any error, log why and
        keep running the old configuration (the error is raised again)."""
        if self.config_path is None:
            raise ConfigError("no configuration file to reload (the router was not started from one)")
        try:
            return await self.reload(load_config(self.config_path))
        except ConfigError as exc:
            log.error("reload of %s failed, keeping the running configuration: %s", self.config_path, exc)
            raise

    async def _reload_command(self) -> dict[str, object]:
        try:
            return (await self.reload_from_file()).summary()
        except ConfigError as exc:
            raise AdminError(f"reload failed, nothing changed: {exc}") from None

    def status(self) -> dict[str, object]:
        return {"version": version(), "mode": self.config.router.mode,
                "listen": "%s:%d" % self.config.router.listen, "config": self.config_path,
                "uptime_s": None if self.started is None else round(time.monotonic() - self.started, 3),
                "connections": len(self._sessions),
                "max_connections": self.max_connections, "pools": sorted(self.pools),
                "migration_overrides": len(self.overrides),
                "moving_off": sorted("%s:%d" % a for a, t in self._moving.items() if not t.done())}

    # ------------------------------------------------------------ accepting

    def _has_room(self) -> bool:
        return len(self._sessions) + self._admitting < self.max_connections

    def _on_accepted(self, sock: socket.socket) -> None:
        """The listener admitted SOCK (arr/listener.py): give it a session."""
        self._admitting += 1
        asyncio.get_running_loop().create_task(self._admit(sock))

    async def _admit(self, sock: socket.socket) -> None:
        """Give an admitted connection its session (``connection_made`` starts it)."""
        started = False

        def serve(session: ClientSession) -> "Coroutine[object, object, None]":
            nonlocal started
            started = True
            self._admitting -= 1
            return self._begin(session)

        limits, metrics = self.config.limits, self.metrics  # as configured now (reload)
        try:
            sock.setblocking(False)
            await asyncio.get_running_loop().connect_accepted_socket(
                lambda: ClientSession(limits, metrics, serve), sock)
        except OSError as exc:  # the client left while its transport was made
            log.debug("accepted connection lost before its session: %s", exc)
            sock.close()
        finally:
            if not started:
                self._admitting -= 1

    # ------------------------------------------------------------ per client

    def _accept(self, session: ClientSession) -> "Coroutine[object, object, None] | None":
        """A connection that did not come through the listener (``resume``):
        refuse it, or return the coroutine that serves it (the session runs it
        as its task)."""
        if len(self._sessions) + self._admitting >= self.max_connections:
            self.metrics.refused_connections.inc()
            session.refuse(REFUSAL)
            return None
        return self._begin(session)

    def _begin(self, session: ClientSession) -> "Coroutine[object, object, None]":
        self._sessions.add(session)
        self.metrics.connections.inc()
        self.metrics.active_connections.inc()
        return self._on_client(session)

    async def resume(self, sock: "socket.socket", peer: tuple[str, int], requests_served: int,
                     handoff_context: object, replay: Replay | None = None, decided: object = None) -> None:
        """A connection handed off earlier comes back (the engine took it back
        on its client's next request, handoff/takeback.py, or on its own:
        handoff/migrate.py, handoff/deadline.py): it is served from here on
        like any other, its requests counted on from REQUESTS_SERVED.
        ``ClientSession.reattach`` is the one way its socket comes in.
        REPLAY: its last request, whose target stayed silent, is read again
        (before anything the client sent since) and decided without that
        target. DECIDED: the decision ``route_captured`` made for the request
        the socket holds, which is not asked of the policy again."""
        if replay is not None:
            requests_served -= 1  # the replayed request keeps its number
        session = ClientSession.returning(self.config.limits, self.metrics, peer, requests_served)
        session.handoff_context = handoff_context
        if replay is not None:
            self._silent[session] = replay.silent
        elif decided is not None:
            self._decided[session] = decided  # type: ignore[assignment]
        await session.reattach(sock, replay.raw if replay is not None else b"")
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
            self._silent.pop(session, None)
            self._decided.pop(session, None)
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
        status: int | None = 0
        target_name, executed, reason = "", "error", ""
        response_bytes: int | None = None
        chosen: "TargetState | None" = None
        try:
            decided = self._decided.pop(session, None) if self._decided else None
            decision = decided if decided is not None else await self._decide(request)
            if len(self.overrides) and decided is None:
                decision = self._steered(decision, session.peer)
            silent = self._silent.pop(session, None) if self._silent else None
            if silent is not None:
                decision, reason = self._redispatched(request, decision, silent), "redispatched"
            executed = decision_name(decision)
            chosen = getattr(decision, "target", None)
            if session.handoff_context is not None and not isinstance(decision, Handoff):
                self.handoff.forget(session)  # e.g. the reclaimed forwarding connection: closed now
            if isinstance(decision, Handoff):
                if await self._try_handoff(session, request, head, body, decision):
                    # The target answers the client directly: the router never
                    # sees the status or the bytes (accesslog.py).
                    status, target_name = None, decision.target.name
                    return True
                decision = self._fallback(decision)
                executed = decision_name(decision)
                reason = "fallback"
            if isinstance(decision, Proxy):
                result = await self.relay.relay(session, request, head, body, decision.target,
                                                self._pool_of.get(decision.target))
                status, target_name, response_bytes = result.status, result.target.name, result.response_bytes
            elif isinstance(decision, Local):
                status, response_bytes = await self._answer_local(session, request, decision)
            elif isinstance(decision, Reject):
                status, response_bytes = decision.status, len(decision.body or b"")
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
            self._record(session.peer, request, body, started, executed=executed, status=status,
                         target_name=target_name, chosen=chosen, response_bytes=response_bytes, reason=reason)
        return False

    def _record(self, peer: tuple[str, int], request: "Request", body: "RequestBody", started: float, *,
                executed: str, status: int | None, target_name: str, chosen: "TargetState | None",
                response_bytes: int | None, reason: str) -> None:
        """One request's metrics and access-log line (STATUS None: handed off)."""
        elapsed = time.perf_counter() - started
        self.metrics.requests_of(executed, "" if status is None else str(status), target_name).inc()
        if chosen is not None:
            pool = self._pool_of.get(chosen)
            if pool is not None:
                self.metrics.pool_requests_of(pool.name, executed).inc()
        self.metrics.latency_of(executed).observe(elapsed)
        if self.config.router.access_log:
            accesslog.emit(accesslog.request_record(
                client=peer, method=request.method,
                target=request.target, host=request.headers.get("host", ""),
                user_agent=request.headers.get("user-agent", ""), number=request.number,
                decision=executed, upstream=target_name, status=status, handed_off=status is None,
                request_body_bytes=body.received, response_bytes=response_bytes, duration_s=elapsed,
                reason=reason))

    async def route_captured(self, peer: tuple[str, int], requests_served: int, data: bytes,
                             send_on: Callable[["Request", "h11.Request", "TargetState"], Awaitable[bool]]
                             ) -> Decision | bool | None:
        """A handed-off client's next request, from the bytes the handoff
        engine captured (handoff/takeback.py): read and decided like any other
        (limits, policy, migration overrides). For a handoff, SEND_ON tries it
        from the captures: in place when the chosen target already holds the
        connection (handoff/inplace.py), handed on to another one otherwise:
        True when it did, and the request is counted and logged here.
        Otherwise the decision, which the engine gives back with the socket it
        rebuilds (``resume``), or None when the bytes are not one whole request
        to read without an answer (the socket's session reads it then)."""
        read = await ClientSession.read_captured(self.config.limits, self.metrics, peer, requests_served, data)
        if read is None:
            return None
        request, head, body = read
        started = time.perf_counter()
        decision = await self._decide(request)
        if len(self.overrides):
            decision = self._steered(decision, peer)
        deadline = getattr(decision, "response_deadline", None)
        if deadline is None:
            deadline = self.config.handoff.response_deadline
        # A request under a response deadline is watched from its own handoff
        # (handoff/deadline.py); a streamed body is read from the socket.
        if not isinstance(decision, Handoff) or request.body is None or deadline:
            return decision
        if not await send_on(request, head, decision.target):
            return decision
        self._record(peer, request, body, started, executed=decision_name(decision), status=None,
                     target_name=decision.target.name, chosen=decision.target, response_bytes=None, reason="")
        return True

    def steer(self, client_ip: str, ports: PortRange | None, destination: tuple[str, int]) -> None:
        """Send the client's next requests (from PORTS; None: any) to the
        target at DESTINATION for ``handoff.migrate_sticky`` seconds, where
        the policy picks a member of a pool that has it (handoff/migrate.py)."""
        until = asyncio.get_running_loop().time() + self.config.handoff.migrate_sticky
        self.overrides.add(client_ip, ports, destination, until)

    def _steered(self, decision: Decision, client: tuple[str, int]) -> Decision:
        wanted = self.overrides.lookup(client, asyncio.get_running_loop().time())
        steered = steer(decision, wanted, self._pool_of.get(getattr(decision, "target", None)))
        if steered is not decision:
            self.metrics.steered.inc()
        return steered

    def _target_down(self, pool: "Pool", member: "TargetState") -> None:
        """Health checks found MEMBER down: its handed-off connections are
        moved off it (live where idle, reset otherwise) rather than left to
        hang (``handoff.move_on_down``)."""
        address = member.target.address
        running = self._moving.get(address)
        if not self.config.handoff.move_on_down or (running is not None and not running.done()):
            return
        order = MoveOrder(source=address, destination=None, mode="live",
                          wait=min(self.config.handoff.migrate_wait, DOWN_MOVE_WAIT))
        task = asyncio.get_running_loop().create_task(self.handoff.migrate(order, fallback_reset=True))
        self._moving[address] = task
        task.add_done_callback(lambda t: self._moving.pop(address, None) if self._moving.get(address) is t else None)

    async def _decide(self, request: "Request") -> Decision:
        decision = self.policy(request)
        if inspect.isawaitable(decision):
            decision = await decision
        return decision  # type: ignore[return-value]

    def _redispatched(self, request: "Request", decision: Decision, silent: tuple[str, int]) -> Decision:
        """A re-dispatched request's decision: never the target that stayed
        silent; 504 when its pool has no other."""
        other = avoid(decision, silent, self._pool_of.get(getattr(decision, "target", None)),
                      lambda pool, excluded: pool.pick(request, exclude=excluded))
        return other if other is not None else Reject(504, b"no other target to answer in time\n")

    async def _try_handoff(self, session: ClientSession, request: "Request", head: "h11.Request",
                           body: "RequestBody", decision: Handoff) -> bool:
        reason = "body-streaming" if request.body is None else None
        if reason is None:
            deadline = decision.response_deadline
            if deadline is None:
                deadline = self.config.handoff.response_deadline
            replay = self._replay_for(request, head, decision) if deadline else None
            if replay is None:
                # An engine of one's own need not know deadlines until it is given one.
                reason = await self.handoff.hand_off(session, request, head, decision.target)
            else:
                reason = await self.handoff.hand_off(session, request, head, decision.target,
                                                     deadline=deadline, replay=replay)
        if reason is None:
            return True
        self.metrics.fallbacks.labels(reason).inc()
        return False

    def _replay_for(self, request: "Request", head: "h11.Request", decision: Handoff) -> Replay | None:
        """What a re-dispatch needs, if the request is safe to repeat: its
        body is one the router holds (``handoff.redispatch_body_max``)."""
        body = request.body or b""
        if len(body) > self.config.handoff.redispatch_body_max:
            self.metrics.redispatches.labels("not-repeatable").inc()
            return None
        return Replay(request_bytes(head.method, head.target, head.headers, body),
                      decision.target.target.address)

    def _fallback(self, decision: Handoff) -> Decision:
        if self.config.router.fallback == "503":
            return Reject(503, b"handoff unavailable\n")
        return Proxy(decision.target)

    async def _answer_local(self, session: ClientSession, request: "Request",
                            decision: Local) -> tuple[int, int]:
        response = decision.handler(request)
        if inspect.isawaitable(response):
            response = await response
        if not isinstance(response, LocalResponse):
            raise TypeError(f"local handler returned {response!r}, not a LocalResponse")
        await session.send_complete(response.status, response.body,
                                    [(n.encode(), v.encode()) for n, v in response.headers],
                                    head_only=request.method == "HEAD")
        return response.status, len(response.body)

    # ------------------------------------------------------------ logging

    def _log_rejected(self, session: ClientSession, error: HttpError) -> None:
        if self.config.router.access_log:
            accesslog.emit(accesslog.rejected_record(client=session.peer, status=error.status,
                                                     reason=error.reason, detail=error.detail))


class FdLimitError(ConfigError):
    """The fd limit leaves no room for a single client connection."""


def apply_fd_plan(limits: Limits, per_connection: int, shared_fds: int) -> FdPlan:
    """Plan within this process's RLIMIT_NOFILE (arr/fdlimit.py) and raise its
    soft limit as the plan says."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    plan = plan_fds(_limit(soft), _limit(hard), limits.max_connections, limits.reserved_fds,
                    per_connection, shared_fds)
    if plan.raises_soft_limit:
        assert plan.soft_limit is not None
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (plan.soft_limit, hard))
        except (OSError, ValueError) as exc:  # e.g. above fs.nr_open under an unlimited hard limit
            log.warning("file descriptors: cannot raise the soft limit to %d: %s", plan.soft_limit, exc)
            plan = plan_fds(_limit(soft), _limit(soft), limits.max_connections, limits.reserved_fds,
                            per_connection, shared_fds)
    return plan


def _limit(value: int) -> int | None:
    return None if value == resource.RLIM_INFINITY else value


async def run(router: Router, config_path: str | None = None) -> None:
    """What ``arr serve`` does: serve until SIGTERM or SIGINT, then drain;
    reload CONFIG_PATH on SIGHUP (a broken file changes nothing, the error is
    logged). The access log goes where ``router.access_log`` says."""
    loop = asyncio.get_running_loop()
    router.config_path = config_path
    accesslog.configure(router.config.router.access_log)
    await router.start()
    stopping: list[asyncio.Task[None]] = []
    reloads: set[asyncio.Task[object]] = set()

    def stop() -> None:
        if not stopping:
            log.info("signal received: draining for up to %.1fs", router.config.router.drain_timeout)
            stopping.append(loop.create_task(router.shutdown()))

    def reload() -> None:
        if config_path is None:
            log.warning("SIGHUP: no configuration file to reload")
            return
        log.info("SIGHUP: reloading %s", config_path)
        task = loop.create_task(_reload_quietly(router))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    loop.add_signal_handler(signal.SIGHUP, reload)
    await router.serve()


async def _reload_quietly(router: Router) -> None:
    try:
        await router.reload_from_file()
    except ConfigError:
        pass  # logged by reload_from_file; the old configuration runs on
