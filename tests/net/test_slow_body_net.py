"""Slow bodies cannot hold the router's connections: issue 13's acceptance.

200 clients each announce a large POST body and send one byte every 2 s
(each gap far under body_timeout, which alone never fires): the minimum body
rate cuts them. 50 more send steadily above the rate but would take minutes:
the body deadline cuts them. Meanwhile new clients download through the
router (SHA-256 checked, each decided by the router), and nothing of a cut
request reaches a target.
"""

from __future__ import annotations

import selectors
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest

from arr import netlink
from arr.testbed import Cluster
from arr.testbed.router import ROUTER_PORT, RouterProcess, default_config

pytestmark = pytest.mark.net

TRICKLERS = 200   # one byte every TRICKLE_GAP: below min_body_rate
STEADY = 50       # STEADY_BYTES every STEADY_GAP: above the rate, beyond the deadline
TRICKLE_GAP = 2.0
STEADY_GAP, STEADY_BYTES = 0.5, 100
LIMITS = {"body_deadline": 3.0, "min_body_rate": 64, "body_rate_grace": 1.0, "body_timeout": 30.0}
HEAD = (b"POST /files/1k HTTP/1.1\r\nHost: slow.example\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Length: 10000000\r\n\r\n")


@dataclass
class SlowClient:
    sock: socket.socket
    gap: float
    size: int
    started: float
    next_send: float
    answer: bytes = b""
    ended: float | None = None
    sent: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def status(self) -> int | None:
        if self.answer.startswith(b"HTTP/1.1 ") and len(self.answer) >= 12:
            return int(self.answer[9:12])
        return None


def open_slow_clients(cluster: Cluster, count: int, gap: float, size: int) -> list[SlowClient]:
    clients = []
    for _ in range(count):
        sock = netlink.socket_in_netns(cluster.client.ns)
        try:
            sock.settimeout(5)
            sock.connect((cluster.vip, ROUTER_PORT))
            sock.sendall(HEAD + b"x" * size)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        now = time.monotonic()
        clients.append(SlowClient(sock, gap, size, now, now + gap, sent=size))
    return clients


def drive(clients: list[SlowClient], until: float) -> None:
    """Keep every client sending at its pace and collect what the router
    answers, until each is cut (answer or close) or UNTIL passes."""
    selector = selectors.DefaultSelector()
    for client in clients:
        selector.register(client.sock, selectors.EVENT_READ, client)
    try:
        while selector.get_map() and time.monotonic() < until:
            for key, _ in selector.select(timeout=0.05):
                client = key.data
                try:
                    data = client.sock.recv(4096)
                except (ConnectionError, OSError):
                    data = b""
                client.answer += data
                if not data:
                    client.ended = time.monotonic()
                    selector.unregister(client.sock)
            now = time.monotonic()
            for key in list(selector.get_map().values()):
                client = key.data
                if now >= client.next_send:
                    client.next_send += client.gap
                    try:
                        client.sock.send(b"y" * client.size)
                        client.sent += client.size
                    except BlockingIOError:
                        pass
                    except (ConnectionError, OSError) as exc:  # cut while we wrote: fine
                        client.errors.append(type(exc).__name__)
    finally:
        selector.close()


def test_slow_bodies_are_cut_while_new_clients_are_served(cluster):
    c = cluster(targets=2, files={"1m": 1 << 20})
    config = default_config(c, "proxy", limits=LIMITS)
    slow: list[SlowClient] = []
    try:
        with RouterProcess(c, config) as router, ThreadPoolExecutor(max_workers=4) as pool:
            router.wait_healthy()
            decided_before = router.metric_sum("arr_requests_total", decision="proxy", status="200")
            started = time.monotonic()
            slow = open_slow_clients(c, TRICKLERS, TRICKLE_GAP, 1) + \
                open_slow_clients(c, STEADY, STEADY_GAP, STEADY_BYTES)
            opened = time.monotonic() - started
            info = c.files["1m"]
            downloads = [pool.submit(c.curl, router.url + info.url_path, None, timeout=30) for _ in range(12)]
            drive(slow, until=time.monotonic() + LIMITS["body_deadline"] + 10)
            results = [d.result() for d in downloads]

            # Every slow client was cut: a 408, or at least the connection closed.
            lasted = [client.ended - client.started for client in slow if client.ended is not None]
            assert len(lasted) == len(slow), f"{len(slow) - len(lasted)} slow clients still connected"
            statuses = {client.status for client in slow}
            assert statuses <= {408, None}, statuses
            answered = sum(client.status == 408 for client in slow)
            assert answered >= 0.9 * len(slow)
            # ... soon: the tricklers after the grace, the steady ones at the deadline.
            tricklers, steady = slow[:TRICKLERS], slow[TRICKLERS:]
            assert max(t.ended - t.started for t in tricklers) < LIMITS["body_rate_grace"] + 2.0 + opened
            assert all(s.ended - s.started >= LIMITS["body_deadline"] * 0.9 for s in steady)
            assert max(s.ended - s.started for s in steady) < LIMITS["body_deadline"] + 2.0 + opened
            assert router.metric_sum("arr_client_errors_total", reason="body-too-slow",
                                     status="408") == TRICKLERS
            assert router.metric_sum("arr_client_errors_total", reason="body-deadline",
                                     status="408") == STEADY

            # New clients were served meanwhile, byte-exact, decided by the router.
            assert [r.status for r in results] == [200] * len(results)
            assert all(r.sha256 == info.sha256 for r in results)
            decided = router.metric_sum("arr_requests_total", decision="proxy", status="200") - decided_before
            assert decided == len(results)
            fresh = c.curl(router.url + info.url_path)
            assert fresh.status == 200 and fresh.sha256 == info.sha256
            # Nothing of a cut request reached a target.
            assert not [line for i in range(2) for line in c.nginx_log(i) if "POST" in line]
            assert router.proc is not None and router.proc.poll() is None
    finally:
        for client in slow:
            client.sock.close()
