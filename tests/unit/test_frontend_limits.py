"""Bad clients: each gets its exact 4xx and is closed; good clients never notice."""

import asyncio
import random
import time

import pytest

MiB = 1 << 20
HEADER_BYTES = 1024
MAX_BODY = 100_000
TIMEOUT = 0.3

LIMITS = {"header_bytes": HEADER_BYTES, "header_timeout": TIMEOUT, "body_timeout": TIMEOUT,
          "max_body": MAX_BODY, "body_buffer": 16 * 1024}


@pytest.fixture
async def router(start_router, upstream, http):
    return await start_router(http.pool_config(upstream, limits=LIMITS))


def _req(*lines: str, body: bytes = b"") -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


# name -> (what to send, whether to then stall, expected status, expected reason)
BAD = {
    "malformed-line": (b"GARBAGE\r\n\r\n", 400, "malformed"),
    "malformed-version": (b"GET / HTTP/9.x\r\nHost: a\r\n\r\n", 400, "malformed"),
    "bad-header-line": (b"GET / HTTP/1.1\r\nHost: a\r\nno colon here\r\n\r\n", 400, "malformed"),
    "header-too-large": (b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * (2 * HEADER_BYTES),
                         431, "header-too-large"),
    "content-length-too-large": (_req("POST /echo HTTP/1.1", "Host: a", f"Content-Length: {MAX_BODY + 1}"),
                                 413, "body-too-large"),
    "chunked-too-large": (_req("POST /echo HTTP/1.1", "Host: a", "Transfer-Encoding: chunked")
                          + b"%x\r\n" % (MAX_BODY + 10) + b"z" * (MAX_BODY + 10), 413, "body-too-large"),
    "stalled-head": (b"GET /bytes/10 HTTP/1.1\r\nHost: a\r\nX-Partial: ", 408, "head-deadline"),
    "stalled-body": (_req("POST /echo HTTP/1.1", "Host: a", "Content-Length: 1000", body=b"x" * 10),
                     408, "body-stalled"),
    "stalled-streamed-body": (_req("POST /echo HTTP/1.1", "Host: a", "Content-Length: 90000",
                                   body=b"x" * 40000), 408, "body-stalled"),
    "cl-and-te": (_req("POST /echo HTTP/1.1", "Host: a", "Content-Length: 5",
                       "Transfer-Encoding: chunked", body=b"0\r\n\r\n"), 400, "conflicting-framing"),
    "conflicting-cl": (_req("POST /echo HTTP/1.1", "Host: a", "Content-Length: 5", "Content-Length: 6",
                            body=b"hello"), 400, "malformed"),
    "bad-chunk-size": (_req("POST /echo HTTP/1.1", "Host: a", "Transfer-Encoding: chunked")
                       + b"zz\r\nhello\r\n0\r\n\r\n", 400, "malformed"),
}


async def run_bad(http, address, name):
    data, status, _ = BAD[name]
    client = await http.connect(address)
    await client.send(data)
    response = await client.read_response(timeout=5)
    assert response.status == status, (name, response.status, response.body)
    assert response.header("connection") == "close", name
    assert await client.closed_by_peer(), f"{name}: connection left open"
    await client.close()
    return response


@pytest.mark.parametrize("name", sorted(BAD))
async def test_bad_client_gets_exact_status_and_is_closed(router, http, name):
    started = time.monotonic()
    await run_bad(http, router.address, name)
    elapsed = time.monotonic() - started
    _, status, reason = BAD[name]
    assert router.metrics.value("arr_client_errors_total",
                                {"reason": reason, "status": str(status)}) == 1
    if status == 408:
        assert TIMEOUT * 0.9 <= elapsed < 4 * TIMEOUT + 1
    # the router still serves a new client
    ok = await http.request(router.address, "GET", "/bytes/100")
    assert ok.status == 200 and ok.body == http.payload(100)


async def test_chunked_over_max_body_while_buffered(start_router, upstream, http):
    """max_body below body_buffer: the 413 comes while buffering for the decision."""
    router = await start_router(http.pool_config(upstream, limits={**LIMITS, "max_body": 1000}))
    client = await http.connect(router.address)
    await client.send(_req("POST /echo HTTP/1.1", "Host: a", "Transfer-Encoding: chunked")
                      + b"400\r\n" + b"a" * 1024 + b"\r\n")
    response = await client.read_response()
    assert response.status == 413
    assert await client.closed_by_peer()
    assert upstream.served == []  # never relayed


async def test_body_exactly_max_body_accepted(start_router, upstream, http):
    router = await start_router(http.pool_config(upstream, limits={**LIMITS, "max_body": 1000}))
    response = await http.request(router.address, "POST", "/echo", body=b"q" * 1000)
    assert response.status == 200 and response.json()["length"] == 1000


