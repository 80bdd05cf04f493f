"""Request-targets as the targets will read them: pure, no I/O.

A path rule is an access control only if the router reads a path the way the
target will. nginx (and most servers) decode escapes of unreserved
characters, resolve dot segments and merge slashes before they map a path to
a resource, so ``/%77hoami``, ``/./whoami``, ``//whoami`` and
``/files/../whoami`` all reach ``/whoami``. The router normalises the same way
before any rule looks, and forwards the normalised target, so what the rule
matched is what the target serves. What cannot be normalised without guessing
how a target reads it is refused (``PathError``, answered 400):

* an encoded slash or backslash (``%2F``, ``%5C``): a separator to some
  servers, a name character to others;
* ``%00``: ends the string in C targets;
* ``%`` not followed by two hex digits;
* a byte outside RFC 3986's path characters (space, ``"``, ``\\``, ``<``,
  ``{``, ``^``, non-ASCII, ...);
* a ``..`` that would climb above the root.

Paths stay case-sensitive (``/WHOAMI`` is another path) and the query string
is kept as sent (only its characters are checked).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
"""RFC 3986 2.3: an escape of one of these means the character itself."""

# RFC 3986 3.3: pchar = unreserved / pct-encoded / sub-delims / ":" / "@"; a path adds "/".
_PATH_CHARS = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@/%]*")
# 3.4: query = *( pchar / "/" / "?" )
_QUERY_CHARS = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@/?%]*")
# A path with none of these is already normal: the common case costs one regex.
_PLAIN_PATH = re.compile(r"(?:/[A-Za-z0-9\-_~!$&'()*+,;=:@][A-Za-z0-9\-._~!$&'()*+,;=:@]*)+/?|/")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})?")
_REFUSED_ESCAPES = {0x2F: "an encoded slash (%2F)", 0x5C: "an encoded backslash (%5C)", 0x00: "%00"}
# absolute-form (RFC 9112 3.2.2), scheme http only. The host is a DNS name,
# an IPv4 address or a bracketed IPv6 literal; userinfo is refused (RFC 9110
# 4.2.4: it is deprecated and only ever used to mislead).
_ABSOLUTE_FORM = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*)://([^/?]*)(.*)", re.S)
_AUTHORITY = re.compile(r"(?:[A-Za-z0-9\-.]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")


class PathError(ValueError):
    """A request-target the router refuses (400); ``reason`` is the metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def normalise_path(path: str) -> str:
    """PATH (an origin-form path, no query) as the targets will resolve it:
    escapes of unreserved characters decoded, the other escapes' hex in upper
    case, duplicate slashes merged, dot segments removed (after decoding, so
    ``%2e%2e`` is ``..``). Raises PathError for what cannot be normalised
    without ambiguity."""
    if _PLAIN_PATH.fullmatch(path):
        return path  # no escape, no dot segment, no double slash: nothing to do
    if not path.startswith("/"):
        raise PathError("bad-path", f"path does not start with '/': {path!r}")
    if not _PATH_CHARS.fullmatch(path):
        raise PathError("bad-path", f"character not allowed in a path: {path!r}")
    if "%" in path:
        path = _ESCAPE.sub(_decode_escape, path)
    return _resolve_segments(path)


def _decode_escape(match: re.Match[str]) -> str:
    hex_digits = match.group(1)
    if hex_digits is None:
        raise PathError("bad-path", "'%' not followed by two hex digits")
    value = int(hex_digits, 16)
    refused = _REFUSED_ESCAPES.get(value)
    if refused is not None:
        raise PathError("bad-path", f"{refused} in the path")
    char = chr(value)
    return char if char in UNRESERVED else "%" + hex_digits.upper()


def _resolve_segments(path: str) -> str:
    """RFC 3986 5.2.4 on a path whose empty segments count for nothing (merged
    slashes); a '..' with nothing left to remove is refused, not clamped:
    a client that climbs above the root means something the target does not
    serve."""
    parts = path.split("/")[1:]  # path starts with '/'
    kept: list[str] = []
    for part in parts:
        if part == "" or part == ".":
            continue
        if part == "..":
            if not kept:
                raise PathError("bad-path", "'..' climbs above the root")
            kept.pop()
        else:
            kept.append(part)
    # A last segment that is empty or a dot segment leaves a directory: '/a/.' is '/a/'.
    trailing = parts[-1] in ("", ".", "..")
    if not kept:
        return "/"
    return "/" + "/".join(kept) + ("/" if trailing else "")


def normalise_origin_form(target: str) -> str:
    """An origin-form target (path, then '?query' if any) with its path
    normalised; the query is kept as sent once its characters are checked."""
    path, question, query = target.partition("?")
    normal = normalise_path(path)
    if not question:
        return normal
    if not _QUERY_CHARS.fullmatch(query):
        raise PathError("bad-target", f"character not allowed in the query: {query!r}")
    return normal + "?" + query


@dataclass(frozen=True)
class RoutedTarget:
    """What the router routes and forwards for one request-target."""

    target: str
    """Origin-form, normalised: what rules see and what the target receives."""
    authority: str | None = None
    """absolute-form's host[:port]: it replaces the Host header (RFC 9112 3.2.2)."""


def route_target(target: str) -> RoutedTarget:
    """The origin-form target to route and forward for an origin-form or an
    absolute-form request-target (http only). The asterisk-form (``*``) and
    authority-form are the caller's: here they are a PathError like any
    other form that is not routed."""
    if target.startswith("/"):
        return RoutedTarget(normalise_origin_form(target))
    absolute = _ABSOLUTE_FORM.fullmatch(target)
    if absolute is None:
        raise PathError("bad-target", f"request-target is neither origin- nor absolute-form: {target!r}")
    scheme, authority, rest = absolute.groups()
    if scheme.lower() != "http":
        raise PathError("bad-target", f"scheme {scheme!r} is not served (http only)")
    if not _AUTHORITY.fullmatch(authority):
        raise PathError("bad-target", f"bad authority in absolute-form: {authority!r}")
    if not rest.startswith("/"):
        rest = "/" + rest  # 'http://h' and 'http://h?q' have the path '/'
    return RoutedTarget(normalise_origin_form(rest), authority)
