"""JSON schemas as the edit form reads them: each node resolved and given the kind of its field.

pydantic's schemas put models under ``$defs`` and point at them with ``$ref``; ``Optional``
is ``anyOf`` with ``{"type": "null"}``; enums may be ``$ref``\\ s too. A :class:`View` is a
node with all that resolved: what kind of field shows it (see ``forms.KINDS``), whether
it may be null, and the ``$ref`` chain that led to it (a ``$ref`` met again on its own
chain is a recursive model, shown as JSON).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["LONG", "MISSING", "SCALARS", "Schema", "View", "choice_text", "input_name", "join", "same"]

#: Field kinds a list may hold one input per item of.
SCALARS = ("string", "text", "integer", "number", "enum")
#: Strings allowed longer than this (``maxLength``), or longer than this, get a textarea.
LONG = 200
#: Keys that can be a path segment (no ``.``, ``[`` or ``]``).
_KEY = re.compile(r"^[^.\[\]]+$")


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


#: No value here (not even None): not in the given data, not on the posted form.
MISSING: Any = _Missing()


def input_name(path: str) -> str:
    """The input's name for a data path: ``data.`` + path (``data`` for the whole)."""
    return "data" + (path if not path or path.startswith("[") else "." + path)


def join(path: str, key: str) -> str:
    """The path of ``key`` in the object at ``path``."""
    return f"{path}.{key}" if path else key


def choice_text(choice: Any) -> str:
    """What a select's option posts for an enum value: a string as it is, else its JSON."""
    return choice if isinstance(choice, str) else json.dumps(choice)


def same(a: Any, b: Any) -> bool:
    """Equal as JSON (``1`` is not ``True``)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


@dataclass(frozen=True)
class View:
    """A schema node with ``$ref``, one-member ``allOf`` and ``anyOf``-with-null resolved.

    Attributes:
        kind: the field kind that shows it.
        schema: the resolved node (the field's own keywords over the referenced ones).
        nullable: None is allowed (an empty input means None).
        chain: the ``$ref``\\ s followed to get here.
        title: the node's own ``title`` (not the referenced model's name).
        choices: an ``enum`` field's values (None left out).
    """

    kind: str
    schema: Mapping[str, Any]
    nullable: bool
    chain: frozenset[str]
    title: str | None
    choices: tuple[Any, ...] = ()


class Schema:
    """A root schema, and the views of its nodes."""

    def __init__(self, root: Mapping[str, Any]) -> None:
        self.root = root

    def view(self, node: Any, chain: frozenset[str] = frozenset()) -> View:
        """The view of ``node`` (reached through the ``$ref``\\ s in ``chain``)."""
        title = node.get("title") if isinstance(node, Mapping) else None
        schema, nullable, chain, cyclic = self._resolve(node, chain)
        if cyclic:
            return View("json", schema, nullable, chain, title)
        kind, choices, more_null = _classify(schema)
        nullable = nullable or more_null
        if kind == "boolean" and nullable:  # an optional boolean has three values: a select
            kind, choices = "enum", (True, False)
        if kind == "list" and self.view(schema.get("items", {}), chain).kind not in (*SCALARS, "object"):
            kind = "json"  # lists of booleans, of lists, of unions: one JSON textarea
        return View(kind, schema, nullable, chain, title, choices)

    def props(self, view: View) -> list[tuple[str, View, bool]]:
        """An object's properties: ``(key, view, required)``."""
        required = set(view.schema.get("required") or ())
        return [
            (key, self.view(node, view.chain), key in required)
            for key, node in (view.schema.get("properties") or {}).items()
        ]

    def item(self, view: View) -> View:
        """A list's item."""
        return self.view(view.schema.get("items", {}), view.chain)

    def _resolve(self, node: Any, chain: frozenset[str]) -> tuple[dict[str, Any], bool, frozenset[str], bool]:
        schema: dict[str, Any] = dict(node) if isinstance(node, Mapping) else {}
        nullable = False
        for _ in range(64):
            if isinstance(schema.get("$ref"), str):
                ref = schema.pop("$ref")
                target = self._target(ref)
                if ref in chain or target is None:
                    return schema, nullable, chain, True
                chain |= {ref}
                schema = {**target, **schema}  # the field's own title, description, default win
                continue
            all_of = schema.get("allOf")
            if isinstance(all_of, list) and len(all_of) == 1 and isinstance(all_of[0], Mapping):
                del schema["allOf"]
                schema = {**all_of[0], **schema}
                continue
            union = next((k for k in ("anyOf", "oneOf") if isinstance(schema.get(k), list)), None)
            if union is None:
                break
            members = [m for m in schema[union] if not _is_null(m)]
            nullable = nullable or len(members) < len(schema[union])
            if len(members) != 1 or not isinstance(members[0], Mapping):
                break  # several types: a JSON textarea
            rest = {k: v for k, v in schema.items() if k != union}
            schema = {**members[0], **rest}
        return schema, nullable, chain, False

    def _target(self, ref: str) -> Mapping[str, Any] | None:
        if not ref.startswith("#/"):
            return None  # only references inside the schema (pydantic makes no others)
        node: Any = self.root
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(node, Mapping) or part not in node:
                return None
            node = node[part]
        return node if isinstance(node, Mapping) else None


def _is_null(node: Any) -> bool:
    return isinstance(node, Mapping) and node.get("type") == "null" and set(node) <= {"type", "title"}


def _classify(schema: Mapping[str, Any]) -> tuple[str, tuple[Any, ...], bool]:
    """The kind of a resolved node, its choices, and whether it allows null itself."""
    if "enum" in schema or "const" in schema:
        values = list(schema["enum"]) if "enum" in schema else [schema["const"]]
        choices = tuple(v for v in values if v is not None)
        if choices and all(v is None or isinstance(v, str | int | float | bool) for v in values):
            return "enum", choices, None in values
        return "json", (), False
    kind = schema.get("type")
    nullable = False
    if isinstance(kind, list):
        nullable = "null" in kind
        others = [t for t in kind if t != "null"]
        kind = others[0] if len(others) == 1 else None
        if kind is None:
            return "json", (), nullable
    if kind == "boolean":
        return "boolean", (), nullable
    if kind in ("integer", "number"):
        return str(kind), (), nullable
    if kind == "string":
        long = schema.get("format") == "textarea" or int(schema.get("maxLength") or 0) > LONG
        return ("text" if long else "string"), (), nullable
    if kind == "array" and "prefixItems" not in schema:
        return "list", (), nullable
    properties = schema.get("properties")
    if kind in ("object", None) and isinstance(properties, Mapping) and properties:
        keys_fit = all(isinstance(k, str) and _KEY.match(k) for k in properties)
        if keys_fit and not isinstance(schema.get("additionalProperties"), Mapping):
            return "object", (), nullable
    return "json", (), nullable
