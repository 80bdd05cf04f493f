"""Moving handed-off connections between targets (issue 11): ``arr migrate``
live and reset, drain with moves, a target found down.

One pool of t0 (A) and t1 (B), round-robin. Connections are put on A by
draining B while they are opened (then B is enabled again); nginx's
``/whoami`` names the target that served a request. Which connections a
move took is read from the router's pinned map (``arr conns``): a moved
connection leaves it, its next request puts it back under B.

* reset: 50 clients reset at both ends (nginx logs the peer's reset, A keeps
  no socket of theirs), their reconnections land on B; and back again.
* live: 1,000 idle connections moved in under 2 s without a reset or a
  retransmission timeout anywhere; a download in flight;
  ``--client``/``--port``/``--max`` select exactly what they name.
* a target found down: nginx killed (its kernel closes the connections
  first), nginx hung (the connections move live).
* the commands' JSON, ``drain --move``, and unknown targets refused.
* under 2% loss each way: 200 idle connections move, nothing is cut.

The response deadline (seed 000) is tests/net/test_deadline_net.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from arr import netlink
from arr.testbed.loss import LOSSY_HEALTH, CounterWatch, dropped, inject_loss, tcp_counters
from arr.testbed.router import BPF_DIR, ROUTER_PORT, handoff_cluster, handoff_outcomes, pin_instance, wait_for

pytestmark = pytest.mark.net

PROJECT_ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20


def admin(c, router, *args: str, check: bool = True):
    cp = c.exec(c.router, [sys.executable, "-m", "arr", *args, "--json",
                           "--socket", router.config["router"]["admin_socket"]],
                check=False, env={"PYTHONPATH": str(PROJECT_ROOT)}, timeout=120)
    if check:
        assert cp.returncode == 0, cp.stderr + router.log_path.read_text(errors="replace")[-3000:]
        return json.loads(cp.stdout)
    return cp


class KeepAlive:
    """A raw keep-alive HTTP/1.1 connection from the client's namespace."""

    def __init__(self, c) -> None:
        self.sock = netlink.socket_in_netns(c.client.ns)
        self.sock.settimeout(10)
        self.sock.connect((c.vip, ROUTER_PORT))
        self.port = self.sock.getsockname()[1]
        self.buffer = b""

    def get(self, path: str) -> bytes:
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: arr.test\r\n\r\n".encode())
        while b"\r\n\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buffer += chunk
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        while len(rest) < length:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed mid-body")
            rest += chunk
        body, self.buffer = rest[:length], rest[length:]
        return body

    def close(self) -> None:
        self.sock.close()


def on_a(c, router, n: int) -> list[KeepAlive]:
    """N keep-alive connections whose first request t0 served (t1 drained meanwhile)."""
    admin(c, router, "drain", c.targets[1].name)
    conns = [KeepAlive(c) for _ in range(n)]
    for conn in conns:
        assert conn.get("/whoami") == f"{c.targets[0].name}\n".encode()
    admin(c, router, "enable", c.targets[1].name)
    return conns


def log_lines_of(router, port: int) -> list[str]:
    """The router's log lines that name client port PORT."""
    named = re.compile(rf":{port}\b|, {port}\)")
    return [line for line in router.log_tail(1 << 20).splitlines() if named.search(line)]


def whoami_of(c, i: int) -> bytes:
    return f"{c.targets[i].name}\n".encode()


def handed_off(c, target: int | None = None) -> list[dict]:
    """The router's handed-off connections (``arr conns`` on its pinned
    maps), those to target TARGET only if given."""
    where = ["--instance", pin_instance(c, c.router)]
    if target is not None:
        where += ["--target", c.targets[target].ip]
    out = c.exec(c.router, [sys.executable, "-m", "arr", "conns", "--bpf-dir", BPF_DIR, "--json", *where],
                 check=True, env={"PYTHONPATH": str(PROJECT_ROOT)}).stdout
    return json.loads(out)


def ports_on(c, target: int) -> set[int]:
    """Client ports of the connections handed off to TARGET, active."""
    return {e["client_port"] for e in handed_off(c, target) if e["state"] == "active"}


