"""The proxy path end to end: client -> arr.Router -> in-process upstream."""

import asyncio
import json

import pytest

MiB = 1 << 20


@pytest.fixture
async def router(start_router, upstream, http):
    return await start_router(http.pool_config(upstream, limits={"body_buffer": 64 * 1024}))


@pytest.mark.parametrize("size", [0, 1, 1000, 8 * MiB])
async def test_get_bytes_sha256(router, http, size):
    response = await http.request(router.address, "GET", f"/bytes/{size}")
    assert response.status == 200 and response.complete
    assert int(response.header("content-length")) == size
    assert http.sha256(response.body) == http.sha256(http.payload(size))


async def test_chunked_response_relayed_intact(router, http):
    size = 3 * MiB + 17
    response = await http.request(router.address, "GET", f"/chunked/{size}")
    assert response.status == 200 and response.complete
    assert response.header("content-length") is None
    assert response.header("transfer-encoding") == "chunked"
    assert http.sha256(response.body) == http.sha256(http.payload(size))


@pytest.mark.parametrize("size", [10, 64 * 1024, 64 * 1024 + 1, 5 * MiB])
async def test_post_content_length_echo(router, upstream, http, size):
    """Small bodies are buffered before the decision, large ones streamed."""
    body = http.payload(size)[::-1]
    response = await http.request(router.address, "POST", "/echo", body=body)
    assert response.status == 200
    echo = response.json()
    assert echo["length"] == size and echo["sha256"] == http.sha256(body)
    assert echo["method"] == "POST"
    sent = [v for n, v in echo["headers"] if n == "content-length"]
    assert sent == [str(size)]
    assert not [v for n, v in echo["headers"] if n == "transfer-encoding"]


@pytest.mark.parametrize("size", [0, 100, 3 * MiB + 5])
async def test_post_chunked_upload_echo(router, http, size):
    body = http.payload(size)
    client = await http.connect(router.address)
    await client.send(http.build_request("POST", "/echo", [("Transfer-Encoding", "chunked")])
                      + http.chunked(body, 50_000))
    response = await client.read_response()
    assert response.status == 200
    echo = response.json()
    assert echo["length"] == size and echo["sha256"] == http.sha256(body)


async def test_post_small_body_visible_to_policy(start_router, upstream, http):
    """A buffered body is on Request.body when the policy runs; a streamed one is None."""
    from arr.config import config_from_dict
    from arr.routing import build_routing

    config = config_from_dict(http.pool_config(upstream, limits={"body_buffer": 1024},
                                               router={"mode": "proxy", "access_log": False}))
    routing = build_routing(config)
    seen = []

    def policy(request):
        seen.append(request.body)
        return routing.policy(request)

    router = await start_router(config, policy=policy, pools=routing.pools)
    await http.request(router.address, "POST", "/echo", body=b"hello")
    response = await http.request(router.address, "POST", "/echo", body=b"x" * 5000)
    assert response.json()["length"] == 5000
    assert seen == [b"hello", None]


async def test_post_empty_body_keeps_content_length_zero(router, http):
    response = await http.request(router.address, "POST", "/echo", body=b"")
    echo = response.json()
    assert echo["length"] == 0
    assert [v for n, v in echo["headers"] if n == "content-length"] == ["0"]


async def test_expect_100_continue_interim_first(router, http):
    client = await http.connect(router.address)
    body = b"abc" * 1000
    await client.send(http.build_request("PUT", "/echo", [("Expect", "100-continue"),
                                                           ("Content-Length", str(len(body)))]))
    interim = await asyncio.wait_for(client.reader.readuntil(b"\r\n\r\n"), 5)
    assert interim.startswith(b"HTTP/1.1 100 ")
    await client.send(body)
    response = await client.read_response()
    assert response.status == 200
    assert response.json()["sha256"] == http.sha256(body)
    assert not any(n == "expect" for n, _ in response.json()["headers"])


async def test_head(router, http):
    response = await http.request(router.address, "HEAD", "/bytes/12345")
    assert response.status == 200 and response.complete
    assert response.header("content-length") == "12345"
    assert response.body == b""


async def test_head_then_get_on_same_connection(router, http):
    client = await http.connect(router.address)
    await client.send(http.build_request("HEAD", "/bytes/500") + http.build_request("GET", "/bytes/7"))
    head = await client.read_response("HEAD")
    get = await client.read_response("GET")
    assert head.body == b"" and head.header("content-length") == "500"
    assert get.body == http.payload(7)


