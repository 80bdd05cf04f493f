"""The admin interface (arr/admin.py): commands over real pools, the Unix
socket with its permissions and peer check, and the client."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from arr.admin import AdminCommands, AdminError, AdminServer, find_members, request
from arr.metrics import Metrics
from arr.policies import RoundRobin
from arr.pool import Pool, Target


def pools() -> dict[str, Pool]:
    a, b = Target("10.0.0.11", 80, name="t0"), Target("10.0.0.12", 80, weight=3, name="t1")
    return {"web": Pool.of("web", [a, b], RoundRobin()), "api": Pool.of("api", [b], RoundRobin())}


def test_targets_are_found_by_name_or_address_in_every_pool():
    p = pools()
    assert {(m.pool.name, m.state.name) for m in find_members(p, "t1")} == {("web", "t1"), ("api", "t1")}
    assert [m.state.name for m in find_members(p, "10.0.0.11:80")] == ["t0"]
    with pytest.raises(AdminError, match=r"no target 'nope' \(known: t0, t1\)"):
        find_members(p, "nope")


async def test_drain_enable_and_weight_change_what_the_pools_pick():
    p, metrics = pools(), Metrics()
    commands = AdminCommands(lambda: p, metrics)
    listed = await commands.run("targets", {})
    assert [(t["pool"], t["target"], t["weight"], t["available"]) for t in listed] == [
        ("web", "t0", 1, True), ("web", "t1", 3, True), ("api", "t1", 3, True)]
    drained = await commands.run("drain", {"target": "t1"})
    assert all(t["draining"] and not t["available"] for t in drained) and len(drained) == 2
    assert metrics.value("arr_target_up", {"pool": "api", "target": "t1"}) == 0
    assert {p["web"].pick(None).name for _ in range(10)} == {"t0"}  # type: ignore[arg-type]
    assert p["api"].pick(None) is None  # type: ignore[arg-type]
    await commands.run("enable", {"target": "10.0.0.12:80"})
    assert metrics.value("arr_target_up", {"pool": "api", "target": "t1"}) == 1
    changed = await commands.run("weight", {"target": "t1", "weight": 0})
    assert [t["weight"] for t in changed] == [0, 0] and [t["configured_weight"] for t in changed] == [3, 3]
    assert not p["web"].find("t1").available


@pytest.mark.parametrize("line,error", [
    (b"nonsense\n", "not JSON"), (b"[1]\n", '"command" string'), (b'{"command": "fly"}\n', "unknown command"),
    (b'{"command": "drain"}\n', '"target"'), (b'{"command": "weight", "args": {"target": "t0", "weight": -1}}\n',
                                              "integer 0-1000000"),
    (b'{"command": "reload"}\n', "no configuration file"), (b'{"command": "drain", "args": 3}\n', '"args"'),
])
async def test_bad_requests_get_a_clear_error(line, error):
    answer = await AdminCommands(pools, Metrics()).answer(line)
    assert answer["ok"] is False and error in answer["error"]


async def test_the_socket_is_private_and_answers_the_client():
    p = pools()
    directory = Path(tempfile.mkdtemp(prefix="arr-admin-"))
    directory.chmod(0o755)  # reachable by the other uid below: only the peer check stands in its way
    path = directory / "admin.sock"
    server = AdminServer(AdminCommands(lambda: p, Metrics()), path)
    await server.start()
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        result = await asyncio.to_thread(request, "drain", {"target": "t0"}, path=path)
        assert result[0]["draining"] is True and p["web"].find("t0").draining
        with pytest.raises(AdminError, match="no target 'x'"):
            await asyncio.to_thread(request, "enable", {"target": "x"}, path=path)
        # Another uid (the mode aside: root can open the file, so the peer check is what refuses).
        if os.geteuid() == 0:
            code = ("import os, socket, sys; os.setgid(65534); os.setuid(65534); "
                    "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); print(s.recv(200).decode())")
            os.chmod(path, 0o666)
            out = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", code, str(path)],
                                          capture_output=True, text=True, timeout=30)
            assert out.returncode == 0, out.stderr
            assert json.loads(out.stdout) == {"ok": False, "error": "not allowed"}
            assert server.refused == 1
        # A second router on the same path is refused, the first keeps it.
        with pytest.raises(OSError, match="in use"):
            await AdminServer(AdminCommands(lambda: p, Metrics()), path).start()
    finally:
        await server.stop()
        shutil.rmtree(directory, ignore_errors=True)
    assert not path.exists()
    with pytest.raises(AdminError, match="no admin socket"):
        request("targets", path=path)
