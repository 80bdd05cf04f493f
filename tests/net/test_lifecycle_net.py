"""Handed-off connections end, and nothing of them outlives them (issue 8).

After a handed-off connection is over, the router's ingress entry for the
client's 4-tuple must go: a client that reuses its source port would have its
next SYN rewritten to the old target, served without the policy ever seeing
the request (no decision counted) or black-holed. The same goes for the
router's watch entries (its own health probes and proxied connections reuse
ports too) and the agents' entries; a target that dies or closes must be seen
by the client, and an idle keep-alive connection must survive.

Every test checks the bodies' SHA-256 and that the router's policy decided
every request the clients made: ``arr_requests_total`` (summed over its
labels) equals the requests made. The load comes from
``arr.testbed.loadclient``, a real client process in the client namespace.

``ARR_LIFECYCLE_MODE=proxy`` runs the same tests against proxy-mode routers
(no handoff, no maps: routing holds trivially), to check the tests' own
mechanics; steps that only mean something for handed-off connections
(killing the router or an agent, a target's close reaching the client) are
skipped there, as the tests say.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from arr import netlink
from arr.testbed import Cluster
from arr.testbed.files import sha256_file
from arr.testbed.loadclient import Failure, Response
from arr.testbed.loss import CounterWatch
from arr.testbed.router import (BPF_DIR, ROUTER_PORT, RouterProcess, python_env, handoff_cluster,
                                handoff_outcomes, pin_instance, wait_for)
from handoff.libbpf import BpfMap
from handoff.maps import FlowEntry, FlowKey, WatchEntry

pytestmark = pytest.mark.net

MODE = os.environ.get("ARR_LIFECYCLE_MODE", "nat")
NAT = MODE == "nat"
N = 5000  # requests per phase of the few-ports test (the floor)
LINGER = 0.5
HANDOFF = {"linger": LINGER}
AGENT = {"linger": LINGER}
CLIENT_PORTS = "40000 40039"  # 40 source ports
WRK_PORTS = "40000 45999"
MAX_WATCH = 2 * 3 * 4
"""Watch entries allowed once a load is over: per forward-pool shelf (a client
profile: one or two here), its 4 ready connections and those it retired
within their TIME_WAIT hold (handoff/forward_close.py), up to 8 more (measured:
8 to 12 a shelf, idle). A leak would leave one per connection: thousands."""
MiB = 1 << 20
FILES = {"1k": 1024, "1m": MiB}


# ------------------------------------------------------------------ helpers


def lifecycle_cluster(cluster: Cluster, **sections):
    """``handoff_cluster`` in MODE with this file's linger times (overridable)."""
    sections.setdefault("handoff", HANDOFF)
    sections.setdefault("agent", AGENT)
    return handoff_cluster(cluster, mode=MODE, **sections)


def decisions(router: RouterProcess) -> int:
    """Requests the router's policy decided (every label of arr_requests_total)."""
    return int(router.metric_sum("arr_requests_total"))


def entries(cluster: Cluster, host, map_name: str) -> int:
    """Keys of one pinned map (0 in proxy mode: there are no maps)."""
    if not NAT:
        return 0
    value = WatchEntry if map_name == "arr_watch" else FlowEntry
    flows = BpfMap.pinned(Path(BPF_DIR) / pin_instance(cluster, host) / map_name, FlowKey, value)
    try:
        return len(flows.keys())
    finally:
        flows.close()


def ingress_entry(cluster: Cluster, client_port: int) -> FlowEntry | None:
    flows = BpfMap.pinned(Path(BPF_DIR) / pin_instance(cluster, cluster.router) / "arr_ingress",
                          FlowKey, FlowEntry)
    try:
        return flows.lookup(FlowKey.of((cluster.client.ip, client_port), (cluster.vip, ROUTER_PORT)))
    finally:
        flows.close()


def map_counts(cluster: Cluster) -> dict[str, int]:
    counts = {"ingress": entries(cluster, cluster.router, "arr_ingress"),
              "watch": entries(cluster, cluster.router, "arr_watch")}
    for t in cluster.targets:
        counts[f"egress-{t.name}"] = entries(cluster, t, "arr_egress")
    return counts


