"""``handoff.reuse_forward``: a taken-back connection's old forwarding
connection goes back to the forward pool (handoff/forward_pool.py
``give_back``) instead of closing with a FIN, and the next handoff to its
target, another client's as well, takes it instead of connecting.

What the target sees is one keep-alive connection carrying requests one after
the other: nginx's ``$connection_requests`` counts on across clients, and it
logs no error and no reset. The pools, rules and clients are those of
tests/net/test_takeback_net.py.
"""

from __future__ import annotations

import hashlib

import pytest

from arr.testbed.loss import CounterWatch
from arr.testbed.router import handoff_cluster, handoff_outcomes, wait_for

from test_takeback_net import MiB, access_lines, connect, get, nginx_lines, two_pools

pytestmark = pytest.mark.net


def reuse_pools(c, *, hand_on: bool, depth: int | None = None) -> dict:
    sections = two_pools(c, hand_on=hand_on, reuse=True)
    if depth is not None:
        sections["handoff"]["forward_pool"] = depth
    return sections


def connection_of(line: str) -> tuple[str, int]:
    """nginx's ``$connection`` and ``$connection_requests`` (arr/testbed/nginx.py LOG_FORMAT)."""
    fields = line.split()
    return fields[-2], int(fields[-1])


@pytest.mark.parametrize("hand_on", [False, True], ids=["take-back", "hand-on"])
def test_one_keep_alive_connection_across_two_pools_reuses_the_targets_connections(cluster, hand_on):
    """60 requests of one keep-alive connection alternating between the pools
    (a refused DELETE among them): each decided and answered right, while the
    targets see a handful of connections, not one per switch."""
    c = cluster(targets=2, files={"1k": 1024, "1m": MiB})
    with handoff_cluster(c, **reuse_pools(c, hand_on=hand_on)) as (router, agents):
        router.wait_healthy()
        watch = CounterWatch(c, (c.client, *c.targets))
        conn, port = connect(c)
        expected = []
        for n in range(1, 61):
            if n == 30:
                assert get(conn, "DELETE", f"/files/1k?n={n}")[0] == 405
                expected.append("reject")
            elif n % 2:
                assert get(conn, "GET", f"/whoami?n={n}") == (200, f"{c.targets[0].name}\n".encode()), n
                expected.append("handoff")
            else:
                name = "1m" if n % 10 == 0 else "1k"
                status, body = get(conn, "GET", f"{c.files[name].url_path}?n={n}")
                assert status == 200 and hashlib.sha256(body).hexdigest() == c.files[name].sha256, n
                expected.append("handoff")
        conn.close()
        outcomes = handoff_outcomes(router, agents)
        assert wait_for(lambda: len(access_lines(router, port)) == 60, 5), len(access_lines(router, port))
        assert [r["decision"] for r in access_lines(router, port)] == expected
        assert router.metric_sum("arr_handoff_fallbacks_total") == 0, outcomes
        assert wait_for(lambda: nginx_lines(c, 0, "n=59 "), 3)
        # Each handed-off request once, at its own target.
        per_target: list[set[str]] = [set(), set()]
        for n, decision in enumerate(expected, start=1):
            target = 0 if n % 2 else 1
            lines = nginx_lines(c, target, f"n={n} ")
            if decision == "reject":
                assert not lines and not nginx_lines(c, 1 - target, f"n={n} "), n
                continue
            assert len(lines) == 1 and not nginx_lines(c, 1 - target, f"n={n} "), (n, lines)
            per_target[target].add(connection_of(lines[0])[0])
        # Every switch gave the old connection back (57 switches; the refused
        # request's take-back gave its own back too, through Router.forget),
        # and the handoffs took from the pool.
        returned = router.metric_sum("arr_forward_pool_total", result="returned")
        print(f"\nreuse_forward, {'hand-on' if hand_on else 'take-back'}: "
              f"nginx connections per target {[len(s) for s in per_target]}, pool "
              + ", ".join(f"{result} {router.metric_sum('arr_forward_pool_total', result=result):.0f}"
                          for result in ("hit", "miss", "stale", "returned", "full")))
        assert returned >= 55, outcomes
        assert router.metric_sum("arr_forward_pool_total", result="full") == 0
        # Without reuse each of the 29 switches to a target is a new connection
        # there; with it a few circulate (the shelf's depth, 4, plus the one in use).
        assert all(1 <= len(s) <= 6 for s in per_target), per_target
        # No segment resent anywhere, no connection reset.
        deltas = watch.assert_clean(explain=lambda: outcomes)
        resent = {host: (d.get("TcpRetransSegs", 0), d.get("TcpExtTCPLossProbes", 0)) for host, d in deltas.items()}
        print(f"(resent, loss probes) {resent}")
        # No target probed for the ACK of the response before a move (4 or 5
        # loss probes a target here until the router acknowledged it when the
        # connection went idle: handoff/takeback.py ``_rebuild_forward``).
        # (A fast retransmission can happen: a warm connection's 64 KiB
        # bursts are now and then reordered across the two CPUs' veth
        # backlogs, seen once in seven runs, 45 segments of a 1 MiB response.)
        assert all(probes == 0 for _, probes in resent.values()), (resent, outcomes)
        # No FIN yet for those still on their shelf, and nothing abnormal at nginx.
        for i in range(2):
            log = c.nginx_error_log(i)
            assert "[error]" not in log and "reset by peer" not in log and "timed out" not in log, log


