"""The pure half of connection migration (arr/migration.py): orders, which
connections an order names, the overrides that steer moved clients' next
requests, and the report."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings, strategies as st

from arr.decisions import Handoff, Local, LocalResponse, Proxy, Reject
from arr.migration import (Candidate, MoveOrder, MoveReport, OrderError, Overrides, PortRange, select,
                           steer)
from arr.policies import RoundRobin
from arr.pool import Pool, Target

A, B, C = ("10.0.0.11", 80), ("10.0.0.12", 80), ("10.0.0.13", 80)


# ------------------------------------------------------------------ PortRange


@pytest.mark.parametrize("value,first,last", [
    (8000, 8000, 8000), ("8000", 8000, 8000), ("8000-8099", 8000, 8099), (" 8000-8099 ", 8000, 8099),
    (1, 1, 1), (65535, 65535, 65535), ("1-65535", 1, 65535), ("80-80", 80, 80),
])
def test_port_ranges_parse(value, first, last):
    ports = PortRange.parse(value)
    assert (ports.first, ports.last) == (first, last)


@pytest.mark.parametrize("value", [
    0, 65536, -1, "0", "65536", "8099-8000", "0-10", "10-65536", "", "-", "80-", "-80", "abc", "80-abc",
    "80-90-100", 80.0, None, True, False, [80], "8 0",
])
def test_bad_port_ranges_are_refused_naming_the_field(value):
    with pytest.raises(OrderError, match=r"^port: "):
        PortRange.parse(value)


def test_a_port_range_contains_its_ends_and_only_ints():
    ports = PortRange.parse("8000-8002")
    assert [p for p in range(7998, 8005) if p in ports] == [8000, 8001, 8002]
    assert "8000" not in ports and None not in ports
    assert str(ports) == "8000-8002" and str(PortRange.parse(443)) == "443"


# ------------------------------------------------------------------ MoveOrder


@pytest.mark.parametrize("kwargs,field", [
    ({"mode": "teleport"}, "mode"), ({"mode": "LIVE"}, "mode"), ({"mode": ""}, "mode"),
    ({"limit": -1}, "max"),
    ({"wait": 0}, "wait"), ({"wait": -1.0}, "wait"), ({"wait": 3600.001}, "wait"),
    ({"wait": float("nan")}, "wait"), ({"wait": float("inf")}, "wait"),
    ({"destination": A}, "to"),
])
def test_bad_orders_are_refused_naming_the_field(kwargs, field):
    with pytest.raises(OrderError, match=rf"^{field}: "):
        MoveOrder(source=A, **{"destination": B, **kwargs})


def test_good_orders_keep_their_fields():
    order = MoveOrder(source=A, destination=None, mode="reset", limit=0, wait=3600)
    assert (order.source, order.destination, order.mode, order.limit, order.wait) == (A, None, "reset", 0, 3600)
    default = MoveOrder(source=A, destination=B)
    assert (default.mode, default.clients, default.ports, default.limit, default.wait) == (
        "live", None, None, None, 30.0)


@pytest.mark.parametrize("value,network", [
    (None, None), ("", None), ("10.1.2.3", "10.1.2.3/32"), ("10.1.2.0/24", "10.1.2.0/24"),
    ("10.1.2.3/24", "10.1.2.0/24"),  # host bits allowed (strict=False)
    ("0.0.0.0/0", "0.0.0.0/0"),
])
def test_clients_parse(value, network):
    parsed = MoveOrder.parse_clients(value)
    assert (str(parsed) if parsed is not None else None) == network
    assert parsed is None or isinstance(parsed, ipaddress.IPv4Network)


@pytest.mark.parametrize("value", ["10.0.0.256", "10.0.0.0/33", "nope", "10.0.0", "10.0.0.0/-1", False])
def test_bad_clients_are_refused_naming_the_field(value):
    with pytest.raises(OrderError, match=r"^client: expected an IPv4 address or CIDR"):
        MoveOrder.parse_clients(value)


@pytest.mark.parametrize("value", ["::1", "2001:db8::/32", "::ffff:10.0.0.1"])
def test_ipv6_clients_are_refused_naming_the_field(value):
    with pytest.raises(OrderError, match=r"^client: handed-off connections are IPv4"):
        MoveOrder.parse_clients(value)


def test_matches_says_why_a_client_is_not_named():
    order = MoveOrder(source=A, destination=B, clients=MoveOrder.parse_clients("192.0.2.0/24"),
                      ports=PortRange.parse("1000-1999"))
    assert order.matches(("192.0.2.7", 1000)) is None
    assert order.matches(("192.0.2.255", 1999)) is None
    assert order.matches(("192.0.3.7", 1000)) == "client"
    assert order.matches(("192.0.3.7", 5)) == "client"  # the client is checked first
    assert order.matches(("192.0.2.7", 2000)) == "port"
    assert MoveOrder(source=A, destination=B).matches(("203.0.113.9", 1)) is None


# --------------------------------------------------------------------- select


def conn(ip: str, port: int, target=A, busy: bool = False) -> Candidate:
    return Candidate((ip, port), target, busy)


def test_select_takes_every_idle_connection_of_the_source_in_address_order():
    candidates = [conn("10.9.0.10", 5), conn("10.9.0.9", 7), conn("10.9.0.9", 3), conn("10.9.0.100", 1),
                  conn("9.255.255.255", 60000)]
    selection = select(MoveOrder(source=A, destination=B), candidates)
    # Numeric order of addresses (10.9.0.9 < 10.9.0.10 < 10.9.0.100), not string order.
    assert [c.client for c in selection.chosen] == [
        ("9.255.255.255", 60000), ("10.9.0.9", 3), ("10.9.0.9", 7), ("10.9.0.10", 5), ("10.9.0.100", 1)]
    assert selection.left == {}


def test_select_filters_by_client_and_port_and_counts_the_rest():
    order = MoveOrder(source=A, destination=B, clients=MoveOrder.parse_clients("10.1.0.0/16"),
                      ports=PortRange.parse("2000-2999"))
    candidates = [conn("10.1.2.3", 2000), conn("10.1.2.4", 2999), conn("10.2.0.1", 2500),
                  conn("10.3.0.1", 2500), conn("10.1.0.1", 1999), conn("10.1.0.1", 3000),
                  conn("10.1.0.2", 2100, busy=True), conn("10.2.0.2", 2100, busy=True)]
    selection = select(order, candidates)
    assert [c.client for c in selection.chosen] == [("10.1.2.3", 2000), ("10.1.2.4", 2999)]
    # A busy connection the order does not name counts by why it is not named.
    assert selection.left == {"client": 3, "port": 2, "busy": 1}


def test_other_targets_connections_are_ignored_entirely():
    candidates = [conn("10.0.1.1", 1, target=B), conn("10.0.1.2", 2, target=C, busy=True),
                  conn("10.0.1.3", 3, target=B), conn("10.0.1.4", 4)]
    order = MoveOrder(source=A, destination=B, clients=MoveOrder.parse_clients("10.0.1.4"), limit=0)
    selection = select(order, candidates)
    assert selection.chosen == [] and selection.left == {"max": 1}
    assert select(MoveOrder(source=C, destination=None), []).left == {}


@pytest.mark.parametrize("limit", [0, 1, 2, 3, 4, 10])
def test_max_keeps_the_first_in_address_order_and_counts_the_rest(limit):
    candidates = [conn("10.0.0.3", 1), conn("10.0.0.1", 9), conn("10.0.0.2", 1), conn("10.0.0.1", 8),
                  conn("10.0.0.5", 1, busy=True)]
    selection = select(MoveOrder(source=A, destination=B, limit=limit), candidates)
    ordered = [("10.0.0.1", 8), ("10.0.0.1", 9), ("10.0.0.2", 1), ("10.0.0.3", 1)]
    assert [c.client for c in selection.chosen] == ordered[:limit]
    expected_left = {"busy": 1}
    if limit < 4:
        expected_left["max"] = 4 - limit
    assert selection.left == expected_left


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 4), st.sampled_from([A, B]), st.booleans()),
                max_size=20),
       st.one_of(st.none(), st.integers(0, 10)))
def test_select_partitions_the_source_connections(rows, limit):
    candidates = [conn(f"10.0.0.{ip}", port, target, busy) for ip, port, target, busy in rows]
    order = MoveOrder(source=A, destination=B, ports=PortRange.parse("1-3"), limit=limit)
    selection = select(order, candidates)
    mine = [c for c in candidates if c.target == A]
    assert len(selection.chosen) + sum(selection.left.values()) == len(mine)
    eligible = sorted((c for c in mine if not c.busy and c.client[1] <= 3),
                      key=lambda c: (ipaddress.IPv4Address(c.client[0]), c.client[1]))
    assert selection.chosen == (eligible if limit is None else eligible[:limit])
    assert selection.left.get("port", 0) == sum(1 for c in mine if c.client[1] == 4)


# ------------------------------------------------------------------ Overrides


def test_an_exact_override_names_one_client_port_only():
    o = Overrides()
    o.add("10.0.0.1", PortRange.parse(5000), B, until=100)
    assert o.lookup(("10.0.0.1", 5000), now=0) == B
    assert o.lookup(("10.0.0.1", 5001), now=0) is None
    assert o.lookup(("10.0.0.2", 5000), now=0) is None


def test_a_range_override_names_its_ports_and_none_names_all():
    o = Overrides()
    o.add("10.0.0.1", PortRange.parse("5000-5009"), B, until=100)
    o.add("10.0.0.2", None, C, until=100)
    assert [o.lookup(("10.0.0.1", p), 0) for p in (4999, 5000, 5009, 5010)] == [None, B, B, None]
    assert {o.lookup(("10.0.0.2", p), 0) for p in (1, 5000, 65535)} == {C}
    assert o.lookup(("10.0.0.3", 1), 0) is None
    assert len(o) == 2


def test_the_newest_matching_override_wins():
    o = Overrides()
    o.add("10.0.0.1", None, B, until=100)                      # 1: all ports -> B
    o.add("10.0.0.1", PortRange.parse(5000), C, until=100)     # 2: port 5000 -> C
    assert o.lookup(("10.0.0.1", 5000), 0) == C and o.lookup(("10.0.0.1", 5001), 0) == B
    o.add("10.0.0.1", PortRange.parse("4000-6000"), A, until=100)  # 3: newer than the exact one
    assert o.lookup(("10.0.0.1", 5000), 0) == A and o.lookup(("10.0.0.1", 5001), 0) == A
    assert o.lookup(("10.0.0.1", 7000), 0) == B
    o.add("10.0.0.1", PortRange.parse(5000), B, until=100)     # 4: newer than the range
    assert o.lookup(("10.0.0.1", 5000), 0) == B


def test_a_migration_back_replaces_the_first():
    o = Overrides()
    o.add("10.0.0.1", PortRange.parse(5000), B, until=100)  # live move A -> B
    o.add("10.0.0.1", PortRange.parse(5000), A, until=110)  # and back B -> A
    assert o.lookup(("10.0.0.1", 5000), 50) == A
    o.add("10.0.0.2", None, B, until=100)                   # reset move A -> B
    o.add("10.0.0.2", None, A, until=110)                   # and back
    assert o.lookup(("10.0.0.2", 1234), 50) == A
    # The replaced rules never come back, even once the newer ones are gone.
    assert o.lookup(("10.0.0.1", 5000), 110) is None and o.lookup(("10.0.0.2", 1234), 110) is None


def test_overrides_expire_at_until():
    o = Overrides()
    o.add("10.0.0.1", PortRange.parse(5000), B, until=10.0)
    o.add("10.0.0.2", None, C, until=10.0)
    assert o.lookup(("10.0.0.1", 5000), 9.999) == B and o.lookup(("10.0.0.2", 7), 9.999) == C
    assert o.lookup(("10.0.0.1", 5000), 10.0) is None and o.lookup(("10.0.0.2", 7), 10.0) is None
    assert len(o) == 0  # expired ones are dropped, not only hidden


def test_an_older_rule_expiring_leaves_the_newer_ones():
    o = Overrides()
    o.add("10.0.0.1", None, B, until=5)
    o.add("10.0.0.1", PortRange.parse(5000), C, until=20)
    assert o.lookup(("10.0.0.1", 5000), 6) == C and o.lookup(("10.0.0.1", 5001), 6) is None
    assert len(o) == 1


def test_the_limit_drops_the_oldest():
    o = Overrides(limit=3)
    o.add("10.0.0.1", PortRange.parse(1), A, until=100)
    o.add("10.0.0.2", None, B, until=100)
    o.add("10.0.0.3", PortRange.parse("1-9"), C, until=100)
    o.add("10.0.0.4", PortRange.parse(4), A, until=100)
    assert len(o) == 3
    assert o.lookup(("10.0.0.1", 1), 0) is None
    assert [o.lookup((f"10.0.0.{i}", i), 0) for i in (2, 3, 4)] == [B, C, A]
    o.add("10.0.0.5", None, C, until=100)
    o.add("10.0.0.6", None, C, until=100)
    assert o.lookup(("10.0.0.2", 2), 0) is None and o.lookup(("10.0.0.3", 3), 0) is None
    assert len(o) == 3


def test_dropping_a_replaced_exact_override_keeps_its_replacement():
    o = Overrides(limit=2)
    o.add("10.0.0.1", PortRange.parse(80), B, until=100)
    o.add("10.0.0.1", PortRange.parse(80), C, until=100)
    o.add("10.0.0.9", None, A, until=100)  # pushes the first (replaced) rule out
    assert o.lookup(("10.0.0.1", 80), 0) == C
    o.add("10.0.0.9", None, B, until=100)  # now the replacement goes too
    assert o.lookup(("10.0.0.1", 80), 0) is None


IPS = ["10.0.0.1", "10.0.0.2"]
PORTS = [80, 81, 82, 83]
RANGES = st.one_of(st.none(), st.sampled_from(PORTS).map(PortRange.parse),
                   st.tuples(st.sampled_from(PORTS), st.sampled_from(PORTS))
                   .map(lambda t: PortRange(min(t), max(t))))
ADD = st.tuples(st.just("add"), st.integers(0, 3), st.sampled_from(IPS), RANGES, st.sampled_from([A, B, C]))
LOOKUP = st.tuples(st.just("lookup"), st.integers(0, 3), st.sampled_from(IPS), st.sampled_from(PORTS))


@settings(max_examples=200, deadline=None)
@given(ops=st.lists(st.one_of(ADD, LOOKUP), max_size=40), sticky=st.integers(1, 8),
       limit=st.one_of(st.none(), st.integers(1, 6)))
def test_lookup_is_the_newest_live_matching_rule(ops, sticky, limit):
    """Against a brute-force model: every rule added (the last LIMIT of
    them), the newest that matches and has not expired wins. The clock only
    advances and every rule lives STICKY seconds, as in the router (the class
    relies on rules expiring in the order they were added)."""
    overrides = Overrides() if limit is None else Overrides(limit=limit)
    rules: list[tuple[str, PortRange | None, tuple[str, int], float]] = []
    now = 0.0
    for kind, dt, ip, arg, *rest in ops:
        now += dt
        if kind == "add":
            overrides.add(ip, arg, rest[0], now + sticky)
            rules.append((ip, arg, rest[0], now + sticky))
        else:
            window = rules if limit is None else rules[-limit:]
            live = [target for rip, ports, target, until in window
                    if rip == ip and (ports is None or arg in ports) and until > now]
            expected = live[-1] if live else None
            assert overrides.lookup((ip, arg), now) == expected
    assert len(overrides) <= (limit if limit is not None else len(rules))


# ---------------------------------------------------------------------- steer


def pools() -> dict[str, Pool]:
    t0, t1, t2 = Target(*A, name="t0"), Target(*B, name="t1"), Target(*C, name="t2")
    return {"web": Pool.of("web", [t0, t1], RoundRobin()), "api": Pool.of("api", [t0, t2], RoundRobin())}


def pool_of(p: dict[str, Pool], decision) -> Pool | None:
    """The pool whose member DECISION chose (the router's ``_pool_of``)."""
    return next((q for q in p.values() if getattr(decision, "target", None) in q.members), None)


@pytest.mark.parametrize("kind", [Handoff, Proxy])
def test_steer_redirects_to_the_wanted_member_of_the_same_pool(kind):
    p = pools()
    decision = kind(p["web"].find("t0"))
    steered = steer(decision, B, pool_of(p, decision))
    assert type(steered) is kind and steered.target is p["web"].find("t1")
    # The api pool's t0 is another membership: its pool has no B, so no change.
    api_decision = kind(p["api"].find("t0"))
    assert steer(api_decision, B, pool_of(p, api_decision)) is api_decision
    assert steer(api_decision, C, pool_of(p, api_decision)).target is p["api"].find("t2")


def test_steer_leaves_a_decision_already_at_the_wanted_target():
    p = pools()
    decision = Handoff(p["web"].find("t1"))
    assert steer(decision, B, pool_of(p, decision)) is decision


@pytest.mark.parametrize("make_unavailable", [
    lambda m: setattr(m, "draining", True), lambda m: setattr(m, "healthy", False),
    lambda m: setattr(m, "weight_override", 0),
])
def test_steer_never_picks_an_unavailable_member(make_unavailable):
    p = pools()
    make_unavailable(p["web"].find("t1"))
    decision = Handoff(p["web"].find("t0"))
    assert steer(decision, B, pool_of(p, decision)) is decision


def test_steer_leaves_everything_else_alone():
    p = pools()
    web_t0 = p["web"].find("t0")
    handoff = Handoff(web_t0)
    assert steer(handoff, C, pool_of(p, handoff)) is handoff          # C is in another pool only
    assert steer(handoff, ("10.0.0.99", 80), pool_of(p, handoff)) is handoff  # no such target
    assert steer(handoff, None, pool_of(p, handoff)) is handoff
    assert steer(handoff, ("10.0.0.12", 8080), pool_of(p, handoff)) is handoff  # same host, other port
    local, reject = Local(lambda request: LocalResponse()), Reject(503)
    assert steer(local, B, pool_of(p, local)) is local
    assert steer(reject, B, pool_of(p, reject)) is reject
    # A decision whose pool is unknown (a pool replaced by a reload) stays too.
    assert steer(handoff, B, None) is handoff


# ----------------------------------------------------------------- MoveReport


def test_report_as_json():
    order = MoveOrder(source=A, destination=B, mode="reset", clients=MoveOrder.parse_clients("10.1.0.0/16"),
                      ports=PortRange.parse("1000-1999"), limit=5, wait=2)
    report = MoveReport(order, selected=5, moved=3, reset=1, left={"port": 2, "client": 7}, seconds=1.23456)
    report.skip("gone")
    report.skip("busy")
    report.skip("gone")
    as_json = report.as_json()
    assert as_json == {
        "from": "10.0.0.11:80", "to": "10.0.0.12:80", "mode": "reset", "client": "10.1.0.0/16",
        "port": "1000-1999", "max": 5, "selected": 5, "moved": 3, "reset": 1,
        "skipped": {"busy": 1, "gone": 2}, "left": {"client": 7, "port": 2}, "seconds": 1.235}
    assert list(as_json["skipped"]) == ["busy", "gone"] and list(as_json["left"]) == ["client", "port"]


def test_report_as_json_of_a_bare_order():
    as_json = MoveReport(MoveOrder(source=A, destination=None)).as_json()
    assert as_json == {"from": "10.0.0.11:80", "to": None, "mode": "live", "client": None, "port": None,
                       "max": None, "selected": 0, "moved": 0, "reset": 0, "skipped": {}, "left": {},
                       "seconds": 0.0}
    single = MoveReport(MoveOrder(source=A, destination=B, ports=PortRange.parse(443), limit=0)).as_json()
    assert single["port"] == "443" and single["max"] == 0
