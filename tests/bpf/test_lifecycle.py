"""When entries go (blueprint 2.2), on the real pinned maps of both sides."""

from __future__ import annotations

import asyncio
import os
import uuid

import pytest

from arr.metrics import Metrics
from handoff.agent import Agent, AgentSettings
from handoff.control import Closed
from handoff.datapath import RouterDatapath, TargetDatapath, ensure_bpffs
from handoff.engine import HandoffSettings
from handoff.lifecycle import RouterConnections
from handoff.maps import (FLOW_ACTIVE, FLOW_F_FIN, FLOW_F_RST, FLOW_HOLD, WATCH_CLOSED, FlowEntry,
                          FlowKey, MirrorState, WatchEntry, Xlate)
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
    return FlowEntry(x=Xlate.of(to_target(n)), state=state, flags=flags, last_seen_ns=last, created_ns=last)


def forward_key(n: int) -> FlowKey:
    return FlowKey.of(("10.1.0.11", 8080), ("10.1.0.1", 50000 + n))


def test_router_forgets_connections_when_they_are_over(instance):
    dp = RouterDatapath(BPF_DIR, instance)
    try:
        gc = RouterConnections(dp, HandoffSettings(secret=b"k" * 32, linger=1.0, idle_timeout=60.0), Metrics())
        now = 1000 * S
        cases = {
            0: dict(flags=0, last=now - 2 * S),                       # live, quiet for 2 s: stays
            1: dict(flags=FLOW_F_RST, last=now - 2 * S),              # reset, linger passed: goes
            2: dict(flags=FLOW_F_RST, last=now - S // 2),             # reset, still lingering: stays
            3: dict(flags=FLOW_F_FIN, last=now - 2 * S),              # client FIN, target not closed: stays
            4: dict(flags=FLOW_F_FIN, last=now - 2 * S),              # both FINs (agent said CLOSED): goes
            5: dict(flags=0, last=now - 61 * S),                      # idle past the timeout: goes
            6: dict(flags=0, last=now - 11 * S, state=FLOW_HOLD),     # HOLD of a dead router: goes
            7: dict(flags=0, last=now - 1 * S, state=FLOW_HOLD),      # HOLD of a handoff under way: stays
        }
        for n, spec in cases.items():
            dp.ingress.update(client_key(n), router_entry(n, **spec))
            dp.watch.update(forward_key(n), WatchEntry(state=WATCH_CLOSED))
        k = forward_key(4)
        gc.on_agent_message(Closed(conn_id=0, key=_wire(k), packets=1, bytes=1, flags=FLOW_F_FIN))
        assert gc.sweep(now) == 4
        left = {key for key in dp.ingress.keys()}
        assert left == {client_key(n) for n in (0, 2, 3, 7)}
        # Watch entries stay (CLOSED) to quarantine their ports; the LRU retires them.
        assert {key for key in dp.watch.keys()} == {forward_key(n) for n in range(8)}
    finally:
        dp.close()


def _wire(key: FlowKey):
    from handoff.engine import wire_key

    return wire_key(key)


class Session:
    def __init__(self) -> None:
        self.sent: list = []

    async def send(self, message) -> None:
        self.sent.append(message)


class Server:
    def __init__(self) -> None:
        self.sessions = {Session()}


def test_agent_reports_closed_until_the_entry_goes(instance):
    agent = Agent(AgentSettings(listen=("127.0.0.1", 1), secret_file="/nonexistent", linger=1.0,
                                idle_timeout=60.0, instance=instance))
    agent.datapath = TargetDatapath(BPF_DIR, instance)
    agent.server = Server()  # type: ignore[assignment]
    (session,) = agent.server.sessions
    try:
        now = 1000 * S
        egress, mirror = agent.datapath.egress, agent.datapath.mirror
        x = Xlate.of(Translation("10.1.0.1", "10.1.0.2", 80, 40000, 1, 2, 3, 4, 7, 7))
        egress.update(forward_key(0), FlowEntry(x=x, state=FLOW_ACTIVE, flags=FLOW_F_FIN, last_seen_ns=now))
        mirror.update(forward_key(0), MirrorState(1, 1))
        egress.update(forward_key(1), FlowEntry(x=x, state=FLOW_ACTIVE, last_seen_ns=now))
        assert asyncio.run(agent.sweep(now + S // 2)) == 0
        assert asyncio.run(agent.sweep(now + S // 2)) == 0
        reported = [m.key for m in session.sent]
        assert reported == [_wire(forward_key(0))] * 2  # repeated while the entry lingers
        assert asyncio.run(agent.sweep(now + 2 * S)) == 1
        assert egress.keys() == [forward_key(1)] and mirror.keys() == []
        assert asyncio.run(agent.sweep(now + 61 * S)) == 1  # idle past the timeout
        assert egress.keys() == []
        assert agent.closed_reports == 2
    finally:
        agent.datapath.close()
