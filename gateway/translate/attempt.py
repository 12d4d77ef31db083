"""The proxy's one entry into translation: a request whose deployment speaks the other dialect.

``Translation`` is made once per request, before admission, only when the
route has a deployment of the other dialect (same-dialect passthrough never
builds one).  It translates the client's document once, serialises it once
per upstream model, and answers for that attempt: the upstream path, the
response body or error in the client's dialect, and a stream translator.
"""

from __future__ import annotations

import gzip
import zlib
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from gateway.errors import ANTHROPIC, OPENAI, ErrorKind, GatewayError
from gateway.translate.bodies import completion_to_message, message_to_completion
from gateway.translate.chat_to_messages import chat_to_messages
from gateway.translate.common import Options
from gateway.translate.errors import error_body_for_anthropic, error_body_for_openai
from gateway.translate.messages_to_chat import messages_to_chat
from gateway.translate.stream_to_chat import AnthropicToChatStream
from gateway.translate.stream_to_messages import ChatToAnthropicStream

if TYPE_CHECKING:
    from gateway.config import RouteConfig
    from gateway.policy.admit import RequestFacts
    from gateway.proxy.routing import Deployment

# The client paths that translate, and the path each dialect's upstream serves them on.
NATIVE_PATH = {ANTHROPIC: "/v1/messages", OPENAI: "/v1/chat/completions"}
TRANSLATABLE = frozenset(NATIVE_PATH.values())


class StreamTranslator(Protocol):
    """Fed the upstream's SSE bytes in any split; returns whole events of the client's dialect."""

    dialect: str  # the client's: the relay's own error event is in this dialect

    def feed(self, chunk: bytes) -> bytes: ...

    def finish(self) -> bytes: ...


class Translation:
    __slots__ = ("_bodies", "_doc", "_source", "client", "client_path", "include_usage", "opts", "upstream", "upstream_path")

    def __init__(self, client: str, doc: dict[str, Any], opts: Options, *, include_usage: bool = False) -> None:
        self.client = client
        self.upstream = OPENAI if client == ANTHROPIC else ANTHROPIC
        self.upstream_path = NATIVE_PATH[self.upstream]
        self.client_path = NATIVE_PATH[client]  # with the client's query string, set by the proxy
        self.opts = opts
        self.include_usage = include_usage  # OpenAI client: it asked for the final usage chunk itself
        self._source = doc
        self._doc: dict[str, Any] | None = None
        self._bodies: dict[str, bytes] = {}

    @property
    def doc(self) -> dict[str, Any]:
        """The translated request, made on first use: a route whose first choice speaks the
        client's dialect translates only if it fails over.  Raises GatewayError(400)."""
        if self._doc is None:
            src = self._source
            self._doc = chat_to_messages(src, self.opts) if self.client == OPENAI else messages_to_chat(src, self.opts)
        return self._doc

    def path_for(self, dep: Deployment) -> str:
        """The path an attempt goes to: the upstream's own for a translated one."""
        return self.upstream_path if dep.dialect == self.upstream else self.client_path

    def headers(self, extra: dict[str, str]) -> dict[str, str]:
        """The response's extra headers; ``x-gateway-dropped`` names what drop_unsupported dropped."""
        if not self.opts.dropped:
            return extra
        return {**extra, "x-gateway-dropped": ",".join(self.opts.dropped)}

    @property
    def max_tokens(self) -> int | None:
        v = self.doc.get("max_tokens", self.doc.get("max_completion_tokens"))
        return v if isinstance(v, int) else None

    def body(self, model: str) -> bytes:
        """The translated request for an upstream model (serialised once per model)."""
        try:
            return self._bodies[model]
        except KeyError:
            pass
        try:
            doc = self.doc
        except GatewayError as err:
            # Only a failover gets here (a translated first choice is translated before
            # admission): the client's own format failed, the other cannot take it.
            raise GatewayError(
                ErrorKind.UPSTREAM_ERROR,
                "The upstreams in this API's format failed and the fallback in the other format "
                f"cannot take this request ({err.message})",
            ) from None
        body = orjson.dumps({**doc, "model": model})
        self._bodies[model] = body
        return body

    def response(self, status: int, body: bytes, encoding: str | None) -> tuple[int, bytes]:
        """A whole upstream answer (success or error) in the client's dialect."""
        if encoding:
            body = _decode(body, encoding)
        if status >= 400:
            fn = error_body_for_openai if self.client == OPENAI else error_body_for_anthropic
            return fn(status, body)
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            doc = None
        if not isinstance(doc, dict):
            # Not the answer shape we translate: say so in the client's dialect.
            fn = error_body_for_openai if self.client == OPENAI else error_body_for_anthropic
            return fn(502, b"")
        out = message_to_completion(doc) if self.client == OPENAI else completion_to_message(doc)
        return status, orjson.dumps(out)

    def stream(self) -> StreamTranslator:
        if self.client == OPENAI:
            return AnthropicToChatStream(include_usage=self.include_usage)
        return ChatToAnthropicStream()


def _decode(body: bytes, encoding: str) -> bytes:
    enc = encoding.strip().lower()
    try:
        if enc == "gzip":
            return gzip.decompress(body)
        if enc == "deflate":
            return zlib.decompress(body)
    except (OSError, zlib.error, EOFError):
        return b""
    return body


def prepare(
    route: RouteConfig, doc: dict[str, Any], client: str, candidates: list[Deployment], facts: RequestFacts,
    max_tokens_cap: int | None, *, include_usage: bool, client_path: str,
) -> tuple[Translation, list[Deployment]]:
    """A request on a route with deployments of the other dialect.

    When the first choice is translated, the translation is made now: a
    request it cannot take (a parameter without an equivalent) keeps the
    deployments of its own dialect if there are any, else the 400 naming the
    parameter is the answer; and when the client gave no max_tokens, the
    translated default (capped by the key's and user's max_tokens limits) is
    what the reservation counts.  Otherwise it is made only if the request
    fails over that far (passthrough first choices pay nothing for it).
    """
    default = route.default_max_tokens if max_tokens_cap is None else min(route.default_max_tokens, max_tokens_cap)
    opts = Options(drop_unsupported=route.drop_unsupported, default_max_tokens=default)
    translation = Translation(client, doc, opts, include_usage=include_usage)
    translation.client_path = client_path
    if candidates[0].dialect == client:
        return translation, candidates
    try:
        translation.doc  # noqa: B018 - translate now
    except GatewayError:
        own = [d for d in candidates if d.dialect == client]
        if own:
            # Served in its own dialect; should it reach a translated deployment all the
            # same (a context fallback), that attempt fails with the reason (``body``).
            return translation, own
        raise
    if facts.max_tokens is None:
        facts.max_tokens = translation.max_tokens
    # The input-token estimate is of what the first choice receives (serialised once, reused).
    facts.body_len = len(translation.body(candidates[0].model))
    return translation, candidates
