"""Loading a stored run with the definition now serving it: migrations, and what cannot load.

:func:`upgrade` runs the chain of ``Workflow.migrate`` functions from the run's version
to the definition's on the stored state (JSON), renames the steps they rename, and
returns the record as the new version has it; :func:`loadable` says whether that record
fits the definition (its step exists, its state validates). Both are pure (the
migrations run here, nothing is written): the callers commit the upgrade once, with a
``migrated`` event, before the run goes on, or leave the run where it was on an
:class:`~agentflow.errors.IncompatibleRunError`.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import TYPE_CHECKING, Any, NoReturn

from pydantic import BaseModel, ValidationError

from ..definition.steps import END, START
from ..definition.versions import chain_of
from ..errors import IncompatibleRunError, WorkflowDefinitionError, redact
from ..stores.contract import RunRecord
from ..types import RunStatus

if TYPE_CHECKING:
    from ..definition.workflow import WorkflowSpec

__all__ = ["Upgrade", "check", "loadable", "next_steps", "upgrade"]

#: Where a parked gate, timer or wait on children goes on: the keys of its ``pending``
#: naming steps.
_TARGETS = ("target", "on_reject", "on_timeout", "on_fail")


@dataclasses.dataclass(frozen=True, slots=True)
class Upgrade:
    """A run brought to the definition's version: the record to commit and the event data.

    Attributes:
        record: the run's record with the migrated state, renamed step and gate
            targets, and the new version (everything else as stored).
        data: the ``migrated`` event's data: ``from``, ``to``, ``path`` (every version
            passed through), ``steps`` (the renames applied) and ``state`` (the migrated
            state, so a run's history reads on from it).
    """

    record: RunRecord
    data: dict[str, Any]


def _fail(
    spec: WorkflowSpec,
    rec: RunRecord,
    field: str | None,
    reason: str,
    step: str | None = None,
    version: str | None = None,
) -> IncompatibleRunError:
    return IncompatibleRunError(
        rec.run_id, version or rec.version, spec.version, step or rec.step, field, reason
    )


def upgrade(spec: WorkflowSpec, rec: RunRecord) -> Upgrade | None:
    """Run the migrations from ``rec``'s version to ``spec``'s; None when they are the same.

    Raises:
        IncompatibleRunError: no chain of migrations leads there, a migration raised, or
            it returned something other than a dict.
    """
    if rec.version == spec.version:
        return None
    try:
        chain = chain_of(spec.name, spec.version, spec.migrations, rec.version)
    except WorkflowDefinitionError:
        return _no_chain(spec, rec)
    state: Any = rec.state
    step, pending = rec.step, rec.pending
    renames: dict[str, str] = {}
    for m in chain:
        if state is not None or spec.state_model is not None:
            # The function may change what it is given: it gets a copy, not the record's.
            given = copy.deepcopy(state) if isinstance(state, dict) else {}
            try:
                state = m.fn(given)
            except Exception as exc:
                raise _fail(
                    spec,
                    rec,
                    None,
                    f"the migration from version {m.source!r} to {m.target!r} raised "
                    f"{type(exc).__name__}: {redact(str(exc))}",
                ) from exc
            if isinstance(state, BaseModel):
                state = state.model_dump(mode="json")
            if not isinstance(state, dict):
                raise _fail(
                    spec,
                    rec,
                    None,
                    f"the migration from version {m.source!r} returned {type(state).__name__}, not a dict",
                )
        if m.steps:
            step = m.steps.get(step, step) if step is not None else None
            if isinstance(pending, dict) and any(pending.get(k) in m.steps for k in _TARGETS):
                pending = {
                    **pending,
                    **{k: m.steps[pending[k]] for k in _TARGETS if pending.get(k) in m.steps},
                }
            renames = {**{old: m.steps.get(new, new) for old, new in renames.items()}, **m.steps}
    new = dataclasses.replace(rec, state=state, step=step, pending=pending, version=spec.version)
    data = {
        "from": rec.version,
        "to": spec.version,
        "path": [rec.version, *(m.target for m in chain)],
        "steps": renames,
        "state": state,
    }
    return Upgrade(new, data)


def _no_chain(spec: WorkflowSpec, rec: RunRecord) -> NoReturn:
    declared = sorted(spec.migrations)
    raise _fail(
        spec,
        rec,
        "version",
        f"no migration leads from version {rec.version!r} to {spec.version!r} "
        f"(migrations from {declared}); declare .migrate({rec.version!r}, fn) on the workflow",
    )


def next_steps(rec: RunRecord) -> list[str]:
    """The steps ``rec`` goes on at: a parked gate's or timer's targets (and the step waiting
    on children), else its own step."""
    pending = rec.pending
    own = [rec.step] if rec.step is not None and rec.step != END else []
    if rec.status == RunStatus.WAITING and isinstance(pending, dict) and "target" in pending:
        targets = [t for k in _TARGETS if isinstance(t := pending.get(k), str) and t != END]
        # A step waiting on its children finishes from their results: it must exist too.
        return [*own, *targets] if pending.get("kind") == "children" else targets
    return own


def loadable(spec: WorkflowSpec, rec: RunRecord, stored: str | None = None) -> BaseModel | None:
    """The state of ``rec`` validated by ``spec``'s state model, once its steps are found in ``spec``.

    ``stored`` is the version the run is stored at, when ``rec`` is its upgrade (the
    error names that one).

    Raises:
        IncompatibleRunError: a step ``rec`` goes on at is not a step of ``spec``
            (``field`` "step"), or its state does not validate (``field`` the first
            field pydantic names).
    """
    if not spec.imperative:
        for name in next_steps(rec):
            if name not in spec.steps:
                known = sorted(s for s in spec.steps if s != START)
                reason = f"step {name!r} is not a step of it; steps are {known}"
                raise _fail(spec, rec, "step", reason, name, stored)
    model = spec.state_model
    if model is None:
        return None
    try:
        return model.model_validate(rec.state)
    except ValidationError as exc:
        errors = exc.errors()
        field = ".".join(str(p) for p in errors[0]["loc"]) or None if errors else None
        message = errors[0]["msg"] if errors else str(exc)
        reason = f"the state does not validate against {model.__name__}: {message}"
        raise _fail(spec, rec, field, reason, None, stored) from None


def check(spec: WorkflowSpec, rec: RunRecord) -> Upgrade | None:
    """:func:`upgrade` then :func:`loadable` on the result: what loading ``rec`` would do, dry.

    Raises:
        IncompatibleRunError: ``rec`` cannot be loaded by ``spec``.
    """
    up = upgrade(spec, rec)
    if up is None:
        loadable(spec, rec)
    else:
        loadable(spec, up.record, rec.version)
    return up
