"""Structured output as it streams: the partial object while the JSON grows, then the whole
object checked against its schema (the simple protocols: ``partial`` and ``object`` events).

A request's ``response_format`` (``json_schema`` or ``json_object``) makes the
model answer in JSON; the providers see to that (OpenAI kinds natively,
Anthropic through a forced tool, the local model through a grammar). When a
route asks for it, ``Structured`` sits on the relay's batches:

- after each batch that added text (one upstream read), a ``Partial`` with the
  object parsed so far, if it changed: pydantic-core's partial JSON parser,
  strings shown as they grow;
- before a clean ``End``, a ``Parsed`` with the complete object when it parses
  and validates against the schema (``jsonschema``); otherwise an ``Error``
  (``invalid_output``) naming what failed, and the stream ends ``error``.

Nothing is checked when the stream already failed or was cancelled. Each
batch's text is parsed from the start (partial JSON cannot be resumed), so the
cost grows with the answer; structured answers are short and bounded by
``max_tokens``.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import Any

import jsonschema
from pydantic_core import from_json

from app.errors import OutputInvalid
from app.events import End, Error, Parsed, Partial, RelayEvent, TextDelta

_NOTHING = object()


def schema_of(response_format: dict[str, Any] | None) -> dict[str, Any] | None:
    """The JSON schema a ``response_format`` names ({} for ``json_object``: any object);
    None when it asks for no structure."""
    if not response_format:
        return None
    kind = response_format.get("type")
    if kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        return schema if isinstance(schema, dict) else {}
    if kind == "json_object":
        return {"type": "object"}
    return None


class Structured:
    __slots__ = ("_last", "_parts", "_validator")

    def __init__(self, schema: dict[str, Any]) -> None:
        cls = jsonschema.validators.validator_for(schema)
        self._validator = cls(schema)
        self._parts: list[str] = []
        self._last: Any = _NOTHING

    async def over(
        self, events: AsyncIterator[list[RelayEvent]]
    ) -> AsyncGenerator[list[RelayEvent], None]:
        async with aclosing(events) as source:  # type: ignore[type-var]
            async for batch in source:
                yield self.feed(batch)

    def feed(self, batch: list[RelayEvent]) -> list[RelayEvent]:
        grew = False
        end: End | None = None
        failed = False
        for ev in batch:
            if isinstance(ev, TextDelta):
                self._parts.append(ev.text)
                grew = True
            elif isinstance(ev, End):
                end = ev
            elif isinstance(ev, Error):
                failed = True
        out = batch
        if grew:
            partial = self._partial()
            if partial is not _NOTHING and partial != self._last:
                self._last = partial
                out = _before_ending(out, [Partial(partial)])
        if end is not None and not failed and end.finish_reason != "cancelled":
            final = self._final(end)
            if final is not None:
                out = _before_ending(out, [final])
        return out

    def _partial(self) -> Any:
        try:
            return from_json("".join(self._parts), allow_partial="trailing-strings")
        except ValueError:
            return _NOTHING  # nothing parseable yet (leading whitespace), or not JSON at all

    def _final(self, end: End) -> RelayEvent | None:
        """``Parsed``, or an ``Error`` (the End then says ``error``); None for an answer that
        called tools instead (it has no object to give)."""
        text = "".join(self._parts)
        if not text.strip():
            if end.finish_reason == "tool_calls":
                return None
            return self._invalid(end, "the answer held no JSON object")
        try:
            value = from_json(text)
        except ValueError as exc:
            why = "cut at max_tokens" if end.finish_reason == "length" else "not valid JSON"
            return self._invalid(end, f"the answer is {why} ({exc})")
        error = jsonschema.exceptions.best_match(self._validator.iter_errors(value))
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "(the root)"
            return self._invalid(
                end, f"the answer does not match the schema at {where}: {error.message}"
            )
        return Parsed(value)

    @staticmethod
    def _invalid(end: End, message: str) -> RelayEvent:
        end.finish_reason = "error"
        return Error(OutputInvalid(message[:500], code="invalid_output"))


def _before_ending(batch: list[RelayEvent], extra: list[RelayEvent]) -> list[RelayEvent]:
    """``extra`` after the batch's content, before its Error/End."""
    at = len(batch)
    for i, ev in enumerate(batch):
        if isinstance(ev, Error | End):
            at = i
            break
    return [*batch[:at], *extra, *batch[at:]]
