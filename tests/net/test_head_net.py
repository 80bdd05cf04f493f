"""A keep-alive client that sends HEAD requests (issue 10: every request
routed, with the router's usual latency).

A response to HEAD carries the Content-Length of the body a GET would get,
and no body. The agent, which sees responses only, read that length as a
body still to come and held the next request's take-back (or its re-handoff
in place) until the server had been silent for its patience, 50 ms
(handoff/agent.py ``RESPONSE_PATIENCE_NS``): every request after a HEAD on a
handed-off connection waited that long. The router knows the request it sent
was a HEAD and says so (``TakeBack.answers_head``, ``Shift.answers_head``,
handoff/framing.py ``asks_head``).

One keep-alive connection per routing mode (Python's http.client), rounds of
[HEAD 1 MiB, GET 1 MiB, HEAD /whoami, GET /whoami]: each GET after a HEAD of
the same target (in place), each HEAD after a GET of the other (handed on or
taken back). Checked: every status, length and body (SHA-256, the target's
name), every request decided by the policy, and no take-back or re-handoff
told to wait for a response's rest (``arr_agent_takeback_unfinished_total``
and the SHIFTs refused "responding" stay at 0). Before: 250 waits and, in
place, 50 SHIFTs refused in each mode's 100 requests, which took 3.1 s
instead of 0.2 to 0.27 s.
"""

from __future__ import annotations

import hashlib
import time

import pytest

from arr.testbed.router import handoff_cluster, handoff_outcomes

from test_lifecycle_net import AGENT, LINGER, decisions
from test_short_keepalive_net import MODES
from test_takeback_net import connect, two_pools

pytestmark = pytest.mark.net

ROUNDS = 25


@pytest.mark.parametrize("mode", list(MODES))
def test_requests_after_a_head_are_not_held_back(cluster, mode):
    c = cluster(targets=2, files={"1m": 1 << 20})
    big = c.files["1m"]
    sections = two_pools(c, **MODES[mode])
    sections["handoff"]["linger"] = LINGER
    name = f"{c.targets[0].name}\n".encode()
    with handoff_cluster(c, agent=AGENT, **sections) as (router, agents):
        router.wait_healthy()
        before = decisions(router)
        conn, _ = connect(c)
        started = time.monotonic()
        for _ in range(ROUNDS):
            for method, path in (("HEAD", big.url_path), ("GET", big.url_path), ("HEAD", "/whoami"),
                                 ("GET", "/whoami")):
                conn.request(method, path, headers={"Host": "arr.test"})
                response = conn.getresponse()
                body = response.read()
                assert response.status == 200 and not response.will_close, (method, path, response.status)
                if path == "/whoami":
                    assert int(response.headers["Content-Length"]) == len(name)
                    assert body == (b"" if method == "HEAD" else name), (method, body)
                else:
                    assert int(response.headers["Content-Length"]) == big.size
                    assert (method, hashlib.sha256(body).hexdigest() if body else "") in (
                        ("HEAD", ""), ("GET", big.sha256)), (method, len(body))
        elapsed = time.monotonic() - started
        conn.close()
        made = 4 * ROUNDS
        outcomes = handoff_outcomes(router, agents)
        assert decisions(router) - before == made, f"{made - decisions(router) + before} never decided; {outcomes}"
        waits = sum(a.metrics().get("arr_agent_takeback_unfinished_total", 0) for a in agents)
        responding = sum(a.metrics().get('arr_agent_shifts_refused_total{reason="responding"}', 0) for a in agents)
        print(f"  {mode}: {made} requests on one connection in {elapsed * 1000:.0f} ms; "
              f"take-backs told to wait {waits:.0f}, SHIFTs refused responding {responding:.0f}")
        assert (waits, responding) == (0, 0), outcomes
