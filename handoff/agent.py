"""``arr agent``: the target-side daemon.

It attaches the target's egress program, serves the control channel (a
HANDOFF installs the egress entry and is answered ACK only once it is in the
map; STOP_MIRROR ends the request mirroring early, which the program also
does by itself once the request is acknowledged; RELEASE and HOLDING are the
router's word on which connections it still routes), and ends entries with
their connections, as the target's kernel tells it (handoff/agent_lifecycle.py):
driven by the egress program's events, with a slow full sweep under them, so
that its work follows what happens, not how many connections it holds.
Like the router, it leaves its program attached and its maps pinned when it
stops, so connections survive a restart.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import signal
import time
import tomllib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from arr import netlink
from arr.config import ConfigError, parse_address
from arr.metrics import serve_metrics
from handoff import framing
from handoff.agent_lifecycle import TargetConnections
from handoff.control import (TAKEN_CLOSED, TAKEN_OK, TAKEN_UNACKED, TAKEN_UNKNOWN, Ack, ControlServer,
                             HandoffRequest, Holding, Nack, Release, Shift, StopMirror, Taken, TakeBack, load_psk)
from handoff.control.outbound import (DEFAULT_MAX_HANDSHAKES, DEFAULT_MAX_SESSIONS, DEFAULT_MAX_SESSIONS_PER_ADDRESS,
                                      DEFAULT_SEND_BUFFER, DEFAULT_SEND_TIMEOUT)
from handoff.datapath import DEFAULT_BPF_DIR, TargetDatapath
from handoff.event_reader import EventReader
from handoff.lifecycle import local_key
from handoff.maps import (DEFAULT_CAPACITY, FLOW_ACTIVE, FLOW_F_ACKED, FLOW_F_FIN, FLOW_F_RST, FLOW_F_SENT, FLOW_HOLD,
                          AckShiftState, Event, FlowEntry, FlowKey, MirrorState, Xlate)
from handoff.tcpstate import rto_min_problem
from handoff.translate import AckShift, seq_after

log = logging.getLogger("arr.agent")

RESPONSE_PATIENCE_NS = 50_000_000
"""How long a response whose framing says it is unfinished holds a take-back
after the server's last packet (``_response_unfinished``): a server between
two writes of a file sends again within a moment of the client's ACK; one
that stays silent this long has finished, or its framing misled (a chunked
body with trailers), and TCP's view stands. The router asks again every
10 ms (``UNACKED_ASK_AGAIN``), so such a response's next request waits at
most this. (A HEAD response the router names: ``TakeBack.answers_head``.)"""


@dataclass(frozen=True)
class AgentSettings:
    listen: tuple[str, int]
    secret_file: str
    interfaces: tuple[str, ...] = ()
    """Where the target's replies leave; empty: the interface of ``listen``."""
    node_id: str = ""
    bpf_dir: str = DEFAULT_BPF_DIR
    instance: str | None = None
    linger: float = 0.0
    """How long an entry outlives its connection at the target; it never
    outlives it by more. 0: the entry (and a TIME_WAIT socket) goes as soon
    as the target's side is over, which frees the router's forwarding port at
    once (handoff/agent_lifecycle.py says why nothing is lost)."""
    gc_interval: float = 2.0
    """Longest interval between two looks at a closing connection's socket."""
    sweep_interval: float = 60.0
    """Seconds between two full sweeps of every entry (the safety net under
    the events: a client that vanished, a lost event)."""
    capacity: int = DEFAULT_CAPACITY
    """Handed-off connections the maps hold; HANDOFFs beyond it are refused."""
    metrics: tuple[str, int] | None = None
    """Prometheus endpoint ``host:port``; off by default."""
    control_max_sessions: int = DEFAULT_MAX_SESSIONS
    """Control connections at once, proven or not; more are refused and counted."""
    control_max_sessions_per_address: int = DEFAULT_MAX_SESSIONS_PER_ADDRESS
    """Control connections at once from one address, proven or not."""
    control_max_handshakes: int = DEFAULT_MAX_HANDSHAKES
    """Control connections at once whose peer has not proven it holds the key."""
    control_handshake_timeout: float = 5.0
    """Seconds from a control connection's accept to its peer's proof."""
    control_send_buffer: int = DEFAULT_SEND_BUFFER
    """Bytes queued for one router at most; a router that lets more pile up is dropped."""
    control_send_timeout: float = DEFAULT_SEND_TIMEOUT
    """Seconds a router may leave bytes sent to it untaken before it is dropped."""
    control_rto_min: float = 0.02
    """Floor of the control connections' retransmission timeout, in seconds:
    a lost answer (ACK, TAKEN) holds a handoff up this long instead of
    Linux's 200 ms. 0.005 to 0.2; 0: the kernel's. Linux 6.15+ (the router's
    ``handoff.rto_min`` is the same for its end)."""


