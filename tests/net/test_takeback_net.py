"""Every request routed: a handed-off connection taken back on its client's next
request and handed on, with unmodified nginx targets (issue 10's acceptance).

Two pools of one target each: ``names`` (t0) serves ``/whoami`` (nginx answers
the target's name), ``files`` (t1) serves ``/files/``. A rule refuses DELETE.
Each request of one keep-alive connection is decided by the policy: the
router's access log has a line per request, all from the client's one port,
and nginx logs each with the X-Forwarded-For the router added.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import time

import pytest

from arr import netlink
from arr.testbed import Cluster
from arr.testbed.loss import CounterWatch, dropped, inject_loss
from arr.testbed.router import AGENT_PORT, ROUTER_PORT, handoff_cluster, handoff_outcomes, wait_for

pytestmark = pytest.mark.net

MiB = 1 << 20
HEADER_BYTES = 8 * 1024


def target_entry(c: Cluster, i: int) -> dict:
    t = c.targets[i]
    return {"address": f"{t.ip}:{c.spec.target_port}", "name": t.name, "agent": f"{t.ip}:{AGENT_PORT}"}


def two_pools(c: Cluster, in_place: bool = False, hand_on: bool = False, reuse: bool = False,
              **router: object) -> dict:
    """Sections for handoff_cluster: pools ``names`` (t0) and ``files`` (t1),
    rules by path, DELETE refused, access log on. IN_PLACE: a request to the
    same target goes in place (handoff/inplace.py, tests/net/test_inplace_net.py);
    HAND_ON: one to the other target is handed on from its captures
    (handoff/takeback.py ``_hand_on``). Both off by default, so that these
    tests take every request back. REUSE: ``handoff.reuse_forward``, the old
    forwarding connection back to the pool (tests/net/test_reuse_forward_net.py)."""
    return {
        "router": {"access_log": True, **router},
        "handoff": {"rehandoff_in_place": in_place, "rehandoff_hand_on": hand_on, "reuse_forward": reuse},
        "limits": {"header_bytes": HEADER_BYTES},
        "targets": None, "policy": None, "health": None,
        "pools": {"names": {"targets": [target_entry(c, 0)]}, "files": {"targets": [target_entry(c, 1)]}},
        "default_pool": "names",
        "rules": [{"method": "DELETE", "reject": 405},
                  {"path_prefix": "/files/", "pool": "files"},
                  {"path_prefix": "/whoami", "pool": "names"}],
    }


def client_socket(c: Cluster):
    """A TCP connection to the router from the client's namespace."""
    sock = netlink.socket_in_netns(c.client.ns)
    sock.settimeout(10)
    sock.connect((c.vip, ROUTER_PORT))
    return sock


def connect(c: Cluster) -> tuple[http.client.HTTPConnection, int]:
    """http.client on a socket opened in the client's namespace; never
    reconnects by itself (a second connection would fail the port check)."""
    sock = client_socket(c)
    conn = http.client.HTTPConnection(c.vip, ROUTER_PORT, timeout=10)
    conn.sock = sock
    return conn, sock.getsockname()[1]


def get(conn: http.client.HTTPConnection, method: str, path: str, **headers: str) -> tuple[int, bytes]:
    conn.request(method, path, headers={"Host": "arr.test", **headers})
    response = conn.getresponse()
    body = response.read()
    assert not response.will_close, f"{method} {path}: the router closed the connection"
    return response.status, body


def access_lines(router, port: int | None, since: int = 0) -> list[dict]:
    """The router's access-log records of the client's port PORT (None: of
    any), written after byte SINCE of the log (a port an earlier client used
    is reused)."""
    records = []
    with router.log_path.open("rb") as log:
        log.seek(since)
        text = log.read().decode(errors="replace")
    for line in text.splitlines():
        if not line.startswith("{"):
            continue  # the application's own log lines (arr/accesslog.py: access lines are bare JSON)
        record = json.loads(line)
        if record.get("type") in ("request", "rejected") and (
                port is None or record.get("client", "").endswith(f":{port}")):
            records.append(record)
    return records


