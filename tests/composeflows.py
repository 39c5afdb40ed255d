"""A parent and a child workflow for the composition crash tests, runnable as a subprocess.

    python tests/composeflows.py start|recover STORE TARGET LOG RUN_ID KILL_AT

``STORE`` is ``sqlite`` or ``redis``; ``TARGET`` the SQLite path or the Redis URL.
Steps append ``start NAME PID`` / ``end NAME PID`` lines to ``LOG`` (fsynced per line).
``KILL_AT`` makes the process SIGKILL itself at one point of the parent's life:

* ``park``: the child run was created (and started), the parent's commit that parks it
  on the child is about to be written;
* ``resume``: the child run ended, the update that would resume the parent is about
  to be sent;
* ``none``: no kill.

With ``COMPOSE_FLOW=fan`` in the environment the parent fans out five child runs
(``Parallel.map`` over ``Run``) instead of running one.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from typing import Any

from helpers import log_line
from pydantic import BaseModel

from agentflow import END, START, Next, Parallel, Run, RunStatus, Workflow, WorkflowRunner
from agentflow.stores.contract import Commit, Lease, Store

LOG = ""
KILL_AT = "none"
PARENT = ""


def log(line: str) -> None:
    log_line(LOG, line)


class Killing:
    """A store that SIGKILLs its own process at the ``KILL_AT`` point, else passes calls through."""

    def __init__(self, inner: Store) -> None:
        self._inner = inner

    async def commit(self, run_id: str, lease: Lease, commit: Commit) -> str | None:
        pending = commit.fields.get("pending")
        if KILL_AT == "park" and isinstance(pending, dict) and pending.get("kind") == "children":
            log("kill park")
            os.kill(os.getpid(), signal.SIGKILL)
        return await self._inner.commit(run_id, lease, commit)

    async def update(self, run_id: str, change: Any) -> Any:
        if KILL_AT == "resume" and run_id == PARENT:
            log("kill resume")
            os.kill(os.getpid(), signal.SIGKILL)
        return await self._inner.update(run_id, change)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class LegIn(BaseModel):
    n: int


class LegOut(BaseModel):
    doubled: int


async def work(ctx):
    log("start leg")
    await asyncio.sleep(0.05)
    log("end leg")
    return Next(END, output={"doubled": ctx.input.n * 2})


leg = Workflow("Leg").input(LegIn).output(LegOut).flow({START: lambda ctx: "Work", "Work": work})


def prep(ctx):
    log("start prep")
    return Run(leg, {"n": 21}, "After")


def after(ctx):
    out = ctx.step_results[START]
    log("start after")
    return Next(END, output={"doubled": out.doubled, "typed": type(out).__name__})


train = Workflow("Train").flow({START: prep, "After": after})


def fan_one(ctx):
    return Run(leg, {"n": ctx.item})


def fan(ctx):
    log("start prep")
    return Parallel.map(fan_one, range(5), "After")


def fan_after(ctx):
    outs = ctx.step_results["fan_one"]
    log("start after")
    return Next(END, output={"doubled": [o.doubled for o in outs], "typed": type(outs[0]).__name__})


fan_train = Workflow("Train").flow({START: fan, "After": fan_after})


def open_store(kind: str, target: str) -> Store:
    if kind == "sqlite":
        from agentflow.stores import SqliteStore

        return SqliteStore(target)
    from agentflow.stores.redis import RedisStore

    return RedisStore(target)


async def main(cmd: str, kind: str, target: str, run_id: str) -> None:
    inner = open_store(kind, target)
    store: Any = Killing(inner)
    try:
        wf = fan_train if os.environ.get("COMPOSE_FLOW") == "fan" else train
        async with WorkflowRunner(wf, store=store, lease_ttl=1.0) as runner:
            if cmd == "start":
                handle = await runner.run(None, run_id=run_id)
            else:
                handle = await runner.attach(run_id)
                for _ in range(200):  # the dead owner's lease runs out within lease_ttl
                    await runner.recover()
                    info = await handle.info()
                    if info.status == RunStatus.COMPLETED or run_id in runner.supervisor.local:
                        break
                    await asyncio.sleep(0.1)
            result = await handle.result(timeout=60)
            print(f"result {result.status.value} {result.output}", flush=True)
    finally:
        await inner.close()


if __name__ == "__main__":
    command, store_kind, store_target, LOG, rid, KILL_AT = sys.argv[1:7]
    PARENT = rid
    asyncio.run(main(command, store_kind, store_target, rid))