def load_agent_config(path: str | Path) -> AgentSettings:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    section = data.get("agent")
    if not isinstance(section, dict):
        raise ConfigError("agent: missing [agent] table")
    unknown = set(data) - {"agent"}
    if unknown:
        raise ConfigError(f"top level: unknown key {sorted(unknown)[0]!r} (expected: agent)")
    fields = {f.name for f in dataclasses.fields(AgentSettings)}
    bad = sorted(set(section) - fields)
    if bad:
        raise ConfigError(f"agent: unknown key {bad[0]!r} (expected one of: {', '.join(sorted(fields))})")
    if "listen" not in section:
        raise ConfigError("agent.listen: required (the control channel's 'ip:port')")
    if not isinstance(section.get("secret_file"), str):
        raise ConfigError("agent.secret_file: required (path of the pre-shared key)")
    values: dict[str, Any] = dict(section)
    values["listen"] = parse_address(section["listen"], "agent.listen")
    if "metrics" in values:
        values["metrics"] = parse_address(values["metrics"], "agent.metrics", ephemeral_ok=True)
    interfaces = section.get("interfaces", [])
    if not isinstance(interfaces, list) or not all(isinstance(i, str) for i in interfaces):
        raise ConfigError("agent.interfaces: expected a list of interface names")
    values["interfaces"] = tuple(interfaces)
    for key in ("linger", "gc_interval", "sweep_interval"):
        if key in values and (not isinstance(values[key], (int, float)) or isinstance(values[key], bool)
                              or values[key] < 0 or (values[key] == 0 and key != "linger")):
            what = "a number >= 0" if key == "linger" else "a positive number"
            raise ConfigError(f"agent.{key}: must be {what}, got {values[key]!r}")
    if "capacity" in values and (not isinstance(values["capacity"], int) or isinstance(values["capacity"], bool)
                                 or not 1 <= values["capacity"] <= 1 << 24):
        raise ConfigError(f"agent.capacity: must be a whole number of connections from 1 to {1 << 24}, "
                          f"got {values['capacity']!r}")
    for key in ("control_max_sessions", "control_max_sessions_per_address", "control_max_handshakes",
                "control_send_buffer"):
        if key in values and (not isinstance(values[key], int) or isinstance(values[key], bool) or values[key] < 1):
            raise ConfigError(f"agent.{key}: must be a whole number >= 1, got {values[key]!r}")
    for key in ("control_handshake_timeout", "control_send_timeout"):
        if key in values and (not isinstance(values[key], (int, float)) or isinstance(values[key], bool)
                              or values[key] <= 0):
            raise ConfigError(f"agent.{key}: must be a positive number, got {values[key]!r}")
    if "control_rto_min" in values:
        value = values["control_rto_min"]
        problem = (f"must be a number, got {value!r}" if not isinstance(value, (int, float))
                   or isinstance(value, bool) else rto_min_problem(value))
        if problem is not None:
            raise ConfigError(f"agent.control_rto_min: {problem}")
    return AgentSettings(**values)


