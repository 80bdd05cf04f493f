"""The file-descriptor budget (arr/fdlimit.py) and how the router keeps it
(arr/server.py): the plan's arithmetic, then real routers on loopback whose
fd limit is small, and a real EMFILE."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import socket
import types

import pytest
from hypothesis import given
from hypothesis import strategies as st

import arr
import arr.server
from arr.config import ConfigError
from arr.fdlimit import FDS_PER_CONNECTION, fds_per_connection, plan_fds
from arr.health import probe
from arr.pool import HealthRule, Target, TargetState

LOOPBACK = "127.0.0.1"
REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


# ---------------------------------------------------------------- the plan


def test_a_limit_above_the_need_is_left_alone():
    plan = plan_fds(65536, 65536, 10_000, 256, 2)
    assert (plan.soft_limit, plan.max_connections, plan.needed) == (65536, 10_000, 20_256)
    assert not plan.raises_soft_limit and not plan.warning
    assert plan.describe() == ("file descriptors: limit 65536 (hard 65536) covers "
                               "limits.max_connections 10000 x 2 fds + 256 reserved = 20256")


def test_the_soft_limit_is_raised_to_the_need_when_the_hard_limit_allows():
    plan = plan_fds(1024, 524288, 10_000, 256, 2)
    assert (plan.soft_limit, plan.max_connections) == (20_256, 10_000)
    assert plan.raises_soft_limit and not plan.warning
    assert "soft limit raised 1024 -> 20256 (hard 524288)" in plan.describe()


def test_an_unlimited_hard_limit_allows_the_need_and_an_unlimited_soft_one_needs_nothing():
    assert plan_fds(1024, None, 1000, 256, 3).soft_limit == 3256
    unlimited = plan_fds(None, None, 100, 256, 3)
    assert unlimited.soft_limit is None and unlimited.max_connections == 100
    assert "limit unlimited (hard unlimited)" in unlimited.describe()


def test_what_the_hard_limit_cannot_hold_lowers_max_connections_and_says_how_to_fix_it():
    plan = plan_fds(1024, 1024, 10_000, 256, 2)
    assert (plan.soft_limit, plan.max_connections) == (1024, 384)  # (1024 - 256) // 2
    assert plan.lowered and plan.warning
    assert plan.describe() == (
        "file descriptors: limit 1024 (hard 1024) holds 384 client connections, not the "
        "limits.max_connections 10000 x 2 fds + 256 reserved = 20256 needed: serving at most 384 "
        "(more are answered 503); raise the limit (ulimit -n 20256, or LimitNOFILE=20256 in the "
        "systemd unit) or lower limits.max_connections")


def test_the_soft_limit_is_raised_as_far_as_the_hard_one_goes():
    plan = plan_fds(1024, 4096, 10_000, 256, 3)
    assert (plan.soft_limit, plan.max_connections) == (4096, 1280)


def test_a_limit_below_the_reserve_leaves_no_connection():
    assert plan_fds(200, 200, 10, 256, 2).max_connections == 0


def test_a_reserve_below_what_the_configuration_holds_is_warned_about():
    plan = plan_fds(65536, 65536, 100, 256, 2, shared_fds=300)
    assert plan.warning and not plan.lowered
    assert "limits.reserved_fds 256 is below the 300 fds" in plan.describe()


def test_per_connection_costs_by_mode():
    assert FDS_PER_CONNECTION == {"proxy": 2, "nat": 3}
    assert fds_per_connection("proxy") == 2 and fds_per_connection("nat") == 3
    assert fds_per_connection("something-new") == 3  # never too few


def test_impossible_inputs_are_refused():
    with pytest.raises(ValueError):
        plan_fds(2048, 1024, 10, 256, 2)
    with pytest.raises(ValueError):
        plan_fds(1024, 1024, 10, 256, 0)


limits = st.one_of(st.none(), st.integers(0, 1 << 22))


@given(soft=limits, hard=limits, configured=st.integers(1, 1 << 20), reserved=st.integers(16, 1 << 14),
       per=st.sampled_from(sorted(set(FDS_PER_CONNECTION.values()))), shared=st.integers(0, 1 << 14))
def test_plan_properties(soft, hard, configured, reserved, per, shared):
    if soft is None and hard is not None:
        soft = hard  # an unlimited soft limit under a finite hard one does not exist
    if soft is not None and hard is not None and soft > hard:
        soft, hard = hard, soft
    plan = plan_fds(soft, hard, configured, reserved, per, shared)
    assert 0 <= plan.max_connections <= configured
    # never above the hard limit, never lowered
    if hard is not None:
        assert plan.soft_limit is not None and plan.soft_limit <= hard
    if soft is None:
        assert plan.soft_limit is None
    else:
        assert plan.soft_limit is None or plan.soft_limit >= soft
    # with the plan applied, the budget fits (or nothing is admitted)
    if plan.soft_limit is not None:
        fits = plan.max_connections * per + reserved <= plan.soft_limit
        assert fits or plan.max_connections == 0
        # and it is the most that fits
        if plan.max_connections < configured:
            assert (plan.max_connections + 1) * per + reserved > plan.soft_limit
            assert plan.soft_limit == (hard if hard is not None else plan.soft_limit)
    # the soft limit is raised only when the configured number needs it
    if plan.raises_soft_limit:
        assert soft is not None and soft < plan.needed


# ---------------------------------------------------------------- the router


def fake_rlimit(monkeypatch, soft: int, hard: int) -> list[tuple[int, int]]:
    """arr.server sees SOFT/HARD as its RLIMIT_NOFILE; returns the setrlimit calls."""
    calls: list[tuple[int, int]] = []
    fake = types.SimpleNamespace(
        RLIMIT_NOFILE=resource.RLIMIT_NOFILE, RLIM_INFINITY=resource.RLIM_INFINITY,
        getrlimit=lambda which: (soft, hard),
        setrlimit=lambda which, limits: calls.append(limits))
    monkeypatch.setattr(arr.server, "resource", fake)
    return calls


def answer_ok(request: arr.Request) -> arr.Decision:
    return arr.Local(lambda r: arr.LocalResponse(200, b"ok\n"))


async def exchange(address: tuple[str, int], timeout: float = 10.0
                   ) -> tuple[str, asyncio.StreamWriter | None]:
    """Connect, send one keep-alive request, read its answer: ("200", writer
    held open), ("503", None: closed by the router), or what went wrong."""
    reader, writer = await asyncio.open_connection(*address)
    writer.write(REQUEST)
    try:
        async with asyncio.timeout(timeout):
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:")))
            await reader.readexactly(length)
            status = head.split()[1].decode()
            if status == "503":
                closed = await reader.read(1) == b""
                writer.close()
                return ("503" if closed else "503-not-closed"), None
            return status, writer
    except (asyncio.IncompleteReadError, ConnectionResetError) as exc:
        writer.close()
        return f"no-answer:{type(exc).__name__}", None
    except TimeoutError:
        writer.close()
        return "timeout", None


async def test_router_start_raises_the_soft_limit(start_router, monkeypatch):
    calls = fake_rlimit(monkeypatch, 1024, 1 << 20)
    router = await start_router({"limits": {"max_connections": 1000, "reserved_fds": 100}},
                                policy=answer_ok)
    assert calls == [(2100, 1 << 20)]
    assert router.max_connections == 1000 and router.fd_plan.soft_limit == 2100


async def test_router_start_lowers_max_connections_to_the_limit_and_logs_it(start_router, monkeypatch,
                                                                            caplog):
    fake_rlimit(monkeypatch, 1024, 1024)
    with caplog.at_level(logging.INFO, logger="arr"):
        router = await start_router({"limits": {"max_connections": 10_000}}, policy=answer_ok)
    assert router.max_connections == 384
    assert router.metrics.value("arr_max_connections") == 384
    lines = [r for r in caplog.records if r.getMessage().startswith("file descriptors:")]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    assert "serving at most 384" in lines[0].getMessage()


async def test_router_start_refuses_a_limit_with_no_room(monkeypatch):
    fake_rlimit(monkeypatch, 100, 100)
    router = arr.Router(arr.Config(router=arr.RouterSettings(listen=(LOOPBACK, 0), mode="proxy")),
                        policy=answer_ok)
    with pytest.raises(ConfigError, match="holds 0 client connections"):
        await router.start()


async def test_the_lowered_max_connections_is_where_503_starts(start_router, monkeypatch):
    # reserved 16 + 2 connections x 2 fds: room for exactly two clients
    fake_rlimit(monkeypatch, 20, 20)
    router = await start_router({"limits": {"max_connections": 100, "reserved_fds": 16}},
                                policy=answer_ok)
    assert router.max_connections == 2
    held = [await exchange(router.address) for _ in range(2)]
    assert [status for status, _ in held] == ["200", "200"]
    assert await exchange(router.address) == ("503", None)
    assert router.metrics.value("arr_refused_connections_total") == 1
    for _, writer in held:
        writer.close()


def test_a_burst_beyond_max_connections_is_answered_503_every_one(on_both_loops, monkeypatch):
    """300 clients at once against room for 20: the burst waits in the backlog
    together, and each connection is admitted or answered as it is accepted,
    on asyncio and on uvloop."""
    fake_rlimit(monkeypatch, 16 + 20 * 2, 16 + 20 * 2)

    async def burst() -> tuple[dict[str, int], float, float]:
        config = arr.Config(router=arr.RouterSettings(listen=(LOOPBACK, 0), mode="proxy",
                                                      access_log=False, metrics=None),
                            limits=arr.Limits(reserved_fds=16))
        router = arr.Router(config, policy=answer_ok)
        await router.start()
        try:
            results = await asyncio.gather(*(exchange(router.address) for _ in range(300)))
            counts: dict[str, int] = {}
            for status, writer in results:
                counts[status] = counts.get(status, 0) + 1
                if writer is not None:
                    writer.close()
            return (counts, router.metrics.value("arr_refused_connections_total"),
                    router.metrics.value("arr_requests_total",
                                         {"decision": "local", "status": "200", "target": ""}))
        finally:
            await router.shutdown(0.5)

    counts, refused, decided = on_both_loops(burst())
    assert counts == {"200": 20, "503": 280}
    assert (refused, decided) == (280, 20)


# ---------------------------------------------------------------- EMFILE


class Exhausted:
    """Every fd of this process taken (soft limit lowered, the rest filled
    with /dev/null), until ``release``."""

    def __init__(self) -> None:
        self.limits = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.fillers: list[int] = []

    def __enter__(self) -> "Exhausted":
        highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 32, self.limits[1]))
        try:
            while True:
                self.fillers.append(os.open(os.devnull, os.O_RDONLY))
        except OSError as exc:
            assert exc.errno == errno.EMFILE
        return self

    def release(self) -> None:
        for fd in self.fillers:
            os.close(fd)
        self.fillers.clear()
        resource.setrlimit(resource.RLIMIT_NOFILE, self.limits)

    def __exit__(self, *exc: object) -> None:
        self.release()


async def connect_prepared(sock: socket.socket, address: tuple[str, int]) -> bytes:
    """Connect an already made socket (no fd needed) and read to EOF."""
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    await loop.sock_connect(sock, address)
    await loop.sock_sendall(sock, REQUEST.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
    received = b""
    async with asyncio.timeout(5):
        while chunk := await loop.sock_recv(sock, 65536):
            received += chunk
    return received


async def test_emfile_at_accept_is_answered_503_with_the_spare_fd(start_router):
    router = await start_router({"limits": {"max_connections": 100}}, policy=answer_ok)
    client = socket.socket()
    unreachable = TargetState(Target("127.0.0.1", 9))
    try:
        with Exhausted():
            received = await connect_prepared(client, router.address)
            # A health probe the router cannot make says nothing about its target.
            assert await probe(unreachable, HealthRule(timeout=1.0)) is None
        assert received.startswith(b"HTTP/1.1 503 ") and received.endswith(b"too many connections\n")
        assert router.metrics.value("arr_accept_errors_total", {"reason": "emfile"}) == 1
        assert router.metrics.value("arr_refused_connections_total") == 1
        # the spare is back: the next client is served as usual
        reader, writer = await asyncio.open_connection(*router.address)
        writer.write(REQUEST)
        assert (await reader.readuntil(b"ok\n")).startswith(b"HTTP/1.1 200 ")
        writer.close()
    finally:
        client.close()


async def test_emfile_without_a_spare_pauses_accepting_and_the_client_waits(start_router):
    router = await start_router({"limits": {"max_connections": 100}}, policy=answer_ok)
    os.close(router.listener.spare_fd)  # as if something else had taken it
    router.listener.spare_fd = None
    client = socket.socket()
    try:
        with Exhausted() as exhausted:
            answer = asyncio.create_task(connect_prepared(client, router.address))
            await asyncio.sleep(0.3)  # several pauses: the connection waits in the backlog
            assert not answer.done()
            assert router.metrics.value("arr_accept_errors_total", {"reason": "emfile"}) >= 1
            exhausted.release()
            received = await answer
        assert received.startswith(b"HTTP/1.1 200 ") and received.endswith(b"ok\n")
        assert router.metrics.value("arr_refused_connections_total") == 0
        assert router.listener.spare_fd is not None
    finally:
        client.close()
