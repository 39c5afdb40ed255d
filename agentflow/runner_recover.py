"""Recovery: taking over the runs of a workflow (and its children's) whose owner died.

A run is recoverable when it is running and its lease ran out by the store's clock; the
take-over is one transition, so two recoverers never both take a run. After the runs,
the workflows' due deadlines are swept and parents waiting on children that all ended
are resumed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._runtime.leases import take_over
from ._runtime.supervisor import Supervisor
from .errors import AgentflowError, RunNotFoundError
from .handle import RunHandle
from .types import RunStatus

if TYPE_CHECKING:
    from .runner import WorkflowRunner

__all__ = ["recover"]

#: Runs read from the store's index of recoverable runs at a time.
_PAGE = 100


async def recover(runner: WorkflowRunner) -> list[RunHandle]:
    """Take over ``runner``'s recoverable runs; their handles (see ``WorkflowRunner.recover``)."""
    sup = runner.supervisor
    handles = []
    for name in runner._specs:  # the workflow's runs, and those of its children
        handles += await _take_over(runner, sup.of(name))
    for name in runner._specs:
        wsup = sup.of(name)
        await wsup.timers.sweep()
        wsup.watch_deadlines()
        if wsup.spec.children:  # only a workflow that runs children has runs waiting on them
            await _check_parents(runner, wsup)
    return handles


async def _take_over(runner: WorkflowRunner, sup: Supervisor) -> list[RunHandle]:
    name = sup.spec.name
    handles = []
    while True:
        ids = [i for i in await runner.store.recoverable(name, _PAGE) if i not in sup.local]
        taken = 0
        for run_id in ids:
            try:
                await sup.transition(run_id, take_over(name))
            except (AgentflowError, RunNotFoundError):
                continue
            taken += 1
            if run_id in sup.local:
                handles.append(RunHandle(runner, run_id, sup.local[run_id]))
        if len(ids) < _PAGE or not taken:
            break
    return handles


async def _check_parents(runner: WorkflowRunner, sup: Supervisor) -> None:
    """Resume the waiting runs of ``sup``'s workflow whose child runs all ended.

    A process that finished a run's last child and died before it resumed the
    parent leaves it waiting: its check-back deadline finds it later, this at once.
    """
    after = None
    while True:
        page = await runner.store.list_runs(sup.spec.name, RunStatus.WAITING, _PAGE, after)
        for r in page:
            if isinstance(r.pending, dict) and r.pending.get("kind") == "children":
                try:
                    await sup.watch.check(r.run_id, rearm=True)
                except AgentflowError:
                    continue
        if len(page) < _PAGE:
            return
        after = page[-1].run_id
