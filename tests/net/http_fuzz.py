"""What the router's front-end answers, as a table, and hypothesis strategies
that generate requests of every kind in it (issue 13).

Used by ``tests/net/test_fuzz_net.py``, which sends what these strategies make
to a router in nat mode with two nginx targets and checks each answer against
``expect()``. The table (``ORACLE``) is the documentation: one row per kind of
input, the contract item it comes from, the status, whether the router closes
the connection afterwards, and how soon the answer must come.

The router under test is configured from the constants below:

* pool ``a`` = target t0 (the default), pool ``b`` = target t1;
* rules, in order: ``/whoami...`` refused 403; ``/private...`` to pool b;
  Host ``b.example`` to pool b;
* ``/_arr/health`` is answered by the router itself (200);
* small limits, so that the slow kinds finish in seconds.

Rules match the *normalised* path (``normalise()`` here is the reference: an
independent re-statement of contract item 6, not the router's code). A
request the router forwards gets the target's own answer: the test asks the
target directly (same method, normalised path) what that answer is, and
checks the target's access log to see the normalised path arrived at the pool
the rules name, and nowhere else.

Every generated request carries at most one fault, on top of a request that is
otherwise valid, so that each input has one documented answer. Where the
contract leaves a choice open the oracle accepts each reading (``Outcome``
alternatives): the order of "merge slashes" and "remove dot segments", and
whether a too-large head that h11 parsed whole keeps the connection open.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from hypothesis import strategies as st

# ------------------------------------------------------------------ the router under test

LIMITS = {
    "header_bytes": 8192,
    "header_timeout": 2.0,
    "max_body": 16384,
    "body_buffer": 65536,  # > max_body: every accepted body is read before the decision
    "body_timeout": 1.0,
    "body_deadline": 3.0,
    "min_body_rate": 200,
    "body_rate_grace": 1.0,
}
RULES = [
    {"path_prefix": "/whoami", "reject": 403},
    {"path_prefix": "/private", "pool": "b"},
    {"host": "b.example", "pool": "b"},
]
DEFAULT_POOL = "a"
POOL_TARGET = {"a": 0, "b": 1}  # pool -> index of its one target
HEALTH_PATH = "/_arr/health"  # the router's own liveness answer
FUZZ_FILES = {"1k": 1024, "64k": 64 * 1024}  # what fuzzed GETs may fetch (SHA-256 checked)
DOWNLOAD_FILES = {"16m": 16 << 20, "64m": 64 << 20}  # concurrent downloads, never fuzzed
KNOWN_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH",
                 "PROPFIND", "PROPPATCH", "MKCOL", "COPY", "MOVE", "LOCK", "UNLOCK", "REPORT", "SEARCH")
AT_ONCE = 1.0
"""Seconds within which every answer that is not a slow kind must come,
from the client's connect."""
SLACK = 1.0
"""A slow kind's answer: within its configured bound plus this."""

TAG = b"@@TAG@@"
"""Placeholder in the query of generated targets; the test replaces it with
``arrfz=<12 hex>``, a unique tag to find the request in the targets' logs."""


# ------------------------------------------------------------------ the table

TARGET = None
"""Status column: the target's own answer (asked directly, for the normalised request)."""
ROUTED = -1
"""Status column: decided per request by ``route()`` on the normalised path:
400 (bad path), 403 (rejected by rule), 200 (router's health path), or the
target's own answer."""


@dataclass(frozen=True)
class Row:
    contract: str  # the contract item (issue 13's list, numbered as in the brief)
    status: int | None  # an HTTP status, ROUTED, or TARGET
    close: bool | None  # the router closes after its answer (True), keeps it (False), either (None)
    within: str  # "at-once", or the limit whose value (+ SLACK) bounds the answer
    since: str  # the bound counts from "connect" or from "head" (the head fully sent)
    what: str