def server_peers(c, target: int) -> dict[tuple[str, int], str]:
    """Every TCP socket of TARGET's nginx port: {peer (ip, port): state}."""
    out = c.exec(c.targets[target], ["ss", "-Htna"]).stdout
    peers = {}
    for line in out.splitlines():
        fields = line.split()
        if len(fields) < 5 or not fields[3].endswith(f":{c.spec.target_port}"):
            continue
        ip, _, port = fields[4].rpartition(":")
        if port != "*":
            peers[(ip, int(port))] = fields[0]
    return peers


def timed_admin(c, router, *args: str):
    started = time.monotonic()
    report = admin(c, router, *args)
    return report, time.monotonic() - started


def assert_reset_within(conns_: list[KeepAlive], since: float, limit: float) -> float:
    """Each connection's next read fails with a reset, all by SINCE + LIMIT;
    the latest such moment, relative to SINCE."""
    latest = 0.0
    for n, conn in enumerate(conns_):
        conn.sock.settimeout(max(since + limit - time.monotonic(), 0.001))
        try:
            data = conn.sock.recv(100)
        except ConnectionResetError:
            latest = max(latest, time.monotonic() - since)
            continue
        except (TimeoutError, socket.timeout):
            raise AssertionError(f"connection {n} (port {conn.port}) saw no reset within {limit} s") from None
        raise AssertionError(f"connection {n} (port {conn.port}) read {data!r}, not a reset")
    return latest


# ---------------------------------------------------------------- acceptance 1: reset


def test_reset_migration_of_50_clients_there_and_back(cluster):
    c = cluster(targets=2)
    with handoff_cluster(c) as (router, agents):
        router.wait_healthy()
        clients = on_a(c, router, 50)
        try:
            for src, dst in ((0, 1), (1, 0)):
                assert wait_for(lambda: len(ports_on(c, src)) == 50, 10), handed_off(c)
                listed = handed_off(c, src)
                assert {e["client_port"] for e in listed} == {k.port for k in clients}
                forwards = {(e["forward_ip"], e["forward_port"]) for e in listed}
                assert len(forwards) == 50 and {ip for ip, _ in forwards} == {c.router.ip}
                peers = server_peers(c, src)
                assert all(peers.get(f) == "ESTAB" for f in forwards), (forwards, peers)
                errors_before = c.nginx_error_log(src)
                resets_before = router.metric_sum("arr_migrations_total", mode="reset", outcome="reset")

                report, took = timed_admin(c, router, "migrate", "--from", c.targets[src].name,
                                           "--to", c.targets[dst].name, "--mode", "reset")
                returned = time.monotonic()
                assert report["selected"] == 50 and report["reset"] == 50 and report["moved"] == 0, report
                assert report["skipped"] == {} and report["left"] == {}, report
                latest = assert_reset_within(clients, returned, 1.0)
                print(f"reset {c.targets[src].name} -> {c.targets[dst].name}: command {took:.2f} s "
                      f"(report {report['seconds']} s), last client reset {latest:.3f} s after it returned")
                assert router.metric_sum("arr_migrations_total", mode="reset", outcome="reset") - resets_before == 50

                # The old target holds none of those forwarding connections any more.
                assert wait_for(lambda: not forwards & server_peers(c, src).keys(), 2), \
                    (forwards & server_peers(c, src).keys())
                assert handed_off(c, src) == []
                # nginx saw each peer reset its connection (error_log level info shows it).
                resets_logged = c.nginx_error_log(src)[len(errors_before):].count("reset by peer")
                print(f"nginx on {c.targets[src].name} logged {resets_logged} 'reset by peer'")
                assert resets_logged == 50, c.nginx_error_log(src)[len(errors_before):][-3000:]

                for conn in clients:
                    conn.close()
                steered_before = router.metric_sum("arr_migration_steered_total")
                clients = [KeepAlive(c) for _ in range(50)]
                for conn in clients:
                    assert conn.get("/whoami") == whoami_of(c, dst)
                # Round-robin alone would have sent half of them to the old target.
                assert router.metric_sum("arr_migration_steered_total") - steered_before >= 20
        finally:
            for conn in clients:
                conn.close()


