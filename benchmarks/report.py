"""Rendering: JSON, markdown (tables, goal verdicts, profile), PNG plots, console lines.

``render_markdown`` and ``profile_summary`` are pure (unit-tested); plots use
matplotlib's Agg backend.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

from benchmarks.goals import SUSTAIN_RATE, earlier_goals, goal_verdicts
from benchmarks.stats import KIB, PHASES, Summary

MIB = 1 << 20
SYSTEM_ORDER = ("direct", "arr-nat", "arr-nat-reuse", "arr-proxy", "haproxy", "haproxy-splice", "nginx")
COLORS = {"direct": "#7f7f7f", "arr-nat": "#d62728", "arr-nat-reuse": "#8c564b", "arr-proxy": "#ff9896",
          "haproxy": "#1f77b4", "haproxy-splice": "#9ecae1", "nginx": "#2ca02c"}


def _size_key(name: str) -> int:
    m = re.fullmatch(r"(\d+)(KiB|MiB|GiB)", name)
    if not m:
        return 0
    return int(m.group(1)) << {"KiB": 10, "MiB": 20, "GiB": 30}[m.group(2)]


def fmt(summary: Mapping | None, spec: str = "{:.3g}", scale: float = 1.0) -> str:
    """``median [min–max]`` of a summary (just the median for one run), '–' if absent."""
    if summary is None:
        return "–"
    s = Summary.from_json(summary)
    assert s is not None
    def one(x: float) -> str:
        return spec.format(0.0 if abs(x) < 1e-9 else x * scale)

    med = one(s.median)
    if s.n <= 1:
        return med
    return f"{one(s.min)}–{one(s.max)}".join((f"{med} [", "]"))


def _systems(summary: Mapping) -> list[str]:
    return [s for s in SYSTEM_ORDER if s in summary] + [s for s in summary if s not in SYSTEM_ORDER]


def _sizes(summary: Mapping) -> list[str]:
    names: set[str] = set()
    for entry in summary.values():
        names.update(entry.get("sizes", {}))
    return sorted(names, key=_size_key)


# ------------------------------------------------------------------ profile

WRAPPERS = ("(<frozen runpy>)", "(asyncio/runners.py)", "(arr/__main__.py)", "(arr/cli.py)")
"""Frames on every stack of ``arr serve`` that say nothing about where time goes."""

EVENT_LOOP = "Runner.run (asyncio/runners.py)"

ROLES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("socket state: repair-mode reads, rebuilds, detach/reattach",
     ("(handoff/tcpstate.py)", "(handoff/rebuild.py)", "(handoff/fastpath.py)", "ClientSession.detach ",
      "ClientSession.reattach ", "Router.resume ", "RouterHandoff._client_state ", "RouterHandoff._hold ",
      "RouterHandoff._eligible ")),
    ("agent exchanges", ("(handoff/control/", "(hmac.py)", "RouterHandoff._install_at_agent ")),
    ("request parsing", ("ClientSession.read_request ", "ClientSession._read_one ", "ClientSession._prepare ",
                         "ClientSession.poll_event ", "ClientSession.next_event ", "ClientSession._feed ",
                         "(h11/", "(arr/request.py)", "(arr/paths.py)", "(arr/http1.py)")),
    ("forwarding connection: pool, the request's send, release",
     ("(handoff/forward_pool.py)", "(handoff/forward_close.py)", "(handoff/release.py)",
      "RouterHandoff._open_forward", "RouterHandoff._connect ", "send_request ")),
    ("BPF map lookups and updates", ("(handoff/maps.py)", "(handoff/libbpf.py)")),
    ("ring-buffer events and captures", ("(handoff/event_reader.py)", "TakeBacks.on_captures ",
                                         "RouterConnections.on_events ")),
    ("access log, metrics, policy", ("(arr/accesslog.py)", "(prometheus_client/", "(arr/metrics.py)",
                                     "Router._decide ", "(arr/policies/", "(arr/routing.py)")),
)
"""Roles of the router's code in a handoff, by the frames that do them: a
sample counts for the role of its innermost frame that names one."""


def profile_summary(raw: str, top: int = 15) -> dict[str, Any]:
    """Top frames of a py-spy ``--format raw`` (collapsed stacks) profile.

    ``self``: samples whose innermost frame is the function; ``inclusive``:
    samples with the function anywhere on the stack (counted once per stack).
    Frames are ``function (file:line)``; the line is dropped so a function's
    samples add up.
    """
    self_c: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    by_file: Counter[str] = Counter()
    by_role: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_frame_name(f) for f in stack.split(";") if f]
        frames = [f for f in frames if not f.startswith("process ") and not f.startswith("thread ")]
        if not frames:
            continue
        leaf = frames[-1]
        if leaf == EVENT_LOOP:  # uvloop is native: py-spy shows its time as the caller's frame
            leaf = "event loop, native uvloop code (Runner.run)"
        self_c[leaf] += n
        by_file[_file_of(leaf)] += n
        by_role[role_of(frames)] += n
        for f in set(frames):
            if not f.endswith(WRAPPERS):
                incl[f] += n

    def rows(c: Counter[str]) -> list[dict[str, Any]]:
        return [{"frame": f, "samples": n, "share": n / total if total else 0.0} for f, n in c.most_common(top)]

    return {"samples": total, "self": rows(self_c), "inclusive": rows(incl), "by_file": rows(by_file),
            "by_role": rows(by_role)}


def role_of(frames: list[str]) -> str:
    """The role (ROLES) of a stack, innermost frame first; the event loop's
    own code, or the rest."""
    for frame in reversed(frames):
        for role, markers in ROLES:
            if any(m in frame + " " for m in markers):
                return role
    if frames and frames[-1] == EVENT_LOOP:
        return "event loop (uvloop's own code)"
    return "the rest (accept, planning, translations, bookkeeping)"


def _file_of(frame: str) -> str:
    m = re.search(r"\(([^()]*)\)$", frame)
    return m.group(1) if m else frame


def _frame_name(frame: str) -> str:
    frame = frame.strip()
    m = re.fullmatch(r"(.*) \((.*?)(?::\d+)?\)", frame)
    if not m:
        return frame
    func, path = m.groups()
    for marker in ("/site-packages/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    else:
        path = re.sub(r"^.*?/(arr|handoff|benchmarks)/", r"\1/", path)
    return f"{func} ({path})"


# ----------------------------------------------------------------- markdown

def render_markdown(results: Mapping[str, Any], figures: Sequence[str] = ()) -> str:
    summary = results.get("summary", {})
    raw = results.get("raw", {})
    systems = _systems(summary)
    sizes = _sizes(summary)
    machine = results.get("machine", {})
    plan = results.get("plan", {})
    runs = plan.get("runs", "?")
    out: list[str] = []
    w = out.append
    title = "arr benchmark" + (" (quick smoke run)" if results.get("quick") else "")
    w(f"# {title}\n")
    w(f"Run {results.get('started', '?')}, {results.get('duration_s', '?')} s. Every figure is the "
      f"**median of {runs} run(s)** with the min–max range in brackets (memory: "
      f"{plan.get('memory_runs', '?')} run(s)). All systems ran one after the other in the same test-bed "
      f"cluster ({plan.get('targets', 2)} unmodified nginx targets, client and router in their own network "
      "namespaces on one VM), runs interleaved across systems.\n")
    w("**Machine**: " + ", ".join(f"{k} {v}" for k, v in machine.items()) + "\n")

    w("## Throughput, CPU and bytes through the router\n")
    w("| system | size | throughput MiB/s | router CPU s/GiB | machine CPU s/GiB | marginal CPU s/GiB "
      "| router bytes / byte served |")
    w("|---|---|---:|---:|---:|---:|---:|")
    for size in sizes:
        for system in systems:
            m = summary[system].get("sizes", {}).get(size)
            if not m:
                continue
            w(f"| {system} | {size} | {fmt(m['throughput_Bps'], '{:.1f}', 1 / MIB)} "
              f"| {fmt(m['router_cpu_per_gib'], '{:.3g}')} | {fmt(m['machine_cpu_per_gib'], '{:.3g}')} "
              f"| {fmt(m['marginal_cpu_per_gib'], '{:.3g}')} | {fmt(m['router_bytes_per_byte'], '{:.4f}')} |")
    agent = [(size, summary["arr-nat"]["sizes"][size].get("agent_cpu_per_gib"))
             for size in sizes if size in summary.get("arr-nat", {}).get("sizes", {})]
    if any(v for _, v in agent):
        w("\narr-nat agents' CPU (on the targets, not router CPU, included in machine CPU) in s/GiB: "
          + ", ".join(f"{size} {fmt(v, '{:.3g}')}" for size, v in agent if v) + ".")
    methods = _methods(raw)
    if methods:
        w("\nLoad: " + "; ".join(f"{size}: {m}" for size, m in methods.items()) + ".\n")

    w("## Latency\n")
    w("| system | TTFB p50 ms | TTFB p99 ms | p50 over direct ms | p99 over direct ms |")
    w("|---|---:|---:|---:|---:|")
    for system in systems:
        t = summary[system].get("ttfb", {})
        if not t:
            continue
        w(f"| {system} | {fmt(t.get('p50_ms'), '{:.3f}')} | {fmt(t.get('p99_ms'), '{:.3f}')} "
          f"| {fmt(t.get('p50_overhead_ms'), '{:.3f}') if system != 'direct' else '–'} "
          f"| {fmt(t.get('p99_overhead_ms'), '{:.3f}') if system != 'direct' else '–'} |")
    w("")
    _conn_rate_section(w, systems, summary)
    _rehandoff_section(w, systems, summary, raw)
    _decided_section(w, raw)

    hp = [r.get("ttfb", {}).get("handoff_p50_ms") for r in raw.get("arr-nat", {}).get("runs", [])]
    hp99 = [r.get("ttfb", {}).get("handoff_p99_ms") for r in raw.get("arr-nat", {}).get("runs", [])]
    if any(v is not None for v in hp):
        w(f"arr-nat handoff duration from the router's own histogram (`arr_handoff_duration_seconds`, "
          f"decision to client socket released, all of a run's handoffs): p50 "
          f"{fmt(Summary.of(hp) and Summary.of(hp).to_json(), '{:.2f}')} ms, p99 "
          f"{fmt(Summary.of(hp99) and Summary.of(hp99).to_json(), '{:.2f}')} ms.\n")
    fb = _fallback_text(raw.get("arr-nat", {}))
    if fb:
        w(f"arr-nat handoffs that fell back to proxying (all runs): {fb}.\n")

    if any("memory" in summary[s] for s in systems):
        w("## Router memory per idle connection\n")
        w("| system | connections | opened | handed off | RSS / conn B | kernel sockets / conn B "
          "| BPF maps / conn B | total / conn B |")
        w("|---|---:|---:|---:|---:|---:|---:|---:|")
        for system in systems:
            for n, m in sorted(summary[system].get("memory", {}).items(), key=lambda kv: int(kv[0])):
                w(f"| {system} | {int(n):,} | {fmt(m.get('opened'), '{:.0f}')} "
                  f"| {fmt(m.get('handoffs'), '{:.0f}') if system == 'arr-nat' else '–'} "
                  f"| {fmt(m.get('rss_per_conn'), '{:.0f}')} | {fmt(m.get('kernel_per_conn'), '{:.0f}')} "
                  f"| {fmt(m.get('map_bytes_per_conn'), '{:.0f}')} | {fmt(m.get('bytes_per_conn'), '{:.0f}')} |")
        w("")

    _idle_section(w, summary)
    _sustain_section(w, summary.get("arr-nat", {}).get("sustain"))

    w("## Goals\n")
    w("Goals 1-7, issue 9, \"a handoff as cheap as a proxy's accept\": ratios against the peers measured "
      "in this same run (medians over runs). Goals 8 and 9, every request routed: a keep-alive request's "
      "router CPU against a first handoff's, keep-alive routing test of the same run.\n")
    _goal_table(w, goal_verdicts(results))
    earlier = earlier_goals(results)
    if earlier:
        w("### Earlier goals\n")
        w("Issue 5's goals that no issue-9 goal supersedes (CPU per GiB, TTFB and handoffs per core now "
          "have the relative goals 4, 3 and 1).\n")
        _goal_table(w, earlier)

    prof = results.get("profile")
    if prof:
        w("## Where the arr-nat router's time goes (py-spy)\n")
        if "error" in prof:
            w(f"Profile not taken: {prof['error']}\n")
        else:
            test = prof.get("test", "new-connection")
            what = ("the new-connection test" if test == "new-connection"
                    else f"the keep-alive routing test's {PHASE_LABELS.get(test, test)} window")
            unit = "conns/s" if test == "new-connection" else "requests/s"
            w(f"{prof['samples']} samples of `arr serve` (nat) during {what} "
              f"({prof.get('conn_rate_during_profile', 0):.0f} {unit} while sampled; py-spy "
              "`--nonblocking`, 250 Hz, idle excluded). Raw stacks: "
              f"`{prof.get('raw_file', '')}`.\n")
            w("| self (innermost frame) | share | inclusive (on the stack) | share |")
            w("|---|---:|---|---:|")
            for a, b in zip(prof["self"], prof["inclusive"]):
                w(f"| `{a['frame']}` | {a['share'] * 100:.1f}% | `{b['frame']}` | {b['share'] * 100:.1f}% |")
            if prof.get("by_file"):
                w("\nSelf time by source file: " + ", ".join(
                    f"`{r['frame']}` {r['share'] * 100:.0f}%" for r in prof["by_file"][:10]) + ".")
            if prof.get("by_role"):
                w("\nBy role (a sample counts for its innermost frame that has one, benchmarks/report.py "
                  "`ROLES`): " + ", ".join(f"{r['frame']} {r['share'] * 100:.0f}%" for r in prof["by_role"]) + ".")
            w("")

    if figures:
        w("## Figures\n")
        for f in figures:
            w(f"![{Path(f).stem}]({f})")
        w("")

    w("## How it is measured\n")
    w(METHOD_TEXT)
    notes = results.get("notes", {})
    if notes.get("targets"):
        w(f"\nTarget nginx (test-bed configuration with): {notes['targets']}.\n")
    errors = results.get("errors") or []
    w("## Errors\n")
    w("\n".join(f"* {e}" for e in errors) if errors else "None.")
    return "\n".join(out) + "\n"


METHOD_TEXT = """\
* **Throughput**: body bytes of successful responses / wall time of the load generator. Objects up
  to 64 KiB: two `wrk -t1` processes in the client namespace, 4 keep-alive connections each, for a
  fixed duration (arr routes every request, as HAProxy and nginx do: with arr-nat a connection's
  first request is handed off, each later one taken back, decided by the policy and handed off
  again). 1 MiB and larger: one `curl -Z --parallel-max 4` process downloading
  about 1 GiB (quick: 96 MiB) of the object, each download on a new connection (`Connection: close`),
  every transfer checked for status 200 and full length. Before each size, one download through the
  system is checked against the file's SHA-256 (a mismatch is an error and makes the run exit 1).
  `direct` spreads the same load over the targets' own addresses.
