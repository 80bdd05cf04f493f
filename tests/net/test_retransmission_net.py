"""The router's own connections across the cluster resend what they lose
quickly (``handoff.rto_min``, ``control_rto_min``, handoff/tcpstate.py
``bound_retransmissions``), and a lost SYN on a request's path costs a race,
not Linux's 1 s (handoff/engine.py ``_open_forward_raced``).

Why it matters: every segment a handoff or a take-back sends on the router's
own connections (a control frame, the request on a forwarding connection)
holds the client's request until it arrives; under loss, Linux's 200 ms
floor, the 3 s a rebuilt socket starts at and the 1 s SYN timeout made arr's
slowest requests (benchmarks/RESULTS.md, "Loss tail").
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from arr.config import HandoffSettings
from arr.testbed import Cluster
from arr.testbed.loss import tcp_counters
from arr.testbed.router import AGENT_PORT, ROUTER_PORT, handoff_cluster, wait_for

pytestmark = pytest.mark.net

REPO = Path(__file__).resolve().parents[2]
FORWARD_PORTS = HandoffSettings().forward_ports
RACE_TABLE = "arr_race"
FLOORED_MS = 100
"""An RTO below this (ms) shows the 20 ms floor at work: it is the floor or
srtt + 4 rttvar, whichever is larger; Linux's own floor is 200 ms."""


def probe(ns: str, min_us: int, max_ms: int, metrics: str) -> dict[str, int]:
    cp = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "tests.net.rebuilt_rto_probe",
                         str(min_us), str(max_ms), metrics], capture_output=True, text=True, timeout=30,
                        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert cp.returncode == 0, cp.stderr
    return json.loads(cp.stdout)


def test_a_rebuilt_socket_with_no_rtt_sample_resends_within_a_second(ns: str) -> None:
    """A socket rebuilt in repair mode starts at RFC 6298's 3 s RTO (no RTT
    sample, none cached): the ceiling the take-back gives a rebuilt
    forwarding connection makes it resend within 1 s, and again each second."""
    capped = probe(ns, 0, 1000, "flushed")
    assert capped["rto_after_rebuild_us"] == 3_000_000  # the premise
    assert capped["retransmissions"] >= 2
    uncapped = probe(ns, 0, 0, "flushed")
    assert uncapped["retransmissions"] == 0  # the first resend comes at 3 s


def test_a_rebuilt_socket_takes_the_floor_when_an_rtt_is_cached(ns: str) -> None:
    """With an RTT cached for its peer (the router's TCP metrics hold one
    for each target), a rebuilt socket's RTO is the floor set before its
    connect: 20 ms, not 200 ms."""
    floored = probe(ns, 20_000, 1000, "cached")
    assert floored["rto_after_rebuild_us"] <= 24_000
    # 20, 40, 80, ... ms, then 1 s apart: 7 in 2.5 s (from 200 ms: 3)
    assert floored["retransmissions"] >= 6
    plain = probe(ns, 0, 1000, "cached")
    assert plain["rto_after_rebuild_us"] >= 200_000


def ready(c: Cluster, router) -> None:
    """Targets up and every agent's control connection established."""
    router.wait_healthy()
    assert wait_for(lambda: len(rtos_ms(c, c.router, f"( dport = :{AGENT_PORT} )")) == len(c.targets), 10), \
        "the agents' control connections are not up"


def rtos_ms(c: Cluster, host, ss_filter: str) -> list[float]:
    out = c.exec(host, ["ss", "-Htni", "state", "established", ss_filter]).stdout
    return [float(v) for v in re.findall(r"\brto:([\d.]+)", out)]


