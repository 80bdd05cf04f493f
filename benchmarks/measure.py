"""Measurements inside a test-bed cluster: load generators, CPU, memory, bytes.

Every load generator runs in the client namespace (``cluster.popen``/``exec``),
so all traffic stays inside the test bed's namespaces.
"""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from arr.testbed import Cluster
from arr.testbed.router import histogram_quantile
from arr.testbed.router import router_interface_bytes, wait_for  # noqa: F401 - re-exported for run.py, systems.py

from benchmarks.stats import (cpu_seconds_from_stat, machine_busy_seconds, parse_skmem, router_counts,
                              user_seconds_from_stat)

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
PROJECT_ROOT = str(Path(__file__).resolve().parents[1])


class BenchError(RuntimeError):
    """A measurement failed (bad status, SHA-256 mismatch, tool error)."""


def python_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [PROJECT_ROOT, os.environ.get("PYTHONPATH")]))
    return env


# ------------------------------------------------------------------ processes

def _ppid_map() -> dict[int, int]:
    out: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
            out[int(entry)] = int(rest[1])
        except (OSError, IndexError, ValueError):
            continue
    return out


def process_tree(roots: Sequence[int]) -> list[int]:
    """ROOTS and all their descendants that are alive now."""
    parents = _ppid_map()
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    seen: list[int] = []
    stack = [p for p in roots if p in parents]
    while stack:
        p = stack.pop()
        if p in seen:
            continue
        seen.append(p)
        stack.extend(children.get(p, []))
    return sorted(seen)


def _from_stat(pids: Sequence[int], seconds_of: Callable[[str, int], float]) -> dict[int, float]:
    """SECONDS_OF(/proc/PID/stat's text, CLK_TCK) for each live PID."""
    out = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                out[pid] = seconds_of(f.read(), CLK_TCK)
        except OSError:
            pass
    return out


def proc_cpu_seconds(pids: Sequence[int]) -> dict[int, float]:
    return _from_stat(pids, cpu_seconds_from_stat)


def proc_user_seconds(pids: Sequence[int]) -> dict[int, float]:
    """utime of each process (seconds, 10 ms ticks): see ``user_seconds_from_stat``."""
    return _from_stat(pids, user_seconds_from_stat)


def proc_cpu_ns(pids: Sequence[int]) -> dict[int, float]:
    """CPU seconds of each process at ns resolution: the sum over its live threads
    of /proc/PID/task/TID/schedstat's first field (sum_exec_runtime, the total
    that /proc/PID/stat reports as utime+stime in clock ticks)."""
    out = {}
    for pid in pids:
        total = 0
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                try:
                    with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                        total += int(f.read().split()[0])
                except (OSError, ValueError, IndexError):
                    pass
        except OSError:
            continue
        out[pid] = total / 1e9
    return out


def rss_bytes(pids: Sequence[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * PAGE
        except OSError:
            pass
    return total


def machine_busy() -> float:
    with open("/proc/stat") as f:
        return machine_busy_seconds(f.readline(), CLK_TCK)


@dataclass
class Snapshot:
    t: float
    proc_cpu: dict[int, float]  # utime+stime, clock ticks
    proc_ns: dict[int, float]  # schedstat, ns resolution
    busy: float
    router_bytes: int
    proc_user: dict[int, float] = field(default_factory=dict)  # utime, seconds (10 ms ticks)


@dataclass
class Window:
    """What happened between two snapshots."""

    seconds: float
    router_cpu_s: float  # CPU of the router processes alive at both ends (ns resolution)
    router_cpu_ticks_s: float  # the same from /proc/PID/stat utime+stime (10 ms ticks)
    machine_cpu_s: float  # busy seconds of all CPUs
    router_bytes: int  # bytes across the router namespace's interfaces
    router_user_s: float = 0.0  # user time alone of the same processes (10 ms ticks)


class Sampler:
    """Snapshots of router-process CPU, machine CPU and router interface bytes."""

    def __init__(self, cluster: Cluster, roots: Sequence[int]):
        self.cluster = cluster
        self.roots = list(roots)

    def snap(self) -> Snapshot:
        pids = process_tree(self.roots)
        return Snapshot(time.monotonic(), proc_cpu_seconds(pids), proc_cpu_ns(pids), machine_busy(),
                        router_interface_bytes(self.cluster), proc_user_seconds(pids))

    @staticmethod
    def window(a: Snapshot, b: Snapshot) -> Window:
        ticks = sum(b.proc_cpu[p] - a.proc_cpu[p] for p in b.proc_cpu if p in a.proc_cpu)
        ns = sum(b.proc_ns[p] - a.proc_ns[p] for p in b.proc_ns if p in a.proc_ns)
        # threads that exited in between are missing from the per-thread sums but
        # not from utime+stime: trust the ticks when they say clearly more
        cpu = ticks if ticks - ns > 2 * len(b.proc_cpu) / CLK_TCK else ns
        user = sum(b.proc_user[p] - a.proc_user[p] for p in b.proc_user if p in a.proc_user)
        return Window(b.t - a.t, cpu, ticks, b.busy - a.busy, b.router_bytes - a.router_bytes, user)


# ------------------------------------------------------------------------ wrk

WRK_LUA = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests":%d,"bytes":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}\n',
    summary.requests, summary.bytes, summary.duration, e.connect, e.read, e.write, e.status, e.timeout))