* **Router CPU s/GiB**: utime+stime of every router process and its descendants (arr serve;
  haproxy; nginx master and worker) over the throughput window, per GiB served. Read at ns
  resolution as the sum of `/proc/PID/task/*/schedstat` (sum_exec_runtime, the total that
  `/proc/PID/stat` reports as utime+stime in 10 ms ticks; the tick figure is in the JSON as
  `router_cpu_ticks_s` and used instead if threads exited). The arr-nat agents run on the targets
  and are not router CPU; they run with their own defaults (`agent.linger` 0, not the test bed's
  1 s: `ARR_AGENT` in benchmarks/systems.py).
* **Machine CPU s/GiB**: busy time of all CPUs (`/proc/stat`: user+nice+system+irq+softirq+steal) over
  the window, per GiB. **Marginal CPU** = machine CPU/GiB of the system minus that of `direct` in the
  same run and size: what putting the router in the path costs the whole machine (load generator,
  targets and kernel included). Softirq work done for the router namespace (veth, bridge, tc BPF)
  cannot be attributed to a namespace on this kernel: it is charged to whichever task or ksoftirqd
  ran it, so it shows up only in the machine and marginal figures, never in router CPU.
* **Router bytes / byte served**: rx+tx bytes of every interface of the router namespace
  (`router_interface_bytes`) over the window / body bytes served. About 2 for a proxy, near 0 for
  direct server return (requests and the client's ACKs remain).
* **TTFB**: `python -m benchmarks.client ttfb` in the client namespace: N sequential GETs of the
  1 KiB object, each on a new TCP connection, time from `connect()` to the first response byte
  (`perf_counter`); every body is checked against its SHA-256. Overhead = the system's percentile
  minus direct's in the same run.
* **New connections/s**: two `wrk -t1 -c8` with `Connection: close` (one 1 KiB request per
  connection) for a fixed duration. "Router CPU" is the router processes' CPU seconds / wall seconds
  (1.0 = one core busy); "per router core" = rate (handoffs/s for arr-nat) / that utilisation, i.e.
  the rate one fully busy router core would sustain if it scaled linearly. Router CPU per connection
  = router CPU seconds / connections served; for arr-nat, the agents' CPU (utime+stime of every
  `arr agent`, same window) / handoffs. The VM has 2 vCPUs shared by client, router, targets and
  agents, so the router is rarely the only bottleneck.
