"""Pure arithmetic of the benchmark: summaries of runs, CPU accounting, verdicts
(the goals themselves are in benchmarks/goals.py).

Nothing here touches the system, so all of it is unit-tested
(tests/unit/test_bench_report.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable, Mapping, Sequence

GIB = 1 << 30
KIB = 1 << 10


def percentile(values: Sequence[float], q: float) -> float:
    """The Q-quantile (0..1) of VALUES, linear interpolation between closest ranks
    (numpy's default "linear" method)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile {q} not in [0, 1]")
    xs = sorted(values)
    pos = (len(xs) - 1) * q
    lo = math.floor(pos)
    hi = math.ceil(pos)
    if lo == hi:
        return float(xs[lo])
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass(frozen=True)
class Summary:
    """A figure over several runs: its median and its spread."""

    median: float
    min: float
    max: float
    q1: float
    q3: float
    n: int

    @classmethod
    def of(cls, values: Iterable[float | None]) -> "Summary | None":
        xs = [float(v) for v in values if v is not None and not math.isnan(float(v))]
        if not xs:
            return None
        return cls(median=percentile(xs, 0.5), min=min(xs), max=max(xs),
                   q1=percentile(xs, 0.25), q3=percentile(xs, 0.75), n=len(xs))

    def to_json(self) -> dict[str, float | int]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, float] | None) -> "Summary | None":
        if data is None:
            return None
        return cls(median=data["median"], min=data["min"], max=data["max"],
                   q1=data["q1"], q3=data["q3"], n=int(data["n"]))


# ----------------------------------------------------------------- CPU accounting

def cpu_seconds_from_stat(stat_line: str, clk_tck: int) -> float:
    """utime+stime (seconds) from the text of /proc/PID/stat.

    The command name (field 2) may contain spaces and parentheses, so fields are
    counted after the last ')': utime and stime are fields 14 and 15 of the line.
    """
    utime, stime = _stat_times(stat_line)
    return (utime + stime) / clk_tck


def _stat_times(stat_line: str) -> tuple[int, int]:
    """(utime, stime) in clock ticks from the text of /proc/PID/stat."""
    rest = stat_line.rsplit(")", 1)[1].split()
    # rest[0] is field 3 (state); utime is field 14 -> rest[11], stime rest[12]
    return int(rest[11]), int(rest[12])


def user_seconds_from_stat(stat_line: str, clk_tck: int) -> float:
    """utime alone (seconds) from the text of /proc/PID/stat: the process's
    own instructions, without the kernel work its system calls did and
    without the softirq work (the veth "wire" of other namespaces' packets)
    that the tick charged to it while it ran. The same fields as
    :func:`cpu_seconds_from_stat`."""
    return _stat_times(stat_line)[0] / clk_tck


def machine_busy_seconds(proc_stat_cpu_line: str, clk_tck: int) -> float:
    """Busy CPU seconds (all CPUs) from the aggregate ``cpu`` line of /proc/stat:
    user+nice+system+irq+softirq+steal (idle and iowait excluded; guest time is
    already included in user/nice)."""
    parts = proc_stat_cpu_line.split()
    if parts[0] != "cpu":
        raise ValueError(f"not the aggregate cpu line: {proc_stat_cpu_line!r}")
    v = [int(x) for x in parts[1:]] + [0] * 10
    user, nice, system, _idle, _iowait, irq, softirq, steal = v[:8]
    return (user + nice + system + irq + softirq + steal) / clk_tck


def per_gib(seconds: float | None, bytes_served: int | float) -> float | None:
    """CPU seconds per GiB served (None when nothing was served)."""
    if seconds is None or not bytes_served:
        return None
    return seconds / (bytes_served / GIB)


def marginal_per_gib(system_busy_s: float | None, system_bytes: float,
                     direct_busy_s: float | None, direct_bytes: float) -> float | None:
    """Machine CPU per GiB a system costs beyond the direct (router-less) run of the
    same object size: (busy/GiB)_system - (busy/GiB)_direct. Per GiB, so runs at
    different throughputs are comparable. May be negative within noise."""
    a = per_gib(system_busy_s, system_bytes)
    b = per_gib(direct_busy_s, direct_bytes)
    if a is None or b is None:
        return None
    return a - b


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


