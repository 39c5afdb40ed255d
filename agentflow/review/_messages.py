"""Validation errors as sentences a reviewer understands, from jsonschema and from pydantic."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from jsonschema.exceptions import ValidationError

__all__ = ["pydantic_message", "schema_message"]

_TYPES = {
    "integer": "Enter a whole number.",
    "number": "Enter a number.",
    "string": "Enter text.",
    "boolean": "Must be yes or no.",
    "array": "Must be a list.",
    "object": "Must be an object (JSON between { and }).",
    "null": "Must be empty.",
}
_FORMATS = {
    "date": "Enter a date as YYYY-MM-DD.",
    "date-time": "Enter a date and time as YYYY-MM-DDTHH:MM:SS, with a time zone.",
    "time": "Enter a time as HH:MM:SS, with a time zone.",
    "email": "Enter an email address.",
    "idn-email": "Enter an email address.",
    "uri": "Enter a full URL, such as https://example.com/.",
    "uuid": "Enter a UUID.",
    "ipv4": "Enter an IPv4 address.",
    "ipv6": "Enter an IPv6 address.",
    "hostname": "Enter a host name.",
    "regex": "Enter a regular expression.",
}


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _plural(n: Any, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def schema_message(error: ValidationError) -> str:
    """What a jsonschema violation means for the value in the field."""
    rule = error.validator
    limit: Any = error.validator_value
    match rule:
        case "type":
            types = [limit] if isinstance(limit, str) else list(limit)
            if len(types) == 1 and types[0] in _TYPES:
                return _TYPES[types[0]]
            return f"Has the wrong type: expected {' or '.join(map(str, types))}."
        case "enum":
            return f"Choose one of: {', '.join(_show(v) for v in limit)}."
        case "const":
            return f"Must be {_show(limit)}."
        case "minimum":
            return f"Must be at least {limit}."
        case "maximum":
            return f"Must be at most {limit}."
        case "exclusiveMinimum":
            return f"Must be more than {limit}."
        case "exclusiveMaximum":
            return f"Must be less than {limit}."
        case "multipleOf":
            return f"Must be a multiple of {limit}."
        case "minLength":
            return (
                "Must not be empty."
                if limit == 1
                else f"Must be at least {_plural(limit, 'character')} long."
            )
        case "maxLength":
            size = len(error.instance) if isinstance(error.instance, str) else "?"
            return f"Must be at most {_plural(limit, 'character')} long (it has {size})."
        case "pattern":
            return f"Must match the pattern {limit}."
        case "format":
            return _FORMATS.get(str(limit), f"Must be a valid {limit}.")
        case "minItems":
            return f"Needs at least {_plural(limit, 'item')}."
        case "maxItems":
            return f"Takes at most {_plural(limit, 'item')}."
        case "uniqueItems":
            return "Items must not repeat."
        case "anyOf" | "oneOf":
            return "Does not fit any of the allowed kinds of value."
        case "additionalProperties" | "unevaluatedProperties":
            return error.message[:1].upper() + error.message[1:] + "."
        case "required":
            return "This field is required."
    return error.message


def pydantic_message(error: Mapping[str, Any]) -> str:
    """A pydantic error dict's message, as a sentence (``Value error, `` prefixes dropped)."""
    kind = error.get("type")
    if kind == "missing":
        return "This field is required."
    if kind == "extra_forbidden":
        return "This field is not expected here."
    msg = str(error.get("msg") or "Not valid.")
    for prefix in ("Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(prefix)
    msg = msg[:1].upper() + msg[1:]
    return msg if msg.endswith((".", "!", "?")) else msg + "."