* **Every request decided** (arr systems, every wrk window): the router's `arr_requests_total`
  (all decisions) over the window, read after its counters settled, must be at least the responses
  the client counted (it may exceed them by the requests in flight when wrk stopped, at most one per
  connection); for arr-nat, `arr_handoffs_total{result="ok"}` (first handoffs and re-handoffs) +
  `arr_handoff_fallbacks_total` must equal it. A window where either fails is flagged and listed
  under Errors.
* **Keep-alive routing** (goals 8, 9): each router started again with a configuration that routes on
  the request header `X-Arr-Bench-Target` (arr: the first target in the default pool, the second in
  pool `t1` chosen by a header rule; HAProxy `use_backend`; nginx a `map` to one upstream per
  target), so the client alone says where each request goes. One `wrk -tN -cN` (one connection per
  thread, 8; each thread's Lua state counts its own connection's requests) fetches 1 KiB for three
  fixed windows: *first* (`Connection: close`, every request a first handoff), *same* (keep-alive,
  every request of a connection to one target: a re-handoff in place, handoff/inplace.py, or with
  `handoff.rehandoff_in_place = false` a take-back and a re-handoff reusing the forwarding
  connection) and *other* (keep-alive, a connection's consecutive requests alternating
  targets: a take-back, the old forwarding connection closed, a handoff on a new one). Router CPU per
  request = router processes' CPU over the window (as above) / responses; the ratios same/first and
  other/first are paired run by run. The router's counters say what each window really was
  (`arr_rehandoffs_total` by target over decided requests); take-back and handoff p50 come from the
  router's histograms, bucket deltas over the window. Before each arr-nat test and window the
  harness destroys (`ss -K`) the router namespace's TIME_WAIT sockets on forward ports that earlier
  tests left (arr destroys its own once the server answered, handoff/forward_close.py; the harness
  makes sure a window never inherits `no-forward-port` fallbacks from an older arr or an aborted
  run). How many each window left and how many were destroyed is in the JSON and the report.