# ------------------------------------------------------------------- memory

HTAB_ELEM_HEADER = 48
"""Bytes the kernel's hash-table element (struct htab_elem: hash node, LRU node,
hash) takes before the key, on 64-bit Linux 6.x."""


def round8(n: int) -> int:
    return (n + 7) // 8 * 8


def htab_elem_bytes(key_size: int, value_size: int) -> int:
    """Memory of one element of a BPF (LRU) hash map: header + key + value, 8-aligned."""
    return HTAB_ELEM_HEADER + round8(key_size) + round8(value_size)


def parse_skmem(ss_output: str) -> tuple[int, int]:
    """(sockets, bytes) from ``ss -tmn`` output: the number of skmem blocks and the
    sum of r (receive queue) + t (in flight to the device) + f (forward-allocated)
    + w (write queue) + o (options) + bl (backlog) of every socket. rb/tb are
    limits, not memory, and d is a drop counter."""
    import re

    sockets = 0
    total = 0
    for m in re.finditer(r"skmem:\(([^)]*)\)", ss_output):
        sockets += 1
        fields = dict(re.findall(r"([a-z]+)(\d+)", m.group(1)))
        total += sum(int(fields.get(k, 0)) for k in ("r", "t", "f", "w", "o", "bl"))
    return sockets, total


# ------------------------------------------------------- router counters

def split_sample(key: str) -> tuple[str, dict[str, str]]:
    """``'name{a="x",b="y"}'`` (a key of a parsed Prometheus exposition) into its
    name and labels."""
    import re

    name, _, labels = key.partition("{")
    return name, dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', labels))


ROUTER_COUNTS = ("decided", "handoffs", "fallbacks", "takebacks", "takeback_failures",
                 "rehandoffs_same", "rehandoffs_other", "request_resends")


def router_counts(samples: Mapping[str, float]) -> dict[str, float]:
    """The arr router's counters behind the "every request decided" check and the
    keep-alive test, from one read of its metrics (``parse_exposition``):

    ``decided``: ``arr_requests_total`` over every decision, status and target
    (one per request the policy decided, counted when it was executed);
    ``handoffs``: ``arr_handoffs_total{result="ok"}`` (first handoffs and
    re-handoffs of taken-back connections alike); ``fallbacks``:
    ``arr_handoff_fallbacks_total`` over reasons; ``takebacks`` /
    ``takeback_failures``: ``arr_takebacks_total`` ok / any other result;
    ``rehandoffs_same`` / ``rehandoffs_other``: ``arr_rehandoffs_total`` by target;
    ``request_resends``: ``arr_forward_resends_total`` (requests the router sent
    again, handoff/release.py: none without loss, or the targets were too slow).
    Only the ``_total`` samples count (``_created`` are timestamps)."""
    out = dict.fromkeys(ROUTER_COUNTS, 0.0)
    for key, value in samples.items():
        name, labels = split_sample(key)
        if name == "arr_requests_total":
            out["decided"] += value
        elif name == "arr_handoffs_total" and labels.get("result") == "ok":
            out["handoffs"] += value
        elif name == "arr_handoff_fallbacks_total":
            out["fallbacks"] += value
        elif name == "arr_takebacks_total":
            out["takebacks" if labels.get("result") == "ok" else "takeback_failures"] += value
        elif name == "arr_rehandoffs_total":
            kind = labels.get("target")
            if kind in ("same-target", "in-place"):  # in place: to the same target too
                out["rehandoffs_same"] += value
            elif kind in ("other-target", "handed-on"):  # handed on: to another target, from the captures
                out["rehandoffs_other"] += value
        elif name == "arr_forward_resends_total":
            out["request_resends"] += value
    return out


def by_label(samples: Mapping[str, float], name: str, label: str) -> dict[str, float]:
    """Sample NAME summed by the value of one of its labels (e.g. fallbacks by reason)."""
    out: dict[str, float] = {}
    for key, value in samples.items():
        sample, labels = split_sample(key)
        if sample == name:
            v = labels.get(label, "?")
            out[v] = out.get(v, 0.0) + value
    return out


