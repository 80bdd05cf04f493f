"""Request bodies on a handed-off keep-alive connection (issue 10).

An API client sends a body on a connection whose previous request was handed
off: the router's BPF captures the new request, body and all, as far as the
client sends it without an acknowledgement. A request whole in the captures
(Content-Length or chunked) is handed on from them (``hand-on``, when the client writes without Nagle's
wait); an incomplete one has the connection taken back, the captured bytes
becoming the rebuilt socket's receive queue and the rest read from it
(handoff/takeback.py); a body over ``limits.body_buffer`` is proxied from
that socket. Each way, the target must store the exact bytes (SHA-256 of the
file nginx wrote for the PUT), the policy must decide every request, and the
client must neither resend a byte nor wait for its loss probe: the router
acknowledges what it captured (handoff/rebuild.py ``received_ack``). Python's
``http.client`` writes the head and the body apart, and without TCP_NODELAY
holds the body until the head is acknowledged: before that ACK, each such
request waited 200 to 400 ms for the client's loss probe.

The same sequence found the take-back's clock behind the client's: nginx
answers a POST to ``return`` before reading its body, with an ACK the client
already had, and the client took no TS.Recent from that answer, so its next
request echoed a TSval from before the handoff; a late ACK of the old target
then raised TS.Recent past the rebuilt socket's clock, whose every segment the
client dropped (PAWS) and the request hung (handoff/takeback.py
``client_seen_tsval``). And a rebuilt socket whose clock value was odd ran in
microseconds (handoff/rebuild.py ``ms_clock``).
"""

from __future__ import annotations

import hashlib
import os
import socket
import time

import pytest

from arr.testbed.loss import CounterWatch, drop_first, dropped, dropped_first, inject_loss, tcp_counters
from arr.testbed.router import handoff_cluster, handoff_outcomes, wait_for
from test_lifecycle_net import assert_all_ok, decisions, limit_client_ports, load
from test_takeback_net import (MODES, access_lines, client_socket, connect, get, nginx_lines, read_response,
                               two_pools)

pytestmark = pytest.mark.net

BODY_BUFFER = 64 * 1024
BODY_SIZES = (1, 700, 3000, 20_000, BODY_BUFFER, BODY_BUFFER + 1, 300_000)
"""One segment; a few; past the client's initial window (it waits for the
router's ACK); exactly ``body_buffer`` (still handed off); one byte over and
far over it (proxied)."""


CHUNKED_SIZES = (10, 5000, 200_000)
"""Bodies sent chunked (in 4,000-byte chunks): read whole and handed off with
a Content-Length, or relayed as they come (over ``body_buffer``)."""
NAGLE_HELD = (1, 700)
"""Bodies that leave as one short segment after the head: without TCP_NODELAY
the client holds it until the head is acknowledged, with the head its only
segment in flight, whose loss probe waits 200 ms or more. Longer bodies
leave in full segments at once; a client's probe for those comes after
twice its RTT, which one slow take-back can exceed, so only these are
checked for probes."""


def loss_probes(c) -> int:
    return tcp_counters(c, c.client).get("TcpExtTCPLossProbes", 0)


def expected_decision(size: int) -> str:
    return "handoff" if size <= BODY_BUFFER else "proxy"


@pytest.mark.parametrize("mode,nodelay", [("take-back", False), ("hand-on", False), ("hand-on", True),
                                          ("hand-on+reuse", False)])