def router_time_wait(c: Cluster) -> list[str]:
    """The router's TIME_WAIT sockets towards the targets' server port."""
    out = c.exec(c.router, ["ss", "-Htn", "state", "time-wait"]).stdout
    return [line for line in out.splitlines() if f":{c.spec.target_port} " in line + " "]


def nginx_lines(c: Cluster, i: int, needle: str) -> list[str]:
    return [line for line in c.nginx_log(i) if needle in line]


def curl_one_connection(c: Cluster, router, urls: list[str]) -> None:
    """curl with several URLs (one connection); each body checked: the
    target's name for ``/whoami``, the file's SHA-256 otherwise."""
    argv = ["curl", "-sS", "--noproxy", "*", "--max-time", "60"]
    for i, path in enumerate(urls):
        argv += ["-o", str(c.workdir / f"curl{i}"), router.url + path]
    c.exec(c.client, argv)
    for i, path in enumerate(urls):
        data = (c.workdir / f"curl{i}").read_bytes()
        if path == "/whoami":
            assert data == f"{c.targets[0].name}\n".encode()
        else:
            name = "1k" if path.endswith("1k") else "1m"
            assert hashlib.sha256(data).hexdigest() == c.files[name].sha256


def wrk_keep_alive(c: Cluster, router, path: str) -> int:
    """Two seconds of wrk keep-alive (4 connections) on PATH: the responses it
    read, after checking that the policy decided every one of them."""
    before = router.metric_sum("arr_requests_total")
    out = c.exec(c.client, ["wrk", "-t1", "-c4", "-d2s", "--latency", router.url + path], timeout=60).stdout
    done = int(next(line.split()[0] for line in out.splitlines() if "requests in" in line))
    assert "Non-2xx" not in out and "Socket errors" not in out, out
    assert done > 20, out
    decided = router.metric_sum("arr_requests_total") - before
    # wrk counts the responses it read; requests cut by its stop are decided, not counted.
    assert done <= decided <= done + 4, (path, done, decided)
    return done


MODES = {"take-back": {}, "hand-on": {"hand_on": True}, "hand-on+reuse": {"hand_on": True, "reuse": True}}
"""How a request for the other pool goes: taken back and handed off from the
rebuilt socket, or handed on from its captures (handoff/takeback.py); and
handed on with the old forwarding connection given back to the pool rather
than closed (``handoff.reuse_forward``)."""


