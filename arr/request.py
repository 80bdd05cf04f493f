"""The request a policy sees: parsed once, immutable, no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator, Mapping
from urllib.parse import urlsplit


class Headers(Mapping[str, str]):
    """Case-insensitive, multi-valued, order-preserving HTTP headers.

    ``headers["x"]`` returns the first value (a policy almost always wants one);
    ``get_all`` returns every value, as they arrived.
    """

    __slots__ = ("_items", "_index")

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        self._items: list[tuple[str, str]] = list(items)
        self._index: dict[str, list[str]] = {}
        for name, value in self._items:
            self._index.setdefault(name.lower(), []).append(value)

    @classmethod
    def from_raw(cls, raw: Iterable[tuple[bytes, bytes]]) -> "Headers":
        # latin-1 is lossless for arbitrary header bytes (RFC 9110 section 5.5).
        return cls((n.decode("latin-1"), v.decode("latin-1")) for n, v in raw)

    def __getitem__(self, name: str) -> str:
        return self._index[name.lower()][0]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._index

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def get_all(self, name: str) -> list[str]:
        return list(self._index.get(name.lower(), ()))

    def items_raw(self) -> list[tuple[str, str]]:
        """Every (name, value) pair in arrival order, names as sent."""
        return list(self._items)

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"


def parse_cookies(headers: Headers) -> dict[str, str]:
    """Cookies from every Cookie header (RFC 6265 section 5.4: name=value pairs
    separated by ';'); the first of a repeated name wins, a pair without '='
    is skipped. Not http.cookies: it drops cookies named like attributes
    (path, domain, version, ...), which are ordinary names in a request."""
    cookies: dict[str, str] = {}
    for line in headers.get_all("cookie"):
        for part in line.split(";"):
            name, sep, value = part.partition("=")
            name, value = name.strip(), value.strip()
            if not sep or not name:
                continue
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            cookies.setdefault(name, value)
    return cookies


@dataclass(frozen=True, slots=True)
class Request:
    """One HTTP/1.1 request as the router read it, before any decision."""

    method: str
    target: str
    """From the router's front-end: the normalised origin-form target, the
    one the target receives (an absolute-form request's authority is in Host)."""
    headers: Headers
    client: tuple[str, int]
    http_version: str = "1.1"
    body: bytes | None = b""
    """The buffered body; ``None`` when the body is larger than the decision
    buffer and will be streamed after the decision instead."""
    cookies: Mapping[str, str] = field(default_factory=dict)
    number: int = 1
    """Which request of its connection this is (1: the first). The one way a
    policy can tell a connection that was handed off and taken back (its
    later requests keep counting) from a new one: nothing else differs."""

    @classmethod
    def build(
        cls,
        method: str,
        target: str,
        headers: Headers | Iterable[tuple[str, str]],
        client: tuple[str, int] = ("127.0.0.1", 0),
        http_version: str = "1.1",
        body: bytes | None = b"",
        number: int = 1,
    ) -> "Request":
        hdrs = headers if isinstance(headers, Headers) else Headers(headers)
        return cls(method, target, hdrs, client, http_version, body, parse_cookies(hdrs), number)

    @property
    def path(self) -> str:
        """The path as the target will see it. The router's front-end builds
        every Request with the normalised origin-form target it forwards
        (arr/paths.py), so a policy matches what the target serves. An
        origin-form target is split at '?' only: urlsplit would read
        '//admin/x' as a host and a path."""
        if self.target.startswith("/"):
            return self.target.partition("?")[0]
        if "://" in self.target:  # absolute-form
            return urlsplit(self.target).path or "/"
        return "*" if self.target == "*" else "/"

    @property
    def query(self) -> str:
        if "://" in self.target and not self.target.startswith("/"):
            return urlsplit(self.target).query
        return self.target.partition("?")[2]

    @property
    def host(self) -> str:
        """The Host header without its port, lower-cased ('' when absent)."""
        host = self.headers.get("host", "")
        if host.startswith("["):  # IPv6 literal
            return host[: host.find("]") + 1].lower()
        return host.rsplit(":", 1)[0].lower() if ":" in host else host.lower()

    @property
    def client_ip(self) -> str:
        return self.client[0]
