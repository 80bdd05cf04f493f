"""Loss and TCP counters for network tests: nftables drops (this kernel has no
netem) and the kernel's TCP counters of the endpoints (nstat), which must show
no PAWS rejects, checksum errors or resets on a handed-off connection."""

from __future__ import annotations

import json
import time
from typing import Callable

from arr.testbed.capture import ResetCapture
from arr.testbed.cluster import Cluster
from handoff.forward_pool import MAX_AGE

LOSSY_HEALTH = {"timeout": 6.0, "fall": 3}
"""Health-check settings (``handoff_cluster(..., health=LOSSY_HEALTH)``) that
the injected loss does not fail. With the test bed's (0.5 s timeout, down
after 2 failures) a lost SYN or SYN-ACK (retransmitted after 1 s) fails a
probe (2 of 110 in 30 s under 2% loss each way, measured), and two in a row take a
healthy target down, whose handed-off connections the router then moves
(arr/server.py ``_target_down``: reset where they cannot move live): resets
that a loss test would rightly count, for a cause it does not test. The
timeout covers a lost SYN and then a lost request: a handshake that needed a
retransmitted SYN leaves the socket an RTO of 3 s (RFC 6298 5.7), so the
request goes again about 4 s in; a probe that gave up at 3 s had closed its
socket, and the answer then arriving drew a RST from the router (seen once
in 46 live-migration runs, both ends captured)."""

CAPTURE_SETTLE = MAX_AGE + 0.2
"""Seconds between the start of the reset capture and the counters' first
reading: every forwarding connection the router's pool opened before the
capture is gone by then (closed or handed off)."""

# Counters that must not move on a handed-off connection's endpoints.
BAD_COUNTERS = (
    "TcpExtPAWSEstab", "TcpExtPAWSActive", "TcpExtPAWSTimewait", "TcpInCsumErrors", "TcpInErrs",
    "TcpEstabResets", "TcpOutRsts", "TcpExtTCPAbortOnData", "TcpExtTCPAbortOnClose", "TcpExtTCPAbortOnMemory",
    "TcpExtTCPAbortOnTimeout", "TcpExtTCPAbortOnLinger", "TcpExtTCPAbortFailed",
)
ROUTER_BAD_COUNTERS = ("TcpOutRsts", "TcpInCsumErrors")
"""What must not move on the router. Not the others: it closes every socket it
hands off or takes back in repair mode, ESTABLISHED to CLOSE without a packet,
which the kernel counts as ``TcpEstabResets``; its probes of clients draw
challenge ACKs. A reset it sends is what a peer would see."""


def tcp_counters(cluster: Cluster, host) -> dict[str, int]:
    # -s: do not touch nstat's history file, which namespaces would share.
    out = cluster.exec(host, ["nstat", "-asz", "--json"]).stdout
    return json.loads(out)["kernel"]


class CounterWatch:
    """Absolute counters of some hosts, compared at the end, and a capture of
    their resets (arr/testbed/capture.py) that tells which connections those
    ended."""

    def __init__(self, cluster: Cluster, hosts, router=None) -> None:
        """HOSTS: endpoints (BAD_COUNTERS); ROUTER, if given, is watched
        too (ROUTER_BAD_COUNTERS)."""
        self.cluster = cluster
        self.hosts = list(hosts) + ([router] if router is not None else [])
        self.router_name = router.name if router is not None else None
        self.capture = ResetCapture(cluster, self.hosts).__enter__()
        # A reset is told apart only if the capture saw its connection's
        # handshake: the forwarding connections the router opened before the
        # capture began are closed (unused) or handed off by now.
        time.sleep(CAPTURE_SETTLE)
        self.before = {h.name: tcp_counters(cluster, h) for h in self.hosts}
        self.since = time.monotonic()
        """Resets from here on are the counters' (CLOCK_MONOTONIC is system-wide:
        the capture's timestamps compare)."""
        self.empty_resets: dict[str, int] = {}
        """After ``assert_clean``: {host: resets it sent on connections that
        carried nothing from it} (the router's unused forward-pool connections)."""
        self.closed_resets: dict[str, int] = {}
        """After ``assert_clean``: {host: resets it sent after both sides had
        closed} (arr/testbed/capture.py says how they come about)."""

    def deltas(self) -> dict[str, dict[str, int]]:
        out = {}
        for h in self.hosts:
            now = tcp_counters(self.cluster, h)
            out[h.name] = {k: now.get(k, 0) - self.before[h.name].get(k, 0) for k in now}
        return out

    def assert_clean(self, tolerated: dict[str, int] | None = None,
                     explain: Callable[[], str] | None = None) -> dict[str, dict[str, int]]:
        """No bad counter moved on any host, beyond TOLERATED ({counter: at
        most this many on each host}: a known defect a test names and says
        why). A reset on a connection that carried nothing from its sender,
        or sent after both sides had closed, harms no one's data: it is
        reported in ``empty_resets`` or ``closed_resets`` and not counted in
        ``TcpOutRsts``; every other reset is. EXPLAIN, on failure,
        adds to the message (arr.testbed.router.handoff_outcomes)."""
        tolerated = tolerated or {}
        until = time.monotonic()  # a reset after this may miss the counters: not set apart
        deltas = self.deltas()
        self.capture.stop()
        harmful, received = {}, {}
        for host, verdicts in self.capture.resets().items():
            verdicts = [v for v in verdicts if self.since <= v.reset.at <= until]
            self.empty_resets[host] = sum(v.empty for v in verdicts)
            self.closed_resets[host] = sum(v.closed and not v.empty for v in verdicts)
            harmful[host] = [_tuple(v.reset) for v in verdicts if not (v.empty or v.closed)]
            deltas[host]["TcpOutRsts"] = (deltas[host].get("TcpOutRsts", 0) - self.empty_resets[host]
                                          - self.closed_resets[host])
        for host, segments in self.capture.received_resets().items():
            received[host] = [_tuple(r) for r in segments if self.since <= r.at <= until][:10]
        for d in deltas.values():
            # Under loss the router may retransmit its SYN-ACK after the
            # client's handshake ACK was dropped; the established client then
            # answers with a challenge ACK and counts TcpInErrs (RFC 5961 4.2).
            # That is the router's own handshake, not a handed-off connection.
            d["TcpInErrs"] = d.get("TcpInErrs", 0) - d.get("TcpExtTCPSYNChallenge", 0)
        bad = {host: {k: d[k] for k in (ROUTER_BAD_COUNTERS if host == self.router_name else BAD_COUNTERS)
                      if d.get(k, 0) > tolerated.get(k, 0)}
               for host, d in deltas.items()}
        bad = {host: counters for host, counters in bad.items() if counters}
        if bad:
            raise AssertionError(f"bad TCP counters moved: {bad}; resets sent on connections that carried "
                                 f"data: {({h: r for h, r in harmful.items() if r})}; resets received: "
                                 f"{({h: r for h, r in received.items() if r})}"
                                 + (f"; {explain()}" if explain is not None else ""))
        return deltas


