"""Validation errors in plain words: what a person typed, and what would be accepted.

pydantic describes a failed check in its own terms ("String should match pattern '^[A-Za-z0-9]...'",
"Input should be greater than or equal to 1048576"). The daemon reports every validation error
(requests and config.toml) through `describe`, so none of that wording reaches a user.
"""

from __future__ import annotations

from typing import Any

from taskctl.api import QUEUE_NAME_PATTERN

_SIZES = ("memory_limit", "log_cap")
_KINDS = {
    "int_parsing": "must be a whole number",
    "int_type": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "bool_parsing": "must be true or false",
    "bool_type": "must be true or false",
    "string_type": "must be text",
    "list_type": "must be a list",
    "dict_type": "must be an object",
    "model_type": "must be an object",
    "missing": "is required",
    "extra_forbidden": "is not a known field (misspelt?)",
    "finite_number": "must be a finite number",
}


def describe(error: dict[str, Any]) -> str:
    """One pydantic error (an item of `ValidationError.errors()`) as a phrase that follows the
    field's name: "must be at least 1M", "is required"."""
    kind = str(error.get("type", ""))
    ctx = error.get("ctx") or {}
    field = str(next((p for p in reversed(error.get("loc", ())) if isinstance(p, str)), ""))
    if kind in _KINDS:
        return _KINDS[kind]
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        limit = next(iter(ctx.values()), "?")
        shown = _size(limit) if field in _SIZES else str(limit)
        words = {
            "greater_than_equal": "at least",
            "greater_than": "more than",
            "less_than_equal": "at most",
            "less_than": "less than",
        }
        return f"must be {words[kind]} {shown}"
    if kind == "string_pattern_mismatch":
        if ctx.get("pattern") == QUEUE_NAME_PATTERN:
            return (
                f"{error.get('input')!r} is not a valid name: letters, digits, '_', '.' and '-', "
                "starting with a letter or digit, at most 64"
            )
        return f"{error.get('input')!r} has a character it may not have"
    if kind == "string_too_short":
        n = ctx.get("min_length", 1)
        return "must not be empty" if n == 1 else f"must be at least {n} characters"
    if kind == "string_too_long":
        return f"must be at most {ctx.get('max_length')} characters"
    if kind == "too_short":
        return "must not be empty" if ctx.get("min_length") == 1 else "has too few items"
    if kind == "too_long":
        return f"may have at most {ctx.get('max_length')} items"
    if kind in ("literal_error", "enum"):
        return f"must be one of {ctx.get('expected', '?')}"
    message = str(error.get("msg", "is not valid"))
    return message.removeprefix("Value error, ")  # raised by our own validators: our words


def _size(n: object) -> str:
    if not isinstance(n, int):
        return str(n)
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return f"{n} bytes"