# ---------------------------------------------------------------- acceptance 2: live, 1,000


def test_live_migration_of_1000_idle_connections_within_2_s(cluster):
    c = cluster(targets=2)
    with handoff_cluster(c) as (router, agents):
        router.wait_healthy()
        clients = on_a(c, router, 1000)
        try:
            assert wait_for(lambda: len(ports_on(c, 0)) == 1000, 20)
            watch = CounterWatch(c, (c.client, *c.targets))
            takebacks_before = router.metric_sum("arr_router_takebacks_total", result="ok")
            report, took = timed_admin(c, router, "migrate", "--from", c.targets[0].name,
                                       "--to", c.targets[1].name)
            print(f"moved {report['moved']} in {report['seconds']} s (report), {took:.2f} s wall clock "
                  f"(the CLI's start included)")
            assert report["selected"] == 1000 and report["moved"] == 1000, report
            assert report["skipped"] == {} and report["reset"] == 0, report
            assert report["seconds"] < 2.0 and took < 2.0, (report, took)
            assert router.metric_sum("arr_router_takebacks_total", result="ok") - takebacks_before == 1000
            assert router.metric_sum("arr_migrations_total", mode="live", outcome="moved") == 1000
            assert handed_off(c, 0) == []
            decided_before = router.metric_sum("arr_requests_total", decision="handoff")
            started = time.monotonic()
            for conn in clients:
                assert conn.get("/whoami") == whoami_of(c, 1)
            print(f"1000 next requests served by {c.targets[1].name} in {time.monotonic() - started:.2f} s")
            # Each was read and decided by the router (steered to B), not
            # carried to B at layer 4 unseen.
            assert router.metric_sum("arr_requests_total", decision="handoff") - decided_before == 1000
            info = c.files["1m"]
            for conn in clients[::50]:
                assert hashlib.sha256(conn.get(info.url_path)).hexdigest() == info.sha256
                assert conn.get("/whoami") == whoami_of(c, 1)
            deltas = watch.assert_clean(explain=lambda: handoff_outcomes(router, agents))
            print("TCP counters:", {h: {k: d[k] for k in ("TcpExtTCPTimeouts", "TcpRetransSegs", "TcpOutRsts")
                                        if d.get(k)} for h, d in deltas.items()},
                  "empty resets:", watch.empty_resets, "after both closed:", watch.closed_resets)
            assert deltas[c.client.name].get("TcpExtTCPTimeouts", 0) == 0, deltas[c.client.name]
            assert router.metric_sum("arr_migration_steered_total") >= 400
        finally:
            for conn in clients:
                conn.close()


# ---------------------------------------------------------------- acceptance 3: a download in flight


class SlowDownload(threading.Thread):
    """GET PATH on a keep-alive connection, its body read at RATE bytes/s
    (a small receive buffer and sleeps: the server's sends wait for the
    reader); the body's SHA-256 kept. The connection stays open for the next
    request (``KeepAlive.get`` on ``conn``)."""

    def __init__(self, c, path: str, rate: int, stall: float = 30.0) -> None:
        super().__init__(daemon=True)
        self.conn = KeepAlive.__new__(KeepAlive)
        sock = netlink.socket_in_netns(c.client.ns)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)  # before connect: no autotuning
        sock.settimeout(stall)  # the longest wait for the next bytes
        sock.connect((c.vip, ROUTER_PORT))
        self.conn.sock, self.conn.port, self.conn.buffer = sock, sock.getsockname()[1], b""
        self.path, self.rate = path, rate
        self.received = 0
        self.length: int | None = None
        self.sha256: str | None = None
        self.error: BaseException | None = None
        self.finished: float | None = None

    def run(self) -> None:
        try:
            sock = self.conn.sock
            sock.sendall(f"GET {self.path} HTTP/1.1\r\nHost: arr.test\r\n\r\n".encode())
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("closed before the response head")
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            self.length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                   if line.lower().startswith(b"content-length")))
            digest = hashlib.sha256()
            started = time.monotonic()
            chunk = body
            while True:
                take = chunk[:self.length - self.received]
                digest.update(take)
                self.received += len(take)
                if self.received >= self.length:
                    self.conn.buffer = chunk[len(take):]
                    break
                ahead = started + self.received / self.rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError(f"closed after {self.received} of {self.length} body bytes")
            self.sha256 = digest.hexdigest()
            self.finished = time.monotonic()
        except BaseException as exc:  # noqa: BLE001: reported by the test
            self.error = exc