def counts_delta(a: Mapping[str, float], b: Mapping[str, float]) -> dict[str, float]:
    """B - A for every counter of B (a counter absent from A was 0)."""
    return {k: v - a.get(k, 0.0) for k, v in b.items()}


def decided_check(requests: float, delta: Mapping[str, float] | None, *, hands_off: bool) -> dict:
    """Was every response the load client counted decided by the router's policy?

    REQUESTS: responses the client counted in the window; DELTA: the router's
    :func:`router_counts` over the same window. Two conditions (the issue's
    acceptance), either failing flags the run:

    * decided >= requests: a response without a decision is a request that
      reached a target unrouted (a handed-off connection's later requests
      going straight to the target). More decisions than responses is normal:
      the client stops with up to one request per connection in flight, whose
      decision the router made but whose response the client never counted.
    * HANDS_OFF (arr-nat): handoffs + fallbacks == decided: every decision was
      a handoff (first or re-handoff) or a counted fallback, none lost between
      the policy and the engine.
    """
    rec: dict = {"requests": requests, "decided": None if delta is None else delta.get("decided", 0.0)}
    problems: list[str] = []
    if delta is None:
        problems.append("router metrics not read")
    else:
        decided = rec["decided"]
        if decided < requests:
            problems.append(f"{requests - decided:,.0f} of {requests:,.0f} responses without a decision "
                            f"({decided:,.0f} decided)")
        if hands_off:
            routed = delta.get("handoffs", 0.0) + delta.get("fallbacks", 0.0)
            rec["handed_off"] = routed
            if routed != decided:
                problems.append(f"handoffs {delta.get('handoffs', 0.0):,.0f} + fallbacks "
                                f"{delta.get('fallbacks', 0.0):,.0f} = {routed:,.0f}, not the {decided:,.0f} decided")
    rec["ok"] = not problems
    rec["problems"] = problems
    return rec


# ------------------------------------------------------------------- verdicts

@dataclass(frozen=True)
class Verdict:
    goal: str
    target: str  # the goal, as text
    measured: str  # what was measured, as text
    status: str  # PASS | MISS | n/a
    note: str = ""


def verdict(goal: str, target: str, value: float | None, limit: float, *, at_most: bool,
            fmt: str = "{:.3g}", note: str = "") -> Verdict:
    """PASS when VALUE is at most (or at least) LIMIT; n/a when not measured."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return Verdict(goal, target, "not measured", "n/a", note)
    ok = value <= limit if at_most else value >= limit
    return Verdict(goal, target, fmt.format(value), "PASS" if ok else "MISS", note)


# ------------------------------------------------------------------- summary

def _runs_metric(runs: Sequence[Mapping], *path: str) -> list[float | None]:
    out: list[float | None] = []
    for run in runs:
        node: object = run
        for key in path:
            node = node.get(key) if isinstance(node, Mapping) else None  # type: ignore[union-attr]
        out.append(node if isinstance(node, (int, float)) else None)  # type: ignore[arg-type]
    return out


def _summ(values: Iterable[float | None]) -> dict | None:
    s = Summary.of(values)
    return None if s is None else s.to_json()


def _paired(values: Sequence[float | None], baseline: Sequence[float | None], op) -> list[float | None]:
    """op(value_i, baseline_i) run by run; a missing baseline run falls back to the
    median of the baseline's runs."""
    base_med = Summary.of(baseline)
    out: list[float | None] = []
    for i, v in enumerate(values):
        b = baseline[i] if i < len(baseline) and baseline[i] is not None else (
            base_med.median if base_med else None)
        out.append(None if v is None or b is None else op(v, b))
    return out


