"""Loss and TCP counters for network tests: nftables drops (this kernel has no
netem) and the kernel's TCP counters of the endpoints (nstat), which must show
no PAWS rejects, checksum errors or resets on a handed-off connection."""

from __future__ import annotations

import json

from arr.testbed.capture import ResetCapture
from arr.testbed.cluster import Cluster

# Counters that must not move on a handed-off connection's endpoints.
BAD_COUNTERS = (
    "TcpExtPAWSEstab", "TcpExtPAWSActive", "TcpInCsumErrors", "TcpInErrs", "TcpEstabResets",
    "TcpOutRsts", "TcpExtTCPAbortOnData", "TcpExtTCPAbortOnClose", "TcpExtTCPAbortOnMemory",
    "TcpExtTCPAbortOnTimeout", "TcpExtTCPAbortOnLinger", "TcpExtTCPAbortFailed",
)


def tcp_counters(cluster: Cluster, host) -> dict[str, int]:
    # -s: do not touch nstat's history file, which namespaces would share.
    out = cluster.exec(host, ["nstat", "-asz", "--json"]).stdout
    return json.loads(out)["kernel"]


class CounterWatch:
    """Absolute counters of some hosts, compared at the end, and a capture of
    their resets (arr/testbed/capture.py) that tells which connections those
    ended."""

    def __init__(self, cluster: Cluster, hosts) -> None:
        self.cluster = cluster
        self.hosts = list(hosts)
        self.capture = ResetCapture(cluster, self.hosts).__enter__()
        self.before = {h.name: tcp_counters(cluster, h) for h in self.hosts}
        self.empty_resets: dict[str, int] = {}
        """After ``assert_clean``: {host: resets it sent on connections that
        carried nothing from it} (the router's unused forward-pool connections)."""

    def deltas(self) -> dict[str, dict[str, int]]:
        out = {}
        for h in self.hosts:
            now = tcp_counters(self.cluster, h)
            out[h.name] = {k: now.get(k, 0) - self.before[h.name].get(k, 0) for k in now}
        return out

    def assert_clean(self, tolerated: dict[str, int] | None = None) -> dict[str, dict[str, int]]:
        """No bad counter moved on any host, beyond TOLERATED ({counter: at
        most this many on each host}: a known defect a test names and says
        why). A reset on a connection that carried nothing from its sender
        harms no one's data: it is reported in ``empty_resets`` and not
        counted in ``TcpOutRsts``; every other reset is."""
        tolerated = tolerated or {}
        deltas = self.deltas()
        self.capture.stop()
        for host, verdicts in self.capture.resets().items():
            self.empty_resets[host] = sum(v.empty for v in verdicts)
            deltas[host]["TcpOutRsts"] = deltas[host].get("TcpOutRsts", 0) - self.empty_resets[host]
        for d in deltas.values():
            # Under loss the router may retransmit its SYN-ACK after the
            # client's handshake ACK was dropped; the established client then
            # answers with a challenge ACK and counts TcpInErrs (RFC 5961 4.2).
            # That is the router's own handshake, not a handed-off connection.
            d["TcpInErrs"] = d.get("TcpInErrs", 0) - d.get("TcpExtTCPSYNChallenge", 0)
        bad = {host: {k: d[k] for k in BAD_COUNTERS if d.get(k, 0) > tolerated.get(k, 0)}
               for host, d in deltas.items()}
        bad = {host: counters for host, counters in bad.items() if counters}
        assert not bad, f"bad TCP counters moved: {bad}"
        return deltas


def inject_loss(cluster: Cluster, host, per_mille: int) -> None:
    """Drop PER_MILLE/1000 of TCP packets entering and leaving HOST (nftables)."""
    rules = f"""
table inet arrloss {{
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


def dropped(cluster: Cluster, host) -> int:
    out = cluster.exec(host, ["nft", "-j", "list", "table", "inet", "arrloss"]).stdout
    total = 0
    for item in json.loads(out)["nftables"]:
        for expr in item.get("rule", {}).get("expr", []):
            if "counter" in expr:
                total += expr["counter"]["packets"]
    return total


