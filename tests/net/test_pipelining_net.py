"""A client that pipelines its next request while a large response is still
coming (issue 10: "pipelined requests are each routed").

Each connection downloads 1 MiB, sends its next request 64 KiB into it (for
the other pool, or for the same one), then downloads 1 MiB again
(``arr.testbed.loadclient --mode pipeline``). nginx sends the file in
pieces, each when the client's ACKs free its socket buffer, so at times
everything it sent is acknowledged and its socket holds nothing more: TCP
alone took that for the response's end, and the take-back cut the download
short there, the next response spliced after it (18 of 300 connections with
the defaults; with ``handoff.reuse_forward`` the rest reached another
client). The agent now reads the response's framing (handoff/framing.py,
from the start the target program keeps) and waits for the rest
(handoff/agent.py ``_response_unfinished``).

The same with chunked downloads (nginx's SSI filter drops the length,
arr/testbed/nginx.py): their end is in their last bytes, which the program
keeps too (note_tail); without, 7 to 11 of 300 connections a mode failed. That
load also found a race in the take-back: pausing the entry wrote back a
record read a moment before, over a segment the server sent meanwhile, and
the router sent the next response from the server's old snd_nxt, over bytes
the client had (1 or 2 connections in 300; handoff/agent.py
``_sent_while_pausing``).

Checked: every body's SHA-256, in order; every request decided by the
policy; the agents told take-backs to wait for a response's rest.
"""

from __future__ import annotations

import pytest

from arr.testbed.router import handoff_cluster, handoff_outcomes

from test_lifecycle_net import AGENT, LINGER, decisions, load
from test_short_keepalive_net import MODES
from test_takeback_net import two_pools

pytestmark = pytest.mark.net

CONNECTIONS = 300


@pytest.mark.parametrize("mode", list(MODES))
def test_requests_pipelined_mid_download_are_each_routed(cluster, mode):
    c = cluster(targets=2, files={"1k": 1024, "1m": 1 << 20})
    small, big = c.files["1k"], c.files["1m"]
    sections = two_pools(c, **MODES[mode])
    sections["handoff"]["linger"] = LINGER
    with handoff_cluster(c, agent=AGENT, **sections) as (router, agents):
        router.wait_healthy()
        assert_chunked(c, big)
        made = 0
        for download, middle, sha in ((big.url_path, "/whoami", c.whoami_sha256(0)),
                                      (big.url_path, small.url_path, small.sha256),
                                      (big.chunked_url_path, small.url_path, small.sha256)):
            paths = [download, middle, download]
            count = 3 * CONNECTIONS
            report = load(c, [router.url + p for p in paths], count, "pipeline", parallel=4,
                          sha256=[big.sha256, sha, big.sha256], timeout=5.0,
                          extra=("--per-connection", "3", "--abort-after", "65536"),
                          label=f"{mode}: {download}, {middle} pipelined 64 KiB into it, {download}")
            outcomes = handoff_outcomes(router, agents)
            assert report["counts"] == {"total": count, "ok": count, "failed": 0, "timeouts": 0}, \
                f"{report['error_counts']} e.g. {report['errors'][:3]}; {outcomes}"
            made += count
            assert decisions(router) == made, f"{made - decisions(router)} requests never decided; {outcomes}"
        waits = sum(a.metrics().get("arr_agent_takeback_unfinished_total", 0) for a in agents)
        pausing = sum(a.metrics().get("arr_agent_takeback_sent_while_pausing_total", 0) for a in agents)
        print(f"  take-backs told to wait for a response's rest: {waits:.0f}; "
              f"for a segment sent while pausing: {pausing:.0f}")
        assert waits > 0, outcomes


def assert_chunked(c, file) -> None:
    """The test bed's chunked location sends FILE's bytes, chunked."""
    headers = c.workdir / "chunked-headers.txt"
    got = c.curl(c.target_url(0, file.chunked_url_path), extra_args=("-D", str(headers)))
    assert got.ok and got.sha256 == file.sha256, got
    text = headers.read_text().lower()
    assert "transfer-encoding: chunked" in text and "content-length" not in text, text