async def test_ten_keepalive_requests_on_one_connection(router, upstream, http):
    client = await http.connect(router.address)
    for i in range(10):
        size = 1000 * (i + 1)
        await client.send(http.build_request("GET", f"/bytes/{size}"))
        response = await client.read_response()
        assert response.status == 200 and response.body == http.payload(size)
        assert response.header("connection") is None
    assert len(upstream.served) == 10
    assert router.metrics.value("arr_connections_total") == 1


async def test_pipelined_requests_answered_in_order(router, http):
    client = await http.connect(router.address)
    sizes = [5, 70_000, 1, 300, 2 * MiB, 42]
    await client.send(b"".join(http.build_request("GET", f"/bytes/{s}") for s in sizes)
                      + http.build_request("GET", "/status/404"))
    for size in sizes:
        response = await client.read_response()
        assert response.status == 200
        assert len(response.body) == size and response.body == http.payload(size)
    last = await client.read_response()
    assert last.status == 404


async def test_forwarding_headers_added(router, http):
    response = await http.request(router.address, "GET", "/echo")
    headers = response.json()["headers"]
    values = lambda name: [v for n, v in headers if n == name]  # noqa: E731
    assert values("x-forwarded-for") == ["127.0.0.1"]
    assert values("forwarded") == ['for=127.0.0.1;proto=http;host=test.local']
    assert values("x-forwarded-proto") == ["http"]
    assert values("host") == ["test.local"]


async def test_forwarding_headers_appended_to_existing(router, http):
    response = await http.request(router.address, "GET", "/echo", headers=[
        ("X-Forwarded-For", "203.0.113.7"), ("X-Forwarded-For", "198.51.100.1, 10.0.0.1"),
        ("Forwarded", 'for="[2001:db8::1]";proto=https'), ("X-Forwarded-Proto", "https")])
    headers = response.json()["headers"]
    values = lambda name: [v for n, v in headers if n == name]  # noqa: E731
    assert values("x-forwarded-for") == ["203.0.113.7, 198.51.100.1, 10.0.0.1, 127.0.0.1"]
    assert values("forwarded") == [
        'for="[2001:db8::1]";proto=https, for=127.0.0.1;proto=http;host=test.local']
    assert values("x-forwarded-proto") == ["https"]


async def test_hop_by_hop_request_headers_not_forwarded(router, http):
    response = await http.request(router.address, "GET", "/echo", headers=[
        ("Connection", "keep-alive, X-Secret"), ("X-Secret", "s3cr3t"), ("Keep-Alive", "timeout=5"),
        ("TE", "trailers"), ("Upgrade", "h2c"), ("Proxy-Authorization", "Basic Zm9vOmJhcg=="),
        ("X-Kept", "yes")])
    assert response.status == 200
    names = {n for n, _ in response.json()["headers"]}
    for hop in ("x-secret", "keep-alive", "te", "upgrade", "proxy-authorization"):
        assert hop not in names, hop
    assert "x-kept" in names
    # the relay's connection to the target is its own, kept alive (HTTP/1.1 default)
    assert [v for n, v in response.json()["headers"] if n == "connection"] == []


async def test_upstream_connections_are_kept_alive_and_reused(router, upstream, http):
    for _ in range(5):  # five client connections, one after the other
        response = await http.request(router.address, "GET", "/bytes/1000")
        assert response.status == 200 and len(response.body) == 1000
    assert upstream.connections == 1


async def test_requests_succeed_after_the_target_dropped_idle_connections(router, upstream, http):
    assert (await http.request(router.address, "GET", "/bytes/10")).status == 200
    await upstream.stop()  # closes every connection, the router's idle one too
    await upstream.start()
    for _ in range(3):
        response = await http.request(router.address, "GET", "/bytes/100")
        assert response.status == 200 and len(response.body) == 100


async def test_hop_by_hop_response_headers_not_forwarded(router, http):
    response = await http.request(router.address, "GET", "/hop")
    assert response.status == 200 and response.body == b"hop\n"
    assert response.header("x-hop-resp") is None
    assert response.header("keep-alive") is None
    assert response.header("x-end-resp") == "1"
    assert response.header("x-upstream") == "up"


async def test_upstream_status_passed_through(router, http):
    for code in (201, 301, 404, 500, 503):
        response = await http.request(router.address, "GET", f"/status/{code}")
        assert response.status == code
        assert response.body == f"status {code}\n".encode()


async def test_health_path_answered_locally(router, upstream, http):
    response = await http.request(router.address, "GET", "/_arr/health")
    assert response.status == 200 and response.body == b"ok\n"
    assert not any(r.target == "/_arr/health" for r in upstream.requests)
    assert upstream.served == []


async def test_query_string_relayed(router, http):
    response = await http.request(router.address, "GET", "/echo?a=1&b=%20")
    assert response.json()["target"] == "/echo?a=1&b=%20"
    assert json.loads(response.body)["method"] == "GET"
