"""arr.paths: request-targets normalised as the targets will read them."""

import re

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from arr.paths import UNRESERVED, PathError, normalise_origin_form, normalise_path, route_target


@pytest.mark.parametrize("raw, normal", [
    ("/", "/"),
    ("/a/b", "/a/b"),
    ("/a/b/", "/a/b/"),
    ("/%77hoami", "/whoami"),
    ("/%7e%2D%5f%2E%41", "/~-_.A"),
    ("/./whoami", "/whoami"),
    ("//whoami", "/whoami"),
    ("/a//b///c", "/a/b/c"),
    ("//", "/"),
    ("/files/../whoami", "/whoami"),
    ("/files/%2e%2e/whoami", "/whoami"),
    ("/a/b/../../c", "/c"),
    ("/a/.", "/a/"),
    ("/a/..", "/"),
    ("/a/%2E", "/a/"),
    ("/a//../b", "/b"),  # slashes merged first, as nginx does
    ("/a%3ab%c3%a9", "/a%3Ab%C3%A9"),  # escapes that stay: hex in upper case
    ("/%2541", "/%2541"),  # '%' itself stays encoded: no double decoding
    ("/.hidden/x..y/..z", "/.hidden/x..y/..z"),
    ("/WHOAMI", "/WHOAMI"),
    ("/a;b=c/@:!$&'()*+,", "/a;b=c/@:!$&'()*+,"),
])
def test_normalise_path(raw, normal):
    assert normalise_path(raw) == normal


@pytest.mark.parametrize("raw", [
    "/%2F", "/a%2fb", "/%5C", "/a%5cb", "/%00", "/a%00b", "/%", "/%4", "/%zz", "/%G0",
    "/..", "/../a", "/%2e%2e", "/a/../..", "/a/%2e%2e/%2E%2E/b",
    "/a b", "/a\\b", '/a"b', "/a<b>", "/a{b}", "/a|b", "/a^b", "/a`b", "/a[b]", "/\u00e9", "/a#b",
    "a/b", "", "*",
])
def test_normalise_path_refuses_what_is_ambiguous(raw):
    with pytest.raises(PathError):
        normalise_path(raw)


def test_origin_form_keeps_the_query_as_sent():
    assert normalise_origin_form("/a/./b?x=%2f&y=/../&z=%41") == "/a/b?x=%2f&y=/../&z=%41"
    assert normalise_origin_form("/a?") == "/a?"
    with pytest.raises(PathError):
        normalise_origin_form("/a?x=[1]")
    with pytest.raises(PathError):
        normalise_origin_form("/a?x y")


@pytest.mark.parametrize("target, routed, authority", [
    ("/x/../y?q", "/y?q", None),
    ("http://example.com/a/./b?q=1", "/a/b?q=1", "example.com"),
    ("HTTP://Example.COM:8080", "/", "Example.COM:8080"),
    ("http://h?q=1", "/?q=1", "h"),
    ("http://[2001:db8::1]:80/x", "/x", "[2001:db8::1]:80"),
    ("http://10.0.0.1//%77hoami", "/whoami", "10.0.0.1"),
])
def test_route_target(target, routed, authority):
    result = route_target(target)
    assert (result.target, result.authority) == (routed, authority)


@pytest.mark.parametrize("target", [
    "*", "example.com:443", "https://h/", "ftp://h/", "http://u@h/", "http://u:p@h/", "http:///x",
    "http://h:port/", "http://h:123456/", "http://h_h/", "http://h/%2F", "//..", "x",
])
def test_route_target_refuses(target):
    with pytest.raises(PathError):
        route_target(target)


# ---------------------------------------------------------------- properties

_PCHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=:@"
segment = st.one_of(
    st.sampled_from([".", "..", "", "%2e", "%2E%2e", "a", "b", "%41", "%7e", "%3a", "%c3%a9", "%25"]),
    st.text(alphabet=_PCHARS, max_size=8),
)
any_path = st.lists(segment, max_size=8).map(lambda parts: "/" + "/".join(parts))


def _normal_or_none(path):
    try:
        return normalise_path(path)
    except PathError:
        return None


@settings(max_examples=2000, deadline=None)
@given(any_path)
def test_normalised_paths_are_stable_and_clean(path):
    normal = _normal_or_none(path)
    assume(normal is not None)
    assert normalise_path(normal) == normal  # idempotent
    assert normal.startswith("/")
    assert "//" not in normal
    assert "/./" not in normal and "/../" not in normal
    assert not normal.endswith("/.") and not normal.endswith("/..")
    for escape in re.findall(r"%([0-9A-Fa-f]{2})", normal):
        assert chr(int(escape, 16)) not in UNRESERVED  # no escape of an unreserved character
        assert escape == escape.upper()


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=40))
def test_any_bytes_are_normalised_or_refused_never_crash(raw):
    path = "/" + raw.decode("latin-1")
    normal = _normal_or_none(path)
    if normal is not None:
        assert normalise_path(normal) == normal
        assert re.fullmatch(r"[A-Za-z0-9\-._~!$&'()*+,;=:@/%]*", normal)


def _encode_unreserved(text, mask):
    return "".join("%%%02X" % ord(c) if c in UNRESERVED and bit else c
                   for c, bit in zip(text, mask + [False] * len(text)))


@st.composite
def disguised(draw):
    """A plain path, and the same path under the encodings nginx resolves:
    escapes of unreserved characters (either case), './' segments, doubled
    slashes, 'x/../' detours."""
    parts = draw(st.lists(st.text(alphabet=_PCHARS.replace(".", ""), min_size=1, max_size=6),
                          min_size=1, max_size=5))
    plain = "/" + "/".join(parts)
    out = []
    for part in parts:
        mask = draw(st.lists(st.booleans(), max_size=len(part)))
        encoded = _encode_unreserved(part, mask)
        if draw(st.booleans()):  # escapes' hex in lower case: the same escapes
            encoded = re.sub(r"%[0-9A-F]{2}", lambda m: m.group(0).lower(), encoded)
        prefix = draw(st.sampled_from(["", "./", "/", "//", "x/../", "%2e/", "a/%2E%2E/", "./b/../"]))
        out.append(prefix + encoded)
    return plain, "/" + "/".join(out)


@settings(max_examples=3000, deadline=None)
@given(disguised(), st.sampled_from(["/a", "/admin", "/A", "/x", "/~"]))
def test_a_prefix_rule_sees_through_every_disguise(case, prefix):
    """Whatever a rule decides for a path, it decides the same for the
    path in disguise: the router routes (and forwards) the same string."""
    plain, disguise = case
    normal = normalise_path(disguise)
    assert normal == normalise_path(plain) == plain
    assert normal.startswith(prefix) == plain.startswith(prefix)


@settings(max_examples=1000, deadline=None)
@given(disguised(), st.sampled_from(["%2F", "%2f", "%5C", "%5c", "%00", "%x", "%G1", "/..", "/%2e%2e"]))
def test_a_refused_path_stays_refused_in_disguise(case, poison):
    """What the router refuses (an encoded slash, %00, a climb above the
    root, ...) is refused wherever it sits in a disguised path."""
    _, disguise = case
    cut = len(disguise) // 2
    if poison.startswith("/"):
        poisoned = poison + disguise  # a climb needs to start at the root to climb above it
    else:
        poisoned = disguise[:cut] + poison + disguise[cut:]
    with pytest.raises(PathError):
        normalise_path(poisoned)
