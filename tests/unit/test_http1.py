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

    from arr.http1 import serialize_request

    raw = [(b"host", b"x"), (b"expect", b"100-continue"), (b"content-length", b"3")]
    head = h11.Request(method="POST", target="/up", headers=raw)
    request = Request.build("POST", "/up", [("host", "x"), ("expect", "100-continue")],
                            client=("10.0.0.7", 4000), body=b"abc")
    wire = serialize_request(request, head)
    head_text, _, body = wire.partition(b"\r\n\r\n")
    assert body == b"abc"
    assert b"expect" not in head_text.lower()
    assert b"content-length: 3" in head_text and b"x-forwarded-for: 10.0.0.7" in head_text


# ---------------------------------------------------------------- wire checks

import h11  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from arr.http1 import ALLOW, KNOWN_METHODS, ChunkScanner, HeadScanner, check_method  # noqa: E402


def scan(cls, *pieces):
    """('ok', done) or (status, detail) after feeding PIECES one by one."""
    scanner = cls()
    try:
        for piece in pieces:
            scanner.feed(piece)
    except HttpError as error:
        return error.status, error.reason
    return "ok", scanner.done


@pytest.mark.parametrize("data, outcome", [
    (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", ("ok", True)),
    (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n\x00\x01 body bytes are not looked at", ("ok", True)),
    (b"GET / HTTP/1.0\n\n", ("ok", True)),
    (b"GET / HTTP/1.9\r\nHost: a\r\n\r\n", ("ok", True)),
    (b"\r\n\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n", ("ok", True)),
    (b"GET /a?b=c&d=%41 HTTP/1.1\r\nX-Empty:\r\nX-Obs-Text: \xe9\xff\r\nX-Tab:\ta\tb\r\n\r\n", ("ok", True)),
    (b"GET http://[::1]:8/x HTTP/1.1\r\n", ("ok", False)),
    (b"GET / HTTP/1.1\r\nHost: a\r\n", ("ok", False)),
    (b"G", ("ok", False)),
    (b"\x16\x03\x01", (400, "malformed")),
    (b"\rX", (400, "malformed")),
    (b"GET /\r\n", (400, "malformed")),
    (b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n", (400, "malformed")),
    (b"GET / HTTP/1.1\r\n folded\r\n", (400, "malformed")),
    (b"GET / HTTP/1.1\r\nX: \x01\r\n", (400, "malformed")),
    (b"GET / HTTP/1.1\r\nX: \x7f\r\n", (400, "malformed")),
    (b"GET / HTTP/1.1\r\nX:\r \r\n", (400, "malformed")),
    (b"GET / HTTP/1.1\r\n: empty name\r\n", (400, "malformed")),
    (b"GET / HTTP/1.1\r\nno-colon\r\n", (400, "malformed")),
    (b"GET  / HTTP/1.1\r\n", (400, "malformed")),
    (b"GET / HTTP/11.1\r\n", (400, "malformed")),
    (b"GET / HTTP/1.1x", (400, "malformed")),
    (b"GET / HTTP/2.0\r\n", (505, "version-not-supported")),
    (b"GET / HTTP/0.9\n", (505, "version-not-supported")),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", (505, "version-not-supported")),
])
def test_head_scanner(data, outcome):
    assert scan(HeadScanner, data) == outcome
    assert scan(HeadScanner, *[data[i:i + 1] for i in range(len(data))]) == outcome


def test_head_scanner_strips_empty_lines_before_the_request_line_only():
    scanner = HeadScanner()
    assert scanner.feed(b"\r\n\r") == b""
    assert scanner.feed(b"\nGET / HTTP/1.1\r\n") == b"GET / HTTP/1.1\r\n"
    assert scanner.feed(b"\r\n\r\n") == b"\r\n\r\n" and scanner.done


def test_head_scanner_bounds_empty_lines():
    with pytest.raises(HttpError):
        HeadScanner(limit=10).feed(b"\r\n" * 6)


@pytest.mark.parametrize("body, outcome", [
    (b"5\r\nhello\r\n0\r\n\r\n", ("ok", True)),
    (b"5;a=b;c=\"q \\\" x\"\r\nhello\r\n0;last\r\nX-T: 1\r\nY:\r\n\r\n", ("ok", True)),
    (b"A\r\n0123456789\r\n0\r\n\r\nGET / next request", ("ok", True)),
    (b"5\r\nhel", ("ok", False)),
    (b"5\nhello\n0\n\n", (400, "malformed")),
    (b"5\r\nhello\n", (400, "malformed")),
    (b"5\r\nhello\r\n0\n", (400, "malformed")),
    (b"5\r\nhello\r\n0\r\n\n", (400, "malformed")),
    (b"5\rx", (400, "malformed")),
    (b"x", (400, "malformed")),
    (b" 5\r\n", (400, "malformed")),
    (b"5 \r\n", (400, "malformed")),
    (b"-5\r\n", (400, "malformed")),
    (b"0x5\r\n", (400, "malformed")),
    (b"11111111111111111\r\n", (400, "malformed")),
    (b"5;\r\n", (400, "malformed")),
    (b"5;a=\x01\r\n", (400, "malformed")),
    (b"5;a=\"unterminated\r\n", (400, "malformed")),
    (b"5\r\nhelloxx", (400, "malformed")),
    (b"0\r\nbad trailer\r\n", (400, "malformed")),
    (b"0\r\nX: \x01\r\n", (400, "malformed")),
    (b"5;" + b"a" * 5000, (400, "malformed")),
])
def test_chunk_scanner(body, outcome):
    assert scan(ChunkScanner, body) == outcome
    assert scan(ChunkScanner, *[body[i:i + 1] for i in range(len(body))]) == outcome


def test_check_method():
    for method in KNOWN_METHODS:
        check_method(method)
    for method, status in [(b"TRACE", 405), (b"CONNECT", 501), (b"get", 501), (b"Get", 501), (b"BREW", 501)]:
        with pytest.raises(HttpError) as info:
            check_method(method)
        assert info.value.status == status
    with pytest.raises(HttpError) as info:
        check_method(b"TRACE")
    assert info.value.headers == ((b"allow", ALLOW),)
    assert b"TRACE" not in ALLOW and b"CONNECT" not in ALLOW


def test_error_response_extra_headers():
    raw = error_response(405, b"no\n", headers=[(b"allow", b"GET")])
    assert b"\r\nallow: GET\r\n" in raw and raw.endswith(b"\r\n\r\nno\n")


# Heads built from pieces that are valid, or almost: the scanner's verdict
# must not depend on how the bytes were split, and what it lets through h11
# must parse.
_head_piece = st.sampled_from([
    b"GET", b"get", b"POST", b" ", b"/", b"/a", b"?q=1", b"%41", b"*", b"\"", b"\\", b"HTTP/1.1", b"HTTP/2.0",
    b"HTTP/1.", b"\r\n", b"\n", b"\r", b"Host: a", b"X-A:", b" b", b"\t", b"\x01", b"\x7f", b"\xe9", b":",
    b"\x00", b"Content-Length: 3",
])
_head = st.one_of(
    st.lists(_head_piece, max_size=14).map(b"".join),
    st.tuples(st.sampled_from([b"GET / HTTP/1.1\r\n", b"\r\nPOST /x HTTP/1.0\n"]),
              st.lists(st.sampled_from([b"Host: a\r\n", b"X-B: c d\r\n", b"X-C:\t\xe9\n", b"X: \x01\r\n",
                                        b" fold\r\n", b"\r\n", b"\r"]), max_size=5)
              ).map(lambda t: t[0] + b"".join(t[1])),
)


@settings(max_examples=3000, deadline=None)
@given(_head, st.lists(st.integers(min_value=0, max_value=80), max_size=6))
def test_head_scanner_verdict_does_not_depend_on_the_split(data, cuts):
    cuts = sorted({min(c, len(data)) for c in cuts})
    pieces = [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]
    assert scan(HeadScanner, data) == scan(HeadScanner, *pieces)


@settings(max_examples=3000, deadline=None)
@given(_head)
def test_what_the_head_scanner_accepts_h11_parses(data):
    data = data + b"\r\n\r\n"
    scanner = HeadScanner()
    try:
        rest = scanner.feed(data)
    except HttpError:
        return
    if not scanner.done:
        return
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(rest)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError as exc:
        # h11's own checks beyond syntax (Host, Content-Length values) answer 400 as before
        assert "Host" in str(exc) or "Content-Length" in str(exc), (data, exc)
        return
    assert isinstance(event, h11.Request), (data, event)


def test_forwarded_head():
    from arr.session import _forwarded_head

    original = h11.Request(method="GET", target="/x/../y", headers=[("Host", "a"), ("X", "1")],
                           http_version="1.1")
    same = h11.Request(method="GET", target="/y", headers=[("Host", "a")])
    assert _forwarded_head(same, "/y", None) is same  # nothing to change: no copy
    forwarded = _forwarded_head(original, "/y", None)
    assert forwarded.target == b"/y" and list(forwarded.headers) == list(original.headers)
    absolute = _forwarded_head(original, "/y", "b.example:81")
    assert [v for n, v in absolute.headers if n == b"host"] == [b"b.example:81"]
    newer = h11.Request(method="GET", target="/y", headers=[("Host", "a")], http_version="1.2")
    assert _forwarded_head(newer, "/y", None).http_version == b"1.1"
    older = h11.Request(method="GET", target="/y", headers=[], http_version="1.0")
    assert _forwarded_head(older, "/y", None) is older


def test_a_handed_off_request_carries_the_normalised_target():
    from arr.session import _forwarded_head
    from arr.http1 import serialize_request

    raw = h11.Request(method="GET", target="http://Secret.Example/x/%2e%2e/%77hoami?q=%2F",
                      headers=[("Host", "other"), ("X", "1")], http_version="1.2")
    head = _forwarded_head(raw, "/whoami?q=%2F", "Secret.Example")
    request = Request.build("GET", "/whoami?q=%2F", [("Host", "Secret.Example")], client=("10.0.0.7", 4000))
    wire = serialize_request(request, head)
    assert wire.startswith(b"GET /whoami?q=%2F HTTP/1.1\r\nhost: Secret.Example\r\n")
