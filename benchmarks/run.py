"""``python -m benchmarks``: every system under the same conditions, in one cluster.

Order: for each run, for each system: start it, then (per object size) a sampled
SHA-256 download and the throughput test, the TTFB test, the new-connection
test; stop it; start it again routing on a request header for the keep-alive
routing test (first-handoff, same-target and other-target windows); stop it.
Then the idle-connection memory tests (a fresh start of the system for each
N; for arr-nat also the idle CPU window), then once the sustained
single-target test of arr-nat (benchmarks/sustain.py), then (full runs) a
py-spy profile of the arr-nat router during the new-connection test (or
``--profile-test``: a window of the keep-alive routing test).
Runs are interleaved across systems so drift over time hits every system alike.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import resource
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import measure, report
from arr.testbed.router import histogram_quantile
from handoff.forward_close import TIME_WAIT_HOLD
from benchmarks.stats import (by_label, counts_delta, decided_check, htab_elem_bytes, idle_core_pct,
                              merge_route_windows, percentile, router_counts, summarize)

SIZES = {"1KiB": 1 << 10, "64KiB": 64 << 10, "1MiB": 1 << 20, "64MiB": 64 << 20}
WRK_MAX_SIZE = 64 << 10  # objects up to this size go through wrk, larger through curl
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
ROUTE_TAIL = TIME_WAIT_HOLD + 0.5
"""How long a keep-alive routing window's CPU is counted past the end of its
load (Bench.rehandoff): past the look at the last old forwarding connection
closed in it (handoff/forward_close.py, TIME_WAIT_HOLD after its FIN)."""
QUICK_SYSTEMS = ("direct", "arr-nat", "arr-proxy", "haproxy")  # haproxy: the goals' peer
TESTS = ("throughput", "ttfb", "conn", "rehandoff")
"""The per-run tests (``--tests``): throughput per size, TTFB, new connections,
the keep-alive routing test."""
NO_MEMORY_TEST = ("direct", "haproxy-splice", "arr-nat-reuse")
"""direct has no router; haproxy-splice holds idle connections exactly as haproxy does
(splicing only changes how bodies are forwarded)."""


@dataclass
class Plan:
    systems: list[str]
    sizes: list[str]
    runs: int
    wrk_seconds: float = 5.0
    wrk_connections: int = 8
    curl_parallel: int = 4
    curl_bytes: int = 1 << 30  # per throughput test of a large object (at least 8 downloads)
    ttfb_n: int = 1000
    conn_seconds: float = 5.0
    conn_connections: int = 16
    memory_ns: list[int] = field(default_factory=lambda: [1000, 10000])
    memory_runs: int = 2
    profile_seconds: float = 0.0
    targets: int = 2
    sustain_seconds: float = 0.0  # goal 5: once per invocation, not per run (0 = off)
    sustain_connections: int = 32
    sustain_interval: float = 10.0  # how often the router's counters are sampled during it
    idle_seconds: float = 20.0  # goal 6: CPU window while arr-nat's memory test holds connections
    tests: list[str] = field(default_factory=lambda: list(TESTS))
    rehandoff_seconds: float = 2.0  # goals 8, 9: each window of the keep-alive routing test (whole seconds: wrk)
    rehandoff_rounds: int = 4  # its rounds: each kind of window once a round, interleaved (Bench.rehandoff)
    rehandoff_connections: int = 8  # one wrk thread per connection
    profile_test: str = "new-connection"  # what --profile samples: new-connection, or a routing window

    def curl_count(self, size: int) -> int:
        return max(16 if self.curl_bytes >= 1 << 30 else 8, self.curl_bytes // size)


def quick_plan(systems: list[str] | None, sizes: list[str] | None, runs: int | None) -> Plan:
    return Plan(systems=systems or list(QUICK_SYSTEMS), sizes=sizes or ["1KiB", "1MiB"],
                runs=runs or 1, wrk_seconds=2.0, curl_bytes=96 << 20, ttfb_n=200, conn_seconds=2.0,
                memory_ns=[1000], memory_runs=1, profile_seconds=0.0,
                sustain_seconds=10.0, sustain_interval=2.0, idle_seconds=5.0, rehandoff_seconds=2.0,
                rehandoff_rounds=1)


def full_plan(systems: list[str] | None, sizes: list[str] | None, runs: int | None) -> Plan:
    from benchmarks.systems import SYSTEMS

    return Plan(systems=systems or list(SYSTEMS), sizes=sizes or list(SIZES), runs=runs or 3,
                profile_seconds=8.0, sustain_seconds=300.0)


# --------------------------------------------------------------------- machine

def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"kernel": platform.release(), "cores": os.cpu_count(),
                            "python": platform.python_version()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    info["memory_gib"] = round(int(line.split()[1]) / (1 << 20), 1)
    except OSError:
        pass
    info["nginx"] = measure.version_of(["nginx", "-v"])
    info["haproxy"] = measure.version_of(["haproxy", "-v"])
    info["wrk"] = measure.version_of(["wrk", "-v"]).split("Copyright")[0].strip()
    info["curl"] = " ".join(measure.version_of(["curl", "--version"]).split()[:2])
    root = measure.PROJECT_ROOT
    rev = measure.version_of(["git", "-C", root, "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    info["arr"] = rev + (" (+ uncommitted changes)" if dirty else "")
    return info


# ---------------------------------------------------------------------- runner

class Bench:
    def __init__(self, plan: Plan, progress) -> None:
        self.plan = plan
        self.progress = progress
        self.raw: dict[str, dict[str, Any]] = {s: {"runs": [], "memory": {}} for s in plan.systems}
        self.errors: list[str] = []
        self.notes: dict[str, Any] = {}
        self.profile: dict[str, Any] | None = None
        self.cluster = None

    # ----------------------------------------------------------- helpers
    def step(self, text: str) -> None:
        self.progress.step(text)

    @staticmethod
    def _arr_counts(running) -> tuple[float, float]:
        return measure.arr_counts(running.router)

    @staticmethod
    def _fallback_reasons(running) -> dict[str, float]:
        return measure.fallback_reasons(running.router)

    _reason_delta = staticmethod(measure.reason_delta)

    def _fresh_forward_ports(self, running) -> dict[str, int]:
        """arr-nat: destroy the router namespace's TIME_WAIT sockets on forward
        ports before a test (measure.forward_time_wait): each take-back to
        another target leaves one for 60 s, and a test must not inherit the
        previous test's, or it measures that test's fallbacks (no-forward-port)
        instead of its own work. Returns how many there were, for the record;
        a window that exhausts the range by itself still shows its fallbacks."""
        if running.name != "arr-nat":
            return {}
        ports = measure.forward_ports_of(running.router)
        n = measure.forward_time_wait(self.cluster, ports)
        left = 0
        if n:
            measure.forward_time_wait(self.cluster, ports, kill=True)
            left = measure.forward_time_wait(self.cluster, ports)  # ss -K unsupported: they stay
        return {"forward_time_wait_cleared": n - left, "forward_time_wait_left": left}

    def _decided(self, running, test: str, requests: float, before: dict | None,
                 after: dict | None) -> dict[str, Any]:
        """The "every request decided" check of one load window of an arr
        system (stats.decided_check), from the router's metrics read before it
        and (settled) after it; a disagreement is recorded as an error too, so
        the report lists it and the exit status says the comparison is void."""
        delta = None if before is None or after is None else counts_delta(router_counts(before),
                                                                          router_counts(after))
        check = decided_check(requests, delta, hands_off=running.name == "arr-nat")
        check["counts"] = delta  # the window's take-backs and re-handoffs by kind, for the record
        if not check["ok"]:
            self.errors.append(f"{running.name} {test}: not every request decided by the policy: "
                               + "; ".join(check["problems"]))
        return check

    def _verify(self, running, name: str) -> None:
        info = self.cluster.files[name]
        for i in range(len(set(running.urls)) if running.name == "direct" else 1):
            r = self.cluster.curl(running.url(i, info.url_path), timeout=300)
            if not r.ok or r.sha256 != info.sha256:
                raise measure.BenchError(
                    f"{running.name} {name}: sampled download status {r.status} exit {r.exit_code}, "
                    f"{r.size} bytes, SHA-256 {'mismatch' if r.sha256 != info.sha256 else 'ok'} {r.error}")

    # ----------------------------------------------------------- tests
    def throughput(self, running, size_name: str) -> dict[str, Any]:
        c, plan = self.cluster, self.plan
        size = SIZES[size_name]
        info = c.files[size_name]
        self._verify(running, size_name)
        urls = [u + info.url_path for u in running.urls]
        sampler = measure.Sampler(c, running.roots)
        agents = measure.Sampler(c, running.agent_roots) if running.agent_roots else None
        fresh = self._fresh_forward_ports(running)
        m0 = measure.router_samples(running.router)
        h0, f0 = self._arr_counts(running)
        a = sampler.snap()
        aa = agents.snap() if agents else None
        if size <= WRK_MAX_SIZE:
            lr = measure.run_wrk(c, urls, plan.wrk_connections, plan.wrk_seconds, size)
            method = (f"wrk: {len(urls)} x (wrk -t1 -c{plan.wrk_connections // len(urls)} "
                      f"-d{plan.wrk_seconds:g}s), keep-alive")
            bad = {k: v for k, v in lr.errors.items() if v}
            if bad:
                raise measure.BenchError(f"{running.name} {size_name}: wrk errors {bad}")
        else:
            n = plan.curl_count(size)
            lr = measure.run_curl_parallel(c, urls, n, plan.curl_parallel, size)
            method = f"curl -Z --parallel-max {plan.curl_parallel}: {n} downloads, Connection: close"
        b = sampler.snap()
        wa = measure.Sampler.window(aa, agents.snap()) if agents and aa else None
        agent_cpu = wa.router_cpu_s if wa else None
        w = measure.Sampler.window(a, b)
        h1, f1 = self._arr_counts(running)
        decided: dict[str, Any] = {}
        if running.router is not None and size <= WRK_MAX_SIZE:  # keep-alive: every request routed?
            check = self._decided(running, f"throughput {size}", lr.requests, m0,
                                  measure.settled_samples(running.router))
            decided = {"decided": check["decided"], "decided_check": check}
        return {"method": method, "agent_cpu_s": agent_cpu, "requests": lr.requests, "bytes": lr.body_bytes, "seconds": lr.seconds,
                "throughput_Bps": lr.body_bytes / lr.seconds if lr.seconds else None,
                "router_cpu_s": w.router_cpu_s, "router_cpu_ticks_s": w.router_cpu_ticks_s,
                "machine_cpu_s": w.machine_cpu_s, "window_s": w.seconds, "router_bytes": w.router_bytes,
                "handoffs": h1 - h0, "fallbacks": f1 - f0, **decided, **fresh}

    def ttfb(self, running) -> dict[str, Any]:
        c = self.cluster
        info = c.files["1KiB"]
        urls = [u + info.url_path for u in (running.urls if running.name == "direct" else running.urls[:1])]
        fresh = self._fresh_forward_ports(running)
        h0, f0 = self._arr_counts(running)
        r = measure.client_ttfb(c, urls, self.plan.ttfb_n, info.sha256)
        h1, f1 = self._arr_counts(running)
        hist = {}
        if running.router is not None and h1 > 0:
            for q in (0.5, 0.99):
                v = running.router.quantile("arr_handoff_duration_seconds", q)
                hist[f"handoff_p{int(q * 100)}_ms"] = None if v is None else v * 1000
        if r["bad"] or r["ok"] < r["n"]:
            raise measure.BenchError(f"{running.name} ttfb: {r['ok']}/{r['n']} ok, {r['bad']} bad "
                                     f"(status or SHA-256), errors {r['first_errors']}")
        t = [x * 1000 for x in r["ttfb"]]
        conn = [x * 1000 for x in r["connect"]]
        return {"n": r["n"], "p50_ms": percentile(t, 0.5), "p90_ms": percentile(t, 0.9),
                "p99_ms": percentile(t, 0.99), "connect_p50_ms": percentile(conn, 0.5),
                "handoffs": h1 - h0, "fallbacks": f1 - f0, **hist, **fresh}

    def conn_rate(self, running, seconds: float | None = None) -> dict[str, Any]:
        c, plan = self.cluster, self.plan
        info = c.files["1KiB"]
        urls = [u + info.url_path for u in running.urls]
        sampler = measure.Sampler(c, running.roots)
        agents = measure.Sampler(c, running.agent_roots) if running.agent_roots else None
        fresh = self._fresh_forward_ports(running)
        m0 = measure.router_samples(running.router)
        h0, f0 = self._arr_counts(running)
        r0 = self._fallback_reasons(running)
        a = sampler.snap()
        aa = agents.snap() if agents else None
        lr = measure.run_wrk(c, urls, plan.conn_connections, seconds or plan.conn_seconds, info.size,
                             close=True)
        b = sampler.snap()
        wa = measure.Sampler.window(aa, agents.snap()) if agents and aa else None
        agent_cpu = wa.router_cpu_s if wa else None
        w = measure.Sampler.window(a, b)
        h1, f1 = self._arr_counts(running)
        reasons = self._reason_delta(r0, self._fallback_reasons(running))
        bad = {k: v for k, v in lr.errors.items() if v}
        decided: dict[str, Any] = {}
        if running.router is not None:
            check = self._decided(running, "new connections", lr.requests, m0,
                                  measure.settled_samples(running.router))
            decided = {"decided": check["decided"], "decided_check": check}
        return {**decided, "method": f"{len(urls)} x (wrk -t1 -c{plan.conn_connections // len(urls)}), "
                                     "Connection: close",
                "requests": lr.requests, "seconds": lr.seconds, "rate": lr.requests / lr.seconds,
                "handoff_rate": (h1 - h0) / w.seconds if running.router is not None and h1 > h0 else None,
                "router_cpu_s": w.router_cpu_s, "router_cpu_ticks_s": w.router_cpu_ticks_s,
                "router_cpu_util": w.router_cpu_s / w.seconds if running.roots else None,
                # User time apart: on one machine the kernel's work for a packet
                # the router sends to a target (the veth hands it to the target's
                # stack at once) counts as the router's system time.
                "router_user_s": w.router_user_s, "agent_cpu_s": agent_cpu,
                "agent_user_s": wa.router_user_s if wa else None,
                "machine_cpu_util": w.machine_cpu_s / w.seconds, "errors": bad,
                "handoffs": h1 - h0, "fallbacks": f1 - f0, "fallback_reasons": reasons, **fresh}

    def rehandoff(self, running) -> dict[str, Any]:
        """Goals 8 and 9: the router's CPU per request when every request is
        routed. RUNNING routes on measure.ROUTE_HEADER (start_system
        ``by_header``), so the client alone says where each request goes. Three
        kinds of window of 1 KiB GETs from one ``wrk -tN -cN``:

        * ``first``: ``Connection: close``, every request a new connection, so
          for arr-nat a first handoff (the reference);
        * ``same``: keep-alive, every request of a connection to the same
          target: for arr-nat a re-handoff in place (handoff/inplace.py: no
          take-back, one agent exchange);
        * ``other``: keep-alive, consecutive requests of a connection
          alternating targets: a take-back, the old forwarding connection
          closed, a handoff on a new one.

        The kinds interleave: ``rehandoff_rounds`` rounds of one window each,
        in an order rotated every round (measure.route_order), each kind's
        rounds then added up (stats.merge_route_windows). On a VM whose speed
        drifts over seconds, windows minutes apart measured the VM (a null A/B
        put one code's ratio at 0.96 and 1.17 x, benchmarks/RESULTS.md); windows
        seconds apart sample the same moments.

        Per window: router processes' CPU (the Sampler, as everywhere) /
        responses, counted until ROUTE_TAIL after the load ended, so that the
        work a request leaves behind is charged to it (the old forwarding
        connection's look a second after its close, handoff/forward_close.py;
        the ends of the last connections), less the router's CPU at rest over
        that tail (measured once, before the windows). For arr systems the
        router's counters over it (decided check; take-backs, re-handoffs by
        kind: what the window really measured) and the take-back / handoff
        latency from its histograms."""
        c, plan = self.cluster, self.plan
        info = c.files["1KiB"]
        url = running.urls[0] + info.url_path
        measure.client_ttfb(c, [url], 20, info.sha256)  # warm-up, and a check it serves
        rest = self._rest_rates(running)
        out: dict[str, Any] = {
            "method": f"wrk -t{plan.rehandoff_connections} -c{plan.rehandoff_connections} "
                      f"-d{plan.rehandoff_seconds:g}s per window, 1 KiB, routed on {measure.ROUTE_HEADER}; "
                      f"{plan.rehandoff_rounds} round(s) of the three windows, interleaved in rotated order, "
                      f"each window's CPU counted {ROUTE_TAIL:g} s past its end less the router's CPU at rest",
            "rounds": plan.rehandoff_rounds, "rest": rest}
        windows: dict[str, list[dict[str, Any]]] = {mode: [] for mode in measure.ROUTE_MODES}
        for round_no in range(plan.rehandoff_rounds):
            for mode in measure.route_order(round_no):
                self.progress.describe(f"{running.name}: keep-alive routing, {mode} window, "
                                       f"round {round_no + 1} of {plan.rehandoff_rounds}")
                windows[mode].append(self.route_window(running, url, info.size, mode, plan.rehandoff_seconds,
                                                       tail=ROUTE_TAIL, rest=rest))
        for mode, recs in windows.items():
            rec = merge_route_windows(recs)
            buckets = rec.pop("buckets", None)
            if buckets is not None:
                for hist, key in (("arr_takeback_duration_seconds", "takeback"),
                                  ("arr_handoff_duration_seconds", "handoff")):
                    for q in (0.5, 0.99):
                        v = histogram_quantile(buckets.get(hist) or {}, hist, q)
                        rec[f"{key}_p{int(q * 100)}_ms"] = None if v is None else v * 1000
            out[mode] = rec
        return out

    def _rest_rates(self, running, seconds: float = 2.0) -> dict[str, float | None]:
        """CPU seconds per second of the router processes (and agents) with no
        load, once the warm-up's aftermath is over (a take-back's close is
        looked at TIME_WAIT_HOLD later): health checks, sweeps, timers. What a
        window's tail adds beyond the work its requests left is this."""
        time.sleep(TIME_WAIT_HOLD + 0.5)
        sampler = measure.Sampler(self.cluster, running.roots)
        agents = measure.Sampler(self.cluster, running.agent_roots) if running.agent_roots else None
        a, aa = sampler.snap(), agents.snap() if agents else None
        time.sleep(seconds)
        w = measure.Sampler.window(a, sampler.snap())
        wa = measure.Sampler.window(aa, agents.snap()) if agents and aa else None
        return {"seconds": w.seconds, "router_cpu_per_s": w.router_cpu_s / w.seconds,
                "router_ticks_per_s": w.router_cpu_ticks_s / w.seconds,
                "router_user_per_s": w.router_user_s / w.seconds,
                "agent_cpu_per_s": wa.router_cpu_s / wa.seconds if wa else None}

    def route_window(self, running, url: str, size: int, mode: str, seconds: float, *, tail: float = 0.0,
                     rest: dict[str, float | None] | None = None) -> dict[str, Any]:
        """One window of :meth:`rehandoff`: the load for SECONDS, its CPU
        sampled until TAIL after the load ended, less REST's rates over that
        tail (:meth:`_rest_rates`)."""
        c, plan = self.cluster, self.plan
        sampler = measure.Sampler(c, running.roots)
        agents = measure.Sampler(c, running.agent_roots) if running.agent_roots else None
        fresh = self._fresh_forward_ports(running)
        m0 = measure.router_samples(running.router)  # metrics outside the CPU window
        a = sampler.snap()
        aa = agents.snap() if agents else None
        procs = measure.start_wrk_routed(c, url, plan.rehandoff_connections, seconds, mode)
        lr = measure.collect_wrk(c, procs, seconds, size)
        ended = time.monotonic()
        if tail > 0:
            time.sleep(tail)
        b = sampler.snap()
        wa = measure.Sampler.window(aa, agents.snap()) if agents and aa else None
        w = measure.Sampler.window(a, b)
        tail_s = max(0.0, b.t - ended) if tail > 0 else 0.0
        rest = rest or {}

        def less_rest(value: float | None, rate_key: str) -> float | None:
            rate = rest.get(rate_key)
            return value if value is None or rate is None else value - rate * tail_s

        m1 = measure.settled_samples(running.router)
        rec: dict[str, Any] = {
            "requests": lr.requests, "seconds": lr.seconds, "window_s": w.seconds, "tail_s": tail_s,
            "router_cpu_s": less_rest(w.router_cpu_s, "router_cpu_per_s"),
            "router_cpu_ticks_s": less_rest(w.router_cpu_ticks_s, "router_ticks_per_s"),
            "router_user_s": less_rest(w.router_user_s, "router_user_per_s"),
            "router_rest_cpu_s": w.router_cpu_s - (less_rest(w.router_cpu_s, "router_cpu_per_s") or 0.0),
            "agent_cpu_s": less_rest(wa.router_cpu_s if wa else None, "agent_cpu_per_s"),
            "machine_cpu_s": w.machine_cpu_s,
            "errors": {k: v for k, v in lr.errors.items() if v}, **fresh}
        if wa is not None:
            rec["agent_rest_cpu_s"] = wa.router_cpu_s - (rec["agent_cpu_s"] or 0.0)
        if fresh:  # what this window left behind: one per take-back to another target
            # The router keeps each for TIME_WAIT_HOLD, then destroys it
            # (handoff/forward_close.py): count once that is over.
            time.sleep(max(0.0, TIME_WAIT_HOLD + 0.5 - (time.monotonic() - ended)))
            rec["forward_time_wait_after"] = measure.forward_time_wait(c, measure.forward_ports_of(running.router))
        if running.router is not None:
            check = self._decided(running, f"keep-alive routing {mode}", lr.requests, m0, m1)
            rec.update(decided=check["decided"], decided_check=check,
                       counts=counts_delta(router_counts(m0 or {}), router_counts(m1 or {})))
            # what else the window held: fallbacks to proxying and failed take-backs, by reason;
            # how the old forwarding connections it closed ended (a close whose TIME_WAIT the
            # target's FIN did not prove asks sock_diag first: benchmarks/RESULTS.md, sixth session);
            # where its forwarding connections came from (hit, miss, stale, returned:
            # handoff/forward_pool.py)
            for key, name, label in (("fallback_reasons", "arr_handoff_fallbacks_total", "reason"),
                                     ("takeback_results", "arr_takebacks_total", "result"),
                                     ("forward_closes", "arr_forward_closes_total", "result"),
                                     ("forward_pool", "arr_forward_pool_total", "result")):
                rec[key] = {k: v for k, v in counts_delta(by_label(m0 or {}, name, label),
                                                          by_label(m1 or {}, name, label)).items() if v}
            rec["buckets"] = {hist: measure.histogram_delta(m0, m1, hist)
                              for hist in ("arr_takeback_duration_seconds", "arr_handoff_duration_seconds")}
        if lr.requests == 0:
            raise measure.BenchError(f"{running.name} keep-alive routing {mode}: no response "
                                     f"(wrk errors {rec['errors']})")
        if rec["errors"]:  # e.g. a failed take-back ends its connection: wrk sees a read error
            self.errors.append(f"{running.name} keep-alive routing {mode}: wrk errors {rec['errors']}")
        return rec

    def memory(self, running, n: int) -> dict[str, Any]:
        from benchmarks.systems import arr_map_entries

        c = self.cluster
        info = c.files["1KiB"]
        url = running.urls[0] + info.url_path
        measure.client_ttfb(c, [url], 20, info.sha256)  # warm-up
        time.sleep(1.0)
        nat = running.name == "arr-nat"
        pids = measure.process_tree(running.roots)
        rss0 = measure.rss_bytes(pids)
        socks0, skmem0 = measure.router_skmem(c)
        maps0 = arr_map_entries(c) if nat else {}
        h0, f0 = self._arr_counts(running)
        r0 = self._fallback_reasons(running)
        with measure.HeldConnections(c, url, n) as held:
            rep = held.open(timeout=120 + n / 50)
            time.sleep(1.0)
            if nat:  # until the handoffs the client saw are all in the maps
                measure.wait_for(lambda: sum(self._arr_counts(running)) - h0 - f0 >= rep["opened"], 10, 0.5)
            pids = measure.process_tree(running.roots)
            rss1 = measure.rss_bytes(pids)
            socks1, skmem1 = measure.router_skmem(c)
            maps1 = arr_map_entries(c) if nat else {}
            h1, f1 = self._arr_counts(running)
            reasons = self._reason_delta(r0, self._fallback_reasons(running))
            idle = self.idle_cpu(running) if nat and self.plan.idle_seconds > 0 else {}
        opened = rep["opened"]
        if opened == 0:
            raise measure.BenchError(f"{running.name} memory {n}: no connection opened {rep}")
        slab = measure.tcp_slab_objsize() or 0
        map_bytes = 0
        map_detail = {}
        for name, (entries, ksz, vsz) in maps1.items():
            delta = entries - maps0.get(name, (0,))[0]
            map_bytes += max(0, delta) * htab_elem_bytes(ksz, vsz)
            map_detail[name] = {"entries_delta": delta, "elem_bytes": htab_elem_bytes(ksz, vsz)}
        rss_per = (rss1 - rss0) / opened
        kernel_per = ((skmem1 - skmem0) + max(0, socks1 - socks0) * slab) / opened
        map_per = map_bytes / opened
        return {"n": n, "opened": opened, "client_errors": rep["errors"], "open_seconds": rep["seconds"],
                "rss_delta": rss1 - rss0, "rss_per_conn": rss_per,
                "sockets_delta": socks1 - socks0, "skmem_delta": skmem1 - skmem0,
                "tcp_sock_slab_bytes": slab, "kernel_per_conn": kernel_per,
                "maps": map_detail, "map_bytes_per_conn": map_per if nat else None,
                "bytes_per_conn": rss_per + kernel_per + map_per,
                "handoffs": h1 - h0, "fallbacks": f1 - f0, "fallback_reasons": reasons, **idle}

    def idle_cpu(self, running) -> dict[str, Any]:
        """Goal 6: CPU of the router and the agents over an idle window while the
        memory test holds its connections (nothing is sent on them meanwhile)."""
        router = measure.Sampler(self.cluster, running.roots)
        agents = measure.Sampler(self.cluster, running.agent_roots)
        a, aa = router.snap(), agents.snap()
        time.sleep(self.plan.idle_seconds)
        w, wa = measure.Sampler.window(a, router.snap()), measure.Sampler.window(aa, agents.snap())
        return {"idle_window_s": w.seconds, "idle_router_cpu_s": w.router_cpu_s,
                "idle_agent_cpu_s": wa.router_cpu_s,
                **idle_core_pct(w.seconds, w.router_cpu_s, wa.router_cpu_s)}

    def profile_nat(self, seconds: float, out_dir: Path) -> dict[str, Any] | None:
        from benchmarks.systems import start_system

        pyspy = Path(sys.executable).parent / "py-spy"
        if not pyspy.exists():
            return {"error": "py-spy not installed in .venv (scripts/setup.sh --bench installs it)"}
        raw_path = out_dir / "profile-arr-nat.txt"
        test = self.plan.profile_test
        routed = test != "new-connection"  # a window of the keep-alive routing test
        with start_system(self.cluster, "arr-nat", by_header=routed) as running:
            pid = running.roots[0]
            if routed:
                info = self.cluster.files["1KiB"]
                url = running.urls[0] + info.url_path
                measure.client_ttfb(self.cluster, [url], 20, info.sha256)  # warm-up
            spy = subprocess.Popen([str(pyspy), "record", "--pid", str(pid), "--duration", str(int(seconds)),
                                    "--rate", "250", "--nonblocking", "--format", "raw", "-o", str(raw_path)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            try:
                time.sleep(0.5)
                if routed:
                    win = self.route_window(running, url, info.size, test, max(1, int(seconds - 1)))
                    rate = win["requests"] / win["seconds"] if win["seconds"] else 0.0
                else:
                    rate = self.conn_rate(running, seconds=seconds - 1)["rate"]
                _, err = spy.communicate(timeout=seconds + 30)
            finally:
                if spy.poll() is None:
                    spy.terminate()
                    spy.wait(timeout=10)
        if not raw_path.exists():
            return {"error": f"py-spy produced nothing: {err[-500:]}"}
        text = raw_path.read_text()
        prof = report.profile_summary(text)
        prof["conn_rate_during_profile"] = rate
        prof["test"] = test
        gz = raw_path.with_name(raw_path.name + ".gz")
        with gzip.open(gz, "wt") as f:  # collapsed stacks, compressed for the repository
            f.write(text)
        raw_path.unlink()
        prof["raw_file"] = gz.name
        return prof

    # ----------------------------------------------------------- driver
    def run(self, out_dir: Path) -> None:
        from arr.testbed import Cluster, ClusterSpec
        from benchmarks.sustain import sustain_test
        from benchmarks.systems import REHANDOFF_ONLY, bench_targets, start_system

        plan = self.plan
        files = {name: SIZES[name] for name in dict.fromkeys(["1KiB", *plan.sizes])}
        self.step("building the cluster")
        with Cluster(ClusterSpec(targets=plan.targets, files=files)) as c:
            self.cluster = c
            self.notes["targets"] = bench_targets(c)
            for host in (c.client, c.router):
                measure.sysctl_netns(c, host, {"net.ipv4.ip_local_port_range": "1024 65535",
                                               "net.ipv4.tcp_tw_reuse": "1"})
            for run in range(plan.runs):
                for system in plan.systems:
                    rec: dict[str, Any] = {"sizes": {}}
                    self.raw[system]["runs"].append(rec)
                    try:
                        self.step(f"run {run + 1}/{plan.runs} {system}: starting")
                        if any(t in plan.tests for t in ("throughput", "ttfb", "conn")) \
                                and system not in REHANDOFF_ONLY:
                            with start_system(c, system) as running:
                                if run == 0:
                                    self.notes.setdefault("configs", {})[system] = running.config
                                if "throughput" in plan.tests:
                                    for size in plan.sizes:
                                        self.step(f"run {run + 1}/{plan.runs} {system}: throughput {size}")
                                        rec["sizes"][size] = self.throughput(running, size)
                                if "ttfb" in plan.tests:
                                    self.step(f"run {run + 1}/{plan.runs} {system}: TTFB x{plan.ttfb_n}")
                                    rec["ttfb"] = self.ttfb(running)
                                if "conn" in plan.tests:
                                    self.step(f"run {run + 1}/{plan.runs} {system}: new connections")
                                    rec["conn_rate"] = self.conn_rate(running)
                    except Exception as e:  # noqa: BLE001 - recorded, the run goes on
                        self.errors.append(f"run {run + 1} {system}: {e}")
                        self.progress.log(f"[red]error[/red] run {run + 1} {system}: {e}")
                        self.progress.log(traceback.format_exc(limit=3))
                    if "rehandoff" not in plan.tests or system == "direct":  # direct: no router to cost
                        continue
                    try:
                        self.step(f"run {run + 1}/{plan.runs} {system}: keep-alive routing (by header)")
                        # its own start: the routers route on a header here (systems.header_routing)
                        with start_system(c, system, by_header=True) as running:
                            if run == 0:
                                self.notes.setdefault("routing_configs", {})[system] = running.config
                            rec["rehandoff"] = self.rehandoff(running)
                    except Exception as e:  # noqa: BLE001
                        self.errors.append(f"run {run + 1} {system} keep-alive routing: {e}")
                        self.progress.log(f"[red]error[/red] run {run + 1} {system} keep-alive routing: {e}")
                        self.progress.log(traceback.format_exc(limit=3))
            for run in range(plan.memory_runs):
                for system in plan.systems:
                    if system in NO_MEMORY_TEST:
                        continue
                    for n in plan.memory_ns:
                        self.step(f"memory {run + 1}/{plan.memory_runs} {system}: {n:,} idle connections")
                        try:
                            with start_system(c, system) as running:
                                m = self.memory(running, n)
                            self.raw[system]["memory"].setdefault(str(n), []).append(m)
                        except Exception as e:  # noqa: BLE001
                            self.errors.append(f"memory {system} {n}: {e}")
                            self.progress.log(f"[red]error[/red] memory {system} {n}: {e}")
            if plan.sustain_seconds and "arr-nat" in plan.systems:
                self.step(f"sustain: arr-nat, one target, new connections for {plan.sustain_seconds:g} s")
                try:
                    rec = self.raw["arr-nat"]["sustain"] = sustain_test(
                        c, plan.sustain_seconds, plan.sustain_connections, plan.sustain_interval,
                        show=self.progress.describe)
                    if rec["errors"].get("status") or not rec["handoffs"]:
                        raise measure.BenchError(f"{rec['handoffs']:.0f} handoffs, "
                                                 f"wrk errors {rec['errors']}")
                except Exception as e:  # noqa: BLE001
                    self.errors.append(f"sustain arr-nat: {e}")
                    self.progress.log(f"[red]error[/red] sustain arr-nat: {e}")
            if plan.profile_seconds and "arr-nat" in plan.systems:
                self.step(f"profiling arr-nat (py-spy) during the {plan.profile_test} test")
                try:
                    self.profile = self.profile_nat(plan.profile_seconds, out_dir)
                except Exception as e:  # noqa: BLE001
                    self.profile = {"error": repr(e)}
            self.step("cleaning up")
        self.cluster = None

    def steps(self) -> int:
        from benchmarks.systems import REHANDOFF_ONLY

        p = self.plan
        per_run = len([s for s in p.systems if s not in REHANDOFF_ONLY]) * (
            1 + (len(p.sizes) if "throughput" in p.tests else 0) + ("ttfb" in p.tests) + ("conn" in p.tests))
        if "rehandoff" in p.tests:
            per_run += len([s for s in p.systems if s != "direct"])
        mem = p.memory_runs * len([s for s in p.systems if s not in NO_MEMORY_TEST]) * len(p.memory_ns)
        nat = "arr-nat" in p.systems
        return (2 + p.runs * per_run + mem + (1 if p.profile_seconds and nat else 0)
                + (1 if p.sustain_seconds and nat else 0))


class Progress:
    """A rich progress bar on stderr (plain lines when not a terminal)."""

    def __init__(self, total: int) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as RP, TextColumn, TimeElapsedColumn

        self.console = Console(stderr=True)
        self.bar = RP(TextColumn("[bold]arr bench[/bold]"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), TextColumn("{task.description}"), console=self.console)
        self.task = self.bar.add_task("", total=total)
        self.started = False

    def __enter__(self) -> "Progress":
        self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.update(self.task, completed=self.bar.tasks[0].total)
        self.bar.stop()

    def step(self, text: str) -> None:
        if self.started:
            self.bar.advance(self.task)
        self.started = True
        self.bar.update(self.task, description=text)
        if not self.console.is_terminal:
            self.console.print(f"[{time.strftime('%H:%M:%S')}] {text}")

    def describe(self, text: str) -> None:
        """New text for the current step (no advance)."""
        self.bar.update(self.task, description=text)

    def log(self, text: str) -> None:
        self.console.print(text)


# ------------------------------------------------------------------------ main

def build_parser() -> argparse.ArgumentParser:
    from benchmarks.systems import SYSTEMS

    p = argparse.ArgumentParser(prog="python -m benchmarks",
                                description=f"arr benchmark: {', '.join(SYSTEMS)}")
    p.add_argument("--quick", action="store_true",
                   help="CI smoke: direct/arr-nat/arr-proxy/haproxy, 1KiB and 1MiB, 1 run, memory at 1k, "
                        "sustain 10 s, keep-alive routing windows of 2 s (about 2 min)")
    p.add_argument("--out", type=Path, help=f"output directory (default {DEFAULT_OUT}, quick: .../quick)")
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, metavar="SYSTEM",
                   help=f"subset of {', '.join(SYSTEMS)}")
    p.add_argument("--sizes", nargs="+", choices=list(SIZES), metavar="SIZE", help=f"subset of {', '.join(SIZES)}")
    p.add_argument("--runs", type=int, help="runs per figure (default 3, quick 1)")
    p.add_argument("--memory-ns", type=int, nargs="+", help="idle-connection counts (default 1000 10000)")
    p.add_argument("--memory-runs", type=int, help="runs of the memory test (default 2, quick 1)")
    p.add_argument("--no-memory", action="store_true", help="skip the idle-connection memory test")
    p.add_argument("--profile", type=float, metavar="SECONDS",
                   help="py-spy profile of arr-nat for SECONDS (default 8 in full runs, off in quick; 0 = off)")
    p.add_argument("--sustain", type=float, metavar="SECONDS",
                   help="goal 5: arr-nat with one target, new connections as fast as wrk goes, for SECONDS, "
                        "once (default 300 in full runs, 10 in quick; 0 = off)")
    p.add_argument("--idle", type=float, metavar="SECONDS",
                   help="goal 6: CPU window of arr-nat's router and agents while the memory test holds its "
                        "connections (default 20, quick 5; 0 = off)")
    p.add_argument("--tests", nargs="+", choices=TESTS, metavar="TEST",
                   help=f"per-run tests, subset of {', '.join(TESTS)} (default all; rehandoff: the keep-alive "
                        "routing test of goals 8 and 9)")
    p.add_argument("--rehandoff-seconds", type=int, metavar="SECONDS",
                   help="goals 8, 9: each window of the keep-alive routing test (default 2)")
    p.add_argument("--rehandoff-rounds", type=int, metavar="N",
                   help="goals 8, 9: rounds of the keep-alive routing test, each running every kind of window "
                        "once, interleaved (default 4, quick 1)")
    p.add_argument("--rehandoff-connections", type=int, metavar="N",
                   help="goals 8, 9: keep-alive connections of the keep-alive routing test, one wrk thread "
                        "each (default 8; more: clients that reach a target together, which the forward "
                        "pool's shelves must keep up with)")
    p.add_argument("--profile-test", choices=("new-connection", *measure.ROUTE_MODES),
                   help="what --profile samples: the new-connection test (default) or a window of the "
                        "keep-alive routing test (first, same, other)")
    p.add_argument("--results-md", type=Path,
                   help="also write the markdown report here (e.g. benchmarks/RESULTS.md)")
    p.add_argument("--report-only", type=Path, metavar="JSON",
                   help="re-render the report and plots from a results.json, run nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out_dir: Path = args.out or (DEFAULT_OUT / "quick" if args.quick else DEFAULT_OUT)
    if args.report_only:
        results = json.loads(args.report_only.read_text())
        results["summary"] = summarize(results["raw"])
        prof = results.get("profile") or {}
        raw_prof = args.report_only.parent / prof.get("raw_file", "-")
        if raw_prof.is_file():  # re-derive the tables from the raw stacks
            opener = gzip.open if raw_prof.suffix == ".gz" else open
            with opener(raw_prof, "rt") as f:
                results["profile"] = {**prof, **report.profile_summary(f.read())}
        report.write_all(results, args.out or args.report_only.parent, args.results_md)
        return 0
    if os.geteuid() != 0:
        print("arr bench: needs root (it builds network namespaces)", file=sys.stderr)
        return 2
    make = quick_plan if args.quick else full_plan
    plan = make(args.systems, args.sizes, args.runs)
    if args.memory_ns:
        plan.memory_ns = args.memory_ns
    if args.memory_runs is not None:
        plan.memory_runs = args.memory_runs
    if args.no_memory:
        plan.memory_ns = []
    if args.profile is not None:
        plan.profile_seconds = args.profile
    if args.sustain is not None:
        plan.sustain_seconds = args.sustain
        plan.sustain_interval = min(plan.sustain_interval, max(1.0, args.sustain / 10))
    if args.idle is not None:
        plan.idle_seconds = args.idle
    if args.tests:
        plan.tests = list(args.tests)
    if args.rehandoff_seconds is not None:
        plan.rehandoff_seconds = float(max(1, args.rehandoff_seconds))
    if args.rehandoff_rounds is not None:
        plan.rehandoff_rounds = max(1, args.rehandoff_rounds)
    if args.rehandoff_connections is not None:
        plan.rehandoff_connections = max(1, args.rehandoff_connections)
    if args.profile_test:
        plan.profile_test = args.profile_test
    # fds for the load generators and routers (inherited): as high as the hard limit allows
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    out_dir.mkdir(parents=True, exist_ok=True)

    started = time.time()
    bench = Bench(plan, None)
    with Progress(bench.steps()) as progress:
        bench.progress = progress
        try:
            bench.run(out_dir)
        except KeyboardInterrupt:
            bench.errors.append("interrupted")
        except Exception as e:  # noqa: BLE001 - the report still gets written
            bench.errors.append(f"fatal: {e!r}")
            progress.log(traceback.format_exc())
    results = {
        "schema": 1,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
        "duration_s": round(time.time() - started, 1),
        "quick": args.quick,
        "machine": machine_info(),
        "plan": {**plan.__dict__, "fd_limit": hard},
        "notes": bench.notes,
        "raw": bench.raw,
        "summary": summarize(bench.raw),
        "profile": bench.profile,
        "errors": bench.errors,
    }
    paths = report.write_all(results, out_dir, args.results_md)
    print(report.console_summary(results))
    print(f"\nwrote {', '.join(str(p) for p in paths)}")
    if bench.errors:
        print(f"{len(bench.errors)} error(s):", *bench.errors, sep="\n  ", file=sys.stderr)
        return 1
    return 0