def test_request_bodies_on_one_keep_alive_connection(cluster, mode, nodelay):
    c = cluster(targets=2, files={"1k": 1024})
    sections = two_pools(c, **MODES[mode])
    sections["rules"] = [{"path_prefix": "/uploads/", "pool": "files"}, *sections["rules"]]
    sections["limits"] = {**sections["limits"], "body_buffer": BODY_BUFFER}
    name = c.targets[0].name
    with handoff_cluster(c, **sections) as (router, agents):
        router.wait_healthy()
        watch = CounterWatch(c, (c.client, *c.targets))
        conn, port = connect(c)
        if nodelay:  # the head and the body leave at once: mostly handed on from the captures
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        took: list[tuple[str, float]] = []
        bodies: dict[str, str] = {}
        expected: list[str] = []
        assert get(conn, "GET", "/whoami?n=0") == (200, f"{name}\n".encode())
        expected.append("handoff")
        waited: dict[int, int] = {}
        for n, size in enumerate(BODY_SIZES, start=1):
            probes = loss_probes(c) if size in NAGLE_HELD else 0
            # To the other pool (t1, nginx stores the body), then back (t0,
            # nginx reads the body and discards it): each request moves the connection.
            body = os.urandom(size)
            upload = f"body{n}-{size}"
            bodies[upload] = hashlib.sha256(body).hexdigest()
            started = time.monotonic()
            conn.request("PUT", f"/uploads/{upload}", body=body, headers={"Host": "arr.test"})
            response = conn.getresponse()
            response.read()
            assert response.status == 201 and not response.will_close, (size, response.status)
            expected.append(expected_decision(size))
            took.append((f"PUT {size}", time.monotonic() - started))
            started = time.monotonic()
            conn.request("POST", f"/whoami?n={n}", body=body, headers={"Host": "arr.test"})
            response = conn.getresponse()
            assert (response.status, response.read()) == (200, f"{name}\n".encode()), size
            expected.append(expected_decision(size))
            took.append((f"POST {size}", time.monotonic() - started))
            if size in NAGLE_HELD:
                waited[size] = loss_probes(c) - probes
        for n, size in enumerate(CHUNKED_SIZES, start=len(BODY_SIZES) + 1):
            body = os.urandom(size)
            upload = f"chunked{n}-{size}"
            bodies[upload] = hashlib.sha256(body).hexdigest()
            started = time.monotonic()
            conn.request("PUT", f"/uploads/{upload}", body=iter([body[i:i + 4000] for i in range(0, size, 4000)]),
                         headers={"Host": "arr.test"}, encode_chunked=True)
            response = conn.getresponse()
            response.read()
            assert response.status == 201 and not response.will_close, (size, response.status)
            expected.append(expected_decision(size))
            took.append((f"PUT chunked {size}", time.monotonic() - started))
            assert get(conn, "GET", f"/whoami?n=c{n}") == (200, f"{name}\n".encode())  # back to t0
            expected.append("handoff")
        assert get(conn, "GET", "/whoami?n=last") == (200, f"{name}\n".encode())
        expected.append("handoff")
        conn.close()

        outcomes = handoff_outcomes(router, agents)
        # The exact bytes reached t1 and only t1.
        for upload, digest in bodies.items():
            stored = c.uploaded(1, upload)
            assert stored.exists() and not c.uploaded(0, upload).exists(), (upload, outcomes)
            assert hashlib.sha256(stored.read_bytes()).hexdigest() == digest, (upload, outcomes)
            assert len(nginx_lines(c, 1, f"PUT /uploads/{upload} ")) == 1, upload
        assert wait_for(lambda: nginx_lines(c, 0, "n=last "), 3)
        for n in range(1, len(BODY_SIZES) + 1):
            assert len(nginx_lines(c, 0, f"POST /whoami?n={n} ")) == 1, n
        # The policy decided every request, in order, on the one connection.
        assert wait_for(lambda: len(access_lines(router, port)) == len(expected), 5), access_lines(router, port)
        assert [r["decision"] for r in access_lines(router, port)] == expected, outcomes
        assert router.metric_sum("arr_takebacks_total") == router.metric_sum(
            "arr_takebacks_total", result="ok"), outcomes
        for i in range(2):
            log = c.nginx_error_log(i)
            assert "[error]" not in log and "reset by peer" not in log and "timed out" not in log, log
        # No connection was reset; a client holding its body for the head's
        # ACK never waited for its loss probe (each did, 200 to 400 ms, while
        # the router left that ACK to the kernel's window probe).
        deltas = watch.assert_clean(explain=lambda: outcomes)
        resent = {host: (d.get("TcpRetransSegs", 0), d.get("TcpExtTCPLossProbes", 0)) for host, d in deltas.items()}
        handed_on = router.metric_sum("arr_handons_total", result="ok")
        print(f"\n{mode}, TCP_NODELAY {nodelay}: handed on {handed_on:.0f}; slowest "
              f"{max(took, key=lambda t: t[1])}; (resent, loss probes) {resent}; {outcomes}")
        if not nodelay:
            assert waited == {size: 0 for size in NAGLE_HELD}, (waited, took, outcomes)
        elif mode == "hand-on":  # bodies went on from the captures (8 to 10 of the 10 in runs)
            assert handed_on >= 1, outcomes
        if MODES[mode].get("reuse"):
            # Each move between the pools gave the old forwarding connection back.
            returned = router.metric_sum("arr_forward_pool_total", result="returned")
            print(f"forwarding connections given back: {returned:.0f}")
            assert returned >= len(BODY_SIZES), outcomes


