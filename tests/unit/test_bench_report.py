"""The pure parts of the benchmark harness: statistics, CPU arithmetic, verdicts, markdown."""

from __future__ import annotations

import math

import pytest

from benchmarks import report
from benchmarks.stats import (
    GIB,
    Summary,
    cpu_seconds_from_stat,
    htab_elem_bytes,
    machine_busy_seconds,
    marginal_per_gib,
    parse_skmem,
    per_gib,
    percentile,
    summarize,
    user_seconds_from_stat,
    verdict,
)


# ------------------------------------------------------------------ statistics

def test_percentile_interpolates_like_numpy_linear():
    xs = [1, 2, 3, 4]
    assert percentile(xs, 0.5) == 2.5
    assert percentile(xs, 0.0) == 1
    assert percentile(xs, 1.0) == 4
    assert percentile(xs, 0.25) == pytest.approx(1.75)
    assert percentile([5], 0.99) == 5
    assert percentile([3, 1, 2], 0.5) == 2  # unsorted input


def test_percentile_rejects_bad_input():
    with pytest.raises(ValueError):
        percentile([], 0.5)
    with pytest.raises(ValueError):
        percentile([1], 1.5)


def test_summary_median_and_spread_ignoring_missing():
    s = Summary.of([3.0, None, 1.0, 2.0, float("nan"), 10.0])
    assert s is not None
    assert (s.median, s.min, s.max, s.n) == (2.5, 1.0, 10.0, 4)
    assert s.q1 == pytest.approx(1.75) and s.q3 == pytest.approx(4.75)
    assert Summary.of([None, None]) is None
    assert Summary.from_json(s.to_json()) == s


# ----------------------------------------------------------------- CPU arithmetic

def test_cpu_seconds_from_stat_handles_spaces_and_parens_in_comm():
    # pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime ...
    line = "1234 (arr (serve) x) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 100"
    assert cpu_seconds_from_stat(line, 100) == pytest.approx(3.0)
    assert user_seconds_from_stat(line, 100) == pytest.approx(2.5)  # utime alone


def test_machine_busy_excludes_idle_and_iowait():
    line = "cpu  100 10 50 1000 40 5 15 20 0 0"
    # user+nice+system+irq+softirq+steal = 100+10+50+5+15+20
    assert machine_busy_seconds(line, 100) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        machine_busy_seconds("cpu0 1 2 3 4", 100)


def test_per_gib_and_marginal():
    assert per_gib(2.0, 4 * GIB) == 0.5
    assert per_gib(2.0, 0) is None
    assert per_gib(None, GIB) is None
    # system: 6 s for 2 GiB = 3 s/GiB; direct: 1 s for 1 GiB = 1 s/GiB -> 2 s/GiB extra
    assert marginal_per_gib(6.0, 2 * GIB, 1.0, GIB) == pytest.approx(2.0)
    assert marginal_per_gib(6.0, 2 * GIB, None, GIB) is None


def test_parse_skmem_sums_memory_fields_not_limits():
    out = (
        "State Recv-Q Send-Q Local Peer\n"
        "ESTAB 0 0 10.0.0.1:80 10.0.0.2:5000\n"
        "\t skmem:(r0,rb131072,t0,tb87040,f4096,w0,o0,bl0,d0)\n"
        "ESTAB 0 0 10.0.0.1:80 10.0.0.2:5001\n"
        "\t skmem:(r768,rb131072,t256,tb87040,f1024,w512,o8,bl16,d3)\n"
    )
    assert parse_skmem(out) == (2, 4096 + 768 + 256 + 1024 + 512 + 8 + 16)
    assert parse_skmem("") == (0, 0)


def test_htab_elem_bytes():
    assert htab_elem_bytes(12, 80) == 48 + 16 + 80
    assert htab_elem_bytes(12, 41) == 48 + 16 + 48


# ------------------------------------------------------------------- summarize

def _run(bytes_, secs, rcpu, mcpu, rbytes, p50=None, p99=None, rate=None, util=None, hrate=None):
    run = {"sizes": {"1MiB": {"bytes": bytes_, "seconds": secs, "router_cpu_s": rcpu,
                              "machine_cpu_s": mcpu, "router_bytes": rbytes}}}
    if p50 is not None:
        run["ttfb"] = {"p50_ms": p50, "p99_ms": p99}
    if rate is not None:
        run["conn_rate"] = {"rate": rate, "router_cpu_util": util, "handoff_rate": hrate}
    return run


