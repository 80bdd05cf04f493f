"""The router's runtime admin interface: a root-only Unix socket, JSON lines.

In the style of HAProxy's runtime API and Envoy's admin endpoint, for the
operator at the router's host: ``arr targets``, ``arr drain TARGET
[--move [--within S]]``, ``arr enable TARGET``, ``arr weight TARGET N``,
``arr migrate --from A [--to B] ...`` (arr/migration.py), ``arr reload``. One request per
line, ``{"command": "drain", "args": {"target": "t1"}}``; one answer per line,
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "..."}``.

``AdminCommands`` is the logic, over the router's public state (its pools,
metrics and ``reload``); ``AdminServer`` is the socket; ``request`` is the
client the CLI uses. Who may talk to it: the socket is created mode 0600 and
every peer's credentials (SO_PEERCRED) are checked against the router's uid
(root may always), so a file-mode mistake does not open it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from arr.migration import MoveOrder, MoveReport, OrderError, PortRange

if TYPE_CHECKING:
    from arr.metrics import Metrics
    from arr.pool import Pool, TargetState

log = logging.getLogger("arr.admin")

DEFAULT_SOCKET = "/run/arr/admin.sock"
MAX_REQUEST = 64 * 1024


class AdminError(Exception):
    """A request the interface refuses; its message goes back to the operator."""


@dataclass(frozen=True)
class Member:
    pool: "Pool"
    state: "TargetState"


def find_members(pools: dict[str, "Pool"], ref: str) -> list[Member]:
    """Every pool membership of the target named REF (its name or host:port)."""
    found = [Member(pool, m) for pool in pools.values() for m in pool.members
             if ref in (m.name, f"{m.target.host}:{m.target.port}")]
    if not found:
        known = sorted({m.name for p in pools.values() for m in p.members})
        raise AdminError(f"no target {ref!r} (known: {', '.join(known) or 'none'})")
    return found


def describe(member: Member) -> dict[str, Any]:
    m = member.state
    return {"pool": member.pool.name, "target": m.name, "address": f"{m.target.host}:{m.target.port}",
            "weight": m.weight, "configured_weight": m.target.weight, "healthy": m.healthy,
            "draining": m.draining, "available": m.available, "in_flight": m.active,
            "handed_off": m.handed_off, "load": m.load}


class AdminCommands:
    """What the admin socket can do; every method returns JSON-able data or
    raises AdminError."""

    def __init__(self, pools: Callable[[], dict[str, "Pool"]], metrics: "Metrics",
                 reload: Callable[[], Awaitable[dict[str, Any]]] | None = None,
                 status: Callable[[], dict[str, Any]] | None = None,
                 migrate: Callable[[MoveOrder], Awaitable[MoveReport]] | None = None,
                 move_wait: float = 30.0) -> None:
        self._pools = pools  # a callable: a reload replaces the router's pools
        self.metrics = metrics
        self._reload = reload
        self._status = status
        self._migrate = migrate
        self.move_wait = move_wait
        """A live move's default wait for a response in flight (handoff.migrate_wait)."""
        self.extra: dict[str, Callable[[dict[str, Any]], Awaitable[Any]]] = {}
        """Commands added by a program that embeds the router (name -> handler)."""

    async def run(self, command: str, args: dict[str, Any]) -> Any:
        if command in self.extra:
            return await self.extra[command](args)
        if command == "targets":
            return [describe(Member(p, m)) for p in self._pools().values() for m in p.members]
        if command in ("drain", "enable"):
            members = find_members(self._pools(), _target_arg(args))
            move = args.get("move", False)
            if command == "enable" and "move" in args:
                raise AdminError("move: only drain moves connections")
            if not isinstance(move, bool):
                raise AdminError(f"move must be true or false, got {move!r}")
            within = _seconds(args, "within", self.move_wait) if move else None
            for member in members:
                member.state.draining = command == "drain"
                self.metrics.publish_target(member.pool, member.state)
            log.info("admin: %s %s (%d pool membership(s))", command, _target_arg(args), len(members))
            described = [describe(m) for m in members]
            if not move or within is None:
                return described
            # Its connections go where the policy sends them: the target is
            # draining, so elsewhere. Busy ones move once their response is
            # acknowledged, within WITHIN; the rest finish where they are.
            order = MoveOrder(source=members[0].state.target.address, destination=None, mode="live",
                              wait=within)
            return {"targets": described, "moved": (await self._run_migration(order)).as_json()}
        if command == "migrate":
            return (await self._run_migration(self.move_order(args))).as_json()
        if command == "weight":
            weight = args.get("weight")
            if not isinstance(weight, int) or isinstance(weight, bool) or not 0 <= weight <= 1_000_000:
                raise AdminError(f"weight must be an integer 0-1000000, got {weight!r}")
            members = find_members(self._pools(), _target_arg(args))
            for member in members:
                member.state.weight_override = weight
                self.metrics.publish_target(member.pool, member.state)
            log.info("admin: weight %s = %d", _target_arg(args), weight)
            return [describe(m) for m in members]
        if command == "reload":
            if self._reload is None:
                raise AdminError("this router has no configuration file to reload")
            return await self._reload()
        if command == "status":
            return self._status() if self._status else {}
        if command == "help":
            return sorted(["targets", "drain", "enable", "weight", "reload", "status", "migrate", "help",
                           *self.extra])
        raise AdminError(f"unknown command {command!r} (try: help)")

    def move_order(self, args: dict[str, Any]) -> MoveOrder:
        """``migrate``'s arguments, checked: targets by name or host:port."""
        unknown = set(args) - {"from", "to", "client", "port", "max", "mode", "wait"}
        if unknown:
            raise AdminError(f"migrate: unknown argument(s) {', '.join(sorted(unknown))}")
        source = args.get("from")
        if not isinstance(source, str) or not source:
            raise AdminError('migrate needs "from": a target\'s name or host:port')
        destination = args.get("to")
        if destination is not None and (not isinstance(destination, str) or not destination):
            raise AdminError('"to" must be a target\'s name or host:port')
        limit = args.get("max")
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool)):
            raise AdminError(f"max: expected a count, got {limit!r}")
        try:
            return MoveOrder(
                source=find_members(self._pools(), source)[0].state.target.address,
                destination=find_members(self._pools(), destination)[0].state.target.address
                if destination else None,
                mode=args.get("mode") or "live",
                clients=MoveOrder.parse_clients(args.get("client")),
                ports=PortRange.parse(args["port"]) if args.get("port") not in (None, "") else None,
                limit=limit, wait=_seconds(args, "wait", self.move_wait))
        except OrderError as exc:
            raise AdminError(str(exc)) from None

    async def _run_migration(self, order: MoveOrder) -> MoveReport:
        if self._migrate is None:
            raise AdminError("this router cannot move connections (no handoff engine)")
        report = await self._migrate(order)
        log.info("admin: migrate done: %s", report.as_json())
        return report

    async def answer(self, line: bytes) -> dict[str, Any]:
        """One request line -> one answer (never raises)."""
        try:
            request = json.loads(line)
            if not isinstance(request, dict) or not isinstance(request.get("command"), str):
                raise AdminError('a request is a JSON object with a "command" string')
            args = request.get("args") or {}
            if not isinstance(args, dict):
                raise AdminError('"args" must be a JSON object')
            return {"ok": True, "result": await self.run(request["command"], args)}
        except json.JSONDecodeError as exc:
            return {"ok": False, "error": f"not JSON: {exc.msg}"}
        except AdminError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:  # a bug must answer, not drop the operator's connection
            log.exception("admin: %r failed", line[:200])
            return {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}"}


