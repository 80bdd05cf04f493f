"""HTTP/1.1 header logic a relay needs on top of h11. Pure functions, no I/O."""

from __future__ import annotations

from http import HTTPStatus
from typing import Iterable, Sequence

RawHeaders = list[tuple[bytes, bytes]]

# RFC 9110 section 7.6.1, plus the de-facto ones proxies also drop.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
    b"transfer-encoding", b"upgrade", b"proxy-authenticate", b"proxy-authorization",
})


class HttpError(Exception):
    """A request the router answers itself with ``status`` and then closes,
    unless ``recoverable`` (the request was read whole: the connection goes on)."""

    def __init__(self, status: int, reason: str, detail: str = "") -> None:
        super().__init__(f"{status} {reason}: {detail}" if detail else f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.detail = detail
        self.recoverable = False


def reason_phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Unknown"


def error_response(status: int, body: bytes = b"", *, close: bool = True) -> bytes:
    """A complete response written without h11: usable when h11 is in ERROR state."""
    body = body or reason_phrase(status).lower() + b"\n"
    head = [b"HTTP/1.1 %d %s" % (status, reason_phrase(status)),
            b"content-type: text/plain; charset=utf-8",
            b"content-length: %d" % len(body)]
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


def _quote_if_needed(value: str) -> str:
    token_chars = set("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    if value and set(value) <= token_chars:
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