def test_live_migration_waits_for_a_64m_download_in_flight(cluster):
    c = cluster(targets=2, files={"64m": 64 * MiB})
    info = c.files["64m"]
    with handoff_cluster(c) as (router, agents):
        router.wait_healthy()
        admin(c, router, "drain", c.targets[1].name)
        download = SlowDownload(c, info.url_path, 16 * MiB, stall=5.0)  # about 4 s
        started = time.monotonic()
        download.start()
        try:
            assert wait_for(lambda: download.received > 4 * MiB, 5), download.error
            assert ports_on(c, 0) == {download.conn.port}
            admin(c, router, "enable", c.targets[1].name)
            assert wait_for(lambda: download.received > 8 * MiB, 5), download.error
            waits_before = router.metric_sum("arr_takeback_waits_total")
            at = download.received
            report, took = timed_admin(c, router, "migrate", "--from", c.targets[0].name,
                                       "--to", c.targets[1].name, "--wait", "30")
            returned = time.monotonic()
            moved_at = download.received
            download.join(30)
            if download.error is not None:
                sent_by_a = [line for line in c.nginx_log(0) if info.url_path in line]
                nginx_errors = [line for line in c.nginx_error_log(0).splitlines() if info.url_path in line]
                raise AssertionError(
                    f"the download failed: {download.error!r} after {download.received} of {info.size} bytes; "
                    f"the migration started at {at} and returned at {moved_at}: {report}; take-back waits "
                    f"{router.metric_sum('arr_takeback_waits_total') - waits_before:.0f}; nginx on A: "
                    f"{sent_by_a} {nginx_errors}; router counters "
                    f"{ {k: v for k, v in tcp_counters(c, c.router).items() if k == 'TcpExtTCPAbortOnData'} }")
            print(f"migration started at {at / MiB:.1f} MiB of 64; the download took "
                  f"{download.finished - started:.2f} s; the command returned after {took:.2f} s "
                  f"(report {report['seconds']} s), {time.monotonic() - download.finished:.2f} s after "
                  f"the last byte was read")
            assert report["selected"] == 1 and report["moved"] == 1 and report["skipped"] == {}, report
            assert report["seconds"] > 0.5, report  # it waited for the response to be acknowledged
            assert download.length == info.size and download.sha256 == info.sha256
            # The move waited for the whole response: it came back only after
            # the client had read the last byte (handoff/migrate.py _settled).
            assert download.finished is not None and returned >= download.finished
            # Every byte came from A: nginx logged the whole body on its connection.
            assert [line for line in c.nginx_log(0) if info.url_path in line and f" {info.size} " in line]
            assert download.conn.get("/whoami") == whoami_of(c, 1)
            assert hashlib.sha256(download.conn.get(info.url_path)).hexdigest() == info.sha256
        finally:
            download.conn.close()
            download.join(5)


# ---------------------------------------------------------------- acceptance 4: selection


