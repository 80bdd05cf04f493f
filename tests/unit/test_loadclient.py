"""arr.testbed.loadclient against a tiny HTTP/1.1 server on 127.0.0.1 (no root).

The client runs as the network tests run it, ``python -m
arr.testbed.loadclient``, in a process of its own; the server (a
socketserver thread) records how each connection ended, so each mode is
checked to end its connections the way it says (who sends the FIN, a RST).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parents[2]
SMALL = bytes(range(256)) * 4  # 1 KiB
BIG = hashlib.sha256(b"big").digest() * (8 << 15)  # 8 MiB: more than loopback buffers hold
SMALL_SHA = hashlib.sha256(SMALL).hexdigest()
BIG_SHA = hashlib.sha256(BIG).hexdigest()


class Handler(socketserver.BaseRequestHandler):
    """GET /small, /big, /chunked (SMALL, chunked), /hang (no answer); POST /post
    (answers the SHA-256 of the body it read). Keep-alive unless Connection: close."""

    server: "Server"

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(10)
        self.server.record("connection")
        buffer = b""
        try:
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = sock.recv(65536)
                    if not data:
                        self.server.record("client-eof" if not buffer else "eof-in-head")
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _version = lines[0].split(" ")
                headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
                close = headers.get("connection", "").lower() == "close"
                self.server.record(f"request {method} {path} {'close' if close else 'keep-alive'}")
                if path == "/hang":
                    time.sleep(3)
                    return
                if method == "POST":
                    length = int(headers["content-length"])
                    while len(buffer) < length:
                        data = sock.recv(65536)
                        if not data:
                            self.server.record("eof-in-body")
                            return
                        buffer += data
                    body, buffer = buffer[:length], buffer[length:]
                    self.server.posted.append(body)
                    answer = hashlib.sha256(body).hexdigest().encode()
                    sock.sendall(self._head(len(answer), close) + answer)
                elif path == "/chunked":
                    out = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
                           + (b"Connection: close\r\n" if close else b"") + b"\r\n")
                    for i in range(0, len(SMALL), 300):
                        part = SMALL[i:i + 300]
                        out += b"%x;ext=1\r\n" % len(part) + part + b"\r\n"
                    sock.sendall(out + b"0\r\nX-Trailer: 1\r\n\r\n")
                else:
                    body = BIG if path == "/big" else SMALL
                    sock.sendall(self._head(len(body), close) + body)
                if close:
                    self.server.record("server-close")
                    return
        except (ConnectionResetError, BrokenPipeError):
            self.server.record("reset")
        except socket.timeout:
            self.server.record("server-timeout")

    @staticmethod
    def _head(length: int, close: bool) -> bytes:
        return (b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                b"Content-Length: %d\r\n%s\r\n" % (length, b"Connection: close\r\n" if close else b""))


class Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.events: list[str] = []
        self.posted: list[bytes] = []
        self._lock = threading.Lock()

    def record(self, event: str) -> None:
        with self._lock:
            self.events.append(event)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"

    def wait_events(self, predicate, timeout: float = 5.0) -> Counter:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not predicate(Counter(self.events)):
            time.sleep(0.02)
        return Counter(self.events)


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(5)


def loadclient(*args: str, timeout: float = 60) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cp = subprocess.run([sys.executable, "-m", "arr.testbed.loadclient", *args], capture_output=True,
                        text=True, timeout=timeout, env=env, cwd=ROOT)
    assert cp.returncode == 0, cp.stderr
    return json.loads(cp.stdout)


def test_close_mode_counts_and_sha(server):
    report = loadclient("--url", server.url("/small"), "--count", "40", "--parallel", "4",
                        "--mode", "close", "--sha256", SMALL_SHA)
    assert report["counts"] == {"total": 40, "ok": 40, "failed": 0, "timeouts": 0}, report["errors"]
    assert report["statuses"] == {"200": 40}
    assert report["body_bytes"] == 40 * len(SMALL)
    assert report["ports"]["distinct"] == len(report["ports"]["list"]) >= 4
    assert 0 < report["p50_latency"] <= report["p99_latency"] <= report["max_latency"] < 10
    events = server.wait_events(lambda e: e["server-close"] >= 40)
    assert events["request GET /small close"] == 40
    assert events["server-close"] == 40  # the server ended every connection


def test_client_fin_mode_sends_keep_alive_requests_and_the_first_fin(server):
    report = loadclient("--url", server.url("/small"), "--count", "20", "--parallel", "2",
                        "--mode", "client-fin", "--sha256", SMALL_SHA)
    assert report["counts"] == {"total": 20, "ok": 20, "failed": 0, "timeouts": 0}, report["errors"]
    events = server.wait_events(lambda e: e["client-eof"] >= 20)
    assert events["request GET /small keep-alive"] == 20
    assert events["client-eof"] == 20  # the server read the client's FIN where a next request would be
    assert events["server-close"] == 0


def test_per_connection_sends_several_requests_on_each_connection(server):
    """--per-connection 3 over two URLs: 12 requests on 4 connections, each
    connection's requests alternating between the URLs, the first two
    keep-alive, the last ending the connection as the mode says."""
    for mode, ending in (("close", "server-close"), ("client-fin", "client-eof")):
        server.events.clear()
        report = loadclient("--url", server.url("/small"), "--url", server.url("/chunked"), "--count", "12",
                            "--parallel", "2", "--mode", mode, "--per-connection", "3", "--sha256", SMALL_SHA)
        assert report["counts"] == {"total": 12, "ok": 12, "failed": 0, "timeouts": 0}, (mode, report["errors"])
        assert report["per_connection"] == 3
        events = server.wait_events(lambda e: e[ending] >= 4)
        assert events["connection"] == 4, (mode, events)
        assert events[ending] == 4
        last = "close" if mode == "close" else "keep-alive"
        if mode == "close":
            # indices 0-2, 3-5, ...: /small /chunked /small, then /chunked /small /chunked
            assert events["request GET /small keep-alive"] + events["request GET /chunked keep-alive"] == 8
            assert events[f"request GET /small {last}"] + events[f"request GET /chunked {last}"] == 4
        else:
            assert events["request GET /small keep-alive"] + events["request GET /chunked keep-alive"] == 12
        assert events["request GET /small " + last] >= 2 and events["request GET /chunked " + last] >= 2


def test_per_connection_failure_fails_the_rest_of_the_connection(server):
    """A request that times out mid-connection: the ones after it on that
    connection are not sent, and are counted failed with the reason."""
    report = loadclient("--url", server.url("/small"), "--url", server.url("/hang"), "--count", "3",
                        "--per-connection", "3", "--timeout", "0.5", "--sha256", SMALL_SHA)
    assert report["counts"] == {"total": 3, "ok": 1, "failed": 2, "timeouts": 1}, report
    assert [e["error"] for e in report["errors"]] == [
        "timeout (recv)", "not sent: request 2 of the connection failed"]
    events = server.wait_events(lambda e: e["request GET /hang keep-alive"] >= 1)
    assert events["connection"] == 1 and events["request GET /small close"] == 0


def test_chunked_responses_are_decoded_and_hashed(server):
    for mode in ("close", "client-fin"):
        report = loadclient("--url", server.url("/chunked"), "--count", "5", "--mode", mode,
                            "--sha256", SMALL_SHA)
        assert report["counts"]["ok"] == 5, (mode, report["errors"])


def test_post_mode_sends_the_body(server):
    report = loadclient("--url", server.url("/post"), "--count", "12", "--parallel", "3",
                        "--mode", "post", "--body-size", str(64 * 1024))
    assert report["counts"] == {"total": 12, "ok": 12, "failed": 0, "timeouts": 0}, report["errors"]
    assert [len(b) for b in server.posted] == [64 * 1024] * 12
    assert len(set(server.posted)) == 1
    # The server answers the hash of what it read: --sha256 of that answer
    # checks the whole round trip.
    expected = hashlib.sha256(hashlib.sha256(server.posted[0]).hexdigest().encode()).hexdigest()
    report = loadclient("--url", server.url("/post"), "--count", "3", "--mode", "post",
                        "--body-size", str(64 * 1024), "--sha256", expected)
    assert report["counts"]["ok"] == 3, report["errors"]


def test_body_apart_sends_the_head_then_the_body(server):
    """--body-apart: the same request in two sends (_apart splits it at the
    head's blank line), keep-alive requests included."""
    from arr.testbed.loadclient import _apart, _request_bytes, Target

    head, body = _apart(_request_bytes(Target.parse(server.url("/post"), None), "post", 3000))
    assert head.endswith(b"\r\n\r\n") and head.startswith(b"POST /post ") and len(body) == 3000
    report = loadclient("--url", server.url("/post"), "--count", "6", "--parallel", "2", "--mode", "post",
                        "--body-size", "3000", "--per-connection", "3", "--body-apart")
    assert report["counts"] == {"total": 6, "ok": 6, "failed": 0, "timeouts": 0}, report["errors"]
    assert server.posted == [body] * 6


def test_abort_mode_resets_after_the_first_bytes(server):
    report = loadclient("--url", server.url("/big"), "--count", "8", "--parallel", "2",
                        "--mode", "abort", "--abort-after", "65536")
    assert report["counts"] == {"total": 8, "ok": 8, "failed": 0, "timeouts": 0}, report["errors"]
    assert 8 * 65536 <= report["body_bytes"] < 8 * len(BIG)
    events = server.wait_events(lambda e: e["reset"] >= 8)
    assert events["reset"] == 8  # the server's send met the client's RST
    assert events["server-close"] == 0


def test_abandon_mode_leaves_without_fin_or_rst(server):
    report = loadclient("--url", server.url("/big"), "--count", "4", "--mode", "abandon")
    if os.geteuid() != 0:  # TCP_REPAIR needs CAP_NET_ADMIN: the failure is reported, not raised
        assert report["counts"]["failed"] == 4
        assert all("PermissionError" in e["error"] for e in report["errors"])
        return
    assert report["counts"] == {"total": 4, "ok": 4, "failed": 0, "timeouts": 0}, report["errors"]
    # No FIN reached the server (that would be a client-eof): its next segment met a RST.
    events = server.wait_events(lambda e: e["reset"] >= 4)
    assert events["reset"] == 4 and events["client-eof"] == 0


def test_leaving_modes_end_a_connections_last_request(server):
    """--per-connection with abort and abort-sent: the earlier requests of a
    connection are read whole (keep-alive), the last is left as the mode
    says: reset mid-body, or reset once sent, nothing read."""
    report = loadclient("--url", server.url("/small"), "--url", server.url("/big"), "--count", "8",
                        "--parallel", "2", "--mode", "abort", "--per-connection", "2", "--abort-after", "65536")
    assert report["counts"] == {"total": 8, "ok": 8, "failed": 0, "timeouts": 0}, report["errors"]
    assert 4 * (len(SMALL) + 65536) <= report["body_bytes"] < 4 * (len(SMALL) + len(BIG))
    events = server.wait_events(lambda e: e["reset"] >= 4)
    assert events["request GET /small keep-alive"] == 4 and events["request GET /big close"] == 4
    assert events["reset"] == 4 and events["server-close"] == 0

    server.events.clear()
    report = loadclient("--url", server.url("/small"), "--count", "8", "--parallel", "2",
                        "--mode", "abort-sent", "--per-connection", "2", "--sha256", SMALL_SHA)
    assert report["counts"] == {"total": 8, "ok": 8, "failed": 0, "timeouts": 0}, report["errors"]
    assert report["body_bytes"] == 4 * len(SMALL)  # the first requests' only
    # Each last request arrived whole; the server's answer to it met the
    # client's RST, or went out just before it (then the connection ended
    # as the request asked).
    events = server.wait_events(lambda e: e["reset"] + e["server-close"] >= 4)
    assert events["request GET /small keep-alive"] == 4 and events["request GET /small close"] == 4, events
    assert events["reset"] + events["server-close"] == 4 and events["client-eof"] == 0, events


def test_pipeline_mode_sends_the_next_request_mid_response(server):
    """Mode pipeline: each next request of a connection goes once --abort-after
    bytes of the previous body arrived, while the rest of it is still coming;
    every body is read whole and hashed, in order."""
    report = loadclient("--url", server.url("/big"), "--url", server.url("/small"), "--count", "6",
                        "--parallel", "2", "--mode", "pipeline", "--per-connection", "3", "--abort-after", "65536",
                        "--sha256", BIG_SHA, "--sha256", SMALL_SHA)
    assert report["counts"] == {"total": 6, "ok": 6, "failed": 0, "timeouts": 0}, report["errors"]
    # /big /small /big, then /small /big /small: every body whole.
    assert report["body_bytes"] == 3 * len(BIG) + 3 * len(SMALL)
    events = server.wait_events(lambda e: e["server-close"] >= 2)
    assert events["connection"] == 2 and events["server-close"] == 2
    assert events["request GET /big keep-alive"] + events["request GET /small keep-alive"] == 4


def test_wrong_sha256_counts_as_failed(server):
    report = loadclient("--url", server.url("/small"), "--count", "5", "--mode", "close",
                        "--sha256", "0" * 64)
    assert report["counts"] == {"total": 5, "ok": 0, "failed": 5, "timeouts": 0}
    assert all(e["error"].startswith("sha256 mismatch") for e in report["errors"])


def test_one_sha256_per_url(server):
    report = loadclient("--url", server.url("/small"), "--url", server.url("/big"), "--count", "4",
                        "--mode", "close", "--sha256", SMALL_SHA, "--sha256", BIG_SHA)
    assert report["counts"]["ok"] == 4, report["errors"]
    report = loadclient("--url", server.url("/small"), "--url", server.url("/big"), "--count", "4",
                        "--mode", "close", "--sha256", BIG_SHA, "--sha256", SMALL_SHA)
    assert report["counts"]["failed"] == 4


def test_timeout_is_a_failure_and_counted(server):
    started = time.monotonic()
    report = loadclient("--url", server.url("/hang"), "--count", "2", "--parallel", "2",
                        "--timeout", "0.5")
    assert time.monotonic() - started < 5
    assert report["counts"] == {"total": 2, "ok": 0, "failed": 2, "timeouts": 2}
    assert all(e["error"] == "timeout (recv)" for e in report["errors"])
    assert 0.5 <= report["max_latency"] < 2


def test_connection_refused_is_a_failure():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens on it
    report = loadclient("--url", f"http://127.0.0.1:{port}/", "--count", "3")
    assert report["counts"] == {"total": 3, "ok": 0, "failed": 3, "timeouts": 0}
    assert all("ConnectionRefusedError" in e["error"] for e in report["errors"])


def test_duration_bounds_the_run(server):
    started = time.monotonic()
    report = loadclient("--url", server.url("/small"), "--count", "100000000", "--mode", "close",
                        "--duration", "1", "--sha256", SMALL_SHA)
    assert time.monotonic() - started < 10
    assert 0 < report["counts"]["total"] == report["counts"]["ok"] < 100000000
    assert report["elapsed"] < 3


def test_bad_arguments_are_refused():
    cp = subprocess.run([sys.executable, "-m", "arr.testbed.loadclient", "--url", "https://x/"],
                        capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert cp.returncode == 2 and "only http://" in cp.stderr
    for args, message in ((["--url", "http://127.0.0.1:1/", "--per-connection", "0"], "must be >= 1"),
                          (["--url", "http://127.0.0.1:1/", "--body-apart"], "needs mode post"),
                          (["--url", "http://127.0.0.1:1/", "--url", "http://127.0.0.1:2/", "--per-connection", "2"],
                           "one host and port")):
        cp = subprocess.run([sys.executable, "-m", "arr.testbed.loadclient", *args],
                            capture_output=True, text=True, cwd=ROOT, timeout=30)
        assert cp.returncode == 2 and message in cp.stderr, (args, cp.stderr)
