"""Clients that leave a connection whose earlier requests were handed off,
taken back and handed on (issue 10 at the speeds users run).

A browser that navigates away resets its connections mid-download; a phone
that loses its network vanishes without a FIN; a client that times out
resets right after it sent a request, while the router is still taking the
connection back for it. Each such connection here carried requests to both
pools before it was left, so the client's end meets whatever state the
router's re-handoff left (an in-place shift, a hand-on, a rebuilt socket, a
forwarding connection given back to the pool).

Meanwhile other clients keep making short keep-alive connections; every one
of their requests must be answered right (SHA-256) and decided by the policy.
Afterwards the maps are back at their baseline and the router holds no more
descriptors than before. And no server sent past a client's window
(``TcpExtBeyondWindow`` at the client): with ``handoff.reuse_forward`` a
download on a connection given back went into the last client's window
(176 segments past it in one reuse_forward run here before
handoff/rebuild.py ``parked_acks``).
"""

from __future__ import annotations

import os
import threading

import pytest

from arr.testbed.loss import tcp_counters
from arr.testbed.router import handoff_cluster, handoff_outcomes, wait_for

from test_lifecycle_net import AGENT, LINGER, at_baseline, decisions, load, map_counts
from test_short_keepalive_net import MODES
from test_takeback_net import two_pools

pytestmark = pytest.mark.net

LEAVING = 1200
"""Requests of each leaving load (a third or a half of them their connections' last)."""
STEADY = 2400
"""Requests of the well-behaved clients that run meanwhile, 4 per connection."""


@pytest.mark.parametrize("mode", list(MODES))
def test_clients_that_leave_rerouted_connections(cluster, mode):
    c = cluster(targets=2, files={"1k": 1024, "1m": 1 << 20})
    small, big = c.files["1k"], c.files["1m"]
    whoami = "/whoami"
    sections = two_pools(c, **MODES[mode])
    sections["handoff"]["linger"] = LINGER
    with handoff_cluster(c, agent=AGENT, **sections) as (router, agents):
        router.wait_healthy()
        pid = router.proc.pid
        fds_before = len(os.listdir(f"/proc/{pid}/fd"))
        beyond_before = tcp_counters(c, c.client).get("TcpExtBeyondWindow", 0)
        url = router.url
        steady: dict = {}

        def well_behaved() -> None:
            steady.update(load(c, [url + small.url_path, url + small.url_path, url + whoami], STEADY, "close",
                               parallel=2, sha256=[small.sha256, small.sha256, c.whoami_sha256(0)],
                               extra=("--per-connection", "4"), label=f"{mode}: well-behaved clients"))

        thread = threading.Thread(target=well_behaved)
        thread.start()
        leaving = [
            # reset mid-download on the third request: files, names, files
            ("abort", [big, None, big], 3),
            # vanish mid-download the same way
            ("abandon", [big, None, big], 3),
            # reset right after sending a request for the other pool
            ("abort-sent", [small, None], 2),
            # ... and for the same target
            ("abort-sent", [small, small], 2),
        ]
        unread = sent = 0
        try:
            for how, infos, per_connection in leaving:
                urls = [url + (i.url_path if i else whoami) for i in infos]
                report = load(c, urls, LEAVING, how, parallel=4, timeout=5.0,
                              extra=("--per-connection", str(per_connection), "--abort-after", "65536"),
                              label=f"{mode}: {how}, {per_connection} per connection")
                assert report["counts"] == {"total": LEAVING, "ok": LEAVING, "failed": 0, "timeouts": 0}, \
                    f"{report['error_counts']} e.g. {report['errors'][:3]}; {handoff_outcomes(router, agents)}"
                if how == "abort-sent":  # the last request of each: maybe reset before it was read
                    unread += LEAVING // per_connection
                sent += LEAVING
        finally:
            thread.join()  # the well-behaved load ends by itself (its count), also after a failure
        outcomes = handoff_outcomes(router, agents)
        assert steady["counts"] == {"total": STEADY, "ok": STEADY, "failed": 0, "timeouts": 0}, \
            f"{steady['error_counts']} e.g. {steady['errors'][:3]}; {outcomes}"
        # Every request was decided, the aborted and abandoned downloads
        # too (before their answers began); a request reset as soon as it
        # was sent may be gone before the router reads it.
        made = decisions(router)
        assert STEADY + sent - unread <= made <= STEADY + sent, f"{made} decided; {outcomes}"
        beyond = tcp_counters(c, c.client).get("TcpExtBeyondWindow", 0) - beyond_before
        assert beyond == 0, f"{beyond} segments past the client's window; {outcomes}"

        def router_fds() -> int:
            return len(os.listdir(f"/proc/{pid}/fd")) - int(router.metric_sum("arr_forward_pool_ready"))

        clean = wait_for(lambda: at_baseline(map_counts(c)) and router_fds() <= fds_before + 2,
                         AGENT["linger"] + 3)
        print(f"  decided {made}; maps {map_counts(c)}; router fds {fds_before} -> {router_fds()}; {outcomes}")
        assert clean, f"maps {map_counts(c)}, router fds {fds_before} -> {router_fds()}; {outcomes}"
