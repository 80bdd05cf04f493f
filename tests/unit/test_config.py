"""Configuration: both shapes load, and every error names its dotted field path."""

import textwrap

import pytest

from arr.cli import main as cli_main
from arr.config import (DEFAULT_ADMIN_SOCKET, Config, ConfigError, Limits, config_from_dict, load_config,
                        parse_address)
from arr.pool import HealthRule, Target

T1, T2 = "10.0.0.1:80", "10.0.0.2:8080"
PROXY = {"mode": "proxy"}


def base(**extra):
    data = {"router": dict(PROXY), "targets": [{"address": T1}]}
    data.update(extra)
    return data


# ---------------------------------------------------------------- good shapes


def test_handoff_forward_pool_is_read_and_defaults_to_four():
    from handoff.maps import DEFAULT_CAPACITY

    assert Config().handoff.capacity == DEFAULT_CAPACITY  # the maps' size, named once in the BPF headers
    assert Config().handoff.forward_pool == 4
    assert config_from_dict({"handoff": {"forward_pool": 0}}).handoff.forward_pool == 0


def test_handoff_forward_pool_max_defaults_to_sixteen_and_never_below_the_pool():
    assert Config().handoff.forward_pool_max == 16
    assert config_from_dict({"handoff": {"forward_pool_max": 8}}).handoff.forward_pool_max == 8
    # A deeper pool without a ceiling of its own: it keeps its depth, no growth.
    deep = config_from_dict({"handoff": {"forward_pool": 32}}).handoff
    assert (deep.forward_pool, deep.forward_pool_max) == (32, 32)


def test_handoff_reuse_forward_is_read_checked_and_off_by_default():
    assert Config().handoff.reuse_forward is False  # issue 10 asks for the FIN at once
    assert config_from_dict({"handoff": {"reuse_forward": True}}).handoff.reuse_forward is True
    with pytest.raises(ConfigError, match=r"^handoff\.reuse_forward: expected"):
        config_from_dict({"handoff": {"reuse_forward": "sometimes"}})


def test_handoff_rto_min_is_read_checked_and_defaults_to_20_ms():
    assert Config().handoff.rto_min == 0.02 and Config().handoff.rto_min_us == 20_000
    assert config_from_dict({"handoff": {"rto_min": 0}}).handoff.rto_min_us == 0  # the kernel's
    assert config_from_dict({"handoff": {"rto_min": 0.005}}).handoff.rto_min_us == 5_000
    for bad in (0.001, 0.5):
        with pytest.raises(ConfigError, match=r"^handoff\.rto_min: must be 0 \(the kernel's\) or from 0\.005 to 0\.2"):
            config_from_dict({"handoff": {"rto_min": bad}})
    for bad in (-1, "fast"):
        with pytest.raises(ConfigError, match=r"^handoff\.rto_min: (must be|expected)"):
            config_from_dict({"handoff": {"rto_min": bad}})


def test_empty_dict_is_defaults():
    config = config_from_dict({})
    assert config == Config()
    assert config.limits == Limits() and config.pools == () and config.default_pool is None


