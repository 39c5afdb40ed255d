"""Version 2 of the versions tests' workflow, run as a process the crash test kills.

    python tests/versionflows.py DB LOG RUN_ID

Approves run ``RUN_ID`` (parked on version 1 in the SQLite file ``DB``) with version 2,
whose migration appends ``migrated PID`` to ``LOG`` and whose ``Publish`` step appends
``publish PID`` and then blocks for a minute, so the test can SIGKILL the process after
the migration was committed and before the run goes past ``Publish``.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from helpers import log_line
from pydantic import BaseModel

from agentflow import END, START, HumanApproval, Wait, Workflow, WorkflowRunner


class V2State(BaseModel):
    headline: str
    notified: bool = False


def main(db: str, log: str, run_id: str) -> None:
    def migration(state: dict[str, Any]) -> dict[str, Any]:
        log_line(log, "migrated")
        return {"headline": state["title"]}

    async def publish(ctx: Any) -> str:
        log_line(log, "publish")
        await asyncio.sleep(60)
        return "Notify"

    wf = (
        Workflow("Article", version="2")
        .state(V2State, {"headline": ""})
        .flow(
            {
                START: lambda ctx: "Review",
                "Review": lambda ctx: Wait(HumanApproval(approvers=["editor"]), "Publish"),
                "Publish": publish,
                "Notify": lambda ctx: END,
            }
        )
        .migrate("1", migration)
        .persistence(store="sqlite", path=db, lease_ttl=0.5)
    )

    async def go() -> None:
        async with WorkflowRunner(wf) as runner:
            await (await runner.approve(run_id, by="editor")).result()

    asyncio.run(go())


if __name__ == "__main__":
    main(*sys.argv[1:4])
