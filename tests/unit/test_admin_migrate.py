"""``arr migrate`` and ``arr drain --move`` at the admin interface
(arr/admin.py) and the command line (arr/cli.py), with a fake migration
that records the orders it is given."""

from __future__ import annotations

import json

import pytest

from arr import admin as admin_module
from arr.admin import AdminCommands, AdminError
from arr.cli import build_parser, describe_move, main
from arr.metrics import Metrics
from arr.migration import MoveOrder, MoveReport, PortRange
from arr.policies import RoundRobin
from arr.pool import Pool, Target

T0, T1, T2 = ("10.0.0.11", 80), ("10.0.0.12", 80), ("10.0.0.13", 8080)


def pools() -> dict[str, Pool]:
    t0, t1 = Target(*T0, name="t0"), Target(*T1, weight=3, name="t1")
    t2 = Target(*T2, name="t2")
    return {"web": Pool.of("web", [t0, t1], RoundRobin()), "api": Pool.of("api", [t1, t2], RoundRobin())}


class FakeMigration:
    """An ``async (order) -> MoveReport`` that records each order."""

    def __init__(self, fail: BaseException | None = None) -> None:
        self.orders: list[MoveOrder] = []
        self.fail = fail

    async def __call__(self, order: MoveOrder) -> MoveReport:
        self.orders.append(order)
        if self.fail is not None:
            raise self.fail
        return MoveReport(order, selected=3, moved=2, reset=0, skipped={"gone": 1}, left={"client": 4},
                          seconds=0.5)


def commands(move_wait: float = 30.0, fail: BaseException | None = None
             ) -> tuple[AdminCommands, FakeMigration, dict[str, Pool]]:
    p, migration = pools(), FakeMigration(fail)
    return AdminCommands(lambda: p, Metrics(), migrate=migration, move_wait=move_wait), migration, p


# -------------------------------------------------------------------- migrate


async def test_migrate_resolves_names_and_addresses_and_reports():
    cmds, migration, _ = commands()
    result = await cmds.run("migrate", {"from": "t0", "to": "10.0.0.12:80", "client": "192.0.2.0/24",
                                        "port": "1000-1999", "max": 7, "mode": "reset", "wait": 5})
    (order,) = migration.orders
    assert order == MoveOrder(source=T0, destination=T1, mode="reset",
                              clients=MoveOrder.parse_clients("192.0.2.0/24"),
                              ports=PortRange(1000, 1999), limit=7, wait=5.0)
    assert result == {"from": "10.0.0.11:80", "to": "10.0.0.12:80", "mode": "reset", "client": "192.0.2.0/24",
                      "port": "1000-1999", "max": 7, "selected": 3, "moved": 2, "reset": 0,
                      "skipped": {"gone": 1}, "left": {"client": 4}, "seconds": 0.5}
    json.dumps(result)  # what the socket sends


async def test_migrate_defaults():
    cmds, migration, _ = commands(move_wait=12.5)
    await cmds.run("migrate", {"from": "10.0.0.13:8080"})
    await cmds.run("migrate", {"from": "t2", "to": "t1", "mode": "", "client": "", "port": ""})
    await cmds.run("migrate", {"from": "t2", "to": None, "mode": None, "client": None, "port": None,
                               "max": None, "wait": None})
    first, second, third = migration.orders
    assert first == MoveOrder(source=T2, destination=None, mode="live", wait=12.5)
    assert second == MoveOrder(source=T2, destination=T1, mode="live", wait=12.5)
    assert third == first
    assert first.clients is None and first.ports is None and first.limit is None


async def test_migrate_takes_a_single_port_as_a_number():
    cmds, migration, _ = commands()
    await cmds.run("migrate", {"from": "t0", "port": 443, "max": 0})
    assert migration.orders[0].ports == PortRange(443, 443) and migration.orders[0].limit == 0


