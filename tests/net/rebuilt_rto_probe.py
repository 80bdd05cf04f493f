"""Run inside a fresh network namespace (``ip netns exec NS python -m
tests.net.rebuilt_rto_probe MIN_US MAX_MS cached|flushed``): how a socket
rebuilt in repair mode (handoff/rebuild.py) retransmits.

A loopback connection is made, its client side read and closed silently,
and rebuilt from that state with the given RTO bounds; ``cached`` first
closes one ordinary connection to the same address, so that the namespace's
TCP metrics hold an RTT for it (as the router's do for its targets),
``flushed`` empties them (a socket with no RTT sample at all). Then every
packet to the listener is dropped (nftables), the rebuilt socket sends 100
bytes, and the probe prints JSON: the socket's RTO right after the rebuild
and the retransmissions it made in WATCH seconds.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

from handoff import tcpstate
from handoff.rebuild import NO_WSCALE, SocketPlan, rebuild_socket

WATCH = 2.5


def main(min_us: int, max_ms: int, metrics: str) -> dict[str, int]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    if metrics == "cached":
        warm = socket.create_connection(listener.getsockname())
        peer, _ = listener.accept()
        warm.sendall(b"a")
        peer.recv(1)
        peer.sendall(b"b")
        warm.recv(1)
        warm.close()  # the active close saves the RTT (TIME_WAIT)
        peer.close()
    else:
        subprocess.run(["ip", "tcp_metrics", "flush", "all"], check=False, capture_output=True)
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    snd_nxt, rcv_nxt = tcpstate.read_sequence(client, window_probe=False)
    local = client.getsockname()
    tcpstate.close_silently(client)
    rebuilt = rebuild_socket(SocketPlan(
        local=local, remote=listener.getsockname(), snd_nxt=snd_nxt, rcv_nxt=rcv_nxt, mss=1400,
        snd_wscale=NO_WSCALE, rcv_wscale=0, sack=False, timestamps=False, ts_clock=0,
        snd_wnd=65535, snd_wl1=rcv_nxt, rto_min_us=min_us, rto_max_ms=max_ms), window_probe=False)
    rto_after_rebuild = tcpstate.rto_us(rebuilt)
    subprocess.run(["nft", "-f", "-"], check=True, text=True, input=(
        "table inet rto_probe {\n chain incoming {\n  type filter hook input priority 0; policy accept;\n"
        f"  tcp dport {port} drop\n }}\n}}\n"))
    rebuilt.setblocking(True)
    rebuilt.send(b"x" * 100)
    time.sleep(WATCH)
    retransmissions = tcpstate.tcp_info(rebuilt).total_retrans
    for sock in (rebuilt, server, listener):
        sock.close()
    return {"rto_after_rebuild_us": rto_after_rebuild, "retransmissions": retransmissions}


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])))
