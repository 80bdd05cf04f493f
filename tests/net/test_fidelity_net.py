"""Wire fidelity: handed-off connections under loss and with peers unlike the router.

Issue 4. Loss is injected with nftables (this kernel has no netem): random
drops in each direction on the client's and the targets' links. After each
test the TCP counters of client and target namespaces must show no PAWS
rejects, no checksum errors, no resets or aborts.
"""

from __future__ import annotations

import hashlib
import socket
import time

import h11
import pytest

from arr import netlink
from arr.testbed import Cluster
from arr.testbed.loss import LOSSY_HEALTH, CounterWatch, dropped, inject_loss
from arr.testbed.router import ROUTER_PORT, handoff_cluster, handoff_outcomes

pytestmark = pytest.mark.net

MiB = 1 << 20

def fallback_reasons(router) -> dict[str, float]:
    found = {}
    for key, value in router.metrics().items():
        if key.startswith("arr_handoff_fallbacks_total{") and value:
            found[key.split('reason="')[1].split('"')[0]] = value
    return found


def download(cluster: Cluster, url: str, timeout: float = 60) -> tuple[int, str, float, str]:
    """curl that gives up on any 10 s stall: (status, sha256, seconds, error)."""
    started = time.monotonic()
    result = cluster.curl(url, extra_args=("--speed-limit", "1", "--speed-time", "10"), timeout=timeout)
    return result.status, result.sha256, time.monotonic() - started, result.error


def test_50_downloads_under_2_percent_loss_each_way(cluster):
    c = cluster(targets=2, files={"8m": 8 * MiB})
    info = c.files["8m"]
    with handoff_cluster(c, health=LOSSY_HEALTH) as (router, agents):
        router.wait_healthy()
        for host in (c.client, *c.targets):
            inject_loss(c, host, 20)
        watch = CounterWatch(c, (c.client, *c.targets))
        results = [download(c, router.url + info.url_path) for _ in range(50)]
        bad = [(i, r) for i, r in enumerate(results) if r[0] != 200 or r[1] != info.sha256]
        assert not bad, f"{len(bad)} downloads failed, e.g. {bad[:3]}"
        slowest = max(r[2] for r in results)
        assert slowest < 10, f"a download took {slowest:.1f}s"
        deltas = watch.assert_clean(explain=lambda: handoff_outcomes(router, agents))
        drops = {h.name: dropped(c, h) for h in (c.client, *c.targets)}
        assert sum(drops.values()) > 100, f"the loss did not happen: {drops}"
        assert router.metric_sum("arr_handoffs_total", result="ok") + router.metric_sum(
            "arr_handoff_fallbacks_total") == 50
        retrans = sum(d.get("TcpRetransSegs", 0) for d in deltas.values())
        print(f"\n50 x 8 MiB under 2% loss each way: drops {drops}, retransmitted segments {retrans}, "
              f"slowest {slowest:.2f}s, handoffs {router.metric_sum('arr_handoffs_total', result='ok'):.0f}, "
              f"fallbacks {fallback_reasons(router)}, "
              f"SACK recoveries {sum(d.get('TcpExtTCPSackRecovery', 0) for d in deltas.values())}, "
              f"PAWS rejects {sum(d.get('TcpExtPAWSEstab', 0) for d in deltas.values())}, "
              f"resets of unused connections {watch.empty_resets}, after both closed {watch.closed_resets}")


PEERS = {
    # name: (topology, client sysctls, client MTU)
    "timestamps-off": ("bridge", {"net.ipv4.tcp_timestamps": 0}, None),
    "sack-off": ("bridge", {"net.ipv4.tcp_sack": 0}, None),
    "wscale-0": ("bridge", {"net.ipv4.tcp_rmem": "4096 65535 65535"}, None),
    "wscale-14": ("bridge", {"net.ipv4.tcp_rmem": "4096 131072 1073741824"}, None),
    "no-window-scaling": ("bridge", {"net.ipv4.tcp_window_scaling": 0}, None),
    "path-mtu-1400": ("gateway", {}, 1400),
}


