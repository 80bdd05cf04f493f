"""Pure header logic: arr.http1 (framing, hop-by-hop, forwarding) and arr.request."""

import pytest

from arr.http1 import (HOP_BY_HOP, HttpError, add_forwarding, check_request_framing,
                       connection_tokens, end_to_end, error_response, reason_phrase)
from arr.request import Headers, Request, parse_cookies

# ---------------------------------------------------------------- http1


def test_reason_phrase():
    assert reason_phrase(200) == b"OK"
    assert reason_phrase(431) == b"Request Header Fields Too Large"
    assert reason_phrase(799) == b"Unknown"


def test_error_response_shape():
    raw = error_response(413, b"too big\n")
    head, body = raw.split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 413 Content Too Large" or lines[0] == b"HTTP/1.1 413 Request Entity Too Large"
    assert b"content-length: 8" in lines and b"connection: close" in lines
    assert body == b"too big\n"


def test_error_response_default_body_and_keepalive():
    raw = error_response(404, close=False)
    assert raw.endswith(b"\r\n\r\nnot found\n")
    assert b"connection: close" not in raw
    assert b"content-length: 10\r\n" in raw


def test_check_request_framing():
    assert check_request_framing([(b"host", b"a")]) is None
    assert check_request_framing([(b"content-length", b"42")]) == 42
    assert check_request_framing([(b"transfer-encoding", b"chunked")]) is None
    with pytest.raises(HttpError) as info:
        check_request_framing([(b"content-length", b"5"), (b"transfer-encoding", b"chunked")])
    assert (info.value.status, info.value.reason) == (400, "conflicting-framing")


def test_http_error_message():
    error = HttpError(408, "body-timeout", "stalled")
    assert str(error) == "408 body-timeout: stalled"
    assert str(HttpError(400, "malformed")) == "400 malformed"


def test_connection_tokens():
    headers = [(b"connection", b"Keep-Alive, X-Foo"), (b"connection", b" x-bar ,,"), (b"host", b"a")]
    assert connection_tokens(headers) == {b"keep-alive", b"x-foo", b"x-bar"}
    assert connection_tokens([]) == set()


def test_end_to_end_drops_hop_by_hop_and_named():
    headers = [(b"host", b"a"), (b"connection", b"x-foo"), (b"x-foo", b"1"), (b"keep-alive", b"5"),
               (b"te", b"trailers"), (b"upgrade", b"h2c"), (b"transfer-encoding", b"chunked"),
               (b"proxy-connection", b"keep-alive"), (b"trailer", b"x"), (b"x-keep", b"1"),
               (b"content-length", b"3")]
    assert end_to_end(headers) == [(b"host", b"a"), (b"x-keep", b"1"), (b"content-length", b"3")]
    assert end_to_end(headers, drop=(b"content-length",)) == [(b"host", b"a"), (b"x-keep", b"1")]
    assert {b"connection", b"keep-alive", b"te", b"upgrade", b"transfer-encoding"} <= HOP_BY_HOP


def test_end_to_end_keeps_order_and_duplicates():
    headers = [(b"set-cookie", b"a=1"), (b"x", b"1"), (b"set-cookie", b"b=2")]
    assert end_to_end(headers) == headers


def test_add_forwarding_fresh():
    out = add_forwarding([(b"host", b"example.com"), (b"accept", b"*/*")], "192.0.2.1",
                         host=b"example.com")
    assert out == [(b"host", b"example.com"), (b"accept", b"*/*"),
                   (b"x-forwarded-for", b"192.0.2.1"),
                   (b"forwarded", b"for=192.0.2.1;proto=http;host=example.com"),
                   (b"x-forwarded-proto", b"http")]


def test_add_forwarding_appends_to_prior_hops():
    headers = [(b"x-forwarded-for", b"203.0.113.1"), (b"forwarded", b"for=203.0.113.1"),
               (b"x-forwarded-for", b"198.51.100.2, 10.1.1.1"), (b"x-forwarded-proto", b"https"),
               (b"forwarded", b'for="[2001:db8::9]"')]
    out = dict(add_forwarding(headers, "10.0.0.5", proto="https"))
    assert out[b"x-forwarded-for"] == b"203.0.113.1, 198.51.100.2, 10.1.1.1, 10.0.0.5"
    assert out[b"forwarded"] == b'for=203.0.113.1, for="[2001:db8::9]", for=10.0.0.5;proto=https'
    assert out[b"x-forwarded-proto"] == b"https"
    # each forwarding header appears once, merged
    names = [n for n, _ in add_forwarding(headers, "10.0.0.5")]
    assert names.count(b"x-forwarded-for") == 1 and names.count(b"forwarded") == 1
    assert names.count(b"x-forwarded-proto") == 1


def test_add_forwarding_ipv6_client_is_quoted_and_bracketed():
    out = dict(add_forwarding([], "2001:db8::1"))
    assert out[b"forwarded"] == b'for="[2001:db8::1]";proto=http'
    assert out[b"x-forwarded-for"] == b"2001:db8::1"  # X-Forwarded-For: bare address


