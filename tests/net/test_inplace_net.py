"""Re-handoff in place (handoff/inplace.py, ``handoff.rehandoff_in_place``): a
handed-off connection's next request for the target that holds it goes there
on the same connection, decided from the captured bytes, no socket rebuilt;
anything else is taken back as before. Real nginx targets, real clients.

The pools and rules are test_takeback_net.py's: ``names`` (t0) serves
``/whoami``, ``files`` (t1) ``/files/``, DELETE is refused.
"""

from __future__ import annotations

import hashlib
import http.client
import time

import pytest

from arr.testbed.loss import CounterWatch, dropped, inject_loss
from arr.testbed.router import handoff_cluster, handoff_outcomes, wait_for

from test_lifecycle_net import assert_all_ok, decisions, load
from test_takeback_net import (HEADER_BYTES, access_lines, connect, curl_one_connection, get, nginx_lines, two_pools,
                               wrk_keep_alive)

pytestmark = pytest.mark.net

MiB = 1 << 20


def in_place_outcomes(router) -> str:
    return "; ".join(line for line in router.metrics_text().splitlines()
                     if line.startswith(("arr_inplace", "arr_rehandoffs_total", "arr_takebacks_total", "arr_handons",
                                         "arr_handoff_fallbacks_total")))


def test_requests_to_the_same_target_go_in_place(cluster):
    c = cluster(targets=2, files={"1k": 1024, "1m": MiB})
    with handoff_cluster(c, **two_pools(c, in_place=True, hand_on=True)) as (router, agents):
        router.wait_healthy()
        conn, port = connect(c)
        plan: list[tuple[str, str, dict]] = (
            [("GET", f"/whoami?n={n}", {}) for n in range(1, 11)]                        # t0: 1 handoff, 9 in place
            + [("GET", f"{c.files['1k' if n % 2 else '1m'].url_path}?n={n}", {}) for n in range(11, 16)]  # t1
            + [("DELETE", "/files/x?n=16", {})]                                          # refused: taken back
            + [("GET", "/whoami?n=17", {"X-Big": "b" * (2 * HEADER_BYTES)})]             # 431: taken back
            + [("GET", f"/whoami?n={n}", {}) for n in range(18, 21)])
        expected = []
        for method, path, headers in plan:
            status, body = get(conn, method, path, **headers)
            n = int(path.rsplit("=", 1)[1])
            if method == "DELETE":
                assert status == 405, n
                expected.append((405, "reject"))
            elif headers:
                assert status == 431, n
                expected.append((431, "error"))
            elif path.startswith("/whoami"):
                assert (status, body) == (200, f"{c.targets[0].name}\n".encode()), (n, in_place_outcomes(router))
                expected.append((None, "handoff"))
            else:
                name = "1k" if n % 2 else "1m"
                assert status == 200 and hashlib.sha256(body).hexdigest() == c.files[name].sha256, n
                expected.append((None, "handoff"))
        conn.close()

        # Every request decided once by the policy, in order, on the one connection.
        assert wait_for(lambda: len(access_lines(router, port)) == 20, 5), access_lines(router, port)
        assert [(r["status"], r["decision"]) for r in access_lines(router, port)] == expected
        # (The 431 is refused before any decision: logged, not decided.)
        assert router.metric_sum("arr_requests_total") == 19, in_place_outcomes(router)
        # In place: t0's 2-10, t1's 12-15, t0's 19-20. Taken back: 11 (the
        # other pool), 16 (refused: the router answers it, then reads 17 and
        # 18 itself, and hands 18 off anew).
        assert router.metric_sum("arr_rehandoffs_total", target="in-place") == 15, in_place_outcomes(router)
        assert router.metric_sum("arr_inplace_reroutes_total", result="ok") == 15
        assert router.metric_sum("arr_inplace_reroutes_total", result="other-target") == 1
        # 11 is handed on from its captures (handoff.rehandoff_hand_on, on by
        # default): only 16 is taken back.
        assert router.metric_sum("arr_handons_total", result="ok") == 1, in_place_outcomes(router)
        assert router.metric_sum("arr_takebacks_total", result="ok") == 1
        assert router.metric_sum("arr_takebacks_total", result="ok") == router.metric_sum("arr_takebacks_total")
        assert router.metric_sum("arr_handoff_fallbacks_total") == 0, handoff_outcomes(router, agents)
        assert sum(a.metrics().get("arr_agent_shifted_total", 0) for a in agents) == 15

        # nginx: one connection for requests 1-10, its requests counted 1..10,
        # each with the X-Forwarded-For the router added.
        assert wait_for(lambda: nginx_lines(c, 0, "n=20 "), 3)
        lines = [nginx_lines(c, 0, f"n={n} ")[0] for n in range(1, 11)]
        assert {line.split()[-2] for line in lines} == {lines[0].split()[-2]}, lines
        assert [line.split()[-1] for line in lines] == [str(n) for n in range(1, 11)]
        for n, (status, decision) in enumerate(expected, start=1):
            target = 1 if 11 <= n <= 15 else 0
            found = nginx_lines(c, target, f"n={n} ")
            if decision == "handoff":
                assert len(found) == 1 and f'"{c.client.ip}"' in found[0], (n, found)
            else:
                assert not found, n
        assert "[error]" not in c.nginx_error_log(0) and "[error]" not in c.nginx_error_log(1)


