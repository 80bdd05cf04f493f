"""A small HTTP/1.1 load client for the test bed: real sockets, every body hashed.

Run it inside the client namespace of a cluster::

    cluster.exec(cluster.client, [sys.executable, "-m", "arr.testbed.loadclient",
                                  "--url", url, "--count", "5000", "--parallel", "4",
                                  "--mode", "close", "--sha256", sha], env=...)

It makes ``--count`` requests (or stops after ``--duration`` seconds) on
``--parallel`` threads, each request on a connection of its own, ended the
way ``--mode`` says:

* ``close``: ``Connection: close``; read to EOF (the server closes first, so
  the client's port is reusable at once: the fast-reconnect pattern).
* ``client-fin``: keep-alive request; read exactly the body, then
  ``shutdown(SHUT_WR)`` (the client's FIN comes first), read to EOF.
* ``abort``: read the status line and ``--abort-after`` body bytes, then close
  with ``SO_LINGER {1, 0}`` (the client sends a RST).
* ``abandon``: like abort, but the socket is put in TCP repair mode before the
  close, so the client's kernel forgets it without a FIN or a RST; it answers
  the server's next segment with a RST (needs CAP_NET_ADMIN). A small receive
  buffer (``--rcvbuf``, 64 KiB unless given) keeps a large response from
  arriving whole before that: the server must still have segments to send.
* ``abort-sent``: send the request and close at once with a RST, reading
  nothing: the client is gone while the server (or a router taking the
  connection back) is still busy with its request. Counted ok once sent.
* ``pipeline``: as ``close``, but with ``--per-connection K`` each request
  after the first is sent once ``--abort-after`` bytes of the previous
  response's body have arrived (or all of it, if less): HTTP/1.1
  pipelining, the next request on its way while a response still is.
* ``post``: a POST of ``--body-size`` bytes (Content-Length), ``Connection:
  close``, read to EOF.
  With ``--body-apart`` the head and the body go in two sends on a
  ``TCP_NODELAY`` socket, as Python's http.client writes a request (under
  requests and urllib3, which set NODELAY): two segments back to back.

With ``--per-connection K`` a connection carries K requests, one after
another (the next sent once the previous response is read): the first K-1
keep-alive and read whole, the last ended as the mode says (abort, abandon
and abort-sent: the client leaves a connection whose earlier requests a
router may have handed off and taken back).
Consecutive requests go round-robin over the URLs, so a connection's requests
alternate between them (which must then share one host and port): the short
keep-alive connections of browsers and API clients, each request of which a
router must route.

It prints one JSON object: counts (total, ok, failed, timeouts), latencies,
the first errors and the local ports used. Standard library only, and it
only ever connects to the URLs it is given.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import socket
import struct
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit

MODES = ("close", "client-fin", "abort", "abandon", "abort-sent", "pipeline", "post")
TCP_REPAIR = 19  # linux/tcp.h
RECV_CHUNK = 256 * 1024
MAX_HEAD = 64 * 1024
ERRORS_KEPT = 10


class Failure(Exception):
    """One request failed for the reason given (a short, countable string)."""


class Timeout(Failure):
    def __init__(self, what: str = "") -> None:
        super().__init__("timeout" + (f" ({what})" if what else ""))


@dataclass(frozen=True)
class Target:
    url: str
    host: str
    port: int
    path: str
    sha256: str | None

    @classmethod
    def parse(cls, url: str, sha256: str | None) -> "Target":
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"only http://host[:port]/path URLs, not {url!r}")
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        return cls(url, parts.hostname, parts.port or 80, path, sha256.lower() if sha256 else None)

    @property
    def host_header(self) -> str:
        return self.host if self.port == 80 else f"{self.host}:{self.port}"


@dataclass
class Result:
    index: int
    url: str
    ok: bool = False
    status: int = 0
    latency: float = 0.0
    error: str = ""
    port: int | None = None
    body_bytes: int = 0
    timeout: bool = False


@dataclass
class Options:
    targets: list[Target]
    mode: str = "close"
    count: int = 1
    parallel: int = 1
    timeout: float = 10.0
    duration: float | None = None
    abort_after: int = 65536
    body_size: int = 65536
    rcvbuf: int | None = None
    per_connection: int = 1
    body_apart: bool = False
    """Mode post: the head and the body in two sends, TCP_NODELAY."""


# --------------------------------------------------------------- one request


class Response:
    """Reads one HTTP/1.1 response from a socket, hashing the body."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()
        self.eof = False
        self.status = 0
        self.headers: dict[str, str] = {}
        self.length: int | None = None
        self.chunked = False
        self.hash = hashlib.sha256()
        self.body_bytes = 0

    def _fill(self) -> bool:
        """Read more into the buffer; False at EOF."""
        if self.eof:
            return False
        try:
            data = self.sock.recv(RECV_CHUNK)
        except socket.timeout:
            raise Timeout("recv") from None
        if not data:
            self.eof = True
            return False
        self.buffer += data
        return True

    def read_head(self) -> None:
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end >= 0:
                break
            if len(self.buffer) > MAX_HEAD:
                raise Failure("response head too large")
            if not self._fill():
                raise Failure("EOF before the response head" if not self.buffer
                              else "EOF inside the response head")
        head = bytes(self.buffer[:end]).decode("latin-1")
        del self.buffer[:end + 4]
        lines = head.split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise Failure(f"bad status line {lines[0][:60]!r}")
        self.status = int(parts[1])
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise Failure(f"bad header line {line[:60]!r}")
            self.headers[name.strip().lower()] = value.strip()
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            self.chunked = True
        elif "content-length" in self.headers:
            try:
                self.length = int(self.headers["content-length"])
            except ValueError:
                raise Failure("bad Content-Length") from None
        if 100 <= self.status < 200:  # an interim response: the real one follows
            self.status, self.headers, self.length, self.chunked = 0, {}, None, False
            self.read_head()

    def _take(self, limit: int) -> int:
        """Hash up to LIMIT bytes of the buffer (reading if empty); 0 at EOF."""
        if not self.buffer and not self._fill():
            return 0
        n = min(limit, len(self.buffer))
        self.hash.update(memoryview(self.buffer)[:n])
        del self.buffer[:n]
        self.body_bytes += n
        return n

    def read_body(self, at_least: int | None = None) -> None:
        """The whole body (or, with AT_LEAST, stop once that many bytes arrived)."""
        want = lambda: at_least is not None and self.body_bytes >= at_least  # noqa: E731
        if self.chunked:
            self._read_chunked(want)
        elif self.length is not None:
            while self.body_bytes < self.length and not want():
                if not self._take(self.length - self.body_bytes):
                    raise Failure(f"EOF after {self.body_bytes} of {self.length} body bytes")
        else:  # delimited by EOF
            while not want() and self._take(1 << 62):
                pass

    def _line(self) -> bytes:
        while True:
            end = self.buffer.find(b"\r\n")
            if end >= 0:
                line = bytes(self.buffer[:end])
                del self.buffer[:end + 2]
                return line
            if len(self.buffer) > MAX_HEAD or not self._fill():
                raise Failure("bad chunked body")

    def _read_chunked(self, want) -> None:
        while not want():
            try:
                size = int(self._line().split(b";")[0].strip(), 16)
            except ValueError:
                raise Failure("bad chunk size") from None
            if size == 0:
                while self._line():  # trailers up to the empty line
                    pass
                return
            left = size
            while left:
                n = self._take(left)
                if not n:
                    raise Failure("EOF inside a chunk")
                left -= n
            if self._line() != b"":
                raise Failure("bad chunk end")

    @property
    def complete(self) -> bool:
        return self.length is not None and self.body_bytes >= self.length

    def expect_eof(self) -> None:
        """Nothing more may come but EOF."""
        if self.buffer:
            raise Failure(f"{len(self.buffer)} bytes after the response")
        if self._fill():
            raise Failure(f"{len(self.buffer)} bytes after the response")


