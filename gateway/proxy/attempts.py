"""One attempt: a request to one deployment, taken as far as it can go before the commit.

Nothing of an attempt reaches the client until it is chosen: a whole answer
(JSON body, or an error status) is read in full, a stream is read ahead
until its first content event (``readahead.py``).  An attempt that fails on
the way raises ``AttemptFailed`` with the classifier's ``Failure``; a
cancelled one (a hedge that lost, a client that left) closes its connection.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
from multidict import CIMultiDict

from gateway.accounting.sse import StreamTap
from gateway.accounting.usage import Usage
from gateway.errors import GatewayError
from gateway.providers.cloud import STREAM_TYPES, Reader
from gateway.proxy.failures import (
    Failure,
    Verdict,
    connection_failure,
    cut_failure,
    is_context_length,
    status_failure,
    timeout_failure,
)
from gateway.proxy.readahead import FirstContent, Seen
from gateway.proxy.routing import Deployment
from gateway.resilience.retry import retry_after
from gateway.upstream.client import LeanResponse, LeanSession


@dataclass(slots=True)
class UpstreamRequest:
    """What every attempt of one client request sends (per deployment: its body and headers)."""

    method: str
    path_qs: str
    body_for: Callable[[Deployment], bytes]
    headers_for: Callable[[Deployment], CIMultiDict[str]]
    stream: bool  # the client asked for a stream (an SSE answer is read ahead whatever this says)
    path_for: Callable[[Deployment], str] | None = None  # translation: the path per deployment


class Opened:
    """An attempt ready to be relayed: a whole answer (``body``) or a stream with its first events read."""

    __slots__ = ("ahead", "body", "dep", "lane", "read", "resp", "status", "streaming", "ttft_s")

    def __init__(self, dep: Deployment, resp: LeanResponse, body: bytes | None, ahead: bytes, ttft_s: float | None,
                 read: Reader | None = None) -> None:
        self.dep = dep
        self.resp = resp
        self.body = body  # a whole answer, read in full; None for a stream
        self.streaming = body is None
        self.ahead = ahead  # a stream's bytes read before the commit: relayed first, byte for byte
        self.ttft_s = ttft_s  # attempt start -> first content event (streams)
        self.lane = 1  # hedging: 1 = the first lane, 2 = the hedge
        self.status = 0  # the status to relay when it is not the upstream's (a cloud's error mapped to the dialect)
        self.read = read  # a cloud's reader of SSE bytes (Bedrock's event stream); None: the body as is


class AttemptFailed(Exception):
    def __init__(self, failure: Failure, answer: Opened | None = None) -> None:
        super().__init__(failure.message)
        self.failure = failure
        self.answer = answer  # the upstream's error answer (read in full), relayable as the final one


class Attempt:
    __slots__ = ("ahead", "dep", "resp", "scan", "seen", "t0")

    def __init__(self, dep: Deployment) -> None:
        self.dep = dep
        self.resp: LeanResponse | None = None
        self.ahead: list[bytes] = []
        self.t0 = time.perf_counter()
        self.scan: FirstContent | None = None
        self.seen = Seen.NOTHING

    async def open(self, session: LeanSession, req: UpstreamRequest) -> Opened:
        """Send the request; return what can be relayed, or raise AttemptFailed.  Closes on any failure."""
        dep = self.dep
        cloud = dep.cloud
        path_qs = req.path_qs if req.path_for is None else req.path_for(dep)
        up = dep.upstream
        url, data, headers = up.url(path_qs), req.body_for(dep), req.headers_for(dep)
        if cloud is not None:
            # The cloud kind's URL, body and auth (signed over the final bytes, after the header filter).
            try:
                url, data = await cloud.prepare(path_qs, data, headers)
            except GatewayError as err:  # no credential, or a path this cloud does not serve: the next one may
                raise AttemptFailed(Failure(Verdict.THROTTLED, err.kind, err.message, retry_same=False)) from None
        try:
            # first_byte_timeout bounds the wait for a pooled slot, the connect and the answer's head.
            self.resp = resp = await session.request(
                req.method, url, data=data, headers=headers, timeout=up.timeout,
                head_timeout=dep.cfg.first_byte_timeout,
            )
        except TimeoutError:
            raise AttemptFailed(timeout_failure(dep.name, "no response within first_byte_timeout")) from None
        except (aiohttp.ClientError, OSError):
            raise AttemptFailed(connection_failure(dep.name)) from None
        try:
            if resp.status == 200 and resp.content_type.startswith(STREAM_TYPES):
                return await self._read_ahead(resp)
            content = resp.content
            if content._eof:  # all of it is in (it came with the headers: the usual case); not is_eof(),
                # which also asks that nothing be left to read
                body = content.read_nowait()
                resp.release()
            else:
                body = await self._read_rest(resp)
            if resp.status >= 400:
                return self._refused(resp, body)
            return Opened(dep, resp, body, b"", None)
        except BaseException:
            resp.close()
            raise

    async def _read_rest(self, resp: LeanResponse) -> bytes:
        dep = self.dep
        try:
            # The idle bound stops a stalled upstream from holding the request until total_timeout.
            resp.idle_timeout(dep.cfg.idle_timeout)
            return await resp.read()
        except TimeoutError:
            raise AttemptFailed(timeout_failure(dep.name, "stalled while sending its answer")) from None
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, OSError):
            raise AttemptFailed(cut_failure(dep.name, "failed while sending its answer")) from None

    def _refused(self, resp: LeanResponse, body: bytes) -> Opened:
        """An error status: raise AttemptFailed (with the answer when it may be relayed)."""
        dep = self.dep
        answer = Opened(dep, resp, body, b"", None)
        status = resp.status
        cloud = dep.cloud
        if cloud is not None:
            # Classified as the cloud means it (an AWS access error is the gateway's 401), relayed in the dialect.
            status = cloud.upstream_status(status, resp.headers)
            answer.status, answer.body = cloud.error_body(resp.status, resp.headers, body)
            if status == 401 and cloud.credential is not None:
                cloud.credential.refused()  # a token revoked before its expiry: get a new one
        if status < 400:
            return answer
        failure = status_failure(status, dep.name, retry_after(resp.headers))
        if failure.verdict is Verdict.CALLER and is_context_length(status, answer.body or b""):
            failure.verdict = Verdict.CONTEXT
        raise AttemptFailed(failure, answer if failure.relayable else None)

    async def _read_ahead(self, resp: LeanResponse) -> Opened:
        dep = self.dep
        scan = FirstContent(dep.dialect)
        cloud = dep.cloud
        reader = cloud.stream_reader(resp) if cloud is not None else None
        if reader is None:
            try:
                # What came with the headers (often the whole answer): no timer needed for it.
                chunk = resp.content.read_nowait()
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, OSError):
                raise AttemptFailed(cut_failure(dep.name, "cut its stream before any content")) from None
            if chunk:
                self.ahead.append(chunk)
                seen = scan.feed(chunk)
                if seen is Seen.CONTENT or seen is Seen.END:
                    return Opened(dep, resp, None, chunk, time.perf_counter() - self.t0)
                if seen is Seen.ERROR:
                    raise AttemptFailed(cut_failure(dep.name, "sent an error event before any content"))
        left = dep.cfg.ttft_timeout - (time.perf_counter() - self.t0)
        resp.read_timeout(max(left, 0.0))
        try:
            if reader is None:
                await self._push_ahead(resp, scan)
            else:
                while True:
                    chunk = await reader()
                    if not chunk:
                        raise AttemptFailed(cut_failure(dep.name, "ended its stream before any content"))
                    self.ahead.append(chunk)
                    seen = scan.feed(chunk)
                    if seen is Seen.CONTENT or seen is Seen.END:
                        break
                    if seen is Seen.ERROR:
                        raise AttemptFailed(cut_failure(dep.name, "sent an error event before any content"))
        except TimeoutError:
            raise AttemptFailed(timeout_failure(dep.name, "no first token within ttft_timeout")) from None
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, OSError):
            raise AttemptFailed(cut_failure(dep.name, "cut its stream before any content")) from None
        resp.read_timeout(None)
        ahead = self.ahead[0] if len(self.ahead) == 1 else b"".join(self.ahead)
        return Opened(dep, resp, None, ahead, time.perf_counter() - self.t0, read=reader)

    async def _push_ahead(self, resp: LeanResponse, scan: FirstContent) -> None:
        """Read ahead in push mode: each chunk is scanned as it arrives (no task switch per chunk);
        back to pull mode, the rest unread, once the first content event (or the end) is in."""
        dep = self.dep
        body = resp.content
        self.scan = scan
        # Only reads that end a line: a scan decides on whole lines (events) alone.
        body.push(self._scan_chunk, lines=True)
        try:
            while self.seen is Seen.NOTHING:
                await body.wait()
                exc = body.failure
                if self.seen is Seen.NOTHING and (exc is not None or body.is_eof()):
                    held = body.held()  # the body's last bytes, no line end after them: scanned all the same
                    if held:
                        self._scan_chunk(held)
                    if self.seen is not Seen.NOTHING:
                        break
                    if exc is not None:
                        raise exc
                    raise AttemptFailed(cut_failure(dep.name, "ended its stream before any content"))
        finally:
            if self.seen is Seen.NOTHING:
                body.push(None)  # (once it decided, the scan has done so)
            self.scan = None
        if self.seen is Seen.ERROR:
            raise AttemptFailed(cut_failure(dep.name, "sent an error event before any content"))

    def _scan_chunk(self, chunk: bytes) -> None:
        """The read-ahead sink: keep the chunk; wake the attempt once the scan decided."""
        assert self.scan is not None
        assert self.resp is not None
        self.ahead.append(chunk)
        seen = self.scan.feed(chunk)
        if seen is not Seen.NOTHING:
            self.seen = seen
            body = self.resp.content
            body.push(None)  # what follows waits in the body, for the relay
            body.wake()

    def reported_usage(self) -> Usage | None:
        """Usage an abandoned stream reported before it was dropped (e.g. message_start's input tokens)."""
        if not self.ahead:
            return None
        tap = StreamTap(self.dep.dialect)
        tap.feed(b"".join(self.ahead))
        tap.flush()
        usage = tap.usage
        return usage if usage.found else None