class AgentMetrics:
    """The agent's Prometheus view, read from its live state at scrape time."""

    def __init__(self, agent: "Agent") -> None:
        self.agent = agent
        self.registry = CollectorRegistry()
        self.registry.register(self)

    def collect(self) -> Iterator[Any]:
        agent = self.agent
        rejected = CounterMetricFamily("arr_agent_control_rejected", "Control frames rejected, by reason.",
                                       labels=["reason"])
        if agent.server is not None:
            for reason, count in sorted(agent.server.rejected.items()):
                rejected.add_metric([reason], count)
        yield rejected
        sessions = GaugeMetricFamily("arr_agent_control_sessions", "Control connections open, by stage.",
                                     labels=["stage"])
        if agent.server is not None:
            sessions.add_metric(["proven"], len(agent.server.sessions))
            sessions.add_metric(["handshake"], agent.server.connections - len(agent.server.sessions))
        yield sessions
        yield CounterMetricFamily("arr_agent_reports_unrouted",
                                  "CLOSED reports dropped: the router owning the connection was not connected.",
                                  value=agent.connections.unreported if agent.connections else 0)
        yield CounterMetricFamily("arr_agent_handoffs_installed", "Egress entries installed.",
                                  value=agent.installed)
        yield CounterMetricFamily("arr_agent_handoffs_refused", "HANDOFF requests answered NACK.",
                                  value=agent.refused)
        yield CounterMetricFamily("arr_agent_taken_back", "Connections the router took back (TAKEBACK answered OK).",
                                  value=agent.taken_back)
        yield CounterMetricFamily("arr_agent_shifted", "Re-handoffs in place: SHIFTs answered ACK.",
                                  value=agent.shifted)
        refused = CounterMetricFamily("arr_agent_shifts_refused", "SHIFTs answered NACK, by reason.",
                                      labels=["reason"])
        for reason, count in sorted(agent.shifts_refused.items()):
            refused.add_metric([reason], count)
        yield refused
        yield CounterMetricFamily("arr_agent_takeback_unsent", "TAKEBACKs told to wait: the server's socket still "
                                  "held bytes the client's window held back.", value=agent.unsent_waits)
        yield CounterMetricFamily("arr_agent_takeback_request_unacked", "TAKEBACKs told to wait: the server had "
                                  "not acknowledged all the router sent it.", value=agent.request_waits)
        yield CounterMetricFamily("arr_agent_takeback_unfinished", "TAKEBACKs told to wait: the response the "
                                  "server is writing is longer than what it sent (a pipelining client).",
                                  value=agent.unfinished_waits)
        yield CounterMetricFamily("arr_agent_takeback_sent_while_pausing", "TAKEBACKs told to wait: the server "
                                  "sent a segment while the agent paused the entry, and pausing wrote over "
                                  "its record.", value=agent.pausing_waits)
        ended = CounterMetricFamily("arr_agent_connections_ended",
                                    "Egress entries ended, by why (closed, replaced, released, unlisted).",
                                    labels=["why"])
        if agent.connections is not None:
            for why, count in sorted(agent.connections.ended.items()):
                ended.add_metric([why], count)
        yield ended
        live = GaugeMetricFamily("arr_agent_entries", "Egress entries in the map.")
        live.add_metric([], len(agent.datapath.egress.keys()) if agent.datapath else 0)
        yield live
        yield CounterMetricFamily("arr_agent_socket_lookups", "Exact sock_diag lookups of closing connections.",
                                  value=agent.connections.looked if agent.connections else 0)
        yield CounterMetricFamily("arr_agent_sweeps", "Full sweeps of every entry.", value=agent.sweeps)
        if agent.datapath is not None:
            stats = CounterMetricFamily("arr_agent_datapath_packets", "What the egress program did.",
                                        labels=["what"])
            for name, value in agent.datapath.stats().items():
                stats.add_metric([name], value)
            yield stats

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class Agent:
    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self.datapath: TargetDatapath | None = None
        self.server: ControlServer | None = None
        self.connections: TargetConnections | None = None
        self.local_addresses: set[str] = set()
        self.installed = 0
        self.refused = 0
        self.taken_back = 0
        self.unsent_waits = 0
        """TAKEBACKs answered UNACKED because the server's socket still held
        bytes (a response in the middle, held back by the client's window)."""
        self.request_waits = 0
        """TAKEBACKs told to wait for the server's ACK of what the router sent."""
        self.unfinished_waits = 0
        """TAKEBACKs told to wait: the response the server is writing is not all
        written yet (its framing says so, ``_response_unfinished``)."""
        self.pausing_waits = 0
        """TAKEBACKs told to wait: the server sent while the entry was being
        paused (``_sent_while_pausing``)."""
        self.shifted = 0
        self.shifts_refused: Counter[str] = Counter()
        """SHIFTs answered NACK, by reason (``shift_refusal``)."""
        self._diag = netlink.SockDiag(None)
        """Kept open: one exact lookup per take-back (a socket per look costs more)."""
        self.metrics = AgentMetrics(self)
        self._metrics_server: asyncio.AbstractServer | None = None
        self._gc: asyncio.Task[None] | None = None
        self._looks: asyncio.Task[None] | None = None
        self._reader: EventReader[Event] | None = None
        self.sweeps = 0

    async def start(self) -> None:
        s = self.settings
        psk = load_psk(s.secret_file)
        self.datapath = TargetDatapath(s.bpf_dir, s.instance, s.capacity)
        self.connections = TargetConnections(self.datapath, s.linger, look_cap=s.gc_interval)
        interfaces = list(s.interfaces) or [self._listen_interface()]
        self.datapath.attach_interfaces(interfaces)
        self.local_addresses = set(netlink.addresses(None)) | {s.listen[0]}
        node_id = s.node_id or f"agent@{s.listen[0]}"
        self.server = ControlServer(psk, node_id, self, *s.listen,
                                    handshake_timeout=s.control_handshake_timeout,
                                    max_sessions=s.control_max_sessions,
                                    max_sessions_per_address=s.control_max_sessions_per_address,
                                    max_handshakes=s.control_max_handshakes,
                                    send_buffer=s.control_send_buffer, send_timeout=s.control_send_timeout,
                                    rto_min_us=round(s.control_rto_min * 1_000_000))
        self.connections.sessions = self.server.sessions
        await self.server.start()
        if s.metrics is not None:
            self._metrics_server = await serve_metrics(self.metrics, *s.metrics)
        loop = asyncio.get_running_loop()
        self._reader = EventReader(self.datapath.events(), self.connections.on_events)
        self._reader.start()
        self._looks = loop.create_task(self.connections.run(), name="agent-looks")
        self._gc = loop.create_task(self._gc_loop(), name="agent-gc")
        log.info("arr agent on %s:%d, egress program on %s", *s.listen, ", ".join(interfaces))

    def _listen_interface(self) -> str:
        host = self.settings.listen[0]
        if host in ("0.0.0.0", ""):
            return netlink.route_interface(None, "1.1.1.1")[1]
        return netlink.address_interface(None, host)[1]

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        for task in (self._gc, self._looks):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self.connections is not None:
            self.connections.close()
        self._diag.close()
        if self.server is not None:
            await self.server.stop()  # bounded: the agent stops within its drain time, routers connected or not
            log.info("arr agent stopping: control connections rejected: %s",
                     ", ".join(f"{r} {n}" for r, n in sorted(self.server.rejected.items())) or "none")
        if self._metrics_server is not None:
            self._metrics_server.close()
        if self.datapath is not None:
            self.datapath.close()  # program stays attached, maps pinned

    # ------------------------------------------------------------ control

    async def on_message(self, session: Any, message: Any) -> None:
        if isinstance(message, HandoffRequest):
            reply = self._install(message, owner=session.peer_node_id)
            if isinstance(reply, Nack):
                self.refused += 1
                log.warning("refused handoff %d: %s", message.conn_id, reply.reason)
            await session.send(reply)
        elif isinstance(message, TakeBack):
            await session.send(self._take_back(message))
        elif isinstance(message, Shift):
            await session.send(self._shift(message))
        elif isinstance(message, StopMirror):
            assert self.datapath is not None
            self.datapath.mirror.delete(local_key(message.key))
        elif isinstance(message, Release):
            assert self.connections is not None
            await self.connections.release(session, message)
        elif isinstance(message, Holding):
            assert self.connections is not None
            await self.connections.holding(session, message)

    def _install(self, message: HandoffRequest, owner: str | None = None) -> Ack | Nack:
        """OWNER: the node id of the router asking, to which the entry's reports go."""
        assert self.datapath is not None
        key = local_key(message.key)
        if key.src[0] not in self.local_addresses:
            return Nack(conn_id=message.conn_id, reason=f"{key.src[0]} is not an address of this host")
        try:
            # Mirror state first: the entry makes the program act, and from its
            # first packet on it must already know what to mirror.
            self.datapath.mirror.update(key, MirrorState(mirror_until=message.mirror_until,
                                                         mirrored_ack=message.mirror_from))
            # An older entry on this 4-tuple is stale by now: the router's new
            # forwarding connection was accepted on it (and its SYN-ACK marked
            # the old entry ENDED on the way out).
            self.datapath.egress.update(key, FlowEntry(x=Xlate.of(message.translation), state=FLOW_ACTIVE,
                                                       created_ns=time.monotonic_ns(),
                                                       syn_seq=message.syn_seq, conn_id=message.conn_id))
        except OSError as exc:
            self.datapath.mirror.delete(key)
            reason = "map full" if exc.errno == errno.E2BIG else f"map update failed: {exc}"
            return Nack(conn_id=message.conn_id, reason=reason)
        assert self.connections is not None
        self.connections.installed(key, owner)
        self.installed += 1
        return Ack(conn_id=message.conn_id)

    def _unsent(self, key: FlowKey) -> bool:
        """Whether the server's socket holds bytes written but not sent yet
        (tcpi_notsent_bytes). Not wqueue: that counts sent bytes the server's
        kernel has not seen acknowledged, and the client's last ACK may ride on
        the very request the router captured, which never reaches it."""
        try:
            sock = self._diag.sockets_of([(key.src, key.dst)], info=True)[(key.src, key.dst)]
        except OSError:
            return False  # the entry's own verdict stands
        return sock is not None and bool(sock.notsent)

    def _take_back(self, message: TakeBack) -> Taken:
        """The router takes the connection back (its client sent a new request).
        Only once the client has acknowledged all the server sent: then no
        response byte is left in flight that the entry would still have to
        translate. The entry is paused first (HOLD: the program passes the
        server's packets untranslated, to the router), checked again (the
        server may have sent something meanwhile), then ended; the server's
        socket lives on, the router's rebuilt socket is its peer now."""
        assert self.datapath is not None and self.connections is not None
        key = local_key(message.key)
        conn_id = message.conn_id
        entry = self._active_entry(key, conn_id)
        if entry is None:
            return Taken(conn_id, TAKEN_UNKNOWN)
        verdict = _take_back_verdict(entry, message.acked, message.stream_end)
        if verdict == TAKEN_OK and self._response_unfinished(key, entry, message.answers_head):
            self.unfinished_waits += 1
            verdict = TAKEN_UNACKED
        if verdict != TAKEN_OK:
            if verdict == TAKEN_UNACKED and server_lacks_stream(entry, message.stream_end):
                self.request_waits += 1
            return Taken(conn_id, verdict, snd_nxt=entry.snd_max)
        # Paused from a fresh read, as close to the write as can be: the map
        # takes a whole value, and the entry read above, written back, would
        # undo what the program recorded since (snd_max past segments the
        # server sent meanwhile, which the router would then send again).
        current = self._active_entry(key, conn_id)
        if current is None:
            return Taken(conn_id, TAKEN_UNKNOWN)
        current.state = FLOW_HOLD
        self.datapath.egress.update(key, current)
        paused = self.datapath.egress.lookup(key)
        verdict = TAKEN_UNKNOWN if paused is None else _take_back_verdict(paused, message.acked, message.stream_end)
        if verdict == TAKEN_OK and self._sent_while_pausing(key, paused):
            verdict = TAKEN_UNACKED
            self.pausing_waits += 1
        if verdict == TAKEN_OK and self._unsent(key):
            # All it sent is acknowledged, but the server has written more
            # that the client's window holds back (a response in the middle):
            # taken back now, the rest would meet the router's socket.
            verdict = TAKEN_UNACKED
            self.unsent_waits += 1
        if paused is None or verdict != TAKEN_OK:
            if paused is not None:
                paused.state = FLOW_ACTIVE
                self.datapath.egress.update(key, paused)
            return Taken(conn_id, verdict, snd_nxt=entry.snd_max)
        self.datapath.egress.delete(key)
        self.datapath.mirror.delete(key)
        self.connections.taken_back(key)
        self.taken_back += 1
        return Taken(conn_id, TAKEN_OK, snd_nxt=paused.snd_max,
                     window=paused.peer_window << paused.x.wscale_in, syn_seq=paused.syn_seq)

    def _sent_while_pausing(self, key: FlowKey, paused: FlowEntry) -> bool:
        """The server sent payload past PAUSED's snd_max: between the agent's
        last read of the entry and its write of HOLD, which wrote over the
        program's record of it. The response record (another map) still has
        it: the end of the last payload the program saw leave (tail_end, kept
        for every response since its start)."""
        assert self.datapath is not None
        head = self.datapath.responses.lookup(key)
        return head is not None and framing.sent_since(head.seq, head.tail_end, paused.snd_max)

    def _active_entry(self, key: FlowKey, conn_id: int) -> FlowEntry | None:
        """KEY's egress entry if it is CONN_ID's and translating (FLOW_ACTIVE)."""
        assert self.datapath is not None
        entry = self.datapath.egress.lookup(key)
        return entry if entry is not None and entry.conn_id == conn_id and entry.state == FLOW_ACTIVE else None

    def _response_unfinished(self, key: FlowKey, entry: FlowEntry, answers_head: bool) -> bool:
        """The server's latest response has more to come than what it has sent,
        by its framing (handoff/framing.py, from the start and the last bytes
        the egress program kept), and the server sent something within
        ``RESPONSE_PATIENCE_NS``: it is between two writes of that response.
        All it sent is acknowledged and its socket holds nothing more, which
        TCP alone took for the end: a client that pipelined its next request
        mid-download had that download cut short there, and the next response
        spliced in (README "A client that pipelines",
        tests/net/test_pipelining_net.py). ANSWERS_HEAD: the router says the
        response answers a HEAD, over at its head. Past the patience the
        framing is not trusted (a server that pauses that long, or a HEAD
        response from a router that did not say so)."""
        assert self.datapath is not None
        head = self.datapath.responses.lookup(key)
        if head is None or not framing.response_unfinished(head.head(), head.seq, head.tail_bytes(),
                                                            head.tail_end, entry.snd_max, answers_head):
            return False
        return time.monotonic_ns() - entry.last_seen_ns < RESPONSE_PATIENCE_NS

    def _shift(self, message: Shift) -> Ack | Nack:
        """A re-handoff in place: from the end of the rerouted request on, the
        server's acks take the router's new delta; up to its start, the old
        one (``translate.AckShift``). The router sends the request only after
        this ACK, so no ack of it can leave with the old delta.

        The entry is read, changed and written back whole: a field the
        program writes in between is lost. So it is read again right before
        the write and checked again (as ``_take_back`` pauses): the server
        should be idle while its next request waits for this answer, but one
        that sent meanwhile (its keep-alive timer's FIN, say) is refused
        rather than written over; the program moves ``peer_ack`` and
        ``snd_max`` on with its next packet."""
        assert self.datapath is not None
        key = local_key(message.key)
        entry = self.datapath.egress.lookup(key)
        refusal = shift_refusal(entry, message)
        if refusal is None and self._response_unfinished(key, entry, message.answers_head):
            # Between two writes of the response: the router would count the
            # new one from where the rest of this one goes (shift_refusal).
            refusal = "responding"
        if refusal is None:
            entry = self.datapath.egress.lookup(key)
            refusal = shift_refusal(entry, message)
        if refusal is not None:
            self.shifts_refused[refusal] += 1
            log.info("refused to shift connection %d: %s", message.conn_id, refusal)
            return Nack(conn_id=message.conn_id, reason=refusal)
        assert entry is not None
        entry.shift = AckShiftState.of(AckShift(message.start, message.end, entry.x.ack_delta))
        entry.x.ack_delta = message.delta
        try:
            self.datapath.egress.update(key, entry)
        except OSError as exc:
            self.shifts_refused["map"] += 1
            return Nack(conn_id=message.conn_id, reason=f"map update failed: {exc}")
        self.shifted += 1
        return Ack(conn_id=message.conn_id)

    # ------------------------------------------------------------ lifecycle

    async def _gc_loop(self) -> None:
        """The full sweep: at start (what ended while the agent was down), then
        every sweep_interval."""
        while True:
            try:
                await self.sweep(time.monotonic_ns())
                self.sweeps += 1
            except Exception:
                log.exception("agent GC sweep failed")
            await asyncio.sleep(self.settings.sweep_interval)

    async def sweep(self, now_ns: int) -> int:
        assert self.connections is not None
        return await self.connections.sweep(now_ns)