ORACLE: dict[str, Row] = {
    # kind                    contract status  close  within            since
    "request":        Row("6,10", ROUTED, None, "at-once", "connect",
                          "any known method, wild or plain path, version 1.0-1.9, valid headers and body"),
    "path-probe":     Row("6", ROUTED, None, "at-once", "connect",
                          "the documented path encodings (/%77hoami, /./whoami, //whoami, ...)"),
    "absolute-form":  Row("5", ROUTED, None, "at-once", "connect",
                          "GET http://host/path: routed by the authority, forwarded in origin-form"),
    "leading-crlf":   Row("1", ROUTED, None, "at-once", "connect", "CRLFs before the request line: ignored"),
    "options-star":   Row("5", 200, False, "at-once", "connect",
                          "OPTIONS * answered by the router: Allow, content-length 0, connection kept"),
    "garbage":        Row("1", 400, True, "at-once", "connect", "binary junk (first byte cannot start a request)"),
    "garbage-line":   Row("1", 400, True, "at-once", "connect", "a line without spaces (SSH banner, token)"),
    "http09":         Row("1", 400, True, "at-once", "connect", "GET /path<CRLF> (no version: HTTP/0.9)"),
    "bare-cr":        Row("1", 400, True, "at-once", "connect", "a CR not followed by LF in the head"),
    "leading-junk":   Row("1", 400, True, "at-once", "connect", "bytes other than CRLFs before the request line"),
    "no-colon":       Row("1", 400, True, "at-once", "connect", "a header line without a colon"),
    "obs-fold":       Row("1", 400, True, "at-once", "connect", "a header continued on the next line (obs-fold)"),
    "bad-method-char": Row("1", 400, True, "at-once", "connect", "a method with a non-token character"),
    "bad-target-char": Row("1,6", 400, True, "at-once", "connect", "a raw byte outside RFC 3986 in the path"),
    "bad-query-char": Row("1", 400, True, "at-once", "connect", "a raw byte outside RFC 3986 in the query"),
    "relative-target": Row("1", 400, True, "at-once", "connect", "a target neither /path, http://, * nor CONNECT's"),
    "bad-version":    Row("1", 400, True, "at-once", "connect", "a malformed HTTP-version (http/1.1, HTTP/1, ...)"),
    "version-major":  Row("2", 505, True, "at-once", "connect", "HTTP/0.9, HTTP/2.0, HTTP/3.0 request lines"),
    "h2-preface":     Row("2", 505, True, "at-once", "connect", "the HTTP/2 connection preface PRI * HTTP/2.0"),
    "ctl-in-value":   Row("3", 400, True, "at-once", "connect", "a CTL (not HTAB, not LF) in a header value"),
    "lf-in-value":    Row("3", ROUTED, None, "at-once", "connect",
                          "a bare LF in a header value ends the line (RFC 9112 2.2, as nginx reads it): "
                          "two header lines, forwarded with CRLF, so the target reads what the router read"),
    "ctl-in-name":    Row("3", 400, True, "at-once", "connect", "a CTL in a header name"),
    "bad-name-char":  Row("3", 400, True, "at-once", "connect", "a header name that is not a token ('X A', 'X(', ...)"),
    "trace":          Row("4", 405, True, "at-once", "connect", "TRACE"),
    "connect":        Row("4", 501, True, "at-once", "connect", "CONNECT"),
    "unknown-method": Row("4", 501, True, "at-once", "connect", "a token method not in the known list (get, FOO)"),
    "star-other-method": Row("5", 400, True, "at-once", "connect", "* as the target of a method other than OPTIONS"),
    "authority-form": Row("5", 400, True, "at-once", "connect", "host:port as the target of a method but CONNECT"),
    "bad-scheme":     Row("5", 400, True, "at-once", "connect", "absolute-form with a scheme other than http"),
    "chunk-lf":       Row("7", 400, True, "at-once", "connect", "a chunked body with an LF-only line ending"),
    "chunk-bad-size": Row("7", 400, True, "at-once", "connect", "a chunk size that is not hex digits"),
    "chunk-overrun":  Row("7", 400, True, "at-once", "connect", "chunk data longer than its size"),
    "cl-and-te":      Row("7", 400, True, "at-once", "connect", "Content-Length and Transfer-Encoding together"),
    "te-not-chunked": Row("7", 400, True, "at-once", "connect", "a Transfer-Encoding other than final chunked"),
    "bad-content-length": Row("7", 400, True, "at-once", "connect", "Content-Length not one decimal number"),
    "missing-host":   Row("-", 400, True, "at-once", "connect", "HTTP/1.1 without Host (existing behaviour)"),
    "head-too-large": Row("8", 431, None, "at-once", "connect",
                          "a head over header_bytes (kept open if h11 parsed it whole: answer_and_continue)"),
    "body-too-large": Row("8", 413, True, "at-once", "connect", "Content-Length over max_body"),
    "chunked-too-large": Row("8", 413, True, "at-once", "connect", "a chunked body growing over max_body"),
    "slow-silent":    Row("9", 408, True, "header_timeout", "connect", "connect and send nothing"),
    "slow-head":      Row("9", 408, True, "header_timeout", "connect", "a head that stops before its end"),
    "slow-head-trickle": Row("9", 408, True, "header_timeout", "connect",
                             "a head that keeps coming, a header line every 0.3 s"),
    "slow-body-stall": Row("9", 408, True, "body_timeout", "head", "a body that stops (Content-Length or chunked)"),
    "slow-body-deadline": Row("9", 408, True, "body_deadline", "head",
                              "a body trickled above min_body_rate that never ends"),
    "slow-body-rate": Row("9", 408, True, "body_rate_grace", "head", "a body trickled below min_body_rate"),
}


def bound(kind: str) -> float:
    """Seconds within which the answer to KIND must come (from ``ORACLE[kind].since``)."""
    within = ORACLE[kind].within
    return AT_ONCE if within == "at-once" else float(LIMITS[within]) + SLACK


# ------------------------------------------------------------------ reference normalisation (item 6)

ALPHA = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
DIGIT = "0123456789"
UNRESERVED = frozenset(ALPHA + DIGIT + "-._~")
SUB_DELIMS = "!$&'()*+,;="
PCHAR = frozenset(ALPHA + DIGIT + "-._~" + SUB_DELIMS + ":@")
PATH_CHARS = PCHAR | {"/", "%"}
QUERY_CHARS = PCHAR | {"/", "?", "%"}
TCHAR = ALPHA + DIGIT + "!#$%&'*+-.^_`|~"
HEX = "0123456789abcdefABCDEF"


class Bad(Exception):
    """A request-target the router must refuse with 400."""


def decode_escapes(path: str) -> str:
    """Unreserved escapes decoded, the others kept (hex upper-cased); Bad for
    raw bytes outside the path characters, invalid escapes, %00, %2F, %5C."""
    for ch in path:
        if ch not in PATH_CHARS:
            raise Bad(f"raw {ch!r} in the path")
    out, i = [], 0
    while i < len(path):
        ch = path[i]
        if ch != "%":
            out.append(ch)
            i += 1
            continue
        hh = path[i + 1:i + 3]
        if len(hh) < 2 or any(c not in HEX for c in hh):
            raise Bad(f"invalid escape {path[i:i + 3]!r}")
        byte = int(hh, 16)
        if byte == 0:
            raise Bad("%00")
        if byte in (0x2F, 0x5C):
            raise Bad(f"encoded {'slash' if byte == 0x2F else 'backslash'} %{hh}")
        out.append(chr(byte) if chr(byte) in UNRESERVED else "%" + hh.upper())
        i += 3
    return "".join(out)


def remove_dots(path: str, merge_first: bool) -> str:
    """Dot segments removed; Bad when a '..' climbs above the root. With
    MERGE_FIRST empty segments are dropped before (nginx's order), else
    after (then a '..' can consume an empty segment)."""
    segments = path.split("/")[1:]
    out: list[str] = []
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if seg == "" and merge_first and not last:
            continue
        if seg == ".":
            if last:
                out.append("")
            continue
        if seg == "..":
            if not out:
                raise Bad("'..' above the root")
            out.pop()
            if last:
                out.append("")
            continue
        out.append(seg)
    result = "/" + "/".join(out)
    return re.sub("/{2,}", "/", result)


