"""Every request routed: the benchmark's "every request decided" check, the
keep-alive routing test's figures, goals 8 and 9, the header-routing
configurations, and how the report shows them (pure parts only)."""

from __future__ import annotations

import tomllib
from types import SimpleNamespace

import pytest

from arr.testbed.router import parse_exposition, to_toml
from benchmarks import report
from benchmarks.goals import goal_verdicts, rehandoff_goals
from benchmarks.stats import (
    by_label,
    counts_delta,
    decided_check,
    phase_share,
    rehandoff_summary,
    router_counts,
    summarize,
)

EXPOSITION = """\
# HELP arr_requests_total Requests answered, by decision executed, status and target.
# TYPE arr_requests_total counter
arr_requests_total{decision="handoff",status="200",target="t0"} 900.0
arr_requests_total{decision="handoff",status="200",target="t1"} 95.0
arr_requests_total{decision="proxy",status="200",target="t1"} 5.0
arr_requests_created{decision="handoff",status="200",target="t0"} 1.7e9
arr_handoffs_total{result="ok"} 995.0
arr_handoffs_total{result="fallback"} 5.0
arr_handoffs_created{result="ok"} 1.7e9
arr_handoff_fallbacks_total{reason="half-closed"} 5.0
arr_takebacks_total{result="ok"} 980.0
arr_takebacks_total{result="unacked"} 2.0
arr_rehandoffs_total{target="same-target"} 270.0
arr_rehandoffs_total{target="in-place"} 700.0
arr_rehandoffs_total{target="other-target"} 10.0
arr_takeback_duration_seconds_bucket{le="0.001"} 3.0
arr_forward_resends_total 4.0
arr_forward_resends_created 1.7e9
"""


def test_router_counts_from_an_exposition():
    # Re-handoffs in place go to the same target: they count with the same-target ones.
    c = router_counts(parse_exposition(EXPOSITION))
    assert c == {"decided": 1000.0, "handoffs": 995.0, "fallbacks": 5.0, "takebacks": 980.0,
                 "takeback_failures": 2.0, "rehandoffs_same": 970.0, "rehandoffs_other": 10.0,
                 "request_resends": 4.0}
    assert router_counts({}) == dict.fromkeys(c, 0.0)  # a proxy router: nothing handed off
    assert counts_delta({"decided": 10.0}, {"decided": 25.0, "handoffs": 3.0}) == {"decided": 15.0, "handoffs": 3.0}


def test_by_label():
    samples = parse_exposition(EXPOSITION)
    assert by_label(samples, "arr_takebacks_total", "result") == {"ok": 980.0, "unacked": 2.0}
    assert by_label(samples, "arr_handoff_fallbacks_total", "reason") == {"half-closed": 5.0}
    assert by_label(samples, "arr_nothing_total", "reason") == {}


def test_decided_check_conditions():
    ok = decided_check(1000, {"decided": 1008.0, "handoffs": 1000.0, "fallbacks": 8.0}, hands_off=True)
    assert ok["ok"] and ok["decided"] == 1008 and ok["handed_off"] == 1008 and ok["problems"] == []
    # responses the router never decided: a connection's later requests went straight to a target
    short = decided_check(1000, {"decided": 8.0, "handoffs": 8.0, "fallbacks": 0.0}, hands_off=True)
    assert not short["ok"] and "992 of 1,000 responses without a decision" in short["problems"][0]
    # decisions lost between the policy and the engine
    lost = decided_check(1000, {"decided": 1000.0, "handoffs": 990.0, "fallbacks": 0.0}, hands_off=True)
    assert not lost["ok"] and "not the 1,000 decided" in lost["problems"][0]
    # arr-proxy: only the first condition
    proxy = decided_check(1000, {"decided": 1003.0, "handoffs": 0.0, "fallbacks": 0.0}, hands_off=False)
    assert proxy["ok"] and "handed_off" not in proxy
    assert decided_check(5, None, hands_off=False)["problems"] == ["router metrics not read"]


def counts(decided, handoffs, same=0.0, other=0.0):
    return {"decided": decided, "handoffs": handoffs, "fallbacks": decided - handoffs,
            "rehandoffs_same": same, "rehandoffs_other": other}


