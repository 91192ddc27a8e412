"""Continuing a broken answer on another target (aliases with ``continue_on_failure``).

While content flows, ``Continuation`` keeps the text sent so far. When the
upstream fails after content reached the client, ``take_over`` asks failover
for a later target that accepts a prefilled assistant turn; only what that
target adds is relayed, so the client receives one whole answer. A stream
that sent a tool call, a failure that is not the upstream's (a 400, the
request's total timeout) and an answer that had used its ``max_tokens`` are
not continued. If the continuation fails too, the client is told the original
failure, and usage counts the first attempt's.
"""

from __future__ import annotations

from app.errors import GatewayError, UpstreamTimeout
from app.events import TextDelta, ToolCallDelta
from app.failover import Failover, Opened


class Continuation:
    __slots__ = (
        "carry_input",
        "carry_output",
        "original",
        "original_target",
        "parts",
        "tools_sent",
        "trim",
    )

    def __init__(self) -> None:
        self.parts: list[str] = []  # the text sent so far
        self.tools_sent = False
        # Once taken over: the failure that broke the answer, and its target's names.
        self.original: GatewayError | None = None
        self.original_target = ("", "")
        # Whitespace cut off the partial answer, dropped from the continuation if repeated.
        self.trim = ""
        self.carry_output = 0
        self.carry_input: int | None = None

    def add(self, ev: TextDelta | ToolCallDelta) -> None:
        if isinstance(ev, TextDelta):
            self.parts.append(ev.text)
        else:
            self.tools_sent = True

    def record(self, batch: list[TextDelta | ToolCallDelta]) -> None:
        for ev in batch:
            self.add(ev)

    def first(self, ev: TextDelta | ToolCallDelta) -> TextDelta | ToolCallDelta | None:
        """A continuing attempt's first content, trimmed of whitespace the partial had
        already sent; None when nothing is left of it."""
        trim, self.trim = self.trim, ""
        if trim and isinstance(ev, TextDelta) and ev.text.startswith(trim):
            ev = TextDelta(ev.text[len(trim) :])
            if not ev.text:
                return None
        return ev

    async def take_over(
        self,
        failover: Failover,
        failure: GatewayError,
        *,
        target: tuple[str, str],
        input_tokens: int | None,
        output_tokens: int | None,
    ) -> Opened | None:
        """An attempt that continues the answer after ``failure``, or None.

        ``target``: the failed attempt's (model, provider), reported if the
        continuation fails too.
        """
        if (
            self.original is not None
            or self.tools_sent
            or not failure.is_retryable
            or (isinstance(failure, UpstreamTimeout) and failure.phase == "total")
        ):
            return None
        # Output tokens are rarely reported before a cut (Anthropic's count at
        # message_start is 1): text deltas stand in.
        so_far = max(len(self.parts), output_tokens or 0)
        budget = failover.request.max_tokens
        if budget is not None and so_far >= budget:
            return None  # the answer had already used its max_tokens
        found = await failover.continuation("".join(self.parts), so_far)
        if found is None:
            return None
        opened, self.trim = found
        self.original = failure
        self.original_target = target
        self.carry_output = so_far
        self.carry_input = input_tokens
        return opened