def at_baseline(counts: dict[str, int], max_watch: int = MAX_WATCH) -> bool:
    return all(v == 0 for k, v in counts.items() if k != "watch") and counts["watch"] <= max_watch


def limit_client_ports(cluster: Cluster, ports: str = CLIENT_PORTS) -> None:
    cluster.exec(cluster.client, ["sysctl", "-q", "-w", f"net.ipv4.ip_local_port_range={ports}"])


def load(cluster: Cluster, url: str | list[str], count: int, mode: str = "close", parallel: int = 1,
         sha256: str | list[str] | None = None, timeout: float = 5.0, duration: float = 150.0, label: str = "",
         extra: tuple[str, ...] = ()) -> dict:
    """Run arr.testbed.loadclient in the client namespace; its JSON report.
    Several URLs (and one SHA256 each, or one for all) go round-robin."""
    argv = [sys.executable, "-m", "arr.testbed.loadclient", "--count", str(count),
            "--parallel", str(parallel), "--mode", mode, "--timeout", str(timeout),
            "--duration", str(duration), *extra]
    for one in [url] if isinstance(url, str) else url:
        argv += ["--url", one]
    for one in [sha256] if isinstance(sha256, str) else sha256 or []:
        argv += ["--sha256", one]
    cp = cluster.exec(cluster.client, argv, timeout=duration + 4 * timeout + 30,
                      env={**os.environ, **python_env()})
    report = json.loads(cp.stdout)
    print(f"\n  {label or mode}: {report['counts']} {report['rps']:.0f} req/s, "
          f"max {report['max_latency'] * 1000:.1f} ms, p99 {report['p99_latency'] * 1000:.1f} ms, "
          f"{report['ports']['distinct']} client ports, {report['elapsed']:.1f} s"
          + (f", errors {report['error_counts']}" if report["error_counts"] else ""))
    return report


def assert_all_ok(report: dict, count: int, explain: str = "") -> None:
    """Every one of COUNT requests answered right (a 200, and each body's
    SHA-256 where ``load`` was given one); EXPLAIN (e.g. ``handoff_outcomes``)
    goes into a failure."""
    assert report["counts"] == {"total": count, "ok": count, "failed": 0, "timeouts": 0}, \
        f"{report['counts']}: {report['error_counts']} e.g. {report['errors'][:3]}" \
        + (f"; {explain}" if explain else "")