def summarize(raw: Mapping[str, Mapping]) -> dict:
    """Medians and spreads over runs, for every system and metric.

    RAW: ``{system: {"runs": [run, ...], "memory": {n: [mem, ...]}}}`` where a run is
    ``{"sizes": {size: {"bytes", "seconds", "router_cpu_s", "machine_cpu_s",
    "router_bytes"}}, "ttfb": {"p50_ms", "p99_ms"}, "conn_rate": {"rate",
    "router_cpu_util"}}``. Marginal CPU and TTFB overhead are paired run by run with
    the ``direct`` system's run of the same index.
    """
    direct_runs = raw.get("direct", {}).get("runs", [])
    out: dict = {}
    for system, data in raw.items():
        runs = data.get("runs", [])
        sizes: dict = {}
        size_names: list[str] = []
        for run in runs:
            for size in run.get("sizes", {}):
                if size not in size_names:
                    size_names.append(size)
        for size in size_names:
            b = _runs_metric(runs, "sizes", size, "bytes")
            secs = _runs_metric(runs, "sizes", size, "seconds")
            rcpu = _runs_metric(runs, "sizes", size, "router_cpu_s")
            mcpu = _runs_metric(runs, "sizes", size, "machine_cpu_s")
            rbytes = _runs_metric(runs, "sizes", size, "router_bytes")
            acpu = _runs_metric(runs, "sizes", size, "agent_cpu_s")
            thr = [None if x is None or not t else x / t for x, t in zip(b, secs)]
            rpg = [None if c is None or x is None else per_gib(c, x) for c, x in zip(rcpu, b)]
            mpg = [None if c is None or x is None else per_gib(c, x) for c, x in zip(mcpu, b)]
            dmpg = [None if c is None or x is None else per_gib(c, x) for c, x in zip(
                _runs_metric(direct_runs, "sizes", size, "machine_cpu_s"),
                _runs_metric(direct_runs, "sizes", size, "bytes"))]
            marginal = _paired(mpg, dmpg, lambda a, d: a - d) if direct_runs else [None] * len(runs)
            bpb = [None if r is None or not x else r / x for r, x in zip(rbytes, b)]
            sizes[size] = {
                "throughput_Bps": _summ(thr),
                "router_cpu_per_gib": _summ(rpg),
                "machine_cpu_per_gib": _summ(mpg),
                "marginal_cpu_per_gib": _summ(marginal),
                "router_bytes_per_byte": _summ(bpb),
                "agent_cpu_per_gib": _summ(None if c is None or x is None else per_gib(c, x)
                                           for c, x in zip(acpu, b)),
            }
        entry: dict = {"sizes": sizes}
        p50 = _runs_metric(runs, "ttfb", "p50_ms")
        p99 = _runs_metric(runs, "ttfb", "p99_ms")
        if any(v is not None for v in p50):
            entry["ttfb"] = {
                "p50_ms": _summ(p50), "p99_ms": _summ(p99),
                "p50_overhead_ms": _summ(_paired(p50, _runs_metric(direct_runs, "ttfb", "p50_ms"),
                                                 lambda a, d: a - d)) if direct_runs else None,
                "p99_overhead_ms": _summ(_paired(p99, _runs_metric(direct_runs, "ttfb", "p99_ms"),
                                                 lambda a, d: a - d)) if direct_runs else None,
            }
        rate = _runs_metric(runs, "conn_rate", "rate")
        if any(v is not None for v in rate):
            util = _runs_metric(runs, "conn_rate", "router_cpu_util")
            handoff_rate = _runs_metric(runs, "conn_rate", "handoff_rate")
            # handoffs (not fallbacks) when the system hands off, else connections
            basis = [h if h is not None else r for h, r in zip(handoff_rate, rate)]
            per_core = [None if r is None or not u else r / u for r, u in zip(basis, util)]
            entry["conn_rate"] = {"rate": _summ(rate), "handoff_rate": _summ(handoff_rate),
                                  "router_cpu_util": _summ(util), "per_router_core": _summ(per_core),
                                  **cpu_per_connection(runs)}
        rehandoff = rehandoff_summary(runs)
        if rehandoff:
            entry["rehandoff"] = rehandoff
        memory = {}
        for n, mems in data.get("memory", {}).items():
            memory[str(n)] = {k: _summ(m.get(k) for m in mems) for k in (
                "bytes_per_conn", "rss_per_conn", "kernel_per_conn", "map_bytes_per_conn", "opened",
                "handoffs", "idle_core_pct", "idle_router_core_pct", "idle_agent_core_pct", "idle_window_s")}
        if memory:
            entry["memory"] = memory
        if data.get("sustain"):
            entry["sustain"] = sustain_summary(data["sustain"])
        out[system] = entry
    return out