end
"""


@dataclass
class LoadResult:
    requests: int
    body_bytes: int
    seconds: float
    errors: dict[str, int] = field(default_factory=dict)
    detail: list[dict] = field(default_factory=list)


def start_wrk(cluster: Cluster, urls: Sequence[str], connections: int, duration: float, *,
              close: bool = False, timeout_s: int = 10) -> list[subprocess.Popen]:
    """Start one ``wrk -t1`` per URL in the client namespace, CONNECTIONS split
    evenly between them; ``close``: every request carries ``Connection: close``
    (a new connection per request). Collect with :func:`collect_wrk`."""
    script = cluster.workdir / "bench-wrk.lua"
    script.write_text(WRK_LUA)
    per = max(1, connections // len(urls))
    procs = []
    for url in urls:
        argv = ["wrk", "-t1", f"-c{per}", f"-d{duration:g}s", f"--timeout={timeout_s}s", "-s", str(script)]
        if close:
            argv += ["-H", "Connection: close"]
        procs.append(cluster.popen(cluster.client, [*argv, url], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True))
    return procs


def collect_wrk(cluster: Cluster, procs: Sequence[subprocess.Popen], duration: float, body_size: int,
                timeout_s: int = 10) -> LoadResult:
    """Wait for the wrk processes of :func:`start_wrk`. Body bytes = completed
    requests x BODY_SIZE (non-2xx are errors)."""
    detail = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=duration + timeout_s + 30)
        except subprocess.TimeoutExpired:
            for q in procs:
                cluster.stop_process(q)
            raise BenchError("wrk did not finish")
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        if p.returncode != 0 or not lines:
            raise BenchError(f"wrk failed ({p.returncode}): {err.strip()[-500:]} {out[-500:]}")
        detail.append(json.loads(lines[-1]))
    requests = sum(d["requests"] for d in detail)
    errors = {k: sum(d[k] for d in detail) for k in ("connect", "read", "write", "status", "timeout")}
    ok = max(0, requests - errors["status"])
    seconds = max(d["duration_us"] for d in detail) / 1e6
    return LoadResult(ok, ok * body_size, seconds, errors, detail)


def run_wrk(cluster: Cluster, urls: Sequence[str], connections: int, duration: float,
            body_size: int, *, close: bool = False, timeout_s: int = 10) -> LoadResult:
    """:func:`start_wrk` and :func:`collect_wrk`: one ``wrk -t1`` per URL in parallel."""
    procs = start_wrk(cluster, urls, connections, duration, close=close, timeout_s=timeout_s)
    return collect_wrk(cluster, procs, duration, body_size, timeout_s)


ROUTE_HEADER = "X-Arr-Bench-Target"
"""The request header the keep-alive routing test's configurations route on
(systems.py ``by_header``): ``t1`` to the second target, anything else to the
first. A header, not a path, so that every window fetches the same 1 KiB file
and the policy alone decides where each request goes."""

ROUTE_LUA = WRK_LUA + r"""
-- One connection per thread (wrk -tN -cN): each thread has its own Lua state,
-- so a thread's counter counts one connection's requests. wrk's request() is
-- not told which connection asks, so this is the only way to make consecutive
-- requests of one connection alternate targets exactly.
local next_conn = 0
function setup(thread)
  thread:set("conn", next_conn)
  next_conn = next_conn + 1
end

function init(args)
  mode = args[1]
  sent = 0
end

function request()
  local t = conn % 2                  -- same: a connection's every request to one target
  if mode ~= "same" then
    t = (conn + sent) % 2             -- first, other: alternate, connections out of phase
  end
  sent = sent + 1
  local h = {["Host"] = wrk.headers["Host"], ["@HEADER@"] = "t" .. t}
  if mode == "first" then
    h["Connection"] = "close"
  end
  return wrk.format("GET", wrk.path, h)