def test_client_port_and_max_select_exactly_the_connections_they_name(cluster):
    c = cluster(targets=2)
    a, b = c.targets[0].name, c.targets[1].name
    with handoff_cluster(c) as (router, agents):
        router.wait_healthy()
        clients = on_a(c, router, 30)
        by_port = {k.port: k for k in clients}
        try:
            assert wait_for(lambda: ports_on(c, 0) == set(by_port), 10), handed_off(c)
            moved_total = 0

            def migrate(*args: str, expect_moved: set[int], left: dict) -> None:
                nonlocal moved_total
                on_a_before = ports_on(c, 0)
                steered_before = router.metric_sum("arr_migration_steered_total")
                report = admin(c, router, "migrate", "--from", a, "--to", b, *args)
                assert report["selected"] == report["moved"] == len(expect_moved), (args, report)
                assert report["left"] == left and report["skipped"] == {} and report["reset"] == 0, (args, report)
                moved_total += len(expect_moved)
                assert router.metric_sum("arr_migrations_total", mode="live", outcome="moved") == moved_total
                assert router.metric_sum("arr_router_takebacks_total", result="ok") == moved_total
                # Exactly those left A's map; every other connection is still handed off to A.
                assert ports_on(c, 0) == on_a_before - expect_moved, args
                for port in sorted(expect_moved):
                    assert by_port[port].get("/whoami") == whoami_of(c, 1), (args, port)
                steered = router.metric_sum("arr_migration_steered_total") - steered_before
                assert steered <= len(expect_moved), (args, steered)  # round-robin sends some to B anyway
                # Their next requests were handed off to B.
                assert wait_for(lambda: expect_moved <= ports_on(c, 1), 5), (args, handed_off(c))
                print(f"migrate {' '.join(args)}: moved ports {sorted(expect_moved)}, left {report['left']}, "
                      f"steered {steered:.0f}")

            # --max 5: the first five in the order (client address, then port).
            ordered = sorted(by_port)
            migrate("--max", "5", expect_moved=set(ordered[:5]), left={"max": 25})
            # --port P: that one client port, nothing else.
            one = ordered[17]
            migrate("--port", str(one), expect_moved={one}, left={"port": 24})
            # --client: a network without the client: none; the client's own /32 with a port
            # range holding four connections of A and --max 2: the lowest two of those.
            migrate("--client", "192.0.2.0/24", expect_moved=set(), left={"client": 24})
            rest = sorted(ports_on(c, 0))
            span = rest[3:7]
            migrate("--client", f"{c.client.ip}/32", "--port", f"{span[0]}-{span[-1]}", "--max", "2",
                    expect_moved=set(span[:2]), left={"port": 20, "max": 2})
            assert len(ports_on(c, 0)) == 22
            assert router.metric_sum("arr_migration_steered_total") >= 1
        finally:
            for conn in clients:
                conn.close()


# ---------------------------------------------------------------- acceptance 5: a target found down


def next_answer(c, conn: KeepAlive, limit: float) -> tuple[str, bytes]:
    """The connection's next /whoami within LIMIT seconds: ("answered", body),
    or ("closed"|"reset", body of a new connection's /whoami)."""
    conn.sock.settimeout(limit)
    try:
        return "answered", conn.get("/whoami")
    except ConnectionResetError:
        outcome = "reset"
    except ConnectionError:  # KeepAlive.get: the server closed it
        outcome = "closed"
    except (TimeoutError, socket.timeout):
        raise AssertionError(f"port {conn.port}: no answer, no close, no reset within {limit} s") from None
    conn.close()
    fresh = KeepAlive(c)
    try:
        return outcome, fresh.get("/whoami")
    finally:
        fresh.close()


def nginx_processes(c, i: int) -> list[int]:
    """PIDs of target I's nginx (master and workers): its namespace's processes named nginx."""
    pids = []
    for pid in netlink.netns_pids(c.targets[i].ns):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "nginx":
                pids.append(pid)
        except OSError:
            pass
    return pids