async def test_complete_oversized_head_in_one_packet_is_431_and_the_connection_goes_on(router, http, upstream):
    """Read whole and body-less, the refused request costs the keep-alive
    client nothing else: its next request on the same connection is served."""
    client = await http.connect(router.address)
    await client.send(_req("GET /bytes/10 HTTP/1.1", "Host: a", "X-Big: " + "b" * (8 * HEADER_BYTES)))
    response = await client.read_response()
    assert response.status == 431
    await client.send(_req("GET /bytes/10 HTTP/1.1", "Host: a"))
    response = await client.read_response()
    assert response.status == 200 and len(response.body) == 10
    assert len(upstream.served) == 1  # the refused one never relayed


async def test_oversized_head_with_a_body_is_431_and_closes(router, http):
    client = await http.connect(router.address)
    await client.send(_req("POST /echo HTTP/1.1", "Host: a", "Content-Length: 3",
                           "X-Big: " + "b" * (8 * HEADER_BYTES)) + b"abc")
    response = await client.read_response()
    assert response.status == 431
    assert await client.closed_by_peer()


async def test_keepalive_after_body_larger_than_header_bytes(router, http):
    """The head-size accounting starts afresh for each request on a connection."""
    client = await http.connect(router.address)
    body = b"p" * (5 * HEADER_BYTES)
    await client.send(http.build_request("POST", "/echo", body=body))
    assert (await client.read_response()).json()["length"] == len(body)
    await client.send(http.build_request("POST", "/echo", body=body) + http.build_request("GET", "/bytes/3"))
    assert (await client.read_response()).json()["length"] == len(body)
    assert (await client.read_response()).body == http.payload(3)


async def test_idle_new_connection_times_out_408(router, http):
    client = await http.connect(router.address)
    response = await client.read_response(timeout=5)
    assert response.status == 408
    assert await client.closed_by_peer()


async def test_bad_clients_do_not_disturb_a_concurrent_download(router, http):
    size = 16 * MiB
    good = await http.connect(router.address)
    await good.send(http.build_request("GET", f"/bytes/{size}"))
    response = await good.read_head()
    assert response.status == 200
    await good.read_body(response, at_least=MiB)
    assert not response.complete

    for name in sorted(BAD):
        await run_bad(http, router.address, name)

    await good.read_body(response)
    assert response.complete and len(response.body) == size
    assert http.sha256(response.body) == http.sha256(http.payload(size))
    # the router still serves new clients, on the same connection and on new ones
    await good.send(http.build_request("GET", "/bytes/10"))
    assert (await good.read_response()).body == http.payload(10)
    fresh = await http.request(router.address, "GET", "/chunked/1000")
    assert fresh.body == http.payload(1000)


async def test_hundred_bad_clients_concurrently_with_good_ones(router, http):
    rng = random.Random(7)
    names = [rng.choice(sorted(BAD)) for _ in range(100)]

    async def good(i):
        size = MiB + i * 1000
        if i % 2:
            body = http.payload(MAX_BODY - i)
            response = await http.request(router.address, "POST", "/echo", body=body)
            assert response.json()["sha256"] == http.sha256(body)
        else:
            response = await http.request(router.address, "GET", f"/bytes/{size}")
            assert http.sha256(response.body) == http.sha256(http.payload(size))
        return response.status

    results = await asyncio.wait_for(asyncio.gather(
        *(run_bad(http, router.address, n) for n in names), *(good(i) for i in range(6))), 30)
    assert [r.status for r in results[:100]] == [BAD[n][1] for n in names]
    assert results[100:] == [200] * 6
    total = sum(router.metrics.value("arr_client_errors_total", {"reason": r, "status": str(s)})
                for s, r in {(s, r) for _, s, r in BAD.values()})
    assert total == 100
    assert (await http.request(router.address, "GET", "/bytes/5")).status == 200


# ---------------------------------------------------------------- deadlines and rates

DEADLINE = 1.0


async def trickle(client, data: bytes, every: float) -> None:
    """Send DATA a byte at a time until the router closes the connection."""
    for i in range(len(data)):
        try:
            await client.send(data[i:i + 1])
        except (ConnectionError, OSError):
            return
        await asyncio.sleep(every)


async def cut_after(client, sending, expected_reason, router, status=408):
    """Wait for the router's answer while SENDING goes on; the seconds it took."""
    started = time.monotonic()
    task = asyncio.ensure_future(sending)
    try:
        response = await client.read_response(timeout=10)
    finally:
        task.cancel()
    assert response.status == status
    assert response.header("connection") == "close"
    assert await client.closed_by_peer()
    assert router.metrics.value("arr_client_errors_total",
                                {"reason": expected_reason, "status": str(status)}) == 1
    return time.monotonic() - started