def test_control_and_forwarding_connections_use_the_floor(cluster) -> None:
    """Both ends of every control connection and the pool's forwarding
    connections have an RTO that only the 20 ms floor allows (Linux's is 200 ms)."""
    c = cluster(targets=2)
    info = c.files["1k"]
    with handoff_cluster(c) as (router, _agents):
        ready(c, router)
        # The pool keeps connections per client profile: a first handoff names it.
        body = c.exec(c.client, ["curl", "-sS", "--noproxy", "*", "--max-time", "5",
                                 f"http://{c.vip}:{ROUTER_PORT}{info.url_path}"], text=False).stdout
        assert hashlib.sha256(body).hexdigest() == info.sha256
        assert router.metric_sum("arr_requests_total", decision="handoff") == 1
        assert wait_for(lambda: router.metric_sum("arr_forward_pool_ready") >= 2, 10), "the forward pool did not fill"
        router_side = rtos_ms(c, c.router, f"( dport = :{AGENT_PORT} )")
        assert len(router_side) == 2 and max(router_side) < FLOORED_MS, router_side
        for target in c.targets:
            agent_side = rtos_ms(c, target, f"( sport = :{AGENT_PORT} )")
            assert agent_side and max(agent_side) < FLOORED_MS, (target.name, agent_side)
        low, high = FORWARD_PORTS
        pooled = rtos_ms(c, c.router, f"( dport = :{c.spec.target_port} and sport >= :{low} and sport <= :{high} )")
        assert len(pooled) >= 2 and max(pooled) < FLOORED_MS, pooled
        # The health checks' connections (ephemeral ports) are not the router's cluster traffic.


def test_a_lost_forward_syn_costs_the_race_not_a_second(cluster) -> None:
    """No pool (every handoff connects on the request's path) and the
    server's answer to each request's first forwarding SYN dropped: each
    request is answered after the race's 100 ms, not after Linux's 1 s SYN
    timeout; one race per request, counted; bodies and decisions checked.
    The attempt that lost the race finishes its handshake when the server
    resends its SYN-ACK (1 s later) and is closed with a FIN: had it been
    abandoned, the router's kernel would answer that SYN-ACK with a RST (and
    free the port while the server still held the half-open connection).
    The router sends no RST."""
    c = cluster(targets=1, files={"4k": 4096})
    info = c.files["4k"]
    low, high = FORWARD_PORTS
    with handoff_cluster(c, handoff={"forward_pool": 0}) as (router, _agents):
        ready(c, router)
        router_before = tcp_counters(c, c.router)
        # The server's SYN-ACK to the first attempt of each request is
        # dropped (of the first SYN-ACKs to a forward port, every other one);
        # one it resends (its port seen before) passes.
        c.exec(c.targets[0], ["nft", "-f", "-"], input=(
            f"table inet {RACE_TABLE} {{\n"
            " set seen {\n  type ipv4_addr . inet_service\n  flags dynamic\n  timeout 60s\n }\n"
            " chain outgoing {\n  type filter hook output priority -300; policy accept;\n"
            "  tcp flags & (syn | ack) == syn | ack ip daddr . tcp dport @seen accept\n"
            f"  tcp flags & (syn | ack) == syn | ack tcp dport {low}-{high} add @seen {{ ip daddr . tcp dport }}"
            " numgen inc mod 2 == 0 counter drop\n }\n}\n"))
        try:
            requests = 10
            times = []
            for _ in range(requests):
                started = time.monotonic()
                cp = c.exec(c.client, ["curl", "-sS", "--noproxy", "*", "--max-time", "5", "-H",
                                       "Connection: close", f"http://{c.vip}:{ROUTER_PORT}{info.url_path}"],
                            text=False)
                times.append(time.monotonic() - started)
                assert hashlib.sha256(cp.stdout).hexdigest() == info.sha256
            handed = router.metric_sum("arr_requests_total", decision="handoff")
            fallbacks = {k: v for k, v in router.metrics().items() if k.startswith("arr_handoff_fallbacks_total")}
            time.sleep(1.5)  # the attempts that lost: SYN-ACK resent after 1 s, then a FIN
            races = router.metric_sum("arr_forward_connect_races_total")
            dropped = c.exec(c.targets[0], ["nft", "list", "table", "inet", RACE_TABLE]).stdout
        finally:
            c.exec(c.targets[0], ["nft", "delete", "table", "inet", RACE_TABLE])
        router_resets = tcp_counters(c, c.router).get("TcpOutRsts", 0) - router_before.get("TcpOutRsts", 0)
    assert handed == requests, f"{handed} of {requests} requests handed off; fallbacks: {fallbacks}"
    assert races == requests, f"{races} races for {requests} requests"
    assert f"counter packets {requests} " in dropped, dropped
    assert max(times) < 0.6, f"request times {[round(t, 3) for t in times]}: a lost SYN was waited for"
    assert router_resets == 0, f"the router sent {router_resets} resets"