def test_phase_share():
    assert phase_share("first", counts(1000, 1000)) == 1.0
    assert phase_share("same", counts(1000, 1000, same=992)) == pytest.approx(0.992)
    assert phase_share("other", counts(1000, 990, other=900)) == pytest.approx(0.9)
    assert phase_share("first", counts(1000, 1000, same=100)) == pytest.approx(0.9)
    assert phase_share("same", counts(1000, 0)) is None  # a proxy: nothing handed off
    assert phase_share("same", None) is None and phase_share("same", counts(0, 0)) is None


def window(requests, cpu, seconds=5.0, agent=None, c=None, takeback=None):
    return {"requests": requests, "seconds": seconds, "window_s": seconds + 0.1, "router_cpu_s": cpu,
            "agent_cpu_s": agent, "counts": c, "takeback_p50_ms": takeback, "handoff_p50_ms": 0.3}


def nat_run(first_cpu=1.0, same_cpu=0.4, other_cpu=0.9, n=2000, same_share=1.0, other_share=1.0):
    return {"rehandoff": {
        "method": "wrk -t8 -c8 -d5s per window",
        "first": window(n, first_cpu, agent=0.2, c=counts(n, n)),
        "same": window(n, same_cpu, agent=0.1, c=counts(n, n, same=n * same_share), takeback=0.8),
        "other": window(n, other_cpu, agent=0.3, c=counts(n, n, other=n * other_share), takeback=0.9)}}


def test_rehandoff_summary_pairs_ratios_run_by_run():
    s = rehandoff_summary([nat_run(1.0, 0.4, 0.9), nat_run(2.0, 0.6, 1.0)])
    assert s["first"]["router_cpu_per_request_ms"]["median"] == pytest.approx((0.5 + 1.0) / 2)
    assert s["same_to_first"]["min"] == pytest.approx(0.3) and s["same_to_first"]["max"] == pytest.approx(0.4)
    assert s["other_to_first"]["max"] == pytest.approx(0.9)
    assert s["same"]["rate"]["median"] == pytest.approx(400.0)
    assert s["other"]["agent_cpu_per_request_ms"]["median"] == pytest.approx(0.15)
    assert s["same"]["share"]["median"] == 1.0 and s["same"]["takeback_p50_ms"]["median"] == 0.8
    assert rehandoff_summary([{"sizes": {}}]) is None
    # summarize carries it per system
    assert "rehandoff" in summarize({"arr-nat": {"runs": [nat_run()]}})["arr-nat"]
    assert "rehandoff" not in summarize({"direct": {"runs": [{"sizes": {}}]}})["direct"]


def results(*nat_runs, hap=None):
    raw = {"arr-nat": {"runs": list(nat_runs)}}
    if hap is not None:
        raw["haproxy"] = {"runs": [hap]}
    return {"summary": summarize(raw), "raw": raw, "plan": {"runs": len(nat_runs)}, "errors": []}


def by_goal(r):
    return {v.goal[:2]: v for v in goal_verdicts(r) if v.goal[:2] in ("8.", "9.")}


def test_goals_8_and_9_boundaries():
    v = by_goal(results(nat_run(first_cpu=1.0, same_cpu=0.5, other_cpu=1.0)))  # exactly the limits
    assert v["8."].status == "PASS" and v["9."].status == "PASS"
    assert v["8."].measured == "0.50 x first handoff" and v["8."].target == "<= 0.5 x first handoff"
    assert "0.250 ms vs first handoff 0.500 ms" in v["8."].note and "take-back p50 0.80 ms" in v["8."].note
    v = by_goal(results(nat_run(first_cpu=1.0, same_cpu=0.51, other_cpu=1.01)))
    assert v["8."].status == "MISS" and v["9."].status == "MISS"
    assert "same-target re-handoff <= 0.5x first handoff router CPU" in v["8."].goal
    assert "take-back to another target <= 1x first handoff router CPU" in v["9."].goal


def test_goals_8_and_9_show_haproxy_and_refuse_a_window_that_measured_something_else():
    hap = {"rehandoff": {"first": window(5000, 0.5), "same": window(5000, 0.2), "other": window(5000, 0.21)}}
    v = by_goal(results(nat_run(), hap=hap))
    assert "haproxy, same windows: 0.040 ms per keep-alive request vs 0.100 ms per new connection" in v["8."].note
    # round-robin luck instead of exact alternation: most requests went back to the same target
    v = by_goal(results(nat_run(other_share=0.5)))
    assert v["9."].status == "n/a" and "other window: 50% take-backs to another target" in v["9."].note
    assert v["8."].status == "PASS"
    names = [g.goal[:2] for g in rehandoff_goals({})]
    assert names == ["8.", "9."] and all(g.status == "n/a" for g in rehandoff_goals({}))


