"""Rule matching, first-match order, default pool, rejects, modes, validation."""

import pytest

from arr.decisions import Handoff, Proxy, Reject
from arr.policies.balancers import RoundRobin
from arr.policies.rules import RoutingPolicy, Rule
from arr.pool import Pool, Target
from arr.request import Request


def pools(*names):
    return {name: Pool.of(name, [Target("10.0.0.1", 8000 + i, name=f"{name}{i}") for i in range(2)],
                          RoundRobin())
            for name in names}


def req(target="/", host="www.example.com", method="GET", headers=()):
    return Request.build(method, target, [("Host", host), *headers], client=("10.9.9.9", 1))


def routed(rule, request):
    """Whether ``rule`` sends ``request`` to the "hit" pool (else it falls to "miss")."""
    policy = RoutingPolicy([rule], pools("hit", "miss"), default_pool="miss")
    decision = policy(request)
    assert isinstance(decision, Proxy)
    return decision.target.name[:-1] == "hit"


def test_host_exact_case_insensitive_port_ignored():
    rule = Rule("hit", host="WWW.Example.com")
    assert routed(rule, req(host="www.example.COM:8443"))
    assert not routed(rule, req(host="api.example.com"))
    assert not routed(rule, req(host="www.example.com.evil"))


def test_host_wildcard_matches_subdomains_only():
    rule = Rule("hit", host="*.example.com")
    assert routed(rule, req(host="a.example.com"))
    assert routed(rule, req(host="A.b.Example.com:80"))
    assert not routed(rule, req(host="example.com"))
    assert not routed(rule, req(host="badexample.com"))


def test_path_prefix():
    rule = Rule("hit", path_prefix="/api/")
    assert routed(rule, req("/api/v1?x=1"))
    assert not routed(rule, req("/apix"))
    assert not routed(rule, req("/static/api/"))


def test_path_regex_searches_the_path_only():
    rule = Rule("hit", path_regex=r"\.(png|jpg)$")
    assert routed(rule, req("/img/cat.png"))
    assert not routed(rule, req("/img/cat.png.html"))
    assert not routed(rule, req("/page?file=cat.png"))


def test_header_presence_and_regex():
    present = Rule("hit", header=("X-Canary", None))
    assert routed(present, req(headers=[("x-canary", "")]))
    assert not routed(present, req())
    pattern = Rule("hit", header=("User-Agent", "(?i)mobile"))
    assert routed(pattern, req(headers=[("User-Agent", "Foo Mobile/1")]))
    assert routed(pattern, req(headers=[("User-Agent", "desk"), ("user-agent", "MOBILE")]))
    assert not routed(pattern, req(headers=[("User-Agent", "desktop")]))
    assert not routed(pattern, req())


def test_cookie_presence_and_regex():
    present = Rule("hit", cookie=("beta", None))
    assert routed(present, req(headers=[("Cookie", "a=1; beta=yes")]))
    assert not routed(present, req(headers=[("Cookie", "Beta=yes")]))
    pattern = Rule("hit", cookie=("group", "^(b|c)$"))
    assert routed(pattern, req(headers=[("Cookie", "group=b")]))
    assert not routed(pattern, req(headers=[("Cookie", "group=a")]))
    assert not routed(pattern, req())


def test_method():
    rule = Rule("hit", method="POST")
    assert routed(rule, req(method="POST"))
    assert not routed(rule, req(method="GET"))


def test_all_conditions_must_match():
    rule = Rule("hit", host="api.example.com", path_prefix="/v2", method="PUT")
    assert routed(rule, req("/v2/x", host="api.example.com", method="PUT"))
    assert not routed(rule, req("/v2/x", host="api.example.com", method="GET"))
    assert not routed(rule, req("/v1/x", host="api.example.com", method="PUT"))
    assert not routed(rule, req("/v2/x", host="www.example.com", method="PUT"))


