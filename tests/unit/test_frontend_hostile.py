"""Hostile input: the router answers it as the targets would read it, at once.

Every row of the front-end's status table (README, "What the router answers
itself"): the status, that it came at once (not after a timeout), that the
connection is closed (OPTIONS * and the recoverable 431 excepted), that
nothing reached a target, and that the router serves the next client. Then
the path walk-arounds: a rule cannot be escaped by any encoding a target
would resolve to the same path.
"""

import time

import pytest

AT_ONCE = 0.5
"""Well under a second, and far under the timeouts below: no timer answered."""
LIMITS = {"header_timeout": 5.0, "body_timeout": 5.0, "header_bytes": 4096, "max_body": 100_000,
          "body_buffer": 16 * 1024}


@pytest.fixture
async def ups(upstreams):
    public, secret = await upstreams("public", "secret")
    return public, secret


@pytest.fixture
async def router(start_router, ups):
    public, secret = ups
    return await start_router({
        "pools": {"public": {"targets": [{"address": public.target}]},
                  "secret": {"targets": [{"address": secret.target}]}},
        "rules": [{"reject": 403, "path_prefix": "/admin"},
                  {"pool": "secret", "path_prefix": "/whoami"},
                  {"pool": "secret", "host": "secret.example"}],
        "default_pool": "public",
        "limits": LIMITS,
    })


def head(*lines: str) -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


CHUNKED_POST = head("POST /echo HTTP/1.1", "Host: a", "Transfer-Encoding: chunked")

