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

The other way: an answer the router writes itself on a client socket a
take-back rebuilt (a refused request), its first copy lost at the client, is
resent as on a socket the router accepted, because the rebuild gave the
socket an RTT (handoff/takeback.py ``RTT_PROBE_BYTE``).
"""

from __future__ import annotations

import hashlib
import time

import pytest

from arr.testbed.router import ROUTER_PORT, handoff_cluster, handoff_outcomes, wait_for

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


RESPONSE_TABLE = "arr_first_answer"
REFUSED = "HTTP/1.1 405"
"""The start of the router's own answer to a DELETE (the rule's Reject)."""


def drop_first_refusals(c, header_bytes: int) -> None:
    """The client drops the first transmission of every segment from the
    router that starts the router's 405 (behind a TCP header of HEADER_BYTES:
    32 with timestamps, 20 without): its retransmission gets through."""
    c.exec(c.client, ["nft", "-f", "-"], input=f"""
table inet {RESPONSE_TABLE} {{
  set seen {{ typeof tcp dport . tcp sequence; flags dynamic; timeout 60s; }}
  chain incoming {{
    type filter hook prerouting priority -300; policy accept;
    ip saddr {c.vip} tcp sport {ROUTER_PORT} @th,{header_bytes * 8},96 0x{REFUSED.encode().hex()} \
tcp dport . tcp sequence != @seen add @seen {{ tcp dport . tcp sequence }} counter drop
  }}
}}
""")


def refusals_dropped(c) -> int:
    out = c.exec(c.client, ["nft", "list", "chain", "inet", RESPONSE_TABLE, "incoming"]).stdout
    return int(out.split("counter packets ")[1].split()[0])


@pytest.mark.parametrize("timestamps", [True, False], ids=["timestamps", "no-timestamps"])
def test_the_routers_own_answer_on_a_taken_back_connection_is_resent_in_time(cluster, timestamps):
    """A request the router answers itself on a handed-off connection (here a
    refused DELETE, decided from the captures) is answered on the client
    socket the take-back rebuilt, which has no RTT sample of its own: with
    the router's TCP metrics empty its kernel would resend a lost answer
    after 1 s. The router makes the client acknowledge one byte at once
    (handoff/takeback.py ``RTT_PROBE_BYTE``): the socket has its RTT, and
    resends as a connection it accepted would (0.2 s, Linux's loss probe
    for one segment). Four connections, the first copy of each 405 lost at
    the client; each connection then goes on with a handoff from the
    router's socket (the probe byte acknowledged by then). Clients with and
    without TCP timestamps (Windows does not use them)."""
    c = cluster(targets=2, files={"1k": 1024})
    info = c.files["1k"]
    if not timestamps:
        c.exec(c.client, ["sysctl", "-q", "-w", "net.ipv4.tcp_timestamps=0"])
    with handoff_cluster(c, **two_pools(c, in_place=True, hand_on=True)) as (router, agents):
        router.wait_healthy()
        drop_first_refusals(c, 32 if timestamps else 20)
        took = []
        for n in range(4):
            # Nothing cached for the client: a connection of its that the
            # router closed would have left an RTT (none does here).
            c.exec(c.router, ["ip", "tcp_metrics", "flush", "all"])
            conn, port = connect(c)
            assert get(conn, "GET", "/whoami") == (200, f"{c.targets[0].name}\n".encode())
            started = time.monotonic()
            status, _ = get(conn, "DELETE", f"{info.url_path}?n={n}")
            took.append(round(time.monotonic() - started, 3))
            assert status == 405
            status, body = get(conn, "GET", info.url_path)
            assert status == 200 and hashlib.sha256(body).hexdigest() == info.sha256
            conn.close()
            assert wait_for(lambda: len(access_lines(router, port)) == 3, 5)
            assert [r["decision"] for r in access_lines(router, port)] == ["handoff", "reject", "handoff"]
        outcomes = handoff_outcomes(router, agents)
        assert refusals_dropped(c) == 4, outcomes
        assert router.metric_sum("arr_takebacks_total", result="ok") == 4, outcomes
        print(f"\nthe router's 405, its first copy lost ({'' if timestamps else 'no '}timestamps): "
              f"answered after {took} s")
        assert max(took) < 0.5, (took, outcomes)
