"""The lean client's header parse (upstream/client.py ``_headers``, ``fields``) against llhttp's own.

The client reads an answer's header fields from its head in one go (split in
C for the usual CRLF head, a regular expression for the rest) rather than by a
Python callback per field; ``fields`` strips their values.  For any head llhttp accepts, both must give the
fields llhttp itself reports, in order, values without surrounding blanks
(llhttp drops the leading ones, RFC 9110 section 5.5 both).
"""

from __future__ import annotations

import httptools
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gateway.upstream import client

NAMES = st.text(alphabet="abcXYZ-_0123456789", min_size=1, max_size=8)
VALUES = st.text(alphabet="vw:;, =\t/\"'", max_size=12)
SEPARATORS = st.sampled_from([":", ": ", ":  ", ":\t", ": \t"])
TRAILERS = st.sampled_from(["", " ", "\t", " \t "])
BLANKS = " \t"


class _Fields:
    def __init__(self) -> None:
        self.fields: list[tuple[str, str]] = []
        self.done = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self.done = True


def _llhttp(head: bytes) -> list[tuple[str, str]] | None:
    """llhttp's fields, or None when it refuses the head (the client fails such an answer first)."""
    seen = _Fields()
    try:
        httptools.HttpResponseParser(seen).feed_data(head)
    except httptools.HttpParserError:
        return None
    assert seen.done
    return seen.fields


@settings(max_examples=400, deadline=None)
@given(
    fields=st.lists(st.tuples(NAMES, SEPARATORS, VALUES, TRAILERS), max_size=8),
    eol=st.sampled_from(["\r\n", "\n"]),
    body=st.sampled_from([b"", b"{}", b"data: x\n\n"]),
)
def test_fields_are_llhttps_fields(fields: list[tuple[str, str, str, str]], eol: str, body: bytes) -> None:
    lines = [n + sep + v.strip(BLANKS) + trail for n, sep, v, trail in fields]
    head = ("HTTP/1.1 200 OK" + eol + "".join(line + eol for line in lines) + eol).encode("latin-1")
    expected = _llhttp(head)
    assume(expected is not None)
    parts, names, end = client._headers(head + body)
    parsed = client.fields(parts)
    assert end == len(head)
    assert names == "\n".join(name for name, _ in parsed)
    # llhttp leaves the trailing blanks to its user; a field value has none (RFC 9110 5.5).
    assert parsed == [(name, value.strip(BLANKS)) for name, value in expected]
