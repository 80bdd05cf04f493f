"""make_balancer: every kind, every option, every error message."""

import pytest

from arr.policies import (BALANCER_KINDS, KeySpec, Lard, LeastConnections, Maglev, RoundRobin,
                          WeightedRoundRobin, make_balancer)


def test_kinds():
    assert BALANCER_KINDS == ("round-robin", "weighted", "least-connections", "maglev", "lard")


@pytest.mark.parametrize("kind, cls", [
    ("round-robin", RoundRobin), ("weighted", WeightedRoundRobin),
    ("least-connections", LeastConnections),
])
def test_option_less_kinds(kind, cls):
    assert type(make_balancer(kind, {})) is cls
    assert type(make_balancer(kind, None)) is cls


def test_maglev_options():
    balancer = make_balancer("maglev", {"key": "header:X-User", "table_size": 5003})
    assert isinstance(balancer, Maglev)
    assert balancer.key == KeySpec("header", "X-User") and balancer.table_size == 5003
    assert make_balancer("maglev", {"key": "path"}).table_size == 65537


def test_lard_options():
    balancer = make_balancer("lard", {"key": "uri", "t_low": 5, "t_high": 10, "max_keys": 7})
    assert isinstance(balancer, Lard)
    assert (balancer.key, balancer.t_low, balancer.t_high, balancer.max_keys) == (KeySpec("uri"), 5, 10, 7)
    default = make_balancer("lard", {"key": "path"})
    assert (default.t_low, default.t_high, default.max_keys) == (25, 65, 100_000)


def test_each_call_gives_a_fresh_balancer():
    assert make_balancer("round-robin", {}) is not make_balancer("round-robin", {})


@pytest.mark.parametrize("kind, options, message", [
    ("foo", {}, "unknown policy kind 'foo' (expected one of: round-robin, weighted, "
                "least-connections, maglev, lard)"),
    ("Round-Robin", {}, "unknown policy kind 'Round-Robin'"),
    ("round-robin", {"key": "path"}, "round-robin: unknown option 'key' (accepted: none)"),
    ("weighted", {"x": 1}, "weighted: unknown option 'x' (accepted: none)"),
    ("least-connections", {"x": 1}, "least-connections: unknown option 'x' (accepted: none)"),
    ("maglev", {}, "maglev: missing required option 'key'"),
    ("maglev", {"key": "path", "size": 7}, "maglev: unknown option 'size' (accepted: key, table_size)"),
    ("maglev", {"key": "path", "table_size": 1000}, "maglev: table_size must be a prime, got 1000"),
    ("maglev", {"key": "path", "table_size": "7"}, "maglev: option 'table_size' must be an integer, got str '7'"),
    ("maglev", {"key": "path", "table_size": True}, "maglev: option 'table_size' must be an integer, got bool"),
    ("maglev", {"key": 3}, "maglev: option 'key' must be a string, got int 3"),
    ("maglev", {"key": "body"}, "maglev: option 'key': invalid key spec 'body' (accepted forms: path, uri, "
                                "host, client, header:<Name>, cookie:<name>)"),
    ("lard", {}, "lard: missing required option 'key'"),
    ("lard", {"key": "path", "t_lo": 1}, "lard: unknown option 't_lo' (accepted: key, t_low, t_high, max_keys)"),
    ("lard", {"key": "path", "t_low": 1.0}, "lard: option 't_low' must be an integer, got float 1.0"),
    ("lard", {"key": "path", "t_high": "65"}, "lard: option 't_high' must be an integer"),
    ("lard", {"key": "path", "max_keys": None}, "lard: option 'max_keys' must be an integer, got NoneType"),
    ("lard", {"key": "path", "t_low": 70}, "lard: t_low must be below t_high, got t_low=70 t_high=65"),
    ("lard", {"key": "path", "max_keys": 0}, "lard: max_keys must be at least 1, got 0"),
    ("lard", {"key": "cookie:"}, "lard: option 'key': invalid key spec 'cookie:'"),
    ("maglev", ["key", "path"], "maglev: options must be a mapping, got list"),
])
def test_errors(kind, options, message):
    with pytest.raises(ValueError) as info:
        make_balancer(kind, options)
    assert message in str(info.value)