@pytest.mark.parametrize("mode", ["take-back", "hand-on"])  # with reuse: tests/net/test_reuse_forward_net.py
def test_one_keep_alive_connection_every_request_routed(cluster, mode):
    c = cluster(targets=2, files={"1k": 1024, "1m": MiB})
    sections = two_pools(c, **MODES[mode])
    with handoff_cluster(c, **sections) as (router, agents):
        router.wait_healthy()
        conn, port = connect(c)
        expected: list[tuple[int, str]] = []
        for n in range(1, 101):
            if n in (2, 100):
                status, body = get(conn, "DELETE", f"/files/1k?n={n}")
                assert status == 405, (n, status)
                expected.append((405, "reject"))
            elif n == 50:
                status, body = get(conn, "GET", f"/whoami?n={n}", **{"X-Big": "b" * (2 * HEADER_BYTES)})
                assert status == 431, (n, status)
                expected.append((431, "error"))
            elif n % 2:
                status, body = get(conn, "GET", f"/whoami?n={n}")
                assert (status, body) == (200, f"{c.targets[0].name}\n".encode()), n
                expected.append((None, "handoff"))  # the router never sees a handed-off status
            else:
                name = "1m" if n % 10 == 0 else "1k"
                status, body = get(conn, "GET", f"{c.files[name].url_path}?n={n}")
                assert status == 200, n
                assert hashlib.sha256(body).hexdigest() == c.files[name].sha256, n
                expected.append((None, "handoff"))  # the router never sees a handed-off status
        conn.close()

        # The router decided each of the 100, in order, on the one connection.
        assert wait_for(lambda: len(access_lines(router, port)) == 100, 5), len(access_lines(router, port))
        records = access_lines(router, port)
        assert [(r["status"], r["decision"]) for r in records] == expected
        # Each handoff reached its target (nginx logged it) with X-Forwarded-For.
        assert wait_for(lambda: nginx_lines(c, 0, "n=99 "), 3)  # logged once finished
        client_ip = c.client.ip
        for n, (status, decision) in enumerate(expected, start=1):
            if decision != "handoff":
                assert not any(nginx_lines(c, i, f"n={n} ") for i in range(2)), n
                continue
            target = 0 if n % 2 else 1
            lines = nginx_lines(c, target, f"n={n} ")
            assert len(lines) == 1 and f'"{client_ip}"' in lines[0], (n, lines)
            assert not nginx_lines(c, 1 - target, f"n={n} "), n
        handed = sum(1 for s, d in expected if d == "handoff")
        assert router.metric_sum("arr_handoffs_total", result="ok") == handed
        assert router.metric_sum("arr_takebacks_total") == router.metric_sum("arr_takebacks_total", result="ok")
        if mode == "take-back":
            # The first handoff is the connection's; every later one follows a
            # take-back (after the rejected and refused ones the router held it).
            assert router.metric_sum("arr_takebacks_total", result="ok") >= handed - 4
        else:
            # Taken back: requests 2 and 100 (refused) and 50 (431); 3 and 51
            # are read from the router's socket and handed off from it. Every
            # other one after the first is handed on from its captures.
            outcomes = handoff_outcomes(router, agents)
            assert router.metric_sum("arr_takebacks_total", result="ok") == 3, outcomes
            assert router.metric_sum("arr_handons_total", result="ok") == handed - 3 == 94, outcomes
            assert router.metric_sum("arr_handons_total") == 94, outcomes
            assert router.metric_sum("arr_rehandoffs_total", target="handed-on") == 94, outcomes
            # Each old forwarding connection ended with a FIN: nginx logged an
            # ordinary close (at info), never a reset or a timeout.
            logs = [c.nginx_error_log(i) for i in range(2)]
            for log in logs:
                assert "[error]" not in log and "reset by peer" not in log and "timed out" not in log, log
            assert wait_for(lambda: sum(c.nginx_error_log(i).count("closed keepalive connection")
                                        for i in range(2)) >= 94, 3), logs
            # The router's TIME_WAIT sockets went after their hold; the
            # target's FIN, noted by the router's BPF, proved TIME_WAIT for
            # nearly all of them (handoff/forward_close.py): no lookup.
            assert wait_for(lambda: router.metric_sum("arr_forward_closes_total") >= 94, 5), outcomes
            closes = {r: router.metric_sum("arr_forward_closes_total", result=r)
                      for r in ("proven", "destroyed", "gone", "quarantined", "unknown")}
            assert closes["proven"] >= 90 and closes["quarantined"] == closes["unknown"] == 0, closes


def test_consecutive_requests_to_one_target_reuse_its_connection(cluster):
    c = cluster(targets=2, files={"1k": 1024})
    with handoff_cluster(c, **two_pools(c)) as (router, agents):
        router.wait_healthy()
        conn, port = connect(c)
        for n in range(1, 11):
            status, body = get(conn, "GET", f"/whoami?same={n}")
            assert (status, body) == (200, f"{c.targets[0].name}\n".encode())
        status, _ = get(conn, "GET", f"{c.files['1k'].url_path}?same=11")
        status2, body = get(conn, "GET", "/whoami?same=12")
        assert (status, status2) == (200, 200)
        conn.close()
        # nginx logs a request once it has finished it, which may be after the client read it.
        assert wait_for(lambda: nginx_lines(c, 0, "same=12 "), 3)
        lines = [nginx_lines(c, 0, f"same={n} ")[0] for n in range(1, 11)]
        # Every request handed off (a fallback proxies on a connection of its own).
        assert router.metric_sum("arr_handoff_fallbacks_total") == 0, handoff_outcomes(router, agents)
        # nginx's $connection and $connection_requests: one connection, requests 1..10.
        assert {line.split()[-2] for line in lines} == {lines[0].split()[-2]}, lines
        assert [line.split()[-1] for line in lines] == [str(n) for n in range(1, 11)]
        # After a request to the other pool, the old connection was closed
        # (a FIN: nginx logs no error) and a new one carries request 12.
        twelfth = nginx_lines(c, 0, "same=12 ")[0]
        assert twelfth.split()[-2] != lines[0].split()[-2]
        assert router.metric_sum("arr_requests_total", decision="handoff") == 12  # each decided
        assert router.metric_sum("arr_rehandoffs_total", target="same-target") == 9
        assert router.metric_sum("arr_rehandoffs_total", target="other-target") == 2
        assert "[error]" not in c.nginx_error_log(0)
        # The closed forwarding connections (requests 1 to 10 to t0, 11 to
        # t1; nginx logs the router's port) leave no TIME_WAIT at the router
        # once its hold is over (handoff/forward_close.py): their ports are free.
        closed = {f"{c.router.ip}:{lines[0].split()[1]}", f"{c.router.ip}:{nginx_lines(c, 1, 'same=11 ')[0].split()[1]}"}

        def held() -> set[str]:
            return {line.split()[2] for line in router_time_wait(c)} & closed
        print("\nclosed forwarding ports in TIME_WAIT right after:", held())
        assert wait_for(lambda: not held(), 3), held()