def normalise(path: str) -> list[str | Bad]:
    """Every reading of PATH the contract allows: one normalised path, or two
    when the order of merging slashes and removing dots matters; Bad where
    the router must answer 400."""
    try:
        decoded = decode_escapes(path)
    except Bad as bad:
        return [bad]
    readings: list[str | Bad] = []
    for merge_first in (True, False):
        try:
            readings.append(remove_dots(decoded, merge_first))
        except Bad as bad:
            readings.append(bad)
    if str(readings[0]) == str(readings[1]) and type(readings[0]) is type(readings[1]):
        return readings[:1]
    return readings


def canonical(path: str) -> str:
    """PATH with its escapes' hex in upper case (for comparing logged paths)."""
    return re.sub(r"%[0-9a-fA-F]{2}", lambda m: m.group(0).upper(), path)


# ------------------------------------------------------------------ routing (the configured rules)

@dataclass(frozen=True)
class Outcome:
    """One acceptable answer. ``status`` None: the target's own answer."""

    status: int | None
    by: str  # "router", or the pool ("a", "b") whose target answers
    path: str | None = None  # the normalised path the target must receive
    counted: str = "client-error"  # which metric counts it: client-error, reject, local, forwarded
    why: str = ""

    def describe(self) -> str:
        if self.by == "router":
            return f"{self.status} from the router ({self.why or self.counted})"
        return f"pool {self.by}'s answer to {self.path}"


def host_name(host: str | None) -> str:
    if not host:
        return ""
    return host.rsplit(":", 1)[0].lower().rstrip(".") if not host.startswith("[") else host.lower()


def route(path: str, host: str | None) -> Outcome:
    """Where the configured rules send a normalised PATH."""
    if path == HEALTH_PATH:
        return Outcome(200, "router", counted="local", why="health path")
    if path.startswith("/whoami"):
        return Outcome(403, "router", counted="reject", why="rule: /whoami refused")
    if path.startswith("/private"):
        return Outcome(None, "b", path, "forwarded")
    if host_name(host) == "b.example":
        return Outcome(None, "b", path, "forwarded")
    return Outcome(None, DEFAULT_POOL, path, "forwarded")


def routed(target: str, host: str | None) -> tuple[Outcome, ...]:
    """The acceptable outcomes of an otherwise valid request for TARGET."""
    if target.startswith("http://"):
        rest = target[len("http://"):]
        cut = min([i for i in (rest.find("/"), rest.find("?")) if i >= 0], default=len(rest))
        host, target = rest[:cut], rest[cut:] or "/"
        if not target.startswith("/"):
            target = "/" + target
    elif not target.startswith("/"):
        return (Outcome(400, "router", why="not origin- or absolute-form"),)
    path, _, query = target.partition("?")
    bad_query = [ch for ch in query if ch not in QUERY_CHARS]
    if bad_query:
        return (Outcome(400, "router", why=f"raw {bad_query[0]!r} in the query"),)
    outcomes = []
    for reading in normalise(path):
        if isinstance(reading, Bad):
            outcomes.append(Outcome(400, "router", why=str(reading)))
        else:
            outcomes.append(route(reading, host))
    return tuple(dict.fromkeys(outcomes))


# ------------------------------------------------------------------ a generated input

@dataclass
class Case:
    kind: str
    data: bytes  # sent at once after connecting (TAG replaced first)
    method: str = "GET"
    target: str = ""  # the request-target as sent (TAG as in data)
    host: str | None = None
    trickle: tuple[bytes, float] | None = None  # slow kinds: this piece every that many seconds
    follow_up: bytes = b""  # sent after the answer on the same connection (keep-alive kinds)
    body: str = "none"  # none, length, chunked
    version: str = "HTTP/1.1"
    note: str = ""

    @property
    def slow(self) -> bool:
        return ORACLE[self.kind].within != "at-once"


def expect(case: Case) -> tuple[Outcome, ...]:
    """The acceptable answers to CASE (the oracle)."""
    row = ORACLE[case.kind]
    if row.status == ROUTED:
        return routed(case.target.replace(TAG.decode(), "arrfz=0"), case.host)
    if row.status is TARGET:  # pragma: no cover - no such row at present
        raise AssertionError(case.kind)
    counted = "local" if case.kind == "options-star" else "client-error"
    return (Outcome(row.status, "router", counted=counted, why=case.kind),)


# ------------------------------------------------------------------ building blocks

def request_bytes(method: str, target: str, version: str, headers: list[tuple[bytes, bytes]],
                  body: bytes = b"", lead: bytes = b"") -> bytes:
    line = f"{method} {target} {version}".encode("latin-1")
    lines = [line] + [n + b": " + v for n, v in headers]
    return lead + b"\r\n".join(lines) + b"\r\n\r\n" + body


def with_tag(path: str, query: str = "") -> str:
    return f"{path}?{query + '&' if query else ''}{TAG.decode()}"


def chunk_size(n: int, upper: bool, zeros: int) -> bytes:
    text = "0" * zeros + format(n, "x")
    return (text.upper() if upper else text).encode()


def encode_chunked(body: bytes, cuts: list[int], upper: bool = False, zeros: int = 0,
                   ext: bytes = b"", trailer: bytes = b"") -> bytes:
    points = sorted({c for c in cuts if 0 < c < len(body)})
    pieces = [body[a:b] for a, b in zip([0] + points, points + [len(body)]) if body[a:b]]
    out = b"".join(chunk_size(len(p), upper, zeros) + ext + b"\r\n" + p + b"\r\n" for p in pieces)
    return out + b"0" + ext + b"\r\n" + trailer + b"\r\n"