end
""".replace("@HEADER@", ROUTE_HEADER)

ROUTE_MODES = ("first", "same", "other")


def route_order(round_no: int) -> tuple[str, ...]:
    """The windows of the keep-alive routing test's round ROUND_NO (from 0):
    ROUTE_MODES rotated by it, so that over three rounds each kind runs once
    first, once second and once last."""
    k = round_no % len(ROUTE_MODES)
    return ROUTE_MODES[k:] + ROUTE_MODES[:k]


def start_wrk_routed(cluster: Cluster, url: str, connections: int, duration: float, mode: str,
                     timeout_s: int = 10) -> list[subprocess.Popen]:
    """One ``wrk -tN -cN`` (one connection per thread) in the client namespace whose
    requests carry :data:`ROUTE_HEADER`: MODE ``first``, ``Connection: close``
    (every request a new connection), alternating targets; ``same``, keep-alive,
    each connection's requests all to one target (connections spread over both);
    ``other``, keep-alive, each connection's consecutive requests alternating
    between the two targets. Collect with :func:`collect_wrk`."""
    if mode not in ROUTE_MODES:
        raise ValueError(f"mode {mode!r} not one of {ROUTE_MODES}")
    script = cluster.workdir / "bench-wrk-route.lua"
    script.write_text(ROUTE_LUA)
    argv = ["wrk", f"-t{connections}", f"-c{connections}", f"-d{duration:g}s", f"--timeout={timeout_s}s",
            "-s", str(script), url, "--", mode]
    return [cluster.popen(cluster.client, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]


# ----------------------------------------------------------------------- curl

def run_curl_parallel(cluster: Cluster, urls: Sequence[str], count: int, parallel: int,
                      body_size: int) -> LoadResult:
    """One curl process: COUNT downloads (URLs alternating), PARALLEL at a time
    (``curl -Z --parallel-max``), each on a new connection (``Connection: close``),
    bodies to /dev/null; every transfer must be 200 with BODY_SIZE bytes."""
    argv = ["curl", "-sS", "--noproxy", "*", "-Z", "--parallel-max", str(parallel),
            "--parallel-immediate", "--max-time", "600", "-H", "Connection: close",
            "-w", "%{http_code} %{size_download}\\n"]
    for i in range(count):
        argv += ["-o", "/dev/null", urls[i % len(urls)]]
    t0 = time.monotonic()
    cp = cluster.exec(cluster.client, argv, timeout=900, check=False)
    seconds = time.monotonic() - t0
    ok = bad = 0
    for line in cp.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == "200" and int(parts[1]) == body_size:
            ok += 1
        else:
            bad += 1
    if cp.returncode != 0 or ok != count:
        raise BenchError(f"curl: {ok}/{count} complete downloads (exit {cp.returncode}): "
                         f"{cp.stderr.strip()[-500:]}")
    return LoadResult(ok, ok * body_size, seconds, {"bad": bad})


# -------------------------------------------------------------- python client

def client_ttfb(cluster: Cluster, urls: Sequence[str], n: int, sha256: str) -> dict:
    argv = [sys.executable, "-m", "benchmarks.client", "ttfb", "-n", str(n), "--sha256", sha256]
    for u in urls:
        argv += ["--url", u]
    cp = cluster.exec(cluster.client, argv, timeout=60 + n * 0.5, env=python_env())
    return json.loads(cp.stdout)


class HeldConnections:
    """``benchmarks.client hold`` in the client namespace: N open connections."""

    def __init__(self, cluster: Cluster, url: str, n: int, concurrency: int = 64):
        self.cluster = cluster
        self.argv = [sys.executable, "-m", "benchmarks.client", "hold", "--url", url, "-n", str(n),
                     "--concurrency", str(concurrency)]
        self.proc: subprocess.Popen | None = None
        self.report: dict = {}

    def open(self, timeout: float) -> dict:
        self.proc = self.cluster.popen(self.cluster.client, self.argv, stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=python_env())
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.close()
            raise BenchError(f"holding client did not report within {timeout:.0f} s")
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
            self.close()
            raise BenchError(f"holding client failed: {err[-800:]}")
        self.report = json.loads(line)
        return self.report

    def close(self) -> None:
        if self.proc is None:
            return
        try:
            if self.proc.stdin:
                self.proc.stdin.close()
            self.proc.wait(timeout=10 if self.report else 0.1)
        except (subprocess.TimeoutExpired, OSError):
            pass
        self.cluster.stop_process(self.proc)
        self.proc = None

    def __enter__(self) -> "HeldConnections":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------ kernel sockets

def router_skmem(cluster: Cluster) -> tuple[int, int]:
    """(TCP sockets, their skmem bytes) in the router namespace (``ss -tanm``)."""
    cp = cluster.exec(cluster.router, ["ss", "-tanm"], timeout=60)
    return parse_skmem(cp.stdout)


def forward_ports_of(router) -> tuple[int, int]:
    """The forwarding connections' local port range of an arr router (its
    ``handoff.forward_ports``, else arr's default)."""
    from arr.config import HandoffSettings

    ports = ((router.config.get("handoff") or {}).get("forward_ports") if router is not None else None)
    return tuple(ports) if ports else HandoffSettings().forward_ports  # type: ignore[return-value]