* **Sustained handoffs to one target** (once per invocation, `--sustain SECONDS`): arr-nat with a
  router configuration that lists only the first target; two `wrk -t1` with `Connection: close`
  (32 connections in all) as fast as they go, no rate limit. The router's `arr_handoffs_total` is
  sampled during the run (the lowest interval rate shows whether the rate held) and
  `arr_handoff_fallbacks_total` is counted by reason. Zero fallbacks at the achieved rate and
  reaching 2,000/s are judged apart: on this VM the client, router, agents and target share 2 cores.
* **Idle cost** (`--idle SECONDS`): during arr-nat's memory test, after every connection is open
  and handed off, utime+stime of the router and agent processes over the window, in % of one core.
* **Memory per idle connection**: `python -m benchmarks.client hold` opens N connections to the
  system (a fresh start of it), sends one keep-alive request on each, reads the response and keeps
  all open. RSS delta (`/proc/PID/statm`) of the router processes / connections opened, plus kernel
  socket memory in the router namespace: the `ss -tanm` skmem sum (r+t+f+w+o+bl) delta plus the
  socket-count delta x the `TCP` slab object size (struct tcp_sock). For arr-nat the router keeps
  no socket: its BPF map entries (`arr_ingress`, `arr_watch`, pinned) are counted, each as
  48 B of kernel hash-element header + key + value. The LRU maps are preallocated (their full
  size is reserved at load time whatever the number of connections); the per-connection figure is
  the share in use. The VM's hard fd limit is 20,000 (no CAP_SYS_RESOURCE), which bounds the test.