def _per(num: float | None, den: float | None, scale: float = 1.0) -> float | None:
    return None if num is None or not den else num / den * scale


def cpu_per_connection(runs: Sequence[Mapping]) -> dict:
    """CPU cost of one connection in the new-connection test (one request per
    connection), over runs: the router's CPU per connection served, and for
    arr-nat the router's and the agents' CPU per handoff and their ratio (the
    handoffs cancel out: agents' CPU / router's CPU)."""
    rcpu = _runs_metric(runs, "conn_rate", "router_cpu_s")
    acpu = _runs_metric(runs, "conn_rate", "agent_cpu_s")
    conns = _runs_metric(runs, "conn_rate", "requests")
    handoffs = _runs_metric(runs, "conn_rate", "handoffs")
    return {
        "router_cpu_per_conn_ms": _summ(_per(c, n, 1000) for c, n in zip(rcpu, conns)),
        "router_cpu_per_handoff_ms": _summ(_per(c, h, 1000) for c, h in zip(rcpu, handoffs)),
        "agent_cpu_per_handoff_ms": _summ(_per(a, h, 1000) for a, h in zip(acpu, handoffs)),
        "agent_to_router_cpu": _summ(_per(a, c) if h else None for a, c, h in zip(acpu, rcpu, handoffs)),
        "machine_cpu_util": _summ(_runs_metric(runs, "conn_rate", "machine_cpu_util")),
    }


PHASES = ("first", "same", "other")
"""The keep-alive routing test's windows (run.py ``Bench.rehandoff``): ``first``,
one request per connection (``Connection: close``: every request a first
handoff); ``same``, keep-alive, every request of a connection to the same
target (a same-target re-handoff each); ``other``, keep-alive, consecutive
requests of a connection alternating between the two targets (a take-back to
another target each)."""


def phase_share(phase: str, counts: Mapping[str, float] | None) -> float | None:
    """Share of a window's decided requests that were what the window measures,
    from the router's counters (arr-nat only; None for a system that does not
    hand off): first handoffs (handoffs that were no re-handoff), same-target or
    other-target re-handoffs. The rest is e.g. each keep-alive connection's own
    first request, or a connection that had to reconnect."""
    if not counts or not counts.get("decided"):
        return None
    same, other = counts.get("rehandoffs_same", 0.0), counts.get("rehandoffs_other", 0.0)
    handoffs = counts.get("handoffs", 0.0)
    if handoffs <= 0:
        return None
    part = {"first": handoffs - same - other, "same": same, "other": other}[phase]
    return part / counts["decided"]


ROUTE_WINDOW_SUMS = ("requests", "seconds", "window_s", "tail_s", "router_cpu_s", "router_cpu_ticks_s",
                     "router_user_s", "router_rest_cpu_s", "agent_cpu_s", "agent_rest_cpu_s", "machine_cpu_s")
"""The fields of a keep-alive routing window (run.py ``Bench.route_window``)
that add up over its rounds."""

ROUTE_ROUND_FIELDS = ("requests", "seconds", "router_cpu_s", "router_user_s", "agent_cpu_s", "tail_s")
"""What :func:`merge_route_windows` keeps of each round, for the ratios round by round."""


def _sum_maps(maps: Iterable[Mapping[str, float] | None]) -> dict[str, float]:
    out: dict[str, float] = {}
    for m in maps:
        for k, v in (m or {}).items():
            out[k] = out.get(k, 0.0) + v
    return out


