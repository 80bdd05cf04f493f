"""Upstream failures, health checks and draining, connection lifecycle, metrics."""

import asyncio
import socket
import sys
import time

import pytest

from arr import HealthRule, Target, TargetState


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def eventually(predicate, timeout=3.0, interval=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(interval)
    return predicate()


# ---------------------------------------------------------------- upstream failures


async def test_target_port_closed_is_502(start_router, http):
    dead = f"127.0.0.1:{closed_port()}"
    router = await start_router({"targets": [{"address": dead}]})
    response = await http.request(router.address, "GET", "/x")
    assert response.status == 502
    assert router.metrics.value("arr_upstream_errors_total", {"target": dead, "kind": "connect"}) == 1
    assert router.metrics.value("arr_requests_total",
                                {"decision": "proxy", "status": "502", "target": ""}) == 1


async def test_connect_failure_retried_on_other_target(start_router, upstream, http):
    dead = f"127.0.0.1:{closed_port()}"
    router = await start_router({"targets": [{"address": dead}, {"address": upstream.target}]})
    for _ in range(4):
        response = await http.request(router.address, "GET", "/whoami")
        assert response.status == 200 and response.body == b"up"
    assert router.metrics.value("arr_upstream_errors_total", {"target": dead, "kind": "connect"}) >= 1


async def test_upstream_silent_past_read_timeout_is_504(start_router, upstream, http):
    router = await start_router(http.pool_config(upstream, upstream={"read_timeout": 0.3}))
    started = time.monotonic()
    response = await http.request(router.address, "GET", "/slow/5")
    assert response.status == 504
    assert 0.25 <= time.monotonic() - started < 3
    assert router.metrics.value("arr_upstream_errors_total",
                                {"target": upstream.target, "kind": "read-timeout"}) == 1


async def test_upstream_garbage_is_502(start_router, upstream, http):
    router = await start_router(http.pool_config(upstream))
    assert (await http.request(router.address, "GET", "/garbage")).status == 502


@pytest.mark.parametrize("path", ["/abort/200000", "/abort-chunked/200000"])
async def test_upstream_closing_mid_body_aborts_client(start_router, upstream, http, path):
    router = await start_router(http.pool_config(upstream))
    client = await http.connect(router.address)
    await client.send(http.build_request("GET", path))
    head = await client.read_head()
    assert head.status == 200
    with pytest.raises(http.IncompleteResponse) as info:
        await client.read_body(head)
    assert not info.value.response.complete
    assert len(info.value.response.body) <= 100_000
    assert await client.closed_by_peer()
    # and the router is fine
    assert (await http.request(router.address, "GET", "/bytes/10")).status == 200


SPIN_SCRIPT = r"""
import asyncio, arr
from arr.config import config_from_dict

async def answer(reader, writer):
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
    await writer.drain()
    await asyncio.sleep(1)
    writer.close()

async def main():
    upstream = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = upstream.sockets[0].getsockname()[1]
    router = arr.Router(config_from_dict({
        "targets": [{"address": f"127.0.0.1:{port}"}],
        "router": {"mode": "proxy", "listen": "127.0.0.1:0", "access_log": False}}))
    await router.start()
    reader, writer = await asyncio.open_connection(*router.address)
    writer.write(b"CONNECT 127.0.0.1:9 HTTP/1.1\r\nHost: 127.0.0.1:9\r\n\r\n")
    try:
        await asyncio.wait_for(reader.read(1000), 2)
    except asyncio.TimeoutError:
        pass
    reader, writer = await asyncio.open_connection(*router.address)
    writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    data = await asyncio.wait_for(reader.read(1000), 2)
    assert data.startswith(b"HTTP/1.1 200"), data
    print("served")
    await router.shutdown(0.1)

asyncio.run(main())
"""


async def test_connect_answered_2xx_by_upstream_does_not_hang_router():
    """Run in a child process: a hung event loop cannot time itself out."""
    import os
    from pathlib import Path
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", SPIN_SCRIPT, env=env,
                                                stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 6)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        out = b"<router hung>"
    assert out.strip() == b"served"