def test_goal_9_once_more_for_arr_nat_reuse_and_a_report_with_it_in_the_routing_test_only():
    """arr-nat-reuse (handoff.reuse_forward) runs the keep-alive routing test
    only (benchmarks/systems.py REHANDOFF_ONLY): goal 9 gets a second line, and
    the report's other tables leave it out rather than break on its missing
    sizes."""
    run = nat_run(first_cpu=1.0, other_cpu=1.02)
    run["sizes"] = {"1KiB": {"bytes": 1 << 20, "seconds": 2.0, "router_cpu_s": 1.0, "machine_cpu_s": 2.0,
                             "router_bytes": 1000, "requests": 1024}}
    raw = {"arr-nat": {"runs": [run]}, "arr-nat-reuse": {"runs": [nat_run(first_cpu=1.0, other_cpu=0.7)]}}
    r = {"summary": summarize(raw), "raw": raw, "plan": {"runs": 1}, "errors": []}
    nine = [v for v in goal_verdicts(r) if v.goal.startswith("9.")]
    assert [(v.status, v.measured) for v in nine] == [("MISS", "1.02 x first handoff"),
                                                      ("PASS", "0.70 x first handoff")]
    assert nine[1].goal.endswith("with handoff.reuse_forward (arr-nat-reuse)")
    assert "arr-nat-reuse router CPU per request 0.350 ms" in nine[1].note
    assert len(rehandoff_goals(summarize({"arr-nat": {"runs": [run]}}))) == 2  # no reuse run: no third line
    md = report.render_markdown(r, ["rehandoff.png"])
    assert "| arr-nat-reuse | other target |" in md
    for block in md.split("\n\n"):
        rows = [x for x in block.splitlines() if x.startswith("|")]
        if rows:
            assert len({x.count("|") for x in rows}) == 1, block


def test_report_shows_the_routing_cost_and_the_decided_checks():
    run = nat_run()
    run["sizes"] = {"1KiB": {"bytes": 1 << 20, "seconds": 2.0, "router_cpu_s": 1.0, "machine_cpu_s": 2.0,
                             "router_bytes": 1000, "requests": 1024, "decided": 1030,
                             "decided_check": decided_check(1024, counts(1030, 1030), hands_off=True)}}
    run["rehandoff"]["same"]["decided_check"] = decided_check(2000, counts(8, 8), hands_off=True)
    r = results(run)
    md = report.render_markdown(r, ["rehandoff.png"])
    assert "## Every request routed: router CPU per keep-alive request" in md
    assert ("| arr-nat | same target | 400 | 8% | 0.200 | 0.40 | 0.050 | 0.80 | 0.30 "
            "| 100% same-target re-handoffs |") in md
    assert "## Every request decided (arr)" in md
    assert "| arr-nat | keep-alive 1KiB | 1 | 1,024 | 1,030 | 1,030 | ok |" in md
    assert "| arr-nat | routing: same target | 1 | 2,000 | 8 | 8 | **DISAGREE**: run 1: 1,992 of 2,000" in md
    assert "8. same-target re-handoff" in md and "9. take-back to another target" in md
    for block in md.split("\n\n"):
        rows = [x for x in block.splitlines() if x.startswith("|")]
        if rows:
            assert len({x.count("|") for x in rows}) == 1, block
    rows = report.decided_rows(r["raw"])
    assert [x["test"] for x in rows] == ["keep-alive 1KiB", "routing: same target"]
    assert "router CPU ms/request first handoff 0.500" in report.console_summary(r)


def test_fallbacks_in_a_window_are_shown_and_noted():
    run = nat_run()
    run["rehandoff"]["other"]["counts"] = counts(2000, 1900, other=1890)  # 100 fell back
    run["rehandoff"]["other"]["fallback_reasons"] = {"no-forward-port": 99, "half-closed": 1}
    run["rehandoff"]["other"]["takeback_results"] = {"ok": 1990, "unacked": 2}
    r = results(run)
    assert r["summary"]["arr-nat"]["rehandoff"]["other"]["fallback_share"]["median"] == pytest.approx(0.05)
    md = report.render_markdown(r)
    assert ("arr-nat requests that fell back to proxying, per window (all runs): first handoff 0 of 2,000; "
            "same target 0 of 2,000; other target 100 of 2,000 (no-forward-port 99, half-closed 1), "
            "2 failed take-backs.") in md
    v = by_goal(r)
    assert "fell back to proxying: other-target window 5.0%" in v["9."].note
    assert "fell back" not in v["8."].note
    run["rehandoff"]["other"]["counts"] = counts(20000, 19999, other=19990)  # 1 at wrk's stop: not noted
    assert "fell back" not in by_goal(results(run))["9."].note


