"""Which part of a request a hashing or locality policy keys on.

Maglev and LARD both map "the same thing" to the same target; ``KeySpec``
says what that thing is, parsed once from configuration text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from arr.request import Request

KeyKind = Literal["path", "uri", "host", "client", "header", "cookie"]

_PLAIN_KINDS: tuple[KeyKind, ...] = ("path", "uri", "host", "client")
_NAMED_KINDS: tuple[KeyKind, ...] = ("header", "cookie")
ACCEPTED_KEY_FORMS = "path, uri, host, client, header:<Name>, cookie:<name>"


@dataclass(frozen=True)
class KeySpec:
    """A request attribute to key on.

    ``name`` is the header or cookie name for the ``header``/``cookie`` kinds
    and empty otherwise. A request without that header or cookie is keyed by
    its client IP instead: such clients still stick to one target (the same
    affinity ``client`` would give) rather than all piling onto the target
    that owns the empty string.
    """

    kind: KeyKind
    name: str = ""

    @classmethod
    def parse(cls, text: str) -> "KeySpec":
        """Parse ``path``, ``uri``, ``host``, ``client``, ``header:<Name>``, ``cookie:<name>``."""
        if not isinstance(text, str):
            raise ValueError(f"key spec must be a string ({ACCEPTED_KEY_FORMS}), got {text!r}")
        spec = text.strip()
        kind, sep, name = spec.partition(":")
        kind = kind.strip().lower()
        name = name.strip()
        if not sep and kind in _PLAIN_KINDS:
            return cls(kind)  # type: ignore[arg-type]
        if sep and kind in _NAMED_KINDS and name:
            # Header names are case-insensitive (Headers handles that); cookie
            # names are case-sensitive, so the name is kept exactly as written.
            return cls(kind, name)  # type: ignore[arg-type]
        if sep and kind in _NAMED_KINDS:
            raise ValueError(f"invalid key spec {text!r}: {kind}: needs a name "
                             f"(accepted forms: {ACCEPTED_KEY_FORMS})")
        raise ValueError(f"invalid key spec {text!r} (accepted forms: {ACCEPTED_KEY_FORMS})")

    def extract(self, request: "Request") -> str:
        """The key of ``request``; never fails (see the class docstring for fallbacks)."""
        if self.kind == "path":
            return request.path
        if self.kind == "uri":
            query = request.query
            return f"{request.path}?{query}" if query else request.path
        if self.kind == "host":
            return request.host
        if self.kind == "header":
            value = request.headers.get(self.name)
            return request.client_ip if value is None else value
        if self.kind == "cookie":
            value = request.cookies.get(self.name)
            return request.client_ip if value is None else value
        return request.client_ip

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}" if self.name else self.kind