def test_a_config_file_gets_the_admin_socket_unless_it_says_otherwise(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('[router]\nmode = "proxy"\n[[targets]]\naddress = "10.0.0.1:80"\n')
    assert load_config(path).router.admin_socket == DEFAULT_ADMIN_SOCKET
    path.write_text('[router]\nmode = "proxy"\nadmin_socket = ""\n[[targets]]\naddress = "10.0.0.1:80"\n')
    assert load_config(path).router.admin_socket is None
    assert config_from_dict({}).router.admin_socket is None


def test_minimal_shape():
    config = config_from_dict({"router": {"mode": "proxy", "listen": "127.0.0.1:9000"},
                               "targets": [{"address": T1}, {"address": T2, "weight": 3}],
                               "policy": "least-connections"})
    assert config.router.listen == ("127.0.0.1", 9000)
    (pool,) = config.pools
    assert pool.name == "default" and config.default_pool == "default"
    assert pool.targets == (Target("10.0.0.1", 80), Target("10.0.0.2", 8080, weight=3))
    assert pool.policy == "least-connections" and pool.health is None


def test_minimal_shape_with_policy_table_and_health():
    config = config_from_dict(base(policy={"kind": "maglev", "key": "header:X-User",
                                           "table_size": 251},
                                   health={"path": "/hc", "interval": 0.5, "rise": 1, "fall": 4,
                                           "expect_status": [200, 204]}))
    pool = config.pools[0]
    assert pool.policy == "maglev" and dict(pool.policy_options) == {"key": "header:X-User",
                                                                     "table_size": 251}
    assert pool.health == HealthRule(path="/hc", interval=0.5, timeout=1.0, rise=1, fall=4,
                                     expect_status=(200, 204))


def test_full_shape(tmp_path):
    (tmp_path / "robots.txt").write_bytes(b"User-agent: *\n")
    secret = tmp_path / "secret"
    secret.write_bytes(b"s" * 32)
    config = config_from_dict({
        "router": {"listen": "[::1]:8443", "mode": "nat", "fallback": "503",
                   "secret_file": str(secret), "metrics": "127.0.0.1:9100", "drain_timeout": 2,
                   "access_log": False, "health_path": ""},
        "limits": {"header_bytes": 2048, "header_timeout": 1.5, "body_buffer": 0, "max_body": 0,
                   "body_timeout": 3, "keepalive_timeout": 4, "max_connections": 10,
                   "max_requests_per_connection": 5},
        "upstream": {"connect_timeout": 0.5, "read_timeout": 2, "retries": 0},
        "pools": {
            "web": {"targets": [{"address": T1, "name": "w1", "agent": "10.0.0.1:7000"},
                                {"address": T2, "weight": 2, "agent": "10.0.0.2:7000"}],
                    "policy": {"kind": "lard", "key": "path", "t_low": 5, "t_high": 10},
                    "health": {"path": "/health", "interval": 1, "timeout": 0.5}},
            "api": {"targets": [{"address": "10.0.1.1:80", "agent": "10.0.1.1:7070"}], "policy": "round-robin"},
        },
        "rules": [{"pool": "api", "host": "*.api.example", "path_prefix": "/v1/",
                   "path_regex": "^/v1/[a-z]+$", "method": "GET",
                   "header": {"name": "X-Api"}, "cookie": {"name": "sid", "value": "^a"}},
                  {"pool": "web"}],
        "default_pool": "web",
        "local": [{"path": "/robots.txt", "file": "robots.txt"},
                  {"path": "/hello", "body": "hi\n", "status": 201, "content_type": "text/x"}],
    }, base=tmp_path)
    assert config.router.listen == ("::1", 8443) and config.router.metrics == ("127.0.0.1", 9100)
    assert config.router.fallback == "503" and config.router.health_path is None
    assert config.limits.max_body == 0 and config.limits.max_requests_per_connection == 5
    assert config.upstream.retries == 0
    web, api = config.pools
    assert (web.name, api.name) == ("web", "api")
    assert web.targets[0].name == "w1" and web.targets[0].agent == ("10.0.0.1", 7000)
    assert web.targets[1].name == T2 and web.targets[1].weight == 2
    assert web.policy == "lard" and web.health.path == "/health" and api.health is None
    rule = config.rules[0]
    assert rule.header == ("X-Api", None) and rule.cookie == ("sid", "^a")
    assert config.default_pool == "web"
    assert config.local[0].body == b"User-agent: *\n" and config.local[0].status == 200
    assert config.local[1].body == b"hi\n" and config.local[1].content_type == "text/x"


def test_several_pools_without_default_pool_have_none():
    config = config_from_dict({"router": PROXY, "pools": {
        "a": {"targets": [{"address": T1}]}, "b": {"targets": [{"address": T2}]}}})
    assert config.default_pool is None


def test_load_config_toml(tmp_path):
    (tmp_path / "index.html").write_text("<h1>hi</h1>")
    path = tmp_path / "arr.toml"
    path.write_text(textwrap.dedent(f"""
        [router]
        listen = "127.0.0.1:8080"
        mode = "proxy"

        [[targets]]
        address = "{T1}"

        [[targets]]
        address = "{T2}"

        [policy]
        kind = "weighted"

        [[local]]
        path = "/"
        file = "index.html"
    """))
    config = load_config(path)
    assert [t.address for t in config.pools[0].targets] == [("10.0.0.1", 80), ("10.0.0.2", 8080)]
    assert config.pools[0].policy == "weighted"
    assert config.local[0].body == b"<h1>hi</h1>"


@pytest.mark.parametrize("text, expected", [
    ("10.0.0.1:80", ("10.0.0.1", 80)),
    ("[::1]:443", ("::1", 443)),
    ("[2001:db8::5]:1", ("2001:db8::5", 1)),
    ("localhost:65535", ("localhost", 65535)),
])
def test_parse_address_ok(text, expected):
    assert parse_address(text, "x") == expected


def test_parse_address_default_port_and_ephemeral():
    assert parse_address("10.0.0.1", "x", default_port=80) == ("10.0.0.1", 80)
    assert parse_address("::1", "x", default_port=80) == ("::1", 80)
    assert parse_address("127.0.0.1:0", "x", ephemeral_ok=True) == ("127.0.0.1", 0)


# ---------------------------------------------------------------- errors


ERRORS = [
    # router
    ({"router": {"listen": 8080}}, "router.listen: expected a string"),
    ({"router": {"listen": "example.com:80"}}, "router.listen: 'example.com' is not an IP address"),
    ({"router": {"listen": "127.0.0.1"}}, "router.listen: expected 'host:port'"),
    ({"router": {"listen": "127.0.0.1:http"}}, "router.listen: port 'http'"),
    ({"router": {"listen": "127.0.0.1:70000"}}, "router.listen: port 70000 out of range"),
    ({"router": {"listen": "[::1:80"}}, "router.listen: malformed address"),
    ({"router": {"listen": ":80"}}, "router.listen: missing host"),
    ({"router": {"mode": "dsr"}}, "router.mode: must be one of nat, proxy"),
    ({"router": {"fallback": "drop"}}, "router.fallback: must be one of proxy, 503"),
    ({"router": {"metrics": "nowhere"}}, "router.metrics:"),
    ({"router": {"drain_timeout": True}}, "router.drain_timeout: expected an integer or a number, got a boolean"),
    ({"router": {"drain_timeout": -1}}, "router.drain_timeout: must be >= 0"),
    ({"router": {"access_log": "yes"}}, 'router.access_log: "stderr", "stdout", "off" or an absolute file path'),
    ({"router": {"access_log": 1}}, "router.access_log: expected true or false or a string"),
    ({"router": {"health_path": "health"}}, "router.health_path: must start with '/'"),
    ({"router": {"lsten": "127.0.0.1:80"}}, "router: unknown key 'lsten'"),
    ({"router": "proxy"}, "router: expected a table"),
    ({"router": {"mode": "nat"}, "targets": [{"address": T1}]}, "router.secret_file: required"),
    # limits
    ({"limits": {"header_bytes": 100}}, "limits.header_bytes: must be >= 1024"),
    ({"limits": {"header_bytes": 2048.5}}, "limits.header_bytes: expected an integer"),
    ({"limits": {"header_bytes": True}}, "limits.header_bytes: expected an integer, got a boolean"),
    ({"limits": {"header_bytes": "64k"}}, "limits.header_bytes: expected an integer"),
    ({"limits": {"header_timeout": 0}}, "limits.header_timeout: must be > 0"),
    ({"limits": {"body_timeout": False}}, "limits.body_timeout: expected an integer or a number, got a boolean"),
    ({"limits": {"max_body": -1}}, "limits.max_body: must be >= 0"),
    ({"limits": {"max_connections": 0}}, "limits.max_connections: must be >= 1"),
    ({"limits": {"max_requests_per_connection": 0}}, "limits.max_requests_per_connection: must be >= 1"),
    ({"limits": {"keepalive": 5}}, "limits: unknown key 'keepalive'"),
    # upstream
    ({"upstream": {"read_timeout": 0}}, "upstream.read_timeout: must be > 0"),
    ({"upstream": {"retries": 1.5}}, "upstream.retries: expected an integer"),
    ({"upstream": {"retries": True}}, "upstream.retries: expected an integer, got a boolean"),
    ({"upstream": {"retry": 1}}, "upstream: unknown key 'retry'"),
    # minimal shape
    ({"targets": [{"address": T1}, {"address": "10.0.0.2"}]}, "targets[1].address: expected 'host:port'"),
    ({"targets": [{"address": T1}, {}]}, "targets[1].address: required"),
    ({"targets": []}, "targets: a pool needs at least one target"),
    ({"targets": "10.0.0.1:80"}, "targets: expected a list"),
    ({"targets": [{"address": T1, "port": 80}]}, "targets[0]: unknown key 'port'"),
    ({"targets": [{"address": T1}, {"address": T1}]}, f"targets: target '{T1}' is listed twice"),
    ({"targets": [{"address": T1}], "policy": "fastest"}, "policy: unknown policy kind 'fastest'"),
    ({"policy": "round-robin"}, "policy: a top-level [policy] or [health] needs top-level [[targets]]"),
    ({"health": {"path": "/"}}, "policy: a top-level [policy] or [health] needs"),
    ({"targets": [{"address": T1}], "pools": {"default": {"targets": [{"address": T2}]}}},
     "pools.default: clashes"),
    # full shape
    ({"pools": {"web": {"targets": [{"address": T1}, {"address": "10.0.0.2:0"}]}}},
     "pools.web.targets[1].address: port 0 out of range"),
    ({"pools": {"web": {"targets": [{"address": T1}, {"address": "web1:80"}]}}},
     "pools.web.targets[1].address: 'web1' is not an IP address"),
    ({"pools": {"web": {"targets": [{"address": T1, "weight": -1}]}}},
     "pools.web.targets[0].weight: must be >= 0"),
    ({"pools": {"web": {"targets": [{"address": T1, "weight": 0}]}}},
     "pools.web.targets[0].weight: must be >= 1, got 0 (a target that should take no traffic"),
    ({"router": {"mode": "nat", "secret_file": "/k"}, "targets": [{"address": T1}]},
     "targets: target 10.0.0.1:80 has no 'agent' but mode is nat"),
    ({"pools": {"web": {"targets": [{"address": T1}]}}, "rules": [{"pool": "web"}, {"pool": "web", "host": "x"}]},
     "rules[0]: has no condition, so it matches every request and rules[1] and after can never match"),
    ({"pools": {"web": {"targets": [{"address": T1, "weight": True}]}}},
     "pools.web.targets[0].weight: expected an integer, got a boolean"),
    ({"pools": {"web": {"targets": [{"address": T1, "agent": "10.0.0.1"}]}}},
     "pools.web.targets[0].agent: expected 'host:port'"),
    ({"pools": {"web": {"targets": [{"address": T1}], "policy": {"kind": "maglev"}}}},
     "pools.web.policy: maglev: missing required option 'key'"),
    ({"pools": {"web": {"targets": [{"address": T1}], "policy": {"kind": "lard", "key": "path",
                                                                  "t_lo": 1}}}},
     "pools.web.policy: lard: unknown option 't_lo'"),
    ({"pools": {"web": {"targets": [{"address": T1}], "policy": {"kind": "maglev", "key": "path",
                                                                  "table_size": True}}}},
     "pools.web.policy: maglev: option 'table_size' must be an integer"),
    ({"pools": {"web": {"targets": [{"address": T1}], "policy": {"kind": 3}}}},
     "pools.web.policy.kind: expected a string"),
    ({"pools": {"web": {"targets": [{"address": T1}], "policy": 3}}},
     "pools.web.policy: expected a table or a string"),
    ({"pools": {"web": {"targets": [{"address": T1}], "health": {"path": "hc"}}}},
     "pools.web.health.path: must start with '/'"),
    ({"pools": {"web": {"targets": [{"address": T1}], "health": {"expect_status": [500, 200]}}}},
     "pools.web.health.expect_status: expected [low, high]"),
    ({"pools": {"web": {"targets": [{"address": T1}], "health": {"rise": 0}}}},
     "pools.web.health.rise: must be >= 1"),
    ({"pools": {"web": {"targets": [{"address": T1}], "health": {"interval": True}}}},
     "pools.web.health.interval: expected an integer or a number, got a boolean"),
    ({"pools": {"web": {"targets": [{"address": T1}], "health": {"every": 1}}}},
     "pools.web.health: unknown key 'every'"),
    ({"pools": {"web": {"targets": [{"address": T1}], "weight": 1}}}, "pools.web: unknown key 'weight'"),
    ({"pools": {"web": "10.0.0.1:80"}}, "pools.web: expected a table"),
    ({"pools": {"web": {}}}, "pools.web.targets: a pool needs at least one target"),
    ({"pools": {"web": {"targets": [{"address": T1}]}}, "rules": [{"pool": "api"}]},
     "rules[0].pool: no pool named 'api'"),
    ({"pools": {"web": {"targets": [{"address": T1}]}}, "rules": [{"pool": "web"}, {"host": "a"}]},
     "rules[1].pool: required"),
    ({"pools": {"web": {"targets": [{"address": T1}]}}, "rules": [{"pool": "web", "hots": "a"}]},
     "rules[0]: unknown key 'hots'"),
    ({"pools": {"web": {"targets": [{"address": T1}]}}, "rules": [{"pool": "web", "header": "X-A"}]},
     "rules[0].header: expected a table"),
    ({"pools": {"web": {"targets": [{"address": T1}]}}, "rules": [{"pool": "web", "cookie": {"value": "x"}}]},
     "rules[0].cookie.name: required"),
    ({"pools": {"web": {"targets": [{"address": T1}]}}, "rules": [{"pool": "web", "method": 1}]},
     "rules[0].method: expected a string"),
    ({"pools": {"web": {"targets": [{"address": T1}]}}, "rules": {"pool": "web"}},
     "rules: expected a list"),
    ({"pools": {"web": {"targets": [{"address": T1}]}}, "default_pool": "api"},
     "default_pool: no pool named 'api'"),
    # local routes
    ({"local": [{"path": "x", "body": "a"}]}, "local[0].path: required, and must start with '/'"),
    ({"local": [{"path": "/x"}]}, "local[0]: give exactly one of 'body' or 'file'"),
    ({"local": [{"path": "/x", "body": "a", "file": "b"}]}, "local[0]: give exactly one of 'body' or 'file'"),
    ({"local": [{"path": "/x", "body": "a"}, {"path": "/y", "file": "missing.txt"}]},
     "local[1].file: cannot read"),
    ({"local": [{"path": "/x", "body": "a", "status": 99}]}, "local[0].status: must be >= 200"),
    ({"local": [{"path": "/x", "body": "a", "status": "200"}]}, "local[0].status: expected an integer"),
    ({"local": [{"path": "/x", "body": "a", "type": "x"}]}, "local[0]: unknown key 'type'"),
    ({"pools": {"web": {"targets": [{"address": "10.0.0.1:80"}]}}, "rules": [{"method": "DELETE", "reject": 200}]},
     "rules[0].reject: must be a 4xx or 5xx status, got 200"),
    ({"pools": {"web": {"targets": [{"address": "10.0.0.1:80"}]}},
      "rules": [{"method": "DELETE", "reject": 405, "pool": "web"}]},
     "rules[0]: both 'pool' and 'reject' given"),
    ({"pools": {"web": {"targets": [{"address": "10.0.0.1:80"}]}}, "rules": [{"method": "DELETE", "reject": "no"}]},
     "rules[0].reject: expected an integer"),
    # handoff
    ({"handoff": {"takeback_timeout": 0}}, "handoff.takeback_timeout: must be > 0"),
    ({"handoff": {"forward_pool": -1}}, "handoff.forward_pool: must be >= 0"),
    ({"handoff": {"forward_pool": 2.5}}, "handoff.forward_pool: expected an integer"),
    ({"handoff": {"forward_pool": True}}, "handoff.forward_pool: expected an integer, got a boolean"),
    ({"handoff": {"forward_pool": 8, "forward_pool_max": 4}},
     "handoff.forward_pool_max: must be >= handoff.forward_pool (8), got 4"),
    ({"handoff": {"forward_pool_max": -1}}, "handoff.forward_pool_max: must be >= 0"),
    # top level
    ({"tragets": []}, "top level: unknown key 'tragets'"),
    ({"default_pool": 1}, "default_pool: expected a string"),
]


@pytest.mark.parametrize("data, message", ERRORS, ids=[m.split(":")[0] + "|" + m.split(":", 1)[1][:30]
                                                        for _, m in ERRORS])
def test_config_errors_start_with_field_path(data, message, tmp_path):
    data = {"router": dict(PROXY), **data} if "router" not in data else data
    with pytest.raises(ConfigError) as info:
        config_from_dict(data, base=tmp_path)
    assert str(info.value).startswith(message), str(info.value)


@pytest.mark.parametrize("rule, path", [
    ({"path_regex": "("}, "rules[0].path_regex"),
    ({"header": {"name": "X-A", "value": "["}}, "rules[0].header"),
    ({"cookie": {"name": "sid", "value": "*"}}, "rules[0].cookie"),
])
def test_bad_regex_error_names_rule_field(rule, path):
    with pytest.raises(ConfigError) as info:
        config_from_dict(base(rules=[{"pool": "default", **rule}]))
    assert str(info.value).startswith(path + ":")


def test_bad_regex_is_a_config_error():
    """The message also says what was wrong with which regex."""
    with pytest.raises(ConfigError, match=r"invalid path_regex regex '\('"):
        config_from_dict(base(rules=[{"pool": "default", "path_regex": "("}]))


def test_local_status_out_of_range_is_config_error():
    with pytest.raises(ConfigError, match=r"^local\[0\]\.status"):
        config_from_dict(base(local=[{"path": "/x", "body": "a", "status": 1000}]))


def test_local_file_missing_message(tmp_path):
    with pytest.raises(ConfigError) as info:
        config_from_dict(base(local=[{"path": "/x", "file": "nope.bin"}]), base=tmp_path)
    assert str(info.value) == (f"local[0].file: cannot read {str(tmp_path / 'nope.bin')!r}: "
                               "No such file or directory")


def test_load_config_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_load_config_invalid_toml(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[router\nlisten = 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: not valid TOML")


def test_load_config_field_error_from_file(tmp_path):
    path = tmp_path / "arr.toml"
    path.write_text('[limits]\nheader_bytes = true\n')
    with pytest.raises(ConfigError, match=r"^limits\.header_bytes: expected an integer, got a boolean"):
        load_config(path)


def test_load_config_directory_is_config_error(tmp_path):
    with pytest.raises(ConfigError):
        load_config(tmp_path)


def test_load_config_non_utf8_is_config_error(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'# caf\xe9\n[router]\nmode = "proxy"\n')
    with pytest.raises(ConfigError):
        load_config(path)


# ---------------------------------------------------------------- arr check-config


def test_cli_check_config_ok(tmp_path, capsys):
    path = tmp_path / "arr.toml"
    path.write_text(f'[router]\nmode = "proxy"\nlisten = "127.0.0.1:8080"\n\n[[targets]]\naddress = "{T1}"\n')
    assert cli_main(["check-config", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"{path}: ok (1 pool(s), 0 rule(s), mode proxy")
    assert "config error" not in err


def test_cli_check_config_error(tmp_path, capsys):
    path = tmp_path / "arr.toml"
    path.write_text(f'[router]\nmode = "proxy"\n\n[[targets]]\naddress = "{T1}"\n\n'
                    '[[targets]]\naddress = "web2:80"\n')
    assert cli_main(["check-config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert "arr: config error: targets[1].address: 'web2' is not an IP address" in err
    assert out == ""


def test_cli_check_config_missing_file(tmp_path, capsys):
    assert cli_main(["check-config", str(tmp_path / "nope.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err
