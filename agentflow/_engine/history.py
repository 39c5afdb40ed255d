"""A run's past as its events tell it: where it reached a step, and the state it had there.

The record keeps only the latest state. So that a run can be forked at an earlier step,
the ``step_completed`` event of a step that changed the state carries the top-level
fields it changed (``data["state"]``; the state is merged shallowly, as ``set_state``
does), and so does the ``waiting`` event of a step that parks on child runs before it
completes. Replaying those changes over the initial state gives the state the run had when
it reached any step, at the cost of the changed fields only: a step that leaves a big
state alone writes nothing more, and one that changes a small field writes that field.

Each step execution that finishes emits exactly one ``step_completed`` (a gate's step
when it parks, a parallel step at its join), so the visit a step started as is one more
than the ``step_completed`` events before its ``step_started`` (a recovery or a retry
starts the same visit again: the count before it is the same).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from ..types import RunEvent

__all__ = ["Reached", "reached", "state_delta"]


def _fields(state: BaseModel) -> dict[str, Any]:
    extra = state.__pydantic_extra__
    return {**state.__dict__, **extra} if extra else state.__dict__


_PLAIN = frozenset({str, int, float, bool, type(None)})
_MISSING = object()


def state_delta(old: BaseModel | None, new: BaseModel | None) -> dict[str, Any] | None:
    """The top-level fields of ``new`` that differ from ``old`` (all of them when ``old`` is None).

    Plain values are kept as they are; otherwise the changed fields are dumped as the
    model serializes them (its field serializers applied), as the store writes the state.
    """
    if new is None:
        return None
    fields = _fields(new)
    if old is None:
        changed = dict(fields)
    else:
        before = _fields(old)
        missing = _MISSING
        changed = {}
        for key, value in fields.items():
            was = before.get(key, missing)
            # Identity first: an unchanged field is usually the very same object, and
            # comparing a big value with itself by equality would cost its size.
            if was is not value and was != value:
                changed[key] = value
    for value in changed.values():
        if type(value) not in _PLAIN:
            return new.model_dump(mode="json", include=set(changed))
    return changed


@dataclass(frozen=True, slots=True)
class Reached:
    """Where a run reached a step: the visit it started as, and the state fields changed before it.

    Attributes:
        visit: the step's visit (the run had started ``visit - 1`` steps before it).
        changes: the state fields set before the step, as stored (JSON), latest value each;
            from a ``migrated`` event before it on, the migrated state and what changed since.
        version: the version a ``migrated`` event before the step brought the run to;
            None when none did (the run was at the version it started on).
        started: the version the run started on, when a ``migrated`` event says so.
    """

    visit: int
    changes: dict[str, Any]
    version: str | None = None
    started: str | None = None


def reached(events: Sequence[RunEvent], step: str) -> Reached | None:
    """The last time the run reached ``step`` (started it, or parked paused before it); None if never."""
    completed = 0
    changes: dict[str, Any] = {}
    found: Reached | None = None
    version: str | None = None
    started: str | None = None
    for ev in events:
        kind = ev.kind
        if kind == "step_completed" or kind == "waiting":
            completed += kind == "step_completed"
            data = ev.data
            if isinstance(data, dict) and isinstance(data.get("state"), dict):
                changes.update(data["state"])
        elif ev.step == step and kind in ("step_started", "paused"):
            found = Reached(completed + 1, dict(changes), version, started)
        elif kind == "migrated" and isinstance(ev.data, dict):
            # The whole state as the migration left it: the older fields are gone.
            if isinstance(ev.data.get("state"), dict):
                changes = dict(ev.data["state"])
            version = str(ev.data.get("to"))
            if started is None:
                started = str(ev.data.get("from"))
    if found is not None and started is not None and found.started is None:
        found = dataclasses.replace(found, started=started)
    return found