def http_get(sock: socket.socket, path: str, host: str) -> tuple[int, str, bytes]:
    """One keep-alive GET on SOCK: (status, body SHA-256, bytes after the response)."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: arr-lifecycle-test\r\n\r\n".encode())
    response = Response(sock)
    response.read_head()
    response.read_body()
    return response.status, response.hash.hexdigest(), bytes(response.buffer)


class Conn:
    """A keep-alive client connection from the client namespace to the router."""

    def __init__(self, cluster: Cluster, timeout: float = 5.0) -> None:
        self.cluster = cluster
        self.sock = netlink.socket_in_netns(cluster.client.ns)
        self.sock.settimeout(timeout)
        self.sock.connect((cluster.vip, ROUTER_PORT))
        self.port = self.sock.getsockname()[1]
        self.target: int | None = None  # index of the target that served the first request

    def get(self, name: str = "1k") -> str:
        """GET file NAME with a unique tag; check status and SHA-256; return the tag."""
        tag = uuid.uuid4().hex
        info = self.cluster.files[name]
        status, sha, left = http_get(self.sock, f"{info.url_path}?tag={tag}", self.cluster.vip)
        assert (status, sha, left) == (200, info.sha256, b""), f"port {self.port}: status {status}"
        return tag

    def close(self) -> None:
        self.sock.close()


def served_by(cluster: Cluster, tag: str) -> list[tuple[int, str]]:
    """(target index, log line) of every nginx access-log line carrying TAG."""
    return [(i, line) for i in range(len(cluster.targets)) for line in cluster.nginx_log(i) if tag in line]


def nginx_processes(master: int) -> list[int]:
    """The master and its workers (children), master first."""
    try:
        children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    except OSError:
        children = []
    return [master, *map(int, children)]


def reset_target_sockets(cluster: Cluster, target: int, ports: list[int]) -> int:
    """Destroy target TARGET's sockets towards the router's forwarding PORTS
    (``ss -K``: the target's kernel sends a RST); how many it destroyed."""
    killed = 0
    for i in range(0, len(ports), 50):
        expr: list[str] = []
        for port in ports[i:i + 50]:
            expr += (["or"] if expr else []) + ["dport", "=", f":{port}"]
        out = cluster.exec(cluster.targets[target], [
            "ss", "-K", "-Htn", "dst", cluster.router.ip, "and", "(", *expr, ")"]).stdout
        killed += sum(1 for line in out.splitlines() if line.strip())
    return killed


def reset_target_upstreams(cluster: Cluster, target: int) -> int:
    """Proxy mode: destroy every socket target TARGET holds towards the router."""
    out = cluster.exec(cluster.targets[target], ["ss", "-K", "-Htn", "dst", cluster.router.ip]).stdout
    return sum(1 for line in out.splitlines() if line.strip())


def assert_closed_by_peer(sock: socket.socket, within: float) -> float:
    """SOCK sees EOF or a RST within WITHIN seconds (never a timeout); how long it took."""
    sock.settimeout(within)
    started = time.monotonic()
    try:
        data = sock.recv(65536)
        assert data == b"", f"{len(data)} unexpected bytes"
    except (ConnectionResetError, BrokenPipeError):
        pass
    except socket.timeout:
        raise AssertionError(f"no EOF or RST within {within} s") from None
    return time.monotonic() - started


def background_curl(cluster: Cluster, url: str, out: Path, rate: str, max_time: float = 60) -> subprocess.Popen:
    argv = ["curl", "-sS", "--noproxy", "*", "--max-time", f"{max_time:g}", "-o", str(out),
            "-w", "%{http_code}", "--limit-rate", rate, url]
    return cluster.popen(cluster.client, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# -------------------------------------------------------------------- tests


@pytest.mark.parametrize("topology", ["bridge", "gateway"])
def test_few_client_ports_every_request_decided(cluster, topology):
    """40 source ports, Connection: close (the server closes first, so each port
    is reusable at once): every request must reach the policy."""
    c = cluster(targets=2, topology=topology, files=FILES)
    limit_client_ports(c)
    with lifecycle_cluster(c) as (router, agents):
        router.wait_healthy()
        made = 0
        for name, parallel in (("1k", 1), ("1k", 4), ("1m", 1), ("1m", 4)):
            info = c.files[name]
            report = load(c, router.url + info.url_path, N, "close", parallel, info.sha256,
                          label=f"{topology} {name} x{parallel}")
            made += report["counts"]["total"]
            decided = decisions(router)
            print(f"  decided {decided} of {made}, maps {map_counts(c)}")
            assert_all_ok(report, N)
            assert report["ports"]["distinct"] <= 40
            assert report["max_latency"] < 3, f"slowest request took {report['max_latency']:.2f} s"
            assert decided == made, f"{made - decided} requests were never decided by the router"


def test_wrk_connection_close_every_request_decided(cluster):
    """wrk reconnecting after every response: as many decisions as wrk counted
    requests (plus at most the 8 in flight when wrk stopped: decided, never
    completed), every body byte for byte the file.

    wrk closes as soon as it has read a response, before the server's FIN, so
    its ports go to TIME_WAIT: 40 of them would last for 20 connections a
    minute. 6,000 ports and tcp_tw_reuse=1 (a TIME_WAIT port is reused after
    1 s) let it run at full speed (~2,000/s) reusing each port every ~3 s.

    And no endpoint's bad TCP counter moves: the target's socket goes to
    TIME_WAIT with the client's clock, translated 2^20 ms ahead of the
    router's, and the router's forwarding socket, still waiting to be
    released, answered a mirrored ACK of the client's FIN (an ack of data it
    never sent) with a challenge ACK in its own clock, which the target
    refused as PAWS-old: 3,914 of 4,658 connections in 5 s before the mirror
    lowered such acks (handoff/bpf/arr_structs.h ``request_end``)."""
    c = cluster(targets=2, files={"1k": 1024})
    limit_client_ports(c, WRK_PORTS)
    c.exec(c.client, ["sysctl", "-q", "-w", "net.ipv4.tcp_tw_reuse=1"])
    info = c.files["1k"]
    script = c.workdir / "check.lua"
    script.write_text("""
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args)
  local f = assert(io.open(args[1], "rb")); expected = f:read("*a"); f:close()
  good, bad = 0, 0
end
function response(status, headers, body)
  if status == 200 and body == expected then good = good + 1 else bad = bad + 1 end
end
function done(summary, latency, requests)
  local g, b = 0, 0
  for _, t in ipairs(threads) do g = g + t:get("good"); b = b + t:get("bad") end
  io.write(string.format("arr-check good=%d bad=%d\\n", g, b))
end
""")
    with lifecycle_cluster(c) as (router, agents):
        router.wait_healthy()
        # The targets only: wrk's stop aborts the (up to 8) connections in
        # flight, which the client counts (TcpExtTCPAbortOnData, TcpOutRsts)
        # and a target whose socket was still established may too.
        watch = CounterWatch(c, c.targets)
        before = decisions(router)
        out = c.exec(c.client, ["wrk", "-t1", "-c8", "-d10s", "--timeout", "3s", "-H", "Connection: close",
                                "-s", str(script), router.url + info.url_path, "--", str(info.path)],
                     timeout=60).stdout
        decided = decisions(router) - before
        print("\n" + out + f"decided {decided}, maps {map_counts(c)}")
        made = int(re.search(r"(\d+) requests in", out).group(1))
        good, bad = map(int, re.search(r"arr-check good=(\d+) bad=(\d+)", out).groups())
        socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
        assert made > 1000, out
        assert (good, bad) == (made, 0), out
        assert "Non-2xx" not in out, out
        assert socket_errors is None or set(socket_errors.groups()) == {"0"}, socket_errors.group(0)
        assert made <= decided <= made + 8, f"wrk made {made} requests, the router decided {decided}"
        watch.assert_clean({"TcpEstabResets": 8}, explain=lambda: handoff_outcomes(router, agents))


def test_one_target_after_15000_handoffs_probes_and_proxy_work(cluster):
    """15,000 handoffs to one target, then proxied POSTs: the router's own
    connections (health probes, proxied requests) must not meet the watch
    entries the handoffs left, and those must be gone once the load stops."""
    c = cluster(targets=1, files={"1k": 1024})
    info = c.files["1k"]
    whoami = c.workdir / "whoami"
    whoami.write_bytes(b"t0\n")  # what nginx answers at /whoami (any method)
    whoami_sha = sha256_file(whoami)[0]
    with lifecycle_cluster(c, upstream={"keepalive": 0}, limits={"body_buffer": 1024}) as (router, agents):
        router.wait_healthy()

        def failed_checks() -> float:
            # From one scrape: the total and the ok ones read in two races a
            # check that ends between them (CI of a4127fd read -1).
            return sum(value for key, value in router.metrics().items()
                       if key.startswith("arr_health_checks_total{") and 'result="ok"' not in key)

        failed_before = failed_checks()
        gets = load(c, router.url + info.url_path, 15000, "close", 4, info.sha256, duration=120,
                    label="15000 GETs")
        assert_all_ok(gets, 15000)
        assert decisions(router) == 15000
        if NAT:
            assert router.metric_sum("arr_handoffs_total", result="ok") == 15000
        posts = load(c, router.url + "/whoami", 300, "post", 1, whoami_sha, label="300 POSTs of 64 KiB",
                     extra=("--body-size", str(64 * 1024)))
        proxied = router.metric_sum("arr_requests_total", decision="proxy")
        print(f"  proxied {proxied:.0f}, failed health checks {failed_checks() - failed_before:.0f}, "
              f"503s {router.metric_sum('arr_requests_total', status='503'):.0f}")
        assert posts["statuses"] == {"200": 300}, posts["error_counts"]
        assert_all_ok(posts, 300)
        assert decisions(router) == 15300
        assert proxied == (300 if NAT else 15300), "a POST larger than body_buffer is proxied"
        assert router.metric_sum("arr_requests_total", status="503") == 0
        assert router.metric_sum("arr_target_up") == 1
        assert failed_checks() == failed_before, "health checks failed during the load"
        time.sleep(2)
        watch = entries(c, c.router, "arr_watch")
        print(f"  watch entries 2 s after the load: {watch}, maps {map_counts(c)}")
        assert watch <= MAX_WATCH, f"{watch} watch entries left 2 s after the load"


def test_aborted_downloads_leave_no_agent_entries(cluster):
    """Clients that RST mid-download: entries on both sides go within linger."""
    c = cluster(targets=2, files={"1m": MiB})
    info = c.files["1m"]
    with lifecycle_cluster(c) as (router, agents):
        router.wait_healthy()
        report = load(c, router.url + info.url_path, 3000, "abort", 4, label="3000 aborted 1 MiB GETs")
        assert_all_ok(report, 3000)
        assert decisions(router) == 3000
        ended = time.monotonic()
        clean = wait_for(lambda: at_baseline(map_counts(c), max_watch=1 << 30), AGENT["linger"] + 2)
        counts = map_counts(c)
        print(f"  maps {counts} {time.monotonic() - ended:.1f} s after the load")
        assert clean, f"entries left {AGENT['linger'] + 2} s after the load: {counts}"


@pytest.mark.parametrize("ending", ["fin", "rst"])
def test_target_killed_mid_download_client_sees_reset(cluster, ending):
    """nginx SIGKILLed mid-download: the client learns at once (a partial
    transfer or a reset, never a hang until its own time limit), and the
    entries go. ``fin``: curl; the killed worker's kernel ends the connection
    with a FIN after what it had queued. ``rst``: a raw client that sent a
    second (pipelined) request mid-download. In proxy mode nginx leaves it
    unread while it sends, and closing a socket with unread data makes the
    target's kernel send a RST; in nat mode the router holds it (taken back,
    waiting for the download to be acknowledged), so nginx ends with a FIN."""
    c = cluster(targets=1, files={"64m": 64 * MiB})
    info = c.files["64m"]
    with lifecycle_cluster(c) as (router, agents):
        router.wait_healthy()
        if ending == "fin":
            out = c.workdir / "killed.body"
            curl = background_curl(c, router.url + info.url_path, out, rate="10M", max_time=60)
            assert wait_for(lambda: out.exists() and out.stat().st_size > 8 * MiB, 20)
        else:
            download = SlowDownload(c, info.url_path, rate=10 * MiB)
            download.read_until(8 * MiB, timeout=20)
            download.sock.sendall(f"GET {info.url_path}?second HTTP/1.1\r\nHost: {c.vip}\r\n\r\n".encode())
            time.sleep(0.2)
        killed = nginx_processes(c.nginx_pids()[0])
        for pid in killed:  # master first: it cannot respawn the worker
            os.kill(pid, signal.SIGKILL)
        kill_time = time.monotonic()
        if ending == "fin":
            try:
                stdout, stderr = curl.communicate(timeout=3)
            except subprocess.TimeoutExpired:
                curl.kill()
                curl.communicate()
                raise AssertionError(f"curl still running 3 s after nginx {killed} was killed "
                                     f"({out.stat().st_size} bytes arrived)") from None
            size = out.stat().st_size if out.exists() else 0
            how = f"curl exit {curl.returncode}: {stderr.strip()}"
            assert curl.returncode != 0 and size < info.size, "the download cannot have completed"
        else:
            how = download.read_to_end(deadline=kill_time + 3)
            size = download.received
            download.sock.close()
            assert size < info.size, "the download cannot have completed"
        exited = time.monotonic()
        print(f"\n  {how}, {exited - kill_time:.2f} s after the kill, {size / MiB:.1f} MiB of 64")
        # rst: the second request is the router's to decide (taken back, not
        # forwarded): decided if the take-back completed before the target's
        # end, else the take-back ended the connection (a reset for the client).
        assert decisions(router) in ((1, 2) if ending == "rst" and NAT else (1,))
        clean = wait_for(lambda: at_baseline(map_counts(c), max_watch=1 << 30), AGENT["linger"] + 2)
        print(f"  maps {map_counts(c)} {time.monotonic() - exited:.1f} s after the client's end")
        assert clean, f"entries left: {map_counts(c)}"
        c.start_target(0)
        router.wait_healthy()
        result = c.curl(router.url + info.url_path)
        assert (result.status, result.sha256) == (200, info.sha256)


class SlowDownload:
    """A keep-alive GET read at RATE bytes/s by a raw socket in the client namespace."""

    def __init__(self, cluster: Cluster, path: str, rate: int) -> None:
        self.conn = Conn(cluster, timeout=10)
        self.sock = self.conn.sock
        self.rate = rate
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {cluster.vip}\r\n\r\n".encode())
        self.response = Response(self.sock)
        self.response.read_head()
        assert self.response.status == 200
        self.received = len(self.response.buffer)
        self.started = time.monotonic()

    def _recv(self) -> bytes:
        ahead = self.received / self.rate - (time.monotonic() - self.started)
        if ahead > 0:
            time.sleep(ahead)
        return self.sock.recv(64 * 1024)

    def read_until(self, size: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.received < size:
            assert time.monotonic() < deadline, f"only {self.received} bytes after {timeout} s"
            data = self._recv()
            assert data, f"EOF after {self.received} bytes"
            self.received += len(data)

    def read_to_end(self, deadline: float) -> str:
        """Read on until EOF or a RST, which must come before DEADLINE; how it ended."""
        while True:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self._recv()
            except ConnectionResetError:
                return "connection reset"
            except socket.timeout:
                raise AssertionError(f"no EOF or RST by the deadline ({self.received} bytes arrived)") from None
            if not data:
                return "EOF"
            self.received += len(data)
            if time.monotonic() > deadline:
                raise AssertionError(f"still receiving at the deadline ({self.received} bytes arrived)")


@pytest.mark.parametrize("victim", ["router", "agent"])
def test_sigkill_router_or_agent_while_connections_end(cluster, victim):
    """Connections that end while the router (or an agent) is dead are
    forgotten once it is back; the live ones go on working."""
    c = cluster(targets=2, files={"1k": 1024})
    with lifecycle_cluster(c) as (router, agents):
        router.wait_healthy()
        conns = [Conn(c) for _ in range(20)]
        for conn in conns:
            tag = conn.get()
            [(conn.target, _line)] = served_by(c, tag)
        assert decisions(router) == 20
        by_target = {i: [k for k in conns if k.target == i] for i in range(2)}
        assert [len(v) for v in by_target.values()] == [10, 10]  # round-robin
        ending = by_target[0][:5] + by_target[1][:5]
        live = [k for k in conns if k not in ending]
        # (proxy mode: no agent, and the relay dies with the router: nothing is killed)
        process = None if not NAT else router if victim == "router" else agents[0]
        if process is not None:
            os.kill(process.proc.pid, signal.SIGKILL)
            process.proc.wait(timeout=10)
            process.proc = None
        for conn in ending:
            conn.close()  # the client's FIN; nginx answers with its own
        time.sleep(LINGER)
        if process is not None:
            process.start()
            if process is router:
                router.wait_healthy()
        want = len(live) if NAT else 0  # one entry per live connection on each side
        settled = wait_for(lambda: entries(c, c.router, "arr_ingress") == want
                           and sum(entries(c, t, "arr_egress") for t in c.targets) == want, 5)
        counts = map_counts(c)
        print(f"\n  {victim} killed and restarted: maps {counts}")
        assert settled, f"expected {want} entries on each side after 5 s: {counts}"
        for conn in live:
            tag = conn.get()
            logged = served_by(c, tag)
            assert len(logged) == 1, f"port {conn.port}: {logged}"
        # Every request decided, the live connections' second ones too: taken
        # back (by the restarted router from the pinned maps, if it was the one
        # killed) and handed off again.
        expected = (10 if victim == "router" else 30) if NAT else 30
        assert decisions(router) == expected
        for conn in live:
            conn.close()


def test_idle_keepalive_survives_and_target_close_is_seen(cluster):
    """An idle handed-off connection outlives the idle timeout (4 x), and a
    target that closes an idle connection is seen by the client at once."""
    c = cluster(targets=2, files={"1k": 1024})
    with lifecycle_cluster(c, handoff={"linger": LINGER, "idle_timeout": 1.0}) as (router, agents):
        router.wait_healthy()
        conn = Conn(c)
        conn.get()
        time.sleep(4.0)
        try:
            conn.get()
        except (OSError, Failure) as exc:
            raise AssertionError(f"keep-alive request after 4 s idle failed: {exc!r}") from None
        assert decisions(router) == 2  # the request after the idle time decided too (taken back)
        conn.close()

        conn = Conn(c)
        tag = conn.get()
        [(target, _line)] = served_by(c, tag)
        if NAT:
            entry = ingress_entry(c, conn.port)
            assert entry is not None, "no ingress entry for a live handed-off connection"
            x = entry.x.translation()
            assert x.daddr == c.targets[target].ip
            killed = reset_target_sockets(c, target, [x.sport])
            assert killed == 1, f"ss -K destroyed {killed} sockets for forwarding port {x.sport}"
            took = assert_closed_by_peer(conn.sock, 2.0)
            print(f"\n  the client saw the target's close {took * 1000:.0f} ms after it")
            assert decisions(router) == 3
        else:  # the router holds the client's connection: a target's close stays behind it
            killed = reset_target_upstreams(c, target)
            print(f"\n  proxy: destroyed {killed} upstream sockets of t{target}")
            conn.get()
            assert decisions(router) == 4
        conn.close()


def test_10000_connections_ended_every_way_leave_maps_at_baseline(cluster):
    """Connections ended by the target's FIN, the client's FIN, the client's
    RST, a vanished client and the target's RST: the maps return to their
    baseline and the router holds no more descriptors than before."""
    c = cluster(targets=2, files=FILES)
    small, big = c.files["1k"], c.files["1m"]
    # No idle upstream connections: in proxy mode they would count as the router's descriptors.
    with lifecycle_cluster(c, upstream={"keepalive": 0}) as (router, agents):
        router.wait_healthy()
        pid = router.proc.pid
        fds_before = len(os.listdir(f"/proc/{pid}/fd"))
        made = 0
        for mode, info, count in (("close", small, 2450), ("client-fin", small, 2450),
                                  ("abort", big, 2450), ("abandon", big, 2450)):
            report = load(c, router.url + info.url_path, count, mode, 4,
                          info.sha256 if mode in ("close", "client-fin") else None)
            assert_all_ok(report, count)
            made += count
            assert decisions(router) == made
        # 200 more, ended by the target's RST (ss -K in its namespace)
        conns = [Conn(c) for _ in range(200)]
        for conn in conns:
            conn.get()
        made += len(conns)
        assert decisions(router) == made
        if NAT:
            forward: dict[int, list[int]] = {}
            for conn in conns:
                entry = ingress_entry(c, conn.port)
                assert entry is not None
                x = entry.x.translation()
                forward.setdefault([t.ip for t in c.targets].index(x.daddr), []).append(x.sport)
            killed = sum(reset_target_sockets(c, t, ports) for t, ports in forward.items())
            assert killed == 200
            for conn in conns:
                assert_closed_by_peer(conn.sock, 2.0)
        else:
            killed = sum(reset_target_upstreams(c, t) for t in range(2))
        for conn in conns:
            conn.close()
        ended = time.monotonic()

        def router_fds() -> int:
            """Descriptors, less the forwarding connections the engine keeps
            ready (handoff/forward_pool.py: bounded, not per connection)."""
            return len(os.listdir(f"/proc/{pid}/fd")) - int(router.metric_sum("arr_forward_pool_ready"))

        clean = wait_for(lambda: at_baseline(map_counts(c)) and router_fds() <= fds_before + 2,
                         AGENT["linger"] + 2)
        counts, fds = map_counts(c), router_fds()
        print(f"  {made} connections; target RSTs {killed}; maps {counts} "
              f"{time.monotonic() - ended:.1f} s after; router fds {fds_before} -> {fds}")
        assert at_baseline(counts), f"maps not at baseline {AGENT['linger'] + 2} s after the load: {counts}"
        assert fds <= fds_before + 2, f"router fds {fds_before} -> {fds}"
        assert clean


@pytest.mark.skipif(not NAT, reason="forwarding ports exist only for handed-off connections")
@pytest.mark.parametrize("ending", ["target-first", "client-first"])
def test_a_forwarding_port_is_reused_within_a_second(cluster, ending):
    """Issue 9: a forwarding port is free again as soon as the target's side is
    over. 16 forwarding ports (the fewest the configuration allows) and 80
    sequential handoffs to one target: every handoff finds a free port (not
    one fallback), so ports are reused, and consecutive handoffs on the same
    4-tuple (router ip, port) -> (target ip, port) follow each other within a
    second. ``target-first``: Connection: close, nginx closes first, its
    socket goes to TIME_WAIT (which the agent destroys: it would refuse the
    router's next SYN by PAWS); ``client-first``: the client's FIN, the target
    closes passively (no TIME_WAIT there)."""
    c = cluster(targets=1, files={"1k": 1024})
    info = c.files["1k"]
    count = 80
    with lifecycle_cluster(c, handoff={"linger": LINGER, "forward_ports": "50000-50015"},
                           agent={"linger": 0}) as (router, agents):
        router.wait_healthy()
        started: dict[str, float] = {}
        for _ in range(count):
            tag = uuid.uuid4().hex
            sock = netlink.socket_in_netns(c.client.ns)
            sock.settimeout(5)
            try:
                sock.connect((c.vip, ROUTER_PORT))
                started[tag] = time.monotonic()
                close = "Connection: close\r\n" if ending == "target-first" else ""
                sock.sendall(f"GET {info.url_path}?tag={tag} HTTP/1.1\r\nHost: {c.vip}\r\n{close}\r\n".encode())
                response = Response(sock)
                response.read_head()
                response.read_body()
                assert (response.status, response.hash.hexdigest()) == (200, info.sha256)
                if ending == "client-first":
                    sock.shutdown(socket.SHUT_WR)
                sock.settimeout(3)
                assert sock.recv(1) == b""  # the target's FIN (its close, or its answer to ours)
            finally:
                sock.close()
        assert decisions(router) == count
        reasons = {k: v for k, v in router.metrics().items() if k.startswith("arr_handoff_fallbacks_total") and v}
        assert router.metric_sum("arr_handoffs_total", result="fallback") == 0, reasons
        assert router.metric_sum("arr_handoffs_total", result="ok") == count
        uses: dict[tuple[str, str], list[float]] = {}
        for tag, when in started.items():
            [(_, line)] = served_by(c, tag)
            remote_addr, remote_port = line.split()[:2]
            assert int(remote_port) in range(50000, 50016), line
            uses.setdefault((remote_addr, remote_port), []).append(when)
        gaps = sorted(b - a for times in uses.values() for a, b in zip(sorted(times), sorted(times)[1:]))
        print(f"\n  {ending}: {count} handoffs on {len(uses)} forwarding ports, {len(gaps)} reuses, "
              f"fastest {gaps[0] * 1000:.0f} ms, median {gaps[len(gaps) // 2] * 1000:.0f} ms, "
              f"slowest {gaps[-1] * 1000:.0f} ms apart; maps {map_counts(c)}")
        assert len(gaps) >= count - 16
        assert gaps[0] < 1.0, "no forwarding port was reused within a second"
        assert wait_for(lambda: at_baseline(map_counts(c)), 2), map_counts(c)