def post_at_once(sock, path: str, body: bytes) -> tuple[int, bytes]:
    """A POST written in one send, head and body together (an API client that
    builds the whole request first); the status and the body of its answer."""
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: arr.test\r\nContent-Length: {len(body)}\r\n"
                 f"Content-Type: application/octet-stream\r\n\r\n".encode() + body)
    return read_response(sock, f"POST {path}")


def test_a_lost_tail_of_a_forwarded_request_reaches_the_server_before_the_take_back(cluster):
    """The target loses the last segment of a POST the router's forwarding
    socket sent (head and body in a full segment, the rest of the body in a
    second). nginx answers on the head; the client sends its next request at
    once, and the router takes the connection back to route it. The agent
    lets go only once the server has acknowledged all the router sent
    (handoff/agent.py ``server_lacks_stream``): the old forwarding socket and
    the router's copy resend the tail meanwhile. Before, the agent let go at
    once, the take-back released the socket with the tail in its queue, the
    rebuilt one sent the next request after the gap, and nginx, waiting for
    the tail, closed the connection 5 s later: the client read an EOF (1 run
    in 17 of chunked bodies under 1% loss; here, 3 runs of 5 with the old
    verdict, and the other 2 had no wait: the socket's retransmission of the
    tail reached nginx before the take-back released it)."""
    c = cluster(targets=2)
    name = c.targets[0].name
    with handoff_cluster(c, **two_pools(c)) as (router, agents):
        router.wait_healthy()
        watch = CounterWatch(c, (c.client, *c.targets))
        # The forwarding socket sends the request (2,220 bytes) in one GSO
        # packet: lost whole. Then its tail loss probe, the last segment (772
        # bytes; longer than a health check): lost. Then the router's copy
        # (handoff/release.py), as segments: its head (1,448 bytes) let
        # through, nginx answers, its tail lost. The socket's next three
        # retransmissions of the tail are lost too; the fourth brings it, which
        # nginx's kernel acknowledges with a delayed ACK (nothing left to
        # answer): the agent lets go then, 130 to 300 ms after the client's
        # next request. With the tail through at the first retransmission,
        # some 30 ms after nginx answered, a client slower than that to send
        # its next request (a loaded CI machine, 1 fresh-clone run of 4) found the tail
        # acknowledged already, and nothing to wait for.
        to_target = f"ip saddr {c.router.ip} tcp dport {c.spec.target_port}"
        tail = f"{to_target} ip length 400-1400"
        drop_first(c, c.targets[0], f"{to_target} ip length 1501-65535", tail, tail, tail, tail, tail)
        sock = client_socket(c)
        port = sock.getsockname()[1]
        assert post_at_once(sock, "/whoami?tail=1", os.urandom(2000)) == (200, f"{name}\n".encode())
        started = time.monotonic()
        sock.sendall(b"GET /whoami?tail=2 HTTP/1.1\r\nHost: arr.test\r\n\r\n")
        answer = read_response(sock, "GET /whoami?tail=2")
        took = time.monotonic() - started
        sock.close()
        outcomes = handoff_outcomes(router, agents)
        assert answer == (200, f"{name}\n".encode()), outcomes
        assert dropped_first(c, c.targets[0]) == 6, "the request was not lost as planned: the test tests nothing"
        waits = agents[0].metrics().get("arr_agent_takeback_request_unacked_total", 0)
        print(f"\nthe second request took {took * 1000:.0f} ms; the agent waited {waits:.0f} times")
        assert waits >= 1, ("the tail reached nginx before the take-back asked: nothing was tested", outcomes)
        assert took < 1.0, (took, outcomes)
        assert router.metric_sum("arr_takebacks_total") == router.metric_sum(
            "arr_takebacks_total", result="ok") == 1, outcomes
        assert wait_for(lambda: len(access_lines(router, port)) == 2, 5), outcomes
        assert {r["decision"] for r in access_lines(router, port)} == {"handoff"}, outcomes
        assert wait_for(lambda: nginx_lines(c, 0, "tail=2 "), 3)
        assert len(nginx_lines(c, 0, "tail=1 ")) == 1
        watch.assert_clean(explain=lambda: outcomes)