def test_a_target_killed_its_connections_neither_hang_nor_stay(cluster):
    """nginx on A killed: its kernel closes the sockets (a FIN each, which the
    agent passes to the clients), health checks mark A down and the router's
    move finds them closed ("target-closed"): each client reads a clean
    close at once and its reconnection is served by B."""
    c = cluster(targets=2)
    with handoff_cluster(c) as (router, agents):
        router.wait_healthy()
        clients = on_a(c, router, 10)
        try:
            assert wait_for(lambda: len(ports_on(c, 0)) == 10, 10)
            killed = time.monotonic()
            c.stop_target(0, grace=0)  # nginx on A, by PID: SIGTERM, then SIGKILL
            assert wait_for(lambda: router.metric_sum("arr_target_up", target=c.targets[0].name) == 0, 5)
            down_after = time.monotonic() - killed
            # The move on down handled each of A's connections (one outcome each).
            assert wait_for(lambda: router.metric_sum("arr_migrations_total") == 10, 10), router.log_tail()
            assert wait_for(lambda: handed_off(c, 0) == [], 5), handed_off(c, 0)
            outcomes: dict[str, list[float]] = {}
            for conn in clients:
                started = time.monotonic()
                outcome, body = next_answer(c, conn, 5.0)
                took = time.monotonic() - started
                assert body == whoami_of(c, 1), (outcome, body)
                assert took < 3.0, (outcome, took)
                outcomes.setdefault(outcome, []).append(round(took, 3))
            migrations = {k: v for k, v in router.metrics().items() if k.startswith("arr_migrations_total")}
            print(f"A down {down_after:.2f} s after the kill; client outcomes {outcomes}; {migrations}")
            assert set(outcomes) <= {"answered", "closed", "reset"}
        finally:
            for conn in clients:
                conn.close()


def test_a_target_hung_its_idle_connections_move_live_to_b(cluster):
    """nginx on A stopped (SIGSTOP: it accepts nothing, answers nothing, its
    sockets stay): health checks mark A down and its idle connections are
    moved live; each client's next request on the same connection is
    answered by B."""
    c = cluster(targets=2)
    with handoff_cluster(c) as (router, agents):
        router.wait_healthy()
        clients = on_a(c, router, 20)
        stopped: list[int] = []
        try:
            assert wait_for(lambda: len(ports_on(c, 0)) == 20, 10)
            watch = CounterWatch(c, (c.client, *c.targets))
            hung = time.monotonic()
            for pid in nginx_processes(c, 0):
                os.kill(pid, signal.SIGSTOP)
                stopped.append(pid)
            assert len(stopped) >= 2
            assert wait_for(lambda: router.metric_sum("arr_target_up", target=c.targets[0].name) == 0, 5)
            down_after = time.monotonic() - hung
            assert wait_for(lambda: router.metric_sum("arr_migrations_total") == 20, 10), router.log_tail()
            moved_after = time.monotonic() - hung
            migrations = {k: v for k, v in router.metrics().items() if k.startswith("arr_migrations_total")}
            assert router.metric_sum("arr_migrations_total", mode="live", outcome="moved") == 20, migrations
            assert router.metric_sum("arr_router_takebacks_total", result="ok") == 20
            assert handed_off(c, 0) == []
            for conn in clients:
                started = time.monotonic()
                assert next_answer(c, conn, 5.0) == ("answered", whoami_of(c, 1))
                assert time.monotonic() - started < 1.0
            deltas = watch.assert_clean(explain=lambda: handoff_outcomes(router, agents))
            assert deltas[c.client.name].get("TcpExtTCPTimeouts", 0) == 0, deltas[c.client.name]
            print(f"A down {down_after:.2f} s after nginx stopped, its 20 connections moved by "
                  f"{moved_after:.2f} s; {migrations}")
        finally:
            for pid in stopped:
                os.kill(pid, signal.SIGCONT)
            for conn in clients:
                conn.close()