def test_curl_wrk_and_http_client_bodies_and_decisions(cluster):
    c = cluster(targets=2, files={"1k": 1024, "1m": MiB})
    with handoff_cluster(c, **two_pools(c)) as (router, agents):
        router.wait_healthy()
        # curl: several URLs on one connection, both pools.
        urls = [c.files["1k"].url_path, "/whoami", c.files["1m"].url_path, "/whoami", c.files["1k"].url_path]
        curl_one_connection(c, router, urls)
        decided = router.metric_sum("arr_requests_total")
        assert decided == len(urls)
        assert router.metric_sum("arr_takebacks_total", result="ok") == len(urls) - 1

        # wrk keep-alive on each pool: every request decided by the policy.
        for path in (c.files["1k"].url_path, c.files["1m"].url_path, "/whoami"):
            wrk_keep_alive(c, router, path)
        assert router.metric_sum("arr_takebacks_total") == router.metric_sum("arr_takebacks_total", result="ok")

        # http.client: a fresh connection, both pools, bodies checked. Its
        # port may be one wrk used a moment ago: only later log lines count.
        since = router.log_path.stat().st_size
        conn, port = connect(c)
        for n in range(20):
            if n % 2:
                status, body = get(conn, "GET", c.files["1m"].url_path)
                assert status == 200 and hashlib.sha256(body).hexdigest() == c.files["1m"].sha256
            else:
                assert get(conn, "GET", "/whoami") == (200, f"{c.targets[0].name}\n".encode())
        conn.close()
        assert wait_for(lambda: len(access_lines(router, port, since)) == 20, 5), access_lines(router, port, since)


def test_a_hand_on_that_falls_back_is_taken_back(cluster):
    """The new target's agent is gone: handing the request on falls back, and
    the take-back goes on from where the old agent let go. The request is
    proxied from the rebuilt socket, body intact; the old forwarding
    connection, rebuilt, carries the next request for its own target."""
    c = cluster(targets=2, files={"1k": 1024})
    with handoff_cluster(c, **two_pools(c, hand_on=True)) as (router, agents):
        router.wait_healthy()
        conn, port = connect(c)
        assert get(conn, "GET", "/whoami?n=1") == (200, f"{c.targets[0].name}\n".encode())
        agents[1].stop()
        time.sleep(0.3)  # the router hears its control connection end
        status, body = get(conn, "GET", f"{c.files['1k'].url_path}?n=2")
        assert status == 200 and hashlib.sha256(body).hexdigest() == c.files["1k"].sha256
        assert get(conn, "GET", "/whoami?n=3") == (200, f"{c.targets[0].name}\n".encode())
        conn.close()
        outcomes = handoff_outcomes(router, agents)
        assert router.metric_sum("arr_handons_total") == 1 and router.metric_sum(
            "arr_handons_total", result="ok") == 0, outcomes
        assert router.metric_sum("arr_takebacks_total", result="ok") == 1, outcomes
        assert router.metric_sum("arr_takebacks_total") == 1, outcomes
        assert router.metric_sum("arr_requests_total", decision="proxy") == 1, outcomes
        assert router.metric_sum("arr_requests_total", decision="handoff") == 2, outcomes
        assert router.metric_sum("arr_rehandoffs_total", target="same-target") == 1, outcomes
        assert wait_for(lambda: len(access_lines(router, port)) == 3, 5)
        assert [r["decision"] for r in access_lines(router, port)] == ["handoff", "proxy", "handoff"]
        # Request 3 went on t0's connection of request 1 (nginx's $connection).
        assert wait_for(lambda: nginx_lines(c, 0, "n=3 "), 3)
        first, third = nginx_lines(c, 0, "n=1 ")[0], nginx_lines(c, 0, "n=3 ")[0]
        assert first.split()[-2] == third.split()[-2], (first, third)
        assert "[error]" not in c.nginx_error_log(0)


