"""Structural bounds on a parsed request body, checked before any model validation.

Pydantic and the providers walk a body recursively: JSON nested thousands of
levels deep (in ``response_format``, ``tools[].function.parameters`` or a
message part) would cost stack and time long before a field is found wrong,
so depth is refused first, with the path of the deepest offending field.
"""

from __future__ import annotations

from typing import Any

from app.errors import InvalidRequest


def too_deep(value: Any, limit: int, max_items: int | None = None) -> str | None:
    """The path (``a.b[0].c``) where ``value`` nests deeper than ``limit``, or None.

    With ``max_items``, a list longer than that is reported too (its path ends
    in ``[]``). Iterative, so that a hostile body cannot exhaust the stack here.
    """
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    while stack:
        node, path, depth = stack.pop()
        if isinstance(node, dict):
            if depth >= limit:
                return path or "body"
            for key, child in node.items():
                if isinstance(child, dict | list):
                    stack.append((child, f"{path}.{key}" if path else str(key), depth + 1))
        elif isinstance(node, list):
            if depth >= limit:
                return path or "body"
            if max_items is not None and len(node) > max_items:
                return f"{path or 'body'}[]"
            for i, child in enumerate(node):
                if isinstance(child, dict | list):
                    stack.append((child, f"{path}[{i}]", depth + 1))
    return None


def check_depth(value: Any, limit: int, max_items: int | None = None) -> None:
    """A 400 naming the field when ``value`` nests deeper than ``limit`` levels, or holds a
    list longer than ``max_items`` (validating, and describing, millions of wrong items
    would hold the event loop for seconds)."""
    path = too_deep(value, limit, max_items)
    if path is None:
        return
    field = path.split("[", 1)[0].split(".", 1)[0][:64] or None
    if len(path) > 200:  # a client's own keys, echoed: keep the message short
        path = path[:200] + "…"
    if path.endswith("[]"):
        raise InvalidRequest(
            f"{path[:-2]}: a list longer than {max_items} items (GATEWAY_MAX_LIST_ITEMS)",
            param=field,
            code="list_too_long",
        )
    raise InvalidRequest(
        f"{path}: JSON nested deeper than {limit} levels (GATEWAY_MAX_JSON_DEPTH)",
        param=field,
        code="json_too_deep",
    )


def refusal(exc: InvalidRequest) -> str:
    """The ``gateway_limit_refusals_total`` label of a ``check_depth`` refusal."""
    return "list_items" if exc.code == "list_too_long" else "json_depth"


def check_model(value: Any, limit: int, param: str = "model") -> None:
    """A 400 for a model name longer than ``limit`` characters (it would be echoed and logged)."""
    if isinstance(value, str) and len(value) > limit:
        raise InvalidRequest(
            f"{param}: longer than {limit} characters (GATEWAY_MAX_MODEL_LENGTH)",
            param=param,
            code="model_too_long",
        )
