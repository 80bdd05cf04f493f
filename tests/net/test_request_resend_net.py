"""A handed-off request the target did not get is sent again by the router
(handoff/release.py ``RequestCopy``), not after the forwarding socket's own
first RTO.

That RTO comes from the RTT the router's kernel cached for the target (``ip
tcp_metrics``): closes under loss leave it anywhere up to seconds, and a
socket rebuilt by a take-back has nothing else (benchmarks/RESULTS.md, "The
request sent again by the router"). Here the cache is made to say 300 ms by a
locked route metric, so the kernel would resend after 900 ms (the cached RTT
plus twice it). The target's nftables drop the first copy of every request
segment from the router (the kernel's first transmission); the router's copy
gets through, its retransmissions too.
"""

from __future__ import annotations

import hashlib
import time

import pytest

from arr.testbed.router import handoff_cluster, handoff_outcomes, wait_for

from test_takeback_net import MODES, access_lines, connect, get, two_pools

pytestmark = pytest.mark.net

CACHED_RTT_MS = 300
"""What the router's kernel is made to believe each target's RTT is: its
first RTO on a new or rebuilt forwarding socket is then three times that."""
KERNEL_RESEND_S = 3 * CACHED_RTT_MS / 1000
DROP_TABLE = "arr_first_copy"
# The first 8 bytes of a request segment's payload behind a 32-byte TCP
# header (timestamps: the kernel's segments). The router's copies carry no
# options, so the rule never sees their payload there.
REQUEST_STARTS = {"GET /who": "0x474554202f77686f", "GET /fil": "0x474554202f66696c"}


def drop_first_copies(c, target) -> None:
    """TARGET drops the first transmission of each request segment from the
    router (a set remembers its port and sequence number): health checks and
    other traffic pass."""
    starts = ", ".join(REQUEST_STARTS.values())
    c.exec(target, ["nft", "-f", "-"], input=f"""
table inet {DROP_TABLE} {{
  set seen {{ typeof tcp sport . tcp sequence; flags dynamic; timeout 60s; }}
  chain incoming {{
    type filter hook prerouting priority -300; policy accept;
    ip saddr {c.router.ip} tcp dport {c.spec.target_port} @th,256,64 {{ {starts} }} \
tcp sport . tcp sequence != @seen add @seen {{ tcp sport . tcp sequence }} counter drop
  }}
}}
""")


def first_copies_dropped(c, target) -> int:
    out = c.exec(target, ["nft", "list", "chain", "inet", DROP_TABLE, "incoming"]).stdout
    return int(out.split("counter packets ")[1].split()[0])


def cache_a_long_rtt(c) -> None:
    """The router's kernel caches CACHED_RTT_MS for every target, locked (a
    host route's metric): the cache is emptied, and a connection the router's
    namespace closes first (curl's) fills it from the route."""
    for target in c.targets:
        route = c.exec(c.router, ["ip", "-o", "route", "get", target.ip]).stdout.split()
        dev = route[route.index("dev") + 1]
        c.exec(c.router, ["ip", "route", "replace", f"{target.ip}/32", "dev", dev, "src", c.router.ip,
                          "rtt", "lock", f"{CACHED_RTT_MS}ms"])
    c.exec(c.router, ["ip", "tcp_metrics", "flush", "all"])
    for target in c.targets:
        c.exec(c.router, ["curl", "-sS", "--noproxy", "*", "-o", "/dev/null", "--max-time", "10",
                          f"http://{target.ip}:{c.spec.target_port}/whoami"])
        cached = c.exec(c.router, ["ip", "tcp_metrics", "show", target.ip]).stdout
        assert f"rtt {CACHED_RTT_MS * 1000}us" in cached, cached


@pytest.mark.parametrize("mode", ["take-back", "hand-on+reuse"])
def test_a_request_the_target_did_not_get_is_sent_again_by_the_router(cluster, mode):
    """30 requests on one keep-alive connection, the first copy of each lost
    at its target: every one answered (SHA-256) and decided by the policy,
    the router's copies counted, and none waited for the kernel's 900 ms.
    A socket rebuilt in repair mode has no RTT sample of its own, so its
    first RTO is the cached RTT's (a new connection has its handshake's):
    take-back mode sends every request to one target, each after the first
    on the forwarding connection the take-back rebuilt; hand-on with reuse
    alternates between the targets on connections given back."""
    c = cluster(targets=2, files={"64k": 64 * 1024})
    info = c.files["64k"]
    alternate = mode == "hand-on+reuse"
    with handoff_cluster(c, **two_pools(c, **MODES[mode])) as (router, agents):
        router.wait_healthy()
        cache_a_long_rtt(c)
        for target in c.targets:
            drop_first_copies(c, target)
        conn, port = connect(c)
        slowest = 0.0
        for n in range(30):
            started = time.monotonic()
            if n % 2 or not alternate:
                status, body = get(conn, "GET", info.url_path)
                assert status == 200 and hashlib.sha256(body).hexdigest() == info.sha256, n
            else:
                assert get(conn, "GET", "/whoami") == (200, f"{c.targets[0].name}\n".encode()), n
            slowest = max(slowest, time.monotonic() - started)
        conn.close()
        outcomes = handoff_outcomes(router, agents)
        assert wait_for(lambda: len(access_lines(router, port)) == 30, 5), len(access_lines(router, port))
        assert all(r["decision"] == "handoff" for r in access_lines(router, port)), outcomes
        dropped = sum(first_copies_dropped(c, t) for t in c.targets)
        resends = router.metric_sum("arr_forward_resends_total")
        # Every request lost its first copy at the target ...
        assert dropped == 30, (dropped, outcomes)
        # ... and the router sent each one on a rebuilt connection again. A
        # new connection's kernel resends within handoff.rto_min by itself:
        # the first request's; with hand-on, those the pool's own connections
        # carried (its shelf holds both, about a quarter of them here).
        assert resends >= (27 if not alternate else 15), (resends, slowest, outcomes)
        assert slowest < KERNEL_RESEND_S * 2 / 3, (slowest, resends, outcomes)
        print(f"\n{mode}: 30 requests, first copies dropped {dropped}, the router's copies {resends:.0f}, "
              f"slowest {slowest:.3f}s")
