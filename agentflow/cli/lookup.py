"""Finding a module's stores and runs: reading never creates a store."""

from __future__ import annotations

import os

from ..errors import AgentflowError
from ..runner import RunHandle, WorkflowRunner
from ..steward import Steward


async def _find(steward: Steward, run_id: str) -> tuple[WorkflowRunner, RunHandle]:
    for wf in steward.workflows():
        runner = steward.runner(wf.name)
        try:
            return runner, await runner.attach(run_id)
        except AgentflowError:
            continue
    raise AgentflowError(f"no run {run_id!r} in the stores of {[w.name for w in steward.workflows()]}")


def _check_stores(steward: Steward) -> None:
    """Reading runs never creates a store: a SQLite file that is not there is an error."""
    for info in steward.workflows():
        p = steward.get(info.name).compile().persistence
        if p is not None and p.enabled and p.store == "sqlite":
            path = os.path.abspath(p.path or "agentflow.db")
            if not os.path.exists(path):
                raise AgentflowError(
                    f"workflow {info.name!r} keeps its runs in {path}, which does not exist; "
                    "run the command from the folder the workflow runs in, or give the "
                    "workflow an absolute path= in .persistence()"
                )
