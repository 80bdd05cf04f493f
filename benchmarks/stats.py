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
    rest = stat_line.rsplit(")", 1)[1].split()
    # rest[0] is field 3 (state); utime is field 14 -> rest[11], stime rest[12]
    return (int(rest[11]) + int(rest[12])) / clk_tck


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
