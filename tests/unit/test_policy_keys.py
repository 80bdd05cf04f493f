"""KeySpec: every accepted form, the client-IP fallbacks, and rejected specs."""

import pytest

from arr.policies.keys import KeySpec
from arr.request import Request


def request(target="/a/b?x=1&y=2", headers=(("Host", "Example.COM:8080"),), client="10.0.0.5"):
    return Request.build("GET", target, list(headers), client=(client, 4321))


@pytest.mark.parametrize("text, expected", [
    ("path", "/a/b"),
    ("uri", "/a/b?x=1&y=2"),
    ("host", "example.com"),
    ("client", "10.0.0.5"),
])
def test_plain_forms(text, expected):
    assert KeySpec.parse(text).extract(request()) == expected


def test_uri_without_query_has_no_question_mark():
    assert KeySpec.parse("uri").extract(request("/only")) == "/only"


def test_parse_is_lenient_about_case_and_spaces_in_the_kind():
    assert KeySpec.parse(" PATH ") == KeySpec("path")
    assert KeySpec.parse("Header: X-User ") == KeySpec("header", "X-User")


def test_header_is_case_insensitive_and_takes_first_value():
    req = request(headers=[("x-user", "alice"), ("X-User", "bob")])
    assert KeySpec.parse("header:X-USER").extract(req) == "alice"


def test_missing_header_falls_back_to_client_ip():
    assert KeySpec.parse("header:X-User").extract(request()) == "10.0.0.5"


def test_empty_header_is_a_value_not_missing():
    req = request(headers=[("X-User", "")])
    assert KeySpec.parse("header:X-User").extract(req) == ""


def test_cookie_value_and_case_sensitive_name():
    req = request(headers=[("Cookie", "session=abc; Other=1")])
    assert KeySpec.parse("cookie:session").extract(req) == "abc"
    assert KeySpec.parse("cookie:Session").extract(req) == "10.0.0.5"


def test_missing_cookie_falls_back_to_client_ip():
    assert KeySpec.parse("cookie:session").extract(request(client="192.0.2.9")) == "192.0.2.9"


def test_str_round_trips():
    for text in ("path", "uri", "host", "client", "header:X-User", "cookie:sid"):
        assert KeySpec.parse(str(KeySpec.parse(text))) == KeySpec.parse(text)


@pytest.mark.parametrize("text", ["", "url", "ip", "header", "header:", "cookie: ", "path:x", "client:1",
                                  "query"])
def test_bad_specs_name_the_accepted_forms(text):
    with pytest.raises(ValueError) as info:
        KeySpec.parse(text)
    message = str(info.value)
    assert repr(text) in message
    assert "path, uri, host, client, header:<Name>, cookie:<name>" in message


def test_non_string_spec_is_a_value_error():
    with pytest.raises(ValueError, match="must be a string"):
        KeySpec.parse(None)  # type: ignore[arg-type]