@pytest.mark.parametrize("host, expected", [
    (b"example.com", b"host=example.com"),
    (b"example.com:8080", b'host="example.com:8080"'),
    (b"[::1]:8080", b'host="[::1]:8080"'),
    (b'we"ird\\', b'host="we\\"ird\\\\"'),
])
def test_add_forwarding_host_quoting(host, expected):
    out = dict(add_forwarding([], "10.0.0.1", host=host))
    assert out[b"forwarded"].endswith(b";" + expected)


# ---------------------------------------------------------------- Headers


def test_headers_case_insensitive_and_multi_valued():
    h = Headers([("Content-Type", "text/html"), ("X-Multi", "1"), ("x-multi", "2"),
                 ("X-MULTI", "3")])
    assert h["content-type"] == h["CONTENT-TYPE"] == "text/html"
    assert h["x-multi"] == "1"
    assert h.get_all("X-Multi") == ["1", "2", "3"]
    assert "x-MULTI" in h and "nope" not in h and 3 not in h
    assert len(h) == 2 and list(h) == ["content-type", "x-multi"]
    assert h.get("missing") is None and h.get("missing", "d") == "d"
    assert h.get_all("missing") == []
    with pytest.raises(KeyError):
        h["missing"]
    assert h.items_raw()[1:] == [("X-Multi", "1"), ("x-multi", "2"), ("X-MULTI", "3")]
    assert dict(h.items()) == {"content-type": "text/html", "x-multi": "1"}


def test_headers_from_raw_latin1():
    h = Headers.from_raw([(b"x-name", b"caf\xe9"), (b"host", b"a")])
    assert h["X-Name"] == "café"
    assert h.get_all("host") == ["a"]


def test_headers_get_all_is_a_copy():
    h = Headers([("a", "1")])
    h.get_all("a").append("2")
    assert h.get_all("a") == ["1"]


# ---------------------------------------------------------------- cookies


def test_cookies_from_every_header_first_wins():
    h = Headers([("Cookie", "sid=abc; theme=dark"), ("Cookie", 'sid=zzz; lang="en"')])
    assert parse_cookies(h) == {"sid": "abc", "theme": "dark", "lang": "en"}


def test_cookies_malformed_pair_skipped():
    h = Headers([("Cookie", "good=1; =novalue; bad name=2; also=ok;;")])
    cookies = parse_cookies(h)
    assert cookies["good"] == "1" and cookies["also"] == "ok"
    assert "" not in cookies


def test_cookies_none():
    assert parse_cookies(Headers()) == {}
    assert Request.build("GET", "/", []).cookies == {}


def test_cookies_named_like_cookie_attributes():
    h = Headers([("Cookie", "path=blue; version=2; sid=1")])
    assert parse_cookies(h) == {"path": "blue", "version": "2", "sid": "1"}


# ---------------------------------------------------------------- Request


@pytest.mark.parametrize("host, expected", [
    ("Example.COM", "example.com"),
    ("example.com:8080", "example.com"),
    ("10.0.0.1:80", "10.0.0.1"),
    ("[::1]:8080", "[::1]"),
    ("[2001:DB8::1]", "[2001:db8::1]"),
    ("", ""),
])
def test_request_host_without_port(host, expected):
    headers = [("Host", host)] if host else []
    assert Request.build("GET", "/", headers).host == expected


def test_request_path_query_and_client():
    request = Request.build("GET", "/a/b?x=1&y=2", [("Host", "h")], client=("192.0.2.9", 5555),
                            body=None)
    assert request.path == "/a/b" and request.query == "x=1&y=2"
    assert request.client_ip == "192.0.2.9" and request.body is None
    assert Request.build("GET", "?x", []).path == "/"
    assert Request.build("OPTIONS", "*", []).path == "*"
    assert Request.build("GET", "http://example.com/p?q", []).path == "/p"


def test_request_cookies_parsed_at_build():
    request = Request.build("GET", "/", [("Cookie", "a=1; b=2")])
    assert request.cookies == {"a": "1", "b": "2"}


def test_request_is_frozen():
    request = Request.build("GET", "/", [])
    with pytest.raises(AttributeError):
        request.method = "POST"  # type: ignore[misc]


def test_request_path_with_leading_double_slash():
    assert Request.build("GET", "//admin/x", []).path == "//admin/x"


def test_handed_off_request_carries_expect_no_further():
    """The router answered 100 itself (or had the whole body before deciding):
    the target must not send a second 100 straight to the client."""
    import h11

    from handoff.engine import serialize_request

    raw = [(b"host", b"x"), (b"expect", b"100-continue"), (b"content-length", b"3")]
    head = h11.Request(method="POST", target="/up", headers=raw)
    request = Request.build("POST", "/up", [("host", "x"), ("expect", "100-continue")],
                            client=("10.0.0.7", 4000), body=b"abc")
    wire = serialize_request(request, head)
    head_text, _, body = wire.partition(b"\r\n\r\n")
    assert body == b"abc"
    assert b"expect" not in head_text.lower()
    assert b"content-length: 3" in head_text and b"x-forwarded-for: 10.0.0.7" in head_text
