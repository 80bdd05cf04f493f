"""HTTP/1.1 logic a relay needs on top of h11. Pure code, no I/O.

h11 is lenient where a router in front of other servers must not be (it
accepts control characters in header values, obs-fold, any token as a
method, LF-only chunk lines by waiting forever) and it waits for a whole head
before it looks at one. ``HeadScanner`` and ``ChunkScanner`` read the same
bytes before h11 does and refuse, at the byte that proves it, what is not
HTTP/1.x as RFC 9110/9112 write it; h11 then parses what they let through.
"""

from __future__ import annotations

import re
from http import HTTPStatus
from typing import TYPE_CHECKING, Iterable, Sequence

if TYPE_CHECKING:
    import h11

    from arr.request import Request

RawHeaders = list[tuple[bytes, bytes]]

# RFC 9110 section 7.6.1, plus the de-facto ones proxies also drop.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
    b"transfer-encoding", b"upgrade", b"proxy-authenticate", b"proxy-authorization",
})


class HttpError(Exception):
    """A request the router answers itself with ``status`` and then closes,
    unless ``recoverable`` (the request was read whole: the connection goes on)."""

    def __init__(self, status: int, reason: str, detail: str = "",
                 headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
        super().__init__(f"{status} {reason}: {detail}" if detail else f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.detail = detail
        self.headers = tuple(headers)
        """Extra response headers (405's Allow)."""
        self.recoverable = False


def reason_phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Unknown"


def error_response(status: int, body: bytes = b"", *, close: bool = True,
                   headers: Iterable[tuple[bytes, bytes]] = ()) -> bytes:
    """A complete response written without h11: usable when h11 is in ERROR state."""
    body = body or reason_phrase(status).lower() + b"\n"
    head = [b"HTTP/1.1 %d %s" % (status, reason_phrase(status)),
            b"content-type: text/plain; charset=utf-8",
            b"content-length: %d" % len(body)]
    head += [name + b": " + value for name, value in headers]
    if close:
        head.append(b"connection: close")
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def header_values(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [v for n, v in headers if n == name]


def check_request_framing(headers: Sequence[tuple[bytes, bytes]]) -> int | None:
    """Validate body framing beyond what h11 checks; return Content-Length if any.

    h11 accepts a request carrying both Content-Length and Transfer-Encoding
    (RFC 9112 section 6.3 lets a server pick chunked). A relay must not: the
    target might pick the other one, which is request smuggling. So: 400.
    """
    lengths = header_values(headers, b"content-length")
    if lengths and header_values(headers, b"transfer-encoding"):
        raise HttpError(400, "conflicting-framing",
                        "both Content-Length and Transfer-Encoding present")
    return int(lengths[0]) if lengths else None  # h11 already rejected bad or differing values


def connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    tokens: set[bytes] = set()
    for value in header_values(headers, b"connection"):
        tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return tokens


def end_to_end(headers: Sequence[tuple[bytes, bytes]], *, drop: Iterable[bytes] = ()) -> RawHeaders:
    """Headers minus hop-by-hop ones, including those named in Connection."""
    dropped = HOP_BY_HOP | connection_tokens(headers) | set(drop)
    return [(n, v) for n, v in headers if n not in dropped]


def _forwarded_node(ip: str) -> str:
    # RFC 7239 section 6: IPv6 nodes are quoted and bracketed.
    return f'"[{ip}]"' if ":" in ip else ip


def add_forwarding(headers: RawHeaders, client_ip: str, *, proto: str = "http",
                   host: bytes | None = None) -> RawHeaders:
    """Append this hop to X-Forwarded-For and Forwarded (never replace: earlier
    proxies' entries stay, the target decides which hops it trusts)."""
    out = [(n, v) for n, v in headers if n not in (b"x-forwarded-for", b"forwarded")]
    xff = b", ".join(header_values(headers, b"x-forwarded-for") + [client_ip.encode()])
    forwarded = f"for={_forwarded_node(client_ip)};proto={proto}"
    if host:
        forwarded += ";host=" + _quote_if_needed(host.decode("latin-1"))
    prior = header_values(headers, b"forwarded")
    out.append((b"x-forwarded-for", xff))
    out.append((b"forwarded", b", ".join(prior + [forwarded.encode("latin-1")])))
    if not header_values(headers, b"x-forwarded-proto"):
        out.append((b"x-forwarded-proto", proto.encode()))
    return out


def serialize_request(request: "Request", head: "h11.Request") -> bytes:
    """The request as the target will receive it (R'), with this hop recorded.

    Connection and keep-alive headers pass unchanged: after the handoff they
    are end to end between the client and the target. ``Expect`` does not: the
    router already answered 100 (or had the whole body), and a second 100 from
    the target would reach the client as a stray response.
    """
    headers = [(n, v) for n, v in head.headers
               if n not in (b"content-length", b"transfer-encoding", b"expect")]
    host = next((v for n, v in head.headers if n == b"host"), None)
    headers = add_forwarding(headers, request.client_ip, host=host)
    body = request.body or b""
    if body or any(n in (b"content-length", b"transfer-encoding") for n, _ in head.headers):
        headers.append((b"content-length", str(len(body)).encode()))
    lines = [head.method + b" " + head.target + b" HTTP/" + head.http_version]
    lines += [n + b": " + v for n, v in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def _quote_if_needed(value: str) -> str:
    token_chars = set("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    if value and set(value) <= token_chars:
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


# ---------------------------------------------------------------- methods

KNOWN_METHODS: tuple[bytes, ...] = (
    b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH",
    # WebDAV (RFC 4918, 3253, 5323)
    b"PROPFIND", b"PROPPATCH", b"MKCOL", b"COPY", b"MOVE", b"LOCK", b"UNLOCK", b"REPORT", b"SEARCH",
)
"""The methods the router routes; methods are case-sensitive (RFC 9110 9.1)."""
_KNOWN_METHODS = frozenset(KNOWN_METHODS)
ALLOW = b", ".join(KNOWN_METHODS)
"""The Allow header of 405 and of ``OPTIONS *``."""


def check_method(method: bytes) -> None:
    """Raise the router's answer to a method it does not route: TRACE 405
    (it would echo credentials back, and the router answers nothing itself),
    CONNECT 501 (no tunnels), anything else 501 (``get`` included)."""
    if method in _KNOWN_METHODS:
        return
    if method == b"TRACE":
        raise HttpError(405, "method-not-allowed", "TRACE is not served", [(b"allow", ALLOW)])
    if method == b"CONNECT":
        raise HttpError(501, "not-implemented", "CONNECT: the router opens no tunnels")
    raise HttpError(501, "not-implemented", f"unknown method {method.decode('latin-1')!r}")


# ---------------------------------------------------------------- wire checks

_CR, _LF, _SP, _HT, _COLON = 0x0D, 0x0A, 0x20, 0x09, 0x3A
_TCHAR = rb"!#$%&'*+\-.^_`|~0-9A-Za-z"
# RFC 3986 characters (unreserved, sub-delims, ":@/?%" and the "[]" of an
# IPv6 authority); no '#' (a fragment is not part of a request-target).
_TARGET_CHAR = rb"A-Za-z0-9\-._~!$&'()*+,;=:@/?%\[\]"
# RFC 9110 5.5: field-value bytes are VCHAR, obs-text, SP and HTAB; every other CTL is refused.
_VALUE_CHAR = rb"\t\x20-\x7e\x80-\xff"
_TOKEN_RUN = re.compile(b"[" + _TCHAR + b"]*")
_TARGET_RUN = re.compile(b"[" + _TARGET_CHAR + b"]*")
_VALUE_RUN = re.compile(b"[" + _VALUE_CHAR + b"]*")
_VERSION_RUN = re.compile(rb"[HTP/0-9.]*")
_VERSION = re.compile(rb"HTTP/([0-9])\.[0-9]")
_VERSION_PREFIX = re.compile(rb"H(?:T(?:T(?:P(?:/(?:[0-9](?:\.[0-9]?)?)?)?)?)?)?")
_VALID_HEAD = re.compile(
    b"[" + _TCHAR + b"]+ [" + _TARGET_CHAR + rb"]+ HTTP/1\.[0-9]\r?\n"
    b"(?:[" + _TCHAR + b"]+:[" + _VALUE_CHAR + rb"]*\r?\n)*\r?\n")
"""A whole valid HTTP/1.x head: the one regex the common request costs."""

(_LEADING, _LEADING_CR, _METHOD, _TARGET, _VERSION_STATE, _AFTER_CR, _FIELD_START, _NAME, _VALUE,
 _DONE) = range(10)


def _malformed(detail: str) -> HttpError:
    return HttpError(400, "malformed", detail)


class HeadScanner:
    """Checks a request head's bytes as they arrive, before h11 sees them.

    ``feed`` raises HttpError (400, or 505 for an HTTP version other than
    1.x) as soon as the bytes received prove the head invalid: a byte that
    cannot be where it is (binary, a control character in a field, a space
    starting an obs-fold line, a CR not followed by LF, a line without a
    colon), or a request line that ends without ``HTTP/1.x`` (HTTP/0.9,
    HTTP/2.0). Empty lines before the request line are allowed (RFC 9112
    2.2) and removed from what ``feed`` returns, since h11 refuses them.
    ``done`` is True once the head's final empty line was seen; later bytes
    (the body) are not looked at. A bare LF ends a head line as h11 allows
    (the router writes CRLF to the targets whatever it read).
    """

    __slots__ = ("done", "_state", "_after_cr", "_run", "_version", "_leading", "_limit")

    def __init__(self, limit: int = 64 * 1024) -> None:
        self.done = False
        self._state = _LEADING
        self._after_cr = _FIELD_START
        self._run = 0
        """Length of the method, target or field name read so far."""
        self._version = b""
        self._leading = 0
        self._limit = limit
        """Most bytes of empty lines accepted before the request line."""

    def feed(self, data: bytes) -> bytes:
        """Check DATA, the next bytes from the client; return what h11 is to
        receive of them (DATA without the empty lines before a request line)."""
        if self.done:
            return data
        if self._state <= _LEADING_CR:  # no byte of the request line yet
            if self._state == _LEADING and _VALID_HEAD.match(data):
                self.done = True  # the common case: a whole valid head in one read
                return data
            skipped = self._skip_empty_lines(data)
            if skipped == len(data):
                return b""
            data = data[skipped:] if skipped else data
            self._state = _METHOD
            self._run = 0
        self._scan(data)
        return data

    def _skip_empty_lines(self, data: bytes) -> int:
        pos, end = 0, len(data)
        while pos < end:
            byte = data[pos]
            if self._state == _LEADING_CR:
                if byte != _LF:
                    raise _malformed("CR not followed by LF")
                self._state = _LEADING
            elif byte == _CR:
                self._state = _LEADING_CR
            elif byte != _LF:
                break
            pos += 1
        self._leading += pos
        if self._leading > self._limit:
            raise _malformed("no request line, only empty lines")
        return pos

    def _scan(self, data: bytes) -> None:
        pos, end = 0, len(data)
        state = self._state
        while pos < end:
            if state == _VALUE:
                pos = _VALUE_RUN.match(data, pos).end()  # type: ignore[union-attr]
                if pos == end:
                    break
                byte = data[pos]
                if byte == _CR:
                    state, self._after_cr = _AFTER_CR, _FIELD_START
                elif byte == _LF:
                    state = _FIELD_START
                else:
                    raise _malformed(f"control character {byte:#04x} in a header value")
                pos += 1
            elif state == _FIELD_START:
                byte = data[pos]
                if byte == _CR:
                    state, self._after_cr = _AFTER_CR, _DONE
                    pos += 1
                elif byte == _LF:
                    state = _DONE
                    break
                elif byte == _SP or byte == _HT:
                    raise _malformed("obs-fold (a header line starting with whitespace)")
                else:
                    state, self._run = _NAME, 0
            elif state == _NAME:
                stop = _TOKEN_RUN.match(data, pos).end()  # type: ignore[union-attr]
                self._run += stop - pos
                pos = stop
                if pos == end:
                    break
                byte = data[pos]
                if byte == _COLON and self._run:
                    state = _VALUE
                    pos += 1
                elif byte == _CR or byte == _LF:
                    raise _malformed("header line without a colon")
                else:
                    raise _malformed(f"byte {byte:#04x} in a header name")
            elif state == _AFTER_CR:
                if data[pos] != _LF:
                    raise _malformed("CR not followed by LF")
                state = self._after_cr
                pos += 1
                if state == _DONE:
                    break
            elif state == _METHOD:
                stop = _TOKEN_RUN.match(data, pos).end()  # type: ignore[union-attr]
                self._run += stop - pos
                pos = stop
                if pos == end:
                    break
                if data[pos] != _SP or not self._run:
                    raise _malformed(f"byte {data[pos]:#04x} in the method: not an HTTP/1.x request")
                state, self._run = _TARGET, 0
                pos += 1
            elif state == _TARGET:
                stop = _TARGET_RUN.match(data, pos).end()  # type: ignore[union-attr]
                self._run += stop - pos
                pos = stop
                if pos == end:
                    break
                byte = data[pos]
                if byte == _SP and self._run:
                    state, self._version = _VERSION_STATE, b""
                    pos += 1
                elif byte == _CR or byte == _LF:
                    raise _malformed("request line without an HTTP version (HTTP/0.9 is not served)")
                else:
                    raise _malformed(f"byte {byte:#04x} in the request-target")
            elif state == _VERSION_STATE:
                stop = _VERSION_RUN.match(data, pos).end()  # type: ignore[union-attr]
                version = self._version + data[pos:stop]
                if len(version) > 8 or not _VERSION_PREFIX.fullmatch(version):
                    raise _malformed(f"malformed HTTP version {version[:16]!r}")
                self._version = version
                pos = stop
                if pos == end:
                    break
                byte = data[pos]
                full = _VERSION.fullmatch(version)
                if (byte != _CR and byte != _LF) or full is None:
                    raise _malformed(f"malformed HTTP version {version!r}")
                if full.group(1) != b"1":
                    raise HttpError(505, "version-not-supported",
                                    f"HTTP/{version[5:].decode()} is not served (HTTP/1.x only)")
                if byte == _CR:
                    state, self._after_cr = _AFTER_CR, _FIELD_START
                else:
                    state = _FIELD_START
                pos += 1
            else:  # _DONE
                break
        self._state = state
        self.done = state == _DONE


_QUOTED_STRING = rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'
_TOKEN = b"[" + _TCHAR + b"]+"
# RFC 9112 7.1: chunk-size [ chunk-ext ] CRLF; sizes beyond 16 hex digits overflow every target.
_CHUNK_LINE = re.compile(
    rb"([0-9A-Fa-f]{1,16})(?:[ \t]*;[ \t]*" + _TOKEN + rb"(?:[ \t]*=[ \t]*(?:" + _TOKEN + b"|"
    + _QUOTED_STRING + rb"))?)*\r\n")
_TRAILER_LINE = re.compile(_TOKEN + b":[" + _VALUE_CHAR + rb"]*\r\n")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_TOKEN_BYTES = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
MAX_CHUNK_LINE = 4096
"""Longest chunk-size or trailer line accepted (extensions included)."""

_SIZE_LINE, _DATA, _DATA_END, _TRAILER = range(4)


class ChunkScanner:
    """Checks a chunked body's framing as its bytes arrive, before h11 sees them.

    h11 waits forever for a chunk line ended by a bare LF and accepts any
    bytes as a chunk extension: a target that reads the framing differently
    would see another body (request smuggling). ``feed`` raises HttpError
    400 at the byte that proves the framing wrong (a bare LF or CR, a size
    that is not 1-16 hex digits, an extension that is not ``;name[=value]``,
    chunk data not followed by CRLF, a bad trailer line). ``done`` once the
    trailer section ended; later bytes are not looked at.
    """

    __slots__ = ("done", "_state", "_line", "_remaining")

    def __init__(self) -> None:
        self.done = False
        self._state = _SIZE_LINE
        self._line = b""
        self._remaining = 0

    def feed(self, data: bytes) -> None:
        pos, end = 0, len(data)
        while pos < end and not self.done:
            state = self._state
            if state == _DATA:
                take = min(self._remaining, end - pos)
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._state, self._line = _DATA_END, b""
            elif state == _DATA_END:
                if data[pos] != b"\r\n"[len(self._line)]:
                    raise _malformed("chunk data not followed by CRLF")
                self._line += data[pos:pos + 1]
                pos += 1
                if len(self._line) == 2:
                    self._state, self._line = _SIZE_LINE, b""
            else:
                newline = data.find(b"\n", pos)
                stop = end if newline < 0 else newline + 1
                line = self._line + data[pos:stop]
                pos = stop
                if len(line) > MAX_CHUNK_LINE:
                    raise _malformed("chunk line too long")
                if newline < 0:
                    self._check_partial_line(line)
                    self._line = line
                else:
                    self._line = b""
                    self._end_line(line)

    def _check_partial_line(self, line: bytes) -> None:
        """What the start of a line already proves wrong (answered at once)."""
        first = line[0]
        if self._state == _SIZE_LINE and first not in _HEX:
            raise _malformed(f"chunk size starts with {first:#04x}")
        if self._state == _TRAILER and first != _CR and first not in _TOKEN_BYTES:
            raise _malformed(f"trailer line starts with {first:#04x}")
        cr = line.find(b"\r")
        if 0 <= cr < len(line) - 1:
            raise _malformed("CR not followed by LF in a chunk line")

    def _end_line(self, line: bytes) -> None:
        if line[-2:] != b"\r\n":
            raise _malformed("chunk line not ended by CRLF")
        if self._state == _SIZE_LINE:
            match = _CHUNK_LINE.fullmatch(line)
            if match is None:
                raise _malformed(f"bad chunk size or extension: {line[:64]!r}")
            size = int(match.group(1), 16)
            if size:
                self._state, self._remaining = _DATA, size
            else:
                self._state = _TRAILER
        elif line == b"\r\n":
            self.done = True
        elif _TRAILER_LINE.fullmatch(line) is None:
            raise _malformed(f"bad trailer line: {line[:64]!r}")
