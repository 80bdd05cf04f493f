"""What a policy may answer for a request.

A policy is any callable ``request -> Decision`` (sync or async). The router
executes the decision; policies never do I/O on the client connection.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Awaitable, Callable, Union

if TYPE_CHECKING:
    from arr.pool import TargetState
    from arr.request import Request


@dataclass(frozen=True)
class LocalResponse:
    """A complete response produced in-process by a ``Local`` handler."""

    status: int = 200
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = (("content-type", "text/plain; charset=utf-8"),)


LocalHandler = Callable[["Request"], Union[LocalResponse, Awaitable[LocalResponse]]]


@dataclass(frozen=True)
class Handoff:
    """Hand the TCP connection to ``target``: it answers the client directly.

    Until the handoff data path exists (or when a connection is not eligible)
    the router falls back to ``Proxy`` on the same sockets and counts why.
    """

    target: "TargetState"
    response_deadline: float | None = None
    """Seconds the target has to send its first response byte before the
    router takes the connection back and sends the request to another target
    of the pool (a rule's ``response_deadline``; None: ``[handoff]``'s)."""


@dataclass(frozen=True)
class Proxy:
    """Relay the request to ``target`` and carry the response back (classic L7)."""

    target: "TargetState"


@dataclass(frozen=True)
class Local:
    """Answer in-process with ``handler``; nothing leaves the router."""

    handler: LocalHandler


@dataclass(frozen=True)
class Reject:
    """Answer ``status`` with ``body`` and close nothing but this exchange."""

    status: int = 503
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = field(default=())


Decision = Union[Handoff, Proxy, Local, Reject]

DECISION_NAMES = {Handoff: "handoff", Proxy: "proxy", Local: "local", Reject: "reject"}


def decision_name(decision: Decision) -> str:
    return DECISION_NAMES[type(decision)]
