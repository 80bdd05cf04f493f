"""When entries go (blueprint 2.2, 2.3), on the real pinned maps of both sides,
with the real kernel's sockets (loopback) as the agent's source of truth."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import time
import uuid

import pytest

from arr import netlink
from arr.inet_diag import TcpState
from arr.metrics import Metrics
from handoff.agent_lifecycle import TargetConnections
from handoff.control import CLOSED_TARGET_GONE, Closed, Holding, Release
from handoff.datapath import RouterDatapath, TargetDatapath, ensure_bpffs
from arr.config import HandoffSettings
from handoff.libbpf import BpfError
from handoff.lifecycle import PORT_QUARANTINE_NS, WATCH_SWEEP_EVERY, RouterConnections, wire_key
from handoff.maps import (FLOW_ACTIVE, FLOW_ENDED, FLOW_F_FIN, FLOW_F_NEW_SYN, FLOW_F_RST, FLOW_HOLD,
                          WATCH_CLOSED, FlowEntry, FlowKey, MirrorState, WatchEntry, Xlate)
from handoff.translate import Translation

pytestmark = pytest.mark.bpf

S = 1_000_000_000
BPF_DIR = "/run/arr/bpf"


@pytest.fixture
def instance():
    if os.geteuid() != 0:
        pytest.fail("BPF tests need root (CI runs as root); they are not skipped", pytrace=False)
    ensure_bpffs(BPF_DIR)
    name = f"test-{uuid.uuid4().hex[:8]}"
    yield name
    import shutil

    shutil.rmtree(f"{BPF_DIR}/{name}", ignore_errors=True)


def client_key(n: int) -> FlowKey:
    return FlowKey.of(("10.1.0.2", 40000 + n), ("10.1.0.1", 80))


def to_target(n: int) -> Translation:
    return Translation("10.1.0.1", "10.1.0.11", 50000 + n, 8080, 1, 2, 3, 4, 7, 7)


def router_entry(n: int, *, flags: int = 0, last: int, state: int = FLOW_ACTIVE) -> FlowEntry:
    return FlowEntry(x=Xlate.of(to_target(n)), state=state, flags=flags, last_seen_ns=last, created_ns=last,
                     conn_id=1000 + n)


def forward_key(n: int) -> FlowKey:
    return FlowKey.of(("10.1.0.11", 8080), ("10.1.0.1", 50000 + n))


def test_router_forgets_connections_when_they_are_over(instance):
    dp = RouterDatapath(BPF_DIR, instance)
    try:
        gc = RouterConnections(dp, HandoffSettings(linger=1.0, idle_timeout=60.0), Metrics())
        now = 1000 * S
        cases = {
            0: dict(flags=0, last=now - 2 * S),                       # live, quiet for 2 s: stays
            1: dict(flags=FLOW_F_RST, last=now - 2 * S),              # reset, no agent to ask, linger over: goes
            2: dict(flags=FLOW_F_RST, last=now - S // 2),             # reset, still lingering: stays
            3: dict(flags=FLOW_F_FIN, last=now - 2 * S),              # client FIN, target side alive: stays
            4: dict(flags=FLOW_F_FIN, last=now - 2 * S),              # the agent reported the target gone: goes
            5: dict(flags=0, last=now - 3600 * S),                    # silent for an hour: stays (never cut)
            6: dict(flags=0, last=now - 11 * S, state=FLOW_HOLD),     # HOLD of a dead router: goes
            7: dict(flags=0, last=now - 1 * S, state=FLOW_HOLD),      # HOLD of a handoff under way: stays
            8: dict(flags=FLOW_F_NEW_SYN, last=now, state=FLOW_ENDED),  # a new SYN took the 4-tuple: goes
        }
        for n, spec in cases.items():
            dp.ingress.update(client_key(n), router_entry(n, **spec))
            dp.watch.update(forward_key(n), WatchEntry(state=WATCH_CLOSED, closed_ns=now - 2 * S,
                                                       conn_id=1000 + n))
        gc.on_agent_message(Closed(conn_id=1004, key=_wire(forward_key(4)), packets=1, bytes=1,
                                   flags=FLOW_F_FIN | CLOSED_TARGET_GONE))
        # A CLOSED without GONE (the target sent its FIN) ends nothing; nor does
        # a GONE about another (older) connection on the same 4-tuple.
        gc.on_agent_message(Closed(conn_id=1003, key=_wire(forward_key(3)), packets=1, bytes=1, flags=FLOW_F_FIN))
        gc.on_agent_message(Closed(conn_id=77, key=_wire(forward_key(0)), packets=1, bytes=1,
                                   flags=CLOSED_TARGET_GONE))
        assert gc.sweep(now) == 4
        assert set(dp.ingress.keys()) == {client_key(n) for n in (0, 2, 3, 5, 7)}
        # Watch entries go with the target's side (4); the others keep their
        # ports taken until the agent says so or the quarantine passes.
        assert set(dp.watch.keys()) == {forward_key(n) for n in range(9) if n != 4}
        # The ENDED connection's target side is released at its agent (none here).
        assert gc.metrics.value("arr_handoff_closed_total", {"why": "new-syn"}) == 1
        # Without the agent's word, a released port is free once the quarantine
        # passed (the watch map is walked every WATCH_SWEEP_EVERY sweeps); the
        # ports of connections still live stay taken (2, reset, is over by now).
        for i in range(WATCH_SWEEP_EVERY):
            gc.sweep(now + PORT_QUARANTINE_NS + i * S)
        assert set(dp.watch.keys()) == {forward_key(n) for n in (0, 3, 5)}
        assert set(dp.ingress.keys()) == {client_key(n) for n in (0, 3, 5)}
    finally:
        dp.close()


def test_router_puts_silent_connections_to_their_agent(instance):
    dp = RouterDatapath(BPF_DIR, instance)
    try:
        gc = RouterConnections(dp, HandoffSettings(linger=1.0, idle_timeout=5.0), Metrics())
        agent = FakeAgent()
        gc.route(("10.1.0.11", 8080), ("10.1.0.11", 7070), agent)  # type: ignore[arg-type]
        now = 1000 * S
        dp.ingress.update(client_key(0), router_entry(0, last=now - 6 * S))
        dp.ingress.update(client_key(1), router_entry(1, last=now - 1 * S))
        gc.sweep(now)
        asyncio.run(gc.flush())
        assert agent.sent == [Holding(((1000, _wire(forward_key(0))),), complete=False, last=True)]
        gc.sweep(now + S)  # asked already: not again before another idle_timeout
        asyncio.run(gc.flush())
        assert len(agent.sent) == 1
        # On a new control connection, the complete list comes first.
        (sync,) = gc.holding_sync(("10.1.0.11", 7070))
        assert (set(sync.connections), sync.complete, sync.last) == (
            {(1000, _wire(forward_key(0))), (1001, _wire(forward_key(1)))}, True, True)
        assert gc.holding_sync(("10.1.0.99", 7070)) == [Holding((), complete=True, last=True)]
    finally:
        dp.close()


class FakeAgent:
    connected = True

    def __init__(self) -> None:
        self.sent: list = []

    async def send(self, message) -> None:
        self.sent.append(message)


def _wire(key: FlowKey):
    return wire_key(key)


class Session:
    def __init__(self, host: str = "127.0.0.1") -> None:
        self.sent: list = []
        self.peer_host = host

    async def send(self, message) -> None:
        self.sent.append(message)


@pytest.fixture
def loopback_pair():
    """A real TCP connection on loopback: (server-side 4-tuple key, sockets)."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    key = FlowKey.of(server.getsockname(), server.getpeername())
    yield key, client, server
    for s in (listener, client, server):
        s.close()