# name -> (bytes sent, status). Several are deliberately incomplete heads: the
# answer must come from the bytes that prove the input wrong, not from a timer.
REFUSED = {
    # 1. not HTTP/1.x at all: 400
    "binary-tls-hello": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400),
    "binary-nul": (b"\x00\x00\x00\x00", 400),
    "bare-cr-in-request-line": (b"GET / HTTP/1.1\rHost: a", 400),
    "bare-cr-leading": (b"\rGET / HTTP/1.1", 400),
    "bare-cr-in-header": (b"GET / HTTP/1.1\r\nHost: a\rX: b", 400),
    "http-0.9": (b"GET /\r\n", 400),
    "http-0.9-lf": (b"GET /index.html\n", 400),
    "bad-char-in-method": (b"G(T / HTTP/1.1\r\n", 400),
    "space-before-method": (b" GET / HTTP/1.1\r\n", 400),
    "junk-before-request-line": (b"xx\r\nGET / HTTP/1.1\r\n", 400),
    "quote-in-target": (b'GET /a"b HTTP/1.1\r\n', 400),
    "backslash-in-target": (b"GET /a\\b HTTP/1.1\r\n", 400),
    "brace-in-target": (b"GET /a{b} HTTP/1.1\r\n", 400),
    "fragment-in-target": (b"GET /a#b HTTP/1.1\r\n", 400),
    "non-ascii-in-target": (b"GET /\xc3\xa9 HTTP/1.1\r\n", 400),
    "pipe-in-query": (b"GET /x?a|b HTTP/1.1\r\n", 400),
    "header-without-colon": (b"GET / HTTP/1.1\r\nHost: a\r\nno colon here\r\n", 400),
    "obs-fold": (b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n folded\r\n", 400),
    "obs-fold-tab": (b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n\tfolded", 400),
    "space-before-colon": (b"GET / HTTP/1.1\r\nHost : a\r\n", 400),
    "malformed-version": (b"GET / HTTP/1.x\r\n", 400),
    "lowercase-version": (b"GET / http/1.1\r\n", 400),
    "version-trailing-space": (b"GET / HTTP/1.1 \r\n", 400),
    # 2. a version that is not 1.x: 505
    "http-2.0": (b"GET / HTTP/2.0\r\n", 505),
    "h2-preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
    "http-3.0": (head("GET / HTTP/3.0", "Host: a"), 505),
    "http-0.9-with-version": (b"GET / HTTP/0.9\r\n", 505),
    # 3. control characters in a field: 400
    "ctl-0x01-in-value": (b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\x01b\r\n", 400),
    "ctl-0x7f-in-value": (b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\x7fb\r\n", 400),
    "ctl-0x1b-in-value": (b"GET / HTTP/1.1\r\nHost: a\r\nX-A: \x1b[31m\r\n", 400),
    "nul-in-value": (b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\x00b\r\n", 400),
    "vt-in-value": (b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\x0bb\r\n", 400),
    "ctl-in-name": (b"GET / HTTP/1.1\r\nHost: a\r\nX\x01A: b\r\n", 400),
    # 4. methods
    "trace": (head("TRACE / HTTP/1.1", "Host: a"), 405),
    "connect": (head("CONNECT example.com:443 HTTP/1.1", "Host: example.com:443"), 501),
    "lowercase-get": (head("get / HTTP/1.1", "Host: a"), 501),
    "unknown-method": (head("BREW /pot HTTP/1.1", "Host: a"), 501),
    # 5. request-target forms
    "https-absolute-form": (head("GET https://a/ HTTP/1.1", "Host: a"), 400),
    "ftp-absolute-form": (head("GET ftp://a/x HTTP/1.1", "Host: a"), 400),
    "userinfo-absolute-form": (head("GET http://u:p@a/x HTTP/1.1", "Host: a"), 400),
    "asterisk-with-get": (head("GET * HTTP/1.1", "Host: a"), 400),
    "authority-form": (head("GET a.example:80 HTTP/1.1", "Host: a"), 400),
    # 6. paths that cannot be normalised without ambiguity
    "encoded-slash": (head("GET /whoami%2Fx HTTP/1.1", "Host: a"), 400),
    "encoded-slash-lower": (head("GET /a%2fwhoami HTTP/1.1", "Host: a"), 400),
    "encoded-backslash": (head("GET /%5Cwhoami HTTP/1.1", "Host: a"), 400),
    "encoded-nul": (head("GET /whoami%00 HTTP/1.1", "Host: a"), 400),
    "invalid-escape": (head("GET /%zzwhoami HTTP/1.1", "Host: a"), 400),
    "truncated-escape": (head("GET /whoami%4 HTTP/1.1", "Host: a"), 400),
    "above-root": (head("GET /../whoami HTTP/1.1", "Host: a"), 400),
    "encoded-above-root": (head("GET /%2e%2e/whoami HTTP/1.1", "Host: a"), 400),
    "bracket-in-path": (head("GET /x[1] HTTP/1.1", "Host: a"), 400),
    "bracket-in-query": (head("GET /x?a[1]=2 HTTP/1.1", "Host: a"), 400),
    # 7. body framing
    "chunked-lf-only": (CHUNKED_POST + b"5\nhello\n0\n\n", 400),
    "chunked-lf-after-size": (CHUNKED_POST + b"5\n", 400),
    "chunked-bad-size": (CHUNKED_POST + b"zz\r\nhello\r\n0\r\n\r\n", 400),
    "chunked-bad-size-start": (CHUNKED_POST + b"x", 400),
    "chunked-size-space": (CHUNKED_POST + b"5 \r\nhello\r\n0\r\n\r\n", 400),
    "chunked-bad-extension": (CHUNKED_POST + b"5;\x01\r\nhello\r\n0\r\n\r\n", 400),
    "chunked-data-no-crlf": (CHUNKED_POST + b"5\r\nhelloXX", 400),
    "chunked-bad-trailer": (CHUNKED_POST + b"5\r\nhello\r\n0\r\nno colon\r\n\r\n", 400),
    "cl-and-te": (head("POST /echo HTTP/1.1", "Host: a", "Content-Length: 5",
                       "Transfer-Encoding: chunked") + b"0\r\n\r\n", 400),
    "te-gzip": (head("POST /echo HTTP/1.1", "Host: a", "Transfer-Encoding: gzip") + b"abc", 400),
    "te-not-final-chunked": (head("POST /echo HTTP/1.1", "Host: a", "Transfer-Encoding: chunked, gzip")
                             + b"0\r\n\r\n", 400),
    "te-gzip-chunked": (head("POST /echo HTTP/1.1", "Host: a", "Transfer-Encoding: gzip, chunked")
                        + b"0\r\n\r\n", 400),
    "te-twice": (head("POST /echo HTTP/1.1", "Host: a", "Transfer-Encoding: chunked",
                      "Transfer-Encoding: chunked") + b"0\r\n\r\n", 400),
    # 8. sizes
    "head-too-large": (b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 8192, 431),
    "body-too-large": (head("POST /echo HTTP/1.1", "Host: a", "Content-Length: 100001"), 413),
}


async def refused_at_once(http, router, data: bytes, status: int):
    client = await http.connect(router.address)
    started = time.monotonic()
    await client.send(data)
    response = await client.read_response(timeout=3)
    elapsed = time.monotonic() - started
    assert response.status == status, (response.status, response.body)
    assert elapsed < AT_ONCE, f"answered after {elapsed:.3f}s: a timer, not the bytes"
    assert response.header("connection") == "close"
    assert await client.closed_by_peer()
    return response


@pytest.mark.parametrize("name", sorted(REFUSED))
async def test_refused_at_once_closed_and_never_forwarded(router, http, ups, name):
    data, status = REFUSED[name]
    response = await refused_at_once(http, router, data, status)
    assert [r.target for up in ups for r in up.served] == []  # nothing reached a target
    errors = sum(router.metrics.value("arr_client_errors_total", {"reason": reason, "status": str(status)})
                 for reason in ("malformed", "version-not-supported", "method-not-allowed",
                                "not-implemented", "bad-target", "bad-path", "bad-transfer-encoding",
                                "conflicting-framing", "header-too-large", "body-too-large"))
    assert errors == 1  # counted, once
    if status == 405:
        assert "GET" in response.header("allow") and "TRACE" not in response.header("allow")
    # the router goes on serving, on another connection
    ok = await http.request(router.address, "GET", "/bytes/100")
    assert ok.status == 200 and ok.body == http.payload(100)


async def test_refused_inputs_sent_byte_by_byte_are_still_answered_at_once(router, http, ups):
    """The proof may come split over many reads: answered at the byte that completes it."""
    for name in ("binary-tls-hello", "http-0.9", "http-2.0", "obs-fold", "ctl-0x01-in-value",
                 "bare-cr-in-header", "chunked-lf-only"):
        data, status = REFUSED[name]
        client = await http.connect(router.address)
        started = time.monotonic()
        for i in range(len(data)):
            try:
                await client.send(data[i:i + 1])
            except (ConnectionError, OSError):
                break  # answered and closed before the last byte: fine
        response = await client.read_response(timeout=3)
        assert response.status == status, name
        assert time.monotonic() - started < 1.0 + len(data) * 0.01, name
    assert [r.target for up in ups for r in up.served] == []


async def test_options_asterisk_is_answered_by_the_router_and_the_connection_goes_on(router, http, ups):
    client = await http.connect(router.address)
    await client.send(head("OPTIONS * HTTP/1.1", "Host: a"))
    response = await client.read_response()
    assert response.status == 200 and response.body == b""
    assert response.header("content-length") == "0"
    allow = [m.strip() for m in response.header("allow").split(",")]
    assert allow == ["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "PROPFIND",
                     "PROPPATCH", "MKCOL", "COPY", "MOVE", "LOCK", "UNLOCK", "REPORT", "SEARCH"]
    assert response.header("connection") != "close"
    await client.send(head("GET /whoami HTTP/1.1", "Host: a"))
    assert (await client.read_response()).body == b"secret"
    assert [r.target for up in ups for r in up.served] == ["/whoami"]


async def test_options_on_a_path_and_webdav_methods_are_routed(router, http, ups):
    public, _ = ups
    for method in ("OPTIONS", "PROPFIND", "MKCOL", "PATCH"):
        response = await http.request(router.address, method, "/echo")
        assert response.json()["method"] == method
    assert [r.method for r in public.served] == ["OPTIONS", "PROPFIND", "MKCOL", "PATCH"]


async def test_http_1_2_is_served_as_http_1_1(router, http, ups):
    client = await http.connect(router.address)
    await client.send(head("GET /echo HTTP/1.2", "Host: a"))
    response = await client.read_response()
    assert response.status == 200 and response.json()["target"] == "/echo"


async def test_empty_lines_before_a_request_line_are_ignored(router, http, ups):
    client = await http.connect(router.address)
    await client.send(b"\r\n\r\n\n" + head("GET /bytes/3 HTTP/1.1", "Host: a"))
    assert (await client.read_response()).body == http.payload(3)
    # between two requests too, in the same read as the end of a body (h11 alone refuses this)
    await client.send(http.build_request("POST", "/echo", body=b"abc") + b"\r\n"
                      + head("GET /bytes/4 HTTP/1.1", "Host: a"))
    assert (await client.read_response()).json()["length"] == 3
    assert (await client.read_response()).body == http.payload(4)
    # and split over reads
    await client.send(b"\r")
    await client.send(b"\n" + head("GET /bytes/5 HTTP/1.1", "Host: a"))
    assert (await client.read_response()).body == http.payload(5)


async def test_valid_chunked_bodies_with_extensions_and_trailers_pass(router, http):
    client = await http.connect(router.address)
    await client.send(CHUNKED_POST + b"5;name=value;q=\"a b\"\r\nhello\r\n3\r\nabc\r\n0\r\nX-Sum: 1\r\n\r\n")
    response = await client.read_response()
    assert response.json()["length"] == 8 and response.json()["sha256"] == http.sha256(b"helloabc")


# ---------------------------------------------------------------- absolute-form


async def test_absolute_form_is_routed_by_its_authority_and_forwarded_in_origin_form(router, http, ups):
    public, secret = ups
    client = await http.connect(router.address)
    await client.send(head("GET http://Secret.Example:8080/x/../echo?q=%2F HTTP/1.1", "Host: public.example"))
    response = await client.read_response()
    assert response.status == 200
    received = secret.served[-1]
    assert received.target == "/echo?q=%2F"
    assert received.header_all("host") == ["Secret.Example:8080"]  # the Host header is replaced
    # and a path rule holds for it too
    await client.send(head("GET http://public.example/%77hoami HTTP/1.1", "Host: public.example"))
    assert (await client.read_response()).body == b"secret"
    assert secret.served[-1].target == "/whoami"
    assert public.served == []


# ---------------------------------------------------------------- paths

# path -> ("public" | "secret", the target it receives) or a status the router answers itself
WALKS = {
    "/whoami": ("secret", "/whoami"),
    "/%77hoami": ("secret", "/whoami"),
    "/%77%68%6F%61%6d%69": ("secret", "/whoami"),
    "/./whoami": ("secret", "/whoami"),
    "//whoami": ("secret", "/whoami"),
    "///whoami": ("secret", "/whoami"),
    "/files/../whoami": ("secret", "/whoami"),
    "/files/%2e%2e/whoami": ("secret", "/whoami"),
    "/files/%2E%2E/whoami?x=1": ("secret", "/whoami?x=1"),
    "/a/b/../../whoami": ("secret", "/whoami"),
    "/.%2fwhoami": 400,
    "/%2e/whoami": ("secret", "/whoami"),
    "/whoami/./": ("secret", "/whoami/"),
    "/whoami?a=%2F&b=/../": ("secret", "/whoami?a=%2F&b=/../"),
    "/%2e%2e/whoami": 400,
    "/../whoami": 400,
    "/x/../../whoami": 400,
    "/%2Fwhoami": 400,
    "/%5cwhoami": 400,
    "/WHOAMI": ("public", "/WHOAMI"),  # paths are case-sensitive
    "/Whoami": ("public", "/Whoami"),
    "/a%3ab": ("public", "/a%3Ab"),
    "/admin": 403,
    "/admin/x": 403,
    "/%61dmin": 403,
    "/%61%64%6d%69%6e/x": 403,
    "//admin": 403,
    "/./admin/x": 403,
    "/x/../admin": 403,
    "/x/%2e%2e/admin": 403,
    "/ADMIN": ("public", "/ADMIN"),
}


@pytest.mark.parametrize("path", sorted(WALKS))
async def test_a_rule_cannot_be_walked_around(router, http, ups, path):
    public, secret = ups
    expected = WALKS[path]
    response = await http.request(router.address, "GET", path, timeout=3)
    if isinstance(expected, int):
        assert response.status == expected
        assert public.served == [] and secret.served == []
        if expected == 403:
            assert router.metrics.value("arr_requests_total",
                                        {"decision": "reject", "status": "403", "target": ""}) == 1
        return
    pool, target = expected
    up = secret if pool == "secret" else public
    other = public if pool == "secret" else secret
    assert [r.target for r in up.served] == [target]  # the target sees what the rule matched
    assert other.served == []
    assert router.metrics.value("arr_requests_total",
                                {"decision": "proxy", "status": str(response.status),
                                 "target": up.target}) == 1


async def test_policy_sees_the_normalised_path(start_router, http):
    from arr.decisions import Local, LocalResponse
    seen = []

    def policy(request):
        seen.append((request.path, request.query, request.target, request.host))
        return Local(lambda r: LocalResponse(200, b"ok"))

    router = await start_router({"limits": LIMITS}, policy=policy)
    await http.request(router.address, "GET", "/a/./b//c/%7Ed/../e?x=%2f")
    client = await http.connect(router.address)
    await client.send(head("GET http://Host.Example:81 HTTP/1.1", "Host: other"))
    await client.read_response()
    assert seen == [("/a/b/c/e", "x=%2f", "/a/b/c/e?x=%2f", "test.local"),
                    ("/", "", "/", "host.example")]