def test_time_wait_left_by_the_windows_is_reported():
    run = nat_run()
    for phase, left in (("first", 0), ("same", 0), ("other", 4800)):
        run["rehandoff"][phase].update(forward_time_wait_after=left, forward_time_wait_cleared=100)
    md = report.render_markdown(results(run))
    assert ("TIME_WAIT sockets on forward ports left by each window (median over runs): first handoff 0, "
            "same target 0, other target 4,800.") in md
    assert "(destroyed; 300 at window starts)" in md
    assert "arr_forward_closes_total" not in md  # no counts read: no sentence
    assert "TIME_WAIT" not in report.render_markdown(results(nat_run())).split("## How it is measured")[0]


def test_how_the_windows_closes_ended_is_reported():
    run = nat_run()
    for phase in ("first", "same", "other"):
        run["rehandoff"][phase].update(forward_time_wait_after=0, forward_time_wait_cleared=0)
    run["rehandoff"]["other"]["forward_closes"] = {"proven": 1950.0, "destroyed": 40.0, "gone": 0.0}
    run["rehandoff"]["same"]["forward_closes"] = {"proven": 8.0}
    md = report.render_markdown(results(run))
    assert "How the closes in the windows ended (`arr_forward_closes_total`, over runs): proven 1,958, " \
           "destroyed 40:" in md
    assert "gone" not in md.split("arr_forward_closes_total")[1].split(":")[0]


def test_forwarding_connections_connected_inline_are_reported_per_window():
    run = nat_run()
    run["rehandoff"]["first"]["forward_pool"] = {"hit": 1960.0, "miss": 40.0, "stale": 8.0}
    run["rehandoff"]["other"]["forward_pool"] = {"hit": 1000.0, "miss": 1000.0}
    md = report.render_markdown(results(run))
    assert ("arr-nat forwarding connections connected inline, the forward pool's shelf empty (all runs): "
            "first handoff 40 of 2,000 (2.0%); other target 1,000 of 2,000 (50.0%).") in md
    assert "connected inline, the forward pool" not in report.render_markdown(results(nat_run()))


def test_forward_time_wait_asks_ss_for_the_forward_range():
    from benchmarks.measure import forward_ports_of, forward_time_wait

    calls = []

    class Cluster:
        router = "router-ns"

        def exec(self, host, argv, timeout, check):
            calls.append((host, argv))
            return SimpleNamespace(stdout="0 0 10.0.0.1:50001 10.0.0.11:8080\n0 0 10.0.0.1:50002 10.0.0.11:8080\n\n")

    assert forward_time_wait(Cluster(), (50000, 60999), kill=True) == 2
    assert calls == [("router-ns", ["ss", "-K", "-Htan", "state", "time-wait",
                                    "( sport >= :50000 and sport <= :60999 )"])]
    assert forward_ports_of(None) == (50000, 60999)  # arr's default
    assert forward_ports_of(SimpleNamespace(config={"handoff": {"forward_ports": [40000, 40999]}})) == (40000, 40999)


def test_rehandoff_plot(tmp_path):
    r = results(nat_run())
    assert "rehandoff.png" in {p.name for p in report.write_plots(r, tmp_path)}


# ----------------------------------------------------------- configurations

def fake_cluster(tmp_path):
    hosts = [SimpleNamespace(name="t0", ip="10.0.0.11"), SimpleNamespace(name="t1", ip="10.0.0.12")]
    return SimpleNamespace(targets=hosts, spec=SimpleNamespace(target_port=8080), vip="10.0.0.1",
                           workdir=tmp_path, id="abc123", router=SimpleNamespace(name="router"))