SLOWEST_UNDER_LOSS = 9.0
"""The issue asks for no request slower than 2 s under this loss. TCP alone
does not meet that here: ``python -m benchmarks.loss_tail`` (benchmarks/
RESULTS.md, "Loss tail") sent these requests straight to a target under the
same loss and 2 of 8 runs had one over 2 s (3 of 8, up to 4.1 s, in an
earlier series), through HAProxy 1 of 8. Through arr none of 8 since its own
connections resend within 20 ms and a lost forwarding SYN is raced
(handoff.rto_min, tests/net/test_retransmission_net.py); but in 17 runs of
this test the slowest request still passed 2 s in 2 (2.9 and 3.4 s): the
client's and nginx's own retransmission timers, which are not arr's (before
those changes: 10 of 40 runs, up to 5.6 s). So this bound only guards
against a hang: every request answered within a few retransmission timeouts
(five losses of one segment in a row back off to 6.2 s), under the socket's
10 s timeout."""


@pytest.mark.parametrize("mode", list(MODES))
def test_1000_keep_alive_requests_under_2_percent_loss_each_way(cluster, mode):
    c = cluster(targets=2, files={"64k": 64 * 1024})
    info = c.files["64k"]
    with handoff_cluster(c, **two_pools(c, **MODES[mode])) as (router, agents):
        router.wait_healthy()
        for host in (c.client, *c.targets):
            inject_loss(c, host, 20)
        # The router too: it closes forwarding connections (take-backs to the
        # other pool) and must re-ACK a retransmitted FIN, not reset it.
        watch = CounterWatch(c, (c.client, *c.targets), router=c.router)
        slowest, done = 0.0, 0
        slow: list[tuple[int, float]] = []
        for _ in range(10):
            conn, port = connect(c)
            for n in range(100):
                started = time.monotonic()
                try:
                    if n % 2:
                        status, body = get(conn, "GET", info.url_path)
                        assert status == 200 and hashlib.sha256(body).hexdigest() == info.sha256, n
                    else:
                        assert get(conn, "GET", "/whoami") == (200, f"{c.targets[0].name}\n".encode()), n
                except (OSError, http.client.HTTPException) as exc:
                    raise AssertionError(f"request {n} on client port {port}: {exc!r} after "
                                         f"{time.monotonic() - started:.2f} s; {handoff_outcomes(router, agents)}"
                                         ) from exc
                took = time.monotonic() - started
                slowest = max(slowest, took)
                if took > 0.3:
                    slow.append((n, round(took, 2)))
                done += 1
            conn.close()
        assert done == 1000
        assert slowest < SLOWEST_UNDER_LOSS, (f"a request took {slowest:.2f}s; over 0.3 s: {slow}; " + "; ".join(
            line for line in router.metrics_text().splitlines()
            if line.startswith(("arr_handoff_duration_seconds_bucket", "arr_takeback_duration_seconds_bucket",
                                "arr_forward_pool_total", "arr_handoff_fallbacks_total"))))
        outcomes = "; ".join(line for line in router.metrics_text().splitlines()
                             if line.startswith(("arr_handoff_fallbacks_total", "arr_takebacks_total")))
        assert router.metric_sum("arr_requests_total", decision="handoff") == 1000, outcomes
        # A target's reset of a forward-pool connection closed unused, or
        # of one both sides had closed (an ACK and a FIN that crossed,
        # arr/testbed/capture.py), is reported apart; any other reset fails.
        deltas = watch.assert_clean(explain=lambda: handoff_outcomes(router, agents))
        drops = {h.name: dropped(c, h) for h in (c.client, *c.targets)}
        assert sum(drops.values()) > 100, f"the loss did not happen: {drops}"
        taken = router.metric_sum("arr_takebacks_total", result="ok")
        handed_on = router.metric_sum("arr_handons_total", result="ok")
        assert router.metric_sum("arr_takebacks_total") == taken, outcomes
        if mode == "take-back":
            assert taken == 990, outcomes
        else:  # a hand-on that falls back is taken back: none did here
            assert handed_on == 990 and router.metric_sum("arr_handons_total") == 990 and taken == 0, \
                handoff_outcomes(router, agents)
        retrans = sum(d.get("TcpRetransSegs", 0) for d in deltas.values())
        resets = {host: d.get("TcpOutRsts", 0) for host, d in deltas.items() if d.get("TcpOutRsts")}
        print(f"\n1,000 keep-alive requests under 2% loss each way: resets sent {resets or 'none'}, "
              f"resets of unused connections {watch.empty_resets}, after both closed {watch.closed_resets}, "
              f"drops {drops}, retransmitted segments "
              f"{retrans}, slowest {slowest:.2f}s, over 0.3 s {slow}, take-backs {taken:.0f}, "
              f"handed on {handed_on:.0f}, requests the router resent "
              f"{router.metric_sum('arr_forward_resends_total'):.0f}, "
              f"take-back p99 "
              f"{router.quantile('arr_takeback_duration_seconds', 0.99)}")