def shift_refusal(entry: FlowEntry | None, message: Shift) -> str | None:
    """Why the agent cannot shift ENTRY's acks as MESSAGE asks (None: it can).
    The server must have acknowledged exactly up to where the rerouted request
    starts: less, and a request before it is still on its way (a second step
    of history the program does not keep); more, and the router's idea of the
    connection is out of date. And the client must have acknowledged all the
    server sent: the router counts the new response from there (a connection
    is moved only once its client acknowledged a byte of it, handoff/migrate.py)."""
    if entry is None or entry.conn_id != message.conn_id:
        return "unknown"
    if entry.state != FLOW_ACTIVE:
        return "not-active"
    if entry.flags & (FLOW_F_FIN | FLOW_F_RST):
        return "closed"
    if not entry.flags & FLOW_F_ACKED or entry.peer_ack != message.start:
        return "unacked"
    if not entry.flags & FLOW_F_SENT or entry.snd_max != message.acked:
        return "responding"
    return None


def _take_back_verdict(entry: FlowEntry, acked: int, stream_end: int) -> int:
    """ACKED: the client's ack (server space); STREAM_END: where the router's
    stream to the server ends (``TakeBack``)."""
    if entry.flags & (FLOW_F_FIN | FLOW_F_RST):
        return TAKEN_CLOSED
    if server_lacks_stream(entry, stream_end):
        return TAKEN_UNACKED
    # Not FLOW_F_SENT: the server has sent nothing since the handoff, not
    # even the ACK of the request: too early to tell.
    if not entry.flags & FLOW_F_SENT or entry.snd_max != acked:
        return TAKEN_UNACKED
    return TAKEN_OK


def server_lacks_stream(entry: FlowEntry, stream_end: int) -> bool:
    """The server has not acknowledged all the router sent it, up to
    STREAM_END: the router's rebuilt forwarding socket would start after
    bytes the server lacks.

    A request rerouted in place (a shift active): its resends go on
    meanwhile; unless the router never sent it (its stream ends where the
    shift starts), and the shift is void. Any other request, sent by a
    forwarding socket, rebuilt or not: nginx answers a POST on its head, so
    the client may ask again while a lost tail of the body is still in that
    socket's send queue. Let go then, and the take-back would release the
    socket with the tail (``release_now``, handoff/release.py): nginx waits
    for it and closes after 5 s. Waiting keeps the socket, and the router's
    copies, resending it."""
    shift = entry.shift
    if shift.active:
        return stream_end not in (shift.start, entry.peer_ack)
    return not entry.flags & FLOW_F_ACKED or seq_after(stream_end, entry.peer_ack)


async def run_agent(settings: AgentSettings) -> None:
    agent = Agent(settings)
    await agent.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await agent.stop()