async def test_head_deadline_runs_from_the_connection_start(start_router, upstream, http):
    """An idle start and a trickled head share one budget: cut at header_timeout after accept."""
    router = await start_router(http.pool_config(upstream, limits={"header_timeout": DEADLINE}))
    client = await http.connect(router.address)
    connected = time.monotonic()
    await asyncio.sleep(0.5)
    await cut_after(client, trickle(client, _req("GET /bytes/1 HTTP/1.1", "Host: a", "X-Pad: " + "p" * 50),
                                    0.05), "head-deadline", router)
    elapsed = time.monotonic() - connected
    assert DEADLINE * 0.9 <= elapsed < DEADLINE + 0.4  # not 0.5 + DEADLINE
    assert upstream.served == []


async def test_kept_alive_head_deadline_runs_from_its_first_byte(start_router, upstream, http):
    router = await start_router(http.pool_config(upstream, limits={"header_timeout": DEADLINE,
                                                                   "keepalive_timeout": 5.0}))
    client = await http.connect(router.address)
    await client.send(_req("GET /bytes/1 HTTP/1.1", "Host: a"))
    assert (await client.read_response()).status == 200
    await asyncio.sleep(DEADLINE * 1.2)  # idle between requests is keepalive_timeout's business
    elapsed = await cut_after(client, trickle(client, _req("GET /bytes/1 HTTP/1.1", "Host: a",
                                                           "X-Pad: " + "p" * 50), 0.05),
                              "head-deadline", router)
    assert DEADLINE * 0.9 <= elapsed < DEADLINE + 0.4
    assert len(upstream.served) == 1


BODY_LIMITS = {"body_timeout": 5.0, "body_deadline": 30.0, "min_body_rate": 0, "body_rate_grace": 0.5,
               "body_buffer": 1024, "max_body": 1 << 20}


@pytest.mark.parametrize("streamed", [False, True], ids=["buffered", "streamed"])
async def test_body_deadline_bounds_the_whole_body(start_router, upstream, http, streamed):
    """Bytes keep coming, each gap far under body_timeout: the deadline still cuts."""
    router = await start_router(http.pool_config(upstream, limits={**BODY_LIMITS, "body_deadline": DEADLINE}))
    client = await http.connect(router.address)
    await client.send(_req("POST /echo HTTP/1.1", "Host: a", "Content-Length: 100000")
                      + (b"s" * 2000 if streamed else b""))

    async def steady():
        while True:
            await client.send(b"x" * 50)
            await asyncio.sleep(0.05)

    elapsed = await cut_after(client, steady(), "body-deadline", router)
    assert DEADLINE * 0.9 <= elapsed < DEADLINE + 0.4
    assert upstream.served == []  # never a whole request upstream


@pytest.mark.parametrize("streamed", [False, True], ids=["buffered", "streamed"])
async def test_body_below_the_minimum_rate_is_cut_after_the_grace(start_router, upstream, http, streamed):
    rate = 2000 if streamed else 100
    router = await start_router(http.pool_config(upstream, limits={**BODY_LIMITS, "min_body_rate": rate}))
    client = await http.connect(router.address)
    prefix = b"s" * 1100 if streamed else b""  # beyond body_buffer: relayed while it arrives
    await client.send(_req("POST /echo HTTP/1.1", "Host: a", "Content-Length: 100000") + prefix)
    # 20 bytes/s, a byte every 50 ms: far inside body_timeout, far below the rate
    elapsed = await cut_after(client, trickle(client, b"x" * 1000, 0.05), "body-too-slow", router)
    budget = max(BODY_LIMITS["body_rate_grace"], len(prefix) / rate)  # waiting time the bytes bought
    assert budget * 0.9 <= elapsed < budget + 0.4
    assert upstream.served == []


async def test_body_at_the_minimum_rate_is_served(start_router, upstream, http):
    router = await start_router(http.pool_config(upstream, limits={**BODY_LIMITS, "min_body_rate": 100}))
    client = await http.connect(router.address)
    body = b"y" * 300
    await client.send(_req("POST /echo HTTP/1.1", "Host: a", f"Content-Length: {len(body)}"))
    for i in range(0, len(body), 50):  # 500 bytes/s
        await client.send(body[i:i + 50])
        await asyncio.sleep(0.1)
    response = await client.read_response()
    assert response.json()["sha256"] == http.sha256(body)


async def test_stalled_body_keeps_its_reason(start_router, upstream, http):
    router = await start_router(http.pool_config(upstream, limits={**BODY_LIMITS, "body_timeout": 0.3}))
    client = await http.connect(router.address)
    await client.send(_req("POST /echo HTTP/1.1", "Host: a", "Content-Length: 10") + b"abc")
    elapsed = await cut_after(client, asyncio.sleep(10), "body-stalled", router)
    assert 0.25 <= elapsed < 0.8