# ---------------------------------------------------------------- health


def test_record_check_rise_and_fall():
    rule = HealthRule(rise=2, fall=3)
    member = TargetState(Target("127.0.0.1", 1))
    assert [member.record_check(False, rule) for _ in range(3)] == [False, False, True]
    assert not member.healthy and not member.available
    assert member.record_check(True, rule) is False and not member.healthy
    assert member.record_check(False, rule) is False  # resets the ok streak
    assert [member.record_check(True, rule) for _ in range(2)] == [False, True]
    assert member.healthy and member.available


async def test_active_health_check_down_and_up(start_router, upstreams, http):
    a, b = await upstreams("a", "b")
    router = await start_router(http.pool_config(a, b, health={
        "path": "/status/200", "interval": 0.05, "timeout": 0.2, "rise": 2, "fall": 2}))
    pool = router.pools["default"]
    member_a = pool.find(a.target)
    up_a = {"pool": "default", "target": a.target}
    assert router.metrics.value("arr_target_up", up_a) == 1

    await a.stop()
    assert await eventually(lambda: not member_a.healthy)
    fails = router.metrics.value("arr_health_checks_total", {**up_a, "result": "fail"})
    assert fails >= 2
    assert router.metrics.value("arr_target_up", up_a) == 0
    for _ in range(5):
        assert (await http.request(router.address, "GET", "/whoami")).body == b"b"

    await a.start(port=a.port)
    assert await eventually(lambda: member_a.healthy)
    assert router.metrics.value("arr_target_up", up_a) == 1
    names = {(await http.request(router.address, "GET", "/whoami")).body for _ in range(4)}
    assert names == {b"a", b"b"}


async def test_health_check_status_out_of_range_marks_down(start_router, upstream, http):
    router = await start_router(http.pool_config(upstream, health={
        "path": "/status/500", "interval": 0.05, "timeout": 0.2, "rise": 1, "fall": 1}))
    member = router.pools["default"].find(upstream.target)
    assert await eventually(lambda: not member.healthy)
    response = await http.request(router.address, "GET", "/whoami")
    assert response.status == 503 and response.body == b"no healthy target\n"


async def test_pool_without_health_section_is_not_probed(start_router, upstream, http):
    router = await start_router(http.pool_config(upstream))
    await asyncio.sleep(0.2)
    assert router.metrics.value("arr_health_checks_total",
                                {"pool": "default", "target": upstream.target, "result": "ok"}) == 0
    assert [r for r in upstream.requests if r.header_all("user-agent") == ["arr-health"]] == []


async def test_drain_stops_new_requests_to_target(start_router, upstreams, http):
    a, b = await upstreams("a", "b")
    router = await start_router(http.pool_config(a, b))
    pool = router.pools["default"]
    pool.drain(a.target)
    before = len(a.served)
    for _ in range(6):
        assert (await http.request(router.address, "GET", "/whoami")).body == b"b"
    assert len(a.served) == before
    pool.drain(a.target, False)
    names = {(await http.request(router.address, "GET", "/whoami")).body for _ in range(4)}
    assert names == {b"a", b"b"}
    with pytest.raises(KeyError):
        pool.drain("127.0.0.1:1")


async def test_drain_lets_in_flight_request_finish(start_router, upstream, http):
    router = await start_router(http.pool_config(upstream))
    client = await http.connect(router.address)
    await client.send(http.build_request("GET", "/slow/0.3"))
    assert await eventually(lambda: any(r.target == "/slow/0.3" for r in upstream.served))
    router.pools["default"].drain(upstream.target)
    response = await client.read_response()
    assert response.status == 200 and response.body == b"slow\n"
    assert (await http.request(router.address, "GET", "/whoami")).status == 503


# ---------------------------------------------------------------- lifecycle