def test_agent_ends_entries_with_the_targets_socket(instance, loopback_pair):
    live_key, client, server = loopback_pair
    agent = TargetConnections(TargetDatapath(BPF_DIR, instance), linger=1.0)
    session = Session()
    agent.sessions = {session}
    try:
        egress, mirror = agent.datapath.egress, agent.datapath.mirror
        x = Xlate.of(Translation("10.1.0.1", "10.1.0.2", 80, 40000, 1, 2, 3, 4, 7, 7))
        gone_key = FlowKey.of(("127.0.0.1", live_key.src[1]), ("127.0.0.1", 1))  # no such socket
        egress.update(live_key, FlowEntry(x=x, state=FLOW_ACTIVE, last_seen_ns=1))  # silent for ages
        egress.update(gone_key, FlowEntry(x=x, state=FLOW_ACTIVE, flags=FLOW_F_RST, conn_id=7))
        mirror.update(gone_key, MirrorState(1, 1))
        now = 1000 * S
        assert asyncio.run(agent.sweep(now)) == 0          # gone: the linger starts
        assert asyncio.run(agent.sweep(now + S // 2)) == 0
        assert session.sent == []                           # GONE only once the entry is gone
        assert asyncio.run(agent.sweep(now + 2 * S)) == 1
        assert egress.keys() == [live_key] and mirror.keys() == []
        (closed,) = session.sent
        assert (closed.key, closed.conn_id) == (_wire(gone_key), 7)
        assert closed.flags == FLOW_F_RST | CLOSED_TARGET_GONE
        # The live socket keeps its entry however long it is silent; once the
        # target closes first and the client answers, TIME_WAIT is over too:
        # the entry goes after the linger and the TIME_WAIT socket with it.
        assert asyncio.run(agent.sweep(now + 3600 * S)) == 0
        server.close()
        client.recv(1)
        client.close()
        assert wait_until(lambda: (netlink.tcp_socket(None, live_key.src, live_key.dst) or Nothing).state
                          == TcpState.TIME_WAIT)
        asyncio.run(agent.sweep(now + 3601 * S))
        assert asyncio.run(agent.sweep(now + 3603 * S)) == 1
        assert egress.keys() == [] and netlink.tcp_socket(None, live_key.src, live_key.dst) is None
        assert agent.ended == {"closed": 2}
    finally:
        agent.datapath.close()


def test_agent_follows_the_routers_release_and_holding(instance, loopback_pair):
    live_key, client, server = loopback_pair
    agent = TargetConnections(TargetDatapath(BPF_DIR, instance), linger=1.0)
    session = Session("127.0.0.1")
    agent.sessions = {session}
    try:
        egress = agent.datapath.egress
        x = Xlate.of(Translation("10.1.0.1", "10.1.0.2", 80, 40000, 1, 2, 3, 4, 7, 7))
        other = FlowKey.of(("127.0.0.1", 8080), ("127.0.0.1", 50001))
        unknown = FlowKey.of(("127.0.0.1", 8080), ("127.0.0.1", 50002))
        elsewhere = FlowKey.of(("127.0.0.1", 8080), ("10.9.9.9", 50003))  # another router's
        for n, key in enumerate((live_key, other, elsewhere)):
            egress.update(key, FlowEntry(x=x, state=FLOW_ACTIVE, created_ns=1, conn_id=10 + n))
        # HOLDING (complete): the router holds OTHER and UNKNOWN only (and an
        # older connection on LIVE_KEY's 4-tuple, which is not the one here).
        asyncio.run(agent.holding(session, Holding(((11, _wire(other)), (99, _wire(unknown)), (5, _wire(live_key))),
                                                   complete=True, last=True)))
        assert set(egress.keys()) == {other, elsewhere}
        # The unlisted live connection was ended at the target: its peer sees a reset.
        client.settimeout(2)
        with pytest.raises(ConnectionResetError):
            client.recv(1)
        gone = {(m.conn_id, m.key) for m in session.sent if m.flags & CLOSED_TARGET_GONE}
        assert gone == {(99, _wire(unknown)), (5, _wire(live_key)), (10, _wire(live_key))}
        # A RELEASE of an older connection on a 4-tuple touches the newer one
        # there not at all (it is answered: that one is gone); the right one ends.
        session.sent.clear()
        asyncio.run(agent.release(session, Release(conn_id=4, key=_wire(other))))
        assert set(egress.keys()) == {other, elsewhere}
        asyncio.run(agent.release(session, Release(conn_id=11, key=_wire(other))))
        asyncio.run(agent.release(session, Release(conn_id=6, key=_wire(unknown))))
        assert set(egress.keys()) == {elsewhere}
        assert [(m.conn_id, m.key) for m in session.sent] == [(4, _wire(other)), (11, _wire(other)),
                                                              (6, _wire(unknown))]
        assert agent.ended == {"unlisted": 1, "released": 1}
    finally:
        agent.datapath.close()


class Nothing:
    state = None


def wait_until(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


def test_maps_have_the_configured_capacity_and_never_evict(instance):
    """A full map refuses a new connection (the handoff falls back) and keeps
    every live entry; a pin of another capacity is refused with a clear error."""
    dp = RouterDatapath(BPF_DIR, instance, capacity=8)
    try:
        for n in range(8):
            dp.ingress.update(client_key(n), router_entry(n, last=1))
        with pytest.raises(BpfError) as full:
            dp.ingress.update(client_key(8), router_entry(8, last=1))
        assert full.value.errno == errno.E2BIG
        assert set(dp.ingress.keys()) == {client_key(n) for n in range(8)}
    finally:
        dp.close()
    with pytest.raises(BpfError, match="holds at most 8 entries, the configuration asks for 16"):
        RouterDatapath(BPF_DIR, instance, capacity=16)
    again = RouterDatapath(BPF_DIR, instance, capacity=8)  # the same capacity: the pins are reused
    try:
        assert len(again.ingress.keys()) == 8
    finally:
        again.close()


def test_a_late_gone_or_release_never_touches_the_next_connection_on_a_port(instance):
    """The crossing that once hung a fast reconnecting client: a new SYN ends
    connection A (RELEASE queued), the agent reports A gone meanwhile, the
    port goes to connection B; A's late GONE must not end B at the router."""
    dp = RouterDatapath(BPF_DIR, instance)
    try:
        gc = RouterConnections(dp, HandoffSettings(linger=1.0), Metrics())
        now = 1000 * S
        a = router_entry(0, last=now, state=FLOW_ENDED)
        dp.ingress.update(client_key(0), a)
        dp.watch.update(forward_key(0), WatchEntry(state=WATCH_CLOSED, closed_ns=now, conn_id=a.conn_id))
        gc.sweep(now)                              # A released, its port still taken
        assert dp.ingress.keys() == [] and dp.watch.keys() == [forward_key(0)]
        gone_a = Closed(conn_id=a.conn_id, key=_wire(forward_key(0)), packets=1, bytes=1, flags=CLOSED_TARGET_GONE)
        gc.on_agent_message(gone_a)               # the port is free again
        assert dp.watch.keys() == []
        b = router_entry(0, last=now)              # B on the same 4-tuples
        b.conn_id = 2000
        dp.ingress.update(client_key(1), b)
        dp.watch.update(forward_key(0), WatchEntry(state=WATCH_CLOSED, closed_ns=now, conn_id=2000))
        gc.on_agent_message(gone_a)               # A's report again (the RELEASE's answer)
        gc.sweep(now + S)
        assert dp.ingress.keys() == [client_key(1)] and dp.watch.keys() == [forward_key(0)]
    finally:
        dp.close()


# ------------------------------------------------ issue 9: work follows events


def test_gone_frees_the_port_at_once_and_ends_the_ingress_entry(instance):
    """The watch entry names the client (the ingress map's write records it),
    so the agent's GONE ends both entries at once, not at a later sweep; a
    late GONE of an older connection never touches the newer one."""
    dp = RouterDatapath(BPF_DIR, instance)
    try:
        gc = RouterConnections(dp, HandoffSettings(linger=1.0), Metrics())
        a = router_entry(0, last=1)
        dp.watch.update(forward_key(0), WatchEntry(state=WATCH_CLOSED, closed_ns=1, conn_id=a.conn_id))
        dp.ingress.update(client_key(0), a)
        assert bytes(dp.watch.lookup(forward_key(0)).client) == bytes(client_key(0))
        gone = Closed(conn_id=a.conn_id, key=_wire(forward_key(0)), packets=1, bytes=1, flags=CLOSED_TARGET_GONE)
        gc.on_agent_message(gone)
        assert dp.ingress.keys() == [] and dp.watch.keys() == []
        assert gc.metrics.value("arr_handoff_closed_total", {"why": "closed"}) == 1
        b = router_entry(0, last=1)  # the next connection, on both 4-tuples
        b.conn_id = 2000
        dp.watch.update(forward_key(0), WatchEntry(state=WATCH_CLOSED, closed_ns=1, conn_id=2000))
        dp.ingress.update(client_key(0), b)
        gc.on_agent_message(gone)
        assert dp.ingress.keys() == [client_key(0)] and dp.watch.keys() == [forward_key(0)]
    finally:
        dp.close()


def test_router_acts_on_its_programs_events(instance):
    """A new SYN's event releases the entry at once (RELEASE to the agent);
    the client's RST is put to the agent at once, or, with no agent to ask,
    ends the entry after the linger."""
    from handoff.maps import EV_NEW_SYN, EV_RST, Event

    dp = RouterDatapath(BPF_DIR, instance)
    try:
        gc = RouterConnections(dp, HandoffSettings(linger=0.05), Metrics())
        agent = FakeAgent()
        gc.route(("10.1.0.11", 8080), ("10.1.0.11", 7070), agent)  # type: ignore[arg-type]
        for n in range(3):
            dp.watch.update(forward_key(n), WatchEntry(state=WATCH_CLOSED, closed_ns=1, conn_id=1000 + n))
        dp.ingress.update(client_key(0), router_entry(0, last=1, state=FLOW_ENDED, flags=FLOW_F_NEW_SYN))
        dp.ingress.update(client_key(1), router_entry(1, last=1, flags=FLOW_F_RST))
        dp.ingress.update(client_key(2), router_entry(2, last=1, flags=FLOW_F_RST))

        async def scenario():
            gc.on_events([Event(key=client_key(0), kind=EV_NEW_SYN, conn_id=1000),
                          Event(key=client_key(1), kind=EV_RST, conn_id=1001),
                          Event(key=client_key(2), kind=EV_RST, conn_id=999)])  # not this entry's
            await asyncio.sleep(0.01)
            assert set(dp.ingress.keys()) == {client_key(1), client_key(2)}
            assert agent.sent == [Release(conn_id=1000, key=_wire(forward_key(0))),
                                  Holding(((1001, _wire(forward_key(1))),), complete=False, last=True)]
            agent.connected = False
            gc.on_events([Event(key=client_key(2), kind=EV_RST, conn_id=1002)])
            await asyncio.sleep(0.2)
            assert set(dp.ingress.keys()) == {client_key(1)}

        asyncio.run(scenario())
        assert gc.metrics.value("arr_handoff_closed_total", {"why": "reset"}) == 1
    finally:
        dp.close()


def test_agent_looks_at_what_events_name_and_ends_it_at_once(instance, loopback_pair):
    """No dump, no walk: a suspect's socket is looked up exactly; live, it is
    looked at again later; over (TIME_WAIT here), the entry goes at first
    sight with the socket (linger 0), and GONE is reported."""
    live_key, client, server = loopback_pair
    agent = TargetConnections(TargetDatapath(BPF_DIR, instance))
    session = Session()
    agent.sessions = {session}
    try:
        x = Xlate.of(Translation("10.1.0.1", "10.1.0.2", 80, 40000, 1, 2, 3, 4, 7, 7))
        agent.datapath.egress.update(live_key, FlowEntry(x=x, state=FLOW_ACTIVE, conn_id=5))
        now = time.monotonic_ns()
        agent.suspect([live_key], now)
        assert asyncio.run(agent.look(now)) == 0 and agent.looked == 1
        assert agent.suspects == {}  # live, and ended only by a packet the program reports
        server.close()
        client.recv(1)
        client.close()
        assert wait_until(lambda: (netlink.tcp_socket(None, live_key.src, live_key.dst) or Nothing).state
                          == TcpState.TIME_WAIT)
        agent.suspect([live_key])  # the event of the target's ACK of the client's FIN
        assert asyncio.run(agent.look(time.monotonic_ns())) == 1
        assert agent.datapath.egress.keys() == [] and agent.suspects == {}
        assert netlink.tcp_socket(None, live_key.src, live_key.dst) is None
        (closed,) = session.sent
        assert (closed.conn_id, closed.flags & CLOSED_TARGET_GONE) == (5, CLOSED_TARGET_GONE)
    finally:
        agent.datapath.close()


def test_load_counts_each_connection_once(instance):
    """Least-connections' load (``handed_off`` per target): an entry written
    ACTIVE again (a request in place, a take-back undone) is the same
    connection; a hand-on moves it to its new target; an end counts once."""
    dp = RouterDatapath(BPF_DIR, instance)
    try:
        gc = RouterConnections(dp, HandoffSettings(), Metrics())
        told: list[tuple[tuple[str, int], int]] = []
        gc.on_load = lambda target, count: told.append((target, count))
        t0, t1 = ("10.1.0.11", 8080), ("10.1.0.12", 8080)
        now = time.monotonic_ns()
        for n in range(3):
            dp.ingress.update(client_key(n), router_entry(n, last=now))
        entry = router_entry(0, last=now)
        for _ in range(5):  # five requests in place on connection 0
            dp.ingress.update(client_key(0), entry)
        assert gc.handed_off == {t0: 3} and gc.metrics.value("arr_handed_off_connections") == 3
        # Connection 1 handed on to t1: its old conn_id ends, the new one counts there.
        old = dp.ingress.lookup(client_key(1))
        gc.handed_on(client_key(1), old)
        moved = FlowEntry(x=Xlate.of(Translation("10.1.0.1", "10.1.0.12", 50001, 8080, 1, 2, 3, 4, 7, 7)),
                          state=FLOW_ACTIVE, created_ns=now, conn_id=5001)
        dp.ingress.update(client_key(1), moved)
        assert gc.handed_off == {t0: 2, t1: 1}
        assert gc.metrics.value("arr_handoff_closed_total", {"why": "handed-on"}) == 1
        # Ending a connection twice (a report after a release) counts once.
        gc.taken_back(client_key(2), dp.ingress.lookup(client_key(2)) or router_entry(2, last=now))
        gc.taken_back(client_key(2), router_entry(2, last=now))
        assert gc.handed_off == {t0: 1, t1: 1} and gc.metrics.value("arr_handed_off_connections") == 2
        # The sweep's recount agrees, and a connection it found counts once more at most.
        gc.sweep(now)
        assert gc.handed_off == {t0: 1, t1: 1}
        dp.ingress.update(client_key(0), entry)
        assert gc.handed_off == {t0: 1, t1: 1}
        assert told[-1] in ((t0, 1), (t1, 1))
    finally:
        dp.close()