@pytest.mark.parametrize("peer", sorted(PEERS))
def test_clients_unlike_the_router(cluster, peer):
    topology, sysctls, mtu = PEERS[peer]
    c = cluster(targets=2, topology=topology, files={"4m": 4 * MiB})
    if sysctls:
        netlink.sysctl_set(c.client.ns, sysctls)
    if mtu:
        netlink.link_set_mtu(c.client.ns, c.client.ifname, mtu)
        netlink.link_set_mtu(c.gateway.ns, "eth1", mtu)
    info = c.files["4m"]
    with handoff_cluster(c, health=LOSSY_HEALTH) as (router, agents):
        router.wait_healthy()
        for host in (c.client, *c.targets):
            inject_loss(c, host, 10)
        hosts = (c.client, *c.targets) + ((c.gateway,) if c.gateway else ())
        watch = CounterWatch(c, hosts)
        results = [download(c, router.url + info.url_path) for _ in range(6)]
        assert all(r[0] == 200 and r[1] == info.sha256 for r in results), results
        assert max(r[2] for r in results) < 10
        deltas = watch.assert_clean(explain=lambda: handoff_outcomes(router, agents))
        # Under loss a handoff may fall back (then it is proxied, correctly);
        # most must not.
        handed = router.metric_sum("arr_handoffs_total", result="ok")
        assert handed >= 5 and handed + router.metric_sum("arr_handoff_fallbacks_total") == 6, \
            fallback_reasons(router)
        if mtu:
            # Every segment of the targets fitted the path: nothing fragmented,
            # no "fragmentation needed" sent back by the gateway.
            gw = deltas["gw"]
            assert gw.get("IpFragCreates", 0) == 0 and gw.get("IcmpOutDestUnreachs", 0) == 0
            assert deltas["client"].get("IpReasmReqds", 0) == 0


def test_targets_with_other_window_scales_than_the_router(cluster):
    c = cluster(targets=2, files={"4m": 4 * MiB})
    netlink.sysctl_set(c.targets[0].ns, {"net.ipv4.tcp_rmem": "4096 65535 65535"})
    netlink.sysctl_set(c.targets[1].ns, {"net.ipv4.tcp_rmem": "4096 131072 1073741824"})
    info = c.files["4m"]
    with handoff_cluster(c, health=LOSSY_HEALTH) as (router, agents):
        router.wait_healthy()
        for host in (c.client, *c.targets):
            inject_loss(c, host, 10)
        watch = CounterWatch(c, (c.client, *c.targets))
        results = [download(c, router.url + info.url_path) for _ in range(6)]
        assert all(r[0] == 200 and r[1] == info.sha256 for r in results), results
        watch.assert_clean(explain=lambda: handoff_outcomes(router, agents))
        served = [sum(1 for line in c.nginx_log(i) if info.url_path in line) for i in range(2)]
        assert served == [3, 3]


def test_wrk_and_python_http_client(cluster):
    c = cluster(targets=2, files={"64k": 64 << 10, "1m": MiB})
    with handoff_cluster(c) as (router, agents):
        router.wait_healthy()
        # wrk aborts its connections (RST) when its time is up: its own doing,
        # so the counters are watched for the Python client only.
        out = c.exec(c.client, ["wrk", "-t1", "-c8", "-d2s", router.url + c.files["64k"].url_path]).stdout
        assert "Non-2xx" not in out and "Socket errors" not in out, out
        requests = int(next(line.split()[0] for line in out.splitlines() if "requests in" in line))
        assert requests > 100
        time.sleep(1)  # responses in flight to wrk's aborted sockets land (and are reset) now
        watch = CounterWatch(c, (c.client, *c.targets))
        script = f"""
import hashlib, http.client
conn = http.client.HTTPConnection({c.vip!r}, {ROUTER_PORT}, timeout=30)
for i in range(10):
    conn.request("GET", {c.files['1m'].url_path!r})
    response = conn.getresponse()
    print(response.status, hashlib.sha256(response.read()).hexdigest())
"""
        lines = c.exec(c.client, ["python3", "-c", script]).stdout.split("\n")
        assert [line for line in lines if line] == [f"200 {c.files['1m'].sha256}"] * 10
        watch.assert_clean(explain=lambda: handoff_outcomes(router, agents))
        # Every request decided: wrk's (each taken back and handed off again;
        # those cut by its stop are decided, not counted by it) and the
        # Python client's ten.
        decided = router.metric_sum("arr_requests_total")
        assert requests + 10 <= decided <= requests + 10 + 8
        # Each connection's first request, then one per take-back, per
        # request sent in place (round-robin: the same target as the one
        # before, handoff/inplace.py) or handed on to the other target
        # (handoff/takeback.py); each one handed off or (a request wrk cut by
        # its RST) fallen back, counted.
        assert decided == 9 + router.metric_sum("arr_takebacks_total", result="ok") + router.metric_sum(
            "arr_rehandoffs_total", target="in-place") + router.metric_sum("arr_handons_total", result="ok")
        assert decided == router.metric_sum("arr_handoffs_total")


