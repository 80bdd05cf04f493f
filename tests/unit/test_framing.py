"""handoff/framing.py: a response's length from its first bytes, which the
target program keeps (struct response_head), or None when they do not tell;
a chunked response's end from its last bytes sent (response_head.tail)."""

from __future__ import annotations

from hypothesis import given, strategies as st

from handoff.framing import asks_head, body_end, is_chunked, response_unfinished

MOD = 1 << 32
TAIL = 8  # ARR_TAIL_BYTES


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


def test_chunked_is_the_last_coding_of_a_response_with_a_body():
    assert is_chunked(head("200 OK", "Transfer-Encoding: chunked"))
    assert is_chunked(head("200 OK", "Transfer-Encoding: gzip, Chunked", "Content-Length: 5"))
    assert is_chunked(head("200 OK", "Transfer-Encoding: gzip", "Transfer-Encoding: chunked"))
    assert not is_chunked(head("200 OK", "Transfer-Encoding: chunked, gzip"))  # delimited by the close
    assert not is_chunked(head("200 OK", "Content-Length: 5"))
    assert not is_chunked(head("304 Not Modified", "Transfer-Encoding: chunked"))
    assert not is_chunked(head("101 Switching Protocols", "Transfer-Encoding: chunked"))
    assert not is_chunked(head("200 OK", "Transfer-Encoding: chunked")[:-2])  # the head goes on


def test_a_length_tells_how_far_the_server_has_to_go():
    h = head("200 OK", "Content-Length: 1000")
    start = MOD - 100  # the response straddles the wrap

    def unfinished(start_: bytes, snd_max: int) -> bool:
        return response_unfinished(start_, start, b"", snd_max, snd_max)

    assert unfinished(h, (start + 500) % MOD)
    assert not unfinished(h, (start + len(h) + 1000) % MOD)
    assert not unfinished(h, (start - 1) % MOD)  # a start past the server's snd_max
    assert not unfinished(head("200 OK"), (start + 5) % MOD)  # delimited by the close


def test_a_server_that_sent_since_its_snd_max_was_read_is_not_done():
    # The record is read after the entry: its tail_end past snd_max is a
    # segment the entry's read missed, whatever the framing says.
    done = (1000 + len(head("200 OK", "Content-Length: 10")) + 10) % MOD
    assert response_unfinished(head("200 OK", "Content-Length: 10"), 1000, b"", done + 5, done)
    assert response_unfinished(head("200 OK"), 1000, b"", done + 5, done)
    assert not response_unfinished(head("200 OK", "Content-Length: 10"), 1000, b"", done, done)


def test_a_chunked_body_ends_with_its_last_chunk_at_the_servers_snd_max():
    h = head("200 OK", "Transfer-Encoding: chunked")
    assert not response_unfinished(h, 1000, b"ab\r\n0\r\n\r\n"[-TAIL:], 5000, 5000)
    assert not response_unfinished(h, 1000, b"\r\n0\r\n\r\n", 5000, 5001)  # and the server's FIN
    assert response_unfinished(h, 1000, b"\r\n0\r\n\r", 5000, 5000)  # one byte to go
    assert response_unfinished(h, 1000, b"0\r\nabcd", 5000, 5000)
    assert response_unfinished(h, 1000, b"", 5000, 5000)  # nothing kept: the patience decides
    # Trailers: not read, the patience decides (handoff/agent.py RESPONSE_PATIENCE_NS).
    assert response_unfinished(h, 1000, b"X: y\r\n\r\n"[-TAIL:], 5000, 5000)
    # The tail is not where the server's stream ends: no telling.
    assert not response_unfinished(h, 1000, b"abcdefgh", 4000, 5000)


def chunked(pieces: list[bytes]) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces if p) + b"0\r\n\r\n"


@given(st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"")), max_size=8),
       st.integers(min_value=0, max_value=MOD - 1), st.data())
def test_a_chunked_body_is_over_at_its_end_and_nowhere_before(pieces, start, data):
    # Chunk data without CR cannot hold the terminator, so only the end ends it.
    h = head("200 OK", "Transfer-Encoding: chunked")
    stream = h + chunked(pieces)
    cut = data.draw(st.integers(min_value=1, max_value=len(stream)))
    end = (start + cut) % MOD
    assert response_unfinished(h, start, stream[:cut][-TAIL:], end, end) == (cut < len(stream))


def test_a_response_to_a_head_ends_with_its_head():
    # What the length says is the body a GET would have had.
    for h in (head("200 OK", "Content-Length: 1048576"), head("200 OK", "Transfer-Encoding: chunked")):
        assert not response_unfinished(h, 1000, b"", 1000 + len(h), 1000 + len(h), answers_head=True)
        assert response_unfinished(h, 1000, b"", 1000 + len(h), 1000 + len(h), answers_head=False)
        assert response_unfinished(h, 1000, b"", 1000 + len(h) - 1, 1000 + len(h) - 1, answers_head=True)
    long_head = head("200 OK", "X: " + "y" * 600)[:512]  # not all of it kept: no telling
    assert not response_unfinished(long_head, 1000, b"", 1100, 1100, answers_head=True)


def test_the_routers_request_says_whether_it_is_a_head():
    assert asks_head(b"HEAD /files/1m HTTP/1.1\r\nHost: x\r\n\r\n")
    for request in (b"GET / HTTP/1.1\r\n\r\n", b"HEADER / HTTP/1.1\r\n\r\n", b"head / HTTP/1.1\r\n\r\n", b""):
        assert not asks_head(request)