def test_a_reject_rule_refuses_before_any_pool_and_in_order():
    policy = RoutingPolicy([Rule("", method="DELETE", reject=405), Rule("hit", path_prefix="/")],
                           pools("hit", "miss"), default_pool="miss")
    refused = policy(req("/x", method="DELETE"))
    assert isinstance(refused, Reject) and refused.status == 405
    assert isinstance(policy(req("/x", method="GET")), Proxy)
    # After a matching pool rule, a later reject rule is not reached.
    later = RoutingPolicy([Rule("hit", path_prefix="/"), Rule("", method="DELETE", reject=405)],
                          pools("hit", "miss"))
    assert isinstance(later(req("/x", method="DELETE")), Proxy)


def test_a_reject_status_must_be_an_error():
    with pytest.raises(ValueError, match="rule 0: reject status 302 is not a 4xx or 5xx"):
        RoutingPolicy([Rule("", reject=302)], pools("hit"))


def test_rule_without_conditions_is_a_catch_all():
    assert routed(Rule("hit"), req("/anything", host="anywhere"))


def test_first_matching_rule_wins():
    policy = RoutingPolicy(
        [Rule("api", path_prefix="/api"), Rule("static", path_prefix="/"), Rule("never")],
        pools("api", "static", "never"))
    assert policy(req("/api/x")).target.name.startswith("api")
    assert policy(req("/img")).target.name.startswith("static")


def test_default_pool_and_no_route():
    rules = [Rule("api", path_prefix="/api")]
    with_default = RoutingPolicy(rules, pools("api", "web"), default_pool="web")
    assert with_default(req("/home")).target.name.startswith("web")
    without = RoutingPolicy(rules, pools("api", "web"))
    assert without(req("/home")) == Reject(404, b"no route\n")


def test_no_available_target_is_503():
    all_pools = pools("api")
    for member in all_pools["api"].members:
        member.healthy = False
    policy = RoutingPolicy([Rule("api")], all_pools)
    assert policy(req()) == Reject(503, b"no healthy target\n")


def test_mode_selects_handoff_or_proxy_and_the_balancer_rotates():
    handoff = RoutingPolicy([], pools("web"), default_pool="web", mode="handoff")
    first, second = handoff(req()), handoff(req())
    assert isinstance(first, Handoff) and isinstance(second, Handoff)
    assert {first.target.name, second.target.name} == {"web0", "web1"}
    assert isinstance(RoutingPolicy([], pools("web"), "web", mode="proxy")(req()), Proxy)


def test_unknown_pool_in_a_rule_is_named():
    with pytest.raises(ValueError, match=r"rule 1: unknown pool 'nope' \(known pools: a, b\)"):
        RoutingPolicy([Rule("a"), Rule("nope")], pools("a", "b"))


def test_unknown_default_pool_is_named():
    with pytest.raises(ValueError, match="unknown default pool 'nope'"):
        RoutingPolicy([], pools("a"), default_pool="nope")


@pytest.mark.parametrize("rule, field", [
    (Rule("a", path_regex="(unclosed"), "path_regex"),
    (Rule("a", header=("X", "[bad")), "header"),
    (Rule("a", cookie=("c", "*x")), "cookie"),
])
def test_invalid_regex_names_rule_index_and_regex(rule, field):
    with pytest.raises(ValueError) as info:
        RoutingPolicy([Rule("a", path_prefix="/ok"), rule], pools("a"))
    message = str(info.value)
    assert message.startswith(f"rule 1: invalid {field} regex ")
    pattern = rule.path_regex or (rule.header or rule.cookie)[1]
    assert repr(pattern) in message


def test_unknown_mode():
    with pytest.raises(ValueError, match=r"unknown routing mode 'dsr' \(expected one of: handoff, proxy\)"):
        RoutingPolicy([], pools("a"), "a", mode="dsr")  # type: ignore[arg-type]


def test_rule_is_frozen():
    with pytest.raises(AttributeError):
        Rule("a").pool = "b"  # type: ignore[misc]
