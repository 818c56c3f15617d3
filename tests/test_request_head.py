"""fmedge.request_head: the HTTP/1.x request head parser, alone and over the wire."""

import pytest

from fmedge.request_head import head_end, parse_head
from fmedge.server_security import HttpError
from server_fixture import running_server

LIMIT = 32 * 1024


def parse(head):
    return parse_head(head, LIMIT)


def refusal(head, limit=LIMIT):
    with pytest.raises(HttpError) as caught:
        parse_head(head, limit)
    return caught.value.http_status, str(caught.value)


def test_a_request_head_is_parsed_and_looked_up_regardless_of_case():
    method, target, version, headers = parse(
        b"POST /run/p?wait=true HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
        b"Content-Type:application/json \r\nX-Twice: a\r\nx-twice: b\r\n\r\n")
    assert (method, target, version) == ("POST", "/run/p?wait=true", "HTTP/1.1")
    assert headers.get("HOST") == "127.0.0.1:8080"
    assert headers.get("content-type") == "application/json"     # blanks trimmed
    assert headers.get_all("X-TWICE") == ["a", "b"] and headers.get("x-twice") == "a"
    assert headers.get("missing", "dflt") == "dflt" and headers.get_all("missing") is None
    assert "host" in headers and headers.items()[0] == ("Host", "127.0.0.1:8080")


@pytest.mark.parametrize("data, end", [
    (b"GET / HTTP/1.1\r\n\r\nrest", 18), (b"GET / HTTP/1.1\n\nrest", 16),
    (b"GET / HTTP/1.1\r\n\nrest", 17), (b"GET / HTTP/1.1\r\nHost: x\r\n", -1)])
def test_the_end_of_a_head_is_found_with_any_line_ending(data, end):
    assert head_end(bytearray(data)) == end


def test_bare_line_feeds_are_accepted():
    assert parse(b"GET /health HTTP/1.0\nHost: localhost\n\n")[3].get("host") == "localhost"


@pytest.mark.parametrize("head, status, says", [
    (b"GET /health\r\n\r\n", 400, "request line"),
    (b"GET  /health HTTP/1.1\r\n\r\n", 400, "request line"),
    (b"\r\nGET /health HTTP/1.1\r\n\r\n", 400, "request line"),
    (b"GET /health HTTP/1.1x\r\n\r\n", 400, "HTTP version"),
    (b"GET /health HTTP/2.0\r\n\r\n", 505, "not supported"),
    (b"GET /health HTTP/1.1\r\nHost : x\r\n\r\n", 400, "Name: value"),
    (b"GET /health HTTP/1.1\r\nno colon here\r\n\r\n", 400, "Name: value"),
    (b"GET /health HTTP/1.1\r\nHost: x\r\n  folded\r\n\r\n", 400, "one line"),
    (b"GET /health HTTP/1.1\r\nHost: x\ry\r\n\r\n", 400, "CR or NUL"),
])
def test_malformed_heads_are_refused_saying_what_is_wrong(head, status, says):
    refused, message = refusal(head)
    assert refused == status and says in message


def test_too_many_fields_or_bytes_are_431():
    many = b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(101)) + b"\r\n"
    assert refusal(many)[0] == 431
    assert refusal(b"GET / HTTP/1.1\r\nX-Pad: " + b"a" * 100 + b"\r\n\r\n", limit=64)[0] == 431


def test_the_server_answers_parser_refusals_in_its_error_shape(tmp_path):
    with running_server(tmp_path) as api:
        folded = api.raw(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n  x\r\n\r\n")
        assert folded.startswith(b"HTTP/1.1 400 ") and b'"code":"bad_request"' in folded
        assert api.raw(b"GET /health HTTP/2.0\r\nHost: 127.0.0.1\r\n\r\n").startswith(
            b"HTTP/1.1 505 ")
        # HTTP/1.0 closes unless asked to keep alive; a head may end in \r\n\n.
        closed = api.raw(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\n")
        assert closed.startswith(b"HTTP/1.1 200 ") and b"Connection: close" in closed
