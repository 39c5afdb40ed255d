"""A posted edit form read by its schema: the data, where each value came from, and the errors.

:func:`agentflow.review.forms.parse` is the public face; this is how it reads. Values are
read by the schema (inputs it does not describe are ignored), converted by their field's
kind, and remembered by where they landed in the data, so that a jsonschema error at a
data location can be told at the input the reviewer typed into (a list whose emptied
items were dropped has other indices in the data than on the form).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

from jsonschema.exceptions import ValidationError as SchemaViolation
from jsonschema.exceptions import best_match

from ._messages import schema_message
from ._schema import MISSING, Schema, View, choice_text, input_name, join

__all__ = ["REMOVE", "Reader", "pairs_of"]

#: The name of a list item's "remove" checkbox; its value is the item's path.
REMOVE = "remove"

_INTEGER = re.compile(r"^[+-]?\d+$")
#: Where a name goes one level down: ``.key``, or ``[i]`` (the index in group 1).
_STEP = re.compile(r"\.|\[(\d+)\](?=$|[.\[])|\[")


def pairs_of(form: Mapping[str, Any] | Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    """The posted ``data``/``data.…`` inputs (and :data:`REMOVE`) by name, each with its values in order."""
    multi = getattr(form, "multi_items", None)
    pairs: Iterable[tuple[str, Any]]
    if callable(multi):
        pairs = multi()
    elif isinstance(form, Mapping):
        pairs = [(k, v) for k, vs in form.items() for v in (vs if isinstance(vs, list | tuple) else [vs])]
    else:
        pairs = form
    posted: dict[str, list[str]] = {}
    for name, v in pairs:
        if name in ("data", REMOVE) or name.startswith(("data.", "data[")):
            posted.setdefault(name, []).append(v if isinstance(v, str) else str(v))
    return posted


class Reader:
    """One posted form read by a schema: the data, where each value came from, the errors."""

    def __init__(self, s: Schema, posted: dict[str, list[str]]) -> None:
        self.s = s
        self.posted = posted
        self.where: dict[tuple[Any, ...], str] = {}
        self.errors: dict[str, str] = {}
        self.removed = set(posted.pop(REMOVE, ()))
        # Once for the whole form (not per list item, which made a long list quadratic):
        # the list indices posted under each name, and the names with something entered.
        self._indices: dict[str, set[int]] = {}
        self._entered: set[str] = set()
        for key, values in posted.items():
            entered = any(v not in ("", "off") for v in values)
            for m in _STEP.finditer(key):
                prefix = key[: m.start()]
                if m.group(1) is not None:
                    self._indices.setdefault(prefix, set()).add(int(m.group(1)))
                if entered:
                    self._entered.add(prefix)
            if entered:
                self._entered.add(key)

    def read(self, view: View, path: str, loc: tuple[Any, ...]) -> Any:
        """The value at ``path`` (``MISSING`` when the form has none)."""
        self.where[loc] = path
        name = input_name(path)
        if view.kind == "object":
            out: dict[str, Any] = {}
            for key, child, _ in self.s.props(view):
                got = self.read(child, join(path, key), (*loc, key))
                if got is not MISSING:
                    out[key] = got
            if not out:
                return MISSING
            return None if view.nullable and self.blank(name) else out
        if view.kind == "list":
            indices = self.indices(name)
            if not indices and name not in self.posted:
                return MISSING
            item = self.s.item(view)
            items: list[Any] = []
            for i in indices:
                if f"{path}[{i}]" not in self.removed and not self.blank(f"{name}[{i}]"):
                    got = self.read(item, f"{path}[{i}]", (*loc, len(items)))
                    if got is not MISSING:
                        items.append(got)
            return None if not items and view.nullable else items
        values = self.posted.get(name)
        if values is None:
            return MISSING
        if view.kind == "boolean":
            return "on" in values
        return self.scalar(view, path, values[-1].replace("\r\n", "\n"))

    def scalar(self, view: View, path: str, text: str) -> Any:
        if view.kind in ("string", "text"):
            return None if text == "" and view.nullable else text
        if text.strip() == "":
            return None if view.nullable else MISSING
        try:
            return _convert(view, text)
        except ValueError as exc:
            self.errors.setdefault(path, str(exc))
            return text

    def blank(self, name: str) -> bool:
        """Nothing was entered at ``name`` or under it (empty inputs, unticked boxes)."""
        return name not in self._entered

    def indices(self, name: str) -> list[int]:
        """The list item indices posted under ``name``, in order."""
        return sorted(self._indices.get(name, ()))

    def violation(self, error: SchemaViolation) -> None:
        error = _deepest(error)
        loc = tuple(error.absolute_path)
        base = self.locate(loc)
        if error.validator == "required" and isinstance(error.instance, Mapping):
            required: Any = error.validator_value
            for key in required:
                if key not in error.instance:
                    self.errors.setdefault(join(base, key), "This field is required.")
            return
        self.errors.setdefault(base, schema_message(error))

    def locate(self, loc: tuple[Any, ...]) -> str:
        while loc and loc not in self.where:
            loc = loc[:-1]
        return self.where.get(loc, "")


def _convert(view: View, text: str) -> Any:
    """``text`` as the field's type; ValueError with a sentence for the reviewer."""
    stripped = text.strip()
    if view.kind == "integer":
        if _INTEGER.match(stripped):
            return int(stripped)
        number = _float(stripped)
        if number is not None and number.is_integer():
            return int(number)
        raise ValueError("Enter a whole number.")
    if view.kind == "number":
        if _INTEGER.match(stripped):
            return int(stripped)
        number = _float(stripped)
        if number is None:
            raise ValueError("Enter a number.")
        return number
    if view.kind == "enum":
        for choice in view.choices:
            if text == choice_text(choice):
                return choice
        raise ValueError("Choose one of the options.")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"Not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno}).") from None


def _float(text: str) -> float | None:
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _deepest(error: SchemaViolation) -> SchemaViolation:
    """For an ``anyOf``/``oneOf`` failure, the member's error that says most (not "must be null")."""
    while error.validator in ("anyOf", "oneOf") and error.context:
        members = [e for e in error.context if not (e.validator == "type" and e.validator_value == "null")]
        best = best_match(members) if members else None
        if best is None:
            break
        error = best
    return error
