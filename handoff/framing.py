"""Where an HTTP/1.1 response ends, from its start: the framing a take-back
needs to know that the server has written all of the previous response
(handoff/agent.py ``_response_unfinished``). Pure, no I/O.

The target's egress program keeps the first bytes of each response it sees
go out (struct response_head in handoff/bpf/arr_structs.h). The agent cannot
see the request they answer, so a ``HEAD`` response, whose Content-Length
counts a body that never comes, reads here as unfinished: the agent's
patience bounds what that costs (``RESPONSE_PATIENCE_NS`` in handoff/agent.py).
"""

from __future__ import annotations

NO_BODY_STATUSES = frozenset({204, 304})
HEAD_END = b"\r\n\r\n"


def body_end(start: bytes) -> int | None:
    """The response's length in bytes (head and body), counted from the first
    byte of START, a response's first bytes; None when START does not tell
    (a head longer than START, an interim 1xx, a chunked or close-delimited
    body, an unreadable or contradictory head)."""
    if not start.startswith(b"HTTP/1."):
        return None
    end = start.find(HEAD_END)
    if end < 0:
        return None
    head_len = end + len(HEAD_END)
    lines = start[:end].split(b"\r\n")
    status_parts = lines[0].split(b" ", 2)
    if len(status_parts) < 2 or len(status_parts[1]) != 3 or not status_parts[1].isdigit():
        return None
    status = int(status_parts[1])
    if status < 200:
        return None  # an interim response: the real one follows
    if status in NO_BODY_STATUSES:
        return head_len
    length: int | None = None
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            return None
        name = name.strip().lower()
        if name == b"transfer-encoding":
            return None
        if name == b"content-length":
            value = value.strip()
            if not value.isdigit() or (length is not None and int(value) != length):
                return None
            length = int(value)
    return None if length is None else head_len + length