@pytest.mark.parametrize("args,error", [
    ({"from": "t0", "tO": "t1"}, "unknown argument(s) tO"),
    ({"from": "t0", "target": "t1", "zz": 1}, "unknown argument(s) target, zz"),
    ({}, '"from"'), ({"from": ""}, '"from"'), ({"from": 3}, '"from"'), ({"to": "t1"}, '"from"'),
    ({"from": "t0", "to": ""}, '"to"'), ({"from": "t0", "to": 5}, '"to"'),
    ({"from": "nope"}, "no target 'nope' (known: t0, t1, t2)"),
    ({"from": "t0", "to": "10.0.0.99:80"}, "no target '10.0.0.99:80'"),
    ({"from": "t0", "to": "t0"}, "to: the destination is the source"),
    ({"from": "t0", "to": "10.0.0.11:80"}, "to: the destination is the source"),
    ({"from": "t0", "max": -1}, "max: "), ({"from": "t0", "max": "3"}, "max: "),
    ({"from": "t0", "max": 2.0}, "max: "), ({"from": "t0", "max": True}, "max: "),
    ({"from": "t0", "port": 0}, "port: "), ({"from": "t0", "port": "9-1"}, "port: "),
    ({"from": "t0", "port": "http"}, "port: "), ({"from": "t0", "port": 70000}, "port: "),
    ({"from": "t0", "port": False}, "port: "), ({"from": "t0", "port": [80]}, "port: "),
    ({"from": "t0", "client": "10.0.0.0/40"}, "client: "), ({"from": "t0", "client": "fe80::/64"}, "client: "),
    ({"from": "t0", "client": "somewhere"}, "client: "),
    ({"from": "t0", "mode": "teleport"}, "mode: "), ({"from": "t0", "mode": 1}, "mode: "),
    ({"from": "t0", "wait": 0}, "wait: "), ({"from": "t0", "wait": -1}, "wait: "),
    ({"from": "t0", "wait": 3601}, "wait: "), ({"from": "t0", "wait": "5"}, "wait: "),
    ({"from": "t0", "wait": True}, "wait: "),
])
async def test_migrate_errors_name_the_field(args, error):
    cmds, migration, _ = commands()
    with pytest.raises(AdminError) as raised:
        await cmds.run("migrate", args)
    assert error in str(raised.value)
    assert migration.orders == []
    answer = await cmds.answer(json.dumps({"command": "migrate", "args": args}).encode())
    assert answer == {"ok": False, "error": str(raised.value)}


async def test_migrate_without_an_engine_is_refused():
    p = pools()
    cmds = AdminCommands(lambda: p, Metrics())
    with pytest.raises(AdminError, match="cannot move connections"):
        await cmds.run("migrate", {"from": "t0"})


async def test_an_exception_inside_the_migration_is_an_internal_error():
    cmds, migration, _ = commands(fail=RuntimeError("map went away"))
    answer = await cmds.answer(b'{"command": "migrate", "args": {"from": "t0", "to": "t1"}}\n')
    assert answer == {"ok": False, "error": "internal error: RuntimeError: map went away"}
    assert len(migration.orders) == 1


async def test_answer_wraps_a_successful_migration():
    cmds, _, _ = commands()
    answer = await cmds.answer(b'{"command": "migrate", "args": {"from": "t0", "to": "t1", "max": 1}}\n')
    assert answer["ok"] is True and answer["result"]["to"] == "10.0.0.12:80" and answer["result"]["max"] == 1


async def test_help_lists_migrate():
    cmds, _, _ = commands()
    listed = await cmds.run("help", {})
    assert "migrate" in listed and listed == sorted(listed)


# ---------------------------------------------------------------------- drain


async def test_drain_with_move_drains_then_moves_where_the_policy_says():
    cmds, migration, p = commands(move_wait=20.0)
    result = await cmds.run("drain", {"target": "t1", "move": True, "within": 5})
    (order,) = migration.orders
    assert order == MoveOrder(source=T1, destination=None, mode="live", wait=5.0)
    assert [(t["pool"], t["target"], t["draining"]) for t in result["targets"]] == [
        ("web", "t1", True), ("api", "t1", True)]
    assert result["moved"]["from"] == "10.0.0.12:80" and result["moved"]["to"] is None
    assert result["moved"]["moved"] == 2
    assert p["web"].find("t1").draining and p["api"].find("t1").draining


async def test_drain_with_move_waits_move_wait_by_default():
    cmds, migration, _ = commands(move_wait=20.0)
    await cmds.run("drain", {"target": "10.0.0.11:80", "move": True})
    assert migration.orders == [MoveOrder(source=T0, destination=None, wait=20.0)]


async def test_drain_without_move_moves_nothing():
    cmds, migration, _ = commands()
    for args in ({"target": "t0"}, {"target": "t0", "move": False}, {"target": "t0", "within": 5}):
        result = await cmds.run("drain", args)
        assert isinstance(result, list) and result[0]["draining"]
    assert migration.orders == []


@pytest.mark.parametrize("args,error", [
    ({"target": "t0", "move": "yes"}, "move must be true or false"),
    ({"target": "t0", "move": 1}, "move must be true or false"),
    ({"target": "t0", "move": True, "within": 0}, "within: "),
    ({"target": "t0", "move": True, "within": 5000}, "within: "),
    ({"target": "t0", "move": True, "within": "5"}, "within: "),
])
async def test_bad_drain_moves_are_refused_before_anything_changes(args, error):
    cmds, migration, p = commands()
    with pytest.raises(AdminError, match=error):
        await cmds.run("drain", args)
    assert migration.orders == [] and not p["web"].find("t0").draining


async def test_enable_never_moves_connections():
    cmds, migration, p = commands()
    p["web"].find("t0").draining = True
    try:
        result = await cmds.run("enable", {"target": "t0", "move": True})
    except AdminError:
        result = None  # refusing the argument would be fine too
    assert migration.orders == []
    assert result is None or isinstance(result, list)