"""


def _goal_table(w, verdicts) -> None:
    w("| goal | target | measured | verdict | note |")
    w("|---|---|---|---|---|")
    for v in verdicts:
        w(f"| {v.goal} | {v.target} | {v.measured} | **{v.status}** | {v.note} |")
    w("")


def _conn_rate_section(w, systems: Sequence[str], summary: Mapping) -> None:
    """New connections/s, and what one costs: router CPU per connection, for
    arr-nat the agents' CPU per handoff; the rate per fully busy router core."""
    rows = [s for s in systems if summary[s].get("conn_rate")]
    if not rows:
        return
    w("## Connection rate and CPU per connection\n")
    w("| system | new conns/s | of which handoffs/s | router CPU during it | router CPU / conn ms "
      "| agents CPU / handoff ms | agents / router CPU | per router core /s | machine CPU during it |")
    w("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for system in rows:
        c = summary[system]["conn_rate"]
        routed = system != "direct"
        w(f"| {system} | {fmt(c.get('rate'), '{:.0f}')} | {fmt(c.get('handoff_rate'), '{:.0f}')} "
          f"| {fmt(c.get('router_cpu_util'), '{:.0f}%', 100)} "
          f"| {fmt(c.get('router_cpu_per_conn_ms'), '{:.3f}') if routed else '–'} "
          f"| {fmt(c.get('agent_cpu_per_handoff_ms'), '{:.3f}')} "
          f"| {fmt(c.get('agent_to_router_cpu'), '{:.2f}')} "
          f"| {fmt(c.get('per_router_core'), '{:.0f}') if routed else '–'} "
          f"| {fmt(c.get('machine_cpu_util'), '{:.0f}%', 100)} |")
    w("\nPer router core: handoffs/s (arr-nat) or new connections/s (the others) / router CPU "
      "utilisation (1.0 = one core), i.e. handoffs or connections per core-second. Router CPU / conn: "
      "router processes' CPU / connections served; agents CPU / handoff: the arr-nat agents' CPU "
      "(on the targets) / handoffs. Machine CPU: all cores, 200% = both busy.\n")


PHASE_LABELS = {"first": "first handoff", "same": "same target", "other": "other target"}
PHASE_WHAT = {"first": "first handoffs", "same": "same-target re-handoffs", "other": "other-target take-backs"}


def _rehandoff_section(w, systems: Sequence[str], summary: Mapping, raw: Mapping) -> None:
    """The keep-alive routing test: router CPU per request in each window, and
    for arr-nat what each window really measured."""
    rows = [s for s in systems if summary[s].get("rehandoff")]
    if not rows:
        return
    w("## Every request routed: router CPU per keep-alive request\n")
    w("| system | window | requests/s | router CPU during it | router CPU / request ms | x first "
      "| agents CPU / request ms | take-back p50 ms | handoff p50 ms | what the window was |")
    w("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for system in rows:
        r = summary[system]["rehandoff"]
        for phase in PHASES:
            p = r.get(phase) or {}
            ratio = {"same": r.get("same_to_first"), "other": r.get("other_to_first")}.get(phase)
            share = p.get("share")
            was = f"{fmt(share, '{:.0f}%', 100)} {PHASE_WHAT[phase]}" if share else "–"
            w(f"| {system} | {PHASE_LABELS[phase]} | {fmt(p.get('rate'), '{:.0f}')} "
              f"| {fmt(p.get('router_cpu_util'), '{:.0f}%', 100)} "
              f"| {fmt(p.get('router_cpu_per_request_ms'), '{:.3f}')} "
              f"| {fmt(ratio, '{:.2f}') if phase != 'first' else '1'} "
              f"| {fmt(p.get('agent_cpu_per_request_ms'), '{:.3f}')} | {fmt(p.get('takeback_p50_ms'), '{:.2f}')} "
              f"| {fmt(p.get('handoff_p50_ms'), '{:.2f}')} | {was} |")
    user_x = (summary.get("arr-nat", {}).get("rehandoff") or {}).get("other_to_first_user")
    if user_x:
        w(f"\narr-nat other target over first handoff on the router's user time alone: "
          f"{fmt(user_x, '{:.2f}')} x (a diagnostic: without the kernel work charged to the router, whose "
          "share moves from run to run here; goal 9 is on the whole CPU).")
    rounds_x = (summary.get("arr-nat", {}).get("rehandoff") or {}).get("other_to_first_rounds")
    if rounds_x:
        w(f"\narr-nat other target over first handoff, round by round (a diagnostic: one window of each "
          f"kind per round, seconds apart): {fmt(rounds_x, '{:.2f}')} x; the goal takes each run's windows "
          "added up over its rounds.")
    fell = _window_fallbacks(raw.get("arr-nat", {}))
    if fell:
        w(f"\narr-nat requests that fell back to proxying, per window (all runs): {fell}.")
    tw = _time_wait_text(raw.get("arr-nat", {}))
    if tw:
        w(f"\n{tw}")
    misses = _pool_misses_text(raw.get("arr-nat", {}))
    if misses:
        w(f"\n{misses}")
    method = next((run["rehandoff"].get("method") for data in raw.values() for run in data.get("runs", [])
                   if isinstance(run.get("rehandoff"), Mapping)), "")
    w(f"\n{method}. Each router routes on that header (one target per value), so the client decides "
      "where each request goes and the policy decides every request: first handoff = `Connection: close` "
      "(each request a new connection), same target = keep-alive, a connection's requests all to one "
      "target (arr-nat: a re-handoff in place), other target = keep-alive, consecutive "
      "requests alternating targets (arr-nat: take-back, old forwarding connection closed, new handoff). "
      "The kinds of window interleave: each round runs one of each, in an order rotated every round, and "
      "each kind's rounds are added up. "
      "Router CPU / request: router processes' CPU over the window, counted until its deferred work is done "
      "(1.5 s past the load, less the router's CPU at rest over that tail), / responses; x first: that "
      "over the first-handoff window's (paired run by run). \"What the window was\": the arr-nat router's own "
      "counters (`arr_handoffs_total`, `arr_rehandoffs_total`) / requests it decided.\n")


def _phase_records(data: Mapping, phase: str) -> list[Mapping]:
    """Each run's record of one keep-alive routing window (PHASE) in DATA (a
    system's raw results), where the run has one."""
    recs = [(run.get("rehandoff") or {}).get(phase) for run in data.get("runs", [])]
    return [r for r in recs if isinstance(r, Mapping)]


def _window_fallbacks(data: Mapping) -> str:
    """Fallbacks to proxying (and failed take-backs) in each keep-alive routing
    window, over runs, by reason: what else than a handoff the window held."""
    parts = []
    for phase in PHASES:
        recs = [r for r in _phase_records(data, phase) if r.get("counts")]
        if not recs:
            continue
        decided = sum(r["counts"].get("decided", 0) for r in recs)
        reasons: dict[str, float] = {}
        for r in recs:
            for k, v in (r.get("fallback_reasons") or {}).items():
                reasons[k] = reasons.get(k, 0) + v
        failed = sum(v for r in recs for k, v in (r.get("takeback_results") or {}).items() if k != "ok")
        total = sum(reasons.values()) or sum(r["counts"].get("fallbacks", 0) for r in recs)
        why = ", ".join(f"{k} {v:.0f}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1]))
        # A request its target had not acknowledged after 40 ms, sent again
        # (handoff/release.py): with no loss, a sign of an overloaded target.
        resent = sum(r["counts"].get("request_resends", 0) for r in recs)
        parts.append(f"{PHASE_LABELS[phase]} {total:.0f} of {decided:,.0f}" + (f" ({why})" if why else "")
                     + (f", {failed:.0f} failed take-backs" if failed else "")
                     + (f", {resent:.0f} requests sent again by the router" if resent else ""))
    return "; ".join(parts)


def _pool_misses_text(data: Mapping) -> str:
    """Handoffs of each keep-alive routing window whose forwarding connection
    was connected inline, the forward pool's shelf empty (handoff/forward_pool.py):
    a handshake in that request's path."""
    parts = []
    for phase in PHASES:
        pools = [r["forward_pool"] for r in _phase_records(data, phase) if "forward_pool" in r]
        asked = sum(pool.get("hit", 0) + pool.get("miss", 0) for pool in pools)
        if asked:
            missed = sum(pool.get("miss", 0) for pool in pools)
            parts.append(f"{PHASE_LABELS[phase]} {missed:,.0f} of {asked:,.0f} ({100 * missed / asked:.1f}%)")
    if not parts:
        return ""
    return ("arr-nat forwarding connections connected inline, the forward pool's shelf empty (all runs): "
            + "; ".join(parts) + ".")


def _time_wait_text(data: Mapping) -> str:
    """The router's TIME_WAIT sockets on forward ports each keep-alive routing
    window left (a take-back to another target closes the old forwarding
    connection from the router; handoff/forward_close.py destroys its TIME_WAIT
    socket a second after the server answered, so this, counted once that
    second is over, should stay near 0), and how many
    earlier tests had left before it (destroyed before the window)."""
    after: dict[str, list[float]] = {}
    cleared = 0.0
    closes: dict[str, float] = {}
    for run in data.get("runs", []):
        for phase in PHASES:
            rec = (run.get("rehandoff") or {}).get(phase)
            if not isinstance(rec, Mapping):
                continue
            if rec.get("forward_time_wait_after") is not None:
                after.setdefault(phase, []).append(rec["forward_time_wait_after"])
                cleared += rec.get("forward_time_wait_cleared") or 0
            for result, n in (rec.get("forward_closes") or {}).items():
                closes[result] = closes.get(result, 0.0) + n
    if not after:
        return ""
    ended = ", ".join(f"{result} {n:,.0f}" for result, n in sorted(closes.items(), key=lambda kv: -kv[1]) if n)
    parts = ", ".join(f"{PHASE_LABELS[p]} {fmt(Summary.of(v).to_json(), '{:,.0f}')}" for p, v in after.items())
    return (f"arr-nat router TIME_WAIT sockets on forward ports left by each window (median over runs): {parts}. "
            "A take-back to another target closes the old forwarding connection from the router; its "
            "TIME_WAIT socket is destroyed a second after the server answered the FIN (handoff/forward_close.py: "
            "long enough to re-ACK the server's retransmitted FIN), counted here after that second; the "
            "forward pool's unused connections, retired every 0.9 s, pass through the same hold (a few per "
            "shelf at any time). Left in TIME_WAIT (60 s), 11,000 forward ports would cap "
            "take-backs to another target near 183/s (`no-forward-port` fallbacks). "
            "Each arr-nat start and each window begins without the ones earlier tests left (destroyed; "
            f"{cleared:,.0f} at window starts)."
            + (f" How the closes in the windows ended (`arr_forward_closes_total`, over runs): {ended}: "
               "\"proven\" ones were destroyed by their cookie, the target's FIN having shown TIME_WAIT; "
               "\"destroyed\" ones were looked up first (sock_diag), which costs more."
               if ended else ""))


def decided_rows(raw: Mapping) -> list[dict[str, Any]]:
    """The "every request decided" checks of every wrk window of arr systems,
    added up per system and test over runs: responses counted by the client,
    requests the router decided, handoffs + fallbacks (arr-nat), and whether
    every run's check held (with the first problems when not)."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for system, data in raw.items():
        for i, run in enumerate(data.get("runs", [])):
            windows = [(f"keep-alive {size}", m) for size, m in
                       sorted(run.get("sizes", {}).items(), key=lambda kv: _size_key(kv[0]))]
            windows.append(("new connections", run.get("conn_rate")))
            rh = run.get("rehandoff")
            if isinstance(rh, Mapping):
                windows += [(f"routing: {PHASE_LABELS[p]}", rh.get(p)) for p in PHASES]
            for test, rec in windows:
                check = (rec or {}).get("decided_check") if isinstance(rec, Mapping) else None
                if not check:
                    continue
                row = out.setdefault((system, test), {"system": system, "test": test, "runs": 0, "requests": 0.0,
                                                      "decided": 0.0, "handed_off": None, "ok": True,
                                                      "problems": []})
                row["runs"] += 1
                row["requests"] += check.get("requests") or 0
                row["decided"] += check.get("decided") or 0
                if check.get("handed_off") is not None:
                    row["handed_off"] = (row["handed_off"] or 0.0) + check["handed_off"]
                if not check.get("ok"):
                    row["ok"] = False
                    row["problems"] += [f"run {i + 1}: {p}" for p in check.get("problems", [])]
    return list(out.values())


def _decided_section(w, raw: Mapping) -> None:
    rows = decided_rows(raw)
    if not rows:
        return
    w("## Every request decided (arr)\n")
    w("| system | test | runs | responses (client) | decided (router) | handoffs + fallbacks | check |")
    w("|---|---|---:|---:|---:|---:|---|")
    for r in rows:
        check = "ok" if r["ok"] else "**DISAGREE**: " + "; ".join(r["problems"][:3])
        w(f"| {r['system']} | {r['test']} | {r['runs']} | {r['requests']:,.0f} | {r['decided']:,.0f} "
          f"| {'–' if r['handed_off'] is None else format(r['handed_off'], ',.0f')} | {check} |")
    w("\nResponses: what wrk counted (2xx); decided: the router's `arr_requests_total` over the same window "
      "(may exceed the responses by the requests in flight when wrk stopped); handoffs + fallbacks "
      "(arr-nat): `arr_handoffs_total{result=\"ok\"}` + `arr_handoff_fallbacks_total`, which must equal "
      "decided. A disagreement voids the comparison with HAProxy and nginx and is listed under Errors.\n")


def _idle_section(w, summary: Mapping) -> None:
    mem = summary.get("arr-nat", {}).get("memory", {})
    rows = [(n, m) for n, m in sorted(mem.items(), key=lambda kv: int(kv[0])) if m.get("idle_core_pct")]
    if not rows:
        return
    w("## Idle cost of handed-off connections (arr-nat)\n")
    w("| connections held | window s | router % of a core | agents % of a core | together |")
    w("|---:|---:|---:|---:|---:|")
    for n, m in rows:
        w(f"| {int(n):,} | {fmt(m.get('idle_window_s'), '{:.0f}')} "
          f"| {fmt(m.get('idle_router_core_pct'), '{:.2f}')} | {fmt(m.get('idle_agent_core_pct'), '{:.2f}')} "
          f"| {fmt(m.get('idle_core_pct'), '{:.2f}')} |")
    w("\nutime+stime of `arr serve` and every `arr agent` over a window in which the memory test's "
      "client holds its connections open and sends nothing (health checks, lifecycle scans and "
      "agent GC keep running, as they would in production).\n")


def _sustain_section(w, st: Mapping | None) -> None:
    if not st or not st.get("seconds"):
        return
    w("## Sustained handoffs to one target (arr-nat)\n")
    reasons = ", ".join(f"{k} {v:.0f}" for k, v in sorted(st.get("fallback_reasons", {}).items(),
                                                           key=lambda kv: -kv[1])) or "none"
    rates = st.get("interval_rates") or []
    w(f"{st.get('method', '')}, {st['seconds']:.0f} s (asked: {st.get('requested_seconds') or 0:g} s). "
      f"**{st.get('handoffs', 0):,.0f} handoffs = {st.get('handoff_rate') or 0:.0f}/s** "
      f"(goal {SUSTAIN_RATE:,.0f}/s), {st.get('requests') or 0:,.0f} responses "
      f"({st.get('request_rate') or 0:.0f}/s); fallbacks {st.get('fallbacks', 0):.0f} (by reason: {reasons}); "
      f"wrk errors: {st.get('errors') or 'none'}.\n")
    cores = st.get("cores") or "?"
    w(f"CPU during it (1.0 = one core): router {_pct(st.get('router_cpu_util'))}, agents "
      f"{_pct(st.get('agent_cpu_util'))}, whole machine {_pct(st.get('machine_cpu_util'))} of {cores} cores.")
    if rates:
        w(f"Handoffs/s per sampling interval: lowest {min(rates):.0f}, highest {max(rates):.0f} "
          f"({len(rates)} intervals; plot `sustain.png`).")
    w("")


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x * 100:.0f}%"


def _fallback_text(data: Mapping) -> str:
    """Handoffs vs fallbacks (by reason) of the new-connection and memory tests."""
    parts = []
    tests = [("new-connection test", [r.get("conn_rate") for r in data.get("runs", [])])]
    for n, mems in sorted(data.get("memory", {}).items(), key=lambda kv: int(kv[0])):
        tests.append((f"{int(n):,} idle connections", list(mems)))
    for label, recs in tests:
        recs = [r for r in recs if r]
        if not recs:
            continue
        handoffs = sum(r.get("handoffs", 0) for r in recs)
        reasons: dict[str, float] = {}
        for r in recs:
            for k, v in (r.get("fallback_reasons") or {}).items():
                reasons[k] = reasons.get(k, 0) + v
        total = sum(reasons.values()) or sum(r.get("fallbacks", 0) for r in recs)
        why = ", ".join(f"{k} {v:.0f}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1]))
        parts.append(f"{label}: {total:.0f} of {handoffs + total:.0f}" + (f" ({why})" if why else ""))
    return "; ".join(parts)


def _methods(raw: Mapping) -> dict[str, str]:
    methods: dict[str, str] = {}
    for data in raw.values():
        for run in data.get("runs", []):
            for size, m in run.get("sizes", {}).items():
                if "method" in m:
                    methods.setdefault(size, m["method"])
    return dict(sorted(methods.items(), key=lambda kv: _size_key(kv[0])))


def console_summary(results: Mapping[str, Any]) -> str:
    lines = []
    summary = results.get("summary", {})
    for system in _systems(summary):
        e = summary[system]
        parts = []
        for size, m in sorted(e.get("sizes", {}).items(), key=lambda kv: _size_key(kv[0])):
            parts.append(f"{size} {fmt(m['throughput_Bps'], '{:.0f}', 1 / MIB)} MiB/s "
                         f"cpu {fmt(m['router_cpu_per_gib'], '{:.3g}')} s/GiB")
        if "ttfb" in e:
            parts.append(f"ttfb p50 {fmt(e['ttfb']['p50_ms'], '{:.2f}')} ms")
        if "conn_rate" in e:
            parts.append(f"{fmt(e['conn_rate']['rate'], '{:.0f}')} conns/s")
        if e.get("rehandoff"):
            r = e["rehandoff"]
            parts.append("router CPU ms/request " + ", ".join(
                f"{PHASE_LABELS[p]} {fmt((r.get(p) or {}).get('router_cpu_per_request_ms'), '{:.3f}')}"
                for p in PHASES))
        lines.append(f"{system:>10}: " + "; ".join(parts))
    lines.append("goals:")
    lines += [f"  {v.status:>4}  {v.goal}: {v.measured} (target {v.target})" for v in goal_verdicts(results)]
    return "\n".join(lines)


# -------------------------------------------------------------------- plots

def _bar_groups(ax, groups: list[str], systems: list[str], getter, scale: float = 1.0) -> None:
    import numpy as np

    width = 0.8 / max(1, len(systems))
    x = np.arange(len(groups))
    for i, system in enumerate(systems):
        med, lo, hi = [], [], []
        for g in groups:
            s = getter(system, g)
            if s is None:
                med.append(np.nan)
                lo.append(0)
                hi.append(0)
            else:
                med.append(s["median"] * scale)
                lo.append(max(0.0, (s["median"] - s["min"]) * scale))
                hi.append(max(0.0, (s["max"] - s["median"]) * scale))
        ax.bar(x + (i - (len(systems) - 1) / 2) * width, med, width, yerr=[lo, hi], capsize=2,
               label=system, color=COLORS.get(system))
    ax.set_xticks(x, groups)
    ax.grid(axis="y", alpha=0.3)


def write_plots(results: Mapping[str, Any], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = results.get("summary", {})
    systems = _systems(summary)
    sizes = _sizes(summary)
    note = "median of runs, bars: min–max"
    paths: list[Path] = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        p = out_dir / name
        fig.savefig(p, dpi=90)
        plt.close(fig)
        paths.append(p)

    def size_metric(metric: str):
        return lambda s, g: summary[s].get("sizes", {}).get(g, {}).get(metric)

    if sizes:
        for metric, title, ylabel, scale, log, name, skip_direct in (
            ("throughput_Bps", "Throughput", "MiB/s", 1 / MIB, True, "throughput.png", False),
            ("router_cpu_per_gib", "Router process CPU per GiB served", "CPU s / GiB", 1, True,
             "router_cpu_per_gib.png", True),
            ("marginal_cpu_per_gib", "Marginal machine CPU per GiB (vs direct)", "CPU s / GiB", 1, False,
             "marginal_cpu_per_gib.png", True),
            ("router_bytes_per_byte", "Bytes through the router per byte served", "bytes / byte", 1, False,
             "router_bytes.png", True),
        ):
            syst = [s for s in systems if not (skip_direct and s == "direct")]
            fig, ax = plt.subplots(figsize=(8, 3.6))
            _bar_groups(ax, sizes, syst, size_metric(metric), scale)
            if log:
                ax.set_yscale("log")
            ax.set_title(f"{title} ({note})", fontsize=9)
            ax.set_ylabel(ylabel)
            ax.set_xlabel("object size")
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
            save(fig, name)

    with_ttfb = [s for s in systems if "ttfb" in summary[s]]
    if with_ttfb:
        fig, ax = plt.subplots(figsize=(8, 3.4))
        _bar_groups(ax, ["p50", "p99"], with_ttfb,
                    lambda s, g: summary[s]["ttfb"].get(f"{g}_ms"))
        ax.set_yscale("log")
        ax.set_ylabel("ms")
        ax.set_title(f"Time to first byte, new connection, 1 KiB ({note})", fontsize=9)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        save(fig, "ttfb.png")

    with_conn = [s for s in systems if "conn_rate" in summary[s]]
    if with_conn:
        fig, ax = plt.subplots(figsize=(8, 3.4))
        _bar_groups(ax, ["new connections / s"], with_conn, lambda s, g: summary[s]["conn_rate"].get("rate"))
        ax.set_yscale("log")
        ax.set_title(f"New connections per second, one 1 KiB request each ({note})", fontsize=9)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        save(fig, "conn_rate.png")

    with_cpu = [s for s in with_conn if s != "direct"]
    if with_cpu:
        fig, ax = plt.subplots(figsize=(8, 3.4))
        _bar_groups(ax, ["router CPU / connection", "agents CPU / handoff"], with_cpu,
                    lambda s, g: summary[s]["conn_rate"].get(
                        "router_cpu_per_conn_ms" if g.startswith("router") else "agent_cpu_per_handoff_ms"))
        ax.set_ylabel("CPU ms")
        ax.set_title(f"CPU per new connection, one 1 KiB request each ({note})", fontsize=9)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        save(fig, "cpu_per_conn.png")

    with_rh = [s for s in systems if summary[s].get("rehandoff")]
    if with_rh:
        by_label = {PHASE_LABELS[p]: p for p in PHASES}
        fig, ax = plt.subplots(figsize=(8, 3.4))
        _bar_groups(ax, list(by_label), with_rh,
                    lambda s, g: (summary[s]["rehandoff"].get(by_label[g]) or {}).get("router_cpu_per_request_ms"))
        ax.set_ylabel("router CPU ms / request")
        ax.set_title(f"Router CPU per request, every request routed, 1 KiB ({note})", fontsize=9)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        save(fig, "rehandoff.png")

    st = summary.get("arr-nat", {}).get("sustain")
    series = results.get("raw", {}).get("arr-nat", {}).get("sustain", {}).get("series") or []
    if st and len(series) > 1:
        fig, ax = plt.subplots(figsize=(8, 3.0))
        ts = [(t0 + t1) / 2 for (t0, _), (t1, _) in zip(series, series[1:])]
        ax.plot(ts, st.get("interval_rates") or [], marker="o", ms=3, color=COLORS["arr-nat"],
                label="arr-nat, one target")
        ax.axhline(SUSTAIN_RATE, color="black", lw=0.8, ls="--")
        ax.text(0.01, SUSTAIN_RATE, f" goal {SUSTAIN_RATE:,.0f}/s", va="bottom", fontsize=7,
                transform=ax.get_yaxis_transform())
        ax.set_ylim(bottom=0)
        ax.set_xlabel("seconds")
        ax.set_ylabel("handoffs / s")
        ax.set_title(f"Sustained handoffs to one target (fallbacks: {st.get('fallbacks', 0):.0f})", fontsize=9)
        ax.legend(fontsize=7)
        save(fig, "sustain.png")

    with_mem = [s for s in systems if "memory" in summary[s]]
    if with_mem:
        ns = sorted({n for s in with_mem for n in summary[s]["memory"]}, key=int)
        fig, ax = plt.subplots(figsize=(8, 3.4))
        _bar_groups(ax, [f"{int(n):,} idle" for n in ns], with_mem,
                    lambda s, g: summary[s]["memory"].get(g.split()[0].replace(",", ""), {}).get("bytes_per_conn"))
        ax.axhline(KIB, color="black", lw=0.8, ls="--")
        ax.text(0.01, KIB, " goal 1 KiB", va="bottom", fontsize=7, transform=ax.get_yaxis_transform())
        ax.set_yscale("symlog", linthresh=100)
        ax.set_ylabel("bytes per connection")
        ax.set_title(f"Router memory per idle connection ({note})", fontsize=9)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        save(fig, "memory.png")
    return paths


def write_all(results: Mapping[str, Any], out_dir: Path, results_md: Path | None = None) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "results.json"
    json_path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    paths = [json_path]
    try:
        figs = write_plots(results, out_dir)
    except Exception as e:  # noqa: BLE001 - a plotting problem must not lose the results
        figs = []
        results = {**results, "errors": [*results.get("errors", []), f"plots: {e!r}"]}
    paths += figs
    md_path = out_dir / "results.md"
    md_path.write_text(render_markdown(results, [p.name for p in figs]))
    paths.append(md_path)
    if results_md is not None:
        rel = [_relpath(p, results_md.parent) for p in figs]
        results_md.write_text(render_markdown(results, rel))
        paths.append(results_md)
    return paths


def _relpath(p: Path, start: Path) -> str:
    import os

    return os.path.relpath(p.resolve(), start.resolve())
