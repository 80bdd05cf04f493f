"""Handed-off connections count as load for least-connections and LARD.

A connection handed off to a target no longer passes through the router, so
``active`` misses it; the handoff engine counts it in ``handed_off`` and the
load-aware policies balance ``load = active + handed_off``.
"""

from collections import Counter

from arr.policies.balancers import LeastConnections
from arr.policies.keys import KeySpec
from arr.policies.lard import Lard
from arr.pool import Target, TargetState
from arr.request import Request

REQUEST = Request.build("GET", "/", [("Host", "x")])


def states(*specs):
    """states("a", ("b", 3)) -> TargetStates named a (weight 1) and b (weight 3)."""
    out = []
    for i, spec in enumerate(specs):
        name, weight = (spec, 1) if isinstance(spec, str) else spec
        out.append(TargetState(Target("10.0.0.1", 80 + i, weight=weight, name=name)))
    return out


def picks(balancer, candidates, n):
    return "".join(balancer.choose(REQUEST, candidates).name for _ in range(n))


def get(path):
    return Request.build("GET", path, [("Host", "x")])


def lard(**options):
    return Lard(KeySpec.parse("path"), **options)


# TargetState


def test_load_is_active_plus_handed_off():
    (a,) = states("a")
    assert (a.handed_off, a.load) == (0, 0)
    a.active, a.handed_off = 3, 4
    assert a.load == 7
    assert "active=3" in repr(a) and "handed_off=4" in repr(a)


# Least-connections


def test_least_connections_prefers_fewer_handed_off_at_equal_active():
    a, b, c = states("a", "b", "c")
    a.active = b.active = c.active = 2
    a.handed_off, b.handed_off, c.handed_off = 5, 1, 3
    lc = LeastConnections()
    assert picks(lc, [a, b, c], 3) == "bbb"
    b.handed_off = 4  # now c (2 + 3) is least loaded
    assert lc.choose(REQUEST, [a, b, c]) is c


def test_least_connections_handed_off_alone_breaks_an_idle_tie():
    # No request in flight anywhere: without handed_off this would be round-robin.
    a, b = states("a", "b")
    a.handed_off = 1
    assert picks(LeastConnections(), [a, b], 4) == "bbbb"


def test_weighted_least_connections_divides_active_plus_handed_off_by_weight():
    a, b, c = states(("a", 1), ("b", 2), ("c", 4))
    a.active, a.handed_off = 0, 3   # 3 / 1 = 3.0  (active alone: 0, the least)
    b.active, b.handed_off = 2, 2   # 4 / 2 = 2.0
    c.active, c.handed_off = 0, 10  # 10 / 4 = 2.5
    lc = LeastConnections()
    assert lc.choose(REQUEST, [a, b, c]) is b
    b.handed_off = 4                # 6 / 2 = 3.0: c (2.5) is now least loaded
    assert lc.choose(REQUEST, [a, b, c]) is c
    c.handed_off = 14               # 14 / 4 = 3.5: a and b tie at 3.0
    assert Counter(picks(lc, [a, b, c], 4)) == {"a": 2, "b": 2}


def test_least_connections_measured_split_evens_out_handed_off_connections():
    a, b = states("a", "b")
    a.handed_off = 30
    lc = LeastConnections()
    got = ""
    for _ in range(60):  # each pick is handed off and stays on its target
        chosen = lc.choose(REQUEST, [a, b])
        chosen.handed_off += 1
        got += chosen.name
    assert got[:30] == "b" * 30  # b catches up before a gets anything
    assert abs(a.handed_off - b.handed_off) <= 1
    assert (a.handed_off, b.handed_off) == (45, 45)
    assert Counter(got) == {"a": 15, "b": 45}


# LARD


def test_lard_moves_when_handed_off_pushes_load_above_t_high():
    a, b = servers = states("a", "b")
    policy = lard(t_low=25, t_high=65)
    assert policy.choose(get("/x"), servers) is a
    a.active, a.handed_off = 10, 55  # load 65: not *above* t_high: stay
    assert policy.choose(get("/x"), servers) is a
    a.handed_off = 56  # load 66 > t_high, b idle (0 < t_low): move
    assert policy.choose(get("/x"), servers) is b
    assert policy.assignment("/x") == "b"


def test_lard_handed_off_keeps_a_candidate_out_of_below_t_low():
    a, b = servers = states("a", "b")
    policy = lard(t_low=25, t_high=65)
    assert policy.choose(get("/x"), servers) is a
    a.active = 66
    b.active, b.handed_off = 0, 25  # b's load is 25, not *below* t_low: stay
    assert policy.choose(get("/x"), servers) is a
    b.handed_off = 24
    assert policy.choose(get("/x"), servers) is b


def test_lard_moves_at_twice_t_high_counting_handed_off():
    a, b = servers = states("a", "b")
    policy = lard(t_low=25, t_high=65)
    assert policy.choose(get("/x"), servers) is a
    a.active, a.handed_off = 100, 29  # 129: everyone busy, stay
    b.active = 100
    assert policy.choose(get("/x"), servers) is a
    a.handed_off = 30  # 130 = 2 * t_high
    assert policy.choose(get("/x"), servers) is b


def test_lard_new_key_goes_to_the_least_loaded_counting_handed_off():
    a, b, c = servers = states("a", "b", "c")
    a.active, a.handed_off = 0, 5  # load 5
    b.active, b.handed_off = 1, 0  # load 1
    c.active, c.handed_off = 0, 2  # load 2
    # By active alone a and c (0) would tie ahead of b.
    assert lard().choose(get("/new"), servers) is b


def test_lard_idle_ties_skip_a_server_with_handed_off_connections():
    a, b, c = servers = states("a", "b", "c")
    b.handed_off = 1
    policy = lard()
    chosen = Counter(policy.choose(get(f"/k{i}"), servers).name for i in range(4))
    assert chosen == {"a": 2, "c": 2}
