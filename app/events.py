"""What a provider stream is made of, whatever the provider.

Providers turn their upstream's chunks into these; wire encoders turn them into
bytes. They are slotted dataclasses, not pydantic models: one is built for
every relayed token, so construction has to cost next to nothing.

Two closed unions say what flows where: ``ProviderEvent`` is what a provider
yields (the relay folds ``Usage`` and ``Finish`` into ``End``), ``RelayEvent``
is what the relay hands to wire encoders. Encoders dispatch on the class and
end with ``assert_never`` so a new event type cannot be forgotten.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from app.errors import GatewayError

FinishReason = Literal[
    "stop", "length", "tool_calls", "content_filter", "cancelled", "error", "timeout"
]


@dataclass(slots=True)
class Start:
    """The upstream accepted the request (status 2xx); nothing generated yet.

    ``model`` and ``provider`` are the gateway's names for the target; the
    relay fills them in.
    """

    upstream_model: str | None = None
    model: str = ""
    provider: str = ""
    # Sent at the seam of a continued answer: from here on ``model`` answers.
    # Encoders that name the model switch to it; the others ignore it.
    continuation: bool = False
    type: Literal["start"] = field(default="start", init=False)


@dataclass(slots=True)
class TextDelta:
    text: str
    type: Literal["text"] = field(default="text", init=False)


@dataclass(slots=True)
class ToolCallDelta:
    """A piece of a tool call, in OpenAI's streaming shape.

    The first delta of a call carries ``id`` and ``name``; later ones only add
    to ``arguments`` (a JSON text in pieces).
    """

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""
    type: Literal["tool_call"] = field(default="tool_call", init=False)


@dataclass(slots=True)
class Usage:
    """Token counts as far as known; a later Usage overrides the fields it sets."""

    input_tokens: int | None = None
    output_tokens: int | None = None
    type: Literal["usage"] = field(default="usage", init=False)


@dataclass(slots=True)
class Finish:
    reason: FinishReason
    type: Literal["finish"] = field(default="finish", init=False)


@dataclass(slots=True)
class Error:
    """A failure reported in-band (relay level): always followed by the ``End``."""

    error: GatewayError
    type: Literal["error"] = field(default="error", init=False)


@dataclass(slots=True)
class Partial:
    """Structured output: the object parsed so far (``app.relay.structured``)."""

    value: Any
    type: Literal["partial"] = field(default="partial", init=False)


@dataclass(slots=True)
class Parsed:
    """Structured output: the complete object, valid against its schema."""

    value: Any
    type: Literal["object"] = field(default="object", init=False)


@dataclass(slots=True)
class AttemptRecord:
    """One upstream attempt of a generation, for the ``end`` event.

    ``outcome``: ``ok`` (it answered), ``error``, ``timeout``, ``cancelled``,
    or ``skipped`` (its circuit was open); ``code`` says which error.
    """

    target: str
    outcome: str = "ok"
    duration_ms: int = 0
    status: int | None = None
    code: str | None = None

    def json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "target": self.target,
            "outcome": self.outcome,
            "duration_ms": self.duration_ms,
        }
        if self.status is not None:
            out["status"] = self.status
        if self.code is not None:
            out["code"] = self.code
        return out


@dataclass(slots=True)
class End:
    """The relay's last word on a generation (never produced by a provider)."""

    finish_reason: FinishReason
    input_tokens: int | None
    output_tokens: int | None
    model: str
    provider: str
    ttft_ms: int | None
    duration_ms: int
    attempts: list[AttemptRecord] = field(default_factory=list)
    type: Literal["end"] = field(default="end", init=False)

    @classmethod
    def before_start(cls, reason: FinishReason, model: str, duration_ms: int) -> End:
        """The end of a generation that never started (its failure was reported in-band)."""
        return cls(reason, None, None, model, "", None, duration_ms)

    def usage(self) -> dict[str, int | None]:
        return {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens}


ProviderEvent = Start | TextDelta | ToolCallDelta | Usage | Finish
RelayEvent = Start | TextDelta | ToolCallDelta | Partial | Parsed | Error | End
