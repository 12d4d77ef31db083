"""An incremental SSE decoder: bytes in any split -> whole (event, data) pairs."""

from __future__ import annotations


class SSEDecoder:
    __slots__ = ("_data", "_event", "_tail")

    def __init__(self) -> None:
        self._tail = b""
        self._event = b""
        self._data: list[bytes] = []

    def feed(self, chunk: bytes) -> list[tuple[bytes, bytes]]:
        """Return the events this chunk completes (event name may be b"")."""
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
        rest = self.feed(b"\n") if self._tail else []
        if self._data:
            rest.append((self._event, b"\n".join(self._data)))
            self._data = []
        return rest