def _tuple(segment) -> str:
    return f"{segment.src[0]}:{segment.src[1]}->{segment.dst[0]}:{segment.dst[1]}"


LOSS_TABLE = "arrloss"
"""The nftables table (family inet) that ``inject_loss`` makes in a host."""


def inject_loss(cluster: Cluster, host, per_mille: int) -> None:
    """Drop PER_MILLE/1000 of TCP packets entering and leaving HOST (nftables)."""
    rules = f"""
table inet {LOSS_TABLE} {{
  chain incoming {{
    type filter hook prerouting priority -300; policy accept;
    meta l4proto tcp numgen random mod 1000 < {per_mille} counter drop
  }}
  chain outgoing {{
    type filter hook output priority -300; policy accept;
    meta l4proto tcp numgen random mod 1000 < {per_mille} counter drop
  }}
}}
"""
    cluster.exec(host, ["nft", "-f", "-"], input=rules)


def clear_loss(cluster: Cluster, host) -> None:
    """Undo ``inject_loss`` on HOST."""
    cluster.exec(host, ["nft", "delete", "table", "inet", LOSS_TABLE])


def dropped(cluster: Cluster, host) -> int:
    return _counted(cluster, host, LOSS_TABLE)


def _counted(cluster: Cluster, host, table: str) -> int:
    """Packets the counters of TABLE's rules on HOST counted."""
    out = cluster.exec(host, ["nft", "-j", "list", "table", "inet", table]).stdout
    total = 0
    for item in json.loads(out)["nftables"]:
        for expr in item.get("rule", {}).get("expr", []):
            if "counter" in expr:
                total += expr["counter"]["packets"]
    return total


DROP_FIRST_TABLE = "arrdropfirst"
"""The nftables table (family inet) that ``drop_first`` makes in a host."""


def drop_first(cluster: Cluster, host, *matches: str) -> None:
    """Drop, for each of MATCHES (nftables expressions), the first TCP packet
    entering HOST that it selects, and none after it: lost segments exactly
    where a test wants them, their retransmissions let through. Each drop
    adds TCP to a set of its own, which its rule then skips."""
    sets = "".join(f"  set done{i} {{ type inet_proto; flags dynamic; }}\n" for i in range(len(matches)))
    rules = "".join(f"    meta l4proto tcp {match} meta l4proto != @done{i} "
                    f"add @done{i} {{ meta l4proto }} counter drop\n" for i, match in enumerate(matches))
    cluster.exec(host, ["nft", "-f", "-"], input=f"""
table inet {DROP_FIRST_TABLE} {{
{sets}  chain incoming {{
    type filter hook prerouting priority -300; policy accept;
{rules}  }}
}}
""")


def dropped_first(cluster: Cluster, host) -> int:
    """How many of ``drop_first``'s packets were dropped on HOST."""
    return _counted(cluster, host, DROP_FIRST_TABLE)
