"""Finding a module's workflows, stores and runs; reading never creates a store.

A run is named by its id or by a prefix of it (``4f0c`` for ``4f0c9a...``): the exact id
is looked up first (one read per workflow); a prefix pages through the workflows'
listings (500 runs a page), so it costs a scan of the runs, and only when the id is not
a whole one. A prefix that more than one run starts with is a usage error listing them.
"""

from __future__ import annotations

import os

from ..errors import AgentflowError, RunNotFoundError
from ..runner import RunHandle, WorkflowRunner
from ..steward import Steward

__all__ = ["UsageError", "check_stores", "find_run", "runners", "_check_stores"]

#: Runs read per page when a prefix is looked for.
_PAGE = 500
#: Matches an ambiguous prefix error lists, at most.
_SHOWN = 10


class UsageError(AgentflowError):
    """The command was given something it cannot use (exit status 2)."""


def runners(steward: Steward, workflow: str | None = None) -> list[WorkflowRunner]:
    """The runners of the module's workflows, or of ``workflow`` alone.

    Raises:
        UsageError: the module has no workflow ``workflow`` (the message lists those it has).
    """
    names = [w.name for w in steward.workflows()]
    if workflow is None:
        return [steward.runner(n) for n in names]
    if workflow not in names:
        raise UsageError(f"no workflow {workflow!r} in the module; its workflows are {names}")
    return [steward.runner(workflow)]


async def find_run(steward: Steward, ref: str) -> tuple[WorkflowRunner, RunHandle]:
    """The runner and a handle of the run whose id is ``ref`` or starts with it.

    Raises:
        RunNotFoundError: no run of the module's workflows has that id or prefix.
        UsageError: several runs start with ``ref`` (the message lists them).
    """
    found = steward.workflows()
    for wf in found:
        runner = steward.runner(wf.name)
        try:
            return runner, await runner.attach(ref)
        except AgentflowError:  # not there, or a run of another workflow in the same store
            continue
    matches: dict[str, WorkflowRunner] = {}
    for wf in found:
        runner = steward.runner(wf.name)
        after: str | None = None
        while True:
            page = await runner.list_runs(workflow=wf.name, limit=_PAGE, after=after)
            matches.update((i.run_id, runner) for i in page if i.run_id.startswith(ref))
            if len(page) < _PAGE:
                break
            after = page[-1].run_id
    if len(matches) == 1:
        [(run_id, runner)] = matches.items()
        return runner, await runner.attach(run_id)
    names = [w.name for w in found]
    if not matches:
        raise RunNotFoundError(
            f"no run {ref!r} (nor one starting with it) in the stores of {names}; "
            "`agentflow runs MODULE` lists them"
        )
    shown = sorted(matches)[:_SHOWN]
    more = f" and {len(matches) - len(shown)} more" if len(matches) > len(shown) else ""
    raise UsageError(f"{len(matches)} runs start with {ref!r}: {', '.join(shown)}{more}; give more of the id")


def check_stores(steward: Steward) -> None:
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


#: The name the reviewers command imports.
_check_stores = check_stores
