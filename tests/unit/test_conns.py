"""``arr conns``: endpoints named the same on both sides, selection, summary,
and the owner classification of pinned instances (pure parts)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, strategies as st

from handoff.inspect import Connection, Selection, select, summarise
from handoff.instances import ORPHANED, RUNNING, STOPPED, UNKNOWN, HostFacts, OwnerRecord, classify
from handoff.maps import FlowSummary

CLIENT, VIP, FORWARD, TARGET = ("10.9.0.2", 40000), ("10.9.0.1", 80), ("10.9.1.1", 61000), ("10.9.1.11", 8080)


def flow(key, to, state="active", packets=3, size=300) -> FlowSummary:
    return FlowSummary(key=key, to=to, state=state, flags=(), packets=packets, bytes=size, idle_s=0.5, errors=0)


def test_both_sides_name_the_same_endpoints():
    router = Connection.of("router", flow((CLIENT, VIP), (FORWARD, TARGET)))
    agent = Connection.of("agent", flow((TARGET, FORWARD), (VIP, CLIENT)))
    for conn in (router, agent):
        assert (conn.client_ip, conn.client_port) == CLIENT
        assert (conn.service_ip, conn.service_port) == VIP
        assert (conn.forward_ip, conn.forward_port) == FORWARD
        assert (conn.target_ip, conn.target_port) == TARGET


def conn(client_ip="10.9.0.2", client_port=40000, target=TARGET, state="active", size=100) -> Connection:
    return Connection.of("router", flow(((client_ip, client_port), VIP), (FORWARD, target), state, 1, size))


def test_selection_by_client_prefix_port_target_and_state():
    conns = [conn(), conn(client_port=40001), conn("10.9.5.7"), conn(target=("10.9.1.12", 8080)),
             conn(state="takeback")]
    assert len(select(conns, Selection.parse("10.9.0.0/24", None))) == 4
    assert select(conns, Selection.parse("10.9.0.2:40001", None)) == [conns[1]]
    assert select(conns, Selection.parse(None, "10.9.1.12")) == [conns[3]]
    assert len(select(conns, Selection.parse(None, "10.9.1.11:8080"))) == 4
    assert select(conns, Selection.parse(None, None, ["takeback"])) == [conns[4]]
    assert select(conns, Selection.parse("10.9.5.7", "10.9.1.12")) == []


@pytest.mark.parametrize("client,target,states,message", [
    ("nonsense", None, (), "--client"), ("10.0.0.1:99999", None, (), "--client: port"),
    (None, "host:80", (), "--target"), (None, "10.0.0.1:x", (), "--target: port"),
    (None, None, ("closing",), "--state"),
])
def test_bad_selections_name_the_option(client, target, states, message):
    with pytest.raises(ValueError, match=message):
        Selection.parse(client, target, states)


ips = st.tuples(st.integers(0, 3), st.integers(1, 4)).map(lambda t: f"10.9.{t[0]}.{t[1]}")
conns_strategy = st.lists(st.builds(conn, client_ip=ips, client_port=st.integers(1, 5),
                                    state=st.sampled_from(["active", "hold", "ended", "takeback"]),
                                    size=st.integers(0, 10**6)), max_size=30)


@given(conns_strategy, st.sampled_from(["10.9.0.0/24", "10.9.0.0/16", "10.9.2.3", None]))
def test_selection_is_a_subset_and_the_summary_adds_up(conns, prefix):
    chosen = select(conns, Selection.parse(prefix, None))
    assert all(c in conns for c in chosen)
    if prefix:
        net = ipaddress.ip_network(prefix, strict=False)
        assert all(ipaddress.ip_address(c.client_ip) in net for c in chosen)
    summary = summarise(chosen)
    assert summary["connections"] == len(chosen) == sum(summary["by_state"].values())
    assert sum(summary["by_target"].values()) == len(chosen)
    assert summary["bytes"] == sum(c.bytes for c in chosen)


def test_owner_classification():
    record = OwnerRecord(instance="router-1", role="router", pid=100, netns_inode=7, bpf_dir="/run/arr/bpf",
                         started=0.0)
    assert classify(None, HostFacts({}, frozenset())) == UNKNOWN
    assert classify(record, HostFacts({100: 7}, frozenset({7}))) == RUNNING
    # The PID was reused by a process in another namespace: not the owner.
    assert classify(record, HostFacts({100: 8}, frozenset({7, 8}))) == STOPPED
    assert classify(record, HostFacts({}, frozenset({7}))) == STOPPED
    assert classify(record, HostFacts({100: 8}, frozenset({8}))) == ORPHANED