def merge_route_windows(windows: Sequence[Mapping]) -> dict:
    """One window of the keep-alive routing test from its rounds. The test
    interleaves its windows (first, same, other, then the next round in
    another order: run.py ``Bench.rehandoff``) so that every kind samples the
    same moments of a small shared VM; this adds each kind's rounds up, as if
    it had been one window: times, CPU, requests and counters summed (a field
    one round lacks is None), histogram buckets summed (``buckets``, for the
    quantiles), the "every request decided" checks combined, and each round's
    own figures kept under ``rounds``."""
    if not windows:
        raise ValueError("no window to merge")
    out: dict = {}
    for key in ROUTE_WINDOW_SUMS:
        values = [w.get(key) for w in windows]
        if any(key in w for w in windows):
            out[key] = None if any(v is None for v in values) else sum(values)
    out["errors"] = {k: v for k, v in _sum_maps(w.get("errors") for w in windows).items() if v}
    for key in ("counts", "fallback_reasons", "takeback_results", "forward_closes", "forward_pool"):
        if any(key in w for w in windows):
            out[key] = _sum_maps(w.get(key) for w in windows)
    if any("buckets" in w for w in windows):
        names = {h for w in windows for h in (w.get("buckets") or {})}
        out["buckets"] = {h: _sum_maps((w.get("buckets") or {}).get(h) for w in windows) for h in sorted(names)}
    checks = [w["decided_check"] for w in windows if w.get("decided_check")]
    if checks:
        handed = [c.get("handed_off") for c in checks]
        decided = [c.get("decided") for c in checks]
        out["decided_check"] = {
            "requests": sum(c.get("requests") or 0 for c in checks),
            "decided": None if any(d is None for d in decided) else sum(decided),
            **({"handed_off": sum(h for h in handed if h is not None)} if any(h is not None for h in handed)
               else {}),
            "ok": all(c.get("ok") for c in checks),
            "problems": [f"round {i + 1}: {p}" for i, c in enumerate(checks) for p in c.get("problems", [])]}
        out["decided"] = out["decided_check"]["decided"]
    for key, combine in (("forward_time_wait_cleared", sum), ("forward_time_wait_left", max),
                         ("forward_time_wait_after", max)):
        values = [w[key] for w in windows if w.get(key) is not None]
        if values:
            out[key] = combine(values)
    out["rounds"] = [{k: w.get(k) for k in ROUTE_ROUND_FIELDS if k in w} for w in windows]
    return out


def round_ratios(rec: Mapping | None, base: Mapping | None) -> list[float]:
    """Router CPU per request of a routing window over the first-handoff
    window's, round by round (the rounds of one run, as :func:`merge_route_windows`
    kept them): how far a single round's ratio strays from the run's."""
    out = []
    for a, b in zip((rec or {}).get("rounds") or [], (base or {}).get("rounds") or []):
        x, y = _per(a.get("router_cpu_s"), a.get("requests")), _per(b.get("router_cpu_s"), b.get("requests"))
        if x is not None and y:
            out.append(x / y)
    return out


