"""The router's side of a handoff: the blueprint's section 2.1 sequence.

``RouterHandoff.hand_off`` takes a client connection whose request has been
read and gives it to the target's unmodified server, or, having changed
nothing visible, returns the reason it could not (the router then proxies on
the same sockets). Connection lifecycle after the handoff (section 2.2) is in
``handoff.lifecycle``.

The client socket comes from the session's public interface only
(``ClientSession.detach``; ``reattach`` gives it back on a fallback). Step 4's
forwarding connection usually comes ready from ``handoff.forward_pool``; the
state reads and map writes go through the compiled ``handoff.fastpath`` (the
Python in ``handoff.tcpstate`` is their specification); step 9 is
``handoff.release``'s, one timer for all connections.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import itertools
import logging
import random
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

from arr.config import HandoffSettings
from arr.http1 import serialize_request
from arr.migration import MoveOrder, MoveReport
from arr.session import DetachError
from handoff import craft, fastpath, framing, tcpstate
from handoff.control import Ack, ControlClient, ControlUnavailable, HandoffRequest, Nack, Release
from handoff.connecting import connect
from handoff.datapath import RouterDatapath
from handoff.forward_pool import ForwardPool, ForwardProfile, ReadyForward, shelf_ceiling
from handoff.libbpf import BPF_NOEXIST, BpfError
from handoff.lifecycle import PORT_QUARANTINE_NS, RouterConnections, wire_key
from handoff.release import ForwardReleaser, PendingRelease, RequestCopy
from handoff.deadline import ResponseDeadlines
from handoff.migrate import Migrator
from handoff.takeback import HandOn, TakenBack, TakeBacks
from handoff.inplace import InPlace
from handoff.maps import (FLOW_ACTIVE, FLOW_F_RST, FLOW_HOLD, FLOW_TAKEBACK, WATCH_CLOSED, WATCH_CONNECTING,
                          WATCH_HANDED_OFF, WATCH_OPT_SACK, WATCH_OPT_TS, AckShiftState, FlowEntry, FlowKey,
                          WatchEntry, Xlate)
from handoff.ports import PortRange, choose_port
from handoff.translate import AckShift, HandoffInputs, SocketState, Translation, compute_translations, wrap

if TYPE_CHECKING:
    import h11

    from arr.metrics import Metrics
    from arr.pool import Target, TargetState
    from arr.request import Request
    from arr.server import Router
    from arr.session import ClientSession

log = logging.getLogger("arr.handoff")

HOLD_RACE_ROUNDS = 3
"""Times the state is read again when bytes reached the client socket while it
was read (a segment already past tc when the hold went in)."""


HANDSHAKE_LOSS_RTO_US = 1_000_000
"""A socket whose RTO is still this high after its handshake resent a SYN."""
RACE_CONNECT_AFTER = 0.1
"""Seconds a forwarding connection's handshake may take on a request's path
(the pool had none ready) before a second attempt races it. Linux resends a
lost SYN after 1 s, its initial RTO, which ``handoff.rto_min`` does not
lower: without the race a SYN or SYN-ACK lost on the cluster's network holds
the request that long. A handshake there takes well under a millisecond."""

KERNEL_RTO_MIN = 0.2
"""Linux's RTO floor (TCP_RTO_MIN), the one with ``handoff.rto_min`` 0: the
router sends an unacknowledged request again after twice the floor
(handoff/release.py)."""


class Fallback(Exception):
    """A handoff step failed before the point of no return; ``reason`` is counted."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def map_fallback(exc: BpfError) -> Fallback:
    """A map update refused: full (capacity reached), or another failure."""
    return Fallback("map-full" if exc.errno == errno.E2BIG else "map-error")


@dataclass
class Attempt:
    """What one handoff has set up so far, so that a fallback can undo it."""

    client_key: FlowKey
    watch_key: FlowKey | None = None
    forward: socket.socket | None = None
    held: bool = False
    agent_may_have_entry: bool = False
    conn_id: int = 0
    kernel_bytes: bytes = b""
    watch: WatchEntry | None = None
    """The forwarding connection's watch entry as its handshake left it."""
    syn_seq: int | None = None
    """The server's SYN-ACK seq when the forwarding connection is a rebuilt
    one (``ReadyForward.syn_seq``)."""
    forward_state: SocketState | None = None
    """The forwarding socket as the translations were computed from it,
    before the request: where a copy of the request goes (``RequestCopy``)."""
    request_end: int = 0
    """The forwarding socket's snd_nxt once the request is sent: mirrored
    acks beyond it are lowered to it (``WatchEntry.request_end``)."""
    asks_head: bool = False
    """The request is a HEAD (``RouterConnections.answering``)."""
    steps: list[str] = field(default_factory=list)