def test_keep_alive_clients_in_place(cluster):
    """curl with several URLs, wrk keep-alive (1 KiB and 1 MiB) and
    http.client: bodies correct, every request decided, the same-target ones
    in place."""
    c = cluster(targets=2, files={"1k": 1024, "1m": MiB})
    with handoff_cluster(c, **two_pools(c, in_place=True, hand_on=True)) as (router, agents):
        router.wait_healthy()
        urls = [c.files["1k"].url_path, c.files["1m"].url_path, "/whoami", "/whoami", c.files["1k"].url_path]
        curl_one_connection(c, router, urls)
        assert router.metric_sum("arr_requests_total") == len(urls)
        assert router.metric_sum("arr_rehandoffs_total", target="in-place") == 2  # the 2nd and the 4th

        for path in (c.files["1k"].url_path, c.files["1m"].url_path, "/whoami"):
            in_place_before = router.metric_sum("arr_rehandoffs_total", target="in-place")
            done = wrk_keep_alive(c, router, path)
            # All but each connection's first request went in place.
            in_place = router.metric_sum("arr_rehandoffs_total", target="in-place") - in_place_before
            assert in_place >= done - 4, (path, done, in_place, in_place_outcomes(router))

        since = router.log_path.stat().st_size
        conn, port = connect(c)
        for n in range(20):
            status, body = get(conn, "GET", c.files["1m"].url_path)
            assert status == 200 and hashlib.sha256(body).hexdigest() == c.files["1m"].sha256, n
        conn.close()
        assert wait_for(lambda: len(access_lines(router, port, since)) == 20, 5)
        assert router.metric_sum("arr_handoff_fallbacks_total") == 0, handoff_outcomes(router, agents)