def test_a_target_hung_with_a_request_pending_resets_that_client_instead_of_hanging(cluster):
    """nginx on A stopped while a request waits for its answer (no response
    deadline configured): health checks mark A down; the live move waits for
    an answer that never comes (arr/server.py DOWN_MOVE_WAIT), then resets
    the connection at both ends rather than leave the client hanging; the
    idle one beside it moves live."""
    c = cluster(targets=2)
    with handoff_cluster(c) as (router, agents):
        router.wait_healthy()
        pending, idle = on_a(c, router, 2)
        stopped: list[int] = []
        try:
            assert wait_for(lambda: len(ports_on(c, 0)) == 2, 10)
            for pid in nginx_processes(c, 0):
                os.kill(pid, signal.SIGSTOP)
                stopped.append(pid)
            hung = time.monotonic()
            pending.sock.sendall(b"GET /whoami HTTP/1.1\r\nHost: arr.test\r\n\r\n")
            pending.sock.settimeout(15)
            with pytest.raises(ConnectionResetError):
                data = pending.sock.recv(100)
                raise AssertionError(f"read {data!r}, not a reset")
            reset_after = time.monotonic() - hung
            assert 5.0 <= reset_after < 10.0, reset_after  # down (~1.5 s), then the move's 5 s bound
            assert router.metric_sum("arr_migrations_total", mode="live", outcome="reset") == 1
            assert router.metric_sum("arr_migrations_total", mode="live", outcome="moved") == 1
            assert next_answer(c, idle, 5.0) == ("answered", whoami_of(c, 1))
            print(f"the pending request's client was reset {reset_after:.2f} s after nginx stopped")
        finally:
            for pid in stopped:
                os.kill(pid, signal.SIGCONT)
            pending.close()
            idle.close()


# ---------------------------------------------------------------- acceptance 6: the commands


REPORT_FIELDS = {"from", "to", "mode", "client", "port", "max", "selected", "moved", "reset", "skipped", "left",
                 "seconds"}


def test_migrate_and_drain_move_commands_answer_json_and_refuse_unknown_targets(cluster):
    c = cluster(targets=2)
    a, b = c.targets
    address = {t.name: f"{t.ip}:{c.spec.target_port}" for t in c.targets}
    with handoff_cluster(c) as (router, agents):
        router.wait_healthy()
        clients = on_a(c, router, 6)
        try:
            assert wait_for(lambda: len(ports_on(c, 0)) == 6, 10)
            # Every filter given, by host:port for --to: their values echoed.
            report = admin(c, router, "migrate", "--from", a.name, "--to", address[b.name], "--client",
                           f"{c.client.ip}/32", "--port", "1024-65535", "--max", "2", "--mode", "live",
                           "--wait", "5")
            assert set(report) == REPORT_FIELDS, report
            assert {k: v for k, v in report.items() if k != "seconds"} == {
                "from": address[a.name], "to": address[b.name], "mode": "live", "client": f"{c.client.ip}/32",
                "port": "1024-65535", "max": 2, "selected": 2, "moved": 2, "reset": 0, "skipped": {},
                "left": {"max": 4}}, report
            assert isinstance(report["seconds"], float) and 0 <= report["seconds"] < 5
            # None given: the defaults (live, nothing filtered), by host:port for --from.
            report = admin(c, router, "migrate", "--from", address[a.name], "--to", b.name, "--mode", "reset",
                           "--max", "1")
            assert {k: v for k, v in report.items() if k != "seconds"} == {
                "from": address[a.name], "to": address[b.name], "mode": "reset", "client": None, "port": None,
                "max": 1, "selected": 1, "moved": 0, "reset": 1, "skipped": {}, "left": {"max": 3}}, report
            # The human form says the same in one line.
            cp = c.exec(c.router, [sys.executable, "-m", "arr", "migrate", "--from", a.name, "--to", b.name,
                                   "--client", "192.0.2.0/24", "--socket", router.config["router"]["admin_socket"]],
                        check=False, env={"PYTHONPATH": str(PROJECT_ROOT)})
            assert cp.returncode == 0 and "0 selected, 0 moved, 0 reset" in cp.stdout, (cp.stdout, cp.stderr)
            assert len(ports_on(c, 0)) == 3

            # drain --move: A drains and its three remaining connections move where the policy sends them: B.
            drained = admin(c, router, "drain", a.name, "--move", "--within", "5")
            assert set(drained) == {"targets", "moved"}, drained
            assert [(t["target"], t["draining"], t["available"]) for t in drained["targets"]] == \
                [(a.name, True, False)]
            moved = drained["moved"]
            assert set(moved) == REPORT_FIELDS, moved
            assert {k: v for k, v in moved.items() if k != "seconds"} == {
                "from": address[a.name], "to": None, "mode": "live", "client": None, "port": None, "max": None,
                "selected": 3, "moved": 3, "reset": 0, "skipped": {}, "left": {}}, moved
            assert handed_off(c, 0) == []
            # Sorted by port: two moved live to B, one reset, three moved by the drain (to B: A drains).
            ordered = sorted(clients, key=lambda k: k.port)
            for conn in ordered[:2] + ordered[3:]:
                assert conn.get("/whoami") == whoami_of(c, 1), conn.port
            assert_reset_within([ordered[2]], time.monotonic(), 1.0)
            assert router.metric_sum("arr_migrations_total", mode="live", outcome="moved") == 5
            assert router.metric_sum("arr_migrations_total", mode="reset", outcome="reset") == 1

            # Unknown targets: exit code 1, the name in the error, nothing moved.
            for args in (["migrate", "--from", "nosuch", "--to", b.name],
                         ["migrate", "--from", a.name, "--to", "nosuch"],
                         ["drain", "nosuch", "--move"]):
                cp = admin(c, router, *args, check=False)
                assert cp.returncode == 1, (args, cp.returncode, cp.stdout, cp.stderr)
                assert "'nosuch'" in cp.stderr and cp.stdout == "", (args, cp.stderr)
                print(f"arr {' '.join(args)}: exit {cp.returncode}: {cp.stderr.strip()}")
            cp = admin(c, router, "migrate", "--from", a.name, "--to", a.name, check=False)
            assert cp.returncode == 1 and "destination is the source" in cp.stderr, cp.stderr
            assert router.metric_sum("arr_migrations_total") == 6
        finally:
            for conn in clients:
                conn.close()


