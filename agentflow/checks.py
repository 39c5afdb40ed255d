"""Before a deploy: which stored runs the code about to serve them could not load.

:func:`check_runs` reads every run that is not final (pending, running, paused,
waiting) of the workflows a runner or steward serves, and loads each against the
current definition exactly as a pick-up would — migrations chained from its version,
its step looked up, its state validated — without writing anything. It returns the runs
that would fail, so a check in CI can refuse the deploy::

    found = await check_runs(Steward.discover("myapp.flows"))
    for bad in found:
        print(bad.run_id, bad.version, bad.step, bad.field, bad.message)
    sys.exit(1 if found else 0)

Migrations run on copies of the stored state and their results are dropped: a
migration must not have effects outside the state it returns (it may run again, for
real, when the run is picked up).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ._engine.values import decode_output
from ._engine.versions import check
from .definition.workflow import WorkflowSpec
from .errors import CorruptRecordError, IncompatibleRunError
from .runner import WorkflowRunner
from .steward import Steward
from .stores.contract import RunRecord, Store
from .types import RunStatus

__all__ = ["Incompatible", "check_runs"]

#: The statuses a run can be picked up from.
_LIVE = (RunStatus.WAITING, RunStatus.PAUSED, RunStatus.RUNNING, RunStatus.PENDING)

#: Runs listed per page, and read from the store at once.
_PAGE = 500


@dataclass(frozen=True, slots=True)
class Incompatible:
    """A run the current code would not load, and why.

    Attributes:
        run_id: the run.
        workflow: its workflow.
        status: its status now (it stays so).
        version: the version it is at.
        step: the step it is at or goes on at.
        field: the state field, ``"step"``, ``"version"`` or stored key at fault (None
            when a migration raised).
        message: the whole reason, as :class:`~agentflow.IncompatibleRunError` says it.
    """

    run_id: str
    workflow: str
    status: RunStatus
    version: str
    step: str | None
    field: str | None
    message: str

    def to_json(self) -> dict[str, Any]:
        """This finding as JSON data (for ``agentflow check --json``)."""
        return {
            "run_id": self.run_id,
            "workflow": self.workflow,
            "status": self.status.value,
            "version": self.version,
            "step": self.step,
            "field": self.field,
            "message": self.message,
        }


async def check_runs(target: WorkflowRunner | Steward | Iterable[WorkflowRunner]) -> list[Incompatible]:
    """The runs that are not final and that the definitions of ``target`` could not load.

    ``target`` is a runner, a steward (each workflow registered with it), or runners.
    Runs of the child workflows a runner serves are checked against their own
    definitions. Reads only: nothing is written, no run is taken. Pages through the
    store's listings and reads their records ``_PAGE`` at a time.
    """
    if isinstance(target, Steward):
        runners = [target.runner(info.name) for info in target.workflows()]
    elif isinstance(target, WorkflowRunner):
        runners = [target]
    else:
        runners = list(target)
    found: list[Incompatible] = []
    seen: set[tuple[int, str]] = set()
    for runner in runners:
        # The runner's workflow and the child workflows it serves (as its supervisor does).
        specs = {runner.spec.name: runner.spec, **runner._specs}
        for spec in specs.values():
            if (id(runner.store), spec.name) in seen:
                continue
            seen.add((id(runner.store), spec.name))
            found += await _check_workflow(runner.store, spec)
    return found


async def _check_workflow(store: Store, spec: WorkflowSpec) -> list[Incompatible]:
    found: list[Incompatible] = []
    for status in _LIVE:
        after: str | None = None
        while True:
            page = await store.list_runs(spec.name, status, _PAGE, after)
            if not page:
                break
            after = page[-1].run_id
            loaded = await asyncio.gather(*(store.load(r.run_id) for r in page if r.corrupt is None))
            for listed in page:
                if listed.corrupt is not None:
                    found.append(_of(listed, listed.step, "record", listed.corrupt))
            for one in loaded:
                if one is None:
                    continue  # deleted since it was listed
                problem = _problem(spec, one.record, [(o.step, o.value) for o in one.outputs])
                if problem is not None:
                    found.append(problem)
            if len(page) < _PAGE:
                break
    return found


def _problem(spec: WorkflowSpec, rec: RunRecord, outputs: list[tuple[str, object]]) -> Incompatible | None:
    """Why ``rec`` would not load, or None when it would."""
    try:
        up = check(spec, rec)
    except IncompatibleRunError as exc:
        return _of(rec, exc.step, exc.field, str(exc))
    step = (up.record if up is not None else rec).step
    for name, value in outputs:
        try:
            decode_output(spec, name, value)
        except (ValueError, TypeError, KeyError) as exc:  # pydantic's ValidationError is a ValueError
            message = f"run {rec.run_id}: the output of step {name!r} does not load: {exc}"
            return _of(rec, step, f"outputs[{name}]", message)
        except CorruptRecordError as exc:
            return _of(rec, step, exc.key, str(exc))
    return None


def _of(rec: RunRecord, step: str | None, field: str | None, message: str) -> Incompatible:
    return Incompatible(rec.run_id, rec.workflow, rec.status, rec.version, step, field, message)
