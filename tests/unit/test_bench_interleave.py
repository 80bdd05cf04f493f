"""The keep-alive routing test's interleaved windows (benchmarks/run.py
``Bench.rehandoff``): the order of each round, how a kind's rounds add up into
one window's record, and the ratios round by round (pure parts only)."""

from __future__ import annotations

import pytest

from benchmarks.measure import ROUTE_MODES, histogram_delta, route_order
from benchmarks.stats import merge_route_windows, rehandoff_summary, round_ratios

TAKEBACK = "arr_takeback_duration_seconds"


def test_route_order_rotates_so_each_kind_takes_each_place():
    orders = [route_order(r) for r in range(3)]
    assert orders[0] == ROUTE_MODES
    for order in orders:
        assert sorted(order) == sorted(ROUTE_MODES)
    for place in range(len(ROUTE_MODES)):
        assert sorted(o[place] for o in orders) == sorted(ROUTE_MODES)
    assert route_order(3) == route_order(0)


def round_window(requests, cpu, *, ok=True, counts=None, buckets=None, **extra):
    rec = {"requests": requests, "seconds": 2.0, "window_s": 3.6, "tail_s": 1.5, "router_cpu_s": cpu,
           "router_user_s": cpu * 0.8, "agent_cpu_s": cpu / 4, "machine_cpu_s": 3.0, "errors": {"read": 0},
           "decided_check": {"requests": requests, "decided": requests + 1, "handed_off": requests + 1,
                             "ok": ok, "problems": [] if ok else ["lost one"]},
           "counts": counts or {"decided": requests + 1.0, "handoffs": requests + 1.0}, **extra}
    if buckets is not None:
        rec["buckets"] = {TAKEBACK: buckets}
    return rec


def test_merge_adds_rounds_up_as_one_window():
    a = round_window(1000, 1.2, buckets={TAKEBACK + '_bucket{le="0.001"}': 10.0})
    b = round_window(500, 0.5, ok=False, errors={"read": 2},
                     buckets={TAKEBACK + '_bucket{le="0.001"}': 4.0, TAKEBACK + '_bucket{le="+Inf"}': 6.0},
                     fallback_reasons={"no-forward-port": 3.0}, forward_closes={"proven": 490.0, "destroyed": 2.0})
    a["forward_closes"] = {"proven": 10.0}
    m = merge_route_windows([a, b])
    assert m["forward_closes"] == {"proven": 500.0, "destroyed": 2.0}
    assert m["requests"] == 1500 and m["router_cpu_s"] == pytest.approx(1.7)
    assert m["tail_s"] == pytest.approx(3.0) and m["seconds"] == pytest.approx(4.0)
    assert m["errors"] == {"read": 2}  # zero counts dropped
    assert m["counts"] == {"decided": 1502.0, "handoffs": 1502.0}
    assert m["fallback_reasons"] == {"no-forward-port": 3.0}
    assert m["buckets"][TAKEBACK] == {TAKEBACK + '_bucket{le="0.001"}': 14.0, TAKEBACK + '_bucket{le="+Inf"}': 6.0}
    check = m["decided_check"]
    assert check["requests"] == 1500 and check["decided"] == 1502 and check["handed_off"] == 1502
    assert not check["ok"] and check["problems"] == ["round 2: lost one"] and m["decided"] == 1502
    assert [r["requests"] for r in m["rounds"]] == [1000, 500]
    assert m["rounds"][1]["router_cpu_s"] == 0.5 and "counts" not in m["rounds"][1]


def test_merge_keeps_a_missing_figure_missing():
    # a system without agents (HAProxy): agent CPU None in every round stays None;
    # no router metrics: no counts, no check
    plain = [{"requests": 10, "seconds": 2.0, "router_cpu_s": 0.1, "agent_cpu_s": None, "errors": {}}] * 2
    m = merge_route_windows(plain)
    assert m["agent_cpu_s"] is None and m["router_cpu_s"] == pytest.approx(0.2)
    assert "counts" not in m and "decided_check" not in m and "buckets" not in m
    # one round without a figure: the sum would be wrong, so it is None
    assert merge_route_windows([round_window(5, 0.1), {**round_window(5, 0.1), "router_cpu_s": None}])[
        "router_cpu_s"] is None
    with pytest.raises(ValueError):
        merge_route_windows([])


def test_merge_of_one_round_is_that_round():
    one = round_window(700, 0.9, forward_time_wait_after=3, forward_time_wait_cleared=2)
    m = merge_route_windows([one])
    for key in ("requests", "router_cpu_s", "agent_cpu_s", "tail_s"):
        assert m[key] == one[key]
    assert m["forward_time_wait_after"] == 3 and m["forward_time_wait_cleared"] == 2


def test_histogram_delta_subtracts_buckets_of_one_histogram():
    a = {TAKEBACK + '_bucket{le="0.001"}': 5.0, "arr_requests_total": 9.0}
    b = {TAKEBACK + '_bucket{le="0.001"}': 8.0, TAKEBACK + '_bucket{le="+Inf"}': 2.0, "arr_requests_total": 20.0}
    assert histogram_delta(a, b, TAKEBACK) == {TAKEBACK + '_bucket{le="0.001"}': 3.0,
                                               TAKEBACK + '_bucket{le="+Inf"}': 2.0}
    assert histogram_delta(None, b, TAKEBACK) == {}


def test_round_ratios_pair_rounds_in_order():
    first = merge_route_windows([round_window(1000, 1.0), round_window(1000, 2.0)])
    other = merge_route_windows([round_window(1000, 0.9), round_window(500, 1.1)])
    assert round_ratios(other, first) == pytest.approx([0.9, 1.1])
    assert round_ratios(None, first) == [] and round_ratios(other, {}) == []


def test_summary_reports_the_rounds_spread_next_to_the_runs_ratio():
    first = merge_route_windows([round_window(1000, 1.0), round_window(1000, 1.0)])
    same = merge_route_windows([round_window(1000, 0.4), round_window(1000, 0.4)])
    other = merge_route_windows([round_window(1000, 0.8), round_window(1000, 1.2)])
    s = rehandoff_summary([{"rehandoff": {"first": first, "same": same, "other": other}}])
    assert s["other_to_first"]["median"] == pytest.approx(1.0)  # over the whole window
    assert s["other_to_first_rounds"]["min"] == pytest.approx(0.8)
    assert s["other_to_first_rounds"]["max"] == pytest.approx(1.2)
