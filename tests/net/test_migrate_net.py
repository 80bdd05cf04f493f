"""Moving handed-off connections between targets (issue 11): ``arr migrate``
live and reset, drain with moves, a target found down.

One pool of t0 (A) and t1 (B), round-robin. Connections are put on A by
draining B while they are opened (then B is enabled again); nginx's
``/whoami`` names the target that served a request.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from arr import netlink
from arr.testbed.router import ROUTER_PORT, handoff_cluster, wait_for

pytestmark = pytest.mark.net

PROJECT_ROOT = Path(__file__).resolve().parents[2]


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


def test_live_migration_moves_idle_connections_without_the_client_noticing(cluster):
    c = cluster(targets=2)
    with handoff_cluster(c) as (router, agents):
        router.wait_healthy()
        conns = on_a(c, router, 20)
        assert wait_for(lambda: router.metric_sum("arr_handed_off_connections") >= 20, 5)
        report = admin(c, router, "migrate", "--from", c.targets[0].name, "--to", c.targets[1].name)
        assert report["selected"] == 20 and report["moved"] == 20, report
        for conn in conns:
            assert conn.get("/whoami") == f"{c.targets[1].name}\n".encode()
        for conn in conns:
            conn.close()


def test_reset_migration_resets_clients_and_they_land_on_b(cluster):
    c = cluster(targets=2)
    with handoff_cluster(c) as (router, agents):
        router.wait_healthy()
        conns = on_a(c, router, 20)
        report = admin(c, router, "migrate", "--from", c.targets[0].name, "--to", c.targets[1].name,
                       "--mode", "reset")
        assert report["selected"] == 20 and report["reset"] == 20, report
        started = time.monotonic()
        for conn in conns:
            conn.sock.settimeout(2)
            with pytest.raises(ConnectionResetError):
                data = conn.sock.recv(100)
                raise AssertionError(f"read {data!r}, not a reset")
        assert time.monotonic() - started < 2
        fresh = KeepAlive(c)
        assert fresh.get("/whoami") == f"{c.targets[1].name}\n".encode()

