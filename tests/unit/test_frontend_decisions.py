"""Policies and the decisions they return: Proxy, Local, Reject, Handoff (with fallback)."""

import asyncio

import pytest

import arr
from arr import Handoff, Local, LocalResponse, Proxy, Reject, Target, TargetState


def state_of(up):
    return TargetState(Target(*up.address))


async def test_sync_policy_proxy(start_router, upstreams, http):
    a, b = await upstreams("a", "b")
    sa, sb = state_of(a), state_of(b)
    seen = []

    def policy(request):
        seen.append((request.method, request.path, request.host, request.headers["x-pick"]))
        return Proxy(sa if request.headers["x-pick"] == "a" else sb)

    router = await start_router(policy=policy)
    ra = await http.request(router.address, "GET", "/whoami", headers=[("X-Pick", "a")])
    rb = await http.request(router.address, "GET", "/whoami?x=1", headers=[("X-Pick", "b")])
    assert (ra.body, rb.body) == (b"a", b"b")
    assert seen == [("GET", "/whoami", "test.local", "a"), ("GET", "/whoami", "test.local", "b")]
    assert router.metrics.value("arr_requests_total",
                                {"decision": "proxy", "status": "200", "target": a.target}) == 1


async def test_async_policy(start_router, upstream, http):
    target = state_of(upstream)

    async def policy(request):
        await asyncio.sleep(0.01)
        if request.path == "/nope":
            return Reject(451, b"legal\n")
        return Proxy(target)

    router = await start_router(policy=policy)
    assert (await http.request(router.address, "GET", "/bytes/9")).body == http.payload(9)
    nope = await http.request(router.address, "GET", "/nope")
    assert nope.status == 451 and nope.body == b"legal\n"


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_local_handler(start_router, http, kind):
    def sync_handler(request):
        return LocalResponse(201, b"local:" + request.path.encode(), (("x-local", "1"),))

    async def async_handler(request):
        await asyncio.sleep(0)
        return sync_handler(request)

    handler = sync_handler if kind == "sync" else async_handler
    router = await start_router(policy=lambda request: Local(handler))
    client = await http.connect(router.address)
    await client.send(http.build_request("GET", "/x") + http.build_request("HEAD", "/yy")
                      + http.build_request("GET", "/z"))
    first = await client.read_response()
    head = await client.read_response("HEAD")
    third = await client.read_response()
    assert first.status == 201 and first.body == b"local:/x" and first.header("x-local") == "1"
    assert head.status == 201 and head.body == b"" and head.header("content-length") == "9"
    assert third.body == b"local:/z"
    assert router.metrics.value("arr_requests_total",
                                {"decision": "local", "status": "201", "target": ""}) == 3


async def test_local_handler_sees_buffered_body(start_router, http):
    router = await start_router(policy=lambda r: Local(lambda req: LocalResponse(200, req.body[::-1])))
    response = await http.request(router.address, "POST", "/", body=b"abcdef")
    assert response.body == b"fedcba"


async def test_reject_with_status_body_and_headers_keeps_connection(start_router, http):
    router = await start_router(
        policy=lambda r: Reject(429, b"slow down\n", (("retry-after", "3"),)))
    client = await http.connect(router.address)
    for _ in range(2):
        await client.send(http.build_request("GET", "/"))
        response = await client.read_response()
        assert response.status == 429 and response.body == b"slow down\n"
        assert response.header("retry-after") == "3"
        assert response.header("connection") is None
    assert router.metrics.value("arr_requests_total",
                                {"decision": "reject", "status": "429", "target": ""}) == 2


async def test_reject_head_has_no_body(start_router, http):
    router = await start_router(policy=lambda r: Reject(403, b"forbidden\n"))
    response = await http.request(router.address, "HEAD", "/")
    assert response.status == 403 and response.body == b""
    assert response.header("content-length") == "10"


@pytest.mark.parametrize("policy", [
    pytest.param(lambda r: 1 / 0, id="raises"),
    pytest.param(lambda r: "not a decision", id="bad-return"),
    pytest.param(lambda r: Local(lambda req: "not a response"), id="bad-local-return"),
    pytest.param(lambda r: Local(lambda req: 1 / 0), id="local-raises"),
])
async def test_policy_failure_is_500_and_router_keeps_serving(start_router, http, policy):
    calls = []

    def wrapped(request):
        calls.append(request.path)
        if request.path == "/fine":
            return Reject(200, b"fine\n")
        return policy(request)

    router = await start_router(policy=wrapped)
    client = await http.connect(router.address)
    await client.send(http.build_request("GET", "/boom"))
    response = await client.read_response()
    assert response.status == 500
    assert await client.closed_by_peer()
    for _ in range(3):
        assert (await http.request(router.address, "GET", "/fine")).body == b"fine\n"
    assert calls == ["/boom", "/fine", "/fine", "/fine"]


