"""Workflows whose reviewers the CLI tests manage; their store comes from the environment.

``REVIEWERS_STORE`` (sqlite, redis, postgres or memory), ``REVIEWERS_URL``,
``REVIEWERS_DB`` (the SQLite file) and, to give the second workflow a store of its own,
``REVIEWERS_OTHER_DB``. Read when the module is imported: the tests import it afresh.
"""

from __future__ import annotations

import os

from agentflow import END, START, HumanApproval, Next, Wait, Workflow

_store = os.environ.get("REVIEWERS_STORE", "sqlite")
_url = os.environ.get("REVIEWERS_URL") or None
_db = os.environ.get("REVIEWERS_DB", "reviewers.db")


def _persisted(wf: Workflow, path: str = _db) -> Workflow:
    if _store == "memory":
        return wf
    return wf.persistence(store=_store, url=_url, path=path)


publish = _persisted(
    Workflow("Publish", "A draft an editor approves").flow(
        {
            START: lambda ctx: Wait(HumanApproval(["editor"], prompt="Publish?"), "Done"),
            "Done": lambda ctx: Next(END),
        }
    )
)

deploy = _persisted(
    Workflow("Deploy", "A release ops approves").flow(
        {
            START: lambda ctx: Wait(HumanApproval(["ops"], prompt="Deploy?"), "Done"),
            "Done": lambda ctx: Next(END),
        }
    ),
    os.environ.get("REVIEWERS_OTHER_DB", _db),
)