class RouterHandoff:
    """Implements arr.server.HandoffEngine with the BPF data path."""

    def __init__(self, settings: HandoffSettings, targets: list["Target"], metrics: "Metrics", *,
                 secret: bytes, node_id: str = "router") -> None:
        self.settings = settings
        self.secret = secret
        self.node_id = node_id
        self.forward_ports = PortRange(*settings.forward_ports)
        self.metrics = metrics
        self.targets = targets
        self.datapath: RouterDatapath | None = None
        self.agents: dict[tuple[str, int], ControlClient] = {}
        self.connections: RouterConnections | None = None
        self._ids = itertools.count(int(time.time() * 1000) << 16)
        self._source_ip: dict[tuple[str, int], str] = {}
        self._random = random.Random()
        self.releaser: ForwardReleaser | None = None
        self.pool: ForwardPool | None = None
        self.takebacks: TakeBacks | None = None
        self._stopping = False
        self._outraced: set[asyncio.Task[ReadyForward]] = set()
        """Forwarding connects that lost a race (``_open_forward_raced``), still under way."""
        self.migrator: Migrator | None = None
        self.sender = craft.RawSender()
        """The raw socket of every segment the router crafts (take-backs'
        ACKs, re-handoffs in place, request copies, moves and deadlines' probes)."""
        self.deadlines: ResponseDeadlines | None = None
        self._states_at: dict[tuple[str, int], list["TargetState"]] = {}
        self._ok = metrics.handoffs.labels("ok")
        self._fallback = metrics.handoffs.labels("fallback")
        self._handed_on = metrics.rehandoffs.labels("handed-on")
        self._same_target = metrics.rehandoffs.labels("same-target")
        self._other_target = metrics.rehandoffs.labels("other-target")

    # ---------------------------------------------------------- lifecycle

    async def start(self, router: "Router") -> None:
        host, _ = router.config.router.listen
        self.datapath = RouterDatapath(self.settings.bpf_dir, self.settings.instance, self.settings.capacity)
        self.datapath.reserve_ports(self.forward_ports)
        from arr import netlink

        client_if = netlink.address_interface(None, host)[1] if host not in ("0.0.0.0", "") else \
            netlink.route_interface(None, "1.1.1.1")[1]
        target_ifs = [netlink.route_interface(None, t.host)[1] for t in self.targets]
        self.datapath.attach_interfaces(client_if, target_ifs)
        for server_socket in router.listening_sockets():
            tcpstate.enable_saved_syn(server_socket)
        self.connections = RouterConnections(self.datapath, self.settings, self.metrics)
        self._route_targets(self.targets)
        self._track_states(router)
        self.metrics.map_capacity.set(self.settings.capacity)
        self.metrics.registry.register(_ControlClients(self.agents))
        self.connections.on_load = self._publish_load
        self.takebacks = TakeBacks(self.datapath, self.connections, self.settings, self.metrics,
                                   agent_of=self._agent_at, new_conn_id=lambda: next(self._ids),
                                   release_now=self._release_now, resume=router.resume, sender=self.sender)
        self.connections.on_captures = self.takebacks.on_captures
        self.migrator = Migrator(self.datapath, self.connections, self.takebacks, self.metrics, self.sender,
                                 resume=router.resume, steer=router.steer)
        if self.settings.rehandoff_in_place:
            in_place = InPlace(self.datapath, self.connections, self.settings, self.metrics, self.sender,
                               self._agent_at)
            self.takebacks.in_place = in_place
            self.connections.on_resends = in_place.on_resends
        if self.settings.rehandoff_hand_on:
            self.takebacks.hand_on = self.hand_on
        self.takebacks.retire = self.retire_taken
        if self.settings.rehandoff_in_place or self.settings.rehandoff_hand_on:
            self.takebacks.route = router.route_captured
        self.deadlines = ResponseDeadlines(self.datapath, self.takebacks, self.metrics, self.sender,
                                           resume=router.resume)
        self.connections.start()
        self.releaser = ForwardReleaser(self._release_forward, self.settings.request_ack_timeout,
                                        resend=self._resend_request,
                                        resend_after=2 * (self.settings.rto_min or KERNEL_RTO_MIN))
        counters = {result: self.metrics.forward_pool.labels(result)
                    for result in ("hit", "miss", "stale", "returned", "full")}
        ceiling = shelf_ceiling(self.settings.forward_pool, self.settings.forward_pool_max, len(self.forward_ports))
        if ceiling < self.settings.forward_pool_max:
            log.warning("handoff.forward_pool_max %d: a shelf grows to %d at most (a sixteenth of the %d "
                        "handoff.forward_ports, and no less than handoff.forward_pool)",
                        self.settings.forward_pool_max, ceiling, len(self.forward_ports))
        self.pool = pool = ForwardPool(self._open_forward, self._retire_forward, self.settings.forward_pool,
                                       ceiling=ceiling, count=lambda result: counters[result].inc(),
                                       clean=self._clean_handshake)
        self.metrics.forward_pool_ready.set_function(lambda: pool.ready)  # computed at scrape time
        self.metrics.forward_pool_depth.set_function(lambda: pool.kept)
        for client in self.agents.values():
            await client.start()

    def _route_targets(self, targets: list["Target"]) -> list[ControlClient]:
        """A control client per agent (new ones returned, not yet started),
        and each target's connections routed to its agent."""
        assert self.connections is not None
        new = []
        for target in targets:
            if target.agent and target.agent not in self.agents:
                client = ControlClient(self.secret, self.node_id, *target.agent,
                                       on_message=self.connections.on_agent_message,
                                       on_connect=functools.partial(self.connections.holding_sync,
                                                                    target.agent),
                                       backoff_max=2.0, rto_min_us=self.settings.rto_min_us)
                self.agents[target.agent] = client
                new.append(client)
            if target.agent:
                self.connections.route(target.address, target.agent, self.agents[target.agent])
        return new

    def _track_states(self, router: "Router") -> None:
        states: dict[tuple[str, int], list["TargetState"]] = {}
        for pool in router.pools.values():
            for state in pool.members:
                states.setdefault(state.target.address, []).append(state)
        self._states_at = states

    async def reconfigure(self, router: "Router") -> None:
        """A reload (arr/server.py ``Router.reload``): targets added get their
        interfaces attached and their agents reached; targets removed keep
        their agents, which still end their live connections."""
        if self.datapath is None:
            return
        from arr import netlink

        targets = router.config.all_targets()
        self.datapath.attach_target_interfaces([netlink.route_interface(None, t.host)[1] for t in targets])
        new_clients = self._route_targets(targets)
        self.targets = targets
        self._track_states(router)
        for client in new_clients:
            await client.start()

    async def stop(self) -> None:
        for task in list(self._outraced):
            task.cancel()  # the router is going away: no one would finish the handshake's close
        await asyncio.gather(*self._outraced, return_exceptions=True)
        if self.deadlines is not None:
            await self.deadlines.stop()
        if self.migrator is not None:
            await self.migrator.stop()
        if self.takebacks is not None:
            await self.takebacks.stop()
        if self.pool is not None:
            self._stopping = True  # what the pool closes now goes plainly (_retire_forward)
            await self.pool.close()
        if self.releaser is not None:
            await self.releaser.finish()
        for client in self.agents.values():
            await client.stop()
        if self.connections is not None:
            await self.connections.stop()
        self.sender.close()
        if self.datapath is not None:
            self.datapath.close()  # programs stay attached: handed-off connections live on

    def _clean_handshake(self, ready: ReadyForward) -> bool:
        """No packet of the handshake was lost. After a loss both ends start
        with RFC 6298's 3 s RTO, and a request or response segment lost then
        stalls a client for seconds: the target's socket if it resent its
        SYN-ACK (the router's BPF counts them), the router's own (which may
        have to resend the request) if it resent its SYN."""
        assert self.datapath is not None
        if ready.syn_seq is not None:
            return True  # rebuilt after a take-back: its handshake is long past, its RTO measured since
        watch = self.datapath.watch.lookup(ready.watch_key)
        return watch is not None and watch.synacks <= 1 and tcpstate.rto_us(ready.sock) < HANDSHAKE_LOSS_RTO_US

    def _release_now(self, watch_key: FlowKey) -> bool:
        return self.releaser is not None and self.releaser.release_now(watch_key)

    def _agent_at(self, target: tuple[str, int]) -> ControlClient | None:
        for state in self._states_at.get(target, ()):
            if state.target.agent:
                return self.agents.get(state.target.agent)
        return None

    def _publish_load(self, target: tuple[str, int], count: int) -> None:
        """Least-connections and LARD see handed-off connections as load."""
        for state in self._states_at.get(target, ()):
            state.handed_off = count

    async def migrate(self, order: MoveOrder, *, fallback_reset: bool = False) -> MoveReport:
        """Move the handed-off connections ORDER names (handoff/migrate.py)."""
        if self.migrator is None:
            return MoveReport(order)
        return await self.migrator.migrate(order, fallback_reset=fallback_reset)

    def forget(self, session: "ClientSession") -> None:
        """A taken-back connection's request went elsewhere than a handoff, or
        the connection ended: its rebuilt forwarding connection is retired
        (``retire_taken``)."""
        context = session.handoff_context
        if isinstance(context, TakenBack) and self.takebacks is not None:
            self.takebacks.drop_forward(context, reuse=True)

    # ---------------------------------------------------------- the sequence

    async def hand_off(self, session: "ClientSession", request: "Request", head: "h11.Request",
                       target: "TargetState", *, deadline: float = 0.0, replay: object = None) -> str | None:
        started = time.perf_counter()
        try:
            handed = await self._hand_off(session, request, head, target.target)
        except Fallback as fallback:
            self._fallback.inc()
            return fallback.reason
        self._ok.inc()
        self.metrics.handoff_duration.observe(time.perf_counter() - started)
        if deadline > 0 and replay is not None and self.deadlines is not None:
            self.deadlines.watch(*handed, deadline, replay)
        return None

    def _agent(self, target: "Target") -> ControlClient:
        agent = self.agents.get(target.agent) if target.agent else None
        if agent is None:
            raise Fallback("no-agent")
        if not agent.connected:
            raise Fallback("agent-unavailable")
        return agent

    def _source_for(self, target: "Target") -> str:
        """The router's address towards TARGET: a UDP connect picks it, sending nothing."""
        if target.address not in self._source_ip:
            probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                probe.connect(target.address)
                self._source_ip[target.address] = probe.getsockname()[0]
            finally:
                probe.close()
        return self._source_ip[target.address]

    async def _hand_off(self, session: "ClientSession", request: "Request", head: "h11.Request",
                        target: "Target") -> tuple[FlowKey, int, int]:
        """The handoff; (client key, conn_id, client-space seq of the
        response's first byte) once the target has the connection."""
        assert self.datapath is not None and self.connections is not None
        agent = self._agent(target)
        if ":" in session.peer[0] or ":" in target.host:
            raise Fallback("ipv6")  # the BPF programs translate IPv4 only
        if session.unsent_bytes:
            raise Fallback("unsent-data")  # the target could not retransmit them
        # From here the engine owns the socket: the session reads and writes
        # nothing until it is given back (reattach) or the target has it.
        # A connection taken back earlier (handoff/takeback.py) has no saved
        # SYN: its context says what the SYN did, and brings the rebuilt
        # forwarding connection.
        context = session.handoff_context if isinstance(session.handoff_context, TakenBack) else None
        try:
            client, held = session.detach()
        except DetachError:
            raise Fallback("client-gone") from None
        attempt = Attempt(client_key=FlowKey())
        try:
            try:
                attempt.client_key = FlowKey.of(client.getpeername()[:2], client.getsockname()[:2])
            except OSError:
                raise Fallback("client-gone") from None
            if held:
                # Bytes of a next request: forwarded with this one they would
                # reach the target unrouted. Proxied instead, each decided.
                raise Fallback("pipelined")
            await self._eligible(client)
            info = tcpstate.tcp_basics(client)
            if context is not None:
                profile = context.profile
                client_tsval, client_syn_seq = context.client_tsval, context.client_syn_seq
            else:
                # The kernel hands the saved SYN out once: keep it for later
                # attempts on this connection (after a fallback, say).
                if session.saved_syn is None:
                    session.saved_syn = tcpstate.saved_syn(client)
                syn = session.saved_syn
                if info.timestamps and syn is None:
                    raise Fallback("no-saved-syn")
                syn_info = fastpath.parse_syn(syn) if syn else None
                profile = ForwardProfile(mss=(syn_info.mss or 0) if syn_info else 0, sack=info.sack,
                                         timestamps=info.timestamps)
                client_tsval = (syn_info.tsval or 0) if syn_info else 0
                client_syn_seq = syn_info.seq if syn_info else 0
            reused = await self._connect(attempt, target, profile, context)
            self._hold(attempt, client)
            # Leaving repair mode without a window probe: reading the state
            # must not put a packet on either connection.
            c_snap = self._client_state(attempt, client)
            if attempt.kernel_bytes:
                raise Fallback("pipelined")
            request_bytes = serialize_request(request, head)
            attempt.asks_head = framing.asks_head(request_bytes)
            to_target, rcv_nxt = await self._install(attempt, agent, c_snap.tcp, len(request_bytes), client_tsval,
                                                     syn_seq=attempt.syn_seq)
        except BaseException as exc:
            fallback = exc if isinstance(exc, Fallback) else None
            if fallback is None and not isinstance(exc, Exception):
                self._roll_back(attempt, agent)  # cancelled: the router is going away
                client.close()
                raise
            if fallback is None:
                log.exception("handoff to %s failed", target.name)
                fallback = Fallback(f"error-{type(exc).__name__}")
            returned = attempt.kernel_bytes
            if fallback.reason == "urgent-data":
                returned += _discard_urgent(client)
            self._roll_back(attempt, agent)
            await session.reattach(client, returned)
            if fallback is exc:
                raise
            raise fallback from exc

        # Step 7, the point of no return: client packets are now rewritten to
        # the target; the router's socket goes away without a FIN or RST.
        c = c_snap.tcp
        self._go_live(attempt, rcv_nxt, client_entry(c, to_target, attempt.conn_id, syn_seq=client_syn_seq,
                                                     mss=profile.mss, requests=session.requests_served + 1))
        tcpstate.close_silently(client)
        if context is not None:
            (self._same_target if reused else self._other_target).inc()
        await self._send(attempt, agent, target, request_bytes)
        return attempt.client_key, attempt.conn_id, c.snd_nxt

    async def hand_on(self, on: HandOn, conn_id: int, request_bytes: bytes, target: "Target") -> str | None:
        """Hand a taken-back connection's captured request (REQUEST_BYTES,
        rewritten) to TARGET with no client socket: ON is the client's side as
        the take-back planned it (handoff/takeback.py ``plan_hand_on``), once
        the agent of CONN_ID (the connection as it was) let go. None when the
        target has it, else the fallback reason, with the ingress entry as it
        was (the take-back goes on from it).

        The same steps as a handoff from a socket, minus the client's: there
        is nothing to detach, hold or read. Nothing acknowledged the client's
        request, so the new entry keeps its region (``shift``): a
        retransmission of it is dropped at the router while the forwarding
        socket delivers the rewritten one, whose ACK, translated, acknowledges
        the client's."""
        assert self.datapath is not None and self.connections is not None
        started = time.perf_counter()
        attempt = Attempt(client_key=on.client_key, asks_head=framing.asks_head(request_bytes))
        agent: ControlClient | None = None
        try:
            agent = self._agent(target)
            if ":" in target.host:
                raise Fallback("ipv6")  # the BPF programs translate IPv4 only
            await self._connect(attempt, target, on.profile, None)
            to_target, rcv_nxt = await self._install(attempt, agent, on.client, len(request_bytes), on.client_tsval,
                                                     syn_seq=attempt.syn_seq)
            previous = self.datapath.ingress.lookup(on.client_key)
            if previous is None or previous.conn_id != conn_id or previous.state != FLOW_TAKEBACK:
                raise Fallback("entry-gone")
            if previous.flags & FLOW_F_RST:
                raise Fallback("client-reset")
        except BaseException as exc:
            self._roll_back(attempt, agent)
            if not isinstance(exc, Exception):
                raise
            self._fallback.inc()
            if isinstance(exc, Fallback):
                return exc.reason
            log.exception("handing %r on to %s failed", on.client_key, target.name)
            return f"error-{type(exc).__name__}"

        # The point of no return: the client's packets go to TARGET.
        entry = client_entry(on.client, to_target, attempt.conn_id, syn_seq=on.client_syn_seq,
                             mss=on.profile.mss, requests=on.requests + 1)
        entry.shift = AckShiftState.of(AckShift(on.request_from, on.client.rcv_nxt, previous.x.seq_delta))
        self.connections.handed_on(on.client_key, previous)
        self._go_live(attempt, rcv_nxt, entry)
        self._handed_on.inc()
        self._ok.inc()
        self.metrics.handoff_duration.observe(time.perf_counter() - started)
        await self._send(attempt, agent, target, request_bytes)
        return None

    async def _install(self, attempt: Attempt, agent: ControlClient, client: SocketState, request_len: int,
                       client_tsval: int, syn_seq: int | None = None) -> tuple[Translation, int]:
        """Steps 5 to 6 past the client's state: the translations from CLIENT
        and the forwarding socket, the target's entry installed by its agent.
        SYN_SEQ: the server's SYN-ACK seq when the forwarding connection is a
        rebuilt one (else its rcv_nxt says it). (The client -> target
        translation, the forwarding connection's rcv_nxt.)"""
        assert self.datapath is not None and attempt.forward is not None and attempt.watch_key is not None
        f_snap = fastpath.snapshot(attempt.forward)
        attempt.forward_state = f_snap.tcp
        attempt.request_end = wrap(f_snap.tcp.snd_nxt + request_len)
        watch = self.datapath.watch.lookup(attempt.watch_key)
        attempt.watch = watch
        to_target, to_client = compute_translations(HandoffInputs(
            client=client, forward=f_snap.tcp, request_len=request_len,
            client_syn_tsval=client_tsval, target_tsval=watch.target_tsval if watch else 0))
        await self._install_at_agent(attempt, agent, HandoffRequest(
            conn_id=attempt.conn_id, key=wire_key(attempt.watch_key), translation=to_client,
            mirror_from=f_snap.tcp.snd_nxt, mirror_until=attempt.request_end,
            syn_seq=syn_seq if syn_seq is not None else wrap(f_snap.tcp.rcv_nxt - 1)))
        return to_target, f_snap.tcp.rcv_nxt

    def _go_live(self, attempt: Attempt, forward_rcv_nxt: int, entry: FlowEntry) -> None:
        """Step 7's map writes: the watch entry keeps what the target's
        SYN-ACK said (a take-back rebuilds the socket with it); the ingress
        entry is ENTRY (``client_entry``)."""
        assert self.datapath is not None and self.connections is not None and attempt.watch_key is not None
        handed = attempt.watch if attempt.watch is not None else WatchEntry()
        handed.state, handed.rcv_nxt, handed.conn_id = WATCH_HANDED_OFF, forward_rcv_nxt, attempt.conn_id
        handed.request_end = attempt.request_end
        handed.client, handed.closed_ns = attempt.client_key, 0
        self.datapath.watch.update(attempt.watch_key, handed)
        self.datapath.ingress.update(attempt.client_key, entry)
        self.connections.answering(attempt.conn_id, entry.peer_ack, attempt.asks_head)

    async def _send(self, attempt: Attempt, agent: ControlClient, target: "Target", request_bytes: bytes) -> None:
        """Step 8: the request, as the target will see it; step 9 (the release
        of the forwarding socket once the target acknowledged it) is the
        releaser's, for all connections at once."""
        forward = attempt.forward
        assert forward is not None and attempt.watch_key is not None and self.releaser is not None
        try:
            sent = send_request(forward, request_bytes)
            if sent < len(request_bytes):
                await asyncio.get_running_loop().sock_sendall(forward, memoryview(request_bytes)[sent:])
        except OSError as exc:  # the connection is the target's now; it will end it
            log.warning("sending the request to %s after the handoff failed: %s", target.name, exc)
        f = attempt.forward_state
        copy = None if f is None else RequestCopy(f.local, f.remote, seq=f.snd_nxt, ack=f.rcv_nxt, mss=f.mss,
                                                  rcv_wscale=f.rcv_wscale, payload=request_bytes)
        self.releaser.add(PendingRelease(attempt.conn_id, forward, attempt.watch_key, agent, copy))

    def _resend_request(self, pending: PendingRelease, unacked: int) -> None:
        """The releaser's resend: the unacknowledged tail of a handed-off
        request, again, from the router (handoff/release.py says why)."""
        assert pending.copy is not None
        window = tcpstate.announced_window(pending.forward)
        if window is None:
            return  # Linux before 6.2: the socket's own timer resends
        self.metrics.forward_resends.inc()
        for frame in pending.copy.segments(unacked, window):
            self.sender.send(frame)

    async def _eligible(self, client: socket.socket) -> None:
        """Section 2.1 step 3: everything the router sent is acknowledged, the
        connection is established, the client has not half-closed."""
        deadline = time.monotonic() + 0.05
        while True:
            reason = fastpath.ineligible(client)
            if reason != "unacked-data" or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.002)  # a keep-alive response is usually acked within an RTT
        if reason is not None:
            raise Fallback(reason)

    async def _connect(self, attempt: Attempt, target: "Target", profile: ForwardProfile,
                       context: TakenBack | None) -> bool:
        """Step 4: an established forwarding connection whose SYN announced
        the client's options: the taken-back connection's own when it leads to
        TARGET (True: reused, no new connection at the target), else from the
        pool when one is ready, else now. A taken-back connection's that leads
        elsewhere is retired (``retire_taken``)."""
        ready = None
        if context is not None and context.forward is not None:
            forward, context.forward = context.forward, None
            if context.target == target.address:
                ready = forward
            else:
                self.retire_taken(forward, context.target, context.profile)
        reused = ready is not None
        if ready is None and self.pool is not None:
            ready = self.pool.take(target, profile)
        if ready is None:
            ready = await self._open_forward_raced(target, profile)
        attempt.forward, attempt.watch_key, attempt.conn_id = ready.sock, ready.watch_key, ready.conn_id
        attempt.syn_seq = ready.syn_seq
        return reused

    def retire_taken(self, ready: ReadyForward, target: tuple[str, int], profile: ForwardProfile) -> None:
        """A taken-back connection's forwarding connection (READY, to TARGET,
        opened for PROFILE) whose next request went elsewhere: back to the
        pool for the next handoff to TARGET (``handoff.reuse_forward``) when
        its shelf has room, else closed (a FIN: an ordinary close for the
        target, handoff/forward_close.py)."""
        assert self.takebacks is not None
        if self.settings.reuse_forward and self.pool is not None and not self._stopping:
            states = self._states_at.get(target, ())
            # Not for a target the policies avoid: it would only age out.
            if any(state.healthy and not state.draining for state in states) and \
                    self.pool.give_back(target, profile, ready):
                return
        self.takebacks.close_forward(ready)

    async def _open_forward(self, target: "Target", profile: ForwardProfile) -> ReadyForward:
        """Forwarding socket, watch entry (the BPF normalises the SYN to
        PROFILE and records the target's SYN-ACK), connect. Cleans up after
        itself when it fails."""
        assert self.datapath is not None and self.connections is not None
        forward = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        forward.setblocking(False)
        conn_id = next(self._ids)
        try:
            watch_key = self._bind_forward(forward, target)
            self.datapath.watch.update(watch_key, WatchEntry(
                state=WATCH_CONNECTING, client_mss=profile.mss, client_sack=int(profile.sack),
                client_ts=int(profile.timestamps), conn_id=conn_id))
        except BpfError as exc:
            forward.close()
            raise map_fallback(exc) from None
        except BaseException:
            forward.close()
            raise
        ready = ReadyForward(forward, watch_key, conn_id)
        self.connections.in_flight.add(watch_key)
        try:
            tcpstate.bound_retransmissions(forward, min_us=self.settings.rto_min_us)
            async with asyncio.timeout(self.settings.connect_timeout):
                await connect(forward, target.address)
        except (OSError, TimeoutError):
            self._discard_forward(ready)
            raise Fallback("target-connect") from None
        except BaseException:
            self._discard_forward(ready)
            raise
        return ready

    async def _open_forward_raced(self, target: "Target", profile: ForwardProfile) -> ReadyForward:
        """``_open_forward`` on a request's path: after RACE_CONNECT_AFTER a
        second attempt joins, the first established wins. The other finishes
        its handshake and is closed as the pool closes an unused connection
        (a FIN). Cancelled halfway, its socket would meet the target's
        retransmitted SYN-ACK with a RST, and free its port while the
        target still holds the half-open connection."""
        loop = asyncio.get_running_loop()
        attempts = [loop.create_task(self._open_forward(target, profile))]
        winner: asyncio.Task[ReadyForward] | None = None
        try:
            done, _ = await asyncio.wait(attempts, timeout=RACE_CONNECT_AFTER)
            if not done:
                self.metrics.forward_connect_races.inc()
                attempts.append(loop.create_task(self._open_forward(target, profile)))
            pending: set[asyncio.Task[ReadyForward]] = set(attempts)
            failure: BaseException | None = None
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if task.exception() is None:
                        winner = task
                        return task.result()
                    failure = failure or task.exception()
            assert failure is not None
            raise failure
        finally:
            for task in attempts:
                if task is not winner:
                    self._outraced.add(task)
                    task.add_done_callback(self._drop_raced)

    def _drop_raced(self, task: "asyncio.Task[ReadyForward]") -> None:
        self._outraced.discard(task)
        if not task.cancelled() and task.exception() is None:
            self._retire_forward(task.result())

    def _retire_forward(self, ready: ReadyForward) -> None:
        """A ready connection the pool closes unused (too old, or no shelf for
        it): a FIN, and once the server answered, the router's TIME_WAIT
        socket destroyed after its hold (handoff/forward_close.py), as for a
        taken-back connection's. Closed plainly, it would hold its forward
        port in TIME_WAIT for a minute: about 60 / MAX_AGE ports per shelf
        whose connections go stale. Plainly when the router is stopping: no
        one would finish the exchange."""
        if self.takebacks is not None and not self._stopping:
            self.takebacks.close_forward(ready)
        else:
            self._discard_forward(ready)

    def _discard_forward(self, ready: ReadyForward) -> None:
        """A forwarding connection that carried nothing: an ordinary close."""
        assert self.datapath is not None and self.connections is not None
        ready.sock.close()
        self.connections.in_flight.discard(ready.watch_key)
        self.datapath.watch.delete(ready.watch_key)

    def _bind_forward(self, forward: socket.socket, target: "Target") -> FlowKey:
        """Bind the forwarding socket to a port of ``forward_ports`` that no
        connection to TARGET uses, live or possibly still held by the target.

        bind(0) cannot be used: it would happily return a port whose previous
        connection the router released silently moments ago. A watch entry
        marks a port taken until the agent reports the target's side gone
        (handoff/lifecycle.py deletes it then); without that report, until
        the quarantine has passed."""
        assert self.datapath is not None
        source = self._source_for(target)
        now = time.monotonic_ns()

        def free(port: int) -> bool:
            previous = self.datapath.watch.lookup(FlowKey.of(target.address, (source, port)))
            return previous is None or (previous.state == WATCH_CLOSED and previous.closed_ns != 0
                                        and now - previous.closed_ns > PORT_QUARANTINE_NS)

        for _ in range(8):
            port = choose_port(self.forward_ports, free, self._random)
            if port is None:
                break
            try:
                forward.bind((source, port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    continue  # a socket of this host holds it (a stray bind by another program)
                raise
            return FlowKey.of(target.address, (source, port))
        raise Fallback("no-forward-port")

    def _hold(self, attempt: Attempt, client: socket.socket) -> None:
        """Step 5: drop the client's packets while the state is read. Bytes the
        kernel already queued are taken now: they are part of the stream.

        An entry left on this 4-tuple by an earlier connection (ENDED by this
        connection's SYN, not yet swept) is ended properly first."""
        assert self.datapath is not None and self.connections is not None
        previous = self.datapath.ingress.lookup(attempt.client_key)
        if previous is not None:
            self.connections.end_replaced(attempt.client_key, previous)
        try:
            self.datapath.ingress.update(attempt.client_key, FlowEntry(state=FLOW_HOLD,
                                                                       created_ns=time.monotonic_ns()),
                                         BPF_NOEXIST)
        except BpfError as exc:
            raise map_fallback(exc) from None
        attempt.held = True
        attempt.kernel_bytes = fastpath.drain(client)

    def _client_state(self, attempt: Attempt, client: socket.socket) -> "tcpstate.ConnectionSnapshot":
        """The client socket's state, proven complete: after the read the
        receive queue is still empty and the connection still eligible, so
        every byte (and no FIN) counted in rcv_nxt is in userspace and will be
        forwarded. A segment that was already past tc when the hold went in
        can land while the state is read: its bytes are taken and the state
        read again; its FIN makes the connection half-closed (fallback)."""
        for _ in range(HOLD_RACE_ROUNDS):
            snap = fastpath.snapshot(client)
            late = fastpath.drain(client)
            attempt.kernel_bytes += late
            reason = fastpath.ineligible(client)
            if reason is not None:
                raise Fallback(reason)
            if not late:
                return snap
        raise Fallback("hold-race")

    async def _install_at_agent(self, attempt: Attempt, agent: ControlClient, message: HandoffRequest) -> None:
        """Step 6: no target byte may reach the client before the agent's ACK."""
        attempt.agent_may_have_entry = True
        try:
            reply = await agent.request(message, timeout=self.settings.agent_timeout)
        except ControlUnavailable:
            raise Fallback("agent-unavailable") from None
        except (asyncio.TimeoutError, TimeoutError):
            raise Fallback("agent-timeout") from None
        if isinstance(reply, Nack):
            attempt.agent_may_have_entry = False
            raise Fallback("agent-nack")
        if not isinstance(reply, Ack):
            raise Fallback("agent-protocol")

    def _roll_back(self, attempt: Attempt, agent: ControlClient | None = None) -> None:
        """Undo whatever the attempt set up; the client connection is intact
        (the caller gives it back to the session)."""
        assert self.datapath is not None and self.connections is not None
        if attempt.held:
            self.datapath.ingress.delete(attempt.client_key)
        if attempt.forward is None or attempt.watch_key is None:
            return  # _connect sets both together, once connected
        if not attempt.agent_may_have_entry:
            self._discard_forward(ReadyForward(attempt.forward, attempt.watch_key, attempt.conn_id))
            return
        # The agent may yet install an entry: make sure the target's side of
        # this connection never speaks to the client (CLOSED before the close:
        # see _release_forward).
        self.connections.in_flight.discard(attempt.watch_key)
        self.datapath.watch.update(attempt.watch_key, WatchEntry(
            state=WATCH_CLOSED, closed_ns=time.monotonic_ns(), conn_id=attempt.conn_id,
            client=attempt.client_key))
        if agent is not None:
            # An agent that answers late (paused, overloaded) would install
            # the entry after the router gave up: the RELEASE behind the
            # HANDOFF on the same stream ends it.
            _post(agent, Release(conn_id=attempt.conn_id, key=wire_key(attempt.watch_key)))
        tcpstate.close_silently(attempt.forward)

    def _release_forward(self, pending: PendingRelease, acknowledged: bool) -> None:
        """Step 9 (called by the releaser): the target acknowledged the request
        (seen through the mirrored ACKs), or the wait is over; drop the
        forwarding socket silently, stop the mirror."""
        assert self.datapath is not None and self.connections is not None
        if not acknowledged:
            log.warning("connection %d: request not acknowledged after %.0fs; releasing anyway",
                        pending.conn_id, self.settings.request_ack_timeout)
        # CLOSED first, then the close: a mirrored ACK passed up to a stack
        # that no longer has the socket would make the router's kernel answer
        # the target with a RST, killing the handed-off connection.
        entry = self.datapath.watch.lookup(pending.watch_key)
        if entry is not None:
            entry.state = WATCH_CLOSED
            entry.closed_ns = time.monotonic_ns()
            self.datapath.watch.update(pending.watch_key, entry)
        tcpstate.close_silently(pending.forward)
        self.connections.in_flight.discard(pending.watch_key)
        # No STOP_MIRROR: the target's program ends the mirror by itself once
        # the request is acknowledged (handoff/bpf/target.bpf.c, a short tail
        # for a lost mirrored ACK), which saves a message per handoff.


def client_entry(c: SocketState, to_target: Translation, conn_id: int, *, syn_seq: int, mss: int,
                 requests: int) -> FlowEntry:
    """The ingress entry of a connection handed off from the router's side
    of it, C (read from its socket, or planned by a hand-on): what the
    client's SYN announced (SYN_SEQ, MSS, its options), where the bytes routed
    so far end (take_from: the client's next request is taken back,
    handoff/takeback.py), REQUESTS routed so far."""
    return FlowEntry(
        x=Xlate.of(to_target), state=FLOW_ACTIVE, created_ns=time.monotonic_ns(),
        syn_seq=syn_seq, seq_next=c.rcv_nxt or 1, conn_id=conn_id,
        peer_ack=c.snd_nxt,  # the send queue was empty: the client has acknowledged all of it
        take_from=c.rcv_nxt, client_mss=mss or c.mss, router_wscale=c.rcv_wscale,
        client_opts=(WATCH_OPT_SACK if c.sack else 0) | (WATCH_OPT_TS if c.timestamps else 0),
        requests=min(requests, 0xFFFF))


def send_request(forward: socket.socket, request_bytes: bytes) -> int:
    """Bytes of the request the forwarding socket took at once: a fresh
    connection's send buffer takes a request whole, the loop's machinery is
    only for what does not fit. (Its own frame in a profile: the send runs
    the packet's way to the target, benchmarks/report.py ``ROLES``.)"""
    try:
        return forward.send(request_bytes)
    except BlockingIOError:
        return 0


def _post(agent: ControlClient, message: Release) -> None:
    """Fire and forget; an agent that is down learns it through the HOLDING
    sync when it is back."""
    try:
        agent.post(message)
    except ControlUnavailable:
        pass


def _discard_urgent(client: socket.socket) -> bytes:
    """HTTP has no use for TCP urgent data, but an unread urgent byte makes the
    eventual close() a RST. Take it out of band, then read past its place in
    the stream; the ordinary bytes read are returned (they go back to the
    session, in order)."""
    try:
        client.recv(1, socket.MSG_OOB)
        return client.recv(65536, socket.MSG_DONTWAIT)
    except (BlockingIOError, OSError):
        return b""


class _ControlClients:
    """``arr_control_rejected_total{agent,reason}``: what the router's control
    clients refused from their agents (handoff/control/channel.py); and
    ``arr_agent_connected{agent}``: whether the session with each is up
    (while it is not, handoffs to its targets fall back, ``agent-unavailable``).
    Read at scrape time."""

    def __init__(self, agents: dict[tuple[str, int], ControlClient]) -> None:
        self.agents = agents

    def describe(self) -> list[object]:
        return []

    def collect(self) -> Iterator[object]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        family = CounterMetricFamily("arr_control_rejected", "Control frames or connections the router "
                                     "refused from an agent, by reason.", labels=["agent", "reason"])
        connected = GaugeMetricFamily("arr_agent_connected", "1 while the router's control session with the "
                                      "agent is up; 0: handoffs to its targets fall back (agent-unavailable).",
                                      labels=["agent"])
        for (host, port), client in sorted(self.agents.items()):
            for reason, count in sorted(client.rejected.items()):
                family.add_metric([f"{host}:{port}", reason], count)
            connected.add_metric([f"{host}:{port}"], float(client.connected))
        yield family
        yield connected

