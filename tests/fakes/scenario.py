"""Scenario and attempt records shared by the fake upstream servers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, get_args

Fault = Literal[
    "stall",
    "cut",
    "malformed",
    "no_done",
    "status",
    "reset",
    "never_answer",
    "error_event",
]
FAULTS: frozenset[str] = frozenset(get_args(Fault))


@dataclass
class ToolCallSpec:
    """One tool call the fake streams after the text deltas."""

    id: str
    name: str
    arguments: list[str] = field(default_factory=list)  # argument JSON text, one delta per piece


@dataclass
class Scenario:
    """What one upstream attempt does.

    Streams: text ``chunks`` (one event each), then ``tool_calls`` (one event per argument
    piece, plus one opening event per call in OpenAI's format), then the finish.  "Content
    events" below are those text and tool-argument events (for OpenAI also the opening
    tool-call delta); ``fault_after`` counts them.

    Timing: ``headers_delay`` before the status line; ``first_token_delay`` after the
    OpenAI role chunk / Anthropic message_start (+ first content_block_start and ping),
    before the first content event; ``interval`` before each later content event.
    Non-stream requests wait first_token_delay + interval * (events - 1), then answer.

    Faults (stream):
      stall         after fault_after content events, send nothing more, keep the socket open
      cut           after fault_after content events, close (FIN) without the chunked end
      malformed     after fault_after content events, one event with invalid JSON, then go on
      no_done       everything incl. finish/usage, but no ``[DONE]`` (Anthropic: no
                    message_stop) and no chunked end; the socket stays open
      error_event   after fault_after content events, a provider error event, then the
                    chunked end (no [DONE] / message_stop)
      status        answer ``status`` with the provider's error JSON (+ Retry-After)
      reset         read the request, then RST before any response byte
      never_answer  read the request, never answer, keep the socket open
    Non-stream: stall hangs, cut sends half the body then closes, malformed sends half the
    body with a matching Content-Length; no_done and error_event answer normally.

    ``raw_parts`` replaces the whole SSE body (200, provider SSE headers, one chunk per part,
    delays and stall/cut/no_done applied as if each part were a content event).
    ``finish_reason`` uses OpenAI names; the Anthropic fake maps them to stop reasons.
    """

    chunks: list[str] = field(default_factory=lambda: ["Hello", " world"])
    tool_calls: list[ToolCallSpec] = field(default_factory=list)
    finish_reason: str = "stop"
    input_tokens: int = 11
    output_tokens: int | None = None
    model: str | None = None
    headers_delay: float = 0.0
    first_token_delay: float = 0.0
    interval: float = 0.0
    fault: Fault | None = None
    fault_after: int = 1
    status: int = 500
    retry_after: str | None = None
    error_type: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    raw_parts: list[bytes] | None = None

    def __post_init__(self) -> None:
        if self.fault is not None and self.fault not in FAULTS:
            raise ValueError(f"unknown fault {self.fault!r}; expected one of {sorted(FAULTS)}")
        if self.fault_after < 0:
            raise ValueError("fault_after must be >= 0")
        if self.raw_parts is not None and not all(isinstance(p, bytes) for p in self.raw_parts):
            raise TypeError("raw_parts must be a list of bytes")

    @property
    def completion_tokens(self) -> int:
        return len(self.chunks) if self.output_tokens is None else self.output_tokens

    @property
    def text(self) -> str:
        return "".join(self.chunks)


@dataclass(eq=False)
class Attempt:
    """One HTTP request received by a fake (any path).

    Mutated by the fake's server thread; read it through ``FakeServer.attempts`` /
    ``wait_for_attempts`` / ``wait_closed``.
    """

    index: int
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    model: str | None
    scenario: Scenario
    started: float
    query: str = ""
    stream: bool = False
    completed: bool = False
    closed_at: float | None = None
    closed_by_client: bool = False
    connection_id: int = 0