async def test_max_connections_extra_gets_503(start_router, upstream, http):
    router = await start_router(http.pool_config(upstream, limits={"max_connections": 2}))
    held = []
    for _ in range(2):
        client = await http.connect(router.address)
        await client.send(http.build_request("GET", "/bytes/1"))
        assert (await client.read_response()).status == 200
        held.append(client)
    extra = await http.connect(router.address)
    response = await extra.read_response()
    assert response.status == 503
    assert await extra.closed_by_peer()
    assert router.metrics.value("arr_refused_connections_total") == 1
    # the held ones still work; freeing one admits a new client
    await held[0].send(http.build_request("GET", "/bytes/2"))
    assert (await held[0].read_response()).body == http.payload(2)
    await held[1].close()
    assert await eventually(lambda: router.metrics.value("arr_active_connections") == 1)
    assert (await http.request(router.address, "GET", "/bytes/3")).status == 200


async def test_shutdown_finishes_in_flight_and_refuses_new(start_router, upstream, http):
    router = await start_router(http.pool_config(upstream))
    idle = await http.connect(router.address)
    await idle.send(http.build_request("GET", "/bytes/1"))
    assert (await idle.read_response()).status == 200
    busy = await http.connect(router.address)
    await busy.send(http.build_request("GET", "/slow/0.4"))
    assert await eventually(lambda: any(r.target == "/slow/0.4" for r in upstream.served))

    address = router.address
    stopping = asyncio.create_task(router.shutdown(timeout=5))
    await asyncio.sleep(0.05)
    with pytest.raises(OSError):
        await asyncio.open_connection(*address)
    assert await idle.closed_by_peer()
    response = await busy.read_response()
    assert response.status == 200 and response.body == b"slow\n" and response.complete
    assert response.header("connection") == "close"
    await asyncio.wait_for(stopping, 5)
    assert await busy.closed_by_peer()


async def test_max_requests_per_connection(start_router, upstream, http):
    router = await start_router(http.pool_config(upstream, limits={"max_requests_per_connection": 3}))
    client = await http.connect(router.address)
    await client.send(b"".join(http.build_request("GET", f"/bytes/{n}") for n in range(1, 6)))
    responses = [await client.read_response() for _ in range(3)]
    assert [r.body for r in responses] == [http.payload(1), http.payload(2), http.payload(3)]
    assert [r.header("connection") for r in responses] == [None, None, "close"]
    assert await client.closed_by_peer()
    assert len(upstream.served) == 3


async def test_keepalive_timeout_closes_idle_connection(start_router, upstream, http):
    router = await start_router(http.pool_config(upstream, limits={"keepalive_timeout": 0.2}))
    client = await http.connect(router.address)
    await client.send(http.build_request("GET", "/bytes/1"))
    assert (await client.read_response()).status == 200
    started = time.monotonic()
    assert await client.closed_by_peer(timeout=3)
    assert 0.15 <= time.monotonic() - started < 2


# ---------------------------------------------------------------- metrics


async def test_requests_counted_by_decision_status_target(start_router, upstream, http):
    router = await start_router(http.pool_config(upstream))
    for _ in range(3):
        await http.request(router.address, "GET", "/bytes/10")
    await http.request(router.address, "GET", "/status/404")
    await http.request(router.address, "GET", "/_arr/health")
    value = router.metrics.value
    assert value("arr_requests_total", {"decision": "proxy", "status": "200", "target": upstream.target}) == 3
    assert value("arr_requests_total", {"decision": "proxy", "status": "404", "target": upstream.target}) == 1
    assert value("arr_requests_total", {"decision": "local", "status": "200", "target": ""}) == 1
    assert value("arr_request_duration_seconds_count", {"decision": "proxy"}) == 4
    assert value("arr_proxied_bytes_total", {"direction": "response"}) >= 30
    assert b"arr_requests_total" in router.metrics.exposition()


async def test_active_connections_back_to_zero(start_router, upstream, http):
    router = await start_router(http.pool_config(upstream))
    clients = []
    for _ in range(3):
        client = await http.connect(router.address)
        await client.send(http.build_request("GET", "/bytes/1"))
        await client.read_response()
        clients.append(client)
    assert router.metrics.value("arr_active_connections") == 3
    assert router.metrics.value("arr_connections_total") == 3
    for client in clients:
        await client.close()
    assert await eventually(lambda: router.metrics.value("arr_active_connections") == 0)
