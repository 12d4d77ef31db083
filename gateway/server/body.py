"""Request bodies: read within a limit, ``content-encoding`` decoded within the same limit.

aiohttp's own decoding is off (``auto_decompress=False``): here a body sent
with ``content-encoding: gzip`` or ``deflate`` (or a list of them, applied in
order) is decoded in bounded steps, so a small compressed body can never
expand past the limit in memory (a decompression bomb stops at limit + 1
bytes).  The decoded bytes are what the gateway reads and forwards; the
``content-encoding`` header is never forwarded (proxy/headers.py).

Outcomes, mapped to each plane's error shape by the caller:
- ``Undecodable``: the bytes are not what the header says (400);
- ``UnsupportedEncoding``: a coding other than gzip, deflate, identity (415);
- ``TooLarge``: more than the limit, raw or decoded (413).
"""

from __future__ import annotations

import zlib

from aiohttp import StreamReader

_GZIP_WBITS = 16 + zlib.MAX_WBITS
_ZLIB_WBITS = zlib.MAX_WBITS
_RAW_DEFLATE_WBITS = -zlib.MAX_WBITS
_STEP = 64 * 1024  # decoded bytes produced per step


class BodyError(Exception):
    """A body that cannot be used; the message quotes nothing of the input."""


class Undecodable(BodyError):
    pass


class UnsupportedEncoding(BodyError):
    pass


class TooLarge(BodyError):
    pass


SUPPORTED = ("gzip", "x-gzip", "deflate", "identity")


def codings(header: str | None) -> list[str]:
    """The codings in the order they were applied; unsupported ones raise."""
    if not header:
        return []
    out = []
    for token in header.split(","):
        name = token.strip().lower()
        if not name or name == "identity":
            continue
        if name not in SUPPORTED:
            raise UnsupportedEncoding(
                "Unsupported content-encoding; send the body as gzip, deflate or without encoding."
            )
        out.append(name)
    return out


def _inflate(data: bytes, wbits: int, limit: int, multi_member: bool) -> bytes:
    out = bytearray()
    rest = data
    while True:
        d = zlib.decompressobj(wbits)
        pending = rest
        while not d.eof:
            # max_length bounds what one step may produce: memory never passes limit + one step.
            chunk = d.decompress(pending, min(_STEP, limit + 1 - len(out)))
            out += chunk
            if len(out) > limit:
                raise TooLarge("The decoded request body is too large.")
            pending = d.unconsumed_tail
            if not pending and not chunk:
                break
        if not d.eof:
            raise Undecodable("The request body is not valid for its content-encoding (truncated).")
        rest = d.unused_data
        if not rest or not multi_member:
            break
    if rest:
        raise Undecodable("The request body has data after its compressed stream.")
    return bytes(out)


def decode(raw: bytes, content_encoding: str | None, limit: int) -> bytes:
    """The body as the client meant it, at most ``limit`` bytes, or a BodyError."""
    names = codings(content_encoding)
    data = raw
    for name in reversed(names):
        try:
            if name in ("gzip", "x-gzip"):
                data = _inflate(data, _GZIP_WBITS, limit, multi_member=True)
            else:
                # "deflate" is zlib-wrapped by the RFC; some clients send raw deflate.
                try:
                    data = _inflate(data, _ZLIB_WBITS, limit, multi_member=False)
                except zlib.error:
                    data = _inflate(data, _RAW_DEFLATE_WBITS, limit, multi_member=False)
        except zlib.error:
            raise Undecodable("The request body is not valid for its content-encoding.") from None
    return data


async def read_limited(stream: StreamReader, limit: int) -> bytes:
    """The whole raw body, or TooLarge as soon as it passes ``limit`` bytes."""
    buf = bytearray()
    while True:
        chunk = await stream.readany()
        if not chunk:
            return bytes(buf)
        buf += chunk
        if len(buf) > limit:
            raise TooLarge("The request body is too large.")
