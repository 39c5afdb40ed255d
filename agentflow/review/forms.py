"""Edit forms built from a JSON schema: what to render (:func:`fields`), and what was posted (:func:`parse`).

The review page lets a reviewer edit an approval's data: a gate's ``form`` model or a tool
call's arguments. Both are stored as JSON schemas (pydantic's, with ``$defs``/``$ref``),
so the page needs no Python class to build the form.

Inputs are named ``data.<path>``: ``.`` between levels and ``[i]`` for a list item, as in
``data.home.city`` or ``data.items[0].name``. Errors are keyed by the path without the
``data.`` prefix (``home.city``); ``""`` is the data as a whole. The macros ``field`` and
``error`` of ``templates/_fields.html`` render the fields with these names.

What a reviewer sees, by schema:

- ``string`` → a text input; ``text`` (a textarea) when ``format`` is ``textarea``,
  ``maxLength`` is over 200, or the value is long or has line breaks.
- ``integer`` / ``number`` → a text input (checked on the server, not by the browser, so
  the error is shown next to the field); ``boolean`` → a checkbox.
- ``enum``, ``const``, ``Literal`` and optional booleans → a select (``enum``).
- an object with ``properties`` → its fields (``object``); a list of scalars or of objects
  → one entry per item plus an empty one to add an item (``list``); an item is removed
  by ticking its "remove" checkbox (``name="remove" value="<item path>"``) or by
  emptying it (an empty item is dropped).
- anything else (unions, maps, tuples, lists of lists, recursive models) → a JSON textarea
  (``json``).

``anyOf`` with ``null`` (``Optional``) makes a field optional: left empty, it is None.
An empty number, select or JSON field that is not Optional is left out of the data (so
a default applies, or "This field is required."); an empty text field is ``""``.
A checkbox posts ``on`` only when checked, so each one is preceded by a hidden input of
the same name posting ``off``: ``["off"]`` is false, ``["off", "on"]`` true, and nothing
at all is "not on the form". A list posts a hidden input named by its own path (value
``""``), so a list whose items were all removed is an empty list, not a missing one.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pydantic
import pydantic_core
from jsonschema import Draft202012Validator

from ..errors import InvalidInputError
from ._messages import pydantic_message
from ._reading import Reader, pairs_of
from ._schema import LONG, MISSING, Schema, View, choice_text, input_name, join, same

__all__ = ["Field", "Option", "errors_from_pydantic", "fields", "parse", "posted", "unchanged"]

#: Kinds a field may have.
KINDS = ("string", "text", "integer", "number", "boolean", "enum", "list", "object", "json")


@dataclass(frozen=True)
class Option:
    """One choice of an ``enum`` field: what it posts, what it shows, whether it is chosen."""

    value: str
    label: str
    selected: bool


@dataclass
class Field:
    """One input (or group of inputs) of an edit form.

    Attributes:
        path: where it is in the data (``items[0].name``); errors are keyed by it.
        name: the input's name, ``data.`` + path.
        label: the schema's ``title``, else the key made readable.
        kind: one of :data:`KINDS`.
        required: the data needs a value here (required and not Optional).
        value: the current value (the given one, else the schema's default, else None).
        choices: the values an ``enum`` field allows.
        children: an object's fields, or a list's items (the last one empty, to add one).
        description: the schema's ``description``.
        text: what the input or textarea shows (JSON text for ``json``).
        options: an ``enum`` field's choices as the select shows them.
        nullable: Optional: an empty input means None.
        extra: the empty entry at the end of a list.
    """

    path: str
    name: str
    label: str
    kind: str
    required: bool = False
    value: Any = None
    choices: list[Any] = field(default_factory=list)
    children: list[Field] = field(default_factory=list)
    description: str | None = None
    text: str = ""
    options: list[Option] = field(default_factory=list)
    nullable: bool = False
    extra: bool = False

    @property
    def checked(self) -> bool:
        """A ``boolean`` field's checkbox is ticked."""
        return self.value is True


def _label(key: str) -> str:
    words = key.replace("_", " ").replace("-", " ").strip()
    return words[:1].upper() + words[1:] if words else key


def fields(schema: Mapping[str, Any], value: Any = None) -> list[Field]:
    """The fields of a form for ``schema``, filled with ``value`` (or the schema's defaults).

    ``value`` may be the data as JSON, a pydantic model, or what :func:`parse` returned
    (then an input that did not convert shows what the reviewer typed). An object schema
    gives one field per property; any other schema one field at path ``""`` (``data``).
    """
    if isinstance(value, pydantic.BaseModel):
        value = value.model_dump(mode="json")
    s = Schema(schema)
    root = s.view(schema)
    if root.kind == "object":
        given = value if isinstance(value, Mapping) else {}
        return [_field(s, v, key, given.get(key, MISSING), _label(key), req) for key, v, req in s.props(root)]
    title = schema.get("title")
    return [_field(s, root, "", MISSING if value is None else value, str(title or "Data"), False)]


def _field(
    s: Schema, view: View, path: str, value: Any, label: str, required: bool, *, blank: bool = False
) -> Field:
    """The field at ``path``; ``blank``: in the empty entry that adds a list item (no defaults)."""
    if value is MISSING and not blank and "default" in view.schema:
        value = view.schema["default"]
    f = Field(
        path=path,
        name=input_name(path),
        label=str(view.title or label),
        kind=view.kind,
        required=required and not view.nullable,
        value=None if value is MISSING else value,
        choices=list(view.choices),
        description=view.schema.get("description"),
        nullable=view.nullable,
        extra=blank,
    )
    if view.kind == "object":
        given = value if isinstance(value, Mapping) else {}
        f.children = [
            _field(s, v, join(path, k), given.get(k, MISSING), _label(k), req, blank=blank)
            for k, v, req in s.props(view)
        ]
    elif view.kind == "list":
        item = s.item(view)
        items = list(value) if isinstance(value, list | tuple) else []
        f.children = [
            _field(s, item, f"{path}[{i}]", v, f"{f.label} {i + 1}", False, blank=blank)
            for i, v in enumerate(items)
        ]
        n = len(items)
        f.children.append(_field(s, item, f"{path}[{n}]", MISSING, f"{f.label}: new item", False, blank=True))
    elif view.kind == "enum":
        chosen = [c for c in view.choices if f.value is not None and same(c, f.value)]
        f.options = [Option(choice_text(c), _show(c), bool(chosen) and c is chosen[0]) for c in view.choices]
        if view.nullable or not chosen:
            f.options.insert(0, Option("", "—", not chosen))
    elif view.kind == "json":
        f.text = "" if value is MISSING or (value is None and view.nullable) else _indented(value)
    elif view.kind != "boolean" and f.value is not None:
        f.text = f.value if isinstance(f.value, str) else _number_text(f.value)
        if f.kind == "string" and ("\n" in f.text or "\r" in f.text or len(f.text) > LONG):
            f.kind = "text"
    return f


def _show(choice: Any) -> str:
    if choice is True or choice is False:
        return "yes" if choice else "no"
    return choice_text(choice)


def _indented(value: Any) -> str:
    try:
        return json.dumps(pydantic_core.to_jsonable_python(value), indent=2, ensure_ascii=False)
    except (TypeError, ValueError, pydantic_core.PydanticSerializationError):
        return str(value)


def _number_text(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def parse(
    schema: Mapping[str, Any], form: Mapping[str, Any] | Iterable[tuple[str, str]]
) -> tuple[Any, dict[str, str]]:
    """The data a form posted, converted by ``schema`` and validated against it.

    Args:
        schema: the JSON schema the form was built from.
        form: the posted inputs: a mapping of name to values (a list, or one string), a
            list of ``(name, value)`` pairs, or a Starlette ``FormData``. Only inputs named
            ``data``/``data.…`` that the schema describes are read.

    Returns:
        ``(data, errors)``: the data (what converted; an input that did not keeps the text
        the reviewer typed) and the errors by path, each a sentence for the reviewer
        (conversion first, then the schema's checks, Draft 2020-12 with formats). No
        errors means ``data`` fits the schema.
    """
    reader = Reader(Schema(schema), pairs_of(form))
    root = reader.s.view(schema)
    data = reader.read(root, "", ())
    if data is MISSING:
        data = {} if root.kind == "object" else None
    validator = Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)
    for error in validator.iter_errors(data):
        reader.violation(error)
    return data, reader.errors


def posted(flds: list[Field]) -> list[tuple[str, str]]:
    """The ``(name, value)`` pairs the rendered ``flds`` post when nothing is changed (as a browser would)."""
    out: list[tuple[str, str]] = []
    for f in flds:
        if f.kind == "list":
            out.append((f.name, ""))
        if f.kind in ("object", "list"):
            out.extend(posted(f.children))
        elif f.kind == "boolean":
            out.extend([(f.name, "off"), (f.name, "on")] if f.checked else [(f.name, "off")])
        elif f.kind == "enum":
            chosen = [o.value for o in f.options if o.selected] or [o.value for o in f.options[:1]]
            out.extend((f.name, v) for v in chosen)
        else:
            out.append((f.name, f.text))
    return out


def unchanged(schema: Mapping[str, Any], value: Any) -> Any:
    """What :func:`parse` returns when the form of ``value`` is posted as it was shown.

    ``value`` with the schema's defaults filled in and empty optionals as None: compare
    the posted data with it to tell whether the reviewer edited anything (a tool call's
    arguments as the model made them often leave defaults out).
    """
    return parse(schema, posted(fields(schema, value)))[0]


def errors_from_pydantic(
    exc: pydantic.ValidationError | InvalidInputError | Iterable[Mapping[str, Any]],
    schema: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """A pydantic validation failure as errors by the paths :func:`parse` uses.

    Takes a pydantic ``ValidationError``, the :class:`~agentflow.errors.InvalidInputError`
    that ``runner.approve(..., data=...)`` raises when data does not fit a gate's form or a
    tool's arguments (its ``errors`` are pydantic's, located in the data or the arguments),
    or the list of pydantic error dicts. With ``schema``, a location that goes past what
    the form shows (into a union member, say) is kept at the deepest field the form has.
    An ``InvalidInputError`` without field errors is returned under ``""``.
    """
    if isinstance(exc, pydantic.ValidationError):
        items: list[Mapping[str, Any]] = list(exc.errors(include_url=False))
    elif isinstance(exc, InvalidInputError):
        items = list(exc.errors)
        if not items:
            return {"": str(exc)}
    else:
        items = list(exc)
    s = Schema(schema) if schema is not None else None
    out: dict[str, str] = {}
    for item in items:
        loc = tuple(item.get("loc") or ())
        path = _locate(s, loc) if s is not None else _loc_path(loc)
        out.setdefault(path, pydantic_message(item))
    return out


def _loc_path(loc: tuple[Any, ...]) -> str:
    path = ""
    for part in loc:
        path = f"{path}[{part}]" if isinstance(part, int) else join(path, str(part))
    return path


def _locate(s: Schema, loc: tuple[Any, ...]) -> str:
    view, path = s.view(s.root), ""
    for part in loc:
        if view.kind == "object" and isinstance(part, str):
            child = next((v for k, v, _ in s.props(view) if k == part), None)
            if child is None:
                break
            view, path = child, join(path, part)
        elif view.kind == "list" and isinstance(part, int):
            view, path = s.item(view), f"{path}[{part}]"
        else:
            break
    return path
