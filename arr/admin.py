"""The router's runtime admin interface: a root-only Unix socket, JSON lines.

In the style of HAProxy's runtime API and Envoy's admin endpoint, for the
operator at the router's host: ``arr targets``, ``arr drain TARGET``,
``arr enable TARGET``, ``arr weight TARGET N``, ``arr reload``. One request per
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
                 status: Callable[[], dict[str, Any]] | None = None) -> None:
        self._pools = pools  # a callable: a reload replaces the router's pools
        self.metrics = metrics
        self._reload = reload
        self._status = status
        self.extra: dict[str, Callable[[dict[str, Any]], Awaitable[Any]]] = {}
        """Commands added by other parts (the migration work adds its own)."""

    async def run(self, command: str, args: dict[str, Any]) -> Any:
        if command in self.extra:
            return await self.extra[command](args)
        if command == "targets":
            return [describe(Member(p, m)) for p in self._pools().values() for m in p.members]
        if command in ("drain", "enable"):
            members = find_members(self._pools(), _target_arg(args))
            for member in members:
                member.state.draining = command == "drain"
                self.metrics.publish_target(member.pool, member.state)
            log.info("admin: %s %s (%d pool membership(s))", command, _target_arg(args), len(members))
            return [describe(m) for m in members]
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
            return sorted(["targets", "drain", "enable", "weight", "reload", "status", "help", *self.extra])
        raise AdminError(f"unknown command {command!r} (try: help)")

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


def _target_arg(args: dict[str, Any]) -> str:
    target = args.get("target")
    if not isinstance(target, str) or not target:
        raise AdminError('this command needs "target": a target\'s name or host:port')
    return target


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
