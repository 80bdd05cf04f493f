"""``arr demo``: a virtual cluster in namespaces, real downloads through the router.

It builds client, router and N nginx targets, runs ``arr serve`` in the router
namespace, downloads with curl from the client, checks every SHA-256, and
reports how many bytes crossed the router's interfaces for the bytes served.
In ``proxy`` mode that ratio is about 2 (every response byte comes in and goes
out again); the point of handoff (``nat`` mode) is to bring it near 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from arr.testbed import Cluster, ClusterSpec
from arr.testbed.router import handoff_cluster, router_interface_bytes


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    return f"{n:.1f} GiB"


def run_demo(mode: str, size: int, targets: int, requests: int, topology: str) -> dict[str, Any]:
    spec = ClusterSpec(targets=targets, topology=topology, files={"demo": size})
    with Cluster(spec) as cluster:
        info = cluster.files["demo"]
        with handoff_cluster(cluster, mode) as (router, _agents):
            router.wait_healthy()
            before = router_interface_bytes(cluster)
            started = time.monotonic()
            results = [cluster.curl(router.url + info.url_path, timeout=300) for _ in range(requests)]
            elapsed = time.monotonic() - started
            router_bytes = router_interface_bytes(cluster) - before
            fallbacks = router.metric_sum("arr_handoff_fallbacks_total")
            handoffs = router.metric_sum("arr_handoffs_total", result="ok")
            p50 = router.quantile("arr_handoff_duration_seconds", 0.5)
            p99 = router.quantile("arr_handoff_duration_seconds", 0.99)
        per_target = {t.name: sum(1 for line in cluster.nginx_log(i) if info.url_path in line)
                      for i, t in enumerate(cluster.targets)}
        served = sum(r.size for r in results)
        return {
            "mode": mode,
            "topology": topology,
            "object_size": size,
            "requests": requests,
            "ok_requests": sum(1 for r in results if r.ok),
            "sha256_ok": all(r.ok and r.sha256 == info.sha256 for r in results),
            "bytes_served": served,
            "router_bytes": router_bytes,
            "router_bytes_per_byte_served": round(router_bytes / served, 4) if served else None,
            "handoffs": int(handoffs),
            "handoff_fallbacks": int(fallbacks),
            "handoff_p50_ms": round(p50 * 1000, 3) if p50 is not None else None,
            "handoff_p99_ms": round(p99 * 1000, 3) if p99 is not None else None,
            "per_target": per_target,
            "seconds": round(elapsed, 3),
            "throughput_mib_s": round(served / elapsed / (1 << 20), 1) if elapsed else None,
        }


def print_summary(report: dict[str, Any]) -> None:
    ratio = report["router_bytes_per_byte_served"]
    print(f"arr demo: mode {report['mode']}, {report['topology']} topology, "
          f"{report['requests']} x {_human(report['object_size'])}")
    print(f"  downloads ok     {report['ok_requests']}/{report['requests']}, "
          f"SHA-256 {'all match' if report['sha256_ok'] else 'MISMATCH'}")
    print(f"  served           {_human(report['bytes_served'])} in {report['seconds']} s "
          f"({report['throughput_mib_s']} MiB/s)")
    print("  per target       " + ", ".join(f"{k}: {v}" for k, v in report["per_target"].items()))
    print(f"  router carried   {_human(report['router_bytes'])} "
          f"= {ratio} bytes per byte served")
    print(f"  handoffs         {report['handoffs']} (fallbacks to proxy: {report['handoff_fallbacks']})")
    if report["handoff_p50_ms"] is not None:
        print(f"  handoff time     p50 {report['handoff_p50_ms']} ms, p99 {report['handoff_p99_ms']} ms "
              "(decision to client socket released, from the histogram)")
    if report["mode"] == "proxy":
        print("  (proxy mode: every response byte enters and leaves the router, hence ~2)")
    else:
        print("  (nat mode: the targets answer the client directly; the router sees the requests and ACKs)")


def main(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("arr demo: needs root (it creates network namespaces)", file=sys.stderr)
        return 2
    report = run_demo(args.mode, args.size, args.targets, args.requests, args.topology)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_summary(report)
    return 0 if report["sha256_ok"] else 1
