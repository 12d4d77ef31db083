"""An incremental SSE decoder: bytes in any split -> whole (event, data) pairs."""

from __future__ import annotations


class SSEDecoder:
    __slots__ = ("_data", "_event", "_tail")

    def __init__(self) -> None:
        self._tail = b""
        self._event = b""
        self._data: list[bytes] = []

    @property
    def idle(self) -> bool:
        """Nothing held: the next chunk starts at an event boundary."""
        return not self._tail and not self._data

    def feed(self, chunk: bytes) -> list[tuple[bytes, bytes]]:
        """Return the events this chunk completes (event name may be b"")."""
        if not self._tail and not self._data and chunk[-2:] == b"\n\n" and 13 not in chunk:
            # The usual case: whole events, each one optional event line and one data line.
            out: list[tuple[bytes, bytes]] = []
            for block in chunk[:-2].split(b"\n\n"):
                if block[:6] == b"data: " and 10 not in block:
                    out.append((b"", block[6:]))
                    continue
                name, _, rest = block.partition(b"\n")
                if name[:7] == b"event: " and rest[:6] == b"data: " and 10 not in rest:
                    out.append((name[7:].strip(), rest[6:]))
                    continue
                out.extend(self._lines(block + b"\n\n"))
            return out
        return self._lines(chunk)

    def _lines(self, chunk: bytes) -> list[tuple[bytes, bytes]]:
        data = self._tail + chunk if self._tail else chunk
        end = data.rfind(b"\n")
        if end < 0:
            self._tail = data
            return []
        self._tail = data[end + 1 :]
        out: list[tuple[bytes, bytes]] = []
        for line in data[:end].split(b"\n"):
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                if self._data:
                    out.append((self._event, b"\n".join(self._data)))
                self._event = b""
                self._data = []
            elif line[:5] == b"data:":
                v = line[5:]
                self._data.append(v[1:] if v[:1] == b" " else v)
            elif line[:6] == b"event:":
                self._event = line[6:].strip()
            # comments (":") and other fields are ignored
        return out

    def flush(self) -> list[tuple[bytes, bytes]]:
        """The stream ended: an event not closed by a blank line still counts."""
        rest = self._lines(b"\n") if self._tail else []
        if self._data:
            rest.append((self._event, b"\n".join(self._data)))
            self._data = []
        return rest