SAME_TARGET_POSTS = 40
SAME_TARGET_SIZES = (3000, 20_000, 700, 1)


def test_bodies_to_the_same_target_in_place_with_the_defaults(cluster):
    """POSTs with bodies, one after another on one keep-alive connection to
    the same target, with the router's defaults: each later one is rerouted in
    place from its captures (handoff/inplace.py) or, when the client's last
    segment is still held (Nagle), taken back.

    nginx answers a POST to ``return`` before reading its body, and
    acknowledges the rest of it only with a delayed ACK, about 40 ms later. A
    client that sent its next request meanwhile had nothing more to
    acknowledge, and the take-back of that request waited for the client's ACK
    to move while the agent was waiting for the server's ACK of the rerouted
    body: the connection hung until ``takeback_timeout`` (10 s) and was ended
    (3 of 8 requests, 120 of 500 connections of 4 POSTs in an ad hoc run).
    The take-back now asks again every ``UNACKED_ASK_AGAIN`` (handoff/control/frames.py). And a SHIFT the
    agent refused for the same reason is asked again for a while
    (handoff/inplace.py ``SHIFT_UNACKED_FOR``) rather than taken back: no
    refusal left, against 5 of 39 without."""
    c = cluster(targets=2)
    name = c.targets[0].name
    with handoff_cluster(c, **two_pools(c, in_place=True, hand_on=True)) as (router, agents):
        router.wait_healthy()
        watch = CounterWatch(c, (c.client, *c.targets))
        sock = client_socket(c)
        port = sock.getsockname()[1]
        took = []
        for n in range(SAME_TARGET_POSTS):
            body = os.urandom(SAME_TARGET_SIZES[n % len(SAME_TARGET_SIZES)])
            started = time.monotonic()
            assert post_at_once(sock, f"/whoami?n={n}", body) == (200, f"{name}\n".encode()), n
            took.append(time.monotonic() - started)
        sock.close()
        outcomes = handoff_outcomes(router, agents)
        assert wait_for(lambda: len(access_lines(router, port)) == SAME_TARGET_POSTS, 5), outcomes
        assert {r["decision"] for r in access_lines(router, port)} == {"handoff"}, outcomes
        assert wait_for(lambda: nginx_lines(c, 0, f"POST /whoami?n={SAME_TARGET_POSTS - 1} "), 3)
        for n in range(SAME_TARGET_POSTS):
            assert len(nginx_lines(c, 0, f"POST /whoami?n={n} ")) == 1, n
        # The path under test was taken (a request whose last segment the
        # client held back, Nagle, is taken back: 1 to 8 of 39 in runs), a
        # SHIFT refused while the server's ACK was late was asked again
        # (5 refusals of 39 without; at most one if that ACK took over 0.2 s),
        # and no take-back failed.
        assert router.metric_sum("arr_inplace_reroutes_total", result="ok") >= SAME_TARGET_POSTS // 2, outcomes
        assert router.metric_sum("arr_inplace_reroutes_total", result="agent-unacked") <= 1, outcomes
        assert router.metric_sum("arr_takebacks_total") == router.metric_sum(
            "arr_takebacks_total", result="ok"), outcomes
        print(f"\nslowest {max(took):.3f} s; {outcomes}")
        assert max(took) < 1.0, (max(took), outcomes)
        watch.assert_clean(explain=lambda: outcomes)