def raw_requests(cluster: Cluster, paths: list[str], *, then: list[str] = ()) -> list[tuple[int, bytes]]:
    """Pipeline PATHS in one write, read the responses in order, then send
    THEN one by one on the same connection: [(status, body)]."""
    sock = netlink.socket_in_netns(cluster.client.ns)
    sock.settimeout(20)
    sock.connect((cluster.vip, ROUTER_PORT))
    conn = h11.Connection(h11.CLIENT)
    answers: list[tuple[int, bytes]] = []

    def request(path: str) -> bytes:
        data = conn.send(h11.Request(method="GET", target=path, headers=[("Host", cluster.vip)]))
        return data + conn.send(h11.EndOfMessage())

    def read_one() -> None:
        status, body = 0, bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(sock.recv(1 << 20))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                answers.append((status, bytes(body)))
                conn.start_next_cycle()
                return

    # h11 sends one request at a time; the pipelined ones are written raw.
    pipelined = b"".join(f"GET {p} HTTP/1.1\r\nHost: {cluster.vip}\r\n\r\n".encode() for p in paths)
    sock.sendall(pipelined)
    for path in paths:  # keep h11's bookkeeping in step with what was sent
        conn._cstate.process_event(h11.CLIENT, h11.Request)  # noqa: SLF001
        conn._cstate.process_event(h11.CLIENT, h11.EndOfMessage)  # noqa: SLF001
        read_one()
    for path in then:
        sock.sendall(request(path))
        read_one()
    sock.close()
    return answers


def test_pipelined_and_later_keep_alive_requests_in_order(cluster):
    c = cluster(targets=2, files={"a": 100_000, "b": 1_000_000, "c": 10_000, "d": 300_000})
    with handoff_cluster(c) as (router, agents):
        router.wait_healthy()
        watch = CounterWatch(c, (c.client, *c.targets))
        order = ["a", "b", "c"]
        later = ["d", "a", "c"]
        answers = raw_requests(c, [c.files[n].url_path for n in order],
                               then=[c.files[n].url_path for n in later])
        got = [(status, hashlib.sha256(body).hexdigest()) for status, body in answers]
        assert got == [(200, c.files[n].sha256) for n in order + later]
        watch.assert_clean(explain=lambda: handoff_outcomes(router, agents))
        # Each of the six decided: the two that arrived with a next one behind
        # them proxied (forwarded together, the next would reach the target
        # undecided), the third handed off, the later three handed on from
        # their captures, or in place where round-robin chose the same target
        # again.
        assert router.metric_sum("arr_requests_total") == 6
        assert router.metric_sum("arr_handoff_fallbacks_total", reason="pipelined") == 2
        assert router.metric_sum("arr_handoffs_total", result="ok") == 4
        assert router.metric_sum("arr_handons_total", result="ok") + router.metric_sum(
            "arr_rehandoffs_total", target="in-place") == 3, handoff_outcomes(router, agents)
        assert router.metric_sum("arr_takebacks_total") == 0


def exchange_to_eof(cluster: Cluster, request: bytes, after_send, flags: int = 0) -> tuple[bytes, bytes]:
    """Send REQUEST (with FLAGS) on a new connection, call AFTER_SEND(sock),
    read to EOF: (response head, body)."""
    sock = netlink.socket_in_netns(cluster.client.ns)
    sock.settimeout(20)
    sock.connect((cluster.vip, ROUTER_PORT))
    sock.sendall(request, flags)
    after_send(sock)
    data = bytearray()
    while chunk := sock.recv(1 << 20):
        data += chunk
    sock.close()
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    return head, body


def test_half_closed_client_falls_back_to_proxy(cluster):
    c = cluster(targets=1, files={"1m": MiB})
    with handoff_cluster(c) as (router, agents):
        router.wait_healthy()
        request = f"GET {c.files['1m'].url_path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        # SHUT_WR: the client's FIN follows the request.
        head, body = exchange_to_eof(c, request, lambda sock: sock.shutdown(socket.SHUT_WR))
        assert head.startswith(b"HTTP/1.1 200") and hashlib.sha256(body).hexdigest() == c.files["1m"].sha256
        assert router.metric_sum("arr_handoff_fallbacks_total", reason="half-closed") == 1


def test_urgent_data_falls_back_to_proxy(cluster):
    c = cluster(targets=1, files={"1m": MiB})
    with handoff_cluster(c) as (router, agents):
        router.wait_healthy()
        watch = CounterWatch(c, (c.client, *c.targets))
        request = f"GET {c.files['1m'].url_path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
        # The urgent byte ends the request's own segment (its last byte, out
        # of band): pending when the router reads the request. Sent in a
        # second send, it arrived after the handoff held the client's packets
        # whenever the client was descheduled between the two sends for
        # longer than the router's path to the hold (the likely cause of one
        # failure on 2026-12-05, whose message was lost).
        head, body = exchange_to_eof(c, request + b"!", lambda sock: None, socket.MSG_OOB)
        assert head.startswith(b"HTTP/1.1 200") and hashlib.sha256(body).hexdigest() == c.files["1m"].sha256
        reasons = {r: router.metric_sum("arr_handoff_fallbacks_total", reason=r)
                   for r in ("urgent-data", "unread-data")}
        assert sum(reasons.values()) == 1, f"{reasons}; {handoff_outcomes(router, agents)}"
        watch.assert_clean(explain=lambda: handoff_outcomes(router, agents))  # and the connection ended with a FIN, not a RST
