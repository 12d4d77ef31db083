"""What both request translators share: options, refusals, images, stop reasons."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gateway.errors import ErrorKind, GatewayError

# Anthropic requires max_tokens; an OpenAI client may leave it out.
DEFAULT_MAX_TOKENS = 4096


@dataclass(slots=True)
class Options:
    """Per-route knobs of a translation."""

    drop_unsupported: bool = False  # drop a parameter without an equivalent instead of a 400
    default_max_tokens: int = DEFAULT_MAX_TOKENS
    dropped: list[str] = field(default_factory=list)  # what was dropped (for the log line)

    def refuse(self, param: str, why: str = "has no equivalent") -> None:
        """A parameter the other dialect cannot express: 400 naming it, or dropped."""
        if self.drop_unsupported:
            self.dropped.append(param)
            return
        raise GatewayError(
            ErrorKind.INVALID_REQUEST,
            f"{param}: {why} on this route's upstream (a different API); "
            "remove it, or set drop_unsupported = true on the route.",
        )


def bad(param: str, why: str) -> GatewayError:
    return GatewayError(ErrorKind.INVALID_REQUEST, f"{param}: {why}")


def parse_data_url(url: str) -> tuple[str, str] | None:
    """``data:<media>;base64,<data>`` -> (media type, base64 data); None for other URLs."""
    if not url.startswith("data:"):
        return None
    head, sep, data = url[5:].partition(",")
    if not sep or not head.endswith(";base64"):
        return None
    return head[: -len(";base64")] or "application/octet-stream", data


def data_url(media_type: str, data: str) -> str:
    return f"data:{media_type};base64,{data}"


def text_of(content: Any, param: str) -> str:
    """A string, or a list of text parts/blocks, as one string."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if not isinstance(content, list):
        raise bad(param, "must be a string or a list of text parts.")
    out: list[str] = []
    for i, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise bad(f"{param}[{i}]", "only text parts are allowed here.")
        out.append(part["text"])
    return "".join(out)


# Stop/finish reasons.  Anthropic's are finer; OpenAI's "stop" covers both a
# natural end and a stop sequence.
FINISH_OF_STOP = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "pause_turn": "stop",
    "refusal": "content_filter",
    "model_context_window_exceeded": "length",
}
STOP_OF_FINISH = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


def finish_reason(stop_reason: Any) -> str | None:
    if stop_reason is None:
        return None
    return FINISH_OF_STOP.get(stop_reason, "stop")


def stop_reason(finish: Any) -> str | None:
    if finish is None:
        return None
    return STOP_OF_FINISH.get(finish, "end_turn")