def test_in_place_under_2_percent_loss_each_way(cluster):
    """Lost segments of a rewritten request are resent when the client resends
    its own; lost ACKs of it reach the client translated all the same."""
    c = cluster(targets=2, files={"64k": 64 * 1024})
    info = c.files["64k"]
    with handoff_cluster(c, **two_pools(c, in_place=True, hand_on=True)) as (router, agents):
        router.wait_healthy()
        for host in (c.client, *c.targets):
            inject_loss(c, host, 20)
        watch = CounterWatch(c, (c.client, *c.targets), router=c.router)
        slowest, done = 0.0, 0
        for _ in range(4):
            conn, port = connect(c)
            for n in range(100):
                started = time.monotonic()
                try:
                    if n % 10 < 7:
                        status, body = get(conn, "GET", f"{info.url_path}?n={n}")
                        assert status == 200 and hashlib.sha256(body).hexdigest() == info.sha256, n
                    else:
                        assert get(conn, "GET", "/whoami") == (200, f"{c.targets[0].name}\n".encode()), n
                except (OSError, http.client.HTTPException) as exc:
                    sockets = {t.name: c.exec(t, ["ss", "-tinH", "state", "established", "( sport = :8080 )"]).stdout
                               for t in c.targets}
                    raise AssertionError(f"request {n} on client port {port}: {exc!r} after "
                                         f"{time.monotonic() - started:.2f} s; {in_place_outcomes(router)}; "
                                         f"server sockets {sockets}; counters "
                                         f"{ {h: {k: v for k, v in d.items() if v and k.startswith('TcpExt')} for h, d in watch.deltas().items()} }; "
                                         f"{handoff_outcomes(router, agents)}") from exc
                slowest = max(slowest, time.monotonic() - started)
                done += 1
            conn.close()
        assert done == 400
        assert router.metric_sum("arr_requests_total", decision="handoff") == 400, in_place_outcomes(router)
        in_place = router.metric_sum("arr_rehandoffs_total", target="in-place")
        assert in_place >= 300, in_place_outcomes(router)  # 6 of each 10 follow one to the same pool
        watch.assert_clean(explain=lambda: handoff_outcomes(router, agents))
        drops = {h.name: dropped(c, h) for h in (c.client, *c.targets)}
        assert sum(drops.values()) > 40, f"the loss did not happen: {drops}"
        print(f"\n400 keep-alive requests under 2% loss, in place {in_place:.0f}, resends "
              f"{router.metric_sum('arr_inplace_resends_total'):.0f}, slowest {slowest:.2f}s, drops {drops}; "
              f"{in_place_outcomes(router)}")


SHORT_UNDER_LOSS = 3000
SHORT_PER_CONNECTION = 8


def test_short_connections_in_place_under_loss_end_without_resets(cluster):
    """Connections of 8 keep-alive requests, a 1 KiB file, /whoami and a
    64 KiB file in turn (so that some go to the same target and in place),
    each connection ended by its client (its FIN first), 1% loss each way.

    A client whose answer was lost resends its request, which the ingress
    program drops and answers with a copy of the rewritten one from the
    router (``InPlace.on_resends``), read from the next batch of events. The
    server's own resend of its answer could reach the client first: the
    client closed, the server's socket was gone, and the router's copy, a
    few milliseconds late, drew a RST from the server's kernel: one or two
    connections in 1 of 3 runs of 2,000 requests, and in 4 of 5 ad hoc runs
    of 7 client shapes (120 connections of 8 requests each at 1% loss; in
    the 4 runs since, none). The router now sends no copy of a request the
    server has answered (``frames_to_resend``), nor for a connection whose
    ingress entry is gone."""
    c = cluster(targets=2, files={"1k": 1024, "64k": 64 * 1024})
    paths = [c.files["1k"].url_path, "/whoami", c.files["64k"].url_path]
    shas = [c.files["1k"].sha256, c.whoami_sha256(0),
            c.files["64k"].sha256]
    with handoff_cluster(c, **two_pools(c, in_place=True, hand_on=True)) as (router, agents):
        router.wait_healthy()
        watch = CounterWatch(c, (c.client, *c.targets))
        for host in (c.client, *c.targets):
            inject_loss(c, host, 10)
        report = load(c, [router.url + path for path in paths], SHORT_UNDER_LOSS, "client-fin", parallel=6,
                      sha256=shas, timeout=10, extra=("--per-connection", str(SHORT_PER_CONNECTION)),
                      label="short connections under 1% loss")
        outcomes = handoff_outcomes(router, agents)
        assert_all_ok(report, SHORT_UNDER_LOSS)
        assert decisions(router) == SHORT_UNDER_LOSS, outcomes
        in_place = router.metric_sum("arr_rehandoffs_total", target="in-place")
        assert in_place >= SHORT_UNDER_LOSS // 8, outcomes  # 64 KiB then 1 KiB: one in 4 (less the falls back)
        watch.assert_clean(explain=lambda: outcomes)
        drops = {h.name: dropped(c, h) for h in (c.client, *c.targets)}
        assert sum(drops.values()) > 40, f"the loss did not happen: {drops}"
        print(f"in place {in_place:.0f}, copies sent {router.metric_sum('arr_inplace_resends_total'):.0f}, "
              f"drops {drops}; {in_place_outcomes(router)}")
