"""handoff/framing.py: a response's length from its first bytes, which the
target program keeps (struct response_head), or None when they do not tell."""

from __future__ import annotations

from hypothesis import given, strategies as st

from handoff.framing import body_end


def head(status: str = "200 OK", *headers: str) -> bytes:
    return ("\r\n".join([f"HTTP/1.1 {status}", *headers]) + "\r\n\r\n").encode()


def test_content_length_counts_from_the_first_byte():
    h = head("200 OK", "Server: nginx", "Content-Length: 1048576", "Connection: keep-alive")
    assert body_end(h + b"x" * 100) == len(h) + 1048576
    assert body_end(head("200 OK", "content-length:  7 ")) == len(head("200 OK", "content-length:  7 ")) + 7


def test_no_body_statuses_end_with_their_head():
    for status in ("204 No Content", "304 Not Modified"):
        h = head(status, "Content-Length: 99")
        assert body_end(h) == len(h)


def test_what_does_not_tell_is_none():
    assert body_end(head("200 OK", "Transfer-Encoding: chunked")) is None
    assert body_end(head("200 OK", "Content-Length: 5", "Transfer-Encoding: chunked")) is None
    assert body_end(head("200 OK")) is None  # delimited by the close
    assert body_end(head("100 Continue")) is None  # the real response follows
    assert body_end(head("200 OK", "Content-Length: 5", "Content-Length: 6")) is None
    assert body_end(head("200 OK", "Content-Length: -5")) is None
    assert body_end(head("200 OK", "Content-Length: 5")[:-4]) is None  # the head goes on past what was kept
    assert body_end(b"\x00\x01HTTP/1.1 200 OK\r\n\r\n") is None
    assert body_end(b"HTTP/1.1 2000 OK\r\nContent-Length: 5\r\n\r\n") is None
    assert body_end(b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n") is None
    assert body_end(b"") is None


@given(st.binary(max_size=600))
def test_any_bytes_give_none_or_a_length_past_the_head(data):
    end = body_end(data)
    assert end is None or end >= data.find(b"\r\n\r\n") + 4 > 0


@given(st.integers(min_value=0, max_value=1 << 40), st.integers(min_value=200, max_value=599),
       st.lists(st.sampled_from(["Server: x", "Date: y", "ETag: \"z\"", "Accept-Ranges: bytes"]), max_size=6))
def test_a_well_formed_head_with_a_length_is_read_exactly(length, status, others):
    h = head(f"{status} Reason", *others, f"Content-Length: {length}")
    assert body_end(h + b"body") == (len(h) if status in (204, 304) else len(h) + length)