def _request_bytes(target: Target, mode: str, body_size: int, last: bool = True) -> bytes:
    """The request as MODE sends it; not LAST: a keep-alive one, more follow on its connection."""
    lines = [f"{'POST' if mode == 'post' else 'GET'} {target.path} HTTP/1.1",
             f"Host: {target.host_header}", "User-Agent: arr-loadclient", "Accept: */*"]
    if mode == "post":
        lines += [f"Content-Length: {body_size}", "Content-Type: application/octet-stream"]
    if last and mode != "client-fin":  # client-fin is keep-alive: the client ends the connection
        lines.append("Connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode()
    if mode == "post":
        pattern = bytes(range(256))
        head += (pattern * (body_size // 256 + 1))[:body_size]
    return head


def _apart(payload: bytes) -> tuple[bytes, bytes]:
    """A request's head (up to its blank line) and its body."""
    end = payload.index(b"\r\n\r\n") + 4
    return payload[:end], payload[end:]


def _vanish(sock: socket.socket) -> None:
    """Close without a FIN or a RST: in repair mode the kernel just forgets the socket."""
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
    sock.close()


def _reset(sock: socket.socket) -> None:
    """Close with a RST (SO_LINGER {1, 0}), whatever is queued either way."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def one_request(index: int, target: Target, opts: Options, payload: bytes) -> Result:
    return one_connection([(index, target, payload)], opts)[0]


def one_connection(requests: list[tuple[int, Target, bytes]], opts: Options) -> list[Result]:
    """REQUESTS (index, target, request bytes) on one connection to the first
    target's address, one after another; a Result for each. The last ends the
    connection as the mode says; after a failure the rest are not sent and
    fail with the reason."""
    results = [Result(index=index, url=target.url) for index, target, _ in requests]
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ended = False
    leftover = bytearray()
    current = 0
    started = time.monotonic()
    try:
        sock.settimeout(opts.timeout)
        if opts.rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, opts.rcvbuf)
        if opts.body_apart:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        first = requests[0][1]
        try:
            sock.connect((first.host, first.port))
        except socket.timeout:
            raise Timeout("connect") from None
        port = sock.getsockname()[1]
        sent_ahead = False
        for current, (_, target, payload) in enumerate(requests):
            result = results[current]
            result.port = port
            if current:
                started = time.monotonic()
            last = current == len(requests) - 1
            following = requests[current + 1][2] if opts.mode == "pipeline" and not last else None
            ended = _exchange(sock, target, opts, None if sent_ahead else payload, result, leftover, last,
                              following)
            sent_ahead = following is not None
            result.latency = time.monotonic() - started
            if not result.ok:
                break
        return results
    except Failure as exc:
        result = results[current]
        result.error, result.timeout = str(exc), isinstance(exc, Timeout)
        result.latency = time.monotonic() - started
        return results
    except OSError as exc:
        result = results[current]
        result.error = f"{type(exc).__name__}: {exc.strerror or exc}"
        result.latency = time.monotonic() - started
        return results
    finally:
        for result in results[current + 1:]:
            result.error = f"not sent: request {current + 1} of the connection failed"
        if not ended:
            sock.close()


def _exchange(sock: socket.socket, target: Target, opts: Options, payload: bytes | None, result: Result,
              leftover: bytearray, last: bool, following: bytes | None = None) -> bool:
    """Send one request on SOCK (PAYLOAD; None: it was sent already) and read
    its response into RESULT (LEFTOVER: bytes read past the previous
    response, none expected); FOLLOWING, the next request, goes once
    ``abort_after`` bytes of this body arrived (mode pipeline). True if the
    socket was closed here (the LAST request of a leaving mode)."""
    try:
        if payload is None:
            pass
        elif opts.body_apart:
            head, body = _apart(payload)
            sock.sendall(head)
            sock.sendall(body)
        else:
            sock.sendall(payload)
    except socket.timeout:
        raise Timeout("send") from None
    mode = opts.mode
    if last and mode == "abort-sent":
        _reset(sock)
        result.ok = True
        return True
    response = Response(sock)
    response.buffer = leftover
    response.read_head()
    result.status = response.status
    if last and mode in ("abort", "abandon"):
        want = opts.abort_after if response.length is None else min(opts.abort_after, response.length)
        response.read_body(at_least=want)
        result.body_bytes = response.body_bytes
        if response.body_bytes < want:
            raise Failure(f"EOF after {response.body_bytes} of {want} body bytes")
        if mode == "abort":
            _reset(sock)
        else:
            _vanish(sock)
        result.ok = response.status == 200
        if not result.ok:
            result.error = f"status {response.status}"
        return True
    if following is not None:
        response.read_body(at_least=opts.abort_after)
        try:
            sock.sendall(following)
        except socket.timeout:
            raise Timeout("send") from None
    response.read_body()
    result.body_bytes = response.body_bytes
    if not last or mode == "client-fin":
        if not (response.complete or response.chunked):
            raise Failure("keep-alive response without a length")
    if last:
        if mode == "client-fin":
            sock.shutdown(socket.SHUT_WR)
        response.expect_eof()
    elif response.buffer and following is None:  # pipelined: the next response's start
        raise Failure(f"{len(response.buffer)} bytes after the response")
    digest = response.hash.hexdigest()
    if response.status != 200:
        result.error = f"status {response.status}"
    elif target.sha256 and digest != target.sha256:
        result.error = f"sha256 mismatch ({response.body_bytes} bytes, {digest[:12]})"
    else:
        result.ok = True
    return False


# ----------------------------------------------------------------- the load


@dataclass
class Run:
    opts: Options
    results: list[Result] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    issued: int = 0
    started: float = 0.0
    elapsed: float = 0.0

    def _next(self) -> range | None:
        """The indices of the next connection's requests (None: the run is over)."""
        with self.lock:
            if self.issued >= self.opts.count:
                return None
            if self.opts.duration is not None and time.monotonic() - self.started >= self.opts.duration:
                return None
            first = self.issued
            self.issued = min(self.opts.count, first + self.opts.per_connection)
            return range(first, self.issued)

    def _worker(self, payloads: dict[bool, list[bytes]]) -> None:
        targets = self.opts.targets
        mine: list[Result] = []
        try:
            while (indices := self._next()) is not None:
                mine.extend(one_connection([(index, targets[index % len(targets)],
                                             payloads[index == indices[-1]][index % len(targets)])
                                            for index in indices], self.opts))
        finally:
            with self.lock:
                self.results.extend(mine)

    def run(self) -> "Run":
        # payloads[last]: a connection's last request ends it as the mode says, the others keep it open
        payloads = {last: [_request_bytes(t, self.opts.mode, self.opts.body_size, last) for t in self.opts.targets]
                    for last in (False, True)}
        self.started = time.monotonic()
        threads = [threading.Thread(target=self._worker, args=(payloads,), daemon=True)
                   for _ in range(max(1, self.opts.parallel))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.elapsed = time.monotonic() - self.started
        self.results.sort(key=lambda r: r.index)
        return self

    def report(self) -> dict:
        results = self.results
        latencies = sorted(r.latency for r in results)
        failed = [r for r in results if not r.ok]
        ports = sorted({r.port for r in results if r.port is not None})
        return {
            "mode": self.opts.mode,
            "per_connection": self.opts.per_connection,
            "urls": [t.url for t in self.opts.targets],
            "counts": {"total": len(results), "ok": len(results) - len(failed), "failed": len(failed),
                       "timeouts": sum(1 for r in results if r.timeout)},
            "elapsed": round(self.elapsed, 3),
            "rps": round(len(results) / self.elapsed, 1) if self.elapsed > 0 else 0.0,
            "max_latency": round(latencies[-1], 6) if latencies else 0.0,
            "p50_latency": round(_quantile(latencies, 0.50), 6),
            "p99_latency": round(_quantile(latencies, 0.99), 6),
            "statuses": {str(k): v for k, v in sorted(Counter(r.status for r in results).items())},
            "body_bytes": sum(r.body_bytes for r in results),
            "errors": [{"index": r.index, "port": r.port, "error": r.error, "latency": round(r.latency, 4)}
                       for r in failed[:ERRORS_KEPT]],
            "error_counts": dict(Counter(r.error for r in failed).most_common(20)),
            "ports": {"distinct": len(ports), "min": ports[0] if ports else None,
                      "max": ports[-1] if ports else None, "list": ports},
        }


def _quantile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank quantile (0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


# ---------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> Options:
    p = argparse.ArgumentParser(prog="python -m arr.testbed.loadclient", description=__doc__.split("\n")[0])
    p.add_argument("--url", action="append", required=True,
                   help="http://ip:port/path (repeatable: requests go round-robin over them)")
    p.add_argument("--count", type=int, default=1, help="total requests (default 1)")
    p.add_argument("--parallel", type=int, default=1, help="threads, one connection each at a time")
    p.add_argument("--mode", choices=MODES, default="close")
    p.add_argument("--sha256", action="append", default=[],
                   help="expected body SHA-256: one for every URL, or one per --url in order")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds, for connect and each recv")
    p.add_argument("--duration", type=float, default=None, help="stop issuing requests after this")
    p.add_argument("--abort-after", type=int, default=65536,
                   help="body bytes read before abort/abandon, or before the next request (pipeline)")
    p.add_argument("--body-size", type=int, default=65536, help="POST body bytes (mode post)")
    p.add_argument("--per-connection", type=int, default=1, metavar="K",
                   help="requests per connection, round-robin over the URLs; the last ends it as --mode says")
    p.add_argument("--body-apart", action="store_true",
                   help="mode post: the head and the body in two sends, TCP_NODELAY (as http.client)")
    p.add_argument("--rcvbuf", type=int, default=None,
                   help="SO_RCVBUF before connect (default: the kernel's; abandon: 65536, so that "
                        "a large response is still being sent when the client vanishes)")
    a = p.parse_args(argv)
    if a.sha256 and len(a.sha256) not in (1, len(a.url)):
        p.error("give --sha256 once, or once per --url")
    if a.count < 0 or a.parallel < 1 or a.timeout <= 0 or a.abort_after < 0 or a.body_size < 0:
        p.error("counts must be >= 0, --parallel >= 1, --timeout > 0")
    if a.per_connection < 1:
        p.error("--per-connection must be >= 1")
    if a.body_apart and a.mode != "post":
        p.error("--body-apart needs mode post")
    shas = a.sha256 * len(a.url) if len(a.sha256) == 1 else (a.sha256 or [None] * len(a.url))
    try:
        targets = [Target.parse(u, s) for u, s in zip(a.url, shas)]
    except ValueError as exc:
        p.error(str(exc))
    if a.per_connection > 1 and len({(t.host, t.port) for t in targets}) > 1:
        p.error("--per-connection sends every URL of a connection to one address: give URLs of one host and port")
    return Options(targets=targets, mode=a.mode, count=a.count, parallel=a.parallel, timeout=a.timeout,
                   duration=a.duration, abort_after=a.abort_after, body_size=a.body_size,
                   per_connection=a.per_connection, body_apart=a.body_apart,
                   rcvbuf=a.rcvbuf if a.rcvbuf is not None else (65536 if a.mode == "abandon" else None))


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    report = Run(opts).run().report()
    json.dump(report, sys.stdout, separators=(",", ":"))
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