async def test_handoff_without_engine_falls_back_to_proxy(start_router, upstream, http):
    target = state_of(upstream)
    router = await start_router(policy=lambda r: Handoff(target))
    response = await http.request(router.address, "GET", "/bytes/1000")
    assert response.status == 200 and response.body == http.payload(1000)
    assert router.metrics.value("arr_handoff_fallbacks_total", {"reason": "unavailable"}) == 1
    assert router.metrics.value("arr_requests_total",
                                {"decision": "proxy", "status": "200", "target": upstream.target}) == 1


async def test_handoff_with_streamed_body_falls_back_without_asking_engine(start_router, upstream, http):
    asked = []

    class Engine:
        async def start(self, router):
            pass

        async def stop(self):
            pass

        async def hand_off(self, session, request, head, target):
            asked.append(request.path)
            return "declined"

    target = state_of(upstream)
    router = await start_router({"limits": {"body_buffer": 1024}}, policy=lambda r: Handoff(target),
                                handoff=Engine())
    big = await http.request(router.address, "POST", "/echo", body=b"x" * 5000)
    small = await http.request(router.address, "POST", "/echo", body=b"x" * 10)
    assert big.json()["length"] == 5000 and small.json()["length"] == 10
    assert asked == ["/echo"]
    assert router.metrics.value("arr_handoff_fallbacks_total", {"reason": "body-streaming"}) == 1
    assert router.metrics.value("arr_handoff_fallbacks_total", {"reason": "declined"}) == 1


async def test_handoff_fallback_503(start_router, upstream, http):
    target = state_of(upstream)
    router = await start_router({"router": {"fallback": "503"}}, policy=lambda r: Handoff(target))
    response = await http.request(router.address, "GET", "/bytes/10")
    assert response.status == 503
    assert router.metrics.value("arr_handoff_fallbacks_total", {"reason": "unavailable"}) == 1
    assert upstream.served == []


async def test_nat_mode_config_routes_through_handoff_fallback(start_router, upstream, http, tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(b"k" * 32)
    config = http.pool_config(upstream, router={"mode": "nat", "secret_file": str(secret)})
    config["targets"][0]["agent"] = "127.0.0.1:9"  # required in nat mode; no handoff engine runs here
    router = await start_router(config)
    response = await http.request(router.address, "GET", "/whoami")
    assert response.body == b"up"
    assert router.metrics.value("arr_handoff_fallbacks_total", {"reason": "unavailable"}) == 1


async def test_config_rules_and_local_routes(start_router, upstreams, http):
    a, b = await upstreams("a", "b")
    router = await start_router({
        "pools": {"pa": {"targets": [{"address": a.target}]},
                  "pb": {"targets": [{"address": b.target}]}},
        "rules": [{"pool": "pb", "path_prefix": "/b/"},
                  {"pool": "pb", "header": {"name": "X-To", "value": "^b$"}}],
        "default_pool": "pa",
        "local": [{"path": "/robots.txt", "body": "User-agent: *\n", "status": 200,
                   "content_type": "text/plain"}],
    })
    assert (await http.request(router.address, "GET", "/whoami")).body == b"a"
    assert (await http.request(router.address, "GET", "/whoami",
                                headers=[("X-To", "b")])).body == b"b"
    # Rules see the normalised path (arr/paths.py): /b/../whoami is /whoami, pool a's.
    assert (await http.request(router.address, "GET", "/b/../whoami")).header("x-upstream") == "a"
    robots = await http.request(router.address, "GET", "/robots.txt")
    assert robots.body == b"User-agent: *\n" and robots.header("content-type") == "text/plain"
    assert [r.target for r in a.served + b.served if r.target == "/robots.txt"] == []


async def test_no_route_is_404(start_router, upstream, http):
    router = await start_router({
        "pools": {"p": {"targets": [{"address": upstream.target}]},
                  "q": {"targets": [{"address": upstream.target}]}},
        "rules": [{"pool": "p", "host": "only.example"}],
    })
    assert (await http.request(router.address, "GET", "/")).status == 404


def test_router_is_exported():
    assert arr.Router is not None and arr.Local is Local
