"""Seed 000's response deadline (issue 11): a handed-off request whose target
stays silent goes to another target of the pool.

nginx on t0 is stopped with SIGSTOP (alive, its kernel still acknowledges
requests, its server answers nothing); ``[handoff] response_deadline = 1``.
Round-robin over t0 and t1 with slow health checks (so that t0 is not marked
down within the test: the deadline, not the health check, must move the
request).
"""

from __future__ import annotations

import os
import signal
import time
from contextlib import contextmanager

import pytest

from arr import netlink
from arr.testbed.router import handoff_cluster

pytestmark = pytest.mark.net

SLOW_HEALTH = {"path": "/health", "interval": 30, "rise": 1, "fall": 3, "timeout": 1}


def nginx_pids(c, i: int) -> list[int]:
    found = []
    for pid in netlink.netns_pids(c.targets[i].ns):
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() == "nginx":
                    found.append(pid)
        except OSError:
            pass
    assert found, "no nginx on the target"
    return found


@contextmanager
def stopped_nginx(c, i: int):
    """nginx of target I (master and workers, by PID) stopped, then continued."""
    pids = nginx_pids(c, i)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass


def test_a_silent_target_s_request_is_answered_by_another_within_the_deadline(cluster):
    c = cluster(targets=2)
    with handoff_cluster(c, handoff={"response_deadline": 1.0}, health=SLOW_HEALTH) as (router, agents):
        router.wait_healthy()
        with stopped_nginx(c, 0):
            results = []
            for _ in range(4):
                started = time.monotonic()
                r = c.curl(router.url + "/whoami", timeout=5)
                results.append((r.status, None, time.monotonic() - started, r.sha256))
            redispatched = router.metric_sum("arr_redispatches_total", result="redispatched")
        expected_sha = c.whoami_sha256(1)
        assert all(status == 200 and sha == expected_sha for status, _, _, sha in results), results
        # Those round-robin gave t0 waited for the deadline, then t1 answered.
        slow = [took for _, _, took, _ in results if took > 0.5]
        assert slow and len(slow) == redispatched, (results, redispatched)
        assert max(took for _, _, took, _ in results) < 2.0, results
        # Each re-dispatched request was decided twice: the policy's choice,
        # then the re-dispatch's (t0 excluded).
        assert router.metric_sum("arr_requests_total", decision="handoff") == 4 + redispatched


def test_a_post_whose_body_the_router_does_not_hold_is_not_redispatched(cluster):
    c = cluster(targets=2)
    handoff = {"response_deadline": 1.0, "redispatch_body_max": 16}
    with handoff_cluster(c, handoff=handoff, health=SLOW_HEALTH) as (router, agents):
        router.wait_healthy()
        with stopped_nginx(c, 0):
            outcomes = []
            for _ in range(3):
                r = c.curl(router.url + "/whoami", extra_args=("-X", "POST", "--data-binary", "x" * 100),
                           timeout=3)
                outcomes.append(r.status)
                if r.status == 0:
                    break  # this one went to the stopped t0 and waited
            assert outcomes[-1] == 0, outcomes
            assert router.metric_sum("arr_redispatches_total", result="not-repeatable") >= 1
            assert router.metric_sum("arr_redispatches_total", result="redispatched") == 0