def read_response(sock, what: str) -> tuple[int, bytes]:
    """The status and body of one response on a raw keep-alive socket (nginx
    sends Content-Length); WHAT names the request in a failure."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"{what}: the connection ended"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, f"{what}: the connection ended in the answer"
        body += chunk
    return int(head.split()[1]), body


def raw_request(sock, path: str) -> bytes:
    """One GET on a raw keep-alive socket; the body."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: arr.test\r\n\r\n".encode())
    return read_response(sock, f"GET {path}")[1]


def test_least_connections_counts_handed_off_connections(cluster):
    """Twenty idle keep-alive connections handed off to t0 (a pool of its own
    pins them); then twenty new connections through a least-connections pool
    of t0 and t1 all go to t1 until it holds as many."""
    c = cluster(targets=2, files={"1k": 1024})
    sections = {
        "targets": None, "policy": None, "health": None,
        "pools": {"pinned": {"targets": [target_entry(c, 0)]},
                  "lc": {"targets": [target_entry(c, 0), target_entry(c, 1)],
                         "policy": {"kind": "least-connections"}}},
        "default_pool": "lc",
        "rules": [{"path_prefix": "/files/", "pool": "pinned"}],
    }
    held = []
    with handoff_cluster(c, **sections) as (router, agents):
        router.wait_healthy()
        try:
            for _ in range(20):
                sock = client_socket(c)
                assert hashlib.sha256(raw_request(sock, c.files["1k"].url_path)).hexdigest() == c.files["1k"].sha256
                held.append(sock)
            assert wait_for(lambda: router.metric_sum("arr_handed_off_connections") == 20, 5)
            split = {t.name: 0 for t in c.targets}
            for _ in range(20):
                sock = client_socket(c)
                split[raw_request(sock, "/whoami").decode().strip()] += 1
                held.append(sock)  # stays open: load on the target that got it
            print(f"\nleast-connections with 20 handed-off connections on t0: new ones went {split}")
            assert split == {c.targets[0].name: 0, c.targets[1].name: 20}, split
            # Both now hold 20: the next ones alternate.
            more = {t.name: 0 for t in c.targets}
            for _ in range(10):
                sock = client_socket(c)
                more[raw_request(sock, "/whoami").decode().strip()] += 1
                held.append(sock)
            assert abs(more[c.targets[0].name] - more[c.targets[1].name]) <= 2, more
            # The policy placed each of the 50 (the split is its work, not chance).
            assert router.metric_sum("arr_requests_total", decision="handoff") == 50
        finally:
            for sock in held:
                sock.close()