# ------------------------------------------------------------------ strategies: parts

PLAIN_PATHS = ["/files/1k", "/files/64k", "/files/nope", "/health", "/private/x", "/", "/nope", "/files/"]
"""Paths the router forwards as they are (for inputs whose fault is elsewhere)."""

TEMPLATES = ["/files/1k", "/files/64k", "/files/nope", "/whoami", "/whoami/x", "/private", "/private/x",
             "/health", "/_arr/health", "/", "/files/", "/x/y", "/WHOAMI", "/Private/x", "/whoamiz",
             "/files/1k;p=1", "/a:b@c", "/~u/!$&'()*+,;="]
SEGMENTS = ["files", "1k", "64k", "nope", "whoami", "private", "health", "_arr", "x", "a.b", "~u", "...",
            ".x", "", ".", "..", "%2e", "%2E%2e", ".%2E", "%2e.", "WhoAmI", "%77hoami"]
FAULTS = ["%2F", "%2f", "%5C", "%5c", "%00", "%", "%g0", "%0", "%%", "\\", '"', "<", ">", "^", "`", "{", "|",
          "}", "[", "]", "#", "\x80", "\xff", "\x01", "\x7f", "\x00", "\t", " "]
"""Raw and escaped bytes the contract refuses in a path (but %-prefixes may
complete a valid escape with what follows: the oracle judges the result)."""

HOSTS = ["a.example", "b.example", "B.EXAMPLE", "b.example:80", "a.example:8080", "10.200.1.1", "localhost"]
VERSIONS = ["HTTP/1.1"] * 8 + ["HTTP/1.0"] * 2 + [f"HTTP/1.{i}" for i in range(2, 10)]
METHOD_WEIGHTS = ["GET"] * 6 + ["HEAD"] * 2 + ["POST"] * 2 + list(KNOWN_METHODS)
VALUE_CHARS = "".join(chr(c) for c in range(0x20, 0x7F)) + "\t" + "".join(chr(c) for c in range(0x80, 0x100))
CTLS = [c for c in range(0x00, 0x20) if c not in (0x09, 0x0A)] + [0x7F]
NON_TOKEN = '(),/:;<=>?@[\\]{}"' + "\x7f\x80\xe9"
NAME_BAD = NON_TOKEN.replace(":", "")  # a colon in a name would just end it

pchar_text = st.text(alphabet=sorted(PCHAR - {"%"}), min_size=1, max_size=8)
query_text = st.text(alphabet=sorted(QUERY_CHARS - {"%"}), max_size=12)
token = st.text(alphabet=TCHAR, min_size=1, max_size=12)


@st.composite
def percent_encode(draw, path: str) -> str:
    """PATH with a few characters (any, the slashes too) written as escapes."""
    if len(path) <= 1:
        return path
    picks = draw(st.sets(st.integers(1, len(path) - 1), max_size=3))
    upper = draw(st.booleans())
    out = []
    for i, ch in enumerate(path):
        if i in picks and ord(ch) < 0x100:
            hh = f"{ord(ch):02X}" if upper else f"{ord(ch):02x}"
            out.append("%" + hh)
        else:
            out.append(ch)
    return "".join(out)


@st.composite
def wild_path(draw) -> str:
    """A path that may need normalising (or refusing): templates and random
    segments, extra slashes, dot segments, escapes, now and then a fault."""
    if draw(st.booleans()):
        path = draw(st.sampled_from(TEMPLATES))
        segs = path.split("/")[1:]
        for _ in range(draw(st.integers(0, 2))):
            at = draw(st.integers(0, len(segs)))
            segs[at:at] = draw(st.sampled_from([[""], ["."], ["x", ".."], ["%2e"], [".", ""], ["files", ".."]]))
        path = "/" + "/".join(segs)
    else:
        segs = draw(st.lists(st.one_of(st.sampled_from(SEGMENTS), pchar_text), min_size=1, max_size=5))
        path = "/" + "/".join(segs)
    if draw(st.integers(0, 3)) == 0:
        path = draw(percent_encode(path))
    if draw(st.integers(0, 9)) == 0:
        at = draw(st.integers(1, len(path)))
        path = path[:at] + draw(st.sampled_from(FAULTS)) + path[at:]
    return path


@st.composite
def header_lines(draw) -> list[tuple[bytes, bytes]]:
    """Valid extra headers (names prefixed X- so none has a meaning)."""
    out = []
    for _ in range(draw(st.integers(0, 4))):
        name = b"X-" + draw(token).encode()
        value = draw(st.text(alphabet=VALUE_CHARS, max_size=40)).encode("latin-1")
        out.append((name, value))
    extra = draw(st.sampled_from([None, (b"User-Agent", b"arr-fuzz/1"), (b"Accept", b"*/*"),
                                  (b"Connection", b"close"), (b"Connection", b"keep-alive"),
                                  (b"Cookie", b"a=1; b=2"), (b"Accept-Encoding", b"gzip")]))
    if extra:
        out.insert(draw(st.integers(0, len(out))), extra)
    return out