LOSSY_POSTS = 2000
LOSSY_PER_CONNECTION = 4


def test_posts_to_the_same_target_under_loss_with_the_defaults(cluster):
    """500 connections of 4 POSTs (3,000 bytes, head and body in one send) to
    the same target, 8 at a time, with 1% loss each way at the client and the
    targets, with the router's defaults: every request answered and decided,
    no take-back failed, the endpoints' TCP counters clean.

    A request rerouted in place whose tail was lost on the way to nginx, which
    had answered before reading the body, is completed by the router's resends
    when the client resends the tail (handoff/inplace.py). The router forgot
    those segments as soon as the next request's take-back began; the tail
    never came, nginx closed the connection after its 5 s lingering timeout,
    and the take-back failed (``target-closed``): 13 to 16 of 2,000 requests
    in runs before the fix (handoff/takeback.py ``_let_go`` forgets them once
    the agent lets go)."""
    c = cluster(targets=2)
    limit_client_ports(c, "40000 40039")
    with handoff_cluster(c, **two_pools(c, in_place=True, hand_on=True)) as (router, agents):
        router.wait_healthy()
        watch = CounterWatch(c, (c.client, *c.targets))
        for host in (c.client, *c.targets):
            inject_loss(c, host, 10)
        report = load(c, router.url + "/whoami", LOSSY_POSTS, "post", parallel=8, timeout=10,
                      sha256=c.whoami_sha256(0),
                      extra=("--per-connection", str(LOSSY_PER_CONNECTION), "--body-size", "3000"),
                      label="POSTs under 1% loss")
        outcomes = handoff_outcomes(router, agents)
        assert_all_ok(report, LOSSY_POSTS, explain=outcomes)
        assert decisions(router) == LOSSY_POSTS, outcomes
        assert router.metric_sum("arr_inplace_reroutes_total", result="ok") > LOSSY_POSTS // 4, outcomes
        assert router.metric_sum("arr_takebacks_total") == router.metric_sum(
            "arr_takebacks_total", result="ok"), outcomes
        assert sum(dropped(c, host) for host in (c.client, *c.targets)) > 50, "the loss did not happen"
        watch.assert_clean(explain=lambda: outcomes)


def test_curl_uploads_on_one_connection(cluster):
    """curl's PUTs on one keep-alive connection. curl (7.88) sends ``Expect:
    100-continue`` before each body and waits up to a second for the 100:
    after the first request's handoff, the head alone is captured, the
    connection taken back, and the router answers 100 on the rebuilt socket,
    then proxies the request (2 MiB, over ``body_buffer``) or hands it off
    (30 kB)."""
    c = cluster(targets=2, files={"1k": 1024})
    sections = two_pools(c, hand_on=True)
    sections["rules"] = [{"path_prefix": "/uploads/", "pool": "files"}, *sections["rules"]]
    sizes = {"a": 1000, "b": 2 * 1024 * 1024 + 1, "c": 30_000}
    digests = {}
    argv = ["curl", "-v", "-sS", "--noproxy", "*", "--max-time", "60"]
    with handoff_cluster(c, **sections) as (router, agents):
        router.wait_healthy()
        for name, size in sizes.items():
            body = os.urandom(size)
            digests[name] = hashlib.sha256(body).hexdigest()
            (c.workdir / name).write_bytes(body)
            argv += ["-o", "/dev/null", "-T", str(c.workdir / name), f"{router.url}/uploads/curl-{name}"]
        since = router.log_path.stat().st_size
        # The uploads, then a GET: curl pairs each -T and -o with a URL in order.
        trace = c.exec(c.client, [*argv, "-o", str(c.workdir / "whoami"), router.url + "/whoami"]).stderr
        # curl -v: what it sent ("> ") and read ("< "), and one connection for all.
        assert trace.count("> Expect: 100-continue") == 3 and trace.count("< HTTP/1.1 100") == 3, trace
        assert trace.count("Connected to") == 1 and "Re-using existing connection" in trace, trace
        assert (c.workdir / "whoami").read_bytes() == f"{c.targets[0].name}\n".encode()
        outcomes = handoff_outcomes(router, agents)
        for name, digest in digests.items():
            stored = c.uploaded(1, f"curl-{name}")
            assert hashlib.sha256(stored.read_bytes()).hexdigest() == digest, (name, outcomes)
        # Each decided, on one connection (one client port), in order.
        assert wait_for(lambda: len(access_lines(router, None, since)) == 4, 5), access_lines(router, None, since)
        records = access_lines(router, None, since)
        assert len({r["client"] for r in records}) == 1, records
        assert [(r["target"], r["decision"]) for r in records] == [
            ("/uploads/curl-a", "handoff"), ("/uploads/curl-b", "proxy"), ("/uploads/curl-c", "handoff"),
            ("/whoami", "handoff")], outcomes
        assert router.metric_sum("arr_takebacks_total") == router.metric_sum(
            "arr_takebacks_total", result="ok"), outcomes


