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

Nothing is checked when the stream already failed or was cancelled.

Partial JSON cannot be parsed from where it stopped, so each partial parses
the text from the start: a partial is sent only once the text has grown by an
eighth since the last one (and at every read while it is short), which keeps
the parsing and the bytes sent linear in the answer, whatever its length.

A schema comes from the client, so it is checked before anything runs
(``check_schema``): valid, every ``$ref`` local and resolvable, and its size
keywords (``minLength``, ``maxItems``, ...) adding up to at most
``MAX_SIZE_KEYWORDS``: the local model's grammar writes each repetition out,
so they bound its size. Its ``pattern``s run on the ``regex``
engine with a time budget, so a pattern that backtracks cannot hold the event
loop.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import Any

import jsonschema
import regex
from jsonschema.exceptions import ValidationError
from pydantic_core import from_json

from app.errors import OutputInvalid
from app.events import End, Error, Parsed, Partial, RelayEvent, TextDelta

_NOTHING = object()
# Partials while the text is shorter than this go out at every read.
_SHORT = 256
MAX_SIZE_KEYWORDS = 20_000
_SIZE_KEYWORDS = frozenset(
    {
        "minLength",
        "maxLength",
        "minItems",
        "maxItems",
        "minProperties",
        "maxProperties",
        "minContains",
        "maxContains",
    }
)
# Per pattern, per value checked.
_PATTERN_BUDGET_S = 0.05


def _search(pattern: str, text: str) -> bool | None:
    """Whether ``pattern`` matches in ``text``; None when it cannot tell within the budget."""
    try:
        return regex.search(pattern, text, timeout=_PATTERN_BUDGET_S) is not None
    except (TimeoutError, regex.error):
        return None


def _pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Any:
    if validator.is_type(instance, "string"):
        found = _search(pattern, instance)
        if found is None:
            yield ValidationError(f"pattern {pattern!r} could not be checked within its budget")
        elif not found:
            yield ValidationError(f"{instance!r} does not match {pattern!r}")


def _pattern_properties(
    validator: Any, patterns: dict[str, Any], instance: Any, schema: Any
) -> Any:
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in patterns.items():
        for key, value in instance.items():
            found = _search(pattern, key)
            if found is None:
                yield ValidationError(f"pattern {pattern!r} could not be checked within its budget")
            elif found:
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


def validator_for(schema: dict[str, Any]) -> Any:
    """A validator for ``schema`` whose patterns run on the bounded engine."""
    cls = jsonschema.validators.validator_for(schema)
    safe = jsonschema.validators.extend(  # type: ignore[no-untyped-call]
        cls, {"pattern": _pattern, "patternProperties": _pattern_properties}
    )
    return safe(schema)


def check_schema(schema: dict[str, Any]) -> None:
    """Refuse (``ValueError``, naming the place) a schema that is invalid, has a ``$ref``
    that is not local or does not resolve, or size keywords over ``MAX_SIZE_KEYWORDS``."""
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise ValueError(f"json_schema.schema is not a valid JSON Schema: {exc.message}") from None
    validator = validator_for(schema)
    stack: list[tuple[Any, str]] = [(schema, "schema")]
    sizes = 0
    while stack:
        node, where = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                if key in _SIZE_KEYWORDS and isinstance(value, int):
                    sizes += value
                    if sizes > MAX_SIZE_KEYWORDS:
                        raise ValueError(
                            f"json_schema.{where}.{key}: the size keywords add up to more than "
                            f"{MAX_SIZE_KEYWORDS:,} (the gateway's bound for structured output)"
                        )
                if key == "$ref" and isinstance(value, str):
                    if not value.startswith("#"):
                        raise ValueError(
                            f"json_schema.{where}.$ref: only local references ('#...')"
                        )
                    try:
                        validator._resolver.lookup(value)
                    except Exception:
                        raise ValueError(
                            f"json_schema.{where}.$ref: {value!r} does not resolve"
                        ) from None
                stack.append((value, f"{where}.{key}"))
        elif isinstance(node, list):
            stack.extend((item, f"{where}[{i}]") for i, item in enumerate(node))


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
    __slots__ = ("_last", "_parsed_at", "_parts", "_size", "_validator")

    def __init__(self, schema: dict[str, Any]) -> None:
        self._validator = validator_for(schema)
        self._parts: list[str] = []
        self._size = 0  # characters of text so far
        self._parsed_at = 0  # the size when the last partial was parsed
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
                self._size += len(ev.text)
                grew = True
            elif isinstance(ev, End):
                end = ev
            elif isinstance(ev, Error):
                failed = True
        out = batch
        size = self._size
        if grew and (size < _SHORT or size - self._parsed_at >= self._parsed_at // 8):
            self._parsed_at = size
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
        try:
            error = jsonschema.exceptions.best_match(self._validator.iter_errors(value))
        except Exception as exc:  # the schema itself failed (checked at the request: a bug)
            return self._invalid(end, f"the schema could not be applied ({type(exc).__name__})")
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
