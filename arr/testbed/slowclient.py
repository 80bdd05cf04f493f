"""A client that downloads at a set pace: ``python -m arr.testbed.slowclient``.

For tests that need a response in flight for a known time (a drain, a
reload, ``arr conns`` on live entries): curl's ``--limit-rate`` does not hold
a transfer back on this machine (curl 7.88 read 8 MiB "at 1M" in 0.16 s),
so the pace here is the reader's own: a small receive buffer and a sleep
between reads. Prints the status code; writes the body to OUT.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from pathlib import Path

    from arr.testbed.cluster import Cluster

CHUNK = 16 * 1024


def download(url: str, out: str, rate: int) -> int:
    parts = urlsplit(url)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * CHUNK)  # before connect: the window stays small
    sock.connect((parts.hostname, parts.port or 80))
    sock.sendall(f"GET {parts.path or '/'} HTTP/1.1\r\nHost: {parts.netloc}\r\nUser-Agent: arr-slowclient\r\n"
                 "Connection: close\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(CHUNK)
        if not chunk:
            raise ConnectionError("closed before the response head")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")[1:]
                  if line.lower().startswith(b"content-length:"))
    with open(out, "wb") as f:
        f.write(body)
        got = len(body)
        while got < length:
            chunk = sock.recv(CHUNK)
            if not chunk:
                raise ConnectionError(f"closed after {got} of {length} body bytes")
            f.write(chunk)
            got += len(chunk)
            time.sleep(len(chunk) / rate)
    sock.close()
    return status


def start(cluster: "Cluster", url: str, out: "Path", rate: int) -> subprocess.Popen:
    """The slow download in the cluster's client namespace; its stdout is the status."""
    from arr.testbed.router import python_env

    return cluster.popen(cluster.client, [sys.executable, "-m", "arr.testbed.slowclient", url, str(out),
                                          "--rate", str(rate)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=python_env())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m arr.testbed.slowclient", description=__doc__.split("\n")[0])
    p.add_argument("url")
    p.add_argument("out")
    p.add_argument("--rate", type=int, default=1 << 20, help="bytes per second (default 1 MiB/s)")
    args = p.parse_args(argv)
    print(download(args.url, args.out, args.rate))
    return 0


if __name__ == "__main__":
    sys.exit(main())
