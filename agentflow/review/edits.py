"""A reviewer's edit of what an approval shows: which form it gets, and the data it posts.

- a gate with a ``form`` (a model's JSON schema): the form, filled from the context
  (when the context is an object), posts ``data`` validated into the model;
- a ``tool_call``: the tool's argument schema, filled with the call's arguments, posts
  ``{"arguments": {...}}`` (only when the reviewer changed them: arguments left as
  they were approve the call as the model made it);
- anything else takes no edit.

The fields and their parsing are :mod:`agentflow.review.forms`' (inputs named
``data.<path>``, errors keyed by path).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidInputError
from ..types import Approval
from . import forms

__all__ = ["Edit", "edit_errors", "edit_fields", "edit_of", "schema_of"]


def schema_of(approval: Approval) -> dict[str, Any] | None:
    """The JSON schema of ``approval``'s edit form, or None when it takes no edit."""
    if approval.kind == "tool_call" or (approval.kind == "gate" and approval.form is not None):
        return approval.form
    return None


def _value(approval: Approval) -> Any:
    if approval.kind == "tool_call":
        return approval.arguments
    return approval.context if isinstance(approval.context, dict) else None


def edit_fields(approval: Approval, posted: Any = None) -> list[forms.Field]:
    """The fields of ``approval``'s edit form (none when it takes no edit).

    ``posted``: what a refused form posted (:func:`forms.parse`'s data), shown again
    as the reviewer typed it; else the fields show the approval's own values.
    """
    schema = schema_of(approval)
    if schema is None:
        return []
    return forms.fields(schema, _value(approval) if posted is None else posted)


@dataclass(frozen=True, slots=True)
class Edit:
    """What an approve form posted: ``data`` for ``runner.approve``, the parsed form
    (``posted``, to show again) and its errors by path (none: it fits)."""

    data: Any
    posted: Any
    errors: dict[str, str]


def edit_of(approval: Approval, form: Sequence[tuple[str, str]]) -> Edit:
    """The edit an approve form posted for ``approval``."""
    schema = schema_of(approval)
    if schema is None:
        return Edit(None, None, {})
    posted, errors = forms.parse(schema, list(form))
    if errors:
        return Edit(None, posted, errors)
    if approval.kind == "tool_call":
        unchanged = posted == _with_defaults(schema, approval.arguments)
        return Edit(None if unchanged else {"arguments": posted}, posted, {})
    return Edit(posted, posted, {})


def _with_defaults(schema: dict[str, Any], arguments: Any) -> Any:
    """``arguments`` as the form shows them: an argument the model left out has its default
    (a tool of an MCP server gets the model's arguments as they came)."""
    if not isinstance(arguments, dict):
        return arguments
    props = schema.get("properties") or {}
    defaults = {k: p["default"] for k, p in props.items() if isinstance(p, dict) and "default" in p}
    return {**defaults, **arguments}


def edit_errors(approval: Approval, exc: InvalidInputError) -> dict[str, str]:
    """``exc`` (the runner refused the edit) as errors by the form's paths."""
    schema = schema_of(approval)
    errors = []
    for e in exc.errors:
        loc = tuple(e.get("loc") or ()) if isinstance(e, dict) else ()
        if approval.kind == "tool_call" and loc[:1] == ("arguments",):
            loc = loc[1:]
        errors.append({**e, "loc": loc} if isinstance(e, dict) else e)
    if not errors:
        return {"": str(exc)}
    return forms.errors_from_pydantic(errors, schema)