# ------------------------------------------------------------------------ CLI


def test_cli_parses_migrate():
    args = build_parser().parse_args(["migrate", "--from", "t0", "--to", "10.0.0.12:80", "--client",
                                      "10.1.0.0/16", "--port", "1000-1999", "--max", "5", "--mode", "reset",
                                      "--wait", "2.5", "--socket", "/tmp/a.sock", "--json"])
    assert (args.command, args.source, args.destination, args.client, args.port, args.max, args.mode,
            args.wait, args.socket, args.json) == ("migrate", "t0", "10.0.0.12:80", "10.1.0.0/16",
                                                   "1000-1999", 5, "reset", 2.5, "/tmp/a.sock", True)


def test_cli_migrate_defaults_and_errors(capsys):
    args = build_parser().parse_args(["migrate", "--from", "t0"])
    assert (args.destination, args.client, args.port, args.max, args.mode, args.wait, args.json) == (
        None, None, None, None, "live", None, False)
    for bad in (["migrate"], ["migrate", "--from", "t0", "--mode", "teleport"],
                ["migrate", "--from", "t0", "--max", "many"]):
        with pytest.raises(SystemExit) as exit_:
            build_parser().parse_args(bad)
        assert exit_.value.code == 2
    capsys.readouterr()


def test_cli_parses_drain_with_move():
    args = build_parser().parse_args(["drain", "t1", "--move", "--within", "5"])
    assert (args.command, args.target, args.move, args.within) == ("drain", "t1", True, 5.0)
    plain = build_parser().parse_args(["drain", "t1"])
    assert (plain.move, plain.within) == (False, None)


@pytest.fixture
def sent(monkeypatch):
    """What the CLI asks the router: (command, args, timeout) per request."""
    requests: list[tuple[str, dict, float]] = []
    report = MoveReport(MoveOrder(source=T0, destination=T1), selected=1, moved=1).as_json()

    def request(command, args=None, *, path, timeout):
        requests.append((command, args, timeout))
        if command == "migrate":
            return report
        return {"targets": [], "moved": report} if args.get("move") else []

    monkeypatch.setattr(admin_module, "request", request)
    return requests


def test_cli_migrate_sends_only_what_was_given(sent, capsys):
    assert main(["migrate", "--from", "t0", "--to", "t1", "--max", "0", "--socket", "/nonexistent"]) == 0
    assert sent == [("migrate", {"from": "t0", "to": "t1", "max": 0, "mode": "live"}, 3630.0)]
    assert main(["migrate", "--from", "t0", "--port", "80", "--wait", "10", "--socket", "/x"]) == 0
    assert sent[1] == ("migrate", {"from": "t0", "port": "80", "mode": "live", "wait": 10.0}, 40.0)
    assert capsys.readouterr().out.splitlines()[0].startswith("migrate 10.0.0.11:80 -> 10.0.0.12:80 (live): ")


def test_cli_drain_with_move_sends_move_and_within(sent, capsys):
    assert main(["drain", "t1", "--move", "--within", "5", "--socket", "/x"]) == 0
    assert main(["drain", "t1", "--move", "--socket", "/x"]) == 0
    assert main(["drain", "t1", "--socket", "/x"]) == 0
    assert sent == [("drain", {"target": "t1", "move": True, "within": 5.0}, 35.0),
                    ("drain", {"target": "t1", "move": True}, 3630.0),
                    ("drain", {"target": "t1"}, 30.0)]
    assert "1 moved" in capsys.readouterr().out


def test_cli_drain_within_zero_reaches_the_router(sent, capsys):
    main(["drain", "t1", "--move", "--within", "0", "--socket", "/x"])
    main(["migrate", "--from", "t1", "--wait", "0", "--socket", "/x"])
    assert sent[1][1]["wait"] == 0.0  # --wait 0 is sent, and the router refuses it
    assert sent[0][1].get("within") == 0.0


def test_describe_move():
    report = {"from": "10.0.0.11:80", "to": "10.0.0.12:80", "mode": "reset", "client": "10.1.0.0/16",
              "port": None, "max": 5, "selected": 5, "moved": 3, "reset": 1, "skipped": {"busy": 1},
              "left": {"client": 7, "max": 2}, "seconds": 1.2345}
    assert describe_move(report) == ("migrate 10.0.0.11:80 -> 10.0.0.12:80 (reset): 5 selected, 3 moved, "
                                     "1 reset, skipped: busy 1; not selected: client 7, max 2; 1.23 s")
    bare = MoveReport(MoveOrder(source=T0, destination=None)).as_json()
    assert describe_move(bare) == ("migrate 10.0.0.11:80 -> policy (live): 0 selected, 0 moved, 0 reset, "
                                   "skipped: none; not selected: none; 0.00 s")