def rehandoff_summary(runs: Sequence[Mapping]) -> dict | None:
    """The keep-alive routing test over runs: per window, the router's CPU per
    request (ms), the agents' (arr-nat), the rate, the router's CPU utilisation,
    take-back and handoff latency from the router's histograms, the share of
    the window's requests that were what it measures; and, paired run by run,
    the same-target and other-target windows' router CPU per request over the
    first-handoff window's (the goals' ratios)."""
    if not any(isinstance(r.get("rehandoff"), Mapping) for r in runs):
        return None
    out: dict = {}
    per_request: dict[str, list[float | None]] = {}
    user_per_request: dict[str, list[float | None]] = {}
    for phase in PHASES:
        def m(key: str) -> list[float | None]:
            return _runs_metric(runs, "rehandoff", phase, key)

        reqs, secs = m("requests"), m("seconds")
        per_request[phase] = [_per(c, n, 1000) for c, n in zip(m("router_cpu_s"), reqs)]
        user_per_request[phase] = [_per(c, n, 1000) for c, n in zip(m("router_user_s"), reqs)]
        counts = [((r.get("rehandoff") or {}).get(phase) or {}).get("counts") for r in runs]
        out[phase] = {
            "router_cpu_per_request_ms": _summ(per_request[phase]),
            "router_user_per_request_ms": _summ(user_per_request[phase]),
            "agent_cpu_per_request_ms": _summ(_per(c, n, 1000) for c, n in zip(m("agent_cpu_s"), reqs)),
            "rate": _summ(_per(n, s) for n, s in zip(reqs, secs)),
            "router_cpu_util": _summ(_per(c, w) for c, w in zip(m("router_cpu_s"), m("window_s"))),
            "takeback_p50_ms": _summ(m("takeback_p50_ms")),
            "handoff_p50_ms": _summ(m("handoff_p50_ms")),
            "share": _summ(phase_share(phase, c) for c in counts),
            "fallback_share": _summ(_per(c.get("fallbacks"), c.get("decided")) if c else None for c in counts),
            "requests": _summ(reqs),
        }
    out["same_to_first"] = _summ(_per(a, b) for a, b in zip(per_request["same"], per_request["first"]))
    out["other_to_first"] = _summ(_per(a, b) for a, b in zip(per_request["other"], per_request["first"]))
    # The same ratio on user time alone (a diagnostic, not the goal): it
    # leaves out the kernel work, whose share of the router's CPU moves from
    # run to run on a small VM (benchmarks/RESULTS.md).
    out["other_to_first_user"] = _summ(_per(a, b) for a, b in zip(user_per_request["other"],
                                                                    user_per_request["first"]))
    # Each round's own ratio (a diagnostic): the spread of single 2 s rounds
    # within runs, against which the run's ratio over all its rounds is read.
    rounds = [x for r in runs for x in round_ratios((r.get("rehandoff") or {}).get("other"),
                                                    (r.get("rehandoff") or {}).get("first"))]
    if rounds:
        out["other_to_first_rounds"] = _summ(rounds)
    return out


def idle_core_pct(window_s: float, router_cpu_s: float, agent_cpu_s: float | None) -> dict[str, float | None]:
    """CPU of the router (and agents) over an idle window, in % of one core."""
    if window_s <= 0:
        return {"idle_core_pct": None, "idle_router_core_pct": None, "idle_agent_core_pct": None}
    router = router_cpu_s / window_s * 100
    agent = None if agent_cpu_s is None else agent_cpu_s / window_s * 100
    return {"idle_core_pct": router + (agent or 0.0), "idle_router_core_pct": router,
            "idle_agent_core_pct": agent}


def interval_rates(series: Sequence[Sequence[float]]) -> list[float]:
    """Rates between consecutive (seconds, cumulative count) samples."""
    out = []
    for (t0, n0), (t1, n1) in zip(series, series[1:]):
        if t1 > t0:
            out.append((n1 - n0) / (t1 - t0))
    return out


def sustain_summary(rec: Mapping) -> dict:
    """The sustain test's figures from its raw record (one run): rates, the
    lowest interval rate, fallbacks, CPU utilisation (1.0 = one core)."""
    secs = rec.get("seconds") or 0.0
    handoffs = rec.get("handoffs", 0)
    rates = interval_rates(rec.get("series", []))
    return {
        "seconds": secs, "requested_seconds": rec.get("requested_seconds"),
        "requests": rec.get("requests"), "handoffs": handoffs, "fallbacks": rec.get("fallbacks", 0),
        "fallback_reasons": dict(rec.get("fallback_reasons") or {}),
        "handoff_rate": handoffs / secs if secs else None,
        "request_rate": (rec.get("requests") or 0) / secs if secs else None,
        "min_interval_rate": min(rates) if rates else None,
        "interval_rates": rates,
        # CPU over the sampling window (a little longer than wrk's run)
        "router_cpu_util": _per(rec.get("router_cpu_s"), rec.get("window_s") or secs),
        "agent_cpu_util": _per(rec.get("agent_cpu_s"), rec.get("window_s") or secs),
        "machine_cpu_util": _per(rec.get("machine_cpu_s"), rec.get("window_s") or secs),
        "cores": rec.get("cores"), "errors": dict(rec.get("errors") or {}),
        "target": rec.get("target"), "method": rec.get("method"),
    }
