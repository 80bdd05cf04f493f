"""Round-robin, smooth weighted round-robin and least-connections."""

from collections import Counter

from arr.policies.balancers import LeastConnections, RoundRobin, WeightedRoundRobin
from arr.pool import Target, TargetState
from arr.request import Request

REQUEST = Request.build("GET", "/", [("Host", "x")])


def states(*specs):
    """states("a", ("b", 3)) -> TargetStates named a (weight 1) and b (weight 3)."""
    out = []
    for spec in specs:
        name, weight = (spec, 1) if isinstance(spec, str) else spec
        out.append(TargetState(Target("10.0.0.1", 80, weight=weight, name=name)))
    return out


def picks(balancer, candidates, n):
    return "".join(balancer.choose(REQUEST, candidates).name for _ in range(n))


def test_round_robin_order_and_wrap():
    assert picks(RoundRobin(), states("a", "b", "c"), 7) == "abcabca"


def test_round_robin_ignores_weight_and_load():
    candidates = states(("a", 5), "b")
    candidates[1].active = 100
    assert picks(RoundRobin(), candidates, 4) == "abab"


def test_round_robin_survives_candidate_changes():
    a, b, c = states("a", "b", "c")
    rr = RoundRobin()
    assert picks(rr, [a, b, c], 2) == "ab"
    got = picks(rr, [a, c], 4)  # b went down
    assert Counter(got) == {"a": 2, "c": 2}
    assert "aa" not in got and "cc" not in got
    assert Counter(picks(rr, [a, b, c], 6)) == {"a": 2, "b": 2, "c": 2}
    assert picks(rr, [b], 3) == "bbb"


def test_wrr_smooth_interleaving_like_nginx():
    # The sequence nginx documents for weights 5, 1, 1.
    assert picks(WeightedRoundRobin(), states(("a", 5), ("b", 1), ("c", 1)), 7) == "aabacaa"


def test_wrr_exact_proportions_over_every_cycle():
    for weights in [(5, 1, 1), (3, 2), (1, 1, 1, 1), (7, 4, 2, 1), (10, 1)]:
        candidates = states(*[(f"t{i}", w) for i, w in enumerate(weights)])
        wrr = WeightedRoundRobin()
        cycle = sum(weights)
        for _ in range(3):
            counts = Counter(wrr.choose(REQUEST, candidates).name for _ in range(cycle))
            assert counts == {f"t{i}": w for i, w in enumerate(weights)}, weights


def test_wrr_never_bursts_a_heavy_target():
    # Naive WRR repeats "aaaaabc": a run of 5 (10 across cycles) and b, c adjacent.
    # Smooth WRR's longest run is 4 (across a cycle boundary) and b, c are apart.
    got = picks(WeightedRoundRobin(), states(("a", 5), ("b", 1), ("c", 1)), 70)
    assert "aaaaa" not in got
    assert "bc" not in got and "cb" not in got
    got = picks(WeightedRoundRobin(), states(("a", 2), ("b", 2)), 20)
    assert got == "ab" * 10


def test_wrr_survives_candidate_changes():
    a, b, c = states(("a", 2), ("b", 1), ("c", 1))
    wrr = WeightedRoundRobin()
    picks(wrr, [a, b, c], 3)  # part-way through a cycle
    picks(wrr, [a, c], 1)
    # After the change settles, proportions over [a, c] are exact again.
    picks(wrr, [a, c], 3)
    assert Counter(picks(wrr, [a, c], 30)) == {"a": 20, "c": 10}
    # b comes back and gets its share.
    picks(wrr, [a, b, c], 4)
    assert Counter(picks(wrr, [a, b, c], 40)) == {"a": 20, "b": 10, "c": 10}


def test_wrr_all_zero_weights_share_evenly():
    assert Counter(picks(WeightedRoundRobin(), states(("a", 0), ("b", 0)), 4)) == {"a": 2, "b": 2}


def test_least_connections_prefers_lowest_active_per_weight():
    a, b, c = states(("a", 1), ("b", 4), ("c", 2))
    a.active, b.active, c.active = 2, 4, 3  # loads 2.0, 1.0, 1.5
    lc = LeastConnections()
    assert picks(lc, [a, b, c], 3) == "bbb"
    b.active = 9  # 2.25: now c (1.5) is least loaded
    assert lc.choose(REQUEST, [a, b, c]) is c


def test_least_connections_spreads_ties_round_robin():
    candidates = states("a", "b", "c")
    assert picks(LeastConnections(), candidates, 6) == "abcabc"


def test_least_connections_ties_only_among_the_least_loaded():
    a, b, c = states("a", "b", "c")
    b.active = 1
    assert Counter(picks(LeastConnections(), [a, b, c], 6)) == {"a": 3, "c": 3}


def test_least_connections_tracks_load_as_it_changes():
    candidates = states("a", "b", "c")
    lc = LeastConnections()
    for _ in range(9):  # each pick becomes in flight: loads stay level
        lc.choose(REQUEST, candidates).active += 1
    assert [t.active for t in candidates] == [3, 3, 3]


def test_least_connections_survives_candidate_changes():
    a, b, c = states("a", "b", "c")
    lc = LeastConnections()
    a.active = 5
    assert picks(lc, [a, b], 1) == "b"
    assert Counter(picks(lc, [b, c], 4)) == {"b": 2, "c": 2}
    assert picks(lc, [a], 2) == "aa"
