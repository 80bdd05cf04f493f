"""Short keep-alive connections at speed, from few source ports: every request
routed (issue 10 at the speeds users run).

Browsers and API clients open a connection, send a few requests on it and
close it, over and over. Each such connection here is handed off on its first
request, then each later request is taken back (in place for the same target,
handed on for the other pool) and decided, and the last one ends it: the
target closes (``Connection: close``), so the client's port is free at once
and comes back within the next few connections (40 ports). Whatever of a
connection outlives it (an ingress entry, a pending take-back, a forwarding
port in TIME_WAIT) would meet the next connection on the same port: its
request would go to the old target unseen, or be lost.

Checked: every body's SHA-256 (the target's name for ``/whoami``), the
router's decisions counter against the requests made, the access log's client
ports, the paths the requests took (counters), the maps back at their
baseline afterwards, and the client's and targets' TCP counters: each
connection's end puts the target's socket in TIME_WAIT with the client's
translated clock, 2^20 ms ahead of the router's, and a segment of the router's
own forwarding socket arriving after it (it answered a mirrored ACK of the
client's FIN with a challenge ACK) was refused there as PAWS-old
(``TcpExtPAWSTimewait``; handoff/bpf/arr_structs.h ``request_end``).
"""

from __future__ import annotations

import pytest

from arr.testbed.loss import CounterWatch
from arr.testbed.router import handoff_cluster, handoff_outcomes, wait_for

from test_lifecycle_net import MAX_WATCH, at_baseline, decisions, limit_client_ports, load, map_counts
from test_takeback_net import access_lines, two_pools

pytestmark = pytest.mark.net

CONNECTIONS = 1500
PER_CONNECTION = 4
PARALLEL = 8
CLIENT_PORTS = (40000, 40039)
MODES = {"defaults": {"in_place": True, "hand_on": True},
         "hand-on+reuse": {"in_place": True, "hand_on": True, "reuse": True},
         "take-back": {}}
"""The router's defaults (a request for the same target in place, for the
other handed on); the same with the old forwarding connection given back to
the pool; every request taken back and decided on a rebuilt socket."""


@pytest.mark.parametrize("mode", list(MODES))
def test_short_keep_alive_connections_from_40_ports_every_request_routed(cluster, mode):
    c = cluster(targets=2, files={"1k": 1024})
    limit_client_ports(c, f"{CLIENT_PORTS[0]} {CLIENT_PORTS[1]}")
    # Consecutive requests cycle over these three, so connections of four
    # start on either pool and go to the same target and to the other one.
    paths = [c.files["1k"].url_path, c.files["1k"].url_path, "/whoami"]
    shas = [c.files["1k"].sha256, c.files["1k"].sha256,
            c.whoami_sha256(0)]
    with handoff_cluster(c, **two_pools(c, **MODES[mode])) as (router, agents):
        router.wait_healthy()
        watch = CounterWatch(c, (c.client, *c.targets))
        count = CONNECTIONS * PER_CONNECTION
        report = load(c, [router.url + p for p in paths], count, "close", parallel=PARALLEL, sha256=shas,
                      extra=("--per-connection", str(PER_CONNECTION)),
                      label=f"{mode}, {PER_CONNECTION} per connection")
        outcomes = handoff_outcomes(router, agents)
        assert report["counts"] == {"total": count, "ok": count, "failed": 0, "timeouts": 0}, \
            f"{report['error_counts']} e.g. {report['errors'][:3]}; {outcomes}"
        assert report["ports"]["distinct"] <= 40
        # Every request reached the policy, none went to a target unseen.
        assert decisions(router) == count, f"{count - decisions(router)} requests never decided; {outcomes}"
        assert router.metric_sum("arr_requests_total", decision="handoff") == count, outcomes
        records = access_lines(router, None)
        assert len(records) == count
        assert {int(r["client"].rsplit(":", 1)[1]) for r in records} <= set(range(CLIENT_PORTS[0],
                                                                                   CLIENT_PORTS[1] + 1))
        # The paths the later requests took: none fell back or failed.
        later = count - CONNECTIONS
        assert router.metric_sum("arr_handoffs_total", result="fallback") == 0, outcomes
        assert router.metric_sum("arr_takebacks_total") == router.metric_sum("arr_takebacks_total", result="ok"), \
            outcomes
        in_place = router.metric_sum("arr_rehandoffs_total", target="in-place")
        handed_on = router.metric_sum("arr_rehandoffs_total", target="handed-on")
        taken = router.metric_sum("arr_takebacks_total", result="ok")
        if mode == "take-back":
            assert taken == later and in_place == handed_on == 0, outcomes
        else:
            assert in_place + handed_on == later and taken == 0, outcomes
            assert in_place > later // 4 and handed_on > later // 4, outcomes
        print(f"  {report['rps']:.0f} requests/s; in place {in_place:.0f}, handed on {handed_on:.0f}, "
              f"taken back {taken:.0f}; resent by the router {router.metric_sum('arr_forward_resends_total'):.0f}")
        # Nothing of the connections outlives them.
        assert wait_for(lambda: at_baseline(map_counts(c)), 3), \
            f"maps not at baseline: {map_counts(c)} (watch allowed {MAX_WATCH})"
        watch.assert_clean(explain=lambda: handoff_outcomes(router, agents))
