"""Idle cost of handed-off connections (issue 9, task 2): not a test, a measurement.

``python tests/net/measure_idle_cpu.py [N] [SECONDS]`` (root) builds a test
bed (two nginx targets, one router, two agents), opens N keep-alive
connections through the router (``benchmarks.client hold``: one request each,
handed off, then idle), lets them settle, and reads utime+stime of the
``arr serve`` and ``arr agent`` processes over SECONDS. Prints one JSON line:
CPU seconds and % of one core for the router, the agents and both.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time

from arr.testbed import Cluster, ClusterSpec
from arr.testbed.router import python_env, handoff_cluster

CLK_TCK = os.sysconf("SC_CLK_TCK")

HOLDER = r"""
import asyncio, json, resource, sys, time
hostport, path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
host, port = hostport.rsplit(":", 1)
resource.setrlimit(resource.RLIMIT_NOFILE, (n + 1024, n + 1024))
held, errors = [], []
async def one(sem):
    async with sem:
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 30)
            w.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 30)
            length = int(next(l.split(b":")[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")))
            await asyncio.wait_for(r.readexactly(length), 30)
            held.append(w)
        except Exception as e:
            errors.append(repr(e))
async def main():
    t0 = time.monotonic()
    sem = asyncio.Semaphore(64)
    await asyncio.gather(*(one(sem) for _ in range(n)))
    print(json.dumps({"opened": len(held), "errors": len(errors), "first": errors[:3],
                      "seconds": time.monotonic() - t0}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
asyncio.run(main())
"""


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10000
    window = float(sys.argv[2]) if len(sys.argv) > 2 else 20.0
    with Cluster(ClusterSpec(targets=2, files={"1k": 1024})) as c:
        c.exec(c.client, ["sysctl", "-q", "-w", "net.ipv4.ip_local_port_range=10000 65000"])
        with handoff_cluster(c) as (router, agents):
            router.wait_healthy()
            url = router.url + c.files["1k"].url_path
            hold = c.popen(c.client, [sys.executable, "-c", HOLDER, router.url.split("//")[1],
                                      c.files["1k"].url_path, str(n)],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           env={**os.environ, **python_env()})
            try:
                ready, _, _ = select.select([hold.stdout], [], [], 600)
                line = hold.stdout.readline() if ready else b""
                if not line:
                    raise SystemExit(f"holding client failed: {hold.stderr.read().decode()[-2000:]}")
                report = json.loads(line)
                time.sleep(3.0)  # the handoffs' tails (mirror, release) are over
                pids = {"router": [router.proc.pid], "agents": [a.proc.pid for a in agents]}
                before = {k: sum(cpu_seconds(p) for p in v) for k, v in pids.items()}
                time.sleep(window)
                after = {k: sum(cpu_seconds(p) for p in v) for k, v in pids.items()}
                used = {k: after[k] - before[k] for k in pids}
                print(json.dumps({
                    "held": report, "window_s": window,
                    "handoffs_ok": router.metric_sum("arr_handoffs_total", result="ok"),
                    "fallbacks": router.metric_sum("arr_handoffs_total", result="fallback"),
                    "cpu_s": used,
                    "core_pct": {k: round(100 * v / window, 3) for k, v in used.items()},
                    "total_core_pct": round(100 * sum(used.values()) / window, 3)}), flush=True)
            finally:
                if hold.stdin:
                    hold.stdin.close()
                try:
                    hold.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    c.stop_process(hold)


if __name__ == "__main__":
    main()