def test_a_connection_given_back_serves_the_next_client(cluster):
    """Client A's download from t1, then its request to t0: A's connection at
    t1 goes back to the pool. New clients' downloads from t1 then take it, so
    one of them is request 2 of that nginx connection, from another client
    port, its body's SHA-256 intact. With the pool one deep: the shelf holds
    the refill's connection and A's, and they are taken oldest first.

    And the new client's download goes within its own window. Over A's
    download the server's idea of its peer's window grew to megabytes (A's,
    translated), and the next client's request could not make it smaller
    (handoff/rebuild.py ``parked_acks``): the server sent its first flight
    into A's window, the new client dropped what lay past its own
    (``TcpExtBeyondWindow``), and the server resent it at its RTO, 210 ms
    later, on every download that took A's connection."""
    c = cluster(targets=2, files={"1m": MiB})
    with handoff_cluster(c, **reuse_pools(c, hand_on=True, depth=1)) as (router, agents):
        router.wait_healthy()
        file = c.files["1m"]
        watch = CounterWatch(c, (c.client, *c.targets))
        conn, port_a = connect(c)
        status, body = get(conn, "GET", f"{file.url_path}?client=a")
        assert status == 200 and hashlib.sha256(body).hexdigest() == file.sha256
        assert get(conn, "GET", "/whoami?client=a") == (200, f"{c.targets[0].name}\n".encode())
        assert wait_for(lambda: router.metric_sum("arr_forward_pool_total", result="returned") == 1, 2), \
            handoff_outcomes(router, agents)
        others = []
        for n in range(3):  # well within the 0.9 s a shelved connection is kept
            other, port = connect(c)
            status, body = get(other, "GET", f"{file.url_path}?client={n}")
            assert status == 200 and hashlib.sha256(body).hexdigest() == file.sha256, n
            other.close()
            others.append(port)
        conn.close()
        assert wait_for(lambda: nginx_lines(c, 1, "client=2 "), 3)
        a_connection, a_requests = connection_of(nginx_lines(c, 1, "client=a ")[0])
        assert a_requests == 1
        later = [connection_of(nginx_lines(c, 1, f"client={n} ")[0]) for n in range(3)]
        assert (a_connection, 2) in later, (a_connection, later)
        # Each of those requests was decided by the router, for its own client
        # (its access-log line may land a moment after the response).
        for port in others:
            assert wait_for(lambda: [r["decision"] for r in access_lines(router, port)] == ["handoff"], 5), \
                (port, access_lines(router, port))
        assert wait_for(lambda: [r["decision"] for r in access_lines(router, port_a)] == ["handoff"] * 2, 5)
        assert router.metric_sum("arr_handons_total", result="ok") == 1
        assert "[error]" not in c.nginx_error_log(1)
        deltas = watch.assert_clean(explain=lambda: handoff_outcomes(router, agents))
        beyond = deltas[c.client.name].get("TcpExtBeyondWindow", 0)
        timeouts = {t.name: deltas[t.name].get("TcpExtTCPTimeouts", 0) for t in c.targets}
        print(f"\n  beyond the client's window {beyond}, targets' RTO timeouts {timeouts}")
        assert beyond == 0 and not any(timeouts.values()), (beyond, timeouts)
