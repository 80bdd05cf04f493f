"""Goal 5's test: handoffs to a single target, sustained, with zero fallbacks.

arr-nat is started with a router configuration that lists only the cluster's
first target, so every connection is handed off to the same target (a
per-target ceiling, e.g. a map keyed by target filling up, would show as
fallbacks). wrk reconnects as fast as it can (``Connection: close``, one 1 KiB
request per connection); there is no rate limit: the goal is 2,000/s and the
2-core VM may not generate that much, so the achieved rate is reported and
judged apart from the fallbacks. The router's counters are polled every
INTERVAL seconds so the report can show whether the rate held.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

from benchmarks import measure


def sustain_test(cluster, seconds: float, connections: int, interval: float = 10.0,
                 show: Callable[[str], None] = lambda text: None) -> dict[str, Any]:
    from benchmarks.systems import start_system

    info = cluster.files["1KiB"]
    with start_system(cluster, "arr-nat", one_target=True) as running:
        target = running.router.config["targets"][0]["address"]
        url = running.urls[0] + info.url_path
        measure.client_ttfb(cluster, [url], 20, info.sha256)  # warm-up, and a check it serves
        sampler = measure.Sampler(cluster, running.roots)
        agents = measure.Sampler(cluster, running.agent_roots)
        h0, f0 = measure.arr_counts(running.router)
        r0 = measure.fallback_reasons(running.router)
        a, aa = sampler.snap(), agents.snap()
        # two wrk processes of one thread each, like the new-connection test, so the
        # client side can use both cores
        procs = measure.start_wrk(cluster, [url, url], connections, seconds, close=True)
        series = [(0.0, 0.0)]
        t0 = time.monotonic()
        deadline = t0 + seconds
        while time.monotonic() < deadline - 1 and all(p.poll() is None for p in procs):
            time.sleep(min(interval, max(0.0, deadline - time.monotonic())))
            if time.monotonic() < deadline - 1:  # a sample while wrk still runs
                series.append((time.monotonic() - t0, measure.arr_counts(running.router)[0] - h0))
                show(f"sustain: {series[-1][1]:,.0f} handoffs in {series[-1][0]:.0f} s")
        lr = measure.collect_wrk(cluster, procs, seconds, info.size)
        b, bb = sampler.snap(), agents.snap()
        h1, f1 = measure.arr_counts(running.router)
        reasons = measure.reason_delta(r0, measure.fallback_reasons(running.router))
    w = measure.Sampler.window(a, b)
    series.append((max(series[-1][0], lr.seconds), h1 - h0))  # every handoff happened while wrk ran
    return {
        "method": f"2 x (wrk -t1 -c{max(1, connections // 2)} -d{seconds:g}s), Connection: close, "
                  f"1 KiB, one target ({target}) in the router's configuration",
        "target": target, "requested_seconds": seconds, "seconds": lr.seconds, "window_s": w.seconds,
        "requests": lr.requests, "errors": {k: v for k, v in lr.errors.items() if v},
        "handoffs": h1 - h0, "fallbacks": f1 - f0, "fallback_reasons": reasons,
        "router_cpu_s": w.router_cpu_s, "agent_cpu_s": measure.Sampler.window(aa, bb).router_cpu_s,
        "machine_cpu_s": w.machine_cpu_s, "cores": os.cpu_count(),
        "series": [[round(t, 2), n] for t, n in series],
    }