@st.composite
def valid_body(draw, version: str) -> tuple[str, list[tuple[bytes, bytes]], bytes]:
    """(framing, headers, encoded body): none, Content-Length, or chunked (1.1+)."""
    kinds = ["none"] * 3 + ["length"] + (["chunked"] if version != "HTTP/1.0" else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "none":
        return kind, [], b""
    body = draw(st.binary(max_size=2000))
    if kind == "length":
        return kind, [(b"Content-Length", str(len(body)).encode())], body
    encoded = encode_chunked(
        body, draw(st.lists(st.integers(0, max(len(body), 1)), max_size=4)),
        upper=draw(st.booleans()), zeros=draw(st.integers(0, 2)),
        ext=draw(st.sampled_from([b"", b"", b";a=b", b";x"])),
        trailer=draw(st.sampled_from([b"", b"", b"X-Trailer: t\r\n"])))
    te = draw(st.sampled_from([b"chunked", b"chunked", b"Chunked"]))
    return kind, [(b"Transfer-Encoding", te)], encoded


# ------------------------------------------------------------------ strategies: kinds

@st.composite
def good_request(draw, *, target: str | None = None, path: str | None = None, kind: str = "request",
                 method: str | None = None) -> Case:
    """A valid request (modulo its path, judged by the oracle)."""
    method = method or draw(st.sampled_from(METHOD_WEIGHTS))
    version = draw(st.sampled_from(VERSIONS))
    host = draw(st.sampled_from(HOSTS))
    if target is None:
        if path is None:
            path = draw(st.one_of(wild_path(), st.sampled_from(PLAIN_PATHS)))
        query = draw(st.one_of(st.just(""), query_text))
        target = with_tag(path, query)
    framing, body_headers, body = draw(valid_body(version))
    headers = draw(header_lines())
    host_line = [] if version == "HTTP/1.0" and draw(st.booleans()) else [(b"Host", host.encode())]
    all_headers = host_line + headers + body_headers
    lead = b"\r\n" * draw(st.integers(1, 2)) if kind == "leading-crlf" else b""
    data = request_bytes(method, target, version, all_headers, body, lead)
    return Case(kind, data, method, target, host if host_line else None, body=framing, version=version)


def plain_request(method: str = "GET", path: str = "/files/1k", headers: list[tuple[bytes, bytes]] | None = None,
                  version: str = "HTTP/1.1", body: bytes = b"") -> bytes:
    hdrs = [(b"Host", b"a.example")] + (headers or [])
    return request_bytes(method, with_tag(path), version, hdrs, body)


PROBES = [
    "/%77hoami", "/./whoami", "//whoami", "/files/../whoami", "/%2e/whoami", "/files/%2e%2e/whoami",
    "/files/.%2e/whoami", "/whoam%69", "/%77%68%6f%61%6d%69", "/x/./../whoami", "///whoami", "/.//whoami",
    "/files/..//whoami", "/files//../whoami", "/files/..%2fwhoami", "/files/..%2Fwhoami", "/%2fwhoami",
    "/files%2f..%2fwhoami", "/files/..%5cwhoami", "/files\\..\\whoami", "/whoami%00", "/whoami%00.txt",
    "/%2e%2e/whoami", "/../whoami", "/files/../../whoami", "/%2E%2E%2F", "/whoami%", "/whoami%2",
    "/whoami%zz", "/WHOAMI", "/WhoAmI", "/%57hoami", "/whoami/", "/whoami/.", "/whoami;x", "/whoami%3bx",
    "/%70rivate/x", "/./private/x", "//private/x", "/files/../private/x", "/pr%69vate", "/files/%2e%2e/private",
    "/_arr/%68ealth", "/_arr/./health", "//_arr//health", "/files/%31k", "/files/1%6B", "/%66iles/1k",
    "/files/./1k", "/files//1k", "/x/../files/1k", "/files/1k/..", "/files/1k/.", "/files/%7e", "/files/%7E",
    "/files/%41", "/files/a%20b", "/files/a%3fb", "/files/%25", "/files/%C3%A9", "/files/\xe9", "/files/a b",
    "/files/a\"b", "/files/a#b", "/files/a{b}", "/files/a|b", "/files/a^b", "/files/a`b", "/files/[1]",
]
"""The documented encodings and their neighbours (also sent as hypothesis's
explicit example, so every run covers each)."""


def probe_case(path: str, method: str = "GET", host: str = "a.example") -> Case:
    target = with_tag(path)
    data = request_bytes(method, target, "HTTP/1.1", [(b"Host", host.encode())])
    return Case("path-probe", data, method, target, host)


@st.composite
def path_probe(draw) -> Case:
    path = draw(st.sampled_from(PROBES))
    if draw(st.booleans()):
        return probe_case(path, draw(st.sampled_from(METHOD_WEIGHTS)), draw(st.sampled_from(HOSTS)))
    return draw(good_request(path=path, kind="path-probe"))


@st.composite
def absolute_form(draw) -> Case:
    host = draw(st.sampled_from(["a.example", "b.example", "B.example:80", "10.200.1.1", "a.example:8080"]))
    path = draw(st.one_of(st.sampled_from(PLAIN_PATHS + PROBES[:12]), wild_path()))
    header_host = draw(st.sampled_from(["a.example", "b.example", "other.example"]))
    target = "http://" + host + with_tag(path)
    case = draw(good_request(target=target, kind="absolute-form"))
    case.data = case.data.replace(b"Host: " + (case.host or "").encode() + b"\r\n",
                                  b"Host: " + header_host.encode() + b"\r\n", 1)
    case.host = header_host
    return case


@st.composite
def garbage(draw) -> Case:
    first = draw(st.sampled_from([bytes([b]) for b in list(range(0, 0x20)) + list(range(0x7F, 0x100))
                                  if b not in (0x0D, 0x0A)] + [bytes([c]) for c in b' "(),/:;<=>?@[\\]{}']))
    rest = draw(st.binary(max_size=300))
    if draw(st.integers(0, 4)) == 0:
        first, rest = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", rest  # a TLS ClientHello's start
    return Case("garbage", first + rest)


@st.composite
def garbage_line(draw) -> Case:
    line = draw(st.one_of(st.just("SSH-2.0-OpenSSH_9.6"), token))
    end = draw(st.sampled_from([b"\r\n", b"\r\n\r\n"]))
    return Case("garbage-line", line.encode() + end)


@st.composite
def http09(draw) -> Case:
    path = draw(st.sampled_from(PLAIN_PATHS))
    end = draw(st.sampled_from([b"\r\n", b"\r\n\r\n"]))
    return Case("http09", b"GET " + path.encode() + end, target=path)


@st.composite
def bare_cr(draw) -> Case:
    data = plain_request(headers=draw(header_lines()))
    head_end = data.index(b"\r\n\r\n")
    at = draw(st.integers(1, head_end))
    follower = draw(st.sampled_from([b"x", b"X", b" ", b":", b"\t", b"\r"]))
    return Case("bare-cr", data[:at] + b"\r" + follower + data[at:])


@st.composite
def leading_junk(draw) -> Case:
    lead = draw(st.sampled_from([b" ", b"\t", b"x\r\n", b"\x00", b"\r\r\n", b"\r\n \r\n", b"\r\nx\r\n", b"\x0b"]))
    return Case("leading-junk", lead + plain_request())


@st.composite
def header_fault(draw, kind: str) -> Case:
    headers = draw(header_lines())
    value = draw(st.text(alphabet=VALUE_CHARS.replace("\t", ""), min_size=2, max_size=20)).encode("latin-1")
    if kind == "no-colon":
        bad = [(draw(token).encode(), None)]
    elif kind == "obs-fold":
        bad = [(b"X-Folded", b"a" + b"\r\n" + draw(st.sampled_from([b" ", b"\t", b"  "])) + b"b")]
    elif kind == "ctl-in-value":
        ctl = bytes([draw(st.sampled_from(CTLS))])
        at = draw(st.integers(0, len(value)))
        bad = [(b"X-Ctl", value[:at] + ctl + value[at:])]
    elif kind == "lf-in-value":
        bad = [(b"X-Lf", b"a\nX-Injected: " + draw(token).encode())]
    elif kind == "ctl-in-name":
        name = draw(token).encode()
        at = draw(st.integers(0, len(name)))
        bad = [(name[:at] + bytes([draw(st.sampled_from([c for c in CTLS if c != 0x0D]))]) + name[at:], value)]
    else:  # bad-name-char
        name = draw(token)
        at = draw(st.integers(0, len(name)))
        form = draw(st.sampled_from(["char", "space-before-colon", "empty"]))
        if form == "char":
            bad = [((name[:at] + draw(st.sampled_from(NAME_BAD)) + name[at:]).encode("latin-1"), value)]
        elif form == "space-before-colon":
            bad = [(name.encode() + b" ", value)]
        else:
            bad = [(b"", value)]
    at = draw(st.integers(0, len(headers)))
    headers[at:at] = bad
    lines = [b"GET " + with_tag("/files/1k").encode() + b" HTTP/1.1", b"Host: a.example"]
    lines += [n if v is None else n + b": " + v for n, v in headers]
    # Only lf-in-value is routed (ORACLE): it names its target and host for route().
    return Case(kind, b"\r\n".join(lines) + b"\r\n\r\n", target=with_tag("/files/1k"), host="a.example",
                note=repr(bad[0]))


@st.composite
def method_fault(draw, kind: str) -> Case:
    path = draw(st.sampled_from(PLAIN_PATHS))
    if kind == "trace":
        method = "TRACE"
    elif kind == "connect":
        method = "CONNECT"
    elif kind == "unknown-method":
        method = draw(st.one_of(
            st.sampled_from(["get", "Get", "post", "head", "FOO", "BREW", "PURGE", "LINK", "QUERY", "PRI", "G"]),
            token.filter(lambda t: t not in KNOWN_METHODS + ("TRACE", "CONNECT"))))
    else:  # bad-method-char
        name = draw(st.sampled_from(["GET", "POST", "FOO"]))
        at = draw(st.integers(0, len(name)))
        method = name[:at] + draw(st.sampled_from(NON_TOKEN + "\x00\x01")) + name[at:]
    if kind == "connect" and draw(st.booleans()):
        target = "a.example:443"
    else:
        target = with_tag(path)
    return Case(kind, plain_request_line(method, target), method=method, target=target)


def plain_request_line(method: str, target: str, version: str = "HTTP/1.1", host: str = "a.example") -> bytes:
    return request_bytes(method, target, version, [(b"Host", host.encode())])


@st.composite
def target_fault(draw, kind: str) -> Case:
    method = draw(st.sampled_from(METHOD_WEIGHTS))
    path = draw(st.sampled_from(PLAIN_PATHS))
    if kind == "options-star":
        req = plain_request_line("OPTIONS", "*", host=draw(st.sampled_from(HOSTS)))
        return Case(kind, req, "OPTIONS", "*", follow_up=plain_request_line("OPTIONS", "*"))
    if kind == "star-other-method":
        method = draw(st.sampled_from([m for m in KNOWN_METHODS if m != "OPTIONS"]))
        target = "*"
    elif kind == "authority-form":
        method = draw(st.sampled_from([m for m in KNOWN_METHODS if m != "OPTIONS"]))
        target = draw(st.sampled_from(["a.example:80", "b.example:443", "10.200.1.11:8080", "a.example"]))
    elif kind == "bad-scheme":
        scheme = draw(st.sampled_from(["https", "ftp", "ws", "gopher", "htp", "file", "h2c"]))
        target = f"{scheme}://a.example{with_tag(path)}"
    elif kind == "relative-target":
        target = draw(st.sampled_from(["files/1k", "whoami", "?x", "./files/1k", "..", "%2Fwhoami", "x:y"]))
    elif kind == "bad-query-char":
        query = draw(query_text)
        at = draw(st.integers(0, len(query)))
        bad = draw(st.sampled_from(['"', "<", ">", "\\", "^", "`", "{", "|", "}", "#", "[", "]",
                                    "\x80", "\x7f", "\x01"]))
        target = with_tag(path, query[:at] + bad + query[at:])
    else:  # bad-target-char
        at = draw(st.integers(1, len(path)))
        bad = draw(st.sampled_from(FAULTS[9:]))
        target = with_tag(path[:at] + bad + path[at:])
    return Case(kind, plain_request_line(method, target), method=method, target=target)


@st.composite
def version_fault(draw, kind: str) -> Case:
    if kind == "h2-preface":
        return Case(kind, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + draw(st.sampled_from([b"", b"\x00\x00\x12\x04"])))
    if kind == "version-major":
        version = draw(st.sampled_from(["HTTP/0.9", "HTTP/2.0", "HTTP/3.0", "HTTP/2.2", "HTTP/9.9", "HTTP/0.1"]))
    else:
        version = draw(st.sampled_from(["HTTP/1", "HTTP/1.", "HTTP/1.1.1", "HTTP/a.b", "http/1.1", "HTTP1.1",
                                        "HTTPS/1.1", "HTTP/1.x", "HTTP/.1", "HTTP/", "HTTP/1,1", "xHTTP/1.1"]))
    path = draw(st.sampled_from(PLAIN_PATHS))
    return Case(kind, plain_request_line("GET", with_tag(path), version), version=version)


@st.composite
def body_fault(draw, kind: str) -> Case:
    body = draw(st.binary(min_size=1, max_size=200).map(lambda b: b.replace(b"\r", b"x").replace(b"\n", b"y")))
    hdr = [(b"Host", b"a.example")]
    method = draw(st.sampled_from(["POST", "PUT", "PATCH", "GET"]))
    target = with_tag(draw(st.sampled_from(PLAIN_PATHS)))
    if kind == "chunk-lf":
        valid = encode_chunked(body, draw(st.lists(st.integers(0, len(body)), max_size=3)))
        spots = [m.start() for m in re.finditer(b"\r\n", valid)]
        at = draw(st.sampled_from(spots))
        data = request_bytes(method, target, "HTTP/1.1", hdr + [(b"Transfer-Encoding", b"chunked")],
                             valid[:at] + valid[at + 1:])
    elif kind == "chunk-bad-size":
        size = draw(st.sampled_from([b"g", b"zz", b"-1", b"+1", b"0x5", b"", b"1.5", b"5\x00", b"\xff"]))
        data = request_bytes(method, target, "HTTP/1.1", hdr + [(b"Transfer-Encoding", b"chunked")],
                             size + b"\r\n" + body + b"\r\n0\r\n\r\n")
    elif kind == "chunk-overrun":
        short = draw(st.integers(0, len(body) - 1)) if len(body) > 1 else 0
        data = request_bytes(method, target, "HTTP/1.1", hdr + [(b"Transfer-Encoding", b"chunked")],
                             format(short, "x").encode() + b"\r\n" + body + b"\r\n0\r\n\r\n")
        if short == 0:  # "0" would be the last chunk: then the body is the next request. Make it 1.
            data = request_bytes(method, target, "HTTP/1.1", hdr + [(b"Transfer-Encoding", b"chunked")],
                                 b"1\r\n" + body + b"xx\r\n0\r\n\r\n")
    elif kind == "cl-and-te":
        encoded = encode_chunked(body, [])
        both = [(b"Content-Length", str(len(encoded)).encode()), (b"Transfer-Encoding", b"chunked")]
        if draw(st.booleans()):
            both.reverse()
        data = request_bytes(method, target, "HTTP/1.1", hdr + both, encoded)
    elif kind == "te-not-chunked":
        te = draw(st.sampled_from([b"gzip", b"identity", b"chunked, gzip", b"deflate", b"compress", b"x-custom",
                                   b"chunked, identity"]))
        data = request_bytes(method, target, "HTTP/1.1", hdr + [(b"Transfer-Encoding", te)], body)
    else:  # bad-content-length
        value = draw(st.sampled_from([[b"abc"], [b"-1"], [b"+5"], [b"1 2"], [b"0x10"], [b"5, 6"], [b""],
                                      [b"5", b"6"], [b"1e3"], [b"\xef\xbc\x95"]]))
        data = request_bytes(method, target, "HTTP/1.1", hdr + [(b"Content-Length", v) for v in value], body)
    return Case(kind, data, method=method, target=target)


@st.composite
def size_fault(draw, kind: str) -> Case:
    limit = LIMITS["header_bytes"]
    max_body = LIMITS["max_body"]
    if kind == "head-too-large":
        if draw(st.booleans()):
            headers = [(b"X-Big", b"b" * (limit + draw(st.integers(1, 4000))))]
        else:
            n = limit // 50 + draw(st.integers(1, 40))
            headers = [(f"X-Many-{i}".encode(), b"v" * 40) for i in range(n)]
        return Case(kind, plain_request(headers=headers))
    if kind == "body-too-large":
        declared = draw(st.one_of(st.integers(max_body + 1, max_body + 100), st.integers(max_body, 10 ** 12)))
        declared = max(declared, max_body + 1)
        sent = draw(st.binary(max_size=1000))
        return Case(kind, plain_request("POST", headers=[(b"Content-Length", str(declared).encode())]) + sent,
                    method="POST", body="length")
    body = b"c" * (max_body + draw(st.integers(1, 4000)))  # chunked-too-large
    cuts = list(range(4000, len(body), 4000))
    return Case(kind, plain_request("POST", headers=[(b"Transfer-Encoding", b"chunked")],
                                    body=encode_chunked(body, cuts)), method="POST", body="chunked")


def slow_case(kind: str, method: str = "GET", cut: int = 20, sent: int = 10, chunked: bool = False) -> Case:
    """A slow kind: METHOD's head cut after CUT bytes (slow-head), or a POST
    whose body stops after SENT bytes (slow-body-stall), or trickles."""
    head = plain_request(method)
    if kind == "slow-silent":
        return Case(kind, b"")
    if kind == "slow-head":
        return Case(kind, head[:min(cut, len(head) - 2)])
    if kind == "slow-head-trickle":
        return Case(kind, head[:-2], trickle=(b"X-T: 1\r\n", 0.3))
    post = plain_request("POST", headers=[(b"Content-Length", b"16000")])  # < max_body
    if kind == "slow-body-stall":
        if chunked:
            head = plain_request("POST", headers=[(b"Transfer-Encoding", b"chunked")])
            return Case(kind, head + b"a\r\n0123456789\r\n", method="POST", body="chunked")
        return Case(kind, post + b"x" * sent, method="POST", body="length")
    if kind == "slow-body-deadline":
        return Case(kind, post, method="POST", trickle=(b"d" * 120, 0.3), body="length")  # 400 B/s
    assert kind == "slow-body-rate"
    return Case(kind, post, method="POST", trickle=(b"r" * 10, 0.3), body="length")  # 33 B/s < min_body_rate


@st.composite
def slow(draw, kind: str) -> Case:
    return slow_case(kind, draw(st.sampled_from(["GET", "HEAD"])), draw(st.integers(1, 60)),
                     draw(st.integers(0, 500)), draw(st.booleans()))


BUILDERS = {
    "request": lambda: good_request(),
    "path-probe": path_probe,
    "absolute-form": absolute_form,
    "leading-crlf": lambda: good_request(kind="leading-crlf"),
    "options-star": lambda: target_fault("options-star"),
    "garbage": garbage,
    "garbage-line": garbage_line,
    "http09": http09,
    "bare-cr": bare_cr,
    "leading-junk": leading_junk,
    **{k: (lambda k=k: header_fault(k)) for k in ("no-colon", "obs-fold", "ctl-in-value", "lf-in-value",
                                                  "ctl-in-name", "bad-name-char")},
    **{k: (lambda k=k: method_fault(k)) for k in ("trace", "connect", "unknown-method", "bad-method-char")},
    **{k: (lambda k=k: target_fault(k)) for k in ("star-other-method", "authority-form", "bad-scheme",
                                                  "relative-target", "bad-query-char", "bad-target-char")},
    **{k: (lambda k=k: version_fault(k)) for k in ("bad-version", "version-major", "h2-preface")},
    **{k: (lambda k=k: body_fault(k)) for k in ("chunk-lf", "chunk-bad-size", "chunk-overrun", "cl-and-te",
                                                "te-not-chunked", "bad-content-length")},
    "missing-host": lambda: st.just(Case("missing-host", request_bytes("GET", with_tag("/files/1k"),
                                                                       "HTTP/1.1", []))),
    **{k: (lambda k=k: size_fault(k)) for k in ("head-too-large", "body-too-large", "chunked-too-large")},
    **{k: (lambda k=k: slow(k)) for k in ORACLE if k.startswith("slow-")},
}
assert set(BUILDERS) == set(ORACLE), set(BUILDERS) ^ set(ORACLE)

WEIGHTS = {kind: (2 if kind.startswith("slow-") else 8) for kind in ORACLE}
WEIGHTS.update({"request": 300, "path-probe": 60, "absolute-form": 30, "leading-crlf": 10, "options-star": 10,
                "garbage": 20, "ctl-in-value": 16, "bad-target-char": 12, "unknown-method": 12,
                "chunk-lf": 12, "chunk-bad-size": 12})
"""Relative frequencies: valid and routed requests most, slow kinds about 1 %."""

KINDS = [kind for kind, w in WEIGHTS.items() for _ in range(w)]


@st.composite
def cases(draw) -> Case:
    kind = draw(st.sampled_from(KINDS))
    case = draw(BUILDERS[kind]())
    assert case.kind == kind, (case.kind, kind)
    return case


def batches(size: int) -> st.SearchStrategy[list[Case]]:
    return st.lists(cases(), min_size=size, max_size=size)


def explicit_batch() -> list[Case]:
    """Each documented path encoding once, and each kind's plainest input."""
    out = [probe_case(p) for p in PROBES]
    out += [probe_case(p, host="b.example") for p in ("/files/1k", "/%77hoami", "/files/../files/1k")]
    absolute = "http://b.example" + with_tag("/files/1k")
    out.append(Case("absolute-form", plain_request_line("GET", absolute), target=absolute, host="a.example"))
    absolute = "http://a.example" + with_tag("/files/%2e%2e/whoami")
    out.append(Case("absolute-form", plain_request_line("GET", absolute), target=absolute, host="a.example"))
    out.append(Case("options-star", plain_request_line("OPTIONS", "*"), "OPTIONS", "*",
                    follow_up=plain_request_line("OPTIONS", "*")))
    out.append(Case("h2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"))
    out.append(Case("http09", b"GET /\r\n"))
    out.append(Case("version-major", plain_request_line("GET", with_tag("/files/1k"), "HTTP/2.0")))
    out.append(Case("trace", plain_request_line("TRACE", with_tag("/files/1k")), "TRACE"))
    out.append(Case("connect", plain_request_line("CONNECT", "a.example:443"), "CONNECT", "a.example:443"))
    out.append(Case("unknown-method", plain_request_line("get", with_tag("/files/1k")), "get"))
    out.append(Case("star-other-method", plain_request_line("GET", "*"), target="*"))
    out.append(Case("authority-form", plain_request_line("GET", "a.example:80"), target="a.example:80"))
    out.append(Case("garbage", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"))
    out.append(Case("bare-cr", b"GET / HTTP/1.1\rHost: a.example\r\n\r\n"))
    out.append(Case("obs-fold", plain_request(headers=[(b"X-A", b"a\r\n b")])))
    out.append(Case("no-colon", plain_request(headers=[(b"NoColon", b"")]).replace(b"NoColon: ", b"NoColon")))
    out.append(Case("ctl-in-value", plain_request(headers=[(b"X-A", b"a\x01b")])))
    out.append(Case("chunk-lf", plain_request("POST", headers=[(b"Transfer-Encoding", b"chunked")],
                                              body=b"5\nhello\n0\n\n"), "POST"))
    out.append(Case("te-not-chunked", plain_request("POST", headers=[(b"Transfer-Encoding", b"gzip")],
                                                    body=b"abc"), "POST"))
    out += [slow_case(kind) for kind in ORACLE if kind.startswith("slow-")]
    out.append(slow_case("slow-body-stall", chunked=True))
    return out