# ---------------------------------------------------------------- under loss


def test_live_migration_under_2_percent_loss_each_way(cluster):
    """Probes, their answers, the agent's exchange and the rebuilt sockets'
    first packets all cross lossy links: a lost probe or answer is probed
    again (handoff/takeback.py PROBE_INTERVAL), nothing is cut, every
    connection moves and its next request is served by B, byte-exact."""
    c = cluster(targets=2, files={"64k": 64 * 1024})
    info = c.files["64k"]
    with handoff_cluster(c, health=LOSSY_HEALTH) as (router, agents):
        router.wait_healthy()
        conns = on_a(c, router, 200)
        try:
            for host in (c.client, *c.targets):
                inject_loss(c, host, 20)
            # The router too: closing A's forwarding connections, it must
            # re-ACK A's retransmitted FIN, not reset it (handoff/forward_close.py).
            watch = CounterWatch(c, (c.client, *c.targets), router=c.router)
            report, took = timed_admin(c, router, "migrate", "--from", c.targets[0].name,
                                       "--to", c.targets[1].name)
            assert report["selected"] == 200 and report["moved"] == 200, report
            slowest = 0.0
            for conn in conns:
                started = time.monotonic()
                try:
                    assert conn.get("/whoami") == whoami_of(c, 1)
                    assert hashlib.sha256(conn.get(info.url_path)).hexdigest() == info.sha256
                except OSError as exc:
                    # Seen once in CI (a reset), never reproduced since: say which path it took.
                    raise AssertionError(f"client port {conn.port}: {exc!r} after "
                                         f"{time.monotonic() - started:.2f} s; "
                                         f"{handoff_outcomes(router, agents)}; router log: "
                                         f"{log_lines_of(router, conn.port)}") from exc
                slowest = max(slowest, time.monotonic() - started)
            watch.assert_clean(explain=lambda: handoff_outcomes(router, agents))
            drops = {h.name: dropped(c, h) for h in (c.client, *c.targets)}
            assert sum(drops.values()) > 20, f"the loss did not happen: {drops}"
            taken = router.metric_sum("arr_router_takebacks_total", result="ok")
            assert taken == 200 and router.metric_sum("arr_router_takebacks_total") == taken
            print(f"\n200 idle connections moved under 2% loss in {report['seconds']} s "
                  f"(command {took:.2f} s), take-backs {taken:.0f}, slowest next 2 requests "
                  f"{slowest:.2f} s, drops {drops}")
        finally:
            for conn in conns:
                conn.close()