APART_CONNECTIONS = 60
APART_POSTS = 6
APART_CLIENTS = 4


def test_bodies_sent_apart_from_their_heads_go_in_place_at_once(cluster):
    """Keep-alive POSTs of 3,000 bytes whose heads and bodies are sent apart
    (``loadclient --body-apart``: as http.client writes them), every one to
    the same target, from a few clients at once, with the defaults. A later
    request is rerouted in place as crafted segments (handoff/inplace.py),
    and nginx answers a POST to ``return`` once it has read the head. Sent
    in order, the server answered while the rest of the body was on its way
    and acknowledged it only with its delayed ACK, and the next request
    waited for that ACK before it could go in place: 579 waits
    (``arr_inplace_waits_total``, 10 ms each) for 300 requests. And a
    client that closed on the answer could see its FIN overtake the rest of
    the body at the server, resend its request on the server's SACK of the
    FIN, and the router's copy, sent once the server had closed, drew a RST
    (1 ad hoc run in 7). Now the first segment goes last
    (``request_segments``): the server reads nothing before it has all of
    it, and acknowledges at once: no wait in 5 runs, 296 to 300 of the 300
    in place (the rest taken back)."""
    c = cluster(targets=2)
    total = APART_CONNECTIONS * APART_POSTS
    with handoff_cluster(c, **two_pools(c, in_place=True, hand_on=True)) as (router, agents):
        router.wait_healthy()
        watch = CounterWatch(c, (c.client, *c.targets))
        report = load(c, router.url + "/whoami", total, "post", parallel=APART_CLIENTS, timeout=10,
                      sha256=c.whoami_sha256(0),
                      extra=("--per-connection", str(APART_POSTS), "--body-size", "3000", "--body-apart"),
                      label="POSTs with their bodies apart")
        outcomes = handoff_outcomes(router, agents)
        assert_all_ok(report, total)
        assert decisions(router) == total, outcomes
        later = APART_CONNECTIONS * (APART_POSTS - 1)
        waits = router.metric_sum("arr_inplace_waits_total") + router.metric_sum("arr_takeback_waits_total")
        in_place = router.metric_sum("arr_inplace_reroutes_total", result="ok")
        print(f"\n{in_place:.0f} of {later} later requests in place, {waits:.0f} waits for the server's ACK; "
              f"{outcomes}")
        # The body's segment can reach the router's program in the next batch
        # of captures: that request is taken back (1 to 5% in runs).
        assert in_place >= later * 0.8, outcomes
        assert waits <= later * 0.02, outcomes
        assert router.metric_sum("arr_takebacks_total") == router.metric_sum(
            "arr_takebacks_total", result="ok"), outcomes
        watch.assert_clean(explain=lambda: outcomes)
