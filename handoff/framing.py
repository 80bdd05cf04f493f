"""Where an HTTP/1.1 response ends, from its start (and, chunked, its last
bytes sent): the framing a take-back
needs to know that the server has written all of the previous response
(handoff/agent.py ``_response_unfinished``). Pure, no I/O.

The target's egress program keeps the first bytes of each response it sees
go out (struct response_head in handoff/bpf/arr_structs.h). The agent cannot
see the request they answer; a ``HEAD`` response, whose Content-Length counts
a body that never comes, is over at its head because the router says the
request was one (``asks_head``, ``TakeBack.answers_head``). Without that it
would read as unfinished until the agent's patience ran out
(``RESPONSE_PATIENCE_NS`` in handoff/agent.py).

A chunked body's end is in its last bytes, not its start: the program keeps
those too (response_head.tail), and a body that ends in the last chunk with
neither extension nor trailer (``CHUNKED_END``, all nginx writes) is over.
One with trailers or a last-chunk extension reads as unfinished and costs
the patience as a HEAD response does.
"""

from __future__ import annotations

from typing import NamedTuple

from handoff.translate import seq_after

NO_BODY_STATUSES = frozenset({204, 304})
HEAD_END = b"\r\n\r\n"
CHUNKED_END = b"\r\n0\r\n\r\n"
"""The last chunk and the empty trailer after a chunk's data (or after the
head, for a body with no chunk): how every complete chunked body without
trailers ends (RFC 9112 7.1)."""
SEQ_SPACE = 1 << 32
HEAD_METHOD = b"HEAD "


def asks_head(request: bytes) -> bool:
    """REQUEST, as the router sends it (arr/http1.py ``serialize_request``:
    its method as h11 read it, one space), is a HEAD, whose response ends
    with its head whatever its length says. The router tells the agent
    (``TakeBack.answers_head``): the agent sees responses only."""
    return request.startswith(HEAD_METHOD)


class _Head(NamedTuple):
    length: int
    status: int
    fields: list[tuple[bytes, bytes]]
    """Header fields, names lowercased, values stripped."""


def _head(start: bytes) -> _Head | None:
    """START's head; None when START holds no whole head or it is unreadable."""
    if not start.startswith(b"HTTP/1."):
        return None
    end = start.find(HEAD_END)
    if end < 0:
        return None
    lines = start[:end].split(b"\r\n")
    status_parts = lines[0].split(b" ", 2)
    if len(status_parts) < 2 or len(status_parts[1]) != 3 or not status_parts[1].isdigit():
        return None
    fields = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            return None
        fields.append((name.strip().lower(), value.strip()))
    return _Head(end + len(HEAD_END), int(status_parts[1]), fields)


def body_end(start: bytes) -> int | None:
    """The response's length in bytes (head and body), counted from the first
    byte of START, a response's first bytes; None when START does not tell
    (a head longer than START, an interim 1xx, a chunked or close-delimited
    body, an unreadable or contradictory head)."""
    head = _head(start)
    return None if head is None else _length(head)


def _length(head: _Head) -> int | None:
    """``body_end`` of a parsed HEAD."""
    if head.status < 200:
        return None  # an interim response: the real one follows
    if head.status in NO_BODY_STATUSES:
        return head.length
    length: int | None = None
    for name, value in head.fields:
        if name == b"transfer-encoding":
            return None
        if name == b"content-length":
            if not value.isdigit() or (length is not None and int(value) != length):
                return None
            length = int(value)
    return None if length is None else head.length + length


def is_chunked(start: bytes) -> bool:
    """START begins a final response whose body is chunked: its last transfer
    coding is ``chunked`` (which then frames it, whatever Content-Length says)."""
    head = _head(start)
    return head is not None and _chunked(head)


def _chunked(head: _Head) -> bool:
    """``is_chunked`` of a parsed HEAD."""
    if head.status < 200 or head.status in NO_BODY_STATUSES:
        return False
    codings = [c.strip().lower() for name, value in head.fields if name == b"transfer-encoding"
               for c in value.split(b",")]
    return bool(codings) and codings[-1] == b"chunked"


def sent_since(start_seq: int, tail_end: int, snd_max: int) -> bool:
    """A response record (its start at START_SEQ, its last payload sent up to
    TAIL_END) read after SND_MAX shows payload past it: the server sent more
    since SND_MAX was read, or a write of the entry undid the program's record
    of it (handoff/agent.py ``_sent_while_pausing``). False for a record whose
    start is past SND_MAX: an older connection's."""
    return not seq_after(start_seq, snd_max) and seq_after(tail_end, snd_max)


def response_unfinished(start: bytes, start_seq: int, tail: bytes, tail_end: int, snd_max: int,
                        answers_head: bool = False) -> bool:
    """The response whose first bytes START are at server sequence number
    START_SEQ has more to come than the server sent up to SND_MAX (its
    snd_nxt as it left, a FIN counted): by its length, or, chunked, because
    TAIL, its last bytes sent up to TAIL_END, do not end the body; or because
    TAIL_END is past SND_MAX (read before it: the server has sent more since).
    ANSWERS_HEAD: the response answers a HEAD request, and ends with its head.
    False when the framing does not tell, or START is not the latest
    response's."""
    if sent_since(start_seq, tail_end, snd_max):
        return True
    if seq_after(start_seq, snd_max):
        return False  # a start past what the server sent: an older connection's
    head = _head(start)
    if head is None:
        return False
    length = head.length if answers_head else _length(head)
    if length is not None:
        return seq_after((start_seq + length) % SEQ_SPACE, snd_max)
    if not _chunked(head):
        return False
    if snd_max not in (tail_end, (tail_end + 1) % SEQ_SPACE):
        return False  # the tail is not where the server's stream ends: no telling
    return not tail.endswith(CHUNKED_END)
