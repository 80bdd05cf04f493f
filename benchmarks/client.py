"""Small HTTP/1.1 clients run inside the client namespace (``python -m benchmarks.client``).

``ttfb``: N sequential requests, each on a new TCP connection; for each, the time
from ``connect()`` to the connection being established and to the first response
byte, and the whole response; prints one JSON object.

``hold``: opens N connections, sends one keep-alive request on each, reads the
whole response, keeps every connection open; prints one JSON line when all are
open, then waits until stdin closes or it is terminated.

Standard library only, so it starts fast and adds little overhead of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import resource
import socket
import sys
import time
from urllib.parse import urlsplit


def _target(url: str) -> tuple[str, int, str]:
    u = urlsplit(url)
    return u.hostname or "", u.port or 80, (u.path or "/") + (f"?{u.query}" if u.query else "")


def _request(host: str, path: str, close: bool) -> bytes:
    conn = "close" if close else "keep-alive"
    return (f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: arr-bench\r\n"
            f"Connection: {conn}\r\n\r\n").encode()


def _split_head(buf: bytes) -> tuple[int, int, int] | None:
    """(status, content_length, head_end) once the head is complete."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = buf[:end].decode("latin-1").split("\r\n")
    status = int(head[0].split()[1])
    length = -1
    for line in head[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    return status, length, end + 4


def one_request(url: str, timeout: float = 10.0) -> dict:
    host, port, path = _target(url)
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.settimeout(timeout)
    try:
        t0 = time.perf_counter()
        s.connect((host, port))
        t_conn = time.perf_counter()
        s.sendall(_request(host, path, close=True))
        buf = s.recv(65536)
        t_first = time.perf_counter()
        if not buf:
            raise ConnectionError("closed before any response byte")
        parsed = _split_head(buf)
        while parsed is None:
            more = s.recv(65536)
            if not more:
                raise ConnectionError("closed inside the response head")
            buf += more
            parsed = _split_head(buf)
        status, length, head_end = parsed
        body = bytearray(buf[head_end:])
        while length < 0 or len(body) < length:
            more = s.recv(1 << 20)
            if not more:
                break
            body += more
        t_end = time.perf_counter()
    finally:
        s.close()
    return {"status": status, "size": len(body), "sha256": hashlib.sha256(body).hexdigest(),
            "connect": t_conn - t0, "ttfb": t_first - t0, "total": t_end - t0}


def run_ttfb(urls: list[str], n: int, sha256: str | None, pause: float) -> dict:
    connect, ttfb, total = [], [], []
    errors: list[str] = []
    bad = 0
    for i in range(n):
        try:
            r = one_request(urls[i % len(urls)])
        except (OSError, ValueError, IndexError) as e:
            errors.append(repr(e))
            continue
        if r["status"] != 200 or (sha256 and r["sha256"] != sha256):
            bad += 1
            continue
        connect.append(r["connect"])
        ttfb.append(r["ttfb"])
        total.append(r["total"])
        if pause:
            time.sleep(pause)
    return {"n": n, "ok": len(ttfb), "bad": bad, "errors": len(errors), "first_errors": errors[:5],
            "connect": connect, "ttfb": ttfb, "total": total}


async def _hold_one(url: str, sem: asyncio.Semaphore, held: list, errors: list, timeout: float) -> None:
    host, port, path = _target(url)
    async with sem:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
            writer.write(_request(host, path, close=False))
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
            parsed = _split_head(head)
            assert parsed is not None
            status, length, _ = parsed
            await asyncio.wait_for(reader.readexactly(length), timeout)
            if status != 200:
                raise ValueError(f"status {status}")
            held.append(writer)
        except (OSError, ValueError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
            errors.append(repr(e))


async def run_hold(url: str, n: int, concurrency: int, timeout: float) -> None:
    held: list[asyncio.StreamWriter] = []
    errors: list[str] = []
    sem = asyncio.Semaphore(concurrency)
    t0 = time.monotonic()
    await asyncio.gather(*(_hold_one(url, sem, held, errors, timeout) for _ in range(n)))
    print(json.dumps({"opened": len(held), "errors": len(errors), "first_errors": errors[:5],
                      "seconds": time.monotonic() - t0}), flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)  # until stdin closes
    for w in held:
        w.close()


def raise_nofile(want: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(want, hard), max(want, hard)))
        except (ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.client")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("ttfb")
    t.add_argument("--url", action="append", required=True, help="repeat to alternate between URLs")
    t.add_argument("-n", type=int, default=200)
    t.add_argument("--sha256")
    t.add_argument("--pause", type=float, default=0.0)
    h = sub.add_parser("hold")
    h.add_argument("--url", required=True)
    h.add_argument("-n", type=int, default=1000)
    h.add_argument("--concurrency", type=int, default=64)
    h.add_argument("--timeout", type=float, default=30.0)
    a = p.parse_args(argv)
    if a.cmd == "ttfb":
        print(json.dumps(run_ttfb(a.url, a.n, a.sha256, a.pause)))
    else:
        raise_nofile(a.n + 256)
        asyncio.run(run_hold(a.url, a.n, a.concurrency, a.timeout))
    return 0


if __name__ == "__main__":
    sys.exit(main())
