"""The pure parts of seed 000's response deadline (arr/migration.py:
``request_bytes``, ``avoid``) and its configuration (a rule's own deadline)."""

from __future__ import annotations

import h11
import pytest

from arr.config import ConfigError, config_from_dict
from arr.decisions import Handoff, Local, LocalResponse, Proxy, Reject
from arr.migration import avoid, request_bytes
from arr.policies import RoundRobin
from arr.pool import Pool, Target
from arr.request import Request
from arr.routing import build_routing

A, B, C = Target("10.0.0.11", 80, name="a"), Target("10.0.0.12", 80, name="b"), Target("10.0.0.13", 80, name="c")


def parse(raw: bytes) -> tuple[h11.Request, bytes]:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(raw)
    head = conn.next_event()
    body = b""
    while True:
        event = conn.next_event()
        if isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return head, body
        else:
            raise AssertionError(f"incomplete request: {event!r}")


@pytest.mark.parametrize("method, body", [(b"GET", b""), (b"POST", b"a=1&b=2"), (b"PUT", b"x" * 5000),
                                          (b"POST", b""), (b"DELETE", b"")])
def test_request_bytes_read_back_as_the_same_request(method, body):
    headers = [(b"host", b"arr.test"), (b"x-trace", b"7"), (b"transfer-encoding", b"chunked")]
    raw = request_bytes(method, b"/p?q=1", headers, body)
    head, read_body = parse(raw)
    assert (head.method, head.target, read_body) == (method, b"/p?q=1", body)
    names = [n for n, _ in head.headers]
    assert b"transfer-encoding" not in names and names.count(b"host") == 1
    assert dict(head.headers).get(b"x-trace") == b"7"


def pool(*targets: Target) -> Pool:
    return Pool.of("web", list(targets), RoundRobin())


def test_avoid_picks_another_member_of_the_same_pool():
    web = pool(A, B, C)
    a = web.members[0]
    excluded_seen = []

    def pick(p, excluded):
        excluded_seen.extend(m.name for m in excluded)
        return p.pick(Request.build("GET", "/", []), exclude=excluded)

    for kind in (Handoff, Proxy):
        other = avoid(kind(a), A.address, web, pick)
        assert isinstance(other, kind) and other.target.target.address != A.address
    assert excluded_seen == ["a", "a"]


def test_avoid_keeps_a_decision_that_does_not_go_to_the_silent_target():
    web = pool(A, B)
    decision = Handoff(web.members[1])
    assert avoid(decision, A.address, web, lambda p, e: None) is decision
    for other in (Reject(403), Local(lambda r: LocalResponse(200, b""))):
        assert avoid(other, A.address, web, lambda p, e: None) is other


def test_avoid_has_nothing_when_the_pool_has_no_other_member():
    web = pool(A, B)
    web.members[1].draining = True
    assert avoid(Handoff(web.members[0]), A.address, web,
                 lambda p, e: p.pick(Request.build("GET", "/", []), exclude=e)) is None
    # A pool the router no longer knows (replaced by a reload): no other either.
    assert avoid(Handoff(web.members[0]), A.address, None, lambda p, e: p.members[1]) is None


def base_config(rule: dict) -> dict:
    return {"router": {"mode": "nat", "secret_file": "/dev/null"},
            "pools": {"web": {"targets": [{"address": "10.0.0.11:80", "agent": "10.0.0.11:7070"},
                                          {"address": "10.0.0.12:80", "agent": "10.0.0.12:7070"}]}},
            "rules": [rule, {"pool": "web"}], "handoff": {"response_deadline": 2.5}}


def test_a_rule_s_deadline_reaches_the_handoff_decision():
    config = config_from_dict(base_config({"path_prefix": "/api/", "pool": "web", "response_deadline": 0.5}))
    assert config.handoff.response_deadline == 2.5
    policy = build_routing(config).policy
    assert policy(Request.build("GET", "/api/x", [("host", "h")])).response_deadline == 0.5
    assert policy(Request.build("GET", "/other", [("host", "h")])).response_deadline is None  # [handoff]'s


def test_a_negative_deadline_is_refused_naming_the_field():
    with pytest.raises(ConfigError, match=r"rules\[0\]\.response_deadline"):
        config_from_dict(base_config({"path_prefix": "/api/", "pool": "web", "response_deadline": -1}))
    bad = base_config({"path_prefix": "/api/", "pool": "web"})
    bad["handoff"]["response_deadline"] = "soon"
    with pytest.raises(ConfigError, match=r"handoff\.response_deadline"):
        config_from_dict(bad)