def _target_arg(args: dict[str, Any]) -> str:
    target = args.get("target")
    if not isinstance(target, str) or not target:
        raise AdminError('this command needs "target": a target\'s name or host:port')
    return target


def _seconds(args: dict[str, Any], key: str, default: float) -> float:
    value = args.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 3600:
        raise AdminError(f"{key}: expected seconds in (0, 3600], got {value!r}")
    return float(value)


def peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[2]


class AdminServer:
    """Serves ``AdminCommands`` on a Unix socket (mode 0600)."""

    def __init__(self, commands: AdminCommands, path: str | os.PathLike[str] = DEFAULT_SOCKET) -> None:
        self.commands = commands
        self.path = Path(path)
        self.refused = 0
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() or self.path.is_symlink():
            if _socket_in_use(self.path):
                raise OSError(f"admin socket {self.path} is in use by another process (another router?)")
            self.path.unlink()
        old_umask = os.umask(0o177)  # created 0600, with no window where it is wider
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=str(self.path), limit=MAX_REQUEST)
        finally:
            os.umask(old_umask)
        log.info("admin interface on %s", self.path)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        try:
            uid = peer_uid(sock)
            if uid not in (0, os.getuid()):
                self.refused += 1
                log.warning("admin: refused a client with uid %d", uid)
                writer.write(json.dumps({"ok": False, "error": "not allowed"}).encode() + b"\n")
                return
            while True:
                try:
                    line = await asyncio.wait_for(reader.readuntil(b"\n"), 60.0)
                except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
                    return
                except asyncio.LimitOverrunError:
                    writer.write(json.dumps({"ok": False, "error": "request too long"}).encode() + b"\n")
                    return
                answer = await self.commands.answer(line)
                writer.write(json.dumps(answer).encode() + b"\n")
                await writer.drain()
        finally:
            writer.close()


def _socket_in_use(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def request(command: str, args: dict[str, Any] | None = None, *, path: str | os.PathLike[str] = DEFAULT_SOCKET,
            timeout: float = 30.0) -> Any:
    """One command to a running router; its result, or AdminError with the
    router's message (or why the socket could not be reached)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except FileNotFoundError:
            raise AdminError(f"no admin socket at {path}: is arr serve running (router.admin_socket)?") from None
        except PermissionError:
            raise AdminError(f"not allowed to use {path} (root only)") from None
        except ConnectionRefusedError:
            raise AdminError(f"nothing listens on {path} (a stale socket of a stopped router?)") from None
        sock.sendall(json.dumps({"command": command, "args": args or {}}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        sock.close()
    if not data:
        raise AdminError("the router closed the admin connection without an answer")
    answer = json.loads(data)
    if not answer.get("ok"):
        raise AdminError(answer.get("error", "refused"))
    return answer.get("result")