def test_header_routing_config_decides_each_request_on_the_header(tmp_path):
    from arr.config import config_from_dict
    from arr.decisions import Handoff
    from arr.request import Request
    from arr.routing import build_routing
    from arr.testbed.router import default_config
    from benchmarks.measure import ROUTE_HEADER
    from benchmarks.systems import header_routing

    cluster = fake_cluster(tmp_path)
    data = default_config(cluster, "nat", **header_routing(cluster))
    config = config_from_dict(tomllib.loads(to_toml(data)))  # as the router reads it
    assert sorted(p.name for p in config.pools) == ["default", "t1"]
    policy = build_routing(config).policy

    def target(headers):
        d = policy(Request.build("GET", "/files/1KiB", headers))
        assert isinstance(d, Handoff)
        return d.target.name

    assert target([(ROUTE_HEADER, "t1")]) == "t1"
    assert target([(ROUTE_HEADER, "t0")]) == "t0" and target([]) == "t0"
    assert target([(ROUTE_HEADER, "t10")]) == "t0"  # anchored


def test_haproxy_and_nginx_route_on_the_header(tmp_path):
    from benchmarks.measure import ROUTE_HEADER
    from benchmarks.systems import haproxy_config, nginx_proxy_config

    cluster = fake_cluster(tmp_path)
    hap = haproxy_config(cluster, tmp_path, by_header=True)
    assert f"use_backend be_t1 if {{ req.hdr({ROUTE_HEADER}) -m str t1 }}" in hap
    assert "default_backend be_t0" in hap and "balance roundrobin" not in hap
    assert "backend be_t0\n    server t0 10.0.0.11:8080" in hap
    plain = haproxy_config(cluster, tmp_path)
    assert "use_backend" not in plain and "balance roundrobin" in plain
    ngx = nginx_proxy_config(cluster, tmp_path, by_header=True)
    assert "map $http_x_arr_bench_target $bench_upstream {" in ngx and "proxy_pass http://$bench_upstream;" in ngx
    assert ngx.count("keepalive 64;") == 2
    assert "proxy_pass http://be;" in nginx_proxy_config(cluster, tmp_path)


def test_route_lua_and_modes():
    from benchmarks.measure import ROUTE_HEADER, ROUTE_LUA, start_wrk_routed

    assert f'["{ROUTE_HEADER}"] = "t" .. t' in ROUTE_LUA and "@HEADER@" not in ROUTE_LUA
    assert 'thread:set("conn", next_conn)' in ROUTE_LUA and "done = function" in ROUTE_LUA
    with pytest.raises(ValueError):
        start_wrk_routed(None, "http://x/", 8, 1, "sideways")


def test_histogram_delta_quantile_counts_only_the_window():
    from benchmarks.measure import histogram_delta_quantile

    h = "arr_takeback_duration_seconds"
    a = {f'{h}_bucket{{le="0.001"}}': 100.0, f'{h}_bucket{{le="0.002"}}': 100.0, f'{h}_bucket{{le="+Inf"}}': 100.0}
    b = {f'{h}_bucket{{le="0.001"}}': 100.0, f'{h}_bucket{{le="0.002"}}': 200.0, f'{h}_bucket{{le="+Inf"}}': 200.0}
    # before the window everything was under 1 ms; in it, everything between 1 and 2 ms
    assert histogram_delta_quantile(a, b, h, 0.5) == pytest.approx(0.0015)
    assert histogram_delta_quantile(None, b, h, 0.5) is None


def test_cli_and_plans():
    from benchmarks.run import TESTS, build_parser, full_plan, quick_plan

    a = build_parser().parse_args(["--tests", "rehandoff", "--rehandoff-seconds", "10", "--profile-test", "same",
                                   "--rehandoff-rounds", "6"])
    assert a.tests == ["rehandoff"] and a.rehandoff_seconds == 10 and a.profile_test == "same"
    assert a.rehandoff_rounds == 6
    assert a.rehandoff_connections is None  # the plan's 8
    assert build_parser().parse_args(["--rehandoff-connections", "32"]).rehandoff_connections == 32
    q, f = quick_plan(None, None, None), full_plan(None, None, None)
    assert q.tests == list(TESTS) == f.tests and "rehandoff" in TESTS
    assert 1 <= q.rehandoff_seconds <= 2 and f.rehandoff_seconds == 2
    # the full plan interleaves rounds (each kind of window once a round); the quick one runs one
    assert q.rehandoff_rounds == 1 and f.rehandoff_rounds >= 3
    assert q.rehandoff_connections == f.rehandoff_connections == 8
    assert float(q.rehandoff_seconds).is_integer()  # wrk takes whole seconds
