"""LARD: stickiness, threshold moves, vanished targets, bounded memory."""

import pytest

from arr.policies.keys import KeySpec
from arr.policies.lard import Lard
from arr.pool import Target, TargetState
from arr.request import Request


def targets(*names):
    return [TargetState(Target("10.0.0.1", 80 + i, name=name)) for i, name in enumerate(names)]


def get(path):
    return Request.build("GET", path, [("Host", "x")])


def lard(**options):
    return Lard(KeySpec.parse("path"), **options)


def test_same_key_sticks_to_its_server_under_moderate_load():
    a, b, c = servers = targets("a", "b", "c")
    policy = lard()
    first = policy.choose(get("/x"), servers)
    first.active = 60  # busy, but below t_high: stays
    for _ in range(5):
        assert policy.choose(get("/x"), servers) is first


def test_new_keys_go_to_the_least_loaded_and_idle_ties_spread():
    a, b, c = servers = targets("a", "b", "c")
    a.active, b.active, c.active = 5, 1, 3
    assert lard().choose(get("/new"), servers) is b
    for server in servers:
        server.active = 0
    policy = lard()
    chosen = {policy.choose(get(f"/k{i}"), servers).name for i in range(3)}
    assert chosen == {"a", "b", "c"}


def test_moves_when_above_t_high_and_someone_is_below_t_low():
    a, b = servers = targets("a", "b")
    policy = lard(t_low=25, t_high=65)
    assert policy.choose(get("/x"), servers) is a
    a.active, b.active = 66, 30  # nobody below t_low: stay
    assert policy.choose(get("/x"), servers) is a
    a.active, b.active = 65, 0  # not *above* t_high: stay
    assert policy.choose(get("/x"), servers) is a
    a.active, b.active = 66, 25  # b is not *below* t_low: stay
    assert policy.choose(get("/x"), servers) is a
    a.active, b.active = 66, 24
    assert policy.choose(get("/x"), servers) is b
    assert policy.assignment("/x") == "b"
    a.active, b.active = 0, 60  # the move sticks; no flapping back
    assert policy.choose(get("/x"), servers) is b


def test_moves_at_twice_t_high_even_when_everyone_is_busy():
    a, b = servers = targets("a", "b")
    policy = lard(t_low=25, t_high=65)
    assert policy.choose(get("/x"), servers) is a
    a.active, b.active = 129, 100
    assert policy.choose(get("/x"), servers) is a
    a.active = 130
    assert policy.choose(get("/x"), servers) is b


def test_reassigns_when_the_server_vanishes():
    a, b, c = targets("a", "b", "c")
    policy = lard()
    assert policy.choose(get("/x"), [a, b, c]) is a
    b.active, c.active = 3, 1
    assert policy.choose(get("/x"), [b, c]) is c
    assert policy.assignment("/x") == "c"
    # a is back, but /x keeps its new home.
    assert policy.choose(get("/x"), [a, b, c]) is c


def test_key_memory_is_an_lru_bounded_by_max_keys():
    servers = targets("a", "b")
    policy = lard(max_keys=3)
    for path in ("/1", "/2", "/3"):
        policy.choose(get(path), servers)
    policy.choose(get("/1"), servers)  # refresh /1: /2 is now the oldest
    policy.choose(get("/4"), servers)
    assert len(policy) == 3
    assert policy.assignment("/2") is None
    assert all(policy.assignment(p) is not None for p in ("/1", "/3", "/4"))
    for i in range(1000):
        policy.choose(get(f"/many/{i}"), servers)
    assert len(policy) == 3


def test_default_bound():
    assert lard().max_keys == 100_000


@pytest.mark.parametrize("options, message", [
    ({"t_low": 65, "t_high": 65}, "t_low must be below t_high"),
    ({"t_low": -1}, "t_low must be a non-negative integer"),
    ({"t_high": 1.5}, "t_high must be a non-negative integer"),
    ({"max_keys": 0}, "max_keys must be at least 1"),
    ({"max_keys": True}, "max_keys must be a non-negative integer"),
])
def test_bad_parameters(options, message):
    with pytest.raises(ValueError, match=message):
        lard(**options)
