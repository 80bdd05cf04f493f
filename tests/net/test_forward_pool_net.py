"""The forward pool's shelves deepen under a burst (handoff/forward_pool.py
``ShelfDepth``), on the real router, with real nginx targets.

Sixteen reconnecting clients at once drain a shelf of 4 faster than its
refill connects: a handoff that finds it empty connects inline, its handshake
in the request's path. With the shelf free to grow (``handoff.forward_pool_max``,
16 by default) each such miss makes the shelf keep one more, and the misses
stop; held at 4 (``forward_pool_max = 4``, the pool before it could grow) they
go on. Once the burst is over, each shelf's connections age out unused and it
keeps one. Each run checks every body's SHA-256 and that the policy decided every
request (a handed-off path can answer without the router seeing it).
"""

from __future__ import annotations

import threading

import pytest

from arr.testbed.router import handoff_cluster, handoff_outcomes, wait_for

from test_lifecycle_net import assert_all_ok, decisions, load

pytestmark = pytest.mark.net

REQUESTS = 1200
PARALLEL = 16
START = 4
"""``handoff.forward_pool``: what each shelf keeps at first."""


def burst(cluster, ceiling: int) -> tuple[int, float]:
    """REQUESTS one-request connections, PARALLEL at a time, both targets in
    turn, through a router whose shelves grow up to CEILING: (misses, the
    deepest the shelves were seen, summed, while the load ran)."""
    info = cluster.files["1k"]
    settings = {"forward_pool": START, "forward_pool_max": ceiling}
    with handoff_cluster(cluster, handoff=settings) as (router, agents):
        router.wait_healthy()
        deepest = 0.0
        done = threading.Event()

        def watch_depth() -> None:
            nonlocal deepest
            while not done.wait(0.05):
                deepest = max(deepest, router.metric_sum("arr_forward_pool_depth"))

        watcher = threading.Thread(target=watch_depth, daemon=True)
        watcher.start()
        try:
            report = load(cluster, router.url + info.url_path, REQUESTS, "close", parallel=PARALLEL,
                          sha256=info.sha256, label=f"forward_pool_max {ceiling}")
        finally:
            done.set()
            watcher.join()
        assert_all_ok(report, REQUESTS, handoff_outcomes(router, agents))
        assert decisions(router) == REQUESTS
        handoffs = int(router.metric_sum("arr_handoffs_total", result="ok"))
        assert handoffs == REQUESTS, handoff_outcomes(router, agents)
        assert router.metric_sum("arr_handoff_fallbacks_total") == 0, handoff_outcomes(router, agents)
        misses = int(router.metric_sum("arr_forward_pool_total", result="miss"))
        hits = int(router.metric_sum("arr_forward_pool_total", result="hit"))
        assert hits + misses == REQUESTS
        print(f"  forward_pool_max {ceiling}: {misses} misses in {REQUESTS} handoffs, "
              f"shelves kept up to {deepest:.0f} connections")
        # Unused once the burst is over, the connections age out (0.9 s) and
        # each takes its shelf's depth one back: each shelf keeps one.
        assert wait_for(lambda: router.metric_sum("arr_forward_pool_depth") == 2, 5), \
            router.metric_sum("arr_forward_pool_depth")
        assert wait_for(lambda: router.metric_sum("arr_forward_pool_ready") == 2, 5), \
            router.metric_sum("arr_forward_pool_ready")
        return misses, deepest


def test_a_burst_deepens_the_shelves_and_their_misses_stop(cluster):
    c = cluster(targets=2, files={"1k": 1024})
    held_misses, held_deepest = burst(c, ceiling=START)
    grown_misses, grown_deepest = burst(c, ceiling=16)
    # Held at their start: the two targets' shelves (one client profile) never keep more.
    assert held_deepest <= 2 * START
    assert grown_deepest > 2 * START, "the shelves should have grown with their misses"
    # The burst emptied the held shelves again and again; the grown ones kept up.
    assert held_misses >= REQUESTS // 10, f"the load was no burst for a shelf of {START} ({held_misses} misses)"
    assert grown_misses * 3 <= held_misses, (grown_misses, held_misses)