def forward_time_wait(cluster: Cluster, ports: tuple[int, int], kill: bool = False) -> int:
    """TIME_WAIT sockets in the router namespace on a local port of PORTS (arr's
    forward ports); KILL: destroy them (``ss -K``, sock_diag destroy).

    A take-back to another target closes the old forwarding connection with a
    FIN from the router (handoff/takeback.py ``_close_forward``): the router's
    side then waits 60 s in TIME_WAIT, and a port in TIME_WAIT cannot be bound
    (``no-forward-port`` fallbacks once the range runs out). Those sockets
    outlive the router process, so a test would inherit the previous test's.
    Returns how many there were (before destroying them)."""
    lo, hi = ports
    argv = ["ss", *(["-K"] if kill else []), "-Htan", "state", "time-wait",
            f"( sport >= :{lo} and sport <= :{hi} )"]
    cp = cluster.exec(cluster.router, argv, timeout=120, check=False)
    return sum(1 for line in cp.stdout.splitlines() if line.strip())


def tcp_slab_objsize() -> int | None:
    """Bytes of one ``TCP`` slab object (struct tcp_sock), from /proc/slabinfo."""
    try:
        with open("/proc/slabinfo") as f:
            for line in f:
                parts = line.split()
                if parts and parts[0] == "TCP":
                    return int(parts[3])
    except (OSError, ValueError, IndexError):
        pass
    return None


def sysctl_netns(cluster: Cluster, host, settings: dict[str, str]) -> None:
    """Namespaced sysctls in one of the cluster's namespaces."""
    args = [f"{k}={v}" for k, v in settings.items()]
    cluster.exec(host, ["sysctl", "-q", "-w", *args], timeout=10)


def version_of(argv: Sequence[str]) -> str:
    try:
        cp = subprocess.run(list(argv), capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unavailable ({e})"
    text = (cp.stdout + cp.stderr).strip().splitlines()
    return text[0] if text else ""


def router_samples(router) -> dict[str, float] | None:
    """Every sample of an arr router's metrics (None without an arr router)."""
    return None if router is None else router.metrics()


def settled_samples(router, timeout: float = 3.0, interval: float = 0.2) -> dict[str, float] | None:
    """The router's metrics once its request counters stopped moving: a load
    client that just exited may have left decisions in flight (a handoff whose
    request is counted when it completes), and the decided check compares
    counters that are bumped at different steps of one request."""
    if router is None:
        return None
    last = router.metrics()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(interval)
        now = router.metrics()
        if router_counts(now) == router_counts(last):
            return now
        last = now
    return last


def histogram_delta_quantile(a: dict[str, float] | None, b: dict[str, float] | None, histogram: str,
                             q: float) -> float | None:
    """Quantile Q of what HISTOGRAM observed between two metric reads A and B
    (bucket counts subtracted), so a window's latency is not mixed with what
    came before it."""
    if a is None or b is None:
        return None
    return histogram_quantile(histogram_delta(a, b, histogram), histogram, q)


def histogram_delta(a: dict[str, float] | None, b: dict[str, float] | None, histogram: str) -> dict[str, float]:
    """HISTOGRAM's bucket counts between two metric reads A and B (empty
    without both): windows' deltas add up (stats.merge_route_windows)."""
    if a is None or b is None:
        return {}
    prefix = histogram + "_bucket"
    return {k: v - a.get(k, 0.0) for k, v in b.items() if k.startswith(prefix)}


def arr_counts(router) -> tuple[float, float]:
    """(handoffs that succeeded, fallbacks to proxying) from an arr router's metrics."""
    if router is None:
        return 0.0, 0.0
    return (router.metric_sum("arr_handoffs_total", result="ok"),
            router.metric_sum("arr_handoff_fallbacks_total"))


def fallback_reasons(router) -> dict[str, float]:
    """``arr_handoff_fallbacks_total`` by its ``reason`` label."""
    if router is None:
        return {}
    out: dict[str, float] = {}
    for key, value in router.metrics().items():
        if key.startswith("arr_handoff_fallbacks_total{"):
            reason = first_match(r'reason="([^"]*)"', key) or "?"
            out[reason] = out.get(reason, 0.0) + value
    return out


def reason_delta(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: v - a.get(k, 0.0) for k, v in b.items() if v - a.get(k, 0.0) > 0}


def first_match(pattern: str, text: str) -> str | None:
    m = re.search(pattern, text)
    return m.group(1) if m else None