def _raw():
    return {
        "direct": {"runs": [_run(GIB, 1.0, 0.0, 1.0, 0, 0.1, 0.3, 10000, None),
                            _run(GIB, 1.0, 0.0, 2.0, 0, 0.2, 0.5, 11000, None)]},
        "arr-nat": {"runs": [_run(GIB, 2.0, 0.01, 3.0, GIB // 100, 3.1, 9.0, 300, 0.75, 290),
                             _run(GIB, 4.0, 0.03, 4.0, GIB // 50, 3.2, 9.5, 320, 0.8, 300)],
                    "memory": {"1000": [{"bytes_per_conn": 1500.0, "rss_per_conn": 1200.0,
                                         "kernel_per_conn": 0.0, "map_bytes_per_conn": 300.0,
                                         "opened": 1000, "handoffs": 1000}]}},
        "haproxy": {"runs": [_run(GIB, 1.0, 1.0, 5.0, 2 * GIB, 0.3, 0.6, 6000, 1.0),
                             _run(GIB, 1.0, 0.5, 6.0, 2 * GIB, 0.3, 0.7, 6200, 1.0)]},
    }


def test_summarize_pairs_marginal_cpu_and_overhead_with_direct_run_by_run():
    s = summarize(_raw())
    nat = s["arr-nat"]["sizes"]["1MiB"]
    # run 1: 3-1 = 2 s/GiB; run 2: 4-2 = 2 s/GiB
    assert nat["marginal_cpu_per_gib"]["median"] == pytest.approx(2.0)
    assert nat["router_cpu_per_gib"]["median"] == pytest.approx(0.02)
    assert nat["throughput_Bps"]["min"] == pytest.approx(GIB / 4)
    assert nat["throughput_Bps"]["max"] == pytest.approx(GIB / 2)
    assert nat["router_bytes_per_byte"]["median"] == pytest.approx(0.015, rel=1e-3)
    t = s["arr-nat"]["ttfb"]
    assert t["p50_overhead_ms"]["min"] == pytest.approx(3.0)
    assert t["p50_overhead_ms"]["max"] == pytest.approx(3.0)
    c = s["arr-nat"]["conn_rate"]
    # per core uses the handoff rate: 290/0.75, 300/0.8
    assert c["per_router_core"]["median"] == pytest.approx((290 / 0.75 + 300 / 0.8) / 2)
    assert "per_router_core" not in s["direct"]["conn_rate"] or s["direct"]["conn_rate"]["per_router_core"] is None
    assert s["arr-nat"]["memory"]["1000"]["bytes_per_conn"]["median"] == 1500.0


def test_summarize_missing_direct_run_falls_back_to_direct_median():
    raw = _raw()
    raw["arr-nat"]["runs"].append(_run(GIB, 1.0, 0.01, 5.0, 0))
    s = summarize(raw)
    # third run: 5 - median(1, 2) = 3.5
    assert s["arr-nat"]["sizes"]["1MiB"]["marginal_cpu_per_gib"]["max"] == pytest.approx(3.5)


def test_summarize_without_direct_has_no_marginal():
    raw = _raw()
    del raw["direct"]
    s = summarize(raw)
    assert s["arr-nat"]["sizes"]["1MiB"]["marginal_cpu_per_gib"] is None
    assert s["arr-nat"]["ttfb"]["p50_overhead_ms"] is None


# --------------------------------------------------------------------- verdicts

def test_verdict_directions_and_missing():
    assert verdict("g", "t", 0.04, 0.05, at_most=True).status == "PASS"
    assert verdict("g", "t", 0.06, 0.05, at_most=True).status == "MISS"
    assert verdict("g", "t", 3000, 3000, at_most=False).status == "PASS"
    assert verdict("g", "t", 2999, 3000, at_most=False).status == "MISS"
    assert verdict("g", "t", None, 1, at_most=True).status == "n/a"
    assert verdict("g", "t", math.nan, 1, at_most=True).status == "n/a"


# --------------------------------------------------------------------- markdown

def test_fmt_median_and_range():
    s = Summary.of([1.0, 2.0, 4.0]).to_json()
    assert report.fmt(s, "{:.1f}") == "2.0 [1.0–4.0]"
    assert report.fmt(Summary.of([2.0]).to_json(), "{:.1f}") == "2.0"
    assert report.fmt(None) == "–"
    assert report.fmt(s, "{:.0f}%", 100) == "200% [100%–400%]"


def test_render_markdown_has_tables_goals_and_errors():
    results = {"summary": summarize(_raw()), "raw": _raw(), "plan": {"runs": 2, "memory_runs": 1},
               "machine": {"cores": 2}, "errors": ["run 1 nginx: boom"],
               "profile": {"samples": 10, "conn_rate_during_profile": 300.0, "raw_file": "p.txt",
                           "self": [{"frame": "f (a.py)", "samples": 6, "share": 0.6}],
                           "inclusive": [{"frame": "main (a.py)", "samples": 10, "share": 1.0}]}}
    md = report.render_markdown(results, ["throughput.png"])
    assert "| arr-nat | 1MiB |" in md
    assert "**PASS**" in md and "**MISS**" in md
    assert "median of 2 run(s)" in md
    assert "* run 1 nginx: boom" in md
    assert "![throughput](throughput.png)" in md
    assert "`f (a.py)` | 60.0%" in md
    assert "softirq" in md.lower()
    # every table row has as many cells as its header
    for block in md.split("\n\n"):
        rows = [r for r in block.splitlines() if r.startswith("|")]
        if rows:
            assert len({r.count("|") for r in rows}) == 1, block


def test_profile_summary_self_and_inclusive():
    raw = ("process 1:\"python\";main (arr/cli.py:10);handoff (handoff/engine.py:5);connect (x.py:1) 6\n"
           "process 1:\"python\";main (arr/cli.py:10);handoff (handoff/engine.py:7) 3\n"
           "process 1:\"python\";main (arr/cli.py:12) 1\n")
    p = report.profile_summary(raw)
    assert p["samples"] == 10
    assert p["self"][0] == {"frame": "connect (x.py)", "samples": 6, "share": 0.6}
    incl = {r["frame"]: r["samples"] for r in p["inclusive"]}
    assert "main (arr/cli.py)" not in incl  # a wrapper on every stack
    assert incl["handoff (handoff/engine.py)"] == 9
    files = {r["frame"]: r["samples"] for r in p["by_file"]}
    assert files == {"x.py": 6, "handoff/engine.py": 3, "arr/cli.py": 1}


def test_profile_roles_count_each_sample_for_its_innermost_role():
    stack = "process 1:\"python\";main (arr/cli.py:10);_run (arr/cli.py:34)"
    raw = (f"{stack};Router._serve_session (arr/server.py:1);RouterHandoff._hand_off (handoff/engine.py:5);"
           "snapshot (handoff/fastpath.py:66) 5\n"
           # the innermost frame with a role decides: the agent exchange, not the handoff around it
           f"{stack};RouterHandoff._hand_off (handoff/engine.py:5);RouterHandoff._install_at_agent "
           "(handoff/engine.py:9);ControlClient.request (handoff/control/channel.py:464) 3\n"
           f"{stack};ClientSession._read_one (arr/session.py:435);next_event (h11/_connection.py:1) 2\n"
           f"{stack};RouterHandoff._hand_off (handoff/engine.py:5);send_request (handoff/engine.py:7) 2\n"
           f"{stack};Runner.run (asyncio/runners.py:118) 4\n"
           f"{stack};RouterHandoff._hand_off (handoff/engine.py:5) 1\n")
    roles = {r["frame"]: r["samples"] for r in report.profile_summary(raw)["by_role"]}
    assert roles == {
        "socket state: repair-mode reads, rebuilds, detach/reattach": 5,
        "agent exchanges": 3,
        "request parsing": 2,
        "forwarding connection: pool, the request's send, release": 2,
        "event loop (uvloop's own code)": 4,
        "the rest (accept, planning, translations, bookkeeping)": 1,
    }


def test_report_only_renders_json_markdown_and_plots(tmp_path):
    import json

    from benchmarks.run import main

    results = {"summary": {}, "raw": _raw(), "plan": {"runs": 2, "memory_runs": 1},
               "machine": {"cores": 2}, "errors": [], "profile": None}
    src = tmp_path / "results.json"
    src.write_text(json.dumps(results))
    md = tmp_path / "RESULTS.md"
    assert main(["--report-only", str(src), "--out", str(tmp_path / "out"), "--results-md", str(md)]) == 0
    out = tmp_path / "out"
    assert "## Goals" in (out / "results.md").read_text()
    assert {"throughput.png", "ttfb.png", "conn_rate.png", "memory.png"} <= {p.name for p in out.iterdir()}
    text = md.read_text()
    assert "](out/throughput.png)" in text  # figure links relative to the markdown file
    assert json.loads((out / "results.json").read_text())["summary"]["arr-nat"]["sizes"]["1MiB"]


def test_quick_plan_is_small():
    from benchmarks.run import full_plan, quick_plan

    q = quick_plan(None, None, None)
    assert q.systems == ["direct", "arr-nat", "arr-proxy", "haproxy"] and q.sizes == ["1KiB", "1MiB"]
    assert q.runs == 1 and q.memory_ns == [1000] and not q.profile_seconds
    assert 0 < q.sustain_seconds <= 15 and q.idle_seconds <= 5
    f = full_plan(None, None, None)
    assert f.runs == 3 and len(f.systems) == 7 and "haproxy-splice" in f.systems and len(f.sizes) == 4
    assert "arr-nat-reuse" in f.systems  # in the keep-alive routing test only (systems.REHANDOFF_ONLY)
    assert f.sustain_seconds == 300 and f.idle_seconds == 20
    assert f.curl_count(64 << 20) == 16 and f.curl_count(1 << 20) == 1024


@pytest.mark.parametrize("conns,rlimit", [(1024, False), (16384, True)])
def test_bench_target_config_raises_limits_whatever_the_test_bed_says(conns, rlimit):
    from benchmarks.systems import bench_target_config

    base = ("worker_processes 1;\n" + ("worker_rlimit_nofile 65536;\n" if rlimit else "")
            + f"events {{\n    worker_connections {conns};\n}}\nhttp {{\n    keepalive_timeout 65;\n}}\n")
    text, changes = bench_target_config(base, 20000)
    assert f"worker_connections {max(conns, 19000)};" in text
    assert text.count("worker_rlimit_nofile") == 1 and "worker_rlimit_nofile 20000;" in text
    assert "keepalive_timeout 300;" in text and "65;" not in text
    assert changes[0].startswith(f"worker_connections {conns} -> ")
